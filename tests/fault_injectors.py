"""The faults of the fault-injection run (tests/fault_run.py): a list of
injectors, each a name, how many times it fires in a run, and one function
that injects it once.

The run fires every injector its planned number of times, at moments drawn
from the run's seed within the injector's ``window`` (a share of the run),
each injection in a thread of its own, so faults overlap as they would in
production (a row lock held while PostgreSQL restarts, a model failing while
clients leave). An injection returns whether it really happened (a backend
to cancel existed, PostgreSQL came back…); ``injected`` counts those.

To add a fault kind: write ``def kill_redis(run, rng) -> bool`` and add
``Injector("redis_kill", 0, kill_redis)`` to the list in ``injectors``; a
shape's ``faults={"redis_kill": 2, ...}`` then fires it and the report
counts it, with nothing else to change. What the fault can be seen to do
goes into the report's effects: counted by the injector
(``run.count_effect(name)``) or read after the run in
``FaultRun._effects_seen`` (a log, a metric). The target's handles (the
cluster, the fake model, the admin DSN, the throwaway Redis) are on
``run.target``.

Redis (the service's cache; every fault must fall back to PostgreSQL): the
run's own ``redis-server`` (tests/redis_server.py) is

- killed (SIGKILL) and started again, empty, ``shape.redis_outage`` later;
- paused (SIGSTOP: connections hang, slower than any REDIS_TIMEOUT) for
  ``shape.redis_pause``, then resumed (the commands sent meanwhile run then);
- flushed (FLUSHALL);
- evicted: a random share of the service's keys (under its REDIS_PREFIX)
  deleted, each kind of entry alike (limits, contexts, generation tokens,
  common answers). Chosen over a tiny ``maxmemory`` with ``allkeys-lru``:
  that evicts all the time rather than at a counted moment, starves the
  caches for the whole run (few hits left to test), and a server at its
  limit can refuse a script's writes with OOM, a fault of another kind;
  deleting keys is what an eviction does to the service (a key gone between
  two of its commands, a token without its entry, an entry without its
  token), at a moment and in a number the report can give.

The four take turns (``run.redis_lock``): each one's effects are its own. Each
notes its window (``run.note_redis_fault``) so that the log lines and the
readiness answers within it can be attributed after the run.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg2
import redis as redis_py

from tests.fault_clients import Record, leave_after_first_delta, stop_reading

if TYPE_CHECKING:
    from tests.fault_run import FaultRun

# Our own sessions carry this name, so picking the service's backends
# (application_name ai_chat) never picks one of ours.
FAULT_SESSION = "fault_run"
# How long a cancel or terminate looks for a backend in the middle of a
# statement (the service's statements take about a millisecond each).
ACTIVE_SEARCH_SECONDS = 1.0
# A flush or an eviction waits for at least this many keys of the service
# (a busy service writes hundreds a second), at most this long.
REFILL_KEYS = 50
REFILL_SECONDS = 3.0


@dataclass
class Injector:
    """One kind of fault: ``planned`` injections per run, each one ``inject(run, rng)``."""

    name: str
    planned: int
    inject: Callable[[FaultRun, random.Random], bool]
    # The share of the run within which its injections start.
    window: tuple[float, float] = (0.05, 0.85)
    # One injection at a time (two restarts must not overlap).
    exclusive: bool = False
    injected: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _running: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fire(self, run: FaultRun, rng: random.Random) -> None:
        """One injection (in the caller's thread)."""
        if self.exclusive:
            with self._running:
                happened = self.inject(run, rng)
        else:
            happened = self.inject(run, rng)
        if happened:
            with self._lock:
                self.injected += 1


def admin_connection(dsn: str):
    """A superuser session on the service's database, bounded: a fault must
    never wait long on the service (or on PostgreSQL being down)."""
    connection = psycopg2.connect(dsn, connect_timeout=3, application_name=FAULT_SESSION)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '2s'; SET statement_timeout = '5s'")
    return connection


# --- the database ------------------------------------------------------------------


def hold_counter_rows(run: FaultRun, rng: random.Random) -> bool:
    """Another session locks the quota counters of a few busy users (FOR
    UPDATE) and holds them past DB_LOCK_TIMEOUT, as an operator's or the main
    server's long transaction would: the service's statements on those rows
    give up after the lock timeout (a reservation answers 503; a refund is
    retried)."""
    users = run.busy_users(rng, 3)
    locked = False
    try:
        with closing(admin_connection(run.target.admin_dsn)) as connection:
            connection.autocommit = False
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT telegram_id FROM ai_chat_daily_limits WHERE telegram_id = ANY(%s) "
                    "FOR UPDATE", (users,)
                )
                locked = bool(cursor.fetchall())
                if locked:
                    time.sleep(run.settings.lock_timeout * 2 + 0.5)
            connection.rollback()
    except psycopg2.Error:
        pass  # a restart: before the lock nothing was held, after it the restart ended it
    return locked


