"""The hot path's SQL, run on a raw DBAPI connection from SQLAlchemy's pool.

A send runs two or three statements. Through the ORM session each one costs
about 220 µs of CPU, through the pooled DBAPI connection about 40 µs
(bench/RESULTS.md); the pool itself (size, timeouts, reconnects, the SQLite
pragmas) stays SQLAlchemy's. Statements are written once in ``:name`` style
and translated to the driver's parameter style. Driver errors leave as
SQLAlchemy's exception classes (OperationalError, …), and a connection the
server dropped is invalidated, so the rest of the app handles them as any
other database error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime

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
    """What SQLAlchemy stores in SQLite for dates and aware datetimes."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, date):
        return value.isoformat()
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

    def execute(self, sql: str) -> None:
        """A statement without parameters (transaction control)."""
        self.run(Statement(sql))

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
def connection() -> Iterator[Connection]:
    """Check a connection out of the app's pool for a few statements.

    Raises the SQLAlchemy errors of an outage: TimeoutError (every pooled
    connection busy past ``pool_timeout``), OperationalError (server gone).
    """
    engine = db.engine
    dialect = engine.dialect
    try:
        pooled = engine.raw_connection()
    except dialect.loaded_dbapi.Error as error:
        raise sa_exc.DBAPIError.instance(
            None, None, error, dialect.loaded_dbapi.Error, hide_parameters=True, dialect=dialect
        ) from error
    try:
        yield Connection(pooled, dialect, current_app.config["SQL_TIMEOUTS"])
    finally:
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
    conn.execute("BEGIN IMMEDIATE" if conn.dialect_name == "sqlite" else "BEGIN")
    try:
        yield conn
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except sa_exc.DBAPIError:
            pass  # the connection is gone (and invalidated): nothing to undo
        raise
    conn.execute("COMMIT")


def bound_every_statement(engine, timeouts: str) -> None:
    """Prefix the ORM's statements (history, stats, CLI) with the timeouts too."""
    if not timeouts:
        return

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def _with_timeouts(conn, cursor, statement, parameters, context, executemany):
        return (statement if executemany else timeouts + statement), parameters
