"""The processes a benchmark run needs: its own PostgreSQL database, the fake LLM
and gunicorn (the service or the forward-only app) under the real
gunicorn.conf.py. Starting and stopping is tests/servers.py's, bounded in time."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from contextlib import closing
from pathlib import Path

import psycopg2

from bench import system
from tests.servers import ROOT, VENV_BIN, Gunicorn, free_port, wait_until_up

ADMIN_DSN = os.environ.get("BENCH_POSTGRES_DSN", "host=127.0.0.1 port=5432 user=postgres")
TABLES = ("ai_chat_idempotency_keys", "ai_chat_requests", "ai_chat_daily_limits")


class FakeLLMProcess:
    """``python -m tests.fake_llm`` in its own process: no GIL shared with the load."""

    def __init__(self, latency: float, log_dir: Path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        with open(log_dir / f"fake-llm-{latency:g}.log", "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.fake_llm", "--port", str(port),
                 "--latency", str(latency)],
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


def _admin(statement: str, params: tuple = (), dbname: str = "postgres"):
    """One statement as the admin user, in autocommit; its first row, if it returns rows."""
    with closing(psycopg2.connect(f"{ADMIN_DSN} dbname={dbname}")) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchone() if cursor.description else None


def max_connections() -> int:
    return int(_admin("SHOW max_connections")[0])


class BenchDatabase:
    """A throwaway PostgreSQL database, migrated with ``flask db upgrade``."""

    def __init__(self):
        self.name = f"ai_chat_bench_{uuid.uuid4().hex[:10]}"
        parts = dict(item.split("=", 1) for item in ADMIN_DSN.split())
        self.url = (
            f"postgresql://{parts.get('user', 'postgres')}@{parts.get('host', '127.0.0.1')}:"
            f"{parts.get('port', '5432')}/{self.name}"
        )
        _admin(f'CREATE DATABASE "{self.name}"')
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

    def truncate(self) -> None:
        """Every scenario starts from empty tables."""
        _admin(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE", dbname=self.name)

    def sessions(self) -> int:
        """Connections ever opened to this database (pg_stat_database.sessions, PG >= 14)."""
        try:
            row = _admin("SELECT sessions FROM pg_stat_database WHERE datname = %s", (self.name,))
        except psycopg2.Error:
            return 0
        return int(row[0]) if row and row[0] is not None else 0

    def drop(self) -> None:
        _admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
