"""A throwaway PostgreSQL cluster that a test can stop and start at will.

The shared test server on 5432 must never go down under other tests, so an
outage test runs its own cluster: ``initdb`` into a temp dir owned by the
``postgres`` OS user, started with ``pg_ctl`` on a free loopback port (trust
auth, socket in the temp dir), stopped and restarted on the same port, and
removed at the end. Needs root (to act as ``postgres``) and the server
binaries under /usr/lib/postgresql/<version>/bin.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg2

from tests.servers import free_port

OS_USER = "postgres"


def server_bin_dir() -> Path | None:
    """The newest installed PostgreSQL server's bin directory, if any."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    return Path(max(found, key=version)).parent


def unavailable_reason() -> str | None:
    """Why a throwaway cluster cannot be made here, or None when it can."""
    if server_bin_dir() is None:
        return "PostgreSQL server binaries (initdb) are not installed"
    if os.geteuid() != 0:
        return "a throwaway cluster needs root to run initdb as the postgres user"
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        return f"there is no {OS_USER!r} OS user"
    if shutil.which("runuser") is None:
        return "runuser is not installed"
    return None


class PgCluster:
    """``with PgCluster() as cluster: cluster.url(...); cluster.stop(); cluster.start()``."""

    def __init__(self, database: str = "ai_chat"):
        self.bin_dir = server_bin_dir()
        self.port = free_port()
        self.database = database
        self.directory = Path(tempfile.mkdtemp(prefix="ai-chat-pg-"))
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        account = pwd.getpwnam(OS_USER)
        os.chown(self.directory, account.pw_uid, account.pw_gid)
        self.directory.chmod(0o700)
        self._initialised = False

    def _run(self, *command: str, timeout: float = 60) -> None:
        result = subprocess.run(
            ["runuser", "-u", OS_USER, "--", *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.directory,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n{self.log()}"
            )

    def _pg_ctl(self, *args: str) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args)

    def create(self) -> PgCluster:
        """initdb, start, and create the database."""
        self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data_dir),
            "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync",
        )
        self._initialised = True
        self.start()
        connection = psycopg2.connect(self.dsn("postgres"))
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            connection.close()
        return self

    def start(self) -> None:
        """Start (again) on the same port; returns once it accepts connections."""
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.directory} -c fsync=off"
        )
        self._pg_ctl("-l", str(self.log_path), "-o", options, "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean) or ``immediate`` (like a crash)."""
        self._pg_ctl("-m", mode, "-w", "-t", "30", "stop")

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def remove(self) -> None:
        """Stop the server if it runs and delete every file of the cluster."""
        try:
            if self._initialised and self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def dsn(self, database: str | None = None) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database or self.database}"

    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> PgCluster:
        try:
            return self.create()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, *exc) -> None:
        self.remove()
