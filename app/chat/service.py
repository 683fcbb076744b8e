"""The chat use cases other than sending: history, limits, reset, stats.

Each function commits its own work; sending lives in ``app.chat.send``.
"""

from __future__ import annotations

from datetime import timedelta

from flask import current_app
from sqlalchemy import delete, func, select

from app.chat import idempotency, quota
from app.chat.quota import Day, Usage
from app.extensions import db
from app.models import ChatRequest, begin_transaction


def current_day() -> Day:
    config = current_app.config
    return Day(now=config["CLOCK"](), timezone=config["TIMEZONE"])


def history(telegram_id: int, limit: int, offset: int) -> dict:
    """A page of the user's exchanges, newest first."""
    by_user = ChatRequest.telegram_id == telegram_id
    total = db.session.execute(select(func.count()).where(by_user)).scalar_one()
    rows = db.session.execute(
        select(ChatRequest).where(by_user).order_by(ChatRequest.id.desc())
        .limit(limit).offset(offset)
    ).scalars().all()
    db.session.commit()
    return {"items": rows, "total": total, "limit": limit, "offset": offset}


def delete_history(telegram_id: int) -> dict:
    """Forget the user's exchanges and idempotency keys; quota counters stay."""
    begin_transaction()
    idempotency.forget_keys(telegram_id)
    deleted = db.session.execute(
        delete(ChatRequest).where(ChatRequest.telegram_id == telegram_id)
    ).rowcount
    db.session.commit()
    return {"telegram_id": telegram_id, "deleted": deleted}


def limits(telegram_id: int) -> dict:
    """Today's usage; reading it changes nothing."""
    day = current_day()
    limit = current_app.config["DAILY_LIMIT"]
    usage = Usage(limit, quota.used_today(telegram_id, day))
    db.session.commit()
    return {
        "telegram_id": telegram_id,
        "requests_today": usage.used,
        "requests_remaining": usage.remaining,
        "daily_limit": limit,
        "reset_date": day.today,
    }


def reset_limit(telegram_id: int) -> dict:
    """Zero the user's counter for today (admin)."""
    found = quota.reset_quota(telegram_id, current_day())
    db.session.commit()
    if found:
        return {"success": True, "message": f"Лимит пользователя {telegram_id} успешно сброшен"}
    return {"success": False, "message": f"Пользователь {telegram_id} не найден"}


def stats(telegram_id: int, days: int) -> dict:
    """Answers and tokens over the last ``days`` days, today included."""
    since = current_day().today - timedelta(days=days - 1)
    requests, tokens = db.session.execute(
        select(func.count(), func.coalesce(func.sum(ChatRequest.tokens_used), 0)).where(
            ChatRequest.telegram_id == telegram_id, ChatRequest.request_date >= since
        )
    ).one()
    db.session.commit()
    return {
        "telegram_id": telegram_id,
        "days": days,
        "total_requests": requests,
        "total_tokens": int(tokens),
        "avg_requests_per_day": round(requests / days, 2),
        "avg_tokens_per_request": round(tokens / requests, 2) if requests else 0,
    }
