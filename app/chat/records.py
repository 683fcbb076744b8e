"""What an answer leaves behind, written at once: the exchange (history and
context), one row per model call it took (the spend report), and, when the
request holds an idempotency claim, the key pointed at the exchange.

On PostgreSQL that is one statement (one round trip, one implicit
transaction); SQLite, without data-modifying CTEs, runs the same inserts in a
transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from app.sql import Connection, Statement, transaction

_EXCHANGE = (
    "telegram_id", "user_id", "message", "response", "tokens_used", "request_date",
    "created_at", "model", "tools", "prompt_tokens", "completion_tokens", "cost",
)
_INSERT_EXCHANGE = (
    f"INSERT INTO ai_chat_requests ({', '.join(_EXCHANGE)}) {{source}} RETURNING id"
)
_VALUES = ", ".join(f":{name}" for name in _EXCHANGE)
# Every model call of the answer (its tool rounds, then the answer itself) as
# parallel arrays, unnested into rows next to the exchange they belong to.
_CALLS_PG = """
    INSERT INTO ai_chat_llm_calls (telegram_id, chat_request_id, purpose, model,
        prompt_tokens, completion_tokens, cost, usage_date, created_at)
    SELECT :telegram_id, saved.id, c.purpose, c.model, c.prompt_tokens,
        c.completion_tokens, c.cost, :request_date, :created_at
    FROM saved, unnest(CAST(:call_purposes AS text[]), CAST(:call_models AS text[]),
        CAST(:call_prompt_tokens AS int[]), CAST(:call_completion_tokens AS int[]),
        CAST(:call_costs AS numeric[])) AS c(purpose, model, prompt_tokens,
        completion_tokens, cost)
"""
# The estimate a reservation held against the spend cap, given back by the
# save and by the refund (app/chat/quota.py) alike.
RELEASE_ESTIMATE = (
    "spend_reserved = CASE WHEN COALESCE(spend_reserved, 0) > CAST(:estimate AS NUMERIC) "
    "THEN spend_reserved - CAST(:estimate AS NUMERIC) ELSE 0 END"
)
# The answer's cost joins the day's spend on the counter row, and its estimate
# is given back; nothing is locked when there is neither (an unpriced model, no cap).
_SPENT = f"""
    UPDATE ai_chat_daily_limits
    SET spend = COALESCE(spend, 0) + CAST(:spend AS NUMERIC),
        {RELEASE_ESTIMATE}
    WHERE telegram_id = :telegram_id AND last_reset_date = :request_date
      AND (CAST(:spend AS NUMERIC) > 0 OR CAST(:estimate AS NUMERIC) > 0)
