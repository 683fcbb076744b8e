"""Redis in front of PostgreSQL: the one module every other module asks through.

PostgreSQL stays the truth. Every entry here is a copy of something
PostgreSQL said, and every doubt about an entry ends as a *miss*, after
which PostgreSQL answers. A cache never decides correctness: the caller keeps
its PostgreSQL path beside each cached read.

Without ``REDIS_URL`` every method returns its miss / no-op default at once,
without touching the network, a lock or a metric.

Faults
------
Any Redis fault (refused, reset, slower than ``REDIS_TIMEOUT``, an error
reply, an unreadable reply) is a miss to the caller, never an exception. The
first one marks Redis *down* for this process: one warning ("redis
unavailable (…): falling back to PostgreSQL"), ``ai_chat_redis_up`` 0. While
down, calls return their default without touching the network; once per
``RETRY_INTERVAL`` one call is let through as a probe, so a hung Redis costs
one ``REDIS_TIMEOUT`` per interval per process, not one per request. The
first probe that succeeds logs one info line ("redis is back") and sets the
gauge to 1. A call that needs a new connection may wait up to
``REDIS_TIMEOUT`` for a pooled one, to connect and for the reply (each bound
separately): a killed Redis refuses at once, a paused one costs one timeout.

Per-user generation guard (limits and contexts)
-----------------------------------------------
Only with ``REDIS_USER_CACHE`` (off by default: measured, the copies cost the
workers more than they spare PostgreSQL). Off, ``read_user`` is a miss and the
writes are no-ops without a round trip; invalidations are still sent, so that
instances that have it on never serve what a change made stale.

Race: a request reads PostgreSQL, then (preempted, slow) writes what it read
to Redis; meanwhile a refund, reset, limit change or history deletion changed
PostgreSQL and cleared Redis. The late write would bring the old state back
(a cached refusal after a refund, a deleted history from Redis). So:

- Every user has a generation token ``gen:{telegram_id}``. ``read_user``
  returns it (creating it when absent) in the same round trip as the
  entries. The caller reads it *before* the PostgreSQL statement whose result
  it will write.
- Every write is a Lua script that applies only if the token is still the
  one the caller read (else it deletes the entry): check and write are one
  atomic step on the server.
- ``invalidate_user`` — called *after* the PostgreSQL change is committed —
  replaces the token and deletes the entries, atomically. A write computed
  from a PostgreSQL read that preceded the change carries the old token (it
  was read before that PostgreSQL read, hence before the invalidation), so
  it is dropped; a read after the change sees the new state anyway.
- Tokens are random 62-bit integers, not an INCR from 0: an evicted,
  expired or flushed key reads as absent, and an INCR restarting at 1 could
  hand out a value that an old in-flight write still holds. An absent token
  matches no write; a random one repeats with probability 2^-62.
- Contexts have a second race: a populate (``write_context``) from a
  PostgreSQL read taken before a concurrent save could land after that save
  was appended, losing the saved exchange. Hence a populate never
  overwrites an existing entry, and an append that cannot be applied (entry
  missing, or token changed) replaces the token too, so every populate in
  flight is dropped and the next read goes to PostgreSQL.
- Limits have a third: two sends of one user finishing out of order. Under
  one token the count only grows (whatever lowers it invalidates), so an
  entry with an earlier day or a lower count never replaces a stored one.
- ``written_at`` is Redis's own ``TIME``, and ``read_user`` returns the age
  on the same clock, so the instances' clocks never matter.

FLUSHALL, a restart, eviction or expiry: the keys are gone, so reads miss and
PostgreSQL answers; ``read_user`` creates fresh tokens, which no write in
flight holds, so those writes are dropped. Scripts are called with EVALSHA
and re-sent with EVAL on NOSCRIPT (a restart or SCRIPT FLUSH forgets them).

An invalidation is sent even while this process thinks Redis is down (the
others may reach it, and must not serve a refusal after a refund): it is
rare, and bounded by ``REDIS_TIMEOUT``. One that fails all the same (Redis
unreachable from this process) is kept in memory and replayed before
anything else this process asks Redis once it is reachable again; so is a
failed or skipped ``write_limits`` or ``append_context``. A context that
missed an append is caught by its reader anyway: the reservation returns
the ids of the user's newest exchanges, and a copy that does not hold
exactly those is not used (app/chat/send.py). A limits entry that missed a
write counts fewer answers than PostgreSQL (never more: it cannot refuse
wrongly), for at most ``LIMITS_TTL`` (60 s).

Processes
---------
The app is built in the gunicorn master and forked: the client is created
lazily, on the first call in each process (``os.getpid()``), so no socket,
lock or pool is ever shared across a fork. One ``BlockingConnectionPool``
per process of ``POOL_SIZE`` connections: a command holds a connection for
tens of microseconds (plus a GIL hand-off), so 50 serve 600 threads; a
thread that finds none free waits at most ``REDIS_TIMEOUT`` and then falls
back for that call only (a busy process is not a Redis outage: logged once,
counted as a fallback, Redis stays up for the other calls). No client-side
retries (the fallback to PostgreSQL is the retry), no health-check PINGs
(a dead pooled connection is detected when it is taken from the pool), no
CLIENT SETINFO handshake (two round trips per connect).

hiredis (the C reply parser, used by redis-py when installed): measured on
this 2-core box (shared, load ~3) over loopback, Redis 7.0, redis-py 8.1,
one thread, medians of 7 interleaved rounds of 4000 calls, pure-Python
parser → hiredis: MGET of three 300-byte values 61-72 → 44-54 µs wall,
36-42 → 27-33 µs client CPU; EVALSHA of ``read_user`` with a 5-exchange
context (22 KB) 186-222 → 133-151 µs wall, 97-108 → 69-78 µs CPU. About a
quarter less CPU per call in a worker whose threads share one GIL: kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ChildDeadlockedError, NoScriptError, RedisError
from redis.retry import Retry

from app import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

# The ``use`` label of ai_chat_redis_requests_total: a fixed set, so that no
# caller can create new series.
USES = frozenset({"answer", "limits", "context", "tool", "breaker"})

# While down, one call per interval probes Redis; the others skip it.
RETRY_INTERVAL = 1.0
# Connections per process (see "Processes" above).
POOL_SIZE = 50
# Contract: a refusal is never answered from an entry older than 60 s.
LIMITS_TTL = 60
# Refreshed on every write; short on purpose (see the module docstring).
CONTEXT_TTL = 3600
# Outlives every entry it guards (refreshed by each write), so an entry never
# outlives its token for long; a token that expires only turns writes into misses.
GEN_TTL = 2 * CONTEXT_TTL
# Missed invalidations remembered per process while Redis is unreachable;
# past that the oldest are forgotten (their entries still expire by TTL).
MAX_PENDING_INVALIDATIONS = 100_000
# Users invalidated per script call when replaying missed invalidations.
REPLAY_BATCH = 500


class _Fallback(Exception):
    """Redis could not be asked, or failed: the caller gets its default."""


@dataclass(frozen=True)
class _Script:
    source: str
    sha: str


def _script(source: str) -> _Script:
    return _Script(source, hashlib.sha1(source.encode()).hexdigest())


# KEYS: gen, limits, context. ARGV: fresh token, gen TTL (ms), want limits,
# want context. Returns Redis TIME, the token (created when absent), the
# limits hash's entry and written_at (or nil), the context zset (or nil).
_READ_USER = _script("""
local now = redis.call('TIME')
local gen = redis.call('GET', KEYS[1])
if not gen then
  gen = ARGV[1]
  redis.call('SET', KEYS[1], gen, 'PX', ARGV[2])
