"""The send use case: reserve a unit, ask the model, save the exchange.

It commits or rolls back its own work and raises the domain errors of
``app.errors``. No connection is held while the model thinks: the quota
reservation and the context read are done before the LLM call, and the
answer is saved afterwards in a statement (or transaction) of its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flask import current_app
from sqlalchemy import Date, bindparam, text
from sqlalchemy.exc import OperationalError

from app import metrics
from app.chat import idempotency, prompts, quota
from app.chat.quota import Day, Usage
from app.chat.service import current_day
from app.errors import ApiError, DailyLimitExceeded
from app.extensions import db
from app.logs import annotate
from app.models import UTCDateTime, begin_transaction
from app.user_context import fetch_user_context

log = logging.getLogger(__name__)

# How long the writes after an answer (save, refund) keep retrying a database
# outage; with LLM_DEADLINE 45 s the bot's 60 s are still not exceeded.
WRITE_RETRY_SECONDS = 10.0


@dataclass(frozen=True)
class SendCommand:
    telegram_id: int
    message: str
    user_context: str | None = None
    user_id: int | None = None
    request_id: str | None = None


@dataclass
class Answer:
    response: str
    tokens_used: int
    usage: Usage
    day: Day
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "response": self.response,
            "remaining_requests": self.usage.remaining,
            "tokens_used": self.tokens_used,
            "daily_limit": self.usage.limit,
        }


# The hot path's statements, prebuilt: plain SQL skips the ORM's per-call
# statement construction and compilation-cache lookups (bench/RESULTS.md).
_RECENT = text(
    "SELECT message, response FROM ai_chat_requests "
    "WHERE telegram_id = :telegram_id ORDER BY id DESC LIMIT :count"
)
_INSERT_SQL = (
    "INSERT INTO ai_chat_requests "
    "(telegram_id, user_id, message, response, tokens_used, request_date, created_at) "
    "VALUES (:telegram_id, :user_id, :message, :response, :tokens_used, :request_date, "
    ":created_at)"
)
_INSERT_TYPES = (
    bindparam("request_date", type_=Date()),
    bindparam("created_at", type_=UTCDateTime()),
)
_INSERT = text(_INSERT_SQL).bindparams(*_INSERT_TYPES)
_INSERT_RETURNING_ID = text(_INSERT_SQL + " RETURNING id").bindparams(*_INSERT_TYPES)


class Stopwatch:
    """Milliseconds per phase, for the Server-Timing header."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._started = self._mark = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = (now - self._mark) * 1000
        self._mark = now

    def total(self) -> dict[str, float]:
        self.timings["total"] = (time.perf_counter() - self._started) * 1000
        return self.timings


def rate_limit_headers(usage: Usage, day: Day) -> dict[str, str]:
    """IETF RateLimit headers; absent when the quota is unlimited."""
    if usage.unlimited:
        return {}
    return {
        "RateLimit-Policy": f'"daily";q={usage.limit};w=86400',
        "RateLimit": f'"daily";r={usage.remaining};t={day.seconds_left}',
    }


def _limit_exceeded(usage: Usage, day: Day) -> DailyLimitExceeded:
    headers = rate_limit_headers(usage, day)
    headers["Retry-After"] = str(day.seconds_left)
    return DailyLimitExceeded(
        headers=headers,
        daily_limit=usage.limit,
        requests_today=usage.used,
        requests_remaining=0,
        reset_at=day.reset_at.isoformat(),
    )


def recent_exchanges(telegram_id: int, count: int) -> list[tuple[str, str]]:
    """The user's last ``count`` exchanges, oldest first."""
    if count <= 0:
        return []
    rows = db.session.execute(_RECENT, {"telegram_id": telegram_id, "count": count}).all()
    return [(message, response) for message, response in reversed(rows)]


