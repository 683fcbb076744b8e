"""The scenarios of `make bench` and how one is driven and measured."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

from bench import system
from bench.loadgen import run_load
from bench.servers import FakeLLMProcess, GunicornProcess
from bench.stats import Figures, summarise

SERVICE = "wsgi:app"
FORWARD = "bench.forward_app:app"
API_KEY = "bench-key"


@dataclass(frozen=True)
class Scenario:
    name: str
    app: str  # "service" or "forward"
    latency: float  # seconds the fake LLM takes per answer
    clients: int
    env: tuple[tuple[str, str], ...] = ()
    leak_requests: int = 0  # > 0: a leak run of that many requests instead of a timed one
    description: str = ""

    @property
    def module(self) -> str:
        return SERVICE if self.app == "service" else FORWARD

    def server_key(self) -> tuple:
        """Scenarios with the same key share one gunicorn (started once)."""
        return (self.app, self.latency, self.env)


PLAN = (
    Scenario("slow-20", "service", 0.5, 20, description="service overhead at light load"),
    Scenario("slow-50", "service", 0.5, 50, description="target 1"),
    Scenario("slow-200", "service", 0.5, 200, description="target 2"),
    Scenario("fwd-slow-50", "forward", 0.5, 50, description="floor for slow-50"),
    Scenario("fwd-slow-200", "forward", 0.5, 200, description="floor for slow-200"),
    Scenario("fast-50", "service", 0.0, 50, description="CPU-bound, target 3"),
    Scenario("leak", "service", 0.0, 50, leak_requests=20_000, description="RSS over 20k sends"),
    Scenario("fwd-fast-50", "forward", 0.0, 50, description="floor for fast-50"),
    Scenario(
        "fast-50-info", "service", 0.0, 50, env=(("LOG_LEVEL", "INFO"),),
        description="fast-50 with the per-request INFO log line",
    ),
)
PROFILE = Scenario("profile", "service", 0.0, 50, description="py-spy on the workers")


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
        # The per-request INFO line is measured on its own (fast-50-info).
        "LOG_LEVEL": "WARNING",
    }


@dataclass
class Measured:
    figures: Figures
    rss_points: list[tuple[str, list[float]]] = field(default_factory=list)


def _groups(server: GunicornProcess, llm: FakeLLMProcess) -> dict[str, list[int]]:
    return {
        # Each worker on its own too: keep-alive connections stick to the worker
        # that accepted them, and an uneven split caps throughput.
        **{f"worker:{pid}": [pid] for pid in server.workers()},
        "service": server.pids(),
        "postgres": system.postgres_pids(server.env["DATABASE_URL"].rsplit("/", 1)[1]),
        "fake_llm": [llm.process.pid],
        "loadgen": [os.getpid()],
    }


def _worker_rss(server: GunicornProcess) -> list[float]:
    return [system.rss_mib(pid) for pid in server.workers()]


async def _timed(scenario, server, llm, database, warmup, duration, first_id):
    """Closed loop for warmup + duration; CPU snapshots bracket the window."""
    host, port = "127.0.0.1", server.port
    start = time.perf_counter()
    window = (start + warmup, start + warmup + duration)
    snapshots = []
    sessions = []

    async def sampler():
        for moment in window:
            await asyncio.sleep(max(0.0, moment - time.perf_counter()))
            snapshots.append(system.snapshot(time.perf_counter(), _groups(server, llm)))
            sessions.append(database.sessions())

    sampling = asyncio.create_task(sampler())
    result = await run_load(
        host, port, API_KEY, scenario.clients, first_id=first_id, duration=warmup + duration
    )
    await sampling
    cpu = system.cpu_between(snapshots[0], snapshots[1])
    window = (snapshots[0].at, snapshots[1].at)
    return result, window, cpu, sessions[1] - sessions[0]


def run_timed(scenario, server, llm, database, warmup, duration, first_id) -> Measured:
    result, window, cpu, new_sessions = asyncio.run(
        _timed(scenario, server, llm, database, warmup, duration, first_id)
    )
    figures = Figures(
        scenario.name, scenario.app, scenario.latency * 1000, scenario.clients,
        window[1] - window[0],
    )
    summarise(figures, result, window, cpu)
    figures.worker_rss_mib = _worker_rss(server)
    figures.new_db_connections = new_sessions
    return Measured(figures)


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
    figures = Figures(
        scenario.name, scenario.app, scenario.latency * 1000, scenario.clients, after.at - before.at
    )
    summarise(figures, result, (before.at, after.at), system.cpu_between(before, after))
    figures.worker_rss_mib = points[-1][1]
    figures.new_db_connections = database.sessions() - sessions
    figures.extra["requests"] = result.sent
    return Measured(figures, points)
