"""HTTP routes of the chat API: parse, delegate to the service, dump."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView

from app.api import Blueprint, admin_required, require_admin_key, require_api_key
from app.chat import schemas, send, service, stream
from app.deadline import admit, request_deadline
from app.errors import ErrorSchema, ValidationFailed

blp = Blueprint(
    "chat", __name__, url_prefix="/v1/chat", description="AI assistant for Wildberries sellers"
)
blp.before_request(require_api_key)
# Request schemas are given to ``blp.arguments`` as instances: given a class,
# webargs builds a new schema (a deep copy of its fields) on every request.

RATE_LIMIT_HEADERS = {
    "RateLimit-Policy": {"description": 'e.g. "daily";q=30;w=86400', "schema": {"type": "string"}},
    "RateLimit": {"description": 'e.g. "daily";r=29;t=3600', "schema": {"type": "string"}},
    "Server-Timing": {"description": "quota, context, llm, save, total (ms)",
                      "schema": {"type": "string"}},
}


def _errors(*statuses):
    """Document the key requirement and the error answers, in the error shape.

    flask-smorest's ``alt_response`` and ``doc`` each wrap the view in a
    pass-through function that only carries the documentation (``_apidoc``);
    the documentation is kept and the ten wrappers are not, so a request does
    not pay ten extra calls for it.
    """

    def decorate(view):
        documented = view
        for status in (403, *statuses):
            documented = blp.alt_response(
                status, schema=ErrorSchema, description=_DESCRIPTIONS[status],
                headers=_ERROR_HEADERS.get(status),
            )(documented)
        view._apidoc = blp.doc(security=[{"ApiKey": []}])(documented)._apidoc
        return view

    return decorate


_DESCRIPTIONS = {
    400: "Body is not a JSON object / bad query parameter",
    403: "Missing or wrong X-API-KEY",
    409: "Same request_id still being answered",
    413: "Body larger than MAX_CONTENT_LENGTH",
    422: "Schema violation or idempotency key reused",
    429: "Daily quota used up",
    502: "LLM failed",
    503: "LLM not configured, database unavailable, or the service is restarting / "
         "overloaded (service_unavailable, nothing reserved)",
    504: "LLM timed out",
}

_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying",
                    "schema": {"type": "integer"}},
}
_ERROR_HEADERS = {
    429: {**_RETRY_AFTER, **{name: RATE_LIMIT_HEADERS[name]
                             for name in ("RateLimit-Policy", "RateLimit")}},
    503: {"Retry-After": {"description": "On service_unavailable: seconds to wait",
                          "schema": {"type": "integer"}}},
}

# Seconds a client should wait before retrying a send refused with 503
# service_unavailable (a restart or a queue that has drained by then).
RETRY_AFTER_SECONDS = 5


def checked_telegram_id(telegram_id: int) -> int:
    """Path ids obey the body's rule: 1 … 2^63−1."""
    if not 1 <= telegram_id <= schemas.MAX_BIGINT:
        raise ValidationFailed(errors={"telegram_id": ["Must be between 1 and 2^63-1."]})
    return telegram_id


def server_timing(timings: dict) -> str:
    return ", ".join(f"{name};dur={ms:.1f}" for name, ms in timings.items())


def answer_format(requested: str | None) -> str:
    return requested or current_app.config["RESPONSE_FORMAT"]


def send_command(body: dict, idempotency_key: str | None) -> send.SendCommand:
    """The send of a request (send or stream): its key, format and deadline.

    Raises:
        ValidationFailed: the body's request_id and the Idempotency-Key differ.
        ServiceUnavailable: the worker is stopping, or too little of the
            deadline is left for an answer (app.deadline.admit); nothing is
            reserved.
    """
    request_id = body["request_id"]
    if idempotency_key and request_id and idempotency_key != request_id:
        raise ValidationFailed(errors={"request_id": ["Differs from the Idempotency-Key header."]})
    config = current_app.config
    deadline = request_deadline(config["REQUEST_DEADLINE"])
    admit(deadline, config["MIN_ANSWER_SECONDS"], config["QUEUE_TIMEOUT"], RETRY_AFTER_SECONDS)
    return send.SendCommand(
        **{
            **body,
            "request_id": request_id or idempotency_key,
            "format": answer_format(body["format"]),
            "deadline": deadline,
        }
    )


@blp.route("/send")
class Send(MethodView):
    @blp.arguments(schemas.IdempotencyHeader(), location="headers", as_kwargs=True)
    @blp.arguments(schemas.SendRequest())
    @blp.response(200, schemas.SendResponse, headers=RATE_LIMIT_HEADERS)
    @_errors(400, 409, 413, 422, 429, 502, 503, 504)
    def post(self, body, idempotency_key=None):
        """Answer a seller's question, spending one unit of the daily quota"""
        answer = send.send_message(send_command(body, idempotency_key))
        headers = send.rate_limit_headers(answer.usage, answer.day)
        if answer.timings:
            headers["Server-Timing"] = server_timing(answer.timings)
        return answer.to_dict(), headers


