"""Single-thread CPU of one send and of its database work, against the
forward-only floor (`make bench` puts the table in RESULTS.md; alone:
``python -m bench.run --scenario whatif``).

One thread, in-process, CPU time of this process only (time.process_time): no
GIL contention and hardly any effect of other load on the machine, so small
differences are visible. The fake LLM runs in its own process and does not
count.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from bench import scenarios
from bench.loadgen import MESSAGE

ANSWER = "Ответ: " + MESSAGE


@dataclass
class Cost:
    label: str
    cpu_ms: float | None
    wall_ms: float | None
    note: str = ""


def _compare(candidates: list[tuple[str, object, str]], iterations: int, rounds: int = 5):
    """Time the candidates in interleaved batches; keep each one's fastest batch.

    Other work on the machine only ever adds time, so the fastest of several
    interleaved batches is the figure least disturbed by it.
    """
    best: dict[str, tuple[float, float]] = {}
    failed: dict[str, str] = {}
    batch = max(1, iterations // rounds)
    for label, action, _ in candidates:  # warm-up: connections, caches, compiled SQL
        try:
            for _ in range(max(10, batch // 5)):
                action()
        except Exception as error:  # the service changed shape: say so, keep the rest
            failed[label] = f"failed: {type(error).__name__}: {error}"[:200]
    for _ in range(rounds):
        for label, action, _ in candidates:
            if label in failed:
                continue
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(batch):
                action()
            figures = ((time.process_time() - cpu) / batch * 1000,
                       (time.perf_counter() - wall) / batch * 1000)
            if label not in best or figures[0] < best[label][0]:
                best[label] = figures
    return [
        Cost(label, *best[label], note) if label in best else Cost(label, None, None,
                                                                     failed[label])
        for label, _, note in candidates
    ]


def _ok(response) -> None:
    if response.status_code != 200:
        raise RuntimeError(f"answered {response.status_code}")


def _send_costs(database_url: str, llm_url: str, iterations: int) -> list[Cost]:
    from werkzeug.test import Client

    from app import create_app, metrics

    service = create_app(scenarios.service_env(database_url, llm_url)).test_client()
    os.environ["OPENAI_BASE_URL"] = llm_url
    from bench import forward_app

    forward = Client(forward_app.app)
    ids = itertools.count(1)

    def body() -> str:
        return json.dumps({"telegram_id": next(ids), "message": MESSAGE})

    def metric_updates():
        # What one answered send records (app/metrics.py, app/llm.py, service).
        metrics.HTTP_REQUESTS.labels("/v1/chat/send", "POST", "200").inc()
        metrics.HTTP_DURATION.labels("/v1/chat/send", "POST").observe(0.5)
        for phase in ("quota", "context", "llm", "save", "total"):
            metrics.PHASE_DURATION.labels(phase).observe(0.001)
        metrics.LLM_REQUESTS.labels("gpt-4o-mini", "openai", "ok").inc()
        metrics.LLM_DURATION.labels("gpt-4o-mini", "openai").observe(0.5)
        metrics.LLM_TOKENS.labels("gpt-4o-mini", "openai").inc(100)
        metrics.QUOTA_RESERVATIONS.inc()

    return _compare([
        ("one send through Flask, LOG_LEVEL=INFO",
         lambda: _ok(service.post("/v1/chat/send", data=body(),
                                  headers={"X-API-KEY": scenarios.API_KEY})),
         "new user; includes the openai SDK call and the request log line (to /dev/null)"),
        ("one send through the forward-only app",
         lambda: _ok(forward.post("/v1/chat/send", data=body())),
         "the floor: JSON in, the openai client's post (as the service), JSON out"),
        ("GET /health through Flask", lambda: _ok(service.get("/health")),
         "framework + request hooks (id, metrics, log), no I/O"),
        ("the 11 metric updates of one send", metric_updates,
         "prometheus_client multiprocess mode (mmap files), as under gunicorn"),
    ], iterations)


def _database_costs(database_url: str, llm_url: str, iterations: int) -> list[Cost]:
    from decimal import Decimal

    from app import create_app, sql
    from app.chat import memory, quota, records

    app = create_app(scenarios.service_env(database_url, llm_url))
    ids = itertools.count(10_000_000)
    with app.app_context():
        config = app.config
        day = quota.Day(now=datetime.now(UTC), timezone=config["TIMEZONE"])

        # As a send at the defaults asks: no spend cap, the memory read with it.
        limits = quota.Limits(config["DAILY_LIMIT"], config["DAILY_SPEND_LIMIT"], Decimal(0))
        fold = memory.fold_offset(config) if config["SUMMARY_ENABLED"] else None

        def reserve():
            with sql.connection() as conn:
                quota.reserve(conn, next(ids), day, limits, config["CONTEXT_MESSAGES"], fold)

        def save():
            values = {"telegram_id": next(ids), "user_id": None, "message": MESSAGE,
                      "response": ANSWER, "tokens_used": 100, "request_date": day.today,
                      "created_at": day.now, "model": "gpt-4o-mini", "tools": "",
                      "prompt_tokens": 60, "completion_tokens": 40, "cost": None}
            call = records.Call("answer", "gpt-4o-mini", 60, 40, None)
            with sql.connection() as conn:
                records.save_answer(conn, values, [call], Decimal(0))

        try:
            return _compare([
                ("reservation + context read", reserve,
                 "app/chat/quota.py reserve(): one statement on a pooled DBAPI connection "
                 "= 1 round trip"),
                ("save", save, "records.SAVE: the exchange, its model call and the day's "
                 "spend in one statement = 1 round trip"),
            ], iterations)
        finally:
            from app.extensions import db

            db.engine.dispose()


def run(database_url: str, llm_url: str, iterations: int = 1000) -> list[Cost]:
    # Metrics as under gunicorn: prometheus_client reads this at its first import.
    owned = None
    if "prometheus_client" not in sys.modules and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        owned = tempfile.mkdtemp(prefix="bench-whatif-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = owned
    try:
        # The service's default LOG_LEVEL=INFO writes a line per request to
        # stdout: it costs its formatting and write here too, but not the console.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            return (_send_costs(database_url, llm_url, iterations)
                    + _database_costs(database_url, llm_url, iterations))
    finally:
        if owned:
            # Children started later (bench/indexes.py) must not inherit a
            # directory that is gone.
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(owned, ignore_errors=True)


def table(costs: list[Cost]) -> list[str]:
    lines = ["| what | CPU ms | wall ms | note |", "|---|--:|--:|---|"]
    for cost in costs:
        cpu = "–" if cost.cpu_ms is None else f"{cost.cpu_ms:.3f}"
        wall = "–" if cost.wall_ms is None else f"{cost.wall_ms:.3f}"
        lines.append(f"| {cost.label} | {cpu} | {wall} | {cost.note} |")
    return lines
