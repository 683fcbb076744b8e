"""The service behind PgBouncer in transaction pooling mode.

Production may put one PgBouncer (``pool_mode = transaction``) between all
instances and PostgreSQL, so that instances × workers × pool slots share a
small server pool. The PgBouncer here is the minimal deployment: no
``ignore_startup_parameters``, no ``connect_query``. The service has to work
through it as it is, with its statement and lock timeouts still in force.

Two parts:
- what we want from the service, with direct-connection twins showing that
  the same checks pass without PgBouncer;
- facts about PgBouncer 1.18 and PostgreSQL that decided how the timeouts are
  applied (app/config.py, ``sql_timeouts``: a ``SET LOCAL`` prefix in the same
  query string as every statement), checked with psycopg2 alone.

Skipped when pgbouncer cannot run here, except under ``CI=true``: CI must run
these, so there they fail instead (``.ci/run`` installs the package).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from contextlib import closing, contextmanager

import psycopg2
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app import create_app
from app.extensions import db
from tests import pgbouncer
from tests.conftest import (
    ADMIN_DSN,
    base_env,
    counters_and_rows,
    created_database,
    dsn_to_url,
    migrate_to_head,
    pg_connect,
)
from tests.pgbouncer import PgBouncer
from tests.servers import Gunicorn, send_all_at_once

SERVER_POOL = 20
DAILY_LIMIT = 30
CHATS = 300
FIRST_USER = 700_000
HOT_USER = 799_999
HOT_SENDS = 80
QUERY_CANCELED = "57014"
LOCK_NOT_AVAILABLE = "55P03"
# The service's own timeouts (app/config.py): 5 s per statement, 3 s per lock wait.
STATEMENT_TIMEOUT_BOUND = 7.0
LOCK_TIMEOUT_BOUND = 4.5
# Nothing here reaches the model; a closed port makes sure of it.
UNUSED_LLM_URL = "http://127.0.0.1:9/v1"

@pytest.fixture(scope="module", autouse=True)
def _pgbouncer_runs_here():
    reason = pgbouncer.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the PgBouncer tests, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def database():
    """A fresh database, migrated to head directly on 5432, not through PgBouncer."""
    with created_database("ai_chat_pgbouncer") as name:
        migrate_to_head(dsn_to_url(name))
        yield name


@pytest.fixture(scope="module")
def bouncer(database):
    """One PgBouncer in transaction mode, server pool of 20, for the service tests."""
    with PgBouncer(pool_size=SERVER_POOL) as running:
        yield running


def direct_dsn(database: str) -> str:
    return f"{ADMIN_DSN} dbname={database}"


def service_env(database_url: str, llm_url: str) -> dict:
    """The service's environment for a database URL (the one place to add a setting
    the service may come to need behind PgBouncer)."""
    return {**base_env(database_url, llm_url), "DAILY_LIMIT": str(DAILY_LIMIT)}


def statuses(results) -> Counter:
    return Counter(code for code, _ in results)


# --- the service through PgBouncer ---------------------------------------------------


def test_two_instances_through_pgbouncer_answer_300_concurrent_chats(
    database, bouncer, fake_llm, tmp_path
):
    env = service_env(bouncer.url(database), fake_llm.url)
    servers = [Gunicorn(env, workers=2, threads=200, log_dir=tmp_path) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        fake_llm.latency = 0.2  # keep the chats in flight together
        users = [FIRST_USER + number for number in range(CHATS)]
        results = send_all_at_once(
            [(servers[number % 2].url, user) for number, user in enumerate(users)]
        )
        assert statuses(results) == {200: CHATS}, results[:3]
        counters, rows = counters_and_rows(direct_dsn(database))
        assert counters == dict.fromkeys(users, 1)
        assert rows == dict.fromkeys(users, 1)
        assert fake_llm.calls == CHATS

        fake_llm.reset()
        fake_llm.latency = 0.2
        results = send_all_at_once([(servers[n % 2].url, HOT_USER) for n in range(HOT_SENDS)])
        assert statuses(results) == {200: DAILY_LIMIT, 429: HOT_SENDS - DAILY_LIMIT}
        counters, rows = counters_and_rows(direct_dsn(database))
        assert (counters[HOT_USER], rows[HOT_USER]) == (DAILY_LIMIT, DAILY_LIMIT)
        assert fake_llm.calls == DAILY_LIMIT
    finally:
        for server in servers:
            server.stop()
    # It all went through the one pool, which never outgrew its 20 server connections.
    (stats,) = [row for row in bouncer.show("STATS") if row["database"] == database]
    assert stats["total_xact_count"] >= CHATS + HOT_SENDS
    servers_of_database = [row for row in bouncer.show("SERVERS") if row["database"] == database]
    assert 0 < len(servers_of_database) <= SERVER_POOL


@contextmanager
def service_session(database_url: str):
    """An app context of the service built by create_app for ``database_url``."""
    app = create_app(service_env(database_url, UNUSED_LLM_URL))
    try:
        with app.app_context():
            try:
                yield
            finally:
                db.session.remove()
                db.engine.dispose()
    finally:
        app.extensions["llm"].close()


def failure_of(statement: str) -> tuple[str | None, float, str]:
    """Run ``statement`` on the service's session: (SQLSTATE, seconds, message) of the
    error it ends with, (None, seconds, "") when it succeeds."""
    started = time.monotonic()
    try:
        db.session.execute(text(statement))
    except OperationalError as error:
        db.session.rollback()
        return error.orig.pgcode, time.monotonic() - started, str(error.orig).strip()
    return None, time.monotonic() - started, ""


def assert_statement_timeout_in_force(database_url: str) -> None:
    with service_session(database_url):
        code, seconds, message = failure_of("SELECT pg_sleep(10)")
    assert code == QUERY_CANCELED, message or f"not cancelled, ran {seconds:.1f}s"
    assert seconds < STATEMENT_TIMEOUT_BOUND


@pytest.fixture
def locked_table(database):
    """ai_chat_daily_limits locked by another session (released within 15 s at worst,
    so a missing lock_timeout fails the test instead of hanging it)."""
    holder = psycopg2.connect(
        direct_dsn(database), options="-c idle_in_transaction_session_timeout=15000"
    )
    with closing(holder), holder.cursor() as cursor:
        cursor.execute("LOCK TABLE ai_chat_daily_limits IN ACCESS EXCLUSIVE MODE")
        yield
        holder.rollback()


def assert_lock_timeout_in_force(database_url: str) -> None:
    with service_session(database_url):
        code, seconds, message = failure_of("SELECT count(*) FROM ai_chat_daily_limits")
    assert code == LOCK_NOT_AVAILABLE, message or f"not cancelled, waited {seconds:.1f}s"
    assert seconds < LOCK_TIMEOUT_BOUND


def test_statement_timeout_is_in_force_on_a_direct_connection(database):
    assert_statement_timeout_in_force(dsn_to_url(database))


def test_statement_timeout_is_in_force_through_pgbouncer(database, bouncer):
    assert_statement_timeout_in_force(bouncer.url(database))


def test_lock_timeout_is_in_force_on_a_direct_connection(database, locked_table):
    assert_lock_timeout_in_force(dsn_to_url(database))


def test_lock_timeout_is_in_force_through_pgbouncer(database, bouncer, locked_table):
    assert_lock_timeout_in_force(bouncer.url(database))


# --- facts: PgBouncer 1.18 (transaction mode) and session settings ---------------------
#
# Timeouts below are 500 ms against a 3 s sleep: "in force" means cancelled in < 2 s.


@pytest.fixture
def scratch():
    """A fresh empty database with one table (no migrations), dropped afterwards."""
    with created_database("ai_chat_pgbouncer_facts") as name:
        with closing(pg_connect(name)) as connection, connection.cursor() as cursor:
            cursor.execute("CREATE TABLE t (id int PRIMARY KEY)")
        yield name


def autocommit(dsn: str, **params):
    connection = psycopg2.connect(dsn, connect_timeout=3, **params)
    connection.autocommit = True
    return connection


def setting(connection, name: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SHOW {name}")
        return cursor.fetchone()[0]


def outcome(connection, statement: str) -> tuple[str | None, float]:
    """(SQLSTATE or None, seconds) of one execute() on a psycopg2 connection."""
    started = time.monotonic()
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    except psycopg2.Error as error:
        if not connection.autocommit:
            connection.rollback()
        return error.pgcode, time.monotonic() - started
    return None, time.monotonic() - started


def assert_cancelled(connection, statement: str = "SELECT pg_sleep(3)", code=QUERY_CANCELED):
    sqlstate, seconds = outcome(connection, statement)
    assert (sqlstate, seconds < 2) == (code, True), f"{sqlstate} after {seconds:.1f}s"


def test_pgbouncer_refuses_a_login_with_the_options_startup_parameter(scratch):
    with PgBouncer() as bouncer:
        with pytest.raises(psycopg2.OperationalError) as refused:
            psycopg2.connect(bouncer.dsn(scratch), options="-c statement_timeout=5000")
        assert "FATAL:  unsupported startup parameter: options" in str(refused.value)
        assert "unsupported startup parameter: options=-c statement_timeout" in bouncer.log()


def test_ignore_startup_parameters_logs_in_but_drops_the_options_silently(scratch):
    with PgBouncer(settings={"ignore_startup_parameters": "options"}) as bouncer:
        options = "-c statement_timeout=500 -c lock_timeout=300"
        with closing(autocommit(bouncer.dsn(scratch), options=options)) as connection:
            assert (setting(connection, "statement_timeout"), connection.notices) == ("0", [])
            assert setting(connection, "lock_timeout") == "0"
        assert "options" not in bouncer.log()


def test_alter_database_set_reaches_only_server_connections_opened_afterwards(scratch):
    with PgBouncer() as bouncer, closing(autocommit(bouncer.dsn(scratch))) as connection:
        assert setting(connection, "statement_timeout") == "0"
        with closing(pg_connect("postgres")) as admin, admin.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{scratch}" SET statement_timeout = 500')
        # The pooled server connection started before the ALTER keeps the old value
        # until it is replaced (RECONNECT, server_lifetime, a restart).
        assert setting(connection, "statement_timeout") == "0"
        bouncer.console("RECONNECT")
        assert setting(connection, "statement_timeout") == "500ms"
        assert_cancelled(connection)


@pytest.fixture
def role(scratch):
    """A login role that exists only for one test (roles are cluster-wide)."""
    name = f"ai_chat_pgbouncer_{uuid.uuid4().hex[:8]}"
    with closing(pg_connect("postgres")) as admin, admin.cursor() as cursor:
        cursor.execute(f'CREATE ROLE "{name}" LOGIN')
        try:
            yield name
        finally:
            cursor.execute(f'DROP ROLE IF EXISTS "{name}"')


def test_alter_role_in_database_set_applies_through_pgbouncer(scratch, role):
    with closing(pg_connect("postgres")) as admin, admin.cursor() as cursor:
        cursor.execute(f'ALTER ROLE "{role}" IN DATABASE "{scratch}" SET statement_timeout = 500')
    with PgBouncer(users=("postgres", role)) as bouncer:
        with closing(autocommit(bouncer.dsn(scratch, user=role))) as connection:
            assert setting(connection, "statement_timeout") == "500ms"
            assert_cancelled(connection)
        # Another role has a pool (and server connections) of its own, without it.
        with closing(autocommit(bouncer.dsn(scratch))) as connection:
            assert setting(connection, "statement_timeout") == "0"


def test_connect_query_applies_to_every_server_connection(scratch):
    connect_query = "SET statement_timeout = 500; SET lock_timeout = 300"
    with PgBouncer(databases={scratch: {"connect_query": connect_query}}) as bouncer:
        with closing(autocommit(bouncer.dsn(scratch))) as connection:
            assert setting(connection, "statement_timeout") == "500ms"
            assert setting(connection, "lock_timeout") == "300ms"
            assert_cancelled(connection)


def test_set_local_in_a_transaction_applies_to_that_transaction_only(scratch):
    with PgBouncer() as bouncer, closing(psycopg2.connect(bouncer.dsn(scratch))) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL statement_timeout = 500")
        assert_cancelled(connection)
        assert setting(connection, "statement_timeout") == "0"


@pytest.mark.parametrize(
    ("prefix", "statement", "code"),
    [
        ("SET LOCAL statement_timeout = 500", "SELECT pg_sleep(3)", QUERY_CANCELED),
        ("SET LOCAL lock_timeout = 300", "SELECT count(*) FROM t", LOCK_NOT_AVAILABLE),
    ],
    ids=["statement_timeout", "lock_timeout"],
)
def test_set_local_prefix_in_one_autocommit_query_applies_to_that_query_only(
    scratch, prefix, statement, code
):
    # Several statements in one simple Query message run as one implicit transaction.
    holder = psycopg2.connect(direct_dsn(scratch))
    with closing(holder), holder.cursor() as cursor:
        cursor.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        with PgBouncer() as bouncer, closing(autocommit(bouncer.dsn(scratch))) as connection:
            assert_cancelled(connection, f"{prefix}; {statement}", code)
            assert connection.notices == []
            assert setting(connection, "statement_timeout") == "0"
            assert setting(connection, "lock_timeout") == "0"
        holder.rollback()


def test_set_local_alone_in_autocommit_only_warns(scratch):
    with PgBouncer() as bouncer, closing(autocommit(bouncer.dsn(scratch))) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL statement_timeout = 500")
        assert connection.notices == [
            "WARNING:  SET LOCAL can only be used in transaction blocks\n"
        ]
        assert setting(connection, "statement_timeout") == "0"


def test_a_session_set_stays_on_the_server_connection_for_other_clients(scratch):
    with PgBouncer(pool_size=1) as bouncer:
        with (
            closing(autocommit(bouncer.dsn(scratch))) as first,
            closing(autocommit(bouncer.dsn(scratch))) as second,
        ):
            with first.cursor() as cursor:
                cursor.execute("SET statement_timeout = 1234")
            assert setting(second, "statement_timeout") == "1234ms"
