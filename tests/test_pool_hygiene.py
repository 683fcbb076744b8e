"""A failed statement never poisons a pooled connection.

The engine runs in autocommit mode, where the pool's own reset-on-return
(psycopg2's ``rollback()``) does nothing: a connection handed back inside a
failed transaction would fail every statement of every later request with
"current transaction is aborted" until it was recycled 30 minutes later.
Each test fails a statement for real (a division by zero, a row lock held by
another session past ``DB_LOCK_TIMEOUT``) inside one of the app's
transactions or writes, then checks the invariants: no session of the app is
left idle in a transaction, the next requests on the same (small) pool
succeed, and a unit reserved by a request that failed is given back.
"""

from __future__ import annotations

import threading
import time
from contextlib import closing, contextmanager
from datetime import date

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from app import sql as app_sql
from app.extensions import db
from tests.conftest import (
    API_KEY,
    Api,
    created_database,
    dsn_to_url,
    exchange_count,
    migrate_to_head,
    pg_connect,
    request_count,
)
from tests.fake_llm import status

# Short enough that a test waits for it a few times, long against a statement.
LOCK_TIMEOUT = "0.3"
HELD_FOR = 1.2


def stuck_sessions(sql) -> list[tuple]:
    """Sessions of the app (application_name ai_chat) left inside a transaction."""
    return sql(
        "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'ai_chat' AND state LIKE 'idle in transaction%%'"
    )


@contextmanager
def row_locked(database_name: str, statement: str, params=(), *, after=None, held_for=HELD_FOR):
    """Another session holds the rows ``statement`` selects (FOR UPDATE) for
    ``held_for`` seconds, starting once ``after()`` is true (at once without it),
    the way an operator's or the main server's transaction would."""
    locked = threading.Event()
    failures: list[BaseException] = []

    def hold():
        try:
            if after is not None:
                deadline = time.monotonic() + 10
                while not after() and time.monotonic() < deadline:
                    time.sleep(0.01)
            with closing(pg_connect(database_name)) as connection:
                connection.autocommit = False
                with connection.cursor() as cursor:
                    cursor.execute(statement, params)
                    assert cursor.fetchall(), "nothing to lock"
                    locked.set()
                    time.sleep(held_for)
                connection.rollback()
        except BaseException as error:  # reported by the test, not lost in a thread
            failures.append(error)
            locked.set()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield locked
    finally:
        thread.join(timeout=15)
        assert failures == []


@pytest.fixture
def small_pool_api(make_app):
    """The API on a pool of 2 connections: a poisoned one would be reused at once."""
    app = make_app(DB_POOL_SIZE="2", DB_LOCK_TIMEOUT=LOCK_TIMEOUT, OPENAI_MAX_RETRIES="0")
    return app, Api(app.test_client())


def assert_pool_serves(api: Api, sql, telegram_id: int = 1) -> None:
    """No stuck session, and every kind of request succeeds again, several
    times (more than the pool's connections)."""
    assert stuck_sessions(sql) == []
    for _ in range(3):
        assert api.limits(telegram_id).status_code == 200
    assert api.client.get("/health/ready").status_code == 200
    assert api.send(telegram_id).status_code == 200
    assert stuck_sessions(sql) == []


# --- the connection itself ----------------------------------------------------


def test_a_failed_statement_inside_a_transaction_leaves_the_connection_usable(make_app, sql):
    app = make_app(DB_POOL_SIZE="1")
    with app.app_context():
        with pytest.raises(sa_exc.DataError):
            with app_sql.connection() as conn, app_sql.transaction(conn):
                conn.run(app_sql.Statement("SELECT 1"))
                conn.run(app_sql.Statement("SELECT 1/0"))
        # The pool has one connection: each of these gets the one that failed.
        for _ in range(3):
            assert app_sql.run(app_sql.Statement("SELECT 2")) == [(2,)]
    assert stuck_sessions(sql) == []


def test_a_transaction_that_raises_is_rolled_back_not_committed(make_app, sql):
    app = make_app(DB_POOL_SIZE="1")
    insert = app_sql.Statement(
        "INSERT INTO ai_chat_user_settings (telegram_id, updated_at) VALUES (77, now())"
    )
    with app.app_context(), pytest.raises(sa_exc.DataError):
        with app_sql.connection() as conn, app_sql.transaction(conn):
            conn.run(insert)
            conn.run(app_sql.Statement("SELECT 1/0"))
    assert sql("SELECT count(*) FROM ai_chat_user_settings")[0][0] == 0


def test_a_connection_returned_inside_a_transaction_is_rolled_back_by_the_pool(make_app, sql):
    """Whoever hands a connection back mid-transaction (any code path, the
    ORM's included), the pool's check on return ends that transaction."""
    app = make_app(DB_POOL_SIZE="1")
    with app.app_context():
        raw = db.engine.raw_connection()
        cursor = raw.cursor()
        cursor.execute("BEGIN")
        with pytest.raises(Exception, match="division by zero"):
            cursor.execute("SELECT 1/0")
        cursor.close()
        raw.close()  # back to the pool in a failed transaction
        assert stuck_sessions(sql) == []
        with db.engine.connect() as connection:
            assert connection.execute(sa.text("SELECT 3")).scalar() == 3


def test_a_connection_that_cannot_roll_back_is_discarded_not_pooled(make_app, sql):
    app = make_app(DB_POOL_SIZE="1")
    with app.app_context():
        with app_sql.connection() as conn:
            backend = conn.run(app_sql.Statement("SELECT pg_backend_pid()"))[0][0]
            conn.control("BEGIN")
            sql("SELECT pg_terminate_backend(%s)", (backend,))
        # The dead connection was dropped on its way back: a new one serves.
        assert app_sql.run(app_sql.Statement("SELECT pg_backend_pid()"))[0][0] != backend


