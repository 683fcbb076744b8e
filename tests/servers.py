"""Real server processes for end-to-end tests: any server as a child process
(``ServerProcess``), the service under gunicorn with the project's
gunicorn.conf.py (``Gunicorn``) on a free loopback port, and the bot's sends
over real HTTP (``post_send``, ``send_all_at_once``); and the loop of a fake
server run as a process of its own (``serve_until_signalled``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

API_KEY = "test-key"


def post_send(
    base_url: str,
    telegram_id: int,
    message: str = "Как поднять продажи?",
    *,
    headers: dict | None = None,
    **fields,
) -> tuple[int, dict]:
    """One send the way the bot does it; returns (status, JSON body)."""
    response = requests.post(
        f"{base_url}/v1/chat/send",
        json={"telegram_id": telegram_id, "message": message, **fields},
        headers={"X-API-KEY": API_KEY, **(headers or {})},
        timeout=30,
    )
    return response.status_code, response.json()


def send_all_at_once(targets: list[tuple[str, int]], **fields) -> list[tuple[int, dict]]:
    """One send per (base URL, telegram_id), all released by one barrier;
    ``fields`` go into every body. Returns (status, JSON body) in order."""
    barrier = threading.Barrier(len(targets))

    def one(target):
        base_url, telegram_id = target
        barrier.wait(timeout=30)
        return post_send(base_url, telegram_id, **fields)

    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        return list(pool.map(one, targets))


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


def poll_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last verdict."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


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


def serve_until_signalled(fake, banner: str) -> None:
    """Start ``fake`` (a fake server with start() and stop()), print
    ``banner`` and serve until SIGINT or SIGTERM, then stop it."""
    # A plain flag rather than threading.Event: Event.set() inside a signal
    # handler can deadlock if the signal lands while wait() holds its lock.
    stop_requested: list[int] = []

    def _on_signal(signum, frame) -> None:
        stop_requested.append(signum)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    fake.start()
    print(banner, flush=True)
    try:
        while not stop_requested:
            time.sleep(0.2)
    finally:
        fake.stop()


class ServerProcess:
    """A server run as a child process in a session of its own, with its output
    in ``log_path``; ``start()`` returns once ``<url>/health`` answers 200.

    Usage: ``with ServerProcess(command, port=port, log_path=path) as server: server.url``.
    """

    def __init__(
        self, command: list[str], *, port: int, log_path: Path, cwd=None, env=None,
        name: str = "server",
    ):
        self.command = command
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = env
        self.name = name
        self.process = None
        self._log_file = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until_up(f"{self.url}/health", timeout, self.process)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"{self.name} failed to start:\n{self.log()}") from None
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL to the whole session if it does not exit in time."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Gunicorn(ServerProcess):
    """``gunicorn -c gunicorn.conf.py wsgi:app`` with env overrides.

    Usage: ``with Gunicorn(env, workers=2, threads=20) as server: server.url``.
    Output goes to ``log_path`` (read it with ``server.log()``); ``server.env``
    may still be changed before the start.
    """

    def __init__(self, env: dict, *, workers: int = 1, threads: int = 16, log_dir=None):
        port = free_port()
        super().__init__(
            [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
            port=port,
            log_path=Path(log_dir or "/tmp") / f"gunicorn-{port}.log",
            cwd=ROOT,
            env={
                **os.environ,
                "GUNICORN_BIND": f"127.0.0.1:{port}",
                "WEB_CONCURRENCY": str(workers),
                "GUNICORN_THREADS": str(threads),
                "LOG_LEVEL": "WARNING",
                **{key: str(value) for key, value in env.items()},
            },
            name="gunicorn",
        )
        # A private metrics directory per server, made by gunicorn.conf.py.
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.env.pop("AI_CHAT_METRICS_TMPDIR", None)
        self.env.pop("AI_CHAT_METRICS_MASTER_PID", None)
