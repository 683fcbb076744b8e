"""Atomic reserve / refund / read of a user's daily counter.

The counter row is the only shared state between workers and instances, so
every change to it is one SQL statement that the database serialises on the
row; there is never a read followed by a write. The same SQL runs on
PostgreSQL and on SQLite (both have ``INSERT … ON CONFLICT … RETURNING``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import Date, bindparam, text

from app.extensions import db
from app.models import UTCDateTime

# Stand-in cap for DAILY_LIMIT=0 (unlimited): answers are still counted.
UNLIMITED_CAP = 2**31 - 1

_DATE_PARAMS = (
    bindparam("today", type_=Date()),
    bindparam("now", type_=UTCDateTime()),
)

# A new user gets a row with 1. An existing row is bumped when it is still
# under the cap today, or restarted at 1 when its day is over. When the WHERE
# fails (cap reached today) nothing is written and no row comes back: that
# absence *is* the 429. The row lock taken by ON CONFLICT makes concurrent
# reservations queue up and re-check the WHERE against the committed count,
# so no interleaving can grant more than the cap.
_RESERVE = text(
    """
    INSERT INTO ai_chat_daily_limits AS l
        (telegram_id, request_count, last_reset_date, created_at, updated_at)
    VALUES (:telegram_id, 1, :today, :now, :now)
    ON CONFLICT (telegram_id) DO UPDATE SET
        request_count = CASE WHEN l.last_reset_date = :today
                             THEN l.request_count + 1 ELSE 1 END,
        last_reset_date = :today,
        updated_at = :now
    WHERE l.last_reset_date <> :today OR l.request_count < :cap
    RETURNING request_count
    """
).bindparams(*_DATE_PARAMS)

# Gives back the unit of a failed answer, but only on the day it was taken:
# after midnight the counter already restarted and owes nothing.
_REFUND = text(
    """
    UPDATE ai_chat_daily_limits
    SET request_count = request_count - 1, updated_at = :now
    WHERE telegram_id = :telegram_id AND last_reset_date = :today AND request_count > 0
    """
).bindparams(*_DATE_PARAMS)

_RESET = text(
    """
    UPDATE ai_chat_daily_limits
    SET request_count = 0, last_reset_date = :today, updated_at = :now
    WHERE telegram_id = :telegram_id
    """
).bindparams(*_DATE_PARAMS)

_READ = text(
    "SELECT request_count FROM ai_chat_daily_limits "
    "WHERE telegram_id = :telegram_id AND last_reset_date = :today"
).bindparams(bindparam("today", type_=Date()))


@dataclass(frozen=True)
class Day:
    """The quota day that contains ``now`` in the service time zone."""

    now: datetime
    timezone: ZoneInfo

    @property
    def today(self) -> date:
        return self.now.astimezone(self.timezone).date()

    @property
    def reset_at(self) -> datetime:
        """The next local midnight, when the counter restarts."""
        tomorrow = self.today + timedelta(days=1)
        return datetime.combine(tomorrow, time(0), tzinfo=self.timezone)

    @property
    def seconds_left(self) -> int:
        return max(1, int((self.reset_at - self.now).total_seconds() + 0.999))


@dataclass(frozen=True)
class Usage:
    """A user's answers today against the limit (0 = unlimited)."""

    limit: int
    used: int

    @property
    def unlimited(self) -> bool:
        return self.limit == 0

    @property
    def remaining(self) -> int | None:
        return None if self.unlimited else max(0, self.limit - self.used)


def reserve_quota(telegram_id: int, day: Day, limit: int) -> int | None:
    """Take one unit of today's quota in one statement.

    Returns the count including this unit, or None when the limit is reached.
    The caller commits.
    """
    cap = limit or UNLIMITED_CAP
    row = db.session.execute(
        _RESERVE,
        {"telegram_id": telegram_id, "today": day.today, "now": day.now, "cap": cap},
    ).first()
    return None if row is None else row[0]


def refund_quota(telegram_id: int, day: Day) -> None:
    """Give back the unit reserved on ``day`` for a request that failed.

    The caller commits.
    """
    db.session.execute(
        _REFUND, {"telegram_id": telegram_id, "today": day.today, "now": day.now}
    )


def reset_quota(telegram_id: int, day: Day) -> bool:
    """Zero the user's counter for today; False when the user has no row.

    The caller commits.
    """
    result = db.session.execute(
        _RESET, {"telegram_id": telegram_id, "today": day.today, "now": day.now}
    )
    return result.rowcount > 0


def used_today(telegram_id: int, day: Day) -> int:
    """Answers counted for the user today; a stale or missing row means 0."""
    count = db.session.execute(
        _READ, {"telegram_id": telegram_id, "today": day.today}
    ).scalar()
    return count or 0