def _service_backend(run: FaultRun, rng: random.Random, connection) -> int | None:
    """A backend of the service, one in the middle of a statement when one
    shows up within ACTIVE_SEARCH_SECONDS, else an idle one."""
    query = (
        "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'ai_chat'"
    )
    give_up_at = time.monotonic() + ACTIVE_SEARCH_SECONDS
    with connection.cursor() as cursor:
        while True:
            cursor.execute(query)
            rows = cursor.fetchall()
            active = sorted(pid for pid, state in rows if state == "active")
            if active or time.monotonic() >= give_up_at:
                break
            time.sleep(0.005)
    chosen = active or sorted(pid for pid, _ in rows)
    if not chosen:
        return None
    run.count_effect("backends hit while active" if active else "backends hit while idle")
    return rng.choice(chosen)


def _signal_backend(run: FaultRun, rng: random.Random, function: str) -> bool:
    try:
        with closing(admin_connection(run.target.admin_dsn)) as connection:
            pid = _service_backend(run, rng, connection)
            if pid is None:
                return False
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT {function}(%s)", (pid,))
                return bool(cursor.fetchone()[0])
    except psycopg2.Error:
        return False


def cancel_a_backend(run: FaultRun, rng: random.Random) -> bool:
    """pg_cancel_backend on a service backend: its statement fails at once."""
    return _signal_backend(run, rng, "pg_cancel_backend")


def terminate_a_backend(run: FaultRun, rng: random.Random) -> bool:
    """pg_terminate_backend on a service backend: its connection is cut."""
    return _signal_backend(run, rng, "pg_terminate_backend")


def restart_postgres(run: FaultRun, rng: random.Random) -> bool:
    """PostgreSQL stopped (fast: every connection cut) and started again after
    ``outage`` seconds, shorter than what a request keeps for its writes
    after the model, so an answer in flight is saved after the restart."""
    cluster = run.target.cluster
    began = time.monotonic()
    cluster.stop()
    try:
        time.sleep(run.shape.outage)
    finally:
        cluster.start()
    run.note_outage(time.monotonic() - began)
    return True


# --- the model ---------------------------------------------------------------------


class Chaos:
    """The fake LLM's chaos mode (500, 503, 429, 400, dropped connections,
    answers slower than OPENAI_TIMEOUT, streams cut mid-way), on while at least
    one burst is."""

    def __init__(self, fake, rate: float):
        self._fake = fake
        self._rate = rate
        self._lock = threading.Lock()
        self._bursts = 0

    def on(self) -> None:
        with self._lock:
            self._bursts += 1
            self._fake.failure_rate = self._rate

    def off(self) -> None:
        with self._lock:
            self._bursts = max(0, self._bursts - 1)
            if not self._bursts:
                self._fake.failure_rate = 0.0


def model_chaos(run: FaultRun, rng: random.Random) -> bool:
    """A burst of the model failing in every way the fake knows."""
    run.chaos.on()
    try:
        time.sleep(run.shape.chaos_burst)
    finally:
        run.chaos.off()
    return True


# --- Redis -------------------------------------------------------------------------


def _redis_fault(run: FaultRun, kind: str, action: Callable[[], bool]) -> bool:
    """``action()`` while no other Redis fault runs, its window noted."""
    if run.target.redis is None:
        return False
    with run.redis_lock:
        began = time.time()
        try:
            happened = action()
        finally:
            run.note_redis_fault(kind, began, time.time())
    return happened


def kill_redis(run: FaultRun, rng: random.Random) -> bool:
    """SIGKILL (every connection reset), started again empty after
    ``shape.redis_outage`` seconds."""
    server = run.target.redis

    def action() -> bool:
        server.kill()
        try:
            time.sleep(run.shape.redis_outage)
        finally:
            server.start()
        return True

    return _redis_fault(run, "redis_kill", action)


def pause_redis(run: FaultRun, rng: random.Random) -> bool:
    """SIGSTOP for ``shape.redis_pause`` seconds, then SIGCONT."""
    server = run.target.redis

    def action() -> bool:
        server.pause()
        try:
            time.sleep(run.shape.redis_pause)
        finally:
            server.resume()
        return True

    return _redis_fault(run, "redis_pause", action)