end
local limits = false
if ARGV[3] == '1' then limits = redis.call('HMGET', KEYS[2], 'entry', 'written_at') end
local context = false
if ARGV[4] == '1' then context = redis.call('ZRANGE', KEYS[3], 0, -1) end
return {now[1], now[2], gen, limits, context}
""")

# KEYS: gen, limits. ARGV: token, entry JSON, TTL (ms), gen TTL (ms), the
# entry's day and used count ('' when it has none). Stores the entry stamped
# with Redis TIME only while the token matches; otherwise deletes it. Under
# one token the count only grows (a refund, reset or limit change replaces
# the token; a new day has a later day), so a reading older than the stored
# one (two sends of one user finishing out of order) is not stored over it.
# Returns 1 when stored.
_WRITE_LIMITS = _script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  redis.call('DEL', KEYS[2])
  return 0
end
if ARGV[5] ~= '' then
  local stored = redis.call('HMGET', KEYS[2], 'day', 'used')
  if stored[1] and (stored[1] > ARGV[5]
      or (stored[1] == ARGV[5] and tonumber(stored[2]) > tonumber(ARGV[6]))) then
    return 0
  end
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[2], 'entry', ARGV[2],
           'written_at', now[1] .. '.' .. string.format('%06d', now[2]),
           'day', ARGV[5], 'used', ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
""")

