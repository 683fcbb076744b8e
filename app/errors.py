"""Domain exceptions and the one JSON error shape of the contract.

Every error leaves the service as ``{"error": <snake_case code>, "message":
<text>, ..., "detail": {the same fields}}``: ``detail`` is the shape of the
old FastAPI service, which the bot in production reads (``detail.message``).
Services raise the exceptions below; ``register_error_handlers`` maps them,
werkzeug's HTTP errors and database outages to that shape, so no view
carries a try/except and no exception text ever reaches a client.
"""

from __future__ import annotations

import logging
import traceback
import uuid

import marshmallow as ma
from blinker import Namespace
from flask import Flask, g
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException

from app.logs import annotate

log = logging.getLogger(__name__)

# The database could not serve a statement, whatever the reason: server gone
# or restarting, a lock or statement timeout, a cancelled query, a deadlock
# (OperationalError), connection broken under the driver (InterfaceError),
# the server refusing the statement in its current state — read-only after a
# failover, a transaction already aborted (InternalError) — every pooled
# connection busy (TimeoutError). None of them is a bug in the request; each
# means "try again shortly", and each is handled the same way wherever the
# database is used (503, write retries, refunds).
DATABASE_OUTAGE = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.InternalError,
    sa_exc.TimeoutError,
    sa_exc.DisconnectionError,
)

# Sent with the exception whenever a request is answered 503 for a database
# outage; app.metrics counts them (errors stay free of the metrics module).
database_outage = Namespace().signal("database-outage")


class ApiError(Exception):
    """Base of the errors the API reports; ``extra`` joins the JSON body."""

    status = 500
    code = "internal_error"
    message = "Внутренняя ошибка сервиса. Попробуйте позже."

    def __init__(self, message: str | None = None, *, headers=None, **extra):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.headers = headers or {}
        self.extra = extra


class Forbidden(ApiError):
    status, code, message = 403, "forbidden", "Missing or invalid X-API-KEY."


class BadRequest(ApiError):
    status, code, message = 400, "bad_request", "The request body must be a JSON object."


class ValidationFailed(ApiError):
    status, code, message = 422, "validation_error", "The request does not match the schema."


class DailyLimitExceeded(ApiError):
    status, code = 429, "daily_limit_exceeded"
    message = "Дневной лимит запросов к AI-ассистенту исчерпан. Попробуйте завтра."


class DailySpendLimitExceeded(ApiError):
    status, code = 429, "daily_spend_limit_exceeded"
    message = "Дневной лимит расходов на AI-ассистента исчерпан. Попробуйте завтра."


class RequestInProgress(ApiError):
    status, code = 409, "request_in_progress"
    message = "A request with this request_id is still being answered; retry later."


class IdempotencyKeyReused(ApiError):
    status, code = 422, "idempotency_key_reused"
    message = "This request_id was already used with a different message."


class LLMNotConfigured(ApiError):
    status, code = 503, "llm_not_configured"
    message = "AI-ассистент временно недоступен: сервис не настроен. Попробуйте позже."


class LLMUnavailable(ApiError):
    status, code = 502, "llm_unavailable"
    message = "AI-ассистент временно недоступен. Попробуйте позже, лимит не списан."


class LLMTimeout(ApiError):
    status, code = 504, "llm_timeout"
    message = "AI-ассистент не успел ответить. Попробуйте ещё раз, лимит не списан."


class DatabaseUnavailable(ApiError):
    status, code = 503, "database_unavailable"
    message = "Сервис временно недоступен. Попробуйте позже."


class ServiceUnavailable(ApiError):
    """Refused before anything was reserved: the worker is stopping, or the
    request waited in the queue too long to be answered in time."""

    status, code = 503, "service_unavailable"
    message = "Сервис перегружен или перезапускается. Повторите запрос через несколько секунд."


# Werkzeug's own HTTP errors, named the contract's way.
_HTTP_CODES = {
    400: ("bad_request", "Invalid request parameters."),
    403: ("forbidden", Forbidden.message),
    404: ("not_found", "No such endpoint."),
    405: ("method_not_allowed", "Method not allowed for this endpoint."),
    413: ("payload_too_large", "The request body is too large."),
    415: ("unsupported_media_type", "Unsupported media type."),
    422: ("validation_error", ValidationFailed.message),
}


