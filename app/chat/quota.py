"""Atomic reserve / refund / read of a user's daily counter, and the user's
own limit next to it.

The counter row is the only shared state between workers and instances, so
every change to it is one SQL statement that the database serialises on the
row; there is never a read followed by a write. The user's own limit
(``ai_chat_user_settings.daily_limit``, null = ``DAILY_LIMIT``, 0 =
unlimited) is read by a subquery *inside* the reservation statement, so a
limit changed while sends are in flight applies to every reservation that
runs after the change, and none can overshoot it.

The day never goes backwards: the date a request brings comes from its
instance's clock, and a slow request across midnight (or an instance whose
clock is behind) brings yesterday. Such a request counts against the row's
own, later day instead of restarting it, and the refund of a failed request
names the day its unit was actually counted on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from app.chat.memory import Memory
from app.chat.records import RELEASE_ESTIMATE
from app.sql import Connection, Statement, as_date, run

# A new user gets a row with 1. An existing row is bumped when it is under
# the user's cap on its day, or restarted at 1 when its day is over. When the
# WHERE fails (cap reached) nothing is written and no row comes back: that
# absence *is* the 429. The row lock taken by ON CONFLICT makes concurrent
# reservations queue up and re-check the WHERE against the committed count,
# so no interleaving can grant more than the cap. The spend cap is checked
# the same way, against the day's spend plus the estimates held by answers in
# flight (0 on a new day); a cap of 0 refuses even a user without a row yet
# (the row to insert is not even proposed).
_UPSERT = """
    INSERT INTO ai_chat_daily_limits AS l (telegram_id, request_count, last_reset_date,
        created_at, updated_at, spend, spend_reserved)
    SELECT :telegram_id, 1, :today, :now, :now, 0, CAST(:estimate AS NUMERIC)
    WHERE {spend_limit} IS NULL OR {spend_limit} > 0
    ON CONFLICT (telegram_id) DO UPDATE SET
        request_count = CASE WHEN l.last_reset_date >= :today
                             THEN l.request_count + 1 ELSE 1 END,
        spend = CASE WHEN l.last_reset_date >= :today THEN l.spend ELSE 0 END,
        spend_reserved = CASE WHEN l.last_reset_date >= :today
                              THEN COALESCE(l.spend_reserved, 0) + CAST(:estimate AS NUMERIC)
                              ELSE CAST(:estimate AS NUMERIC) END,
        last_reset_date = {latest},
        updated_at = :now
    WHERE (l.last_reset_date < :today OR {limit} = 0 OR l.request_count < {limit})
      AND ({spend_limit} IS NULL
           OR CASE WHEN l.last_reset_date < :today THEN 0
                   ELSE COALESCE(l.spend, 0) + COALESCE(l.spend_reserved, 0) END < {spend_limit})
