"""Single-thread CPU of one send and of its database work: what the service does
today against what a leaner hot path would cost (`make bench` puts the table in
RESULTS.md; alone: ``python -m bench.run --scenario whatif``).

One thread, in-process, CPU time of this process only (time.process_time): no
GIL contention and hardly any effect of other load on the machine, so small
differences are visible. The fake LLM runs in its own process and does not
count. The "proposed" rows are SQL the service does not run (yet); they exist
to put a number on the recommendations in RESULTS.md.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import text

from bench import scenarios
from bench.loadgen import MESSAGE

ANSWER = "Ответ: " + MESSAGE

# Proposed: the reservation and the context read in one statement. The reserve
# part is the service's own statement (app/chat/quota.py), wrapped in a CTE.
_CONTEXT_JOIN = """
SELECT r.request_count, c.message, c.response
FROM reserved AS r
LEFT JOIN LATERAL (
    SELECT message, response, id FROM ai_chat_requests
    WHERE telegram_id = :telegram_id ORDER BY id DESC LIMIT :count
) AS c ON true
ORDER BY c.id
"""


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
        metrics.LLM_REQUESTS.labels("ok").inc()
        metrics.LLM_DURATION.observe(0.5)
        metrics.LLM_TOKENS.inc(100)
        metrics.QUOTA_RESERVATIONS.inc()

    return _compare([
        ("one send through Flask, LOG_LEVEL=WARNING",
         lambda: _ok(service.post("/v1/chat/send", data=body(),
                                  headers={"X-API-KEY": scenarios.API_KEY})),
         "new user; includes the openai SDK call"),
        ("one send through the forward-only app",
         lambda: _ok(forward.post("/v1/chat/send", data=body())),
         "the floor: JSON in, openai SDK call, JSON out"),
        ("GET /health through Flask", lambda: _ok(service.get("/health")),
         "framework + request hooks (id, metrics, log), no I/O"),
        ("the 11 metric updates of one send", metric_updates,
         "prometheus_client multiprocess mode (mmap files), as under gunicorn"),
    ], iterations)


def _database_costs(database_url: str, llm_url: str, iterations: int) -> list[Cost]:
    from app import create_app
    from app.chat import quota, send
    from app.chat.quota import Day
    from app.extensions import db
    from app.llm import Completion

    app = create_app(scenarios.service_env(database_url, llm_url))
    ids = itertools.count(10_000_000)
    with app.app_context():
        day = Day(now=datetime.now(UTC), timezone=app.config["TIMEZONE"])
        context_count = app.config["CONTEXT_MESSAGES"]
        autocommit = db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

        def reserve_and_context_now():
            telegram_id = next(ids)
            quota.reserve_quota(telegram_id, day, 0)
            send.recent_exchanges(telegram_id, context_count)
            db.session.commit()

        completion = Completion(text=ANSWER, tokens=100)

        def save_now():
            command = send.SendCommand(telegram_id=next(ids), message=MESSAGE)
            send._save(command, completion, day, None)
            db.session.commit()

        # Built on the service's own reserve statement, so it follows changes there.
        combined = text(f"WITH reserved AS ({quota._RESERVE.text}) {_CONTEXT_JOIN}")
        combined = combined.bindparams(*quota._DATE_PARAMS)

        def reserve_and_context_proposed():
            autocommit.execute(combined, {
                "telegram_id": next(ids), "today": day.today, "now": day.now,
                "cap": quota.UNLIMITED_CAP, "count": context_count,
            }).all()

        try:
            return _compare([
                ("reserve + context read, as today", reserve_and_context_now,
                 "autocommit session: INSERT … ON CONFLICT, SELECT = 2 round trips"),
                ("reserve + context read, proposed", reserve_and_context_proposed,
                 "one CTE statement (PostgreSQL only) = 1 round trip"),
                ("save, as today", save_now,
                 "one INSERT in autocommit mode = 1 round trip"),
            ], iterations)
        finally:
            autocommit.close()
            db.session.remove()
            db.engine.dispose()


def run(database_url: str, llm_url: str, iterations: int = 1000) -> list[Cost]:
    # Metrics as under gunicorn: prometheus_client reads this at its first import.
    owned = None
    if "prometheus_client" not in sys.modules and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        owned = tempfile.mkdtemp(prefix="bench-whatif-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = owned
    try:
        return (_send_costs(database_url, llm_url, iterations)
                + _database_costs(database_url, llm_url, iterations))
    finally:
        if owned:
            shutil.rmtree(owned, ignore_errors=True)


def table(costs: list[Cost]) -> list[str]:
    lines = ["| what | CPU ms | wall ms | note |", "|---|--:|--:|---|"]
    for cost in costs:
        cpu = "–" if cost.cpu_ms is None else f"{cost.cpu_ms:.3f}"
        wall = "–" if cost.wall_ms is None else f"{cost.wall_ms:.3f}"
        lines.append(f"| {cost.label} | {cpu} | {wall} | {cost.note} |")
    return lines
