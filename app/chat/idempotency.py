"""Idempotency keys: one answer per ``(telegram_id, request_id)``.

The unique constraint on that pair decides, in the database, which request
owns a key, so the rule holds across threads, workers and instances. A claim
is in flight until it points at the stored exchange; a claim whose request
died is taken over once it is older than the longest a request can live.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, text

from app.errors import IdempotencyKeyReused, RequestInProgress
from app.extensions import db
from app.models import UTCDateTime

_CLAIM = text(
    """
    INSERT INTO ai_chat_idempotency_keys AS k
        (telegram_id, request_id, message_sha256, claimed_at)
    VALUES (:telegram_id, :request_id, :sha, :now)
    ON CONFLICT (telegram_id, request_id) DO UPDATE SET
        message_sha256 = :sha, claimed_at = :now
    WHERE k.chat_request_id IS NULL AND k.claimed_at < :stale_before
    RETURNING id
    """
).bindparams(
    bindparam("now", type_=UTCDateTime()),
    bindparam("stale_before", type_=UTCDateTime()),
)

_LOOKUP = text(
    """
    SELECT k.message_sha256, r.response, r.tokens_used
    FROM ai_chat_idempotency_keys AS k
    LEFT JOIN ai_chat_requests AS r ON r.id = k.chat_request_id
    WHERE k.telegram_id = :telegram_id AND k.request_id = :request_id
    """
)

_COMPLETE = text("UPDATE ai_chat_idempotency_keys SET chat_request_id = :row_id WHERE id = :id")
_RELEASE = text("DELETE FROM ai_chat_idempotency_keys WHERE id = :id")
_FORGET = text("DELETE FROM ai_chat_idempotency_keys WHERE telegram_id = :telegram_id")


@dataclass(frozen=True)
class StoredAnswer:
    response: str
    tokens_used: int


def message_digest(message: str) -> str:
    return hashlib.sha256(message.encode("utf-8")).hexdigest()


def claim_key(
    telegram_id: int, request_id: str, message: str, now: datetime, claim_ttl: float
) -> int | StoredAnswer:
    """Own the key (returns the claim id) or get the answer it already has.

    The caller commits.

    Raises:
        RequestInProgress: another request holds a live claim on the key.
        IdempotencyKeyReused: the key belongs to a different message.
    """
    sha = message_digest(message)
    claim_id = db.session.execute(
        _CLAIM,
        {
            "telegram_id": telegram_id,
            "request_id": request_id,
            "sha": sha,
            "now": now,
            "stale_before": now - timedelta(seconds=claim_ttl),
        },
    ).scalar()
    if claim_id is not None:
        return claim_id
    row = db.session.execute(
        _LOOKUP, {"telegram_id": telegram_id, "request_id": request_id}
    ).first()
    if row is None:
        # The holder failed and released the key between our two statements.
        raise RequestInProgress()
    if row.message_sha256 != sha:
        raise IdempotencyKeyReused()
    if row.response is None:
        raise RequestInProgress()
    return StoredAnswer(response=row.response, tokens_used=row.tokens_used)


def complete_key(claim_id: int, chat_request_id: int) -> None:
    """Point the claim at the stored exchange; replays read it from now on."""
    db.session.execute(_COMPLETE, {"id": claim_id, "row_id": chat_request_id})


def release_key(claim_id: int) -> None:
    """Free the key after a failure so the client can retry with it."""
    db.session.execute(_RELEASE, {"id": claim_id})


def forget_keys(telegram_id: int) -> None:
    """Drop every key of the user (their history is being deleted)."""
    db.session.execute(_FORGET, {"telegram_id": telegram_id})
