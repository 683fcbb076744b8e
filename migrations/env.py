"""Alembic environment, run by ``flask db upgrade`` inside the app."""

import logging
from logging.config import fileConfig

from alembic import context
from flask import current_app
from sqlalchemy import text

from app.models import transaction_isolation

config = context.config
# Keep the application's loggers alive when migrations run inside it (tests).
fileConfig(config.config_file_name, disable_existing_loggers=False)
logger = logging.getLogger("alembic.env")

target_db = current_app.extensions["migrate"].db
config.set_main_option(
    "sqlalchemy.url", target_db.engine.url.render_as_string(hide_password=False).replace("%", "%%")
)

# Several instances may boot at once (deploy/boot.sh runs `db upgrade`); on
# PostgreSQL they take turns on this lock instead of racing on DDL.
MIGRATION_LOCK_ID = 0x41495F43484154  # "AI_CHAT"


def run_migrations_offline():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_db.metadata,
        literal_binds=True,
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

    with target_db.engine.connect() as connection:
        # The app's engine runs in autocommit mode; migrations (and the
        # advisory lock) need a real transaction.
        level = transaction_isolation(connection.dialect.name)
        connection = connection.execution_options(isolation_level=level)
        context.configure(connection=connection, target_metadata=target_db.metadata, **conf_args)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                lock = text("SELECT pg_advisory_xact_lock(:id)")
                connection.execute(lock, {"id": MIGRATION_LOCK_ID})
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
