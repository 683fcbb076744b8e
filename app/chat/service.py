"""The chat use cases other than sending: history, limits, reset, stats,
and the user's own settings.

Each function commits its own work; sending lives in ``app.chat.send``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from flask import current_app
from sqlalchemy import func, select

from app import sql
from app.chat import idempotency, memory, quota
from app.chat.idempotency import tool_names
from app.chat.quota import Day, Usage
from app.extensions import db
from app.models import ChatRequest, LLMCall
from app.render import render

# The contract: Redis's limits are never trusted past this age.
LIMITS_TRUSTED_SECONDS = 60

_DELETE_HISTORY = sql.Statement("DELETE FROM ai_chat_requests WHERE telegram_id = :telegram_id")


def current_day() -> Day:
    config = current_app.config
    return Day(now=config["CLOCK"](), timezone=config["TIMEZONE"])


def history(telegram_id: int, limit: int, offset: int, format: str) -> dict:
    """A page of the user's exchanges, newest first, answers in ``format``."""
    by_user = ChatRequest.telegram_id == telegram_id
    total = db.session.execute(select(func.count()).where(by_user)).scalar_one()
    rows = db.session.execute(
        select(ChatRequest).where(by_user).order_by(ChatRequest.id.desc())
        .limit(limit).offset(offset)
    ).scalars().all()
    db.session.commit()
    items = [
        {
            "id": row.id,
            "message": row.message,
            "response": render(row.response, format).text,
            # Rows the old service wrote may have none.
            "tokens_used": row.tokens_used or 0,
            "model": row.model,
            "tools": tool_names(row.tools),
            "created_at": row.created_at,
        }
        for row in rows
    ]
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def delete_history(telegram_id: int) -> dict:
    """Forget the user's exchanges, their summary and idempotency keys; quota
    counters (and the spend records, which hold no text) stay."""
    with sql.connection() as conn, sql.transaction(conn):
        idempotency.forget_keys(conn, telegram_id)
        # A fold in flight finds its lease gone with the row and drops its summary.
        conn.run(memory.FORGET, {"telegram_id": telegram_id})
        deleted = conn.count(_DELETE_HISTORY, {"telegram_id": telegram_id})
    # Redis's copy of the context must not bring the history back.
    _cache().invalidate_user(telegram_id)
    return {"telegram_id": telegram_id, "deleted": deleted}


def user_memory(telegram_id: int) -> dict:
    """The summary of the user's older exchanges (null before the first fold)."""
    return memory.read(telegram_id)


def limits(telegram_id: int) -> dict:
    """Today's usage against the user's own limit; reading it changes nothing.

    From Redis when it holds an entry of today at most 60 s old (written
    through by every reservation, dropped by every refund, reset and limit
    change), else from PostgreSQL, then copied to Redis."""
    cache, day = _cache(), current_day()
    view = cache.read_user(telegram_id, context=False)
    usage = cached_usage(view, day)
    if usage is None:
        usage, day = quota.usage_today(telegram_id, day, current_app.config["DAILY_LIMIT"])
        cache.write_limits(telegram_id, view.gen, limits_entry(usage, day))
    else:
        usage, day = usage
    return {
        "telegram_id": telegram_id,
        "requests_today": usage.used,
        "requests_remaining": usage.remaining,
        "daily_limit": usage.limit,
        "reset_date": day.today,
    }


def reset_limit(telegram_id: int) -> dict:
    """Zero the user's counter for today (admin)."""
    found = quota.reset_quota(telegram_id, current_day())
    # Redis's count (a refusal, perhaps) is wrong from now on.
    _cache().invalidate_user(telegram_id)
    if found:
        return {"success": True, "message": f"Лимит пользователя {telegram_id} успешно сброшен"}
    return {"success": False, "message": f"Пользователь {telegram_id} не найден"}


def limits_entry(usage: Usage, day: Day) -> dict:
    """Redis's limits entry for ``usage`` on ``day`` (read by ``cached_usage``)."""
    return {"day": day.today, "used": usage.used, "limit": usage.limit}


