"""The fault-injection run (reliability issue, item 9), shared by
tests/test_fault_injection.py and ``make bench`` (bench/faults.py).

Given the service running under gunicorn on a throwaway PostgreSQL cluster
(tests/pg_cluster.py) and a throwaway Redis (tests/redis_server.py) with the
fake LLM as its model, ``FaultRun(target, shape).run()`` drives about a
hundred concurrent clients for ``shape.seconds`` (tests/fault_clients.py)
while the injectors of tests/fault_injectors.py fire at moments drawn from
the seed: row locks on counter rows held past the lock timeout,
pg_cancel_backend and pg_terminate_backend on the service's backends, a
PostgreSQL restart, the model failing in every way (500s, timeouts, dropped
connections, cut streams), clients that leave mid-stream and clients that
stop reading, and Redis killed, paused, flushed and evicted.

The clients' traffic goes through Redis's paths: busy users reach their
daily limit (refused from Redis's copy of the counter), some questions are
a seller's general first question (the common-answer cache), and an
operator deletes histories, resets counters and sets limits as the run goes
(``shape.operations``), each of which must leave nothing stale in Redis.
``/health/ready`` is asked all along.

Then it waits until the service is quiet (every client has its answer, the
abandoned streams have ended), reads what the database holds, reads every
user's ``GET /v1/chat/limits`` (Redis may answer it), restarts PostgreSQL
once more while nothing runs (every pooled connection dies with no traffic
to flush them out), sends one normal request, and checks the invariants of
tests/fault_checks.py. The ``Report`` holds the faults injected by kind,
what they were seen to do (PostgreSQL's log, the fake's outcomes, the
service's log and metrics, the readiness answers), the requests by outcome,
the answers' latencies and the violations (goal: none).

The service must run with ``fault_env(…)`` as its environment (the slow
model the fault clients ask, Redis, and LOG_LEVEL=INFO: the request lines
say how each stream ended and which refusals Redis answered).
"""

from __future__ import annotations

import itertools
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import date, datetime
from zoneinfo import ZoneInfo

import requests

from tests import fault_checks as checks
from tests.fake_llm import FakeLLM, stream_ok
from tests.fault_clients import (
    OPERATIONS,
    SLOW_MODEL,
    Habits,
    Operation,
    Readiness,
    Record,
    Recorder,
    UserGate,
    operate,
    ordinary_client,
    poll_readiness,
    send_once,
)
from tests.fault_injectors import Chaos, Injector, admin_connection, injectors
from tests.pg_cluster import PgCluster
from tests.redis_server import RedisServer
from tests.servers import API_KEY

# Ordinary users, the busy ones first; each fault client gets a fresh one above.
FIRST_USER = 1_000_001
FIRST_FAULT_USER = 9_000_001
# The slow model's stream: a piece of PIECE_CHARS every SLOW_CHUNK_DELAY, so a
# client that reads nothing fills the socket buffers (about 4 MiB here) within
# FILL_SECONDS, after which the service's next write waits STREAM_WRITE_TIMEOUT.
SLOW_CHUNK_DELAY = 0.05
PIECE_CHARS = 1600
FILL_SECONDS = 8.0
# A normal send after the run must be answered within this.
NORMAL_SEND_SECONDS = 1.0
# What PostgreSQL logs when a fault reached a statement or a session.
POSTGRES_EFFECTS = {
    "statements cancelled by the lock timeout": "canceling statement due to lock timeout",
    "statements cancelled by pg_cancel_backend": "canceling statement due to user request",
    "sessions terminated": "terminating connection due to administrator command",
    "PostgreSQL starts": "database system is ready to accept connections",
}
# What the fake LLM served while chaos was on (its outcome labels).
MODEL_EFFECTS = ("status:500", "status:503", "status:429", "status:400", "drop", "delay",
                 "stream_break")
