"""The hot path's SQL, run on a raw DBAPI connection from SQLAlchemy's pool.

A send runs two or three statements. Through the ORM session each one costs
about 220 µs of CPU, through the pooled DBAPI connection about 40 µs
(bench/RESULTS.md); the pool itself (size, timeouts, reconnects, the SQLite
pragmas) stays SQLAlchemy's. Statements are written once in ``:name`` style
and translated to the driver's parameter style. Driver errors leave as
SQLAlchemy's exception classes (OperationalError, …), and a connection the
server dropped is invalidated, so the rest of the app handles them as any
other database error.

A connection never goes back to the pool inside a transaction. The pool's own
reset-on-return is psycopg2's ``rollback()``, which does nothing in autocommit
mode, so a connection left in a failed transaction ("current transaction is
aborted") would fail every statement of every later request until it is
recycled. Transaction control therefore goes straight to the DBAPI
connection (never behind the timeouts prefix, which PostgreSQL refuses in a
failed transaction), and every connection is checked on its way back: rolled
back when it is still in a transaction, discarded when even that fails. On
its way out, a connection the server closed while it was pooled (a restart,
a terminated backend) is replaced, so a request never gets a dead one.
"""

from __future__ import annotations

import re
import select
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal

from flask import current_app
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from app.extensions import db

_NAMED = re.compile(r"(?<![:\w]):(\w+)")


class Statement:
    """One SQL statement in ``:name`` style, with an optional SQLite variant."""

    def __init__(self, sql: str, sqlite: str | None = None):
        self.sql = {
            # psycopg2 takes %(name)s (and a literal % must be doubled).
            "postgresql": _NAMED.sub(r"%(\1)s", sql.replace("%", "%%")),
            "sqlite": sqlite if sqlite is not None else sql,
        }


def _sqlite_value(value):
    """What SQLAlchemy stores in SQLite for dates and aware datetimes; money as
    its exact text (SQLite has no decimal type to bind)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def as_date(value) -> date:
    """A DATE column's value: SQLite hands back its ISO text."""
    return date.fromisoformat(value) if isinstance(value, str) else value


class Connection:
    """A pooled DBAPI connection in autocommit mode (see app/config.py).

    Every statement carries the app's timeouts (``SQL_TIMEOUTS``, PostgreSQL).
    """

    def __init__(self, pooled, dialect, timeouts: str):
        self._pooled = pooled
        self._dialect = dialect
        self._timeouts = timeouts
        self.dialect_name = dialect.name

    def run(self, statement: Statement, params: Mapping | None = None) -> list[tuple]:
        """Execute and return the rows (an empty list for statements without)."""
        return self._execute(statement, params, lambda cursor: (
            cursor.fetchall() if cursor.description else []
        ))

    def count(self, statement: Statement, params: Mapping | None = None) -> int:
        """Execute and return how many rows the statement changed."""
        return self._execute(statement, params, lambda cursor: cursor.rowcount)

    def _execute(self, statement: Statement, params: Mapping | None, result):
        sql = self._timeouts + statement.sql[self.dialect_name]
        if params and self.dialect_name == "sqlite":
            params = {name: _sqlite_value(value) for name, value in params.items()}
        cursor = self._pooled.cursor()
        try:
            cursor.execute(sql, params or {})
            return result(cursor)
        except self._dialect.loaded_dbapi.Error as error:
            raise self._wrap(error, sql, cursor) from error
        finally:
            cursor.close()

    def control(self, sql: str) -> None:
        """Transaction control (BEGIN, COMMIT), sent as it is: no timeouts
        prefix, which would start with a statement PostgreSQL refuses once a
        transaction has failed."""
        cursor = self._pooled.cursor()
        try:
            cursor.execute(sql)
        except self._dialect.loaded_dbapi.Error as error:
            raise self._wrap(error, sql, cursor) from error
        finally:
            cursor.close()

    def rollback(self) -> None:
        """End whatever transaction the connection is in, or discard the
        connection when it cannot (it never reaches the pool in a transaction)."""
        try:
            rollback_if_in_transaction(self._pooled.dbapi_connection)
        except Exception as error:  # the server is gone, or worse: drop it
            self._pooled.invalidate(error)

    def _wrap(self, error, sql, cursor=None):
        dbapi_connection = self._pooled.dbapi_connection
        disconnected = self._dialect.is_disconnect(error, dbapi_connection, cursor)
        if disconnected:
            # Never hand a dead connection to the next request.
            self._pooled.invalidate(error)
        return sa_exc.DBAPIError.instance(
            sql,
            None,
            error,
            self._dialect.loaded_dbapi.Error,
            hide_parameters=True,
            dialect=self._dialect,
            connection_invalidated=disconnected,
        )