def cached_usage(view, day: Day) -> tuple[Usage, Day] | None:
    """The usage in Redis's limits entry when it can be trusted: of today (or
    a later counter day), at most 60 s old; else None."""
    entry, age = view.limits, view.limits_age
    if entry is None or age is None or age >= LIMITS_TRUSTED_SECONDS:
        return None
    try:
        counter_day = date.fromisoformat(entry["day"])
        usage = Usage(int(entry["limit"]), int(entry["used"]))
    except (KeyError, TypeError, ValueError):
        return None
    if counter_day < day.today:
        return None
    return usage, day.at_least(counter_day)


def _cache():
    return current_app.extensions["cache"]


def stats(telegram_id: int, days: int) -> dict:
    """Answers, tokens and cost over the last ``days`` days, today included,
    in all and per model (``null`` for rows written before models were
    recorded), and the tools the answers used. ``total_cost`` is everything
    the user's requests cost, the summaries of their conversation included
    (models without a price count nothing)."""
    since = current_day().today - timedelta(days=days - 1)
    in_window = (ChatRequest.telegram_id == telegram_id, ChatRequest.request_date >= since)
    rows = db.session.execute(
        select(
            ChatRequest.model,
            func.count(),
            func.coalesce(func.sum(ChatRequest.tokens_used), 0),
            func.sum(ChatRequest.cost),
        )
        .where(*in_window)
        .group_by(ChatRequest.model)
        .order_by(func.count().desc())
    ).all()
    summaries = db.session.execute(
        select(func.sum(LLMCall.cost)).where(
            LLMCall.telegram_id == telegram_id, LLMCall.usage_date >= since,
            LLMCall.purpose == "summary",
        )
    ).scalar()
    by_tool: dict[str, int] = {}
    for (tools,) in db.session.execute(
        select(ChatRequest.tools).where(*in_window, ChatRequest.tools > "")
    ):
        for name in tool_names(tools):
            by_tool[name] = by_tool.get(name, 0) + 1
    db.session.commit()
    requests = sum(count for _, count, _, _ in rows)
    tokens = sum(int(used) for _, _, used, _ in rows)
    cost = sum(float(spent or 0) for *_, spent in rows) + float(summaries or 0)
    return {
        "telegram_id": telegram_id,
        "days": days,
        "total_requests": requests,
        "total_tokens": tokens,
        "avg_requests_per_day": round(requests / days, 2),
        "avg_tokens_per_request": round(tokens / requests, 2) if requests else 0,
        "total_cost": round(cost, 8),
        "currency": current_app.config["PRICE_CURRENCY"],
        "by_model": [
            {"model": model, "requests": count, "tokens": int(used),
             "cost": None if spent is None else round(float(spent), 8)}
            for model, count, used, spent in rows
        ],
        "by_tool": by_tool,
    }


_SETTINGS = sql.Statement(
    "SELECT preferred_model, daily_limit, daily_spend_limit FROM ai_chat_user_settings "
    "WHERE telegram_id = :telegram_id"
)


def user_settings(telegram_id: int) -> dict:
    """The user's own settings (null = the default applies) and the models."""
    rows = sql.run(_SETTINGS, {"telegram_id": telegram_id})
    preferred_model, daily_limit, spend_limit = rows[0] if rows else (None, None, None)
    return {
        "telegram_id": telegram_id,
        "preferred_model": preferred_model,
        "daily_limit": daily_limit,
        "daily_spend_limit": None if spend_limit is None else float(spend_limit),
        "models": current_app.extensions["llm"].names,
    }


