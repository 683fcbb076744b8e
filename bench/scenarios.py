"""The scenarios of `make bench` and how one is driven and measured.

Every scenario runs the service at its defaults (LOG_LEVEL=INFO, threads and
pool as app/config.py sets them) unless its ``env`` says otherwise; only
fast-50-warning turns the request log line off, to show what it costs. The
forward-only app (bench/forward_app.py) is the floor of a scenario of the
same name with ``fwd-`` in front, under the same gunicorn settings.

The v1.2 scenarios (bench/RESULTS.md "v1.2"):

- ``real-1000-starved`` / ``fwd-real-1000-starved``: real-1000 with gunicorn
  pinned to one core and a CPU burner on that core (``cpus``, ``burners``):
  admission by the time left under a CPU-starved box.
- ``tools-50``: the model asks for two tools, then answers (TOOLS_MAX_ROUNDS=1:
  the second call offers none); the fake main server takes 100 ms a call.
- ``cache-50``: a mix of repeated general questions (the common-answer cache,
  Redis), clients pausing between questions as sellers do.
- ``*-users`` (fast-50, slow-200): a pool of returning users with 10
  exchanges and a summary each, a fifth of them at their daily limit; the
  same pattern with Redis (``-redis``), without summaries (``-nosum``); and
  fast-50 / real-1000 with prices and a spend cap (``-spend``).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

from bench import system
from bench.loadgen import Questions, run_load
from bench.servers import FakeLLMProcess, GunicornProcess, Upstream
from bench.stats import Figures, summarise

SERVICE = "wsgi:app"
FORWARD = "bench.forward_app:app"
API_KEY = "bench-key"

SLOW = Upstream(0.5)
FAST = Upstream(0.0)
# A real model: 5 s for a whole answer.
REAL = Upstream(5.0)
# A real model, streamed: the first token after 500 ms, then 200 pieces over
# 4.5 s (800 characters), as tests/fake_llm.py's docstring suggests.
STREAMED = Upstream(0.5, pieces=200, chunk_delay=0.0225, answer_chars=800)
# The model asks for two seller-data tools (at once), then answers after 500 ms.
TOOLS = Upstream(0.5, tools=("get_sales", "get_dashboard"))


@dataclass(frozen=True)
class Users:
    """Returning users (bench/servers.py ``load_users``): a pool of ``size``,
    ``history`` exchanges each, a summary covering all but the newest 5 to 9
    (so a fold falls due every SUMMARY_EVERY answers, staggered, as in steady
    use), and an ``at_limit`` share (every 5th user) at their own daily
    ``limit``. The load generator walks the pool in order."""

    size: int
    history: int = 10
    at_limit: float = 0.2
    limit: int = 30


@dataclass(frozen=True)
class Scenario:
    name: str
    app: str  # "service" or "forward"
    upstream: Upstream
    clients: int
    env: tuple[tuple[str, str], ...] = ()
    leak_requests: int = 0  # > 0: a leak run of that many requests instead of a timed one
    stream: bool = False  # POST /v1/chat/stream, read as Server-Sent Events
    # Seconds over which the clients start, one after another. One whole answer
    # of the model spreads their loops evenly over its cycle, so a window
    # counts the same answers whatever its phase.
    ramp: float = 0.0
    window: float | None = None  # measured seconds (None: the run's default)
    description: str = ""
    users: Users | None = None  # returning users (None: a fresh user per request)
    questions: Questions | None = None  # a mix of questions (None: the one MESSAGE)
    think: float = 0.0  # seconds a client pauses between an answer and its next question
    timeout: float = 30.0  # the client gives up after this long
    redis: bool = False  # REDIS_URL at the machine's Redis, the run's own prefix
    main_server: float | None = None  # the fake main server, this many seconds a call
    cpus: str | None = None  # gunicorn pinned to these cores (taskset)
    burners: int = 0  # busy loops pinned beside it
    settle: float = 0.0  # seconds more of warm-up (a starved box settles slowly)

    @property
    def module(self) -> str:
        return SERVICE if self.app == "service" else FORWARD

    @property
    def latency(self) -> float:
        """Seconds the model takes to its first (or only) token."""
        return self.upstream.latency

    def server_key(self) -> tuple:
        """Scenarios with the same key share one gunicorn (started once)."""
        return (self.app, self.upstream, self.env, self.redis, self.main_server, self.cpus,
                self.burners)

    @property
    def drain(self) -> float:
        """Seconds the answers in flight at the end of the window may still take:
        two whole answers of the model (an overloaded server's p99) and 2 s;
        later ones are cut, so that a collapsing server does not make the run
        wait for every client's timeout."""
        return 2 * self.upstream.answer_s + 2.0

    def warmup(self, least: float) -> float:
        """Seconds before the window: at least ``least``, and past the ramp and
        one whole answer after it, so that every client is in its steady loop."""
        return max(least, self.ramp + self.upstream.answer_s + 1.0) + self.settle


WARNING = (("LOG_LEVEL", "WARNING"),)
# One tool round, then the answer (tests/fake_llm.py's tools_forever asks for
# tools whenever they are offered).
ONE_ROUND = (("TOOLS_MAX_ROUNDS", "1"),)
NO_SUMMARIES = (("SUMMARY_ENABLED", "false"),)
# Redis's replies on this shared box lag past the default 50 ms timeout under
# load (redis-cli --latency: up to 83 ms); the -redis500 twins show what Redis
# costs and saves when it stays up.
# The -redis twins measure limits and contexts in Redis (off by default, as
# these twins measured: README, "Redis in front of PostgreSQL").
USER_CACHE = (("REDIS_USER_CACHE", "true"),)
REDIS_500 = USER_CACHE + (("REDIS_TIMEOUT", "0.5"),)
# A price for the model and a cap no user reaches: the cap is checked and the
# cost added on every answer, nobody is refused.
SPEND = (("LLM_PRICES", "gpt-4o-mini=0.15:0.60"), ("DAILY_SPEND_LIMIT", "1000"))
# 20 general questions sellers ask, a tenth of the questions asked once only.
COMMON_QUESTIONS = Questions(tuple(
    f"{question}?" for question in (
        "Как поднять карточку товара в поиске Wildberries",
        "Как снизить процент возвратов",
        "Как правильно заполнить характеристики товара",
        "Как работает реклама в поиске Wildberries",
        "Что такое индекс локализации",
        "Как выбрать склад для поставки",
        "Как отвечать на негативные отзывы",
        "Как рассчитать юнит-экономику товара",
        "Как участвовать в акциях Wildberries",
        "Как улучшить главное фото карточки",
        "Как работает коэффициент приёмки",
        "Как снизить стоимость логистики",
        "Как подобрать ключевые слова для карточки",
        "Что влияет на рейтинг продавца",
        "Как избежать штрафов Wildberries",
        "Как часто менять цены",
        "Как работает FBS и FBO",
        "Как оформить самовыкупы без риска",
        "Как увеличить конверсию в корзину",
        "Как подготовить товар к сезону",
    )), unique=0.1)
CACHE_THINK_S = 0.5
# Returning users: five times the clients, so that no two clients ask for one
# user at once, and few enough that each user is asked a few times in a run
# (Redis's copy of a context is read from the second question on).
FAST_USERS = Users(1000)
SLOW_USERS = Users(1000)
STARVED = {"cpus": "0", "burners": 1, "timeout": 65.0, "settle": 10.0}

PLAN = (
    Scenario("slow-20", "service", SLOW, 20, description="service overhead at light load"),
    Scenario("slow-50", "service", SLOW, 50, description="target 1"),
    Scenario("slow-200", "service", SLOW, 200, description="target 2"),
    Scenario("fwd-slow-50", "forward", SLOW, 50, description="floor for slow-50"),
    Scenario("fwd-slow-200", "forward", SLOW, 200, description="floor for slow-200"),
    Scenario("fast-50", "service", FAST, 50, description="CPU-bound, target 3"),
    Scenario("leak", "service", FAST, 50, leak_requests=20_000, description="RSS over 20k sends"),
    Scenario("fwd-fast-50", "forward", FAST, 50, description="floor for fast-50"),
    Scenario("fast-50-warning", "service", FAST, 50, env=WARNING,
             description="fast-50 without the per-request INFO log line"),
    Scenario("real-1000", "service", REAL, 1000, ramp=5.0, window=20.0,
             description="a real evening: 1000 chats, a 5 s model"),
    Scenario("fwd-real-1000", "forward", REAL, 1000, ramp=5.0, window=20.0,
             description="floor for real-1000"),
    Scenario("stream-5", "service", STREAMED, 5, stream=True, ramp=5.0, window=10.0,
             description="first delta of a stream at low concurrency"),
    Scenario("stream-200", "service", STREAMED, 200, stream=True, ramp=5.0, window=20.0,
             description="the streams one box holds at the model's pace"),
    Scenario("stream-1000", "service", STREAMED, 1000, stream=True, ramp=5.0, window=20.0,
             description="1000 concurrent streams"),
    Scenario("fwd-stream-5", "forward", STREAMED, 5, stream=True, ramp=5.0, window=10.0,
             description="floor for stream-5"),
    Scenario("fwd-stream-1000", "forward", STREAMED, 1000, stream=True, ramp=5.0, window=20.0,
             description="floor for stream-1000"),
    # --- v1.2 ---------------------------------------------------------------------
    Scenario("real-1000-starved", "service", REAL, 1000, ramp=5.0, window=30.0, **STARVED,
             description="real-1000 on one core shared with a CPU burner"),
    Scenario("fwd-real-1000-starved", "forward", REAL, 1000, ramp=5.0, window=30.0, **STARVED,
             description="floor for real-1000-starved"),
    Scenario("tools-50", "service", TOOLS, 50, env=ONE_ROUND, main_server=0.1,
             description="two tools of one round (main server 100 ms), then the answer"),
    Scenario("cache-50", "service", SLOW, 50, redis=True, questions=COMMON_QUESTIONS,
             think=CACHE_THINK_S, description="repeated general questions, Redis"),
    Scenario("fast-50-users", "service", FAST, 50, users=FAST_USERS,
             description="returning users, no Redis"),
    Scenario("fast-50-users-redis", "service", FAST, 50, users=FAST_USERS, redis=True,
             env=USER_CACHE, description="returning users, limits and contexts in Redis"),
    Scenario("fast-50-users-redisdefault", "service", FAST, 50, users=FAST_USERS, redis=True,
             description="returning users, Redis at its defaults (no limits or contexts)"),
    Scenario("fast-50-users-redis500", "service", FAST, 50, users=FAST_USERS, redis=True,
             env=REDIS_500, description="returning users, limits and contexts in Redis, 500 ms"),
    Scenario("fast-50-users-nosum", "service", FAST, 50, users=FAST_USERS, env=NO_SUMMARIES,
             description="returning users, no summaries"),
    Scenario("slow-200-users", "service", SLOW, 200, users=SLOW_USERS,
             description="returning users, no Redis"),
    Scenario("slow-200-users-redis", "service", SLOW, 200, users=SLOW_USERS, redis=True,
             env=USER_CACHE, description="returning users, limits and contexts in Redis"),
    Scenario("slow-200-users-redis500", "service", SLOW, 200, users=SLOW_USERS, redis=True,
             env=REDIS_500, description="returning users, limits and contexts in Redis, 500 ms"),
    Scenario("slow-200-users-nosum", "service", SLOW, 200, users=SLOW_USERS, env=NO_SUMMARIES,
             description="returning users, no summaries"),
    Scenario("fast-50-spend", "service", FAST, 50, env=SPEND,
             description="fast-50 with prices and a spend cap"),
    Scenario("real-1000-spend", "service", REAL, 1000, ramp=5.0, window=20.0, env=SPEND,
             description="real-1000 with prices and a spend cap"),
)
PROFILE = Scenario("profile", "service", FAST, 50, description="py-spy on the workers")
# (service, forward-only) pairs whose ratios the targets judge; with --repeat N
# each pair runs N times and the report takes the median ratio.
PAIRS = (("slow-50", "fwd-slow-50"), ("slow-200", "fwd-slow-200"), ("fast-50", "fwd-fast-50"),
         ("real-1000", "fwd-real-1000"))
# Scenarios judged alone whose figures are medians of rounds too.
ALONE_IN_ROUNDS = ("cache-50",)
# v1.2's pairs (a scenario and its twin without the part measured), run in
# rounds like PAIRS: (with the part, without it, what is compared).
V12_PAIRS = (
    ("real-1000-starved", "fwd-real-1000-starved", "overload"),
    ("tools-50", "slow-50", "tools"),
    ("fast-50-users-redis", "fast-50-users", "redis"),
    ("slow-200-users-redis", "slow-200-users", "redis"),
    ("fast-50-users-redis500", "fast-50-users", "redis"),
    ("fast-50-users-redisdefault", "fast-50-users", "redis"),
    ("slow-200-users-redis500", "slow-200-users", "redis"),
    ("fast-50-users", "fast-50-users-nosum", "memory"),
    ("slow-200-users", "slow-200-users-nosum", "memory"),
    ("fast-50-spend", "fast-50", "spend"),
    ("real-1000-spend", "real-1000", "spend"),
)
# Open files the run needs at most: the load generator's sockets, and as many
# again in the workers (clients + upstream) and in the fake LLM.
OPEN_FILES = 16_384


def service_env(database_url: str, llm_url: str) -> dict:
    """The service's production defaults for everything not set here."""
    return {
        "API_SECRET_KEY": API_KEY,
        "DATABASE_URL": database_url,
        "OPENAI_BASE_URL": llm_url,
        "OPENAI_API_KEY": "",
        # Fresh users per request: the limit never bites, but stays on (headers).
        "DAILY_LIMIT": "1000000",
        "USER_CONTEXT_URL": "",
        # The default, said out loud: tests.servers.Gunicorn, which starts the
        # servers, would otherwise set WARNING.
        "LOG_LEVEL": "INFO",
    }


@dataclass
class Measured:
    figures: Figures
    rss_points: list[tuple[str, list[float]]] = field(default_factory=list)
    # Every run of the scenario (--repeat), the first included.
    repeats: list[Figures] = field(default_factory=list)


# Set by the runner for the scenario being measured: more processes to count
# (the fake main server, the CPU burners, Redis).
EXTRA_GROUPS: dict[str, list[int]] = {}


def _groups(server: GunicornProcess, llm: FakeLLMProcess) -> dict[str, list[int]]:
    return {
        # Each worker on its own too: keep-alive connections stick to the worker
        # that accepted them, and an uneven split caps throughput.
        **{f"worker:{pid}": [pid] for pid in server.workers()},
        "service": server.pids(),
        "postgres": system.postgres_pids(server.env["DATABASE_URL"].rsplit("/", 1)[1]),
        "fake_llm": [llm.process.pid],
        "loadgen": [os.getpid()],
        **EXTRA_GROUPS,
    }


def _worker_rss(server: GunicornProcess) -> list[float]:
    return [system.rss_mib(pid) for pid in server.workers()]


def _memory(server: GunicornProcess) -> tuple[float, float]:
    """RSS and PSS summed over the master and its workers (MiB)."""
    pids = server.pids()
    return sum(system.rss_mib(pid) for pid in pids), sum(system.pss_mib(pid) for pid in pids)


def scrape_metrics(port: int) -> dict[str, float]:
    """The service's /metrics as {"name{labels}": value} (empty when it has none:
    the forward-only app)."""
    import requests

    try:
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    except requests.RequestException:
        return {}
    if response.status_code != 200:
        return {}
    values = {}
    for line in response.text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


def metrics_between(first: dict[str, float], last: dict[str, float]) -> dict[str, float]:
    """What each counter, histogram sum and count grew by in the window."""
    return {name: value - first.get(name, 0.0) for name, value in last.items()
            if value - first.get(name, 0.0)}


async def _timed(scenario, server, llm, database, warmup, duration, first_id):
    """Closed loop for warmup + duration; CPU snapshots and the service's
    metrics bracket the window, and the service's memory is read at its end."""
    host, port = "127.0.0.1", server.port
    start = time.perf_counter()
    window = (start + warmup, start + warmup + duration)
    snapshots = []
    sessions = []
    memory = []
    scraped = []

    async def sampler():
        for moment in window:
            await asyncio.sleep(max(0.0, moment - time.perf_counter()))
            snapshots.append(system.snapshot(time.perf_counter(), _groups(server, llm)))
            sessions.append(database.sessions())
            if scenario.app == "service":
                scraped.append(await asyncio.to_thread(scrape_metrics, port))
        memory.append(_memory(server))

    sampling = asyncio.create_task(sampler())
    result = await run_load(
        host, port, API_KEY, scenario.clients, first_id=first_id, duration=warmup + duration,
        stream=scenario.stream, ramp=scenario.ramp, drain=scenario.drain,
        timeout=scenario.timeout, users=scenario.users.size if scenario.users else None,
        questions=scenario.questions, think=scenario.think,
        refusals=scenario.users is not None and scenario.users.at_limit > 0,
    )
    await sampling
    cpu = system.cpu_between(snapshots[0], snapshots[1])
    window = (snapshots[0].at, snapshots[1].at)
    grown = metrics_between(*scraped) if len(scraped) == 2 else {}
    return result, window, cpu, sessions[1] - sessions[0], memory[0], grown


def _figures(scenario: Scenario, window_s: float, warmup: float) -> Figures:
    return Figures(
        scenario.name, scenario.app, scenario.latency * 1000, scenario.clients, window_s,
        stream=scenario.stream, answer_ms=scenario.upstream.answer_s * 1000,
        warmup_s=warmup, ramp_s=scenario.ramp,
    )


def run_timed(scenario, server, llm, database, warmup, duration, first_id) -> Measured:
    result, window, cpu, new_sessions, memory, grown = asyncio.run(
        _timed(scenario, server, llm, database, warmup, duration, first_id)
    )
    figures = _figures(scenario, window[1] - window[0], warmup)
    summarise(figures, result, window, cpu)
    figures.metrics = grown
    figures.window_at = window
    figures.worker_rss_mib = _worker_rss(server)
    figures.service_rss_mib, figures.service_pss_mib = memory
    figures.new_db_connections = new_sessions
    return Measured(figures, repeats=[figures])


def run_leak(scenario, server, llm, database, warmup, first_id, limit: float) -> Measured:
    """Warm up, then ``leak_requests`` sends with worker RSS at start, middle, end.

    ``limit`` bounds the run in seconds; the report says how many requests it made.
    """
    asyncio.run(
        run_load("127.0.0.1", server.port, API_KEY, scenario.clients,
                 first_id=first_id, duration=warmup)
    )
    points = [("start", _worker_rss(server))]
    answered = 0

    def on_answer():
        nonlocal answered
        answered += 1
        if answered == scenario.leak_requests // 2:
            points.append(("middle", _worker_rss(server)))

    before = system.snapshot(time.perf_counter(), _groups(server, llm))
    sessions = database.sessions()
    result = asyncio.run(
        run_load("127.0.0.1", server.port, API_KEY, scenario.clients,
                 first_id=first_id + 10_000_000, total=scenario.leak_requests,
                 duration=limit, on_answer=on_answer)
    )
    after = system.snapshot(time.perf_counter(), _groups(server, llm))
    points.append(("end", _worker_rss(server)))
    figures = _figures(scenario, after.at - before.at, warmup)
    summarise(figures, result, (before.at, after.at), system.cpu_between(before, after))
    figures.worker_rss_mib = points[-1][1]
    figures.service_rss_mib, figures.service_pss_mib = _memory(server)
    figures.new_db_connections = database.sessions() - sessions
    figures.extra["requests"] = result.sent
    return Measured(figures, points, repeats=[figures])
