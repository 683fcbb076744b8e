"""Real server processes for end-to-end tests: the service under gunicorn with
the project's gunicorn.conf.py, started on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


API_KEY = "test-key"


def post_send(base_url: str, telegram_id: int, message: str = "Как поднять продажи?"):
    """One send the way the bot does it; returns (status, JSON body)."""
    response = requests.post(
        f"{base_url}/v1/chat/send",
        json={"telegram_id": telegram_id, "message": message},
        headers={"X-API-KEY": API_KEY},
        timeout=30,
    )
    return response.status_code, response.json()


def request_log_lines(text: str) -> list[dict]:
    """The app's JSON request lines (logger ai_chat.request) in a log text."""
    lines = []
    for raw in text.splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("logger") == "ai_chat.request":
            lines.append(record)
    return lines


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, timeout: float = 20.0, process=None) -> None:
    """Poll ``url`` until it answers 200 (bounded), or fail with the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


class Gunicorn:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` with env overrides.

    Usage: ``with Gunicorn(env, workers=2, threads=20) as server: server.url``.
    Output goes to ``log_path`` (read it with ``server.log()``).
    """

    def __init__(self, env: dict, *, workers: int = 1, threads: int = 16, log_dir=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "GUNICORN_BIND": f"127.0.0.1:{self.port}",
            "WEB_CONCURRENCY": str(workers),
            "GUNICORN_THREADS": str(threads),
            "LOG_LEVEL": "WARNING",
            **{key: str(value) for key, value in env.items()},
        }
        # A private metrics directory per server, made by gunicorn.conf.py.
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.env.pop("AI_CHAT_METRICS_TMPDIR", None)
        self.env.pop("AI_CHAT_METRICS_MASTER_PID", None)
        log_dir = Path(log_dir or "/tmp")
        self.log_path = log_dir / f"gunicorn-{self.port}.log"
        self.process = None

    def start(self, timeout: float = 30.0) -> Gunicorn:
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until_up(f"{self.url}/health", timeout, self.process)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"gunicorn failed to start:\n{self.log()}") from None
        return self

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if getattr(self, "_log_file", None):
            self._log_file.close()
            self._log_file = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