"""
USER_LIMIT_SQL = (
    "COALESCE((SELECT daily_limit FROM ai_chat_user_settings "
    "WHERE telegram_id = :telegram_id), :default_limit)"
)
_SPEND_LIMIT_SQL = (
    "COALESCE((SELECT daily_spend_limit FROM ai_chat_user_settings "
    "WHERE telegram_id = :telegram_id), CAST(:default_spend_limit AS NUMERIC))"
)

# PostgreSQL: the reservation, the user's settings, the counter behind a 429
# and, for a granted request, its context and memory (the summary and the fold
# marker, app/chat/memory.py), in one round trip. The counter is read only
# when the reservation was refused (the CASEs), the context and memory only
# when it was granted (the joins' conditions; ``:memory`` false turns the
# memory's off). The counter is two CASE subqueries rather than one join on
# its row: the join cost the granted path 7-12% of PostgreSQL's CPU at 50 and
# 200 clients (pgbench, bench/ceiling.py).
_RESERVE_PG = Statement(
    f"""
    WITH settings AS (
        SELECT daily_limit, preferred_model, daily_spend_limit FROM ai_chat_user_settings
        WHERE telegram_id = :telegram_id
    ), quota AS (
        SELECT COALESCE((SELECT daily_limit FROM settings), :default_limit) AS daily_limit,
               COALESCE((SELECT daily_spend_limit FROM settings),
                        CAST(:default_spend_limit AS NUMERIC)) AS spend_limit
    ), reserved AS (
        {_UPSERT.format(latest="GREATEST(l.last_reset_date, :today)",
                        limit="(SELECT daily_limit FROM quota)",
                        spend_limit="(SELECT spend_limit FROM quota)")}
        RETURNING request_count, last_reset_date
    )
    SELECT r.request_count, r.last_reset_date, q.daily_limit,
           (SELECT preferred_model FROM settings),
           CASE WHEN r.request_count IS NULL THEN
               (SELECT request_count FROM ai_chat_daily_limits
                WHERE telegram_id = :telegram_id) END,
           CASE WHEN r.request_count IS NULL THEN
               (SELECT last_reset_date FROM ai_chat_daily_limits
                WHERE telegram_id = :telegram_id) END,
           q.spend_limit,
           CASE WHEN r.request_count IS NULL THEN
               (SELECT spend FROM ai_chat_daily_limits WHERE telegram_id = :telegram_id) END,
           m.summary, m.covers_until, f.id,
           CASE WHEN :newest > 0 AND r.request_count IS NOT NULL THEN
               ARRAY(SELECT id FROM ai_chat_requests WHERE telegram_id = :telegram_id
                     ORDER BY id DESC LIMIT :newest) END,
           c.id, c.message, c.response
    FROM quota AS q
    LEFT JOIN reserved AS r ON TRUE
    LEFT JOIN ai_chat_summaries AS m
        ON :memory AND r.request_count IS NOT NULL AND m.telegram_id = :telegram_id
    LEFT JOIN LATERAL (
        SELECT id FROM ai_chat_requests
        WHERE :memory AND telegram_id = :telegram_id AND r.request_count IS NOT NULL
        ORDER BY id DESC OFFSET :fold_offset LIMIT 1
    ) AS f ON TRUE
    LEFT JOIN LATERAL (
        SELECT id, message, response FROM ai_chat_requests
        WHERE telegram_id = :telegram_id AND r.request_count IS NOT NULL
        ORDER BY id DESC LIMIT :context
    ) AS c ON TRUE
    ORDER BY c.id DESC
    """
)

# SQLite has no data-modifying CTEs: the reservation returns the settings
# (subqueries are allowed in its RETURNING), the context is read after it.
_RESERVE_SQLITE = Statement(
    _UPSERT.format(latest="MAX(l.last_reset_date, :today)", limit=USER_LIMIT_SQL,
                   spend_limit=_SPEND_LIMIT_SQL)
    + f"""
    RETURNING request_count, last_reset_date, {USER_LIMIT_SQL},
        (SELECT preferred_model FROM ai_chat_user_settings WHERE telegram_id = :telegram_id)
    """
)
_REFUSED_SQLITE = Statement(
    f"SELECT {USER_LIMIT_SQL}, request_count, last_reset_date, {_SPEND_LIMIT_SQL}, spend "
    "FROM ai_chat_daily_limits WHERE telegram_id = :telegram_id"
)
_RECENT = Statement(
    "SELECT id, message, response FROM ai_chat_requests "
    "WHERE telegram_id = :telegram_id ORDER BY id DESC LIMIT :context"
)

# Gives back the unit of a failed answer, on the day it was counted on: after
# that day's midnight the counter already restarted and owes nothing.
_REFUND = Statement(
    f"""
    UPDATE ai_chat_daily_limits
    SET request_count = request_count - 1, updated_at = :now,
        {RELEASE_ESTIMATE}
    WHERE telegram_id = :telegram_id AND last_reset_date = :counted_on AND request_count > 0
    """
)

_RESET = Statement(
    """
    UPDATE ai_chat_daily_limits
    SET request_count = 0,
        last_reset_date = CASE WHEN last_reset_date > :today THEN last_reset_date
                               ELSE :today END,
        updated_at = :now
    WHERE telegram_id = :telegram_id
    RETURNING telegram_id
    """
)

_USAGE = Statement(
    f"""
    SELECT {USER_LIMIT_SQL},
        CASE WHEN l.last_reset_date >= :today THEN l.request_count END,
        l.last_reset_date
    FROM (SELECT 1) AS one
    LEFT JOIN ai_chat_daily_limits AS l ON l.telegram_id = :telegram_id
    """
)


@dataclass(frozen=True)
class Day:
    """The quota day that contains ``now`` in the service time zone, or a
    later one (``floor``): the day a user's counter is already on when this
    instance's clock is behind."""

    now: datetime
    timezone: ZoneInfo
    floor: date | None = None

    @property
    def today(self) -> date:
        local = self.now.astimezone(self.timezone).date()
        return max(local, self.floor) if self.floor else local

    def at_least(self, day: date | None) -> Day:
        """This day, or ``day`` when that is later (never earlier)."""
        return Day(self.now, self.timezone, day) if day and day > self.today else self

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
    """A user's answers today against their limit (0 = unlimited)."""

    limit: int
    used: int

    @property
    def unlimited(self) -> bool:
        return self.limit == 0

    @property
    def remaining(self) -> int | None:
        return None if self.unlimited else max(0, self.limit - self.used)