def _service_keys(client: redis_py.Redis, prefix: str) -> list[str]:
    """The service's keys, once it has written some: a fault that took its
    turn right after a kill or a flush waits (up to REFILL_SECONDS) for the
    traffic to fill the empty Redis again, so that it removes something."""
    give_up_at = time.monotonic() + REFILL_SECONDS
    while True:
        keys = sorted(client.scan_iter(match=f"{prefix}*", count=1000))
        if len(keys) >= REFILL_KEYS or time.monotonic() >= give_up_at:
            return keys
        time.sleep(0.1)


def _prefix(run: FaultRun) -> str:
    return run.target.env.get("REDIS_PREFIX", "ai_chat:")


def flush_redis(run: FaultRun, rng: random.Random) -> bool:
    """FLUSHALL: every entry and token gone at once (the scripts stay)."""
    server = run.target.redis

    def action() -> bool:
        try:
            with server.client() as client:
                keys = len(_service_keys(client, _prefix(run)))
                client.flushall()
        except redis_py.RedisError:
            return False
        run.count_effect("redis keys flushed", keys)
        return keys > 0

    return _redis_fault(run, "redis_flushall", action)


def evict_redis(run: FaultRun, rng: random.Random) -> bool:
    """A random share (30-70 %) of the service's keys deleted, as an eviction
    under memory pressure would (see the module docstring)."""
    server = run.target.redis

    def action() -> bool:
        try:
            with server.client() as client:
                keys = _service_keys(client, _prefix(run))
                chosen = rng.sample(keys, round(len(keys) * rng.uniform(0.3, 0.7)))
                deleted = client.delete(*chosen) if chosen else 0
        except redis_py.RedisError:
            return False
        run.count_effect("redis keys evicted", deleted)
        return deleted > 0

    return _redis_fault(run, "redis_evict", action)


# --- clients ---------------------------------------------------------------------


def _fault_client_record(run: FaultRun, role: str, number: int) -> Record:
    user = run.recorder.new_user()
    return run.recorder.add(Record(
        request_id=f"{role}-{number}", role=role, kind="stream", user=user,
        question_id=f"{role}-{number}", question=f"Длинный вопрос {role}-{number} продавца {user}",
        key=None, attempt=1, started=time.monotonic(),
    ))


def client_leaves(run: FaultRun, rng: random.Random) -> bool:
    """A client reads the first delta of a stream and goes away."""
    record = _fault_client_record(run, "leaver", run.next_number())
    leave_after_first_delta(run.target.url, record, run.client_timeout)
    return record.code == "left"


def client_stops_reading(run: FaultRun, rng: random.Random) -> bool:
    """A client sends a stream request and reads nothing, for longer than the
    service's writes can wait (STREAM_WRITE_TIMEOUT), then closes."""
    record = _fault_client_record(run, "stuck", run.next_number())
    stop_reading(run.target.url, record, run.stuck_hold)
    return record.failure is None


def injectors(counts: Mapping[str, int]) -> list[Injector]:
    """Every fault kind of the run, ``counts[name]`` injections each (0: not fired)."""
    kinds = [
        Injector("row_lock", 0, hold_counter_rows),
        Injector("pg_cancel_backend", 0, cancel_a_backend),
        Injector("pg_terminate_backend", 0, terminate_a_backend),
        # Not near the end: the answers in flight get the whole run to show
        # that they were saved after it.
        Injector("postgres_restart", 0, restart_postgres, window=(0.2, 0.6), exclusive=True),
        Injector("model_chaos", 0, model_chaos),
        Injector("client_leaves", 0, client_leaves),
        Injector("client_stops_reading", 0, client_stops_reading, window=(0.05, 0.7)),
        # Not near the end either: the service must be seen back after each.
        Injector("redis_kill", 0, kill_redis, window=(0.05, 0.8)),
        Injector("redis_pause", 0, pause_redis, window=(0.05, 0.8)),
        Injector("redis_flushall", 0, flush_redis),
        Injector("redis_evict", 0, evict_redis),
    ]
    unknown = set(counts) - {kind.name for kind in kinds}
    if unknown:
        raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
    for kind in kinds:
        kind.planned = counts.get(kind.name, 0)
    return kinds


REDIS_FAULTS = ("redis_kill", "redis_pause", "redis_flushall", "redis_evict")