class ErrorSchema(ma.Schema):
    """The error body of every non-2xx answer (documentation only)."""

    error = ma.fields.String(required=True, metadata={"description": "Stable snake_case code"})
    message = ma.fields.String(required=True, metadata={"description": "Human-readable text"})
    errors = ma.fields.Dict(metadata={"description": "Per-field validation messages"})
    request_id = ma.fields.String(metadata={"description": "Id to quote to the operator (500)"})
    daily_limit = ma.fields.Integer(metadata={"description": "429 only"})
    requests_today = ma.fields.Integer(metadata={"description": "429 only"})
    requests_remaining = ma.fields.Integer(metadata={"description": "429 only"})
    reset_at = ma.fields.String(metadata={"description": "429 only, ISO 8601"})
    daily_spend_limit = ma.fields.Float(
        metadata={"description": "429 daily_spend_limit_exceeded: the cap, PRICE_CURRENCY"}
    )
    spend_today = ma.fields.Float(
        metadata={"description": "429 daily_spend_limit_exceeded: spent today, PRICE_CURRENCY"}
    )
    detail = ma.fields.Dict(
        metadata={"description": "The same fields again, as the old service's FastAPI shape"}
    )

    class Meta:
        unknown = ma.INCLUDE


def _flatten_field_errors(messages) -> dict:
    """webargs nests messages by location ({"json": {...}}); the contract wants fields."""
    if not isinstance(messages, dict):
        return {"_schema": messages}
    flat: dict = {}
    for location, errors in messages.items():
        if isinstance(errors, dict):
            flat.update(errors)
        else:
            flat[location] = errors
    return flat


def error_body(code: str, message: str, **extra) -> dict:
    """The contract's error body: the fields, and ``detail`` repeating them."""
    annotate(error=code)
    fields = {"error": code, "message": message, **extra}
    return {**fields, "detail": dict(fields)}


def api_error_body(error: ApiError) -> dict:
    return error_body(error.code, error.message, **error.extra)


def http_error_response(error: HTTPException):
    """werkzeug / webargs HTTP errors → the contract shape."""
    if error.code is not None and error.code >= 500:
        return unexpected_error_response(error)
    code, message = _HTTP_CODES.get(error.code, ("http_error", error.name))
    data = getattr(error, "data", None) or {}
    messages = data.get("messages")
    extra = {"errors": _flatten_field_errors(messages)} if messages else {}
    headers = dict(data.get("headers") or {})
    if error.code == 405 and error.valid_methods:
        headers["Allow"] = ", ".join(error.valid_methods)
    return error_body(code, message, **extra), error.code, headers


def api_error_response(error: ApiError):
    return api_error_body(error), error.status, error.headers


def database_error_response(error: Exception):
    database_outage.send(error)
    log.error("database unavailable: %s", type(error).__name__)
    return api_error_response(DatabaseUnavailable())


def unexpected_error_response(error: Exception):
    request_id = getattr(g, "request_id", None) or uuid.uuid4().hex
    original = getattr(error, "original_exception", None) or error
    # The stack and the exception type, not its text: driver errors quote the
    # failing row, i.e. the seller's message and the model's answer.
    stack = "".join(traceback.format_tb(original.__traceback__))
    sqlstate = getattr(getattr(original, "orig", None), "pgcode", None)
    log.error(
        "unexpected error %s%s (request %s)\n%s",
        type(original).__name__,
        f" sqlstate={sqlstate}" if sqlstate else "",
        request_id,
        stack,
    )
    error = ApiError(request_id=request_id)
    return api_error_body(error), 500


def register_error_handlers(app: Flask) -> None:
    """Install the handlers; the most specific class wins in Flask."""
    app.register_error_handler(ApiError, api_error_response)
    app.register_error_handler(HTTPException, http_error_response)
    for outage in DATABASE_OUTAGE:
        app.register_error_handler(outage, database_error_response)
    app.register_error_handler(Exception, unexpected_error_response)
