"""A throwaway PgBouncer in transaction pooling mode in front of the shared server.

Production may put PgBouncer between the instances and PostgreSQL, so that
many workers × pool slots share a few server connections. A test runs its own:
pgbouncer.ini and a userlist in a temp dir owned by the ``postgres`` OS user
(pgbouncer refuses to run as root), ``pgbouncer`` in the foreground as that
user on a free loopback port, stopped and removed at the end. Needs root (to
act as ``postgres``) and the ``pgbouncer`` binary (Debian package ``pgbouncer``;
``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import closing
from pathlib import Path

import psycopg2

from tests.servers import free_port

OS_USER = "postgres"
# Where the server pools connect: the shared test server (see tests/conftest.py).
UPSTREAM = "host=127.0.0.1 port=5432"
ADMIN_DATABASE = "pgbouncer"


def binary() -> str | None:
    """The pgbouncer executable: on PATH, or where Debian puts it (/usr/sbin is
    not on a non-root PATH)."""
    found = shutil.which("pgbouncer")
    if found is None and os.access("/usr/sbin/pgbouncer", os.X_OK):
        found = "/usr/sbin/pgbouncer"
    return found


def unavailable_reason() -> str | None:
    """Why a throwaway PgBouncer cannot be run here, or None when it can."""
    if binary() is None:
        return "pgbouncer is not installed (Debian package pgbouncer)"
    if os.geteuid() != 0:
        return "a throwaway PgBouncer needs root to run as the postgres user"
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        return f"there is no {OS_USER!r} OS user"
    return None


def _quote(value: str) -> str:
    # A [databases] entry is libpq-style key=value pairs; single quotes keep the
    # spaces of e.g. a connect_query. Nothing here needs a quote inside a value.
    if "'" in value:
        raise ValueError(f"no single quotes in a [databases] value: {value!r}")
    return f"'{value}'"


class PgBouncer:
    """``with PgBouncer(pool_size=20) as bouncer: bouncer.url("mydb"); bouncer.show("POOLS")``.

    ``databases`` maps a database name to extra ``[databases]`` settings (e.g.
    ``{"mydb": {"connect_query": "SET statement_timeout = 5000"}}``); every other
    database goes through the ``*`` fallback entry. ``users`` must list every
    role that connects (trust auth still looks the name up in the userlist).
    ``settings`` adds or overrides ``[pgbouncer]`` settings, e.g.
    ``{"ignore_startup_parameters": "options"}``.
    """

    def __init__(
        self,
        pool_size: int = 20,
        *,
        databases: dict[str, dict[str, str]] | None = None,
        users: tuple[str, ...] = ("postgres",),
        settings: dict[str, str] | None = None,
    ):
        self.port = free_port()
        self.pool_size = pool_size
        self.directory = Path(tempfile.mkdtemp(prefix="ai-chat-pgbouncer-"))
        self.config_path = self.directory / "pgbouncer.ini"
        self.log_path = self.directory / "pgbouncer.log"
        self.process: subprocess.Popen | None = None
        try:
            account = pwd.getpwnam(OS_USER)
            self._write_config(databases or {}, users, settings or {})
            for path in (self.directory, *self.directory.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
            self.directory.chmod(0o700)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def _write_config(self, databases: dict, users: tuple[str, ...], settings: dict) -> None:
        entries = []
        for name, extra in databases.items():
            pairs = " ".join(f"{key}={_quote(value)}" for key, value in extra.items())
            entries.append(f"{name} = {UPSTREAM} dbname={name} {pairs}".rstrip())
        entries.append(f"* = {UPSTREAM}")
        options = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            # No socket in /var/run/postgresql, where it could clash with a real one.
            "unix_socket_dir": "",
            "logfile": str(self.log_path),
            "auth_type": "trust",
            "auth_file": str(self.directory / "userlist.txt"),
            "admin_users": "postgres",
            "pool_mode": "transaction",
            "default_pool_size": str(self.pool_size),
            "max_client_conn": "2000",
            # A reset query only runs between sessions; in transaction mode the
            # server connection changes hands after every transaction anyway.
            "server_reset_query": "",
            # A server that cannot be reached fails a test in seconds: 5 s to
            # connect, and 1 s (not 15 s) before a failed login is tried again.
            "server_connect_timeout": "5",
            "server_login_retry": "1",
            **settings,
        }
        lines = ["[databases]", *entries, "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in options.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        # Trust auth checks no password, but still looks the name up in here.
        userlist = "".join(f'"{user}" ""\n' for user in users)
        (self.directory / "userlist.txt").write_text(userlist)

    def start(self, timeout: float = 15.0) -> PgBouncer:
        """Run pgbouncer in the foreground; returns once the admin console answers."""
        # Not through runuser (as tests/pg_cluster.py does): runuser forks and
        # waits, so a signal would reach pgbouncer second-hand. Dropping to the
        # user in the child makes pgbouncer itself the process that stop() ends.
        account = pwd.getpwnam(OS_USER)
        self.process = subprocess.Popen(
            [binary(), "-q", str(self.config_path)],
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.directory,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                self.show("VERSION")
                return self
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pgbouncer did not answer in {timeout}s:\n{self.log()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Immediate shutdown: open clients are dropped. SIGTERM does that up to
        1.22; from 1.23 the first SIGTERM waits for clients to leave and a second
        one shuts down at once. SIGKILL if it is still there after all that."""
        process, self.process = self.process, None
        if process is None:
            return
        for grace in (2, 5):
            if process.poll() is not None:
                return
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
                return
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        process.wait(5)

    def remove(self) -> None:
        """Stop pgbouncer if it runs and delete its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def dsn(self, database: str, user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={user} dbname={database}"

    def url(self, database: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def show(self, command: str) -> list[dict]:
        """``SHOW POOLS``, ``SHOW STATS``, ``SHOW SERVERS`` ... on the admin console
        (the ``SHOW`` may be left out); the rows as dicts by column name."""
        what = command.strip()
        if what.upper().startswith("SHOW "):
            what = what[5:]
        return self.console(f"SHOW {what}")

    def console(self, command: str) -> list[dict]:
        """Any admin console command (``RECONNECT``, ``RELOAD``, ``SHOW ...``); the
        rows as dicts by column name, [] for a command without rows."""
        connection = psycopg2.connect(self.dsn(ADMIN_DATABASE), connect_timeout=3)
        # The console speaks the simple protocol only and knows no BEGIN.
        connection.autocommit = True
        with closing(connection), connection.cursor() as cursor:
            cursor.execute(command)
            if cursor.description is None:
                return []
            columns = [column.name for column in cursor.description]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> PgBouncer:
        try:
            return self.start()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, *exc) -> None:
        self.remove()
