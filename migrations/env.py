"""Alembic environment, run by ``flask db upgrade`` inside the app.

In production the database is shared with the main server, which keeps its
own Alembic state in ``alembic_version``: ours lives in a table of its own
(``MIGRATION_VERSION_TABLE``), so neither service ever reads the other's.
Migrations run on an engine of their own, without the app's statement and
lock timeouts (a ``CREATE INDEX CONCURRENTLY`` on a big table may take
minutes), and instances that boot together take turns on an advisory lock.
"""

import logging
import time
from logging.config import fileConfig

from alembic import context
from flask import current_app
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from app.models import MIGRATION_VERSION_TABLE

config = context.config
# Keep the application's loggers alive when migrations run inside it (tests).
fileConfig(config.config_file_name, disable_existing_loggers=False)
logger = logging.getLogger("alembic.env")

target_db = current_app.extensions["migrate"].db
# The service's own database, or MIGRATIONS_DATABASE_URL (PostgreSQL itself when
# the service goes through PgBouncer).
url = make_url(current_app.config["MIGRATIONS_DATABASE_URL"])
config.set_main_option(
    "sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%")
)

# Several instances may boot at once (deploy/boot.sh runs `db upgrade`); on
# PostgreSQL they take turns on this lock instead of racing on DDL. It is a
# session lock, not a transaction one: CREATE INDEX CONCURRENTLY commits the
# migration's transaction, and the lock must outlive that.
MIGRATION_LOCK_ID = 0x41495F43484154  # "AI_CHAT"


def migration_engine():
    """A one-connection engine without the app's timeouts and autocommit."""
    connect_args = {}
    if url.get_backend_name() == "postgresql":
        connect_args = {"connect_timeout": 10, "application_name": "ai_chat_migrations"}
    return create_engine(url, poolclass=pool.NullPool, connect_args=connect_args)


def take_turn(connection) -> None:
    """Wait for the migration lock, as long as it takes, holding no snapshot.

    A blocking ``pg_advisory_lock`` would wait inside a statement, i.e. with a
    snapshot open, and the holder's ``CREATE INDEX CONCURRENTLY`` waits for
    every older snapshot: the two would deadlock. So: try, end the
    transaction, sleep, try again.
    """
    try_lock = text("SELECT pg_try_advisory_lock(:id)")
    while True:
        taken = connection.execute(try_lock, {"id": MIGRATION_LOCK_ID}).scalar()
        connection.commit()
        if taken:
            return
        logger.info("another instance is migrating; waiting for it")
        time.sleep(0.5)


def unreachable(error: OperationalError) -> SystemExit:
    """One line that says what is wrong, instead of a driver traceback."""
    reason = (str(getattr(error, "orig", error)).strip().splitlines() or ["?"])[0]
    where = url.render_as_string(hide_password=True)
    hint = ""
    if "does not exist" in reason and url.database:
        hint = f"; create it first: CREATE DATABASE \"{url.database}\";"
    return SystemExit(f"ai_chat: cannot open the database {where}: {reason}{hint}")


def run_migrations_offline():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_db.metadata,
        literal_binds=True,
        version_table=MIGRATION_VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    def process_revision_directives(context, revision, directives):
        # No empty revision files from `flask db migrate`.
        if getattr(config.cmd_opts, "autogenerate", False) and directives[0].upgrade_ops.is_empty():
            directives[:] = []
            logger.info("No changes in schema detected.")

    conf_args = dict(current_app.extensions["migrate"].configure_args)
    conf_args.setdefault("process_revision_directives", process_revision_directives)

    engine = migration_engine()
    try:
        connection = engine.connect()
    except OperationalError as error:
        raise unreachable(error) from None
    with connection:
        postgresql = connection.dialect.name == "postgresql"
        if postgresql:
            take_turn(connection)
        try:
            context.configure(
                connection=connection,
                target_metadata=target_db.metadata,
                version_table=MIGRATION_VERSION_TABLE,
                **conf_args,
            )
            with context.begin_transaction():
                context.run_migrations()
        finally:
            if postgresql:
                connection.rollback()
                connection.execute(
                    text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID}
                )
                connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
