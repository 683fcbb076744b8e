"""The processes a benchmark run needs: its own PostgreSQL database, the fake LLM
and gunicorn (the service or the forward-only app) under the real
gunicorn.conf.py. Every start and stop is bounded in time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg2

from bench import system

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ADMIN_DSN = os.environ.get("BENCH_POSTGRES_DSN", "host=127.0.0.1 port=5432 user=postgres")
TABLES = ("ai_chat_idempotency_keys", "ai_chat_requests", "ai_chat_daily_limits")
# Variables of an outer gunicorn (or a developer's shell) that would make the bench's
# servers share a metrics directory; gunicorn.conf.py makes a private one when unset.
_INHERITED = ("PROMETHEUS_MULTIPROC_DIR", "AI_CHAT_METRICS_TMPDIR", "AI_CHAT_METRICS_MASTER_PID")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, timeout: float, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {process.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


class _Process:
    """A child in its own session, stopped with SIGTERM and then SIGKILL."""

    process: subprocess.Popen | None = None

    def _spawn(self, argv: list[str], env: dict, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class FakeLLMProcess(_Process):
    """``python -m tests.fake_llm`` in its own process: no GIL shared with the load."""

    def __init__(self, latency: float, log_dir: Path):
        self.latency = latency
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._spawn(
            [sys.executable, "-m", "tests.fake_llm", "--port", str(self.port),
             "--latency", str(latency)],
            dict(os.environ),
            log_dir / f"fake-llm-{self.port}.log",
        )
        _wait_http(f"{self.url}/models", 15, self.process, self.log_path)


class GunicornProcess(_Process):
    """``gunicorn -c gunicorn.conf.py <module>`` on a free loopback port."""

    def __init__(self, module: str, env: dict, log_dir: Path, name: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {key: value for key, value in os.environ.items() if key not in _INHERITED}
        full_env.update({key: str(value) for key, value in env.items()})
        full_env["GUNICORN_BIND"] = f"127.0.0.1:{self.port}"
        if full_env.get("BENCH_SWITCH_INTERVAL"):
            hooks = str(Path(__file__).resolve().parent / "hooks")
            full_env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [hooks, full_env.get("PYTHONPATH")])
            )
        self.env = full_env
        self._spawn(
            [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py", module],
            full_env,
            log_dir / f"gunicorn-{name}-{self.port}.log",
        )
        _wait_http(f"{self.url}/health", 30, self.process, self.log_path)
        self.workers = self._wait_workers(int(full_env.get("WEB_CONCURRENCY", "2")))

    def _wait_workers(self, expected: int) -> list[int]:
        deadline = time.monotonic() + 15
        while True:
            workers = system.children(self.pid)
            if len(workers) >= expected or time.monotonic() > deadline:
                return workers
            time.sleep(0.1)

    def pids(self) -> list[int]:
        """The master and its current workers."""
        return [self.pid, *system.children(self.pid)]

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


class BenchDatabase:
    """A throwaway PostgreSQL database, migrated with ``flask db upgrade``."""

    def __init__(self):
        self.name = f"ai_chat_bench_{uuid.uuid4().hex[:10]}"
        parts = dict(item.split("=", 1) for item in ADMIN_DSN.split())
        self.url = (
            f"postgresql://{parts.get('user', 'postgres')}@{parts.get('host', '127.0.0.1')}:"
            f"{parts.get('port', '5432')}/{self.name}"
        )
        self._admin(f'CREATE DATABASE "{self.name}"')
        env = {key: value for key, value in os.environ.items() if key not in _INHERITED}
        env.update(DATABASE_URL=self.url, API_SECRET_KEY="bench", LOG_LEVEL="WARNING")
        done = subprocess.run(
            [str(VENV_BIN / "flask"), "--app", "wsgi", "db", "upgrade"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
        if done.returncode != 0:
            self.drop()
            raise RuntimeError(f"migration failed:\n{done.stdout}\n{done.stderr}")

    def _admin(self, statement: str, dbname: str = "postgres") -> None:
        connection = psycopg2.connect(f"{ADMIN_DSN} dbname={dbname}")
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    def truncate(self) -> None:
        """Every scenario starts from empty tables (and a vacuumed catalogue)."""
        self._admin(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE", self.name)

    def sessions(self) -> int:
        """Connections ever opened to this database (pg_stat_database.sessions, PG >= 14)."""
        connection = psycopg2.connect(f"{ADMIN_DSN} dbname=postgres")
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_stat_clear_snapshot()")
                cursor.execute(
                    "SELECT sessions FROM pg_stat_database WHERE datname = %s", (self.name,)
                )
                row = cursor.fetchone()
                return int(row[0]) if row and row[0] is not None else 0
        except psycopg2.Error:
            return 0
        finally:
            connection.close()

    def max_connections(self) -> int:
        connection = psycopg2.connect(f"{ADMIN_DSN} dbname=postgres")
        try:
            with connection.cursor() as cursor:
                cursor.execute("SHOW max_connections")
                return int(cursor.fetchone()[0])
        finally:
            connection.close()

    def drop(self) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