# What the service logs when a process loses Redis and finds it again (app/cache.py).
REDIS_DOWN = "redis unavailable"
REDIS_BACK = "redis is back"
# A Redis fault "seen" by the service: it logged REDIS_DOWN within the fault's
# window or this long after; "come back": REDIS_BACK within this long after
# the fault ended (a process probes Redis once a second while it is down).
REDIS_SEEN_GRACE = 1.0
REDIS_BACK_GRACE = 5.0


def fault_env(fake_url: str, database_url: str, admin_key: str, redis_url: str | None = None,
              default_model: str = "gpt-4o-mini") -> dict[str, str]:
    """The service's environment for the run: the fake model, SLOW_MODEL on a
    provider of its own (the same fake), the database, an admin key, Redis
    (when given), and the request log lines."""
    env = {
        "API_SECRET_KEY": API_KEY,
        "ADMIN_API_KEY": admin_key,
        "DATABASE_URL": database_url,
        "OPENAI_BASE_URL": fake_url,
        "OPENAI_API_KEY": "",
        "USER_CONTEXT_URL": "",
        "OPENAI_MODEL": default_model,
        "LLM_PROVIDERS": f"slow={fake_url}",
        "LLM_MODELS": f"{default_model}@openai,{SLOW_MODEL}@slow",
        "LOG_LEVEL": "INFO",
    }
    if redis_url is not None:
        # Every use of Redis, limits and contexts included (off by default).
        env.update(REDIS_URL=redis_url, REDIS_PREFIX="ai_chat:", REDIS_USER_CACHE="true")
    return env


@dataclass(frozen=True)
class Target:
    """The service under the run and what the faults act on."""

    url: str
    admin_dsn: str  # the service's database, as the superuser
    cluster: PgCluster
    fake: FakeLLM
    env: Mapping[str, str]  # the service's environment (its settings come from it)
    log: Callable[[], str]  # the service's log so far
    redis: RedisServer | None = None  # the service's REDIS_URL (None: no Redis faults)
    admin_key: str = API_KEY  # ADMIN_API_KEY, or the ordinary key when that is unset


@dataclass(frozen=True)
class Settings:
    """The service's effective settings that the run's timing depends on."""

    daily_limit: int
    lock_timeout: float
    write_timeout: float
    request_deadline: float
    openai_timeout: float
    timezone: ZoneInfo
    context_messages: int

    @classmethod
    def of(cls, env: Mapping[str, str]) -> Settings:
        """Read by the app's own configuration code: its defaults, not copies."""
        from app.config import load_config

        config = load_config(env)
        # DB_LOCK_TIMEOUT reaches the config only inside the statements' prefix
        # ("SET LOCAL lock_timeout = 3000; ...", milliseconds).
        lock_ms = config["SQL_TIMEOUTS"].split("lock_timeout = ")[1].split(";")[0]
        return cls(
            daily_limit=config["DAILY_LIMIT"],
            lock_timeout=float(lock_ms) / 1000,
            write_timeout=config["STREAM_WRITE_TIMEOUT"],
            request_deadline=config["REQUEST_DEADLINE"],
            openai_timeout=config["OPENAI_TIMEOUT"],
            timezone=config["TIMEZONE"],
            context_messages=config["CONTEXT_MESSAGES"],
        )

    def today(self) -> date:
        return datetime.now(self.timezone).date()


@dataclass(frozen=True)
class Shape:
    """How big the run is and how its clients and faults behave."""

    seconds: float
    faults: Mapping[str, int]  # planned injections per fault kind
    clients: int = 90  # ordinary ones; the fault clients come on top
    seed: int = 20260309
    users: int = 1000
    # A few users ask a share of all questions (they reach the daily limit and
    # their counter rows are busy); the others ask now and then.
    hot_users: int = 5
    hot_share: float = 0.1
    stream_share: float = 0.4
    keyed_share: float = 0.5
    think: tuple[float, float] = (0.2, 1.0)
    # The default model: its first token (or whole answer) after model_latency,
    # then a piece per word chunk_delay apart.
    model_latency: float = 0.1
    chunk_delay: float = 0.05
    chaos_rate: float = 0.5  # share of the model's calls that fail during a burst
    chaos_burst: float = 3.0  # seconds
    outage: float = 1.0  # seconds PostgreSQL stays down in a restart
    # A seller's general first question (tests/fault_clients.py COMMON_QUESTIONS).
    common_share: float = 0.2
    # The operator's actions per kind (delete_history, reset_limit, set_limit),
    # on a busy user half the time, else on one picked as the clients pick.
    operations: Mapping[str, int] = field(default_factory=dict)
    redis_outage: float = 1.0  # seconds a killed Redis stays down
    redis_pause: float = 1.5  # seconds a paused Redis hangs (above RETRY_INTERVAL's 1 s)
    readiness_every: float = 0.25  # seconds between two asks of /health/ready