@dataclass(frozen=True)
class Reservation:
    """The outcome of ``reserve``: granted when ``counted_on`` is set.

    ``day`` is the quota day the user's counter is on after the statement
    (the request's own day, or a later one): the day to report (reset time,
    RateLimit headers) and, when granted, the day to refund on. ``context``
    and ``memory`` are None when they still have to be read (SQLite:
    ``recent_exchanges``, ``memory.read_memory``).
    """

    usage: Usage
    day: Day
    counted_on: date | None
    preferred_model: str | None = None
    context: list[tuple] | None = field(default_factory=list)  # (id, message, response)
    memory: Memory | None = field(default_factory=Memory)
    # A refusal by the spend cap (the count was under its limit): the cap and
    # what was spent that day.
    spend: Spend | None = None
    # The ids of the user's newest exchanges, newest first, when asked for
    # (None: not asked, or SQLite, where ``recent_ids`` reads them).
    newest: list[int] | None = None

    @property
    def granted(self) -> bool:
        return self.counted_on is not None


@dataclass(frozen=True)
class Spend:
    """A user's spend of the day against their cap (PRICE_CURRENCY)."""

    limit: Decimal
    spent: Decimal


@dataclass(frozen=True)
class Limits:
    """What a reservation is checked against: the daily limit of answers (0 =
    unlimited), the spend cap (None = none) and the estimate of this answer's
    cost that the reservation holds until the answer is saved or refunded."""

    daily: int
    spend: Decimal | None = None
    estimate: Decimal = Decimal(0)


def reservation_params(
    telegram_id: int, day: Day, defaults: Limits, context: int,
    fold_offset: int | None = None, newest: int = 0,
) -> dict:
    """The reservation statement's parameters (``reserve``; bench/ceiling.py
    renders the same statement for pgbench)."""
    return {
        "telegram_id": telegram_id,
        "today": day.today,
        "now": day.now,
        "default_limit": defaults.daily,
        "default_spend_limit": defaults.spend,
        "estimate": defaults.estimate,
        "context": context,
        "memory": fold_offset is not None,
        "fold_offset": fold_offset or 0,
        "newest": newest,
    }


