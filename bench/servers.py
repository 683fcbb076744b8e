"""The processes a benchmark run needs: its own PostgreSQL database, the fake LLM
and gunicorn (the service or the forward-only app) under the real
gunicorn.conf.py. Starting and stopping is tests/servers.py's, bounded in time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Upstream:
    """How the fake LLM answers: the whole answer after ``latency`` seconds, or,
    streamed, the first piece after ``latency`` and ``pieces`` pieces in all,
    ``chunk_delay`` seconds apart (tests/fake_llm.py)."""

    latency: float
    pieces: int | None = None
    chunk_delay: float = 0.0
    answer_chars: int | None = None

    @property
    def answer_s(self) -> float:
        """Seconds from the model's start to its last piece."""
        return self.latency + ((self.pieces or 1) - 1) * self.chunk_delay

    @property
    def label(self) -> str:
        if self.pieces is None:
            return f"{self.latency:g}"
        return f"{self.latency:g}-{self.pieces}x{self.chunk_delay:g}"

    def arguments(self) -> list[str]:
        arguments = ["--latency", str(self.latency)]
        if self.pieces is not None:
            arguments += ["--stream-pieces", str(self.pieces),
                          "--chunk-delay", str(self.chunk_delay)]
        if self.answer_chars is not None:
            arguments += ["--answer-chars", str(self.answer_chars)]
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
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class GunicornProcess(Gunicorn):
    """tests.servers.Gunicorn serving ``module`` (the service or the forward-only app)."""

    def __init__(self, module: str, env: dict, gunicorn: dict, log_dir: Path, name: str):
        # ``gunicorn``: the run's settings as gunicorn.conf.py reads them (report.settings),
        # not the tests' small default sizing.
        super().__init__(env, workers=gunicorn["workers"], threads=gunicorn["threads"])
        self.command[-1] = module  # in place of the tests' fixed wsgi:app
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

    def sessions(self) -> int:
        """Connections ever opened to this database (pg_stat_database.sessions, PG >= 14)."""
        try:
            row = admin("SELECT sessions FROM pg_stat_database WHERE datname = %s", (self.name,))
        except psycopg2.Error:
            return 0
        return int(row[0]) if row and row[0] is not None else 0

    def drop(self) -> None:
        admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