def update_user_settings(telegram_id: int, changes: dict) -> dict:
    """Set the fields in ``changes`` (None = back to the default); the others
    stay as they are. One upsert: concurrent updates never collide.

    Raises:
        ValidationFailed: ``preferred_model`` is not a configured model.
    """
    if changes.get("preferred_model") is not None:
        current_app.extensions["llm"].check_model(changes["preferred_model"])
    if changes:
        columns = ["telegram_id", *changes, "updated_at"]
        updates = ", ".join(f"{name} = excluded.{name}" for name in columns[1:])
        upsert = sql.Statement(
            f"INSERT INTO ai_chat_user_settings ({', '.join(columns)}) "
            f"VALUES ({', '.join(':' + name for name in columns)}) "
            f"ON CONFLICT (telegram_id) DO UPDATE SET {updates}"
        )
        sql.run(upsert, {**changes, "telegram_id": telegram_id, "updated_at": datetime.now(UTC)})
        # A limit changed: Redis's limits entry (a refusal, perhaps) is wrong now.
        _cache().invalidate_user(telegram_id)
    return user_settings(telegram_id)


# The operator's spend report, one scan of ai_chat_llm_calls over the dates:
# every model call with its purpose (an answer, a tool round, a summary), so
# money spent without an answer is counted too. Answers are the calls whose
# purpose is "answer" (one per answer given, a cached one included). The
# totals and the number of groups (for paging) come in the same round trip,
# on every row of the page, and on one row of NULLs past the last page.
_USAGE_KEYS = {"day": "usage_date", "model": "model", "user": "telegram_id"}
_USAGE_ORDER = {
    "day": "page.key",
    "model": "page.cost DESC NULLS LAST, page.answers DESC, page.key",
    "user": "page.cost DESC NULLS LAST, page.answers DESC, page.key",
}


def _usage_statement(group_by: str) -> sql.Statement:
    return sql.Statement(f"""
        WITH grouped AS (
            SELECT {_USAGE_KEYS[group_by]} AS key,
                   sum(CASE WHEN purpose = 'answer' THEN 1 ELSE 0 END) AS answers,
                   sum(prompt_tokens) AS prompt_tokens,
                   sum(completion_tokens) AS completion_tokens,
                   sum(cost) AS cost
            FROM ai_chat_llm_calls
            WHERE usage_date BETWEEN :first AND :last
            GROUP BY {_USAGE_KEYS[group_by]}
        ), totals AS (
            SELECT count(*) AS groups, sum(answers) AS answers,
                   sum(prompt_tokens) AS prompt_tokens,
                   sum(completion_tokens) AS completion_tokens, sum(cost) AS cost
            FROM grouped
        )
        SELECT page.key, page.answers, page.prompt_tokens, page.completion_tokens, page.cost,
               totals.groups, totals.answers, totals.prompt_tokens,
               totals.completion_tokens, totals.cost
        FROM totals LEFT JOIN (
            SELECT * FROM grouped AS page ORDER BY {_USAGE_ORDER[group_by]}
            LIMIT :limit OFFSET :offset
        ) AS page ON TRUE
        ORDER BY {_USAGE_ORDER[group_by]}
    """)


USAGE = {group_by: _usage_statement(group_by) for group_by in _USAGE_KEYS}


def usage(first: date, last: date, group_by: str, limit: int, offset: int) -> dict:
    """Answers, tokens and cost per day, model or user from ``first`` to
    ``last`` (quota days, service time zone), most expensive first (by day:
    in date order); a page of ``limit`` groups from ``offset``."""
    rows = sql.run(USAGE[group_by], {"first": first, "last": last, "limit": limit,
                                     "offset": offset})
    groups, *totals = rows[0][5:]
    page = [row[:5] for row in rows if row[1] is not None]
    return {
        "first": first,
        "last": last,
        "group_by": group_by,
        "currency": current_app.config["PRICE_CURRENCY"],
        "rows": [
            {"key": _usage_key(group_by, key), **_usage_figures(*figures)}
            for key, *figures in page
        ],
        "total": _usage_figures(*totals),
        "groups": groups,
        "limit": limit,
        "offset": offset,
    }


def _usage_key(group_by: str, key):
    if group_by == "day":
        return sql.as_date(key).isoformat()
    return key


def _usage_figures(answers, prompt_tokens, completion_tokens, cost) -> dict:
    prompt_tokens, completion_tokens = int(prompt_tokens or 0), int(completion_tokens or 0)
    return {
        "answers": int(answers or 0),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "tokens": prompt_tokens + completion_tokens,
        "cost": None if cost is None else round(float(cost), 8),
    }
