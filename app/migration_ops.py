"""Schema changes that are safe on the live database shared with the main server.

The migrations adopt tables the old service created and that its writers may
still be using, so every change here either creates what is missing (and
leaves what exists alone) or takes its locks in a way that never queues the
writers behind it:

- an index is built with ``CREATE INDEX CONCURRENTLY`` on PostgreSQL, outside
  the migration's transaction (it takes no lock that blocks writes);
- a column is added with a short ``lock_timeout`` and retried: ``ADD COLUMN``
  is a catalog-only change, but its brief exclusive lock, if it had to wait
  behind a long transaction, would make every later writer wait behind it.
"""

from __future__ import annotations

import logging
import time

import sqlalchemy as sa
from alembic import op
from sqlalchemy.exc import OperationalError

log = logging.getLogger("alembic.ops")

LOCK_WAIT = "2s"
LOCK_ATTEMPTS = 30


def postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def table_exists(table: str) -> bool:
    return sa.inspect(op.get_bind()).has_table(table)


def column_exists(table: str, column: str) -> bool:
    return column in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def create_index(
    name: str, table: str, columns: list[str], *, unique: bool = False, where: str | None = None,
    include: list[str] | None = None,
) -> None:
    """Create the index (partial with ``where``; on PostgreSQL covering the
    ``include`` columns too, for index-only scans) unless it exists, never
    blocking the table's writers."""
    options = {}
    if where is not None:
        options.update(postgresql_where=sa.text(where), sqlite_where=sa.text(where))
    if include:
        # SQLite has no INCLUDE: there the index is its key columns alone.
        options.update(postgresql_include=include)
    if not postgresql():
        op.create_index(name, table, columns, unique=unique, if_not_exists=True, **options)
        return
    with op.get_context().autocommit_block():
        # A concurrent build that failed (or was killed) leaves an INVALID
        # index behind, which IF NOT EXISTS would then take for done.
        invalid = op.get_bind().execute(
            sa.text(
                "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = :name AND NOT i.indisvalid"
            ),
            {"name": name},
        ).first()
        if invalid:
            _drop_concurrently(name)
        op.create_index(name, table, columns, unique=unique, postgresql_concurrently=True,
                        if_not_exists=True, **options)


def drop_index(name: str, table: str) -> None:
    """Drop the index if it exists, never blocking the table's writers
    (``DROP INDEX CONCURRENTLY`` on PostgreSQL, outside the transaction)."""
    if not postgresql():
        op.drop_index(name, table, if_exists=True)
        return
    with op.get_context().autocommit_block():
        _drop_concurrently(name)


def _drop_concurrently(name: str) -> None:
    op.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')


def add_column(table: str, column: sa.Column) -> None:
    """Add a nullable column without a default unless the table has it."""
    if column_exists(table, column.name):
        return
    with_brief_locks(lambda: op.add_column(table, column))


def with_brief_locks(change) -> None:
    """Run a DDL ``change`` that needs a lock on a busy table, waiting for that
    lock at most ``LOCK_WAIT`` at a time (in a savepoint, retried)."""
    if not postgresql():
        change()
        return
    bind = op.get_bind()
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        savepoint = bind.begin_nested()
        try:
            bind.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'"))
            change()
            bind.execute(sa.text("SET LOCAL lock_timeout = 0"))
            savepoint.commit()
            return
        except OperationalError as error:
            savepoint.rollback()
            if getattr(error.orig, "pgcode", None) != "55P03" or attempt == LOCK_ATTEMPTS:
                raise
            log.warning("lock not granted within %s (attempt %d), retrying", LOCK_WAIT, attempt)
            time.sleep(1)
