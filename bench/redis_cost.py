"""What Redis costs and saves per answer of a returning user, single-threaded.

``python -m bench.redis_cost``: a scratch database with returning users
(10 exchanges and a summary each, bench/servers.py ``load_users``), the fake
model in its own process, and the app in this process, once with ``REDIS_URL``
unset and once set with limits and contexts in Redis (``REDIS_USER_CACHE``;
the machine's Redis, a key prefix of its own, deleted afterwards). Sends of
those users through the Flask test client, in interleaved batches, CPU of
this process only (time.process_time), fastest batch kept as in
bench/whatif.py; and each Redis call of a send by itself.
PostgreSQL's CPU per send is read from /proc over the same batches (its
backends for the scratch database), so both sides of the trade are shown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from bench import system
from bench.scenarios import API_KEY, FAST
from bench.servers import BenchDatabase, FakeLLMProcess, RedisKeys

USERS = 400
ROUNDS = 5


def _app(database_url: str, llm_url: str, redis_prefix: str | None):
    from app import create_app

    env = {"API_SECRET_KEY": API_KEY, "DATABASE_URL": database_url, "OPENAI_BASE_URL": llm_url,
           "OPENAI_API_KEY": "", "DAILY_LIMIT": "1000000", "LOG_LEVEL": "WARNING",
           "USER_CONTEXT_URL": ""}
    if redis_prefix:
        env.update(REDIS_URL=RedisKeys.URL, REDIS_PREFIX=redis_prefix, REDIS_USER_CACHE="true")
    return create_app(env)


def run(batch: int = 200) -> list[tuple[str, float, float, str]]:
    """Rows of (what, CPU ms of this process, PostgreSQL CPU ms, note)."""
    os.environ.setdefault("AI_CHAT_ENV_FILE", os.devnull)
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    database = BenchDatabase()
    llm = FakeLLMProcess(FAST, out)
    redis = RedisKeys(f"ai_chat_bench_{uuid.uuid4().hex[:10]}:")
    try:
        today = datetime.now(ZoneInfo("Europe/Moscow")).date()
        database.load_users(1, USERS, 10, 0.0, 30, today)
        apps = {"without Redis": _app(database.url, llm.url, None),
                "with Redis": _app(database.url, llm.url, redis.prefix)}
        clients = {label: app.test_client() for label, app in apps.items()}
        counters = {label: 0 for label in apps}

        def send(label):
            counters[label] += 1
            # Each app its own half of the users, so Redis's copies stay its own.
            offset = 0 if label == "without Redis" else USERS // 2
            user = 1 + offset + counters[label] % (USERS // 2)
            response = clients[label].post(
                "/v1/chat/send", json={"telegram_id": user, "message": "Что с продажами?"},
                headers={"X-API-KEY": API_KEY})
            if response.status_code != 200:
                raise RuntimeError(f"{label}: {response.status_code} {response.get_data(True)}")

        name = database.name
        best: dict[str, tuple[float, float]] = {}
        for label in apps:  # warm-up: connections, Redis's copies of every context
            for _ in range(USERS):
                send(label)
        for _ in range(ROUNDS):
            for label in apps:
                pids = system.postgres_pids(name)
                before_pg = sum(system.cpu_seconds(pid) for pid in pids)
                cpu = time.process_time()
                for _ in range(batch):
                    send(label)
                ours = (time.process_time() - cpu) / batch * 1000
                theirs = (sum(system.cpu_seconds(pid) for pid in pids) - before_pg) / batch * 1000
                if label not in best or ours < best[label][0]:
                    best[label] = (ours, theirs)
        rows = [(f"one send of a returning user, {label}", *best[label],
                 "5 past exchanges and a summary in the prompt; the fake model answers at once")
                for label in apps]
        rows += _calls(apps["with Redis"], batch)
        return rows
    finally:
        llm.stop()
        redis.clear()
        database.drop()


def _calls(app, batch: int) -> list[tuple[str, float, float, str]]:
    """Each Redis call a send makes, by itself (CPU of this process)."""
    cache = app.extensions["cache"]
    view = cache.read_user(1 + USERS // 2)
    exchange = (10**9, "Что с продажами?", "Ответ: " + "продажи растут, " * 10)
    calls = {
        "read_user (token, limits, context: one EVALSHA)": lambda: cache.read_user(1 + USERS // 2),
        "write_limits (one EVALSHA)": lambda: cache.write_limits(
            2 + USERS // 2, view.gen, {"day": "2030-01-01", "used": 1, "limit": 30}),
        "append_context (one EVALSHA)": lambda: cache.append_context(
            3 + USERS // 2, view.gen, exchange, 5),
    }
    rows = []
    for label, call in calls.items():
        fastest = None
        for _ in range(ROUNDS):
            cpu = time.process_time()
            for _ in range(batch):
                call()
            took = (time.process_time() - cpu) / batch * 1000
            fastest = took if fastest is None else min(fastest, took)
        rows.append((label, fastest, 0.0, "over loopback, hiredis parser"))
    return rows


def table(rows) -> list[str]:
    lines = ["| what | CPU ms (this process) | PostgreSQL CPU ms | note |", "|---|--:|--:|---|"]
    lines += [f"| {what} | {ours:.3f} | {theirs:.3f} | {note} |"
              for what, ours, theirs, note in rows]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_cost",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args(argv)
    print("\n".join(table(run(args.batch))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
