"""Idempotency keys: one answer per ``(telegram_id, request_id)``.

The unique constraint on that pair decides, in the database, which request
owns a key, so the rule holds across threads, workers and instances. A claim
is in flight until it points at the stored exchange. A claim whose request
died is taken over once it is older than the longest a request can live; the
claim then gets a new ``claim_token``, and since completing or releasing a
claim requires its token, a late original request can do neither: its
answer is not stored and its unit is refunded, so exactly one answer is
stored and paid for.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from app.chat.quota import USER_LIMIT_SQL
from app.errors import IdempotencyKeyReused, RequestInProgress
from app.sql import Connection, Statement

_CLAIM = Statement(
    """
    INSERT INTO ai_chat_idempotency_keys AS k
        (telegram_id, request_id, message_sha256, claim_token, claimed_at)
    VALUES (:telegram_id, :request_id, :sha, :token, :now)
    ON CONFLICT (telegram_id, request_id) DO UPDATE SET
        message_sha256 = :sha, claim_token = :token, claimed_at = :now
    WHERE k.chat_request_id IS NULL AND k.claimed_at < :stale_before
    RETURNING id
    """
)

# The stored answer of a key, with what a replay reports about today's quota.
_LOOKUP = Statement(
    f"""
    SELECT k.message_sha256, r.response, r.tokens_used, r.model, r.tools, {USER_LIMIT_SQL},
        (SELECT request_count FROM ai_chat_daily_limits
         WHERE telegram_id = :telegram_id AND last_reset_date >= :today)
    FROM ai_chat_idempotency_keys AS k
    LEFT JOIN ai_chat_requests AS r ON r.id = k.chat_request_id
    WHERE k.telegram_id = :telegram_id AND k.request_id = :request_id
    """
)

_RELEASE = Statement(
    "DELETE FROM ai_chat_idempotency_keys "
    "WHERE id = :claim_id AND claim_token = :token AND chat_request_id IS NULL"
)
# Answered keys only: a claim still in flight belongs to a request that will
# store a new exchange (after the deletion) and must be able to complete it.
_FORGET = Statement(
    "DELETE FROM ai_chat_idempotency_keys "
    "WHERE telegram_id = :telegram_id AND chat_request_id IS NOT NULL"
)

@dataclass(frozen=True)
class Claim:
    id: int
    token: str


@dataclass(frozen=True)
class StoredAnswer:
    response: str
    tokens_used: int
    model: str | None
    tools: list[str]
    daily_limit: int
    used_today: int


def message_digest(message: str) -> str:
    return hashlib.sha256(message.encode("utf-8")).hexdigest()


def claim_key(
    conn: Connection,
    telegram_id: int,
    request_id: str,
    message: str,
    now: datetime,
    claim_ttl: float,
    default_limit: int,
    today,
) -> Claim | StoredAnswer:
    """Own the key or get the answer it already has.

    Raises:
        RequestInProgress: another request holds a live claim on the key.
        IdempotencyKeyReused: the key belongs to a different message.
    """
    sha = message_digest(message)
    token = secrets.token_hex(16)
    params = {
        "telegram_id": telegram_id,
        "request_id": request_id,
        "sha": sha,
        "token": token,
        "now": now,
        "stale_before": now - timedelta(seconds=claim_ttl),
        "default_limit": default_limit,
        "today": today,
    }
    rows = conn.run(_CLAIM, params)
    if rows:
        return Claim(rows[0][0], token)
    stored = stored_answer(conn, params)
    if stored is None:
        # The holder failed and released the key between our two statements.
        raise RequestInProgress()
    return stored


def answer_of_key(
    conn: Connection, telegram_id: int, request_id: str, message: str, default_limit: int,
    today,
) -> StoredAnswer | None:
    """The answer a key already has, without claiming it (None: no such key).
    For a send refused from Redis: a retry of an answered request still gets
    its answer, whatever the quota says.

    Raises: as ``claim_key`` for a key in flight or reused."""
    return stored_answer(conn, {
        "telegram_id": telegram_id, "request_id": request_id, "sha": message_digest(message),
        "default_limit": default_limit, "today": today,
    })


def stored_answer(conn: Connection, params: dict) -> StoredAnswer | None:
    rows = conn.run(_LOOKUP, params)
    if not rows:
        return None
    stored_sha, response, tokens, model, tools, limit, used = rows[0]
    if stored_sha != params["sha"]:
        raise IdempotencyKeyReused()
    if response is None:
        raise RequestInProgress()
    return StoredAnswer(response, tokens or 0, model, tool_names(tools), limit, used or 0)


def tool_names(stored: str | None) -> list[str]:
    """The tools column (comma-separated; null on old rows) as a list."""
    return stored.split(",") if stored else []


def release_key(conn: Connection, claim: Claim) -> None:
    """Free our claim after a failure so the client can retry with the key."""
    conn.run(_RELEASE, {"claim_id": claim.id, "token": claim.token})


def forget_keys(conn: Connection, telegram_id: int) -> None:
    """Drop the user's answered keys (their history is being deleted)."""
    conn.run(_FORGET, {"telegram_id": telegram_id})