@contextmanager
def connection(wait_until: float | None = None) -> Iterator[Connection]:
    """Check a connection out of the app's pool for a few statements.

    A pool whose every connection stays busy for ``pool_timeout`` is asked
    again until ``wait_until`` (time.monotonic()), when given: on a starved
    CPU the threads that hold connections wait for the interpreter lock, and
    a busy pool is no reason to refuse a request that still has time.

    Raises the SQLAlchemy errors of an outage: TimeoutError (every pooled
    connection busy past ``pool_timeout``, and ``wait_until``), OperationalError
    (server gone).
    """
    engine = db.engine
    dialect = engine.dialect
    while True:
        try:
            pooled = engine.raw_connection()
            break
        except sa_exc.TimeoutError:
            if wait_until is None or time.monotonic() >= wait_until:
                raise
        except dialect.loaded_dbapi.Error as error:
            raise sa_exc.DBAPIError.instance(
                None, None, error, dialect.loaded_dbapi.Error, hide_parameters=True,
                dialect=dialect,
            ) from error
    conn = Connection(pooled, dialect, current_app.config["SQL_TIMEOUTS"])
    try:
        yield conn
    finally:
        if pooled.dbapi_connection is not None:  # not invalidated
            conn.rollback()
        pooled.close()


def run(statement: Statement, params: Mapping | None = None) -> list[tuple]:
    """One statement on a connection of its own (autocommit: one round trip)."""
    with connection() as conn:
        return conn.run(statement, params)


@contextmanager
def transaction(conn: Connection) -> Iterator[Connection]:
    """BEGIN … COMMIT on ``conn``, rolled back if the block raises.

    On SQLite ``BEGIN IMMEDIATE`` takes the write lock up front, so two
    writers never both read and then fail to upgrade their lock.
    """
    conn.control("BEGIN IMMEDIATE" if conn.dialect_name == "sqlite" else "BEGIN")
    try:
        yield conn
        conn.control("COMMIT")
    except BaseException:
        conn.rollback()
        raise


def in_transaction(dbapi_connection) -> bool:
    """Whether the DBAPI connection is inside a transaction (or its state is
    unknown: a connection lost mid-statement)."""
    status = getattr(dbapi_connection, "get_transaction_status", None)
    if status is not None:  # psycopg2
        from psycopg2.extensions import TRANSACTION_STATUS_IDLE

        return status() != TRANSACTION_STATUS_IDLE
    return bool(getattr(dbapi_connection, "in_transaction", False))  # sqlite3


def rollback_if_in_transaction(dbapi_connection) -> None:
    """ROLLBACK on the DBAPI connection itself when it is in a transaction;
    raises the driver's error when that fails or leaves it in one."""
    if not in_transaction(dbapi_connection):
        return
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("ROLLBACK")
    finally:
        cursor.close()
    if in_transaction(dbapi_connection):
        raise RuntimeError("the connection is still in a transaction after ROLLBACK")


def closed_by_server(dbapi_connection) -> bool:
    """Whether the server has already closed this idle connection.

    A PostgreSQL that restarted, or ``pg_terminate_backend``, sends its last
    message to every session and closes the socket, which then polls
    readable; an idle connection in autocommit mode (no LISTEN) has nothing
    else to read. One ``poll(0)``, no round trip: the check urllib3 makes on
    its pooled sockets. SQLite connections have no socket.
    """
    if getattr(dbapi_connection, "closed", 0):  # psycopg2: non-zero once closed
        return True
    fileno = getattr(dbapi_connection, "fileno", None)
    if fileno is None:
        return False
    poller = select.poll()
    poller.register(fileno(), select.POLLIN)
    return bool(poller.poll(0))


def keep_pool_clean(engine) -> None:
    """Check every connection on its way back to the pool, whoever used it
    (the ORM's paths too): in autocommit mode the pool's own reset is a
    no-op. A connection that cannot be rolled back makes the pool discard it
    (the reset hook raising is how the pool learns that).

    And on its way out: a connection the server closed while it sat in the
    pool is replaced by a new one (raising DisconnectionError in a checkout
    hook makes the pool reconnect that slot and check again). Without this,
    after a PostgreSQL restart in a quiet moment every pooled connection
    (20 per worker) cost one request a 503 before the pool was clean again;
    the statement itself is never retried (it may have run).
    """

    @event.listens_for(engine, "reset")
    def _roll_back_on_return(dbapi_connection, _record, _state):
        rollback_if_in_transaction(dbapi_connection)

    @event.listens_for(engine, "checkout")
    def _replace_if_closed_by_server(dbapi_connection, _record, _proxy):
        if closed_by_server(dbapi_connection):
            raise sa_exc.DisconnectionError("the server closed this pooled connection")


def bound_every_statement(engine, timeouts: str) -> None:
    """Prefix the ORM's statements (history, stats, CLI) with the timeouts too."""
    if not timeouts:
        return

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def _with_timeouts(conn, cursor, statement, parameters, context, executemany):
        return (statement if executemany else timeouts + statement), parameters