# KEYS: gen, context. ARGV: token, TTL (ms), gen TTL (ms), then row id and
# member pairs. The context is a sorted set scored by row id; the member ''
# at -inf marks "the entry exists" (so a known-empty context is not absent).
# Populates only an absent entry while the token matches; a token mismatch
# deletes the entry. Returns 1 when stored.
_WRITE_CONTEXT = _script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  redis.call('DEL', KEYS[2])
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('ZADD', KEYS[2], '-inf', '', unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
""")

# KEYS: gen, context. ARGV: token, row id, member, keep, TTL (ms), gen TTL
# (ms), fresh token. Adds the exchange and keeps the marker plus the newest
# ``keep`` by row id, only when the entry exists and the token matches.
# Otherwise replaces the token and deletes the entry (module docstring:
# populates in flight may predate this save). Returns 1 when appended.
_APPEND_CONTEXT = _script("""
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 1, -(tonumber(ARGV[4]) + 1))
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  return 1
end
redis.call('SET', KEYS[1], ARGV[7], 'PX', ARGV[6])
redis.call('DEL', KEYS[2])
return 0
""")

# KEYS: (gen, limits, context) per user. ARGV: gen TTL (ms), then one fresh
# token per user. Replaces each token and deletes the entries, atomically.
_INVALIDATE_USERS = _script("""
for i = 1, #KEYS, 3 do
  redis.call('SET', KEYS[i], ARGV[(i + 2) / 3 + 1], 'PX', ARGV[1])
  redis.call('DEL', KEYS[i + 1], KEYS[i + 2])
end
return 1
""")

# The shared circuit breaker (app/llm/breaker.py): one hash per breaker with
# the consecutive ``failures``, ``opened_at`` and ``probe_since`` (Redis TIME,
# "seconds.micros"). Each script returns TIME, failures, opened_at,
# probe_since after it ran, and a flag.
_BREAKER_STATE = _script("""
local now = redis.call('TIME')
local s = redis.call('HMGET', KEYS[1], 'failures', 'opened_at', 'probe_since')
return {now[1], now[2], s[1], s[2], s[3], 0}
""")

# ARGV: failures that open the circuit, TTL (ms). As Breaker.record_failure:
# a failure while a probe is out, or the threshold reached while closed,
# opens the circuit; the flag says "this failure opened it" (exactly one
# caller across instances gets it).
_BREAKER_FAILURE = _script("""
local now = redis.call('TIME')
local stamp = now[1] .. '.' .. string.format('%06d', now[2])
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local s = redis.call('HMGET', KEYS[1], 'opened_at', 'probe_since')
local opened = 0
if s[2] or (not s[1] and failures >= tonumber(ARGV[1])) then
  redis.call('HSET', KEYS[1], 'opened_at', stamp)
  redis.call('HDEL', KEYS[1], 'probe_since')
  s = {stamp, false}
  opened = 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {now[1], now[2], tostring(failures), s[1], s[2], opened}
