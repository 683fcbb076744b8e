"""The processes a benchmark run needs: its own PostgreSQL database, the fake LLM
(and, for the tools scenario, the fake main server) and gunicorn (the service
or the forward-only app) under the real gunicorn.conf.py, pinned to fewer
cores with a CPU burner beside it for the starved scenarios; and the run's
own key prefix on the machine's Redis. Starting and stopping is
tests/servers.py's, bounded in time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import psycopg2

from bench import system
from bench.loadgen import MESSAGE
from tests.servers import ROOT, VENV_BIN, Gunicorn, free_port, wait_until_up

ADMIN_DSN = os.environ.get("BENCH_POSTGRES_DSN", "host=127.0.0.1 port=5432 user=postgres")
TABLES = ("ai_chat_idempotency_keys", "ai_chat_requests", "ai_chat_daily_limits")
# A stored exchange of the loaded history: the bench's question and a
# 160-character answer (no semicolons: bench/ceiling.py puts these texts into
# pgbench scripts, where a semicolon ends a command).
HISTORY_MESSAGE = MESSAGE
HISTORY_RESPONSE = "Ответ: " + "поднимите рейтинг, ответьте на отзывы, " * 4
# A returning user's summary (bench's load_users): facts, about 600 characters.
HISTORY_SUMMARY = "- " + "\n- ".join([
    "Продаёт женскую одежду (футболки, худи) на Wildberries с 2023 года",
    "Склады: Коледино и Казань, работает по FBO",
    "Продажи около 300 заказов в неделю, средний чек 1500 рублей",
    "Цель: вывести худи в топ-100 по запросу «худи оверсайз» к сезону",
    "Пробовал автоматическую рекламу, ставка 250 рублей, доволен результатом наполовину",
    "Процент выкупа 72 %, основная причина возвратов — размер",
    "Договорились обновить таблицу размеров и главное фото карточки",
])
# Summaries cover all but the newest SUMMARY_OFFSET + (user % 5) exchanges.
SUMMARY_OFFSET = 5


@dataclass(frozen=True)
class Upstream:
    """How the fake LLM answers: the whole answer after ``latency`` seconds, or,
    streamed, the first piece after ``latency`` and ``pieces`` pieces in all,
    ``chunk_delay`` seconds apart (tests/fake_llm.py)."""

    latency: float
    pieces: int | None = None
    chunk_delay: float = 0.0
    answer_chars: int | None = None
    # Tools every request that offers tools is asked to call (tests/fake_llm.py
    # ``tools_forever``); a request without tools gets the default answer.
    tools: tuple[str, ...] = ()

    @property
    def answer_s(self) -> float:
        """Seconds from the model's start to its last piece."""
        return self.latency + ((self.pieces or 1) - 1) * self.chunk_delay

    @property
    def label(self) -> str:
        label = f"{self.latency:g}"
        if self.pieces is not None:
            label += f"-{self.pieces}x{self.chunk_delay:g}"
        return label + ("-tools" if self.tools else "")

    def arguments(self) -> list[str]:
        arguments = ["--latency", str(self.latency)]
        if self.pieces is not None:
            arguments += ["--stream-pieces", str(self.pieces),
                          "--chunk-delay", str(self.chunk_delay)]
        if self.answer_chars is not None:
            arguments += ["--answer-chars", str(self.answer_chars)]
        if self.tools:
            arguments += ["--tools-forever", ",".join(self.tools)]
        return arguments


class FakeLLMProcess:
    """``python -m tests.fake_llm`` in its own process: no GIL shared with the load.

    Its server takes a thread per connection and queues 1024 connections
    (tests/fake_llm.py), which a thousand concurrent model calls need.
    """

    def __init__(self, upstream: Upstream, log_dir: Path):
        port = free_port()
        self.upstream = upstream
        self.url = f"http://127.0.0.1:{port}/v1"
        with open(log_dir / f"fake-llm-{upstream.label}.log", "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.fake_llm", "--port", str(port),
                 *upstream.arguments()],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            wait_until_up(f"{self.url}/models", 15, self.process)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        _stop(self.process)


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Until something accepts connections on ``port`` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