def test_pooled_connections_the_server_closed_while_idle_are_replaced_not_answered_503(
    make_app, sql
):
    """A PostgreSQL restart, or pg_terminate_backend, ends every idle session:
    the next requests get live connections, not a 503 per dead one (the fault
    run's normal send after a quiet restart answered 503)."""
    app = make_app(DB_POOL_SIZE="3")
    api = Api(app.test_client())
    assert api.send(1).status_code == 200
    backends = [pid for (pid,) in sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'ai_chat'"
    )]
    assert backends
    for pid in backends:
        sql("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 5
    while sql("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (backends,))[0][0]:
        assert time.monotonic() < deadline, "the backends did not end"
        time.sleep(0.01)
    for _ in range(4):  # more than the pool holds
        assert api.send(1).status_code == 200
    assert api.limits(1).status_code == 200


# --- every writer that runs inside a transaction, over HTTP -----------------------


def test_a_refund_blocked_by_a_locked_counter_gets_through_once_the_lock_is_gone(
    small_pool_api, sql, database_name, fake_llm
):
    """The issue's case: the model fails while another session holds the
    user's counter row past lock_timeout. The refund (inside a transaction with
    the key's release) fails, rolls back cleanly, and is retried until it
    passes: 502, the unit back, the key free, no stuck session."""
    app, api = small_pool_api
    assert api.send(1).status_code == 200  # the counter row exists
    fake_llm.reset()
    fake_llm.script(status(500, delay=0.3))
    counter = "SELECT 1 FROM ai_chat_daily_limits WHERE telegram_id = 1 FOR UPDATE"
    with row_locked(database_name, counter, after=lambda: fake_llm.calls >= 1):
        response = api.send(1, request_id="refund-under-lock")
    assert response.status_code == 502
    assert response.get_json()["error"] == "llm_unavailable"
    assert request_count(sql, 1) == 1
    assert sql("SELECT count(*) FROM ai_chat_idempotency_keys")[0][0] == 0
    assert api.send(1, request_id="refund-under-lock").status_code == 200
    assert_pool_serves(api, sql)


def test_a_history_deletion_blocked_by_a_locked_row_answers_503_and_deletes_nothing(
    small_pool_api, sql, database_name, fake_llm
):
    app, api = small_pool_api
    assert api.send(1, request_id="kept-key").status_code == 200
    row = "SELECT 1 FROM ai_chat_requests WHERE telegram_id = 1 FOR UPDATE"
    with row_locked(database_name, row) as locked:
        locked.wait(5)
        response = api.delete_history(1)
    assert response.status_code == 503
    assert response.get_json()["error"] == "database_unavailable"
    # The keys were forgotten inside the same transaction: rolled back with it.
    assert exchange_count(sql, 1) == 1
    assert sql("SELECT count(*) FROM ai_chat_idempotency_keys")[0][0] == 1
    assert_pool_serves(api, sql)
    assert api.delete_history(1).get_json()["deleted"] == 2


def test_a_settings_change_blocked_by_a_locked_row_answers_503_then_succeeds(
    small_pool_api, sql, database_name
):
    app, api = small_pool_api
    put = lambda limit: api.client.put(  # noqa: E731
        "/v1/chat/users/1/settings", json={"daily_limit": limit}, headers={"X-API-KEY": API_KEY}
    )
    assert put(5).status_code == 200
    row = "SELECT 1 FROM ai_chat_user_settings WHERE telegram_id = 1 FOR UPDATE"
    with row_locked(database_name, row) as locked:
        locked.wait(5)
        blocked = put(7)
    assert blocked.status_code == 503
    assert_pool_serves(api, sql)
    assert put(7).get_json()["daily_limit"] == 7


def test_a_reset_blocked_by_a_locked_counter_answers_503_then_succeeds(
    small_pool_api, sql, database_name
):
    app, api = small_pool_api
    sql(
        "INSERT INTO ai_chat_daily_limits (telegram_id, request_count, last_reset_date, "
        "created_at) VALUES (1, 3, %s, now())",
        (date.today(),),
    )
    counter = "SELECT 1 FROM ai_chat_daily_limits WHERE telegram_id = 1 FOR UPDATE"
    with row_locked(database_name, counter) as locked:
        locked.wait(5)
        blocked = api.reset_limit(1)
    assert blocked.status_code == 503
    assert stuck_sessions(sql) == []
    assert api.reset_limit(1).get_json()["success"] is True
    assert_pool_serves(api, sql)


def test_a_migration_step_blocked_by_a_lock_is_retried_and_leaves_no_stuck_session():
    """The migrations' brief-lock helper: ADD COLUMN waits at most its
    lock_timeout behind a reader, rolls back to its savepoint, and tries again."""
    with created_database("ai_chat_locked_migration") as name:
        migrate_blocked_step(name)


def migrate_blocked_step(name: str) -> None:
    url = dsn_to_url(name)
    migrate_to_head(url, "0003")
    reader = "SELECT 1 FROM ai_chat_requests UNION ALL SELECT 1"
    # ACCESS SHARE on the table (a reader's transaction) for longer than one
    # attempt's lock wait (2 s): ADD COLUMN of 0004 must wait, fail, retry.
    with row_locked(name, reader, held_for=3.0):
        time.sleep(0.2)
        started = time.monotonic()
        migrate_to_head(url)
        waited = time.monotonic() - started
    assert waited > 2.0
    with closing(pg_connect(name)) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'ai_chat_requests' AND column_name = 'model'"
        )
        assert cursor.fetchall() == [("model",)]
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND state LIKE 'idle in transaction%%'", (name,)
        )
        assert cursor.fetchone()[0] == 0