""")

# ARGV: open seconds. As Breaker.allow once the open period is over: the
# first caller becomes the probe (flag 1); others are refused until the probe
# reports or a whole open period passes without its outcome.
_BREAKER_PROBE = _script("""
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'failures', 'opened_at', 'probe_since')
if not s[2] then return {now[1], now[2], s[1], s[2], s[3], 1} end
local open = tonumber(ARGV[1])
if t - tonumber(s[2]) < open or (s[3] and t - tonumber(s[3]) < open) then
  return {now[1], now[2], s[1], s[2], s[3], 0}
end
local stamp = now[1] .. '.' .. string.format('%06d', now[2])
redis.call('HSET', KEYS[1], 'probe_since', stamp)
return {now[1], now[2], s[1], s[2], stamp, 1}
""")


@dataclass(frozen=True)
class UserView:
    """What Redis holds for one user, read in one round trip.

    ``gen`` is the token to hand back to the writes (None: Redis was not
    asked or failed; writes given None store nothing, and drop the entry
    they would have brought up to date). ``limits`` is the entry
    given to ``write_limits`` plus ``written_at`` (Redis time, seconds), and
    ``limits_age`` its age in seconds on Redis's clock; None when absent.
    ``context`` is ``[[row_id, message, response], ...]`` oldest first,
    ``[]`` when known to be empty, None when absent.
    """

    gen: int | None = None
    limits: dict | None = None
    limits_age: float | None = None
    context: list[list] | None = None


MISS = UserView()


@dataclass(frozen=True)
class BreakerState:
    """A shared breaker as Redis holds it, with ages on Redis's clock
    (seconds since the circuit opened / since the probe was let through)."""

    failures: int = 0
    opened_for: float | None = None
    probing_for: float | None = None


class Cache:
    """Redis for one process (see the module docstring); share across threads."""

    def __init__(
        self,
        url: str | None,
        *,
        timeout: float = 0.05,
        prefix: str = "ai_chat:",
        user_entries: bool = True,
        retry_interval: float = RETRY_INTERVAL,
        pool_size: int = POOL_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.url = url
        self.configured = url is not None
        self.user_entries = self.configured and user_entries
        self.timeout = timeout
        self.prefix = prefix
        self.retry_interval = retry_interval
        self.pool_size = pool_size
        self._clock = clock
        # The gauge's label: where Redis is, never its password.
        self.server = _server_label(url) if url else ""
        self._pid: int | None = None
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._pending: dict[int, float] = {}
        self._pending_overflowed = False
        self._pool_exhaustion_logged = False

    @classmethod
    def from_config(cls, config) -> Cache:
        return cls(
            config["REDIS_URL"], timeout=config["REDIS_TIMEOUT"], prefix=config["REDIS_PREFIX"],
            user_entries=config["REDIS_USER_CACHE"],
        )

    # --- keys -----------------------------------------------------------------------

    def key(self, kind: str, ident: object) -> str:
        """Every key: ``<prefix><kind>:{<ident>}``. The braces make a Redis Cluster
        hash tag, so the keys of one user (one script) share a slot."""
        return f"{self.prefix}{kind}:{{{ident}}}"

    @staticmethod
    def digest(*parts: object) -> str:
        """A short key for long inputs (a normalised question, tool arguments)."""
        joined = "\x1f".join(str(part) for part in parts)
        return hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()

    def _user_keys(self, telegram_id: int) -> list[str]:
        return [self.key(kind, telegram_id) for kind in ("gen", "limits", "context")]

    # --- generic entries (answer cache, tool results) -------------------------------

    def get(self, use: str, key: str) -> str | None:
        """The value stored under ``key`` for ``use``, or None (miss or fault).
        Counts hit / miss / fallback under ``use``."""
        _check_use(use)
        if not self.configured:
            return None
        try:
            value = self._run(lambda client: client.get(self.key(use, key)))
        except _Fallback:
            self._count(use, "fallback")
            return None
        self._count(use, "miss" if value is None else "hit")
        return value

    def set(self, use: str, key: str, value: str, ttl: float) -> bool:
        """Store ``value`` for ``ttl`` seconds; False when not stored (counted
        as a fallback under ``use``)."""
        _check_use(use)
        if not self.configured:
            return False
        milliseconds = max(1, int(ttl * 1000))
        return self._write(use, lambda client: client.set(
            self.key(use, key), value, px=milliseconds
        ))

    # --- per-user entries behind the generation guard -------------------------------

    def read_user(
        self, telegram_id: int, *, limits: bool = True, context: bool = True
    ) -> UserView:
        """The user's token and the entries asked for, in one round trip.

        Counts hit / miss under ``limits`` and ``context`` (each only when
        asked for), fallback under both when Redis could not answer (then
        ``MISS``: no token, so the writes that follow are skipped).
        """
        if not self.user_entries:
            return MISS
        uses = [use for use, wanted in (("limits", limits), ("context", context)) if wanted]
        args = [_new_gen(), GEN_TTL * 1000, int(limits), int(context)]
        try:
            view = self._run(lambda client: _parse_user(
                _eval(client, _READ_USER, self._user_keys(telegram_id), args)
            ))
        except _Fallback:
            for use in uses:
                self._count(use, "fallback")
            return MISS
        if limits:
            self._count("limits", "miss" if view.limits is None else "hit")
        if context:
            self._count("context", "miss" if view.context is None else "hit")
        return view

    def write_limits(self, telegram_id: int, gen: int | None, entry: dict) -> bool:
        """Store the limits ``entry`` (JSON-able; dates become ISO text) for
        ``LIMITS_TTL`` when the user's token is still ``gen``, else delete it.
        With ``day`` (a date or ISO text) and ``used`` in it, an entry already
        stored for a later day or a higher count is kept instead. True when
        stored. Without a token (``read_user`` failed) the stored entry may
        be behind this one and cannot be replaced safely: it is invalidated,
        now or, while Redis is down, on replay (not forced like
        ``invalidate_user``: every send comes here while Redis is down)."""
        if not self.user_entries:
            return False
        if gen is None:
            self._invalidate_or_remember(telegram_id)
            return False
        gen_key, limits_key, _ = self._user_keys(telegram_id)
        payload = _dumps({k: v for k, v in entry.items() if k != "written_at"})
        ordered = "day" in entry and "used" in entry
        day = str(entry["day"]) if ordered else ""
        used = int(entry["used"]) if ordered else 0
        args = [gen, payload, LIMITS_TTL * 1000, GEN_TTL * 1000, day, used]
        # A lost write leaves a lower count behind: harmless for a refusal,
        # but not what PostgreSQL says, so the entry goes (user=).
        return self._write("limits", lambda client: _eval(
            client, _WRITE_LIMITS, [gen_key, limits_key], args
        ) == 1, user=telegram_id)

    def write_context(
        self, telegram_id: int, gen: int | None, exchanges: Iterable[Sequence]
    ) -> bool:
        """Populate the user's context with ``exchanges`` (``(row_id, message,
        response)`` read from PostgreSQL; ``[]`` = known empty) when the token
        is still ``gen`` and no entry exists. True when stored."""
        if not self.user_entries or gen is None:
            return False
        gen_key, _, context_key = self._user_keys(telegram_id)
        args: list = [gen, CONTEXT_TTL * 1000, GEN_TTL * 1000]
        for exchange in exchanges:
            args += [exchange[0], _member(exchange)]
        return self._write("context", lambda client: _eval(
            client, _WRITE_CONTEXT, [gen_key, context_key], args
        ) == 1)

    def append_context(
        self, telegram_id: int, gen: int | None, exchange: Sequence, keep: int
    ) -> bool:
        """After a save: add ``(row_id, message, response)`` and keep the
        newest ``keep`` by row id, when the entry exists and the token is
        still ``gen``; otherwise drop the entry (and start a new token) so the
        next read goes to PostgreSQL. True when appended."""
        if not self.user_entries:
            return False
        gen_key, _, context_key = self._user_keys(telegram_id)
        # Without a token (Redis failed when it was read) the entry cannot be
        # trusted to take this exchange: the script's mismatch branch drops it.
        args = [
            "" if gen is None else gen, exchange[0], _member(exchange), max(0, keep),
            CONTEXT_TTL * 1000, GEN_TTL * 1000, _new_gen(),
        ]
        # A lost append leaves a context without this exchange (user=).
        return self._write("context", lambda client: _eval(
            client, _APPEND_CONTEXT, [gen_key, context_key], args
        ) == 1, user=telegram_id)

    def invalidate_user(self, telegram_id: int) -> bool:
        """After a refund, reset, limit change or history deletion is committed
        in PostgreSQL: new token, limits and context deleted, atomically.

        False when Redis could not be asked; the invalidation is then kept and
        replayed before this process next uses Redis.
        """
        if not self.configured:
            return False
        # Tried even while this process thinks Redis is down: another process
        # that reaches it must not serve what this change made stale (a
        # refusal after a refund). Rare, and bounded by REDIS_TIMEOUT like any call.
        return self._invalidate_or_remember(telegram_id, force=True)

    # --- the shared circuit breaker's state -----------------------------------------

    def breaker_state(self, name: str) -> BreakerState | None:
        """The shared breaker ``name``; None when Redis could not answer."""
        return self._breaker(name, _BREAKER_STATE, [], lambda flag, state: state)

    def breaker_failure(
        self, name: str, failures: int, ttl: float
    ) -> tuple[bool, BreakerState] | None:
        """Count a failure: (this failure opened the circuit, state after)."""
        return self._breaker(
            name, _BREAKER_FAILURE, [failures, max(1, int(ttl * 1000))],
            lambda flag, state: (flag == 1, state),
        )

    def breaker_probe(
        self, name: str, open_seconds: float
    ) -> tuple[bool, BreakerState] | None:
        """May a request go now? Claims the one half-open probe atomically."""
        return self._breaker(
            name, _BREAKER_PROBE, [open_seconds], lambda flag, state: (flag == 1, state)
        )

    def breaker_success(self, name: str) -> bool:
        """Close the shared breaker; False when Redis could not be asked."""
        if not self.configured:
            return False
        return self._write("breaker", lambda client: client.delete(
            self.key("breaker", name)
        ) >= 0)

    def _breaker(self, name: str, script: _Script, args: list, result):
        if not self.configured:
            return None
        try:
            flag, state = self._run(lambda client: _parse_breaker(
                _eval(client, script, [self.key("breaker", name)], args)
            ))
        except _Fallback:
            self._count("breaker", "fallback")
            return None
        self._count("breaker", "hit")
        return result(flag, state)

    # --- health ---------------------------------------------------------------------

    def ping(self) -> str:
        """``ok``, ``degraded`` (configured, unreachable) or ``not_configured``;
        within REDIS_TIMEOUT (no network at all while Redis is known down)."""
        if not self.configured:
            return "not_configured"
        try:
            self._run(lambda client: client.ping())
        except _Fallback:
            return "degraded"
        return "ok"

    def close(self) -> None:
        """Close this process's connections (tests; a worker simply exits)."""
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
            self._client.connection_pool.disconnect()
        self._client = None
        self._pid = None

    # --- the fault machinery --------------------------------------------------------

    def _run(self, operation: Callable[[redis.Redis], T], force: bool = False) -> T:
        """``operation(client)``, or _Fallback when Redis is down (skipped
        until the next probe, unless ``force``) or failed (then marked down)."""
        client, probing = self._client_for_call(force)
        try:
            if self._pending:
                self._replay_invalidations(client)
            result = operation(client)
        except redis.ConnectionError as error:
            if not _pool_exhausted(error):
                self._went_down(error)
            elif not self._pool_exhaustion_logged:
                # This process is busier than its pool, Redis is not down:
                # this call falls back, the others keep using Redis.
                self._pool_exhaustion_logged = True
                log.warning("redis: all %d pooled connections stayed busy for %s s; such "
                            "calls fall back to PostgreSQL (logged once)",
                            self.pool_size, self.timeout)
            raise _Fallback() from None
        # Redis errors and socket errors, and a reply of a shape the parsing
        # below does not expect: all mean "do not trust Redis now".
        except (RedisError, OSError, ChildDeadlockedError, ValueError, TypeError,
                KeyError, IndexError) as error:
            self._went_down(error)
            raise _Fallback() from None
        if probing:
            self._came_back()
        return result

    def _write(
        self, use: str, operation: Callable[[redis.Redis], bool], user: int | None = None
    ) -> bool:
        """Run a write; False when Redis could not take it. For a ``user``
        whose entry the write would have brought up to date, the entry left
        behind is stale: it is invalidated (now or, missed, on replay)."""
        try:
            return bool(self._run(operation))
        except _Fallback:
            self._count(use, "fallback")
            if user is not None:
                self._remember_invalidation(user)
            return False

    def _client_for_call(self, force: bool = False) -> tuple[redis.Redis, bool]:
        """This process's client and whether this call is the probe of a down
        Redis; _Fallback while down and the retry interval has not passed
        (a ``force``d call is tried anyway, as a probe)."""
        if self._pid != os.getpid():
            self._start_process()
        if self._down_since is None:
            return self._client, False
        with self._lock:
            if self._down_since is None:
                return self._client, False
            now = self._clock()
            if now < self._retry_at and not force:
                raise _Fallback()
            # This call is the probe; the others keep skipping until it ends.
            self._retry_at = now + self.retry_interval
            return self._client, True

    def _start_process(self) -> None:
        """A new process (the first call, or the first after a fork): a pool of
        its own. The parent's sockets, lock and down state are not this
        process's; the old pool, if any, is dropped without touching the
        parent's connections (redis-py shuts a socket down only in its owner)."""
        with _PROCESS_LOCK:
            pid = os.getpid()
            if self._pid == pid:
                return
            self._lock = threading.Lock()
            self._down_since = None
            self._retry_at = 0.0
            self._pending = {}
            self._client = redis.Redis(connection_pool=self._new_pool())
            metrics.REDIS_UP.labels(self.server).set(1)
            self._pid = pid

    def _new_pool(self) -> redis.BlockingConnectionPool:
        return redis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.pool_size,
            timeout=self.timeout,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            driver_info=None,
            decode_responses=True,
        )

    def _went_down(self, error: BaseException) -> None:
        with self._lock:
            now = self._clock()
            self._retry_at = now + self.retry_interval
            if self._down_since is not None:
                return
            self._down_since = now
            self._pending_overflowed = False
        log.warning("redis unavailable (%s): falling back to PostgreSQL", _describe(error))
        metrics.REDIS_UP.labels(self.server).set(0)

    def _came_back(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            down_for = self._clock() - self._down_since
            self._down_since = None
        log.info("redis is back after %.1f s", down_for)
        metrics.REDIS_UP.labels(self.server).set(1)

    def _count(self, use: str, outcome: str) -> None:
        metrics.REDIS_REQUESTS.labels(use, outcome).inc()

    # --- invalidations that could not be delivered ----------------------------------

    def _invalidate(self, client: redis.Redis, telegram_ids: Sequence[int]) -> None:
        keys = [key for telegram_id in telegram_ids for key in self._user_keys(telegram_id)]
        args = [GEN_TTL * 1000, *(_new_gen() for _ in telegram_ids)]
        _eval(client, _INVALIDATE_USERS, keys, args)

    def _invalidate_or_remember(self, telegram_id: int, force: bool = False) -> bool:
        try:
            self._run(lambda client: self._invalidate(client, [telegram_id]), force=force)
            return True
        except _Fallback:
            self._remember_invalidation(telegram_id)
            return False

    def _remember_invalidation(self, telegram_id: int) -> None:
        with self._lock:
            self._pending.pop(telegram_id, None)
            self._pending[telegram_id] = self._clock()
            if len(self._pending) <= MAX_PENDING_INVALIDATIONS:
                return
            del self._pending[next(iter(self._pending))]
            if self._pending_overflowed:
                return
            self._pending_overflowed = True
        log.warning("redis: too many invalidations missed while unavailable; the oldest "
                    "are left to expire with their entries")

    def _replay_invalidations(self, client: redis.Redis) -> None:
        """Deliver the invalidations missed while Redis was unreachable, before
        this process reads anything from it again."""
        while self._pending:
            with self._lock:
                batch = list(self._pending.items())[:REPLAY_BATCH]
            now = self._clock()
            # An entry lives at most CONTEXT_TTL: older misses have nothing left to delete.
            due = [telegram_id for telegram_id, at in batch if now - at < CONTEXT_TTL]
            if due:
                self._invalidate(client, due)
            with self._lock:
                for telegram_id, at in batch:
                    if self._pending.get(telegram_id) == at:
                        del self._pending[telegram_id]


# Guards the per-process start: two threads of a fresh worker must not both
# build a pool. Never held in the gunicorn master (which makes no Redis call),
# so no fork inherits it locked.
_PROCESS_LOCK = threading.Lock()


def _check_use(use: str) -> None:
    if use not in USES:
        raise ValueError(f"unknown cache use {use!r}; one of {', '.join(sorted(USES))}")


def _new_gen() -> int:
    # Never 0 or small: no value a flushed key or an INCR could produce.
    return secrets.randbits(62) | (1 << 61)


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _member(exchange: Sequence) -> str:
    row_id, message, response = exchange
    return _dumps([int(row_id), message, response])


def _eval(client: redis.Redis, script: _Script, keys: list, args: list):
    """EVALSHA, or EVAL when Redis does not know the script (after a restart
    or SCRIPT FLUSH); EVAL also caches it for the next EVALSHA."""
    try:
        return client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return client.eval(script.source, len(keys), *keys, *args)


def _pool_exhausted(error: redis.ConnectionError) -> bool:
    """BlockingConnectionPool's "no connection free within the timeout" (it
    has no class of its own; tests/test_cache.py pins the wording)."""
    return str(error) == "No connection available."


def _redis_time(seconds: str, micros: str) -> float:
    return int(seconds) + int(micros) / 1_000_000


def _parse_user(reply: list) -> UserView:
    seconds, micros, gen, limits, context = reply
    now = _redis_time(seconds, micros)
    entry = age = None
    if limits is not None and limits[0] is not None:
        entry = json.loads(limits[0])
        entry["written_at"] = float(limits[1])
        age = max(0.0, now - entry["written_at"])
    exchanges = None
    if context:  # absent: an empty reply; present: the '' marker first
        exchanges = [json.loads(member) for member in context if member != ""]
    return UserView(int(gen), entry, age, exchanges)


def _parse_breaker(reply: list) -> tuple[int, BreakerState]:
    seconds, micros, failures, opened_at, probe_since, flag = reply
    now = _redis_time(seconds, micros)
    state = BreakerState(
        int(failures or 0),
        None if opened_at is None else max(0.0, now - float(opened_at)),
        None if probe_since is None else max(0.0, now - float(probe_since)),
    )
    return int(flag), state


def _server_label(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