class FakeMainServerProcess:
    """``python -m tests.fake_main_server`` in its own process, every answer
    ``delay`` seconds late, writing each request's times (``--timings``) when
    it stops: ``stop()`` returns them as (telegram_id, started, ended) on the
    clock of ``time.perf_counter()`` (CLOCK_MONOTONIC, shared by the
    machine's processes)."""

    def __init__(self, delay: float, log_dir: Path):
        from tests.fake_main_server import API_KEY, BASE_PATH

        port = free_port()
        self.delay = delay
        self.api_key = API_KEY
        self.url = f"http://127.0.0.1:{port}"
        self.base_path = BASE_PATH
        self.timings_path = log_dir / f"fake-main-server-{port}.timings"
        with open(log_dir / "fake-main-server.log", "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.fake_main_server", "--port", str(port),
                 "--delay", str(delay), "--timings", str(self.timings_path)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            _wait_for_port(port, self.process)
        except RuntimeError:
            _stop(self.process)
            raise

    def stop(self) -> list[tuple[int, float, float]]:
        _stop(self.process)
        timings = []
        if self.timings_path.exists():
            for line in self.timings_path.read_text().splitlines():
                telegram_id, started, ended = line.split()
                if telegram_id != "None":
                    timings.append((int(telegram_id), float(started), float(ended)))
            self.timings_path.unlink()
        return timings


class CpuBurner:
    """``count`` busy loops pinned to ``cpus`` (taskset), each a process in a
    session of its own: the starved scenarios' neighbour, taking the pinned
    core's time from whatever else runs there. Stopped by their own pids."""

    def __init__(self, cpus: str, count: int):
        self.processes = [
            subprocess.Popen(
                ["taskset", "-c", cpus, sys.executable, "-c", "while True: pass"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            for _ in range(count)
        ]

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


class RedisKeys:
    """The run's own key prefix on the machine's Redis (never FLUSHALL: other
    sessions use it); ``clear()`` deletes the prefix's keys (SCAN + UNLINK)."""

    URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

    def __init__(self, prefix: str):
        self.prefix = prefix

    def _client(self):
        import redis

        return redis.Redis.from_url(self.URL, socket_timeout=5)

    def available(self) -> bool:
        try:
            return bool(self._client().ping())
        except Exception:  # noqa: BLE001 - any failure means "no Redis for the bench"
            return False

    def count(self) -> int:
        return sum(1 for _ in self._client().scan_iter(match=f"{self.prefix}*", count=1000))

    def clear(self) -> int:
        client = self._client()
        deleted = 0
        batch = []
        for key in client.scan_iter(match=f"{self.prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += client.unlink(*batch)
                batch = []
        if batch:
            deleted += client.unlink(*batch)
        return deleted


class GunicornProcess(Gunicorn):
    """tests.servers.Gunicorn serving ``module`` (the service or the forward-only app),
    under ``taskset -c cpus`` when ``cpus`` is given (the master and every
    worker it forks stay on those cores)."""

    def __init__(self, module: str, env: dict, gunicorn: dict, log_dir: Path, name: str,
                 cpus: str | None = None):
        # ``gunicorn``: the run's settings as gunicorn.conf.py reads them (report.settings),
        # not the tests' small default sizing.
        super().__init__(env, workers=gunicorn["workers"], threads=gunicorn["threads"])
        self.command[-1] = module  # in place of the tests' fixed wsgi:app
        if cpus is not None:
            self.command[:0] = ["taskset", "-c", cpus]
        self.name = module
        self.log_path = log_dir / f"gunicorn-{name}.log"

    def workers(self) -> list[int]:
        """The master's children. All are up once a warm-up has run (preload_app forks
        them together), which is when the bench first asks."""
        return sorted(system.children(self.process.pid))

    def pids(self) -> list[int]:
        """The master and its current workers."""
        return [self.process.pid, *self.workers()]


def admin_connection(dbname: str = "postgres"):
    """A connection as the admin user, in autocommit (the caller closes it)."""
    connection = psycopg2.connect(f"{ADMIN_DSN} dbname={dbname}")
    connection.autocommit = True
    return connection


def admin(statement: str, params: tuple = (), dbname: str = "postgres"):
    """One statement as the admin user, in autocommit; its first row, if it returns rows."""
    with closing(admin_connection(dbname)) as connection, connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone() if cursor.description else None


def max_connections() -> int:
    return int(admin("SHOW max_connections")[0])


class BenchDatabase:
    """A throwaway PostgreSQL database, migrated with ``flask db upgrade``."""

    def __init__(self):
        self.name = f"ai_chat_bench_{uuid.uuid4().hex[:10]}"
        parts = dict(item.split("=", 1) for item in ADMIN_DSN.split())
        self.url = (
            f"postgresql://{parts.get('user', 'postgres')}@{parts.get('host', '127.0.0.1')}:"
            f"{parts.get('port', '5432')}/{self.name}"
        )
        admin(f'CREATE DATABASE "{self.name}"')
        # In a child: prometheus_client must not be imported here before whatif sets
        # PROMETHEUS_MULTIPROC_DIR.
        done = subprocess.run(
            [str(VENV_BIN / "flask"), "--app", "wsgi", "db", "upgrade"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={**os.environ, "DATABASE_URL": self.url, "API_SECRET_KEY": "bench",
                 "LOG_LEVEL": "WARNING"},
        )
        if done.returncode != 0:
            self.drop()
            raise RuntimeError(f"migration failed:\n{done.stdout}\n{done.stderr}")

    def load_history(self, rows: int, users: int, days: int) -> float:
        """``rows`` exchanges of users 1..``users`` (round robin, so a user's rows
        lie all over the table, as years of traffic leave them), created evenly
        over the last ``days`` days, oldest first (the lowest ids are the oldest
        rows, as in production); then VACUUM ANALYZE. Returns the seconds it took.

        The secondary indexes are dropped for the load and built again after
        it, by their own definitions (pg_indexes): about twice as fast as
        maintaining eight indexes row by row, and the result is the same.
        """
        started = time.perf_counter()
        with closing(admin_connection(self.name)) as connection, connection.cursor() as cursor:
            cursor.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = "
                "'ai_chat_requests' AND indexname <> 'ai_chat_requests_pkey'"
            )
            indexes = cursor.fetchall()
            for name, _ in indexes:
                cursor.execute(f'DROP INDEX "{name}"')
            cursor.execute("SET synchronous_commit = off")
            cursor.execute(
                f"""
                INSERT INTO ai_chat_requests (telegram_id, user_id, message, response,
                    tokens_used, request_date, created_at, model)
                SELECT n %% %(users)s + 1, NULL, %(message)s, %(response)s, 300,
                       (at AT TIME ZONE 'Europe/Moscow')::date, at, 'gpt-4o-mini'
                FROM generate_series(1, %(rows)s) AS n, LATERAL (
                    SELECT now() - interval '{int(days)} days'
                           + n * interval '{int(days)} days' / %(rows)s
                ) AS t(at)
                """,
                {"users": users, "rows": rows, "message": HISTORY_MESSAGE,
                 "response": HISTORY_RESPONSE},
            )
            for _, definition in indexes:
                cursor.execute(definition)
            cursor.execute("VACUUM ANALYZE")
        return time.perf_counter() - started

    def truncate(self) -> None:
        """Every scenario starts from empty tables."""
        admin(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE", dbname=self.name)

    def load_users(self, first_id: int, users: int, history: int, at_limit: float,
                   limit: int, today: date) -> float:
        """Returning users ``first_id`` … ``first_id + users - 1``: ``history``
        exchanges each (yesterday's, interleaved as real traffic leaves them),
        with a summary of the older ones (when there are 10 or more); an
        ``at_limit`` share of them, spread evenly over the pool (the load
        generator walks it in order), with a daily limit of their own
        (``limit``) already used up ``today``. Also empties the summaries and
        user settings a previous scenario left. Returns the seconds it took."""
        started = time.perf_counter()
        # User n is limited when n * at_limit crosses an integer: every 5th at 0.2.
        limited = [first_id + n for n in range(users)
                   if int((n + 1) * at_limit) > int(n * at_limit)]
        with closing(admin_connection(self.name)) as connection, connection.cursor() as cursor:
            cursor.execute("TRUNCATE ai_chat_summaries, ai_chat_user_settings")
            cursor.execute("SET synchronous_commit = off")
            if history:
                cursor.execute(
                    """
                    INSERT INTO ai_chat_requests (telegram_id, message, response,
                        tokens_used, request_date, created_at, model, tools)
                    SELECT %(first)s + n %% %(users)s, %(message)s, %(response)s, 300,
                           (now() - interval '1 day')::date,
                           now() - interval '1 day' + n * interval '1 millisecond',
                           'gpt-4o-mini', ''
                    FROM generate_series(0, %(rows)s - 1) AS n
                    """,
                    {"first": first_id, "users": users, "rows": users * history,
                     "message": HISTORY_MESSAGE, "response": HISTORY_RESPONSE},
                )
            if history >= SUMMARY_OFFSET + 5:
                # A summary of all but the newest 5 to 9 exchanges: a fold falls
                # due at a user's 1st to 5th answer (app/chat/memory.py
                # fold_offset), staggered over the users (user n: the
                # (n + 1) % 5 + 5 newest left out, so the users at their limit,
                # every 5th, are the ones whose fold would come last).
                cursor.execute(
                    """
                    INSERT INTO ai_chat_summaries (telegram_id, summary, covers_until,
                        failures, updated_at)
                    SELECT u, %(summary)s, (
                        SELECT id FROM ai_chat_requests WHERE telegram_id = u
                        ORDER BY id DESC OFFSET %(offset)s + (u - %(first)s + 1) %% 5 LIMIT 1),
                        0, now()
                    FROM generate_series(%(first)s, %(first)s + %(users)s - 1) AS u
                    """,
                    {"first": first_id, "users": users, "summary": HISTORY_SUMMARY,
                     "offset": SUMMARY_OFFSET},
                )
            if limited:
                cursor.execute(
                    """
                    INSERT INTO ai_chat_user_settings (telegram_id, daily_limit, updated_at)
                    SELECT u, %(limit)s, now() FROM unnest(%(limited)s::bigint[]) AS u
                    """,
                    {"limit": limit, "limited": limited},
                )
                cursor.execute(
                    """
                    INSERT INTO ai_chat_daily_limits (telegram_id, request_count,
                        last_reset_date, created_at, updated_at)
                    SELECT u, %(limit)s, %(today)s, now(), now()
                    FROM unnest(%(limited)s::bigint[]) AS u
                    """,
                    {"limit": limit, "limited": limited, "today": today},
                )
            cursor.execute("ANALYZE")
        return time.perf_counter() - started

    def count(self, statement: str, params: tuple = ()) -> int:
        """The first column of a one-row query on this database."""
        row = admin(statement, params, dbname=self.name)
        return int(row[0]) if row and row[0] is not None else 0

    def sessions(self) -> int:
        """Connections ever opened to this database (pg_stat_database.sessions, PG >= 14)."""
        try:
            row = admin("SELECT sessions FROM pg_stat_database WHERE datname = %s", (self.name,))
        except psycopg2.Error:
            return 0
        return int(row[0]) if row and row[0] is not None else 0

    def drop(self) -> None:
        admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