def _with_write_retries(action, what: str) -> None:
    """Run and commit ``action``, riding out a database blip of a few seconds.

    Used for the writes that follow an answer (save, refund, key release):
    the model's work is already done, and giving up at once would lose an
    answer or a refund to a restart of PostgreSQL.
    """
    deadline = time.monotonic() + WRITE_RETRY_SECONDS
    delay = 0.1
    while True:
        try:
            action()
            db.session.commit()
            return
        except OperationalError:
            db.session.rollback()
            if time.monotonic() + delay > deadline:
                log.error("could not %s: database unavailable", what)
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def send_message(command: SendCommand) -> Answer:
    """Answer a seller's message, spending one unit of quota only on success.

    Raises:
        DailyLimitExceeded: the user's quota for today is used up.
        RequestInProgress, IdempotencyKeyReused: see ``idempotency.claim_key``.
        LLMNotConfigured, LLMUnavailable, LLMTimeout: the model gave no answer.
        sqlalchemy OperationalError: the database is unreachable (→ 503).
    """
    config = current_app.config
    limit = config["DAILY_LIMIT"]
    day = current_day()
    watch = Stopwatch()
    annotate(telegram_id=command.telegram_id, message_chars=len(command.message))

    claim_id = None
    if command.request_id:
        claimed = _claim_key(command, day, limit)
        if isinstance(claimed, Answer):
            return claimed
        claim_id = claimed

    try:
        used = _reserve(command, day, limit)
    except BaseException:
        # The statement failed or refused: no unit to give back, only the key.
        db.session.rollback()
        if claim_id is not None:
            _with_write_retries(lambda: idempotency.release_key(claim_id), "release a key")
        raise
    watch.lap("quota")

    # From here on the unit is taken (autocommit): any failure gives it back.
    try:
        exchanges = recent_exchanges(command.telegram_id, config["CONTEXT_MESSAGES"])
        db.session.commit()  # returns the connection to the pool during the LLM call
        watch.lap("context")
        messages = prompts.build_messages(
            command.message, exchanges, _personalisation(command), config["CONTEXT_MAX_CHARS"]
        )
        completion = current_app.extensions["llm"].complete(messages)
        watch.lap("llm")
    except BaseException as error:
        _give_back(command.telegram_id, day, claim_id, error)
        raise

    try:
        _with_write_retries(lambda: _save(command, completion, day, claim_id), "save an answer")
    except OperationalError:
        # The seller gets the answer they were charged for; only the history
        # row is missing (logged for the operator).
        pass
    except Exception as error:
        _give_back(command.telegram_id, day, claim_id, error)
        raise
    watch.lap("save")
    timings = watch.total()
    for phase, ms in timings.items():
        metrics.PHASE_DURATION.labels(phase).observe(ms / 1000)
    annotate(outcome="answered", llm_ms=round(timings["llm"], 1), tokens=completion.tokens)
    return Answer(completion.text, completion.tokens, Usage(limit, used), day, timings=timings)


def _claim_key(command: SendCommand, day: Day, limit: int) -> int | Answer:
    """Own the request's idempotency key, or replay the answer it already has."""
    config = current_app.config
    claim_ttl = config["LLM_DEADLINE"] + config["USER_CONTEXT_TIMEOUT"] + WRITE_RETRY_SECONDS + 30
    claimed = idempotency.claim_key(
        command.telegram_id, command.request_id, command.message, day.now, claim_ttl
    )
    if isinstance(claimed, int):
        db.session.commit()
        return claimed
    used = quota.used_today(command.telegram_id, day)
    db.session.commit()
    metrics.IDEMPOTENT_REPLAYS.inc()
    annotate(outcome="replayed")
    return Answer(claimed.response, claimed.tokens_used, Usage(limit, used), day)


def _reserve(command: SendCommand, day: Day, limit: int) -> int:
    """Take one unit of today's quota (one atomic statement, committed at once).

    Raises:
        DailyLimitExceeded: nothing reserved.
    """
    used = quota.reserve_quota(command.telegram_id, day, limit)
    if used is None:
        metrics.QUOTA_REJECTIONS.inc()
        annotate(outcome="limit_exceeded")
        raise _limit_exceeded(Usage(limit, limit), day)
    metrics.QUOTA_RESERVATIONS.inc()
    return used


def _save(command: SendCommand, completion, day: Day, claim_id: int | None) -> None:
    """Store the exchange (and point the key at it); the caller commits.

    Without a key it is one INSERT; with one, the INSERT and the key update
    share a transaction, so a retry never stores the answer twice.
    """
    values = {
        "telegram_id": command.telegram_id,
        "user_id": command.user_id,
        "message": command.message,
        "response": completion.text,
        "tokens_used": completion.tokens,
        "request_date": day.today,
        "created_at": day.now,
    }
    if claim_id is None:
        db.session.execute(_INSERT, values)
        return
    begin_transaction()
    row_id = db.session.execute(_INSERT_RETURNING_ID, values).scalar_one()
    idempotency.complete_key(claim_id, row_id)


def _personalisation(command: SendCommand) -> str | None:
    """The request's own context, or the main server's when none was given."""
    if command.user_context is not None:
        return command.user_context or None
    config = current_app.config
    if not config["USER_CONTEXT_URL"]:
        return None
    text, outcome = fetch_user_context(
        config["USER_CONTEXT_URL"],
        command.telegram_id,
        config["USER_CONTEXT_API_KEY"],
        config["USER_CONTEXT_TIMEOUT"],
    )
    metrics.USER_CONTEXT_FETCHES.labels(outcome).inc()
    return text


def _give_back(telegram_id: int, day: Day, claim_id: int | None, error: BaseException) -> None:
    """Refund the unit and free the key of a request that got no answer."""
    db.session.rollback()
    if not isinstance(error, ApiError):
        log.error("send failed after the reservation: %s", type(error).__name__)

    def undo():
        if claim_id is not None:
            begin_transaction()
            idempotency.release_key(claim_id)
        quota.refund_quota(telegram_id, day)

    annotate(outcome=getattr(error, "code", "internal_error"))
    try:
        _with_write_retries(undo, "refund a reserved unit")
        metrics.QUOTA_REFUNDS.inc()
    except OperationalError:
        log.error("quota unit of telegram_id=%s not refunded", telegram_id)