STREAM_DOC = {
    "description": "Server-Sent Events: status {tool, text} per seller-data tool call (before "
                   "the first delta), delta {text}, snapshot {text, parts} (at most once per "
                   "STREAM_SNAPSHOT_INTERVAL), then done (send's 200 body) or error "
                   "{error, message}; ': keep-alive' comments while the model is silent",
    "content": {
        "text/event-stream": {
            # One event: its name and its data, a JSON object on one line.
            "schema": {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"type": "string",
                              "enum": ["status", "delta", "snapshot", "done", "error"]},
                    "data": {"type": "string", "contentMediaType": "application/json",
                             "example": '{"text": "Чтобы поднять"}'},
                },
            }
        }
    },
}


@blp.route("/stream")
class Stream(MethodView):
    @blp.arguments(schemas.IdempotencyHeader(), location="headers", as_kwargs=True)
    @blp.arguments(schemas.SendRequest())
    @blp.doc(responses={"200": STREAM_DOC})
    @_errors(400, 409, 413, 422, 429, 503)
    def post(self, body, idempotency_key=None):
        """Answer a seller's question as Server-Sent Events while the model writes it"""
        exchange = send.Exchange(stream.stream_command(send_command(body, idempotency_key)))
        return stream.stream_response(exchange, exchange.open() or exchange.cached_answer())


@blp.route("/history")
class History(MethodView):
    @blp.arguments(schemas.HistoryRequest())
    @blp.response(200, schemas.HistoryResponse)
    @_errors(400, 413, 422, 503)
    def post(self, body):
        """A page of the user's exchanges, newest first"""
        return service.history(**{**body, "format": answer_format(body["format"])})


@blp.route("/history/<telegram_id:telegram_id>")
class HistoryOfUser(MethodView):
    @blp.response(200, schemas.DeleteHistoryResponse)
    @_errors(422, 503)
    def delete(self, telegram_id):
        """Delete the user's whole history (quota counters stay)"""
        return service.delete_history(checked_telegram_id(telegram_id))


@blp.route("/limits/<telegram_id:telegram_id>")
class Limits(MethodView):
    @blp.response(200, schemas.LimitsResponse)
    @_errors(422, 503)
    def get(self, telegram_id):
        """Today's usage of the daily quota"""
        return service.limits(checked_telegram_id(telegram_id))


@blp.route("/reset-limit")
class ResetLimit(MethodView):
    decorators = [admin_required]

    @blp.arguments(schemas.ResetLimitRequest())
    @blp.response(200, schemas.ResetLimitResponse)
    @_errors(400, 413, 422, 503)
    def post(self, body):
        """Zero the user's counter for today (admin key)"""
        return service.reset_limit(**body)


@blp.route("/stats/<telegram_id:telegram_id>")
class Stats(MethodView):
    @blp.arguments(schemas.StatsQuery(), location="query", error_status_code=400)
    @blp.response(200, schemas.StatsResponse)
    @_errors(400, 422, 503)
    def get(self, query, telegram_id):
        """Answers and tokens over the last `days` days"""
        return service.stats(checked_telegram_id(telegram_id), query["days"])


@blp.route("/users/<telegram_id:telegram_id>/settings")
class Settings(MethodView):
    @blp.response(200, schemas.SettingsResponse)
    @_errors(422, 503)
    def get(self, telegram_id):
        """The user's own settings (null = default) and the available models"""
        return service.user_settings(checked_telegram_id(telegram_id))

    @blp.arguments(schemas.SettingsUpdate())
    @blp.response(200, schemas.SettingsResponse)
    @_errors(400, 413, 422, 503)
    def put(self, body, telegram_id):
        """Set the preferred model (bot key) and/or the daily limits (admin key)"""
        if "daily_limit" in body or "daily_spend_limit" in body:
            require_admin_key()
        return service.update_user_settings(checked_telegram_id(telegram_id), body)


@blp.route("/users/<telegram_id:telegram_id>/memory")
class UserMemory(MethodView):
    @blp.response(200, schemas.MemoryResponse)
    @_errors(422, 503)
    def get(self, telegram_id):
        """The summary of the user's older exchanges (memory of long conversations)"""
        return service.user_memory(checked_telegram_id(telegram_id))


@blp.route("/usage")
class Usage(MethodView):
    decorators = [admin_required]

    @blp.arguments(schemas.UsageQuery(), location="query", error_status_code=400)
    @blp.response(200, schemas.UsageResponse)
    @_errors(400, 503)
    def get(self, query):
        """Spend report: answers, tokens and cost by day, model or user (admin key)"""
        return service.usage(**query)