@dataclass
class Report:
    planned_seconds: float  # the clients ask questions for this long
    seconds: float  # until every client and fault had ended
    clients: int
    planned: dict[str, int]
    faults: dict[str, int]  # injections that happened, by kind
    effects: dict[str, int]  # what they were seen to do
    requests: dict[str, int]  # by kind and outcome
    questions: int
    answered: int
    latency_ms: dict[str, tuple[float | None, float | None]]  # p50, p99 of answers, by kind
    operations: dict[str, tuple[int, int]] = field(default_factory=dict)  # planned, done
    checked: dict[str, int] = field(default_factory=dict)  # what the checks examined
    # Each Redis fault: kind, began and ended (seconds into the run).
    redis_faults_at: list[tuple[str, float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [
            f"fault run: {self.planned_seconds:.0f} s ({self.seconds:.0f} s until every "
            f"client had its answer), {self.clients} clients, {self.questions} "
            f"questions, {self.answered} answered",
            "faults injected (planned): " + ", ".join(
                f"{name} {self.faults.get(name, 0)} ({planned})"
                for name, planned in self.planned.items()),
            "operations done (planned): " + ", ".join(
                f"{name} {done} ({planned})"
                for name, (planned, done) in self.operations.items()),
            "effects: " + ", ".join(f"{name} {count}" for name, count in self.effects.items()),
            "requests: " + ", ".join(f"{name} {count}"
                                     for name, count in sorted(self.requests.items())),
            "answers p50 / p99 ms: " + ", ".join(
                f"{kind} {_ms(p50)} / {_ms(p99)}" for kind, (p50, p99) in self.latency_ms.items()),
            "redis faults (s into the run): " + ", ".join(
                f"{kind} {began:.1f}-{ended:.1f}" for kind, began, ended in self.redis_faults_at),
            "checked: " + ", ".join(f"{name} {count}" for name, count in self.checked.items()),
            *[f"note: {note}" for note in self.notes],
            f"violations: {len(self.violations)}",
            *[f"  {violation}" for violation in self.violations],
        ]
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def percentile(values: list[float], share: float) -> float | None:
    """Nearest rank; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1))]


class FaultRun:
    """One run: ``FaultRun(target, shape).run()`` → ``Report``."""

    def __init__(self, target: Target, shape: Shape):
        self.target = target
        self.shape = shape
        self.settings = Settings.of(target.env)
        self.recorder = Recorder(FIRST_FAULT_USER)
        self.injectors: list[Injector] = injectors(shape.faults)
        self.chaos = Chaos(target.fake, shape.chaos_rate)
        users = range(FIRST_USER, FIRST_USER + shape.users)
        hot = shape.hot_share / shape.hot_users
        cold = (1 - shape.hot_share) / (shape.users - shape.hot_users)
        self.habits = Habits(
            users=users,
            cum_weights=list(itertools.accumulate(
                hot if rank < shape.hot_users else cold for rank in range(len(users)))),
            stream_share=shape.stream_share, keyed_share=shape.keyed_share, think=shape.think,
            common_share=shape.common_share,
        )
        unknown = set(shape.operations) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"unknown operations: {sorted(unknown)}")
        self.gate = UserGate()
        self.operations: list[Operation] = []
        self.readiness: list[Readiness] = []
        # The Redis faults take turns (fault_injectors); their windows (kind,
        # began, ended: wall clock, as the service's log) for the effects.
        self.redis_lock = threading.Lock()
        self._redis_windows: list[tuple[str, float, float]] = []
        self._checked: Counter[str] = Counter()
        self._began_wall = time.time()
        # A client never gives up before the service's deadline has passed.
        self.client_timeout = self.settings.request_deadline + 15
        # Long enough for the socket buffers to fill and a write to time out.
        self.stuck_hold = FILL_SECONDS + self.settings.write_timeout + 2
        self._effects: Counter[str] = Counter()
        self._outages: list[float] = []
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    # --- for the injectors ---------------------------------------------------------

    def busy_users(self, rng: random.Random, count: int) -> list[int]:
        """A hot user and ``count - 1`` users picked as the clients pick them."""
        picked = rng.choices(self.habits.users, cum_weights=self.habits.cum_weights, k=count - 1)
        return sorted({rng.choice(self.habits.users[: self.shape.hot_users]), *picked})

    def count_effect(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._effects[name] += amount

    def note_redis_fault(self, kind: str, began: float, ended: float) -> None:
        with self._lock:
            self._redis_windows.append((kind, began, ended))

    def note_outage(self, seconds: float) -> None:
        with self._lock:
            self._outages.append(seconds)

    def next_number(self) -> int:
        with self._lock:
            return next(self._numbers)

    # --- the run -------------------------------------------------------------------

    def run(self) -> Report:
        self._prepare_fake()
        day = self.settings.today()
        began = time.monotonic()
        self._began_wall = time.time()
        until = began + self.shape.seconds
        polling = threading.Event()
        readiness = threading.Thread(target=self._poll_readiness, args=(polling,),
                                     name="fault-readiness", daemon=True)
        readiness.start()
        clients = [threading.Thread(
            target=ordinary_client, name=f"fault-client-{index}",
            args=(self.target.url, self.recorder, self.habits, self.gate, index,
                  self.shape.seed, until, self.client_timeout), daemon=True,
        ) for index in range(self.shape.clients)]
        for thread in clients:
            thread.start()
            time.sleep(1.0 / self.shape.clients)  # arrivals spread over the first second
        injections = self._inject(began)
        operations = self._operate(began)
        violations = self._join(clients + injections + operations)
        seconds = time.monotonic() - began
        polling.set()
        readiness.join()
        self.chaos.off()
        if not self.target.cluster.running():
            self.target.cluster.start()
        violations += self._quiesce()
        stored = checks.read_database(self.target.admin_dsn)
        limits = self._read_limits(stored)
        self._restart_while_quiet()
        probe = self._normal_send()
        violations += self._check(stored, limits, probe, day)
        return self._report(seconds, violations)

    def _poll_readiness(self, stop: threading.Event) -> None:
        poll_readiness(self.target.url, stop, self.shape.readiness_every, self.readiness)

    def _prepare_fake(self) -> None:
        fake = self.target.fake
        fake.latency = self.shape.model_latency
        fake.chunk_delay = self.shape.chunk_delay
        fake.failure_rate = 0.0
        # Slower than one attempt may take: the chaos "delay" is a timeout.
        fake.chaos_timeout = self.settings.openai_timeout + 1.0
        # Longer than any fault client stays, so none of them can reach done.
        seconds = self.stuck_hold + 10.0
        pieces = math.ceil(seconds / SLOW_CHUNK_DELAY)
        text = ("Длинный ответ. " * (pieces * PIECE_CHARS // 15 + 1))[: pieces * PIECE_CHARS]
        step = stream_ok(text, pieces=pieces, first_token_delay=0.2, chunk_delay=SLOW_CHUNK_DELAY,
                         tokens=pieces)
        fault_clients = sum(self.shape.faults.get(name, 0)
                            for name in ("client_leaves", "client_stops_reading"))
        fake.script_for(SLOW_MODEL, *[step] * (fault_clients + 5))

    def _inject(self, began: float) -> list[threading.Thread]:
        """Start every planned injection at its moment (a thread each); returns
        the scheduler, which joins them all."""
        rng = random.Random(f"{self.shape.seed}:faults")
        moments = sorted(
            (began + self.shape.seconds * rng.uniform(*injector.window), injector.name, number)
            for injector in self.injectors for number in range(injector.planned)
        )
        by_name = {injector.name: injector for injector in self.injectors}

        def fire(name: str, number: int) -> None:
            by_name[name].fire(self, random.Random(f"{self.shape.seed}:{name}:{number}"))

        return [_at_moments(moments, fire, "fault")]

    def _operate(self, began: float) -> list[threading.Thread]:
        """The operator's actions, each at its seeded moment in a thread of
        its own, on a user it holds (``UserGate``) while the action runs;
        returns the scheduler, which joins them all."""
        rng = random.Random(f"{self.shape.seed}:operations")
        moments = sorted(
            (began + self.shape.seconds * rng.uniform(0.05, 0.9), kind, number)
            for kind, count in self.shape.operations.items() for number in range(count)
        )

        def one(kind: str, number: int) -> None:
            pick = random.Random(f"{self.shape.seed}:operation:{kind}:{number}")
            user = (pick.choice(self.habits.users[: self.shape.hot_users]) if pick.random() < 0.5
                    else pick.choices(self.habits.users, cum_weights=self.habits.cum_weights)[0])
            limit = self.settings.daily_limit
            value = pick.choice([None, max(1, limit - 3), limit + 4, 0]) \
                if kind == "set_limit" else None
            operation = Operation(kind, user, value, number=self.next_number())
            try:
                with self.gate.operation(user) as epoch:
                    operation.epoch = epoch
                    operate(self.target.url, self.target.admin_key, operation,
                            self.client_timeout, self.client_timeout)
            finally:  # every epoch the gate counted has its operation (done or not)
                with self._lock:
                    self.operations.append(operation)

        return [_at_moments(moments, one, "fault-operation")]

    def _join(self, threads: list[threading.Thread]) -> list[str]:
        """Every client and injection ends (each request is bounded by its timeout)."""
        give_up_at = time.monotonic() + self.shape.seconds + 3 * self.client_timeout + 30
        late = []
        for thread in threads:
            thread.join(max(0.0, give_up_at - time.monotonic()))
            if thread.is_alive():
                late.append(f"{thread.name} still running at the end of the run")
        return late

    def _quiesce(self) -> list[str]:
        """Wait until no stream is in flight and no statement runs (the streams
        of clients that left end at their next write; a refund may be retrying)."""
        give_up_at = time.monotonic() + self.settings.request_deadline + 30
        while time.monotonic() < give_up_at:
            if self._streams_in_flight() == 0 and not self._busy_backends():
                return []
            time.sleep(0.2)
        return [f"the service was not quiet {self.settings.request_deadline + 30:.0f} s after "
                f"the run: {self._streams_in_flight()} streams in flight, "
                f"{self._busy_backends()} statements running"]

    def _metric(self, name: str) -> float | None:
        """A metric of the service summed over its labels (None: unreadable)."""
        series = self._metric_series(name)
        return sum(value for _, value in series) if series else None

    def _streams_in_flight(self) -> float | None:
        return self._metric("ai_chat_streams_in_flight")

    def _busy_backends(self) -> int:
        with closing(admin_connection(self.target.admin_dsn)) as connection:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'ai_chat' AND state <> 'idle'"
                )
                return cursor.fetchone()[0]

    def _read_limits(self, stored: checks.Stored) -> dict[int, list[tuple[int, dict]]]:
        """Every user's ``GET /v1/chat/limits``, twice: Redis's copy (when it
        holds one) answers the first, the copy it wrote answers the second."""
        users = sorted({record.user for record in self.recorder.records()}
                       | set(stored.counters) | {op.user for op in self.operations})

        def read(user: int) -> tuple[int, list[tuple[int, dict]]]:
            readings = []
            with requests.Session() as session:
                for _ in range(2):
                    try:
                        response = session.get(f"{self.target.url}/v1/chat/limits/{user}",
                                               headers={"X-API-KEY": API_KEY}, timeout=10)
                        readings.append((response.status_code, response.json()))
                    except (requests.RequestException, ValueError) as error:
                        readings.append((0, {"error": type(error).__name__}))
            return user, readings

        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(pool.map(read, users))

    def _restart_while_quiet(self) -> None:
        """PostgreSQL restarted once more with no request running (a restart at
        night): every pooled connection of the service is dead, and no traffic
        comes to flush them out before the normal send."""
        began = time.monotonic()
        self.target.cluster.stop()
        self.target.cluster.start()
        self.note_outage(time.monotonic() - began)
        self.count_effect("restarts while the service was quiet")

    def _normal_send(self) -> Record:
        """One ordinary send of a new user, the model healthy again."""
        user = self.recorder.new_user()
        record = Record(request_id="normal-send", role="probe", kind="send", user=user,
                        question_id="normal-send",
                        question=f"Обычный вопрос продавца {user}", key=None, attempt=1,
                        started=time.monotonic())
        with requests.Session() as session:
            return self.recorder.add(send_once(session, self.target.url, record,
                                               self.client_timeout))

    def _check(self, stored: checks.Stored, limits: dict[int, list[tuple[int, dict]]],
               probe: Record, day: date) -> list[str]:
        """The invariants; ``stored`` was read once the service was quiet,
        before the last restart (which would end a session left in a
        transaction), and ``limits`` right after it."""
        # The normal send came after ``stored`` was read: it has its own check.
        records = [record for record in self.recorder.records() if record.role != "probe"]
        log = self.target.log()
        rowless = checks.rowless_request_ids(log)
        timeline = checks.Timeline.of(self.operations, self.settings.daily_limit)
        prompts = [request["body"]["messages"] for request in self.target.fake.requests
                   if isinstance(request.get("body"), dict)
                   and isinstance(request["body"].get("messages"), list)]
        violations = []
        if self.settings.today() != day:
            violations.append("the run crossed midnight in AI_CHAT_TIMEZONE: run it again")
        violations += checks.operations_answered(self.operations)
        violations += checks.counters_equal_answers(records, stored, timeline, day)
        violations += checks.answers_are_in_history(records, stored, rowless, timeline)
        violations += checks.limits_in_answers_are_current(records, timeline)
        violations += checks.refusals_had_a_cause(records, timeline, self._checked)
        violations += checks.prompts_hold_the_users_own_context(
            prompts, records, timeline, rowless, self.settings.context_messages, self._checked)
        self._checked["limits read back"] = sum(map(len, limits.values()))
        self._checked["users"] = len(limits)
        violations += checks.limits_read_back(limits, stored, self.settings.daily_limit, day)
        violations += checks.readiness_stayed_up(self.readiness)
        violations += checks.outcomes_are_allowed(records)
        violations += checks.no_key_left_claimed(stored)
        violations += checks.no_session_left_in_a_transaction(stored)
        violations += checks.log_is_clean(log)
        violations += checks.normal_send_answers_in_time(probe, NORMAL_SEND_SECONDS)
        return violations

    # --- the report ----------------------------------------------------------------

    def _report(self, seconds: float, violations: list[str]) -> Report:
        records = [r for r in self.recorder.records() if r.role != "probe"]
        ordinary = [r for r in records if r.role == "ordinary"]
        answered = checks.delivered_answers(ordinary)
        latency = {}
        for kind in ("send", "stream"):
            times = [r.seconds * 1000 for r in ordinary if r.kind == kind and r.delivered]
            latency[kind] = (percentile(times, 0.5), percentile(times, 0.99))
        log = self.target.log()
        rowless = checks.rowless_request_ids(log)
        outcomes = Counter(record.outcome for record in records)
        outcomes.update(outcome for op in self.operations for outcome in op.outcomes)
        return Report(
            planned_seconds=self.shape.seconds,
            seconds=seconds,
            clients=self.shape.clients,
            planned={injector.name: injector.planned for injector in self.injectors},
            faults={injector.name: injector.injected for injector in self.injectors},
            effects=self._effects_seen(log),
            requests=dict(outcomes),
            questions=len({r.question_id for r in ordinary}),
            answered=sum(len(answers) for answers in answered.values()),
            latency_ms=latency,
            operations={kind: (self.shape.operations[kind],
                               sum(op.done for op in self.operations if op.kind == kind))
                        for kind in OPERATIONS if kind in self.shape.operations},
            checked=dict(self._checked),
            redis_faults_at=sorted(((kind, began - self._began_wall, ended - self._began_wall)
                                    for kind, began, ended in self._redis_windows),
                                   key=lambda window: window[1]),
            notes=[f"{len(rowless)} answer(s) delivered without their history row (the "
                   "save failed after retries; allowed)"] if rowless else [],
            violations=violations,
        )

    def _effects_seen(self, log: str) -> dict[str, int]:
        effects: Counter[str] = Counter()
        postgres_log = self.target.cluster.log()
        for name, pattern in POSTGRES_EFFECTS.items():
            effects[name] = postgres_log.count(pattern)
        outcomes = Counter(self.target.fake.outcomes)
        for outcome in MODEL_EFFECTS:
            effects[f"model {outcome}"] = outcomes[outcome]
        effects["upstream streams abandoned"] = self.target.fake.streams_abandoned
        # Chaos can fail a provider's calls five in a row: then it is skipped for a while.
        effects["model breaker opened"] = int(self._metric("ai_chat_llm_breaker_opened_total") or 0)
        lines = checks.log_records(log)
        streams = [line for line in lines if line.get("path") == "/v1/chat/stream"]
        leavers = [line for line in streams if line["request_id"].startswith("leaver-")]
        stuck = [line for line in streams if line["request_id"].startswith("stuck-")]
        effects["leavers' streams ended client_gone"] = sum(
            line.get("outcome") == "client_gone" for line in leavers)
        effects["stuck streams begun"] = sum(line.get("status") == 200 for line in stuck)
        # Ended before the client closed its socket: by the write timeout.
        effects["stuck streams ended by the write timeout"] = sum(
            line.get("outcome") == "client_gone"
            and line.get("duration_ms", 0) < (self.stuck_hold - 0.5) * 1000
            for line in stuck)
        effects["answers saved without a history row"] = sum(
            line.get("message") == checks.ROWLESS for line in lines)
        with self._lock:
            effects.update(self._effects)
            if self._outages:
                effects["PostgreSQL down ms (longest)"] = round(max(self._outages) * 1000)
        if self.target.redis is not None:
            effects.update(self._redis_effects(lines))
        return dict(effects)

    def _redis_effects(self, lines: list[dict]) -> dict[str, int]:
        """What Redis's faults and paths were seen to do: each kill and pause
        seen by the service (a process of it fell back to PostgreSQL within
        the fault, and every one found Redis again after it; /health/ready
        said degraded), the lookups by use and outcome
        (``ai_chat_redis_requests_total``), refusals answered from Redis,
        common answers delivered, and ``ai_chat_redis_up`` at the end.

        Each process logs REDIS_DOWN once when it loses Redis and REDIS_BACK
        once when it finds it again, so the lines so far, +1 and -1, count
        the processes without Redis at any moment (the lines carry no pid; a
        process still down from a fault just before is down in this one)."""
        effects: dict[str, int] = {}
        down = [_log_time(line) for line in lines
                if str(line.get("message", "")).startswith(REDIS_DOWN)]
        back = [_log_time(line) for line in lines
                if str(line.get("message", "")).startswith(REDIS_BACK)]
        steps = sorted([(at, 1) for at in down] + [(at, -1) for at in back])

        def without_redis(at: float) -> int:
            return sum(step for moment, step in steps if moment <= at)

        def moments(start: float, end: float) -> list[float]:
            return [start, *(moment for moment, _ in steps if start < moment <= end)]

        degraded = [poll.at for poll in self.readiness if poll.redis == "degraded"]
        with self._lock:
            windows = list(self._redis_windows)
        for kind, label in (("redis_kill", "redis kills"), ("redis_pause", "redis pauses")):
            mine = [(began, ended) for name, began, ended in windows if name == kind]
            fell = [(began, ended) for began, ended in mine
                    if any(without_redis(at) > 0
                           for at in moments(began, ended + REDIS_SEEN_GRACE))]
            effects[f"{label} the service fell back from"] = len(fell)
            effects[f"{label} the service came back from"] = sum(
                any(without_redis(at) == 0 for at in moments(ended, ended + REDIS_BACK_GRACE))
                for began, ended in fell)
            effects[f"{label} /health/ready said degraded in"] = sum(
                any(began <= at <= ended for at in degraded) for began, ended in mine)
        effects["redis unavailable logged"] = len(down)
        # A busy process whose call outlived REDIS_TIMEOUT by itself (a CPU or
        # GIL stall, no fault injected) falls back too, for a retry interval.
        effects["of them outside any injected fault"] = sum(
            not any(began <= at <= ended + REDIS_SEEN_GRACE for kind, began, ended in windows
                    if kind in ("redis_kill", "redis_pause"))
            for at in down)
        effects["redis is back logged"] = len(back)
        effects["/health/ready said redis degraded"] = len(degraded)
        effects["/health/ready asked"] = len(self.readiness)
        lookups = self._metric_series("ai_chat_redis_requests_total")
        for labels, value in sorted(lookups, key=lambda series: sorted(series[0].items())):
            effects[f"redis {labels.get('use')} {labels.get('outcome')}"] = int(value)
        streams = [line for line in lines if line.get("path") in ("/v1/chat/send",
                                                                   "/v1/chat/stream")]
        effects["refusals answered from Redis"] = sum(
            line.get("refused_by") == "redis" for line in streams)
        effects["refusals answered from PostgreSQL"] = sum(
            line.get("refused_by") == "postgresql" for line in streams)
        effects["common answers delivered (cached: true)"] = sum(
            record.cached for record in self.recorder.records() if record.delivered is not None)
        up = [value for _, value in self._metric_series("ai_chat_redis_up")]
        effects["ai_chat_redis_up at the end"] = int(min(up)) if up else -1
        return effects

    def _metric_series(self, name: str) -> list[tuple[dict[str, str], float]]:
        """A metric's series (labels, value); [] when unreadable."""
        try:
            text = requests.get(f"{self.target.url}/metrics", timeout=10).text
        except requests.RequestException:
            return []
        series = []
        for line in text.splitlines():
            if line.startswith((f"{name} ", f"{name}{{")):
                head, value = line.rsplit(" ", 1)
                series.append((dict(_LABEL.findall(head)), float(value)))
        return series


_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _at_moments(moments, start, name: str) -> threading.Thread:
    """A started scheduler that runs ``start(*rest)`` in a thread of its own
    at each ``(at, *rest)`` of ``moments`` (sorted, monotonic times) and then
    joins them all: joining it waits for every one."""

    def schedule() -> None:
        started = []
        for at, *rest in moments:
            time.sleep(max(0.0, at - time.monotonic()))
            thread = threading.Thread(target=start, args=rest, daemon=True,
                                      name=f"{name}-{'-'.join(map(str, rest))}")
            thread.start()
            started.append(thread)
        for thread in started:
            thread.join()

    scheduler = threading.Thread(target=schedule, name=f"{name}-scheduler", daemon=True)
    scheduler.start()
    return scheduler


def _log_time(line: dict) -> float:
    """A JSON log line's time, as time.time() gives it."""
    try:
        return datetime.fromisoformat(line["time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0