"""
SAVE = Statement(
    f"""
    WITH saved AS ({_INSERT_EXCHANGE.format(source=f"VALUES ({_VALUES})")}),
    calls AS ({_CALLS_PG}),
    spent AS ({_SPENT})
    SELECT id FROM saved
    """,
    sqlite=_INSERT_EXCHANGE.format(source=f"VALUES ({_VALUES})"),
)
# With a claim: only while it is still ours (the row lock keeps a takeover out
# until we commit; a takeover that came first leaves nothing to insert).
_SAVE_COMPLETING_PG = Statement(
    f"""
    WITH claim AS (
        SELECT id FROM ai_chat_idempotency_keys
        WHERE id = :claim_id AND claim_token = :token AND chat_request_id IS NULL
        FOR UPDATE
    ), saved AS ({_INSERT_EXCHANGE.format(source=f"SELECT {_VALUES} FROM claim")}),
    calls AS ({_CALLS_PG}),
    spent AS ({_SPENT} AND EXISTS (SELECT 1 FROM saved))
    UPDATE ai_chat_idempotency_keys AS k SET chat_request_id = saved.id
    FROM saved WHERE k.id = :claim_id
    RETURNING saved.id
    """
)
_CALL_SQLITE = Statement(
    "INSERT INTO ai_chat_llm_calls (telegram_id, chat_request_id, purpose, model, "
    "prompt_tokens, completion_tokens, cost, usage_date, created_at) VALUES (:telegram_id, "
    ":chat_request_id, :purpose, :model, :prompt_tokens, :completion_tokens, :cost, "
    ":usage_date, :created_at)"
)
_ADD_SPENT = Statement(_SPENT)
_OWNED = Statement(
    "SELECT id FROM ai_chat_idempotency_keys "
    "WHERE id = :claim_id AND claim_token = :token AND chat_request_id IS NULL"
)
_COMPLETE = Statement(
    "UPDATE ai_chat_idempotency_keys SET chat_request_id = :row_id WHERE id = :claim_id"
)


@dataclass(frozen=True)
class Call:
    """One model call and what it cost (``cost`` None: the model has no price)."""

    purpose: str  # "tool_round" or "answer" ("summary": app.chat.memory)
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal | None


def _calls_params(calls: list[Call]) -> dict:
    """The calls as the parallel arrays the PostgreSQL statements unnest."""
    return {
        "call_purposes": [call.purpose for call in calls],
        "call_models": [call.model for call in calls],
        "call_prompt_tokens": [call.prompt_tokens for call in calls],
        "call_completion_tokens": [call.completion_tokens for call in calls],
        "call_costs": [call.cost for call in calls],
    }


def _spent_params(values: dict, estimate: Decimal) -> dict:
    return {"spend": values["cost"] or Decimal(0), "estimate": estimate,
            "telegram_id": values["telegram_id"], "request_date": values["request_date"]}


def save_params(values: dict, calls: list[Call], estimate: Decimal) -> dict:
    """``SAVE``'s parameters on PostgreSQL (``save_answer``; bench/ceiling.py
    renders the same statement for pgbench)."""
    return {**values, **_calls_params(calls), **_spent_params(values, estimate)}


def save_answer(
    conn: Connection, values: dict, calls: list[Call], estimate: Decimal, claim=None
) -> int | None:
    """Store the exchange and its calls, add its cost to the day's spend and
    give back the ``estimate`` its reservation held (and complete ``claim``);
    returns the exchange's id, or None, with nothing stored, when the claim is
    no longer ours.

    ``values``: the exchange's columns (``_EXCHANGE``).
    """
    if conn.dialect_name == "postgresql":
        params = save_params(values, calls, estimate)
        if claim is not None:
            params.update(claim_id=claim.id, token=claim.token)
        rows = conn.run(SAVE if claim is None else _SAVE_COMPLETING_PG, params)
        return rows[0][0] if rows else None
    with transaction(conn):
        if claim is not None and not conn.run(
            _OWNED, {"claim_id": claim.id, "token": claim.token}
        ):
            return None
        row_id = conn.run(SAVE, values)[0][0]
        for call in calls:
            record_call(conn, values["telegram_id"], call, values["request_date"],
                        values["created_at"], row_id)
        conn.run(_ADD_SPENT, _spent_params(values, estimate))
        if claim is not None:
            conn.run(_COMPLETE, {"claim_id": claim.id, "row_id": row_id})
    return row_id


def record_call(conn: Connection, telegram_id: int, call: Call, usage_date, created_at,
                chat_request_id: int | None = None) -> None:
    """One call's row by itself (a summary's, or SQLite's answer calls)."""
    conn.run(_CALL_SQLITE, {
        "telegram_id": telegram_id, "chat_request_id": chat_request_id, "purpose": call.purpose,
        "model": call.model, "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens, "cost": call.cost,
        "usage_date": usage_date, "created_at": created_at,
    })


def add_spend(conn: Connection, telegram_id: int, day, amount: Decimal | None) -> None:
    """Add the cost of a call that is no answer (a summary) to the user's
    spend of ``day``, on which the spend cap is checked."""
    if amount:
        conn.run(_ADD_SPENT, {"spend": amount, "estimate": Decimal(0),
                                 "telegram_id": telegram_id, "request_date": day})
