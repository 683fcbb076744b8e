"""A throwaway Redis that a test may kill, pause, restart empty or flush.

The shared Redis on 6379 must never go down (or lose keys) under other
tests, so a fault test runs its own ``redis-server``: a free loopback port
(and a unix socket) in a temp directory, nothing persisted (``--save ""``,
no AOF), so a restart on the same port comes back empty, like a crashed cache.
``pause()`` stops the process (SIGSTOP): the kernel still accepts connections,
but nothing answers — a Redis slower than any timeout.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.servers import free_port

REDIS_SERVER = "/usr/bin/redis-server"


def unavailable_reason() -> str | None:
    """Why a throwaway Redis cannot be started here, or None when it can."""
    if shutil.which(REDIS_SERVER) is None:
        return f"{REDIS_SERVER} is not installed"
    return None


class RedisServer:
    """``with RedisServer() as server: server.url; server.kill(); server.restart()``."""

    def __init__(self):
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="ai-chat-redis-"))
        self.socket_path = self.directory / "redis.sock"
        self.log_path = self.directory / "redis.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (again) on the same port, empty; returns once it answers PING."""
        self.process = subprocess.Popen(
            [
                REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
                "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                "--logfile", str(self.log_path), "--daemonize", "no",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n"
                                   f"{self.log()}")
            try:
                with self.client() as client:
                    client.ping()
                return self
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer:\n{self.log()}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """A clean shutdown (SIGTERM); nothing is saved."""
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        """Like a crash: SIGKILL; every connection is reset."""
        self._signal_and_wait(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: connections still open, nothing answers until ``resume``."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Killed and started again on the same port: empty, scripts forgotten."""
        self.kill()
        self.start()

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        """A plain client for the test's own checks (use it in ``with``). RESP2,
        so that it sends no HELLO: a HELLO counted by ``commands_received``
        is a Cache's connection (redis-py's default, RESP3, opens with one)."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2,
            decode_responses=True, protocol=2,
        )

    def command_calls(self, command: str) -> int:
        """How often ``command`` (e.g. ``evalsha``) ran since the start
        (``INFO commandstats``; this check's own INFO is not counted in it)."""
        with self.client() as client:
            stats = client.info("commandstats")
        return int(stats.get(f"cmdstat_{command.lower()}", {}).get("calls", 0))

    def commands_received(self) -> int:
        """How many commands ran since the start, this check's own left out
        (its INFO and the CLIENT SETINFO of ``client``'s handshake). Commands
        sent to a paused server run, and are counted, once it is resumed."""
        with self.client() as client:
            stats = client.info("commandstats")
        own = {"cmdstat_info", "cmdstat_client|setinfo"}
        return sum(int(entry["calls"]) for name, entry in stats.items() if name not in own)

    def connected_clients(self) -> list[dict]:
        with self.client() as client:
            return [entry for entry in client.client_list() if entry.get("cmd") != "client|list"]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def remove(self) -> None:
        """Kill the server if it runs and delete its directory."""
        try:
            if self.running():
                self.kill()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _signal_and_wait(self, signum: int) -> None:
        if not self.running():
            return
        # A stopped process only acts on SIGKILL: let it run to see SIGTERM.
        self.process.send_signal(signal.SIGCONT)
        self.process.send_signal(signum)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, *exc) -> None:
        self.remove()