def reserve(
    conn: Connection, telegram_id: int, day: Day, defaults: Limits, context: int,
    fold_offset: int | None = None, newest: int = 0,
) -> Reservation:
    """Take one unit of the user's quota in one statement (committed at once),
    with the user's own limits (else ``defaults``): the daily limit of answers
    and the spend cap, on which the unit also holds ``defaults.estimate``.

    Also returns the user's preferred model and, when granted, their last
    ``context`` exchanges oldest first, the ids of their ``newest`` exchanges
    (to check a copy of the context against) and, unless ``fold_offset`` is
    None (no summaries), their memory (same round trip; on PostgreSQL only).
    """
    params = reservation_params(telegram_id, day, defaults, context, fold_offset, newest)
    if conn.dialect_name == "postgresql":
        rows = conn.run(_RESERVE_PG, params)
        count, counted_on, limit, preferred, refused_count, refused_on = rows[0][:6]
        if count is None:
            return _refusal(limit, refused_count, day.at_least(refused_on), preferred,
                            *rows[0][6:8])
        memory = Memory(*rows[0][8:11]) if fold_offset is not None else Memory()
        exchanges = [row[12:15] for row in reversed(rows) if row[12] is not None]
        return Reservation(
            Usage(limit, count), day.at_least(counted_on), counted_on, preferred, exchanges,
            memory, newest=rows[0][11],
        )
    rows = conn.run(_RESERVE_SQLITE, params)
    if not rows:
        limit, refused_count, refused_on, spend_limit, spent = conn.run(
            _REFUSED_SQLITE, params
        )[0]
        return _refusal(limit, refused_count, day.at_least(as_date(refused_on)), None,
                        spend_limit, spent)
    count, counted_on, limit, preferred = rows[0]
    counted_on = as_date(counted_on)
    # The context and memory are read by the caller (``recent_exchanges``,
    # ``memory.read_memory``), after the unit is safely taken: a failure there
    # must give the unit back.
    return Reservation(
        Usage(limit, count), day.at_least(counted_on), counted_on, preferred, None, None
    )


_RECENT_IDS = Statement(
    "SELECT id FROM ai_chat_requests WHERE telegram_id = :telegram_id "
    "ORDER BY id DESC LIMIT :count"
)


def recent_ids(conn: Connection, telegram_id: int, count: int) -> list[int]:
    """The ids of the user's newest ``count`` exchanges, newest first."""
    return [row[0] for row in conn.run(_RECENT_IDS, {"telegram_id": telegram_id,
                                                      "count": count})]


def recent_exchanges(conn: Connection, telegram_id: int, count: int) -> list[tuple]:
    """The user's last ``count`` exchanges as (id, message, response), oldest
    first (SQLite's second statement)."""
    if count <= 0:
        return []
    rows = conn.run(_RECENT, {"telegram_id": telegram_id, "context": count})
    return [tuple(row) for row in reversed(rows)]


def _refusal(limit: int, count: int | None, day: Day, preferred, spend_limit, spent):
    """The reservation refused: by the daily limit when the count had reached
    it, else by the spend cap. The count comes from the statement's snapshot,
    taken before it waited for the row lock, while the refusal was decided on
    the count committed since: a count refusal never reports less than the
    limit that refused."""
    count = count or 0
    if spend_limit is None or (limit and count >= limit):
        return Reservation(Usage(limit, max(count, limit)), day, None, preferred)
    spend = Spend(money(spend_limit), money(spent))
    return Reservation(Usage(limit, count), day, None, preferred, spend=spend)


def money(value) -> Decimal:
    """A NUMERIC column's value as Decimal (SQLite hands back a float or text)."""
    if value is None:
        return Decimal(0)
    return value if isinstance(value, Decimal) else Decimal(str(value))


def refund(
    conn: Connection, telegram_id: int, counted_on: date, now: datetime,
    estimate: Decimal = Decimal(0),
) -> None:
    """Give back the unit a failed request reserved on ``counted_on``, and the
    estimate of its cost that it held against the spend cap."""
    conn.run(_REFUND, {"telegram_id": telegram_id, "counted_on": counted_on, "now": now,
                       "estimate": estimate})


def reset_quota(telegram_id: int, day: Day) -> bool:
    """Zero the user's counter for today; False when the user has no row."""
    rows = run(_RESET, {"telegram_id": telegram_id, "today": day.today, "now": day.now})
    return bool(rows)


def usage_today(telegram_id: int, day: Day, default_limit: int) -> tuple[Usage, Day]:
    """The user's limit and answers counted today (a stale or missing row is 0),
    and the quota day they belong to (``day``, or the counter's later one)."""
    limit, used, counter_day = run(
        _USAGE,
        {"telegram_id": telegram_id, "today": day.today, "default_limit": default_limit},
    )[0]
    return Usage(limit, used or 0), day.at_least(as_date(counter_day))
