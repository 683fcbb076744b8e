"""The database shared with the main server (PostgreSQL): adopting the old
service's tables, and migrations that are safe on a live database.

The old FastAPI service made ``ai_chat_requests`` and ``ai_chat_daily_limits``
with SQLAlchemy's ``create_all``; the main server keeps its own Alembic state
in ``alembic_version``. Booting this service on such a database (deploy/boot.sh,
what ``make run`` and the Docker image start) must adopt the old tables with
their rows, never touch ``alembic_version``, build its indexes without blocking
writers, take turns with other booting instances, and change nothing the
second time. The old schema is written here by hand, exactly as ``create_all``
emitted it, so that the migrations cannot grade their own homework.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import requests
from alembic.script import ScriptDirectory
from psycopg2 import errors

from app import create_app
from tests.conftest import (
    API_KEY,
    TABLES,
    Api,
    base_env,
    created_database,
    dsn_to_url,
    migrate_to_head,
    pg_connect,
)
from tests.servers import ROOT, VENV_BIN, ServerProcess, free_port, post_send

BOOT = ROOT / "deploy" / "boot.sh"
FLASK = VENV_BIN / "flask"
TIMEZONE = ZoneInfo("Europe/Moscow")
MIGRATION_LOCK_ID = 0x41495F43484154
MAIN_SERVER_REVISION = "f00dfeedcafe"
HEADS = set(ScriptDirectory(str(ROOT / "migrations")).get_heads())

# What SQLAlchemy's create_all emitted on PostgreSQL for the old service's
# models: SERIAL ids, one ix_<table>_<column> index per index=True column, a
# UNIQUE INDEX (not a constraint) for unique=True + index=True, and no server
# defaults (default=0 and default=func.now() were client-side).
OLD_SERVICE_SCHEMA = """
CREATE TABLE ai_chat_daily_limits (
    id SERIAL NOT NULL,
    telegram_id BIGINT NOT NULL,
    request_count INTEGER NOT NULL,
    last_reset_date DATE NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE,
    PRIMARY KEY (id)
);
CREATE INDEX ix_ai_chat_daily_limits_id ON ai_chat_daily_limits (id);
CREATE INDEX ix_ai_chat_daily_limits_last_reset_date ON ai_chat_daily_limits (last_reset_date);
CREATE UNIQUE INDEX ix_ai_chat_daily_limits_telegram_id ON ai_chat_daily_limits (telegram_id);
CREATE TABLE ai_chat_requests (
    id SERIAL NOT NULL,
    telegram_id BIGINT NOT NULL,
    user_id INTEGER,
    message TEXT NOT NULL,
    response TEXT NOT NULL,
    tokens_used INTEGER,
    request_date DATE NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX ix_ai_chat_requests_id ON ai_chat_requests (id);
CREATE INDEX ix_ai_chat_requests_created_at ON ai_chat_requests (created_at);
CREATE INDEX ix_ai_chat_requests_user_id ON ai_chat_requests (user_id);
CREATE INDEX ix_ai_chat_requests_telegram_id ON ai_chat_requests (telegram_id);
CREATE INDEX ix_ai_chat_requests_request_date ON ai_chat_requests (request_date);
"""

# The main server's own Alembic state and one of its tables.
MAIN_SERVER_SCHEMA = """
CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
INSERT INTO alembic_version (version_num) VALUES ('f00dfeedcafe');
CREATE TABLE users (id SERIAL PRIMARY KEY, telegram_id BIGINT NOT NULL UNIQUE);
INSERT INTO users (telegram_id) VALUES (777), (778), (779);
"""

# Users of the old service's rows: one with history, one with a spent
# counter from yesterday, one whose history becomes the model's context.
HISTORY_USER, YESTERDAY_USER, CONTEXT_USER = 777, 778, 779
OLD_EXCHANGES = {
    HISTORY_USER: [("Как выбрать нишу?", "Начните с анализа спроса.", 120),
                   ("А сезонность?", "Смотрите продажи по месяцам.", None)],
    CONTEXT_USER: [("Как снизить возвраты?", "Проверьте размерную сетку.", None),
                   ("А фото?", "Снимайте товар на модели.", 80)],
}
OLD_ROWS = """
INSERT INTO ai_chat_requests
    (telegram_id, user_id, message, response, tokens_used, request_date, created_at)
VALUES (%(telegram_id)s, 1, %(message)s, %(response)s, %(tokens)s, %(day)s,
        now() - interval '1 day')
"""
OLD_COUNTER = """
INSERT INTO ai_chat_daily_limits (telegram_id, request_count, last_reset_date, created_at)
VALUES (%(telegram_id)s, 30, %(day)s, now() - interval '1 day')
"""

OLD_INDEXES = {
    "ix_ai_chat_requests_id", "ix_ai_chat_requests_telegram_id", "ix_ai_chat_requests_user_id",
    "ix_ai_chat_requests_request_date", "ix_ai_chat_requests_created_at",
    "ai_chat_requests_pkey", "ix_ai_chat_daily_limits_id", "ix_ai_chat_daily_limits_telegram_id",
    "ix_ai_chat_daily_limits_last_reset_date", "ai_chat_daily_limits_pkey",
}
OUR_INDEXES = {
    "ix_ai_chat_requests_telegram_id_id": "(telegram_id, id)",
    "ix_ai_chat_requests_telegram_id_request_date": "(telegram_id, request_date)",
    "ix_ai_chat_idempotency_keys_chat_request_id": "(chat_request_id)",
}


# --- helpers ------------------------------------------------------------------------


def today() -> date:
    """Today in the service's time zone (AI_CHAT_TIMEZONE of base_env)."""
    return datetime.now(TIMEZONE).date()


def rows(dbname: str, statement: str, params=None) -> list[tuple]:
    with closing(pg_connect(dbname)) as connection, connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def build_old_service_database(dbname: str) -> None:
    """The database as production has it: the main server's Alembic state and
    table, and the old service's tables with rows; none of our migrations run."""
    yesterday = today() - timedelta(days=1)
    with closing(pg_connect(dbname)) as connection, connection.cursor() as cursor:
        cursor.execute(OLD_SERVICE_SCHEMA + MAIN_SERVER_SCHEMA)
        for telegram_id, exchanges in OLD_EXCHANGES.items():
            for message, response, tokens in exchanges:
                cursor.execute(OLD_ROWS, {"telegram_id": telegram_id, "message": message,
                                          "response": response, "tokens": tokens,
                                          "day": yesterday})
        cursor.execute(OLD_COUNTER, {"telegram_id": YESTERDAY_USER, "day": yesterday})


@pytest.fixture
def adopted_database():
    """The old service's database (name), our migrations not yet run."""
    with created_database("ai_chat_shared") as name:
        build_old_service_database(name)
        yield name


def indexes(dbname: str) -> dict[str, tuple[str, bool]]:
    """Every index of our tables → (its definition, whether it is valid)."""
    found = rows(
        dbname,
        "SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid "
        "WHERE t.relname LIKE 'ai_chat%' AND t.relnamespace = 'public'::regnamespace",
    )
    return {name: (definition, valid) for name, definition, valid in found}


def columns(dbname: str, table: str) -> list[tuple]:
    """(name, type, nullable, server default) of ``table``'s columns, in order."""
    return rows(
        dbname,
        "SELECT column_name, data_type, is_nullable, column_default "
        "FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s "
        "ORDER BY ordinal_position",
        (table,),
    )


def table_shape(dbname: str, table: str) -> dict:
    """What a writer of ``table`` depends on: columns, owned sequences,
    constraints and index definitions."""
    return {
        "columns": columns(dbname, table),
        # SERIAL: an integer sequence owned by the table.
        "owned_sequences": rows(
            dbname,
            "SELECT s.sequencename, s.data_type FROM pg_sequences s "
            "JOIN pg_class c ON c.relname = s.sequencename "
            "JOIN pg_depend d ON d.objid = c.oid AND d.deptype = 'a' "
            "WHERE d.refobjid = %s::regclass",
            (table,),
        ),
        "constraints": sorted(rows(
            dbname,
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = %s::regclass",
            (table,),
        )),
        "indexes": sorted(rows(
            dbname, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", (table,)
        )),
    }


def versions(dbname: str, table: str) -> set[str]:
    return {version for (version,) in rows(dbname, f"SELECT version_num FROM {table}")}


def cli_env(database_url: str) -> dict:
    """The environment of ``flask db upgrade`` as an operator runs it."""
    env = {
        key: value for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "AI_CHAT_DATABASE_URL", "MIGRATIONS_DATABASE_URL")
    }
    env.update(API_SECRET_KEY=API_KEY, DATABASE_URL=database_url,
               AI_CHAT_ENV_FILE=os.devnull, FLASK_SKIP_DOTENV="1")
    return env


@contextmanager
def upgrade_process(database_url: str):
    """``flask --app wsgi db upgrade`` started in the background; killed if the
    test leaves it running."""
    process = subprocess.Popen(
        [str(FLASK), "--app", "wsgi", "db", "upgrade"],
        cwd=ROOT, env=cli_env(database_url),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        if not process.stdout.closed:
            process.communicate(timeout=30)


def finished(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Wait for an upgrade process: (exit status, its stdout and stderr)."""
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout + stderr


def run_upgrade(database_url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(FLASK), "--app", "wsgi", "db", "upgrade"],
        cwd=ROOT, env=cli_env(database_url), capture_output=True, text=True, timeout=120,
    )


def migration_backends(dbname: str, wait_event: str, query_like: str = "%") -> list[tuple]:
    """(pid, query) of migration connections waiting on a ``wait_event`` lock."""
    return rows(
        dbname,
        "SELECT pid, query FROM pg_stat_activity WHERE datname = %s "
        "AND application_name = 'ai_chat_migrations' AND wait_event_type = 'Lock' "
        "AND wait_event = %s AND query LIKE %s",
        (dbname, wait_event, query_like),
    )


def migration_connections(dbname: str) -> int:
    """How many migration engines (``flask db upgrade``) are connected."""
    return rows(
        dbname,
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = %s AND application_name = 'ai_chat_migrations'",
        (dbname,),
    )[0][0]


def tables_of_ours(dbname: str) -> list[tuple]:
    return rows(dbname, "SELECT tablename FROM pg_tables WHERE tablename LIKE 'ai_chat%'")


def wait_for(predicate, what: str, processes=(), timeout: float = 60.0):
    """Poll ``predicate`` until it returns something truthy (its value), or fail;
    fail at once when one of ``processes`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for process in processes:
            if process.poll() is not None:
                pytest.fail(f"exited {process.returncode} before {what}: {process.communicate()}")
        time.sleep(0.1)
    pytest.fail(f"no {what} within {timeout}s")


@contextmanager
def service_api(database_url: str, llm_url: str):
    """An ``Api`` on the service (in this process) on ``database_url``."""
    from app.extensions import db

    app = create_app(base_env(database_url, llm_url))
    app.config["TESTING"] = True
    try:
        yield Api(app.test_client())
    finally:
        app.extensions["llm"].close()
        with app.app_context():
            db.engine.dispose()


# --- make run's path, twice, on the shared database -------------------------------------


def boot_env(database_url: str, llm_url: str, port: int) -> dict:
    env = {
        key: value for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "AI_CHAT_DATABASE_URL", "MIGRATIONS_DATABASE_URL")
        and not key.startswith(("PROMETHEUS_", "AI_CHAT_METRICS_", "GUNICORN_"))
    }
    env.update(base_env(database_url, llm_url))
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        AI_CHAT_ENV_FILE=os.devnull,
        GUNICORN_BIND=f"127.0.0.1:{port}",
        WEB_CONCURRENCY="1",
        GUNICORN_THREADS="4",
    )
    return env


@dataclass
class Boots:
    """The old service's database booted on twice, the second instance still up."""

    database: str
    url: str
    indexes_before: dict
    shape_after_first: dict
    first_log: str
    second_log: str


def shapes(dbname: str) -> dict:
    """Every table of ours, shape and migration state."""
    return {
        **{table: table_shape(dbname, table) for table in TABLES},
        "versions": versions(dbname, "ai_chat_alembic_version"),
    }


@pytest.fixture(scope="module")
def booted_twice(tmp_path_factory, _fake_llm_server):
    """deploy/boot.sh booted on the old service's database, stopped, and booted
    again (still serving): ``Boots``."""
    log_dir = tmp_path_factory.mktemp("boot")

    def boot(log_name: str) -> ServerProcess:
        port = free_port()
        return ServerProcess(
            [str(BOOT)], port=port, log_path=log_dir / log_name, cwd=log_dir,
            env=boot_env(url, _fake_llm_server.url, port), name=log_name,
        ).start(timeout=120)

    with created_database("ai_chat_shared") as name:
        build_old_service_database(name)
        indexes_before = indexes(name)
        url = dsn_to_url(name)
        first = boot("first-boot.log")
        first.stop()
        shape_after_first = shapes(name)
        second = boot("second-boot.log")
        try:
            yield Boots(name, second.url, indexes_before, shape_after_first,
                        first.log(), second.log())
        finally:
            second.stop()


def history(base_url: str, telegram_id: int) -> requests.Response:
    return requests.post(f"{base_url}/v1/chat/history", json={"telegram_id": telegram_id},
                         headers={"X-API-KEY": API_KEY}, timeout=30)


def test_booting_leaves_the_main_servers_alembic_version_alone(booted_twice):
    assert rows(booted_twice.database, "SELECT version_num FROM alembic_version") == [
        (MAIN_SERVER_REVISION,)
    ]


def test_booting_keeps_the_main_servers_table_and_rows(booted_twice):
    assert rows(booted_twice.database, "SELECT telegram_id FROM users ORDER BY id") == [
        (777,), (778,), (779,)
    ]


def test_booting_records_our_head_in_ai_chat_alembic_version(booted_twice):
    assert versions(booted_twice.database, "ai_chat_alembic_version") == HEADS


def test_booted_service_serves_the_old_rows_as_history_with_missing_tokens_as_0(booted_twice):
    response = history(booted_twice.url, HISTORY_USER)

    assert response.status_code == 200
    body = response.json()
    assert body["total"] == 2
    newest_first = list(reversed(OLD_EXCHANGES[HISTORY_USER]))
    assert [(item["message"], item["response"], item["tokens_used"], item["model"])
            for item in body["items"]] == [
        (message, answer, tokens or 0, None) for message, answer, tokens in newest_first
    ]


def test_booted_service_gives_the_model_the_old_rows_as_context(booted_twice, fake_llm):
    status, _ = post_send(booted_twice.url, CONTEXT_USER, "А цены?")

    assert status == 200
    messages = fake_llm.requests[-1]["body"]["messages"]
    past = [message for message in messages[:-1] if message["role"] != "system"]
    expected = []
    for message, answer, _ in OLD_EXCHANGES[CONTEXT_USER]:
        expected += [{"role": "user", "content": message},
                     {"role": "assistant", "content": answer}]
    assert past == expected
    assert messages[-1] == {"role": "user", "content": "А цены?"}


def test_booted_service_restarts_an_old_counter_spent_yesterday(booted_twice, fake_llm):
    status, body = post_send(booted_twice.url, YESTERDAY_USER)

    assert status == 200, body
    assert body["remaining_requests"] == 29
    assert rows(
        booted_twice.database,
        "SELECT request_count, last_reset_date FROM ai_chat_daily_limits "
        "WHERE telegram_id = %s", (YESTERDAY_USER,)
    ) == [(1, today())]


def test_booting_keeps_every_old_index_as_it_was(booted_twice):
    before = booted_twice.indexes_before
    assert set(before) == OLD_INDEXES
    after = indexes(booted_twice.database)
    assert {index: after.get(index) for index in before} == before


@pytest.mark.parametrize("index", sorted(OUR_INDEXES))
def test_booting_adds_our_indexes_and_they_are_valid(booted_twice, index):
    definition, valid = indexes(booted_twice.database)[index]
    assert definition.endswith(f"USING btree {OUR_INDEXES[index]}")
    assert valid is True


def test_the_first_boot_runs_our_migrations(booted_twice):
    assert "Running upgrade  -> 0001" in booted_twice.first_log


def test_booting_a_second_time_runs_no_migration(booted_twice):
    # boot.sh runs `flask db upgrade` under `set -e`: serving means it exited 0.
    assert "Running upgrade" not in booted_twice.second_log


def test_booting_a_second_time_changes_no_table(booted_twice):
    assert shapes(booted_twice.database) == booted_twice.shape_after_first


# --- an empty database gets the old shape -------------------------------------------------


@pytest.fixture(scope="module")
def migrated_empty_database():
    """An empty PostgreSQL database after our migrations (its name)."""
    with created_database("ai_chat_empty") as name:
        migrate_to_head(dsn_to_url(name))
        yield name


@pytest.fixture(scope="module")
def old_service_database():
    """A database with only the old service's create_all schema (its name)."""
    with created_database("ai_chat_old") as name:
        rows(name, OLD_SERVICE_SCHEMA)
        yield name


@pytest.mark.parametrize("table", ["ai_chat_requests", "ai_chat_daily_limits"])
def test_migrating_an_empty_database_creates_the_old_table_exactly_as_create_all_did(
    migrated_empty_database, old_service_database, table
):
    migrated = table_shape(migrated_empty_database, table)
    old = table_shape(old_service_database, table)
    added = {
        # Added on every database, adopted or not: by 0004, and by 0005.
        "ai_chat_requests": [
            ("model", "character varying", "YES", None), ("tools", "text", "YES", None),
            ("prompt_tokens", "integer", "YES", None),
            ("completion_tokens", "integer", "YES", None), ("cost", "numeric", "YES", None),
        ],
        "ai_chat_daily_limits": [
            ("spend", "numeric", "YES", None), ("spend_reserved", "numeric", "YES", None),
        ],
    }[table]
    assert migrated["columns"][-len(added):] == added
    del migrated["columns"][-len(added):]
    if table == "ai_chat_requests":
        migrated["indexes"] = [
            (name, definition) for name, definition in migrated["indexes"]
            if name not in OUR_INDEXES
        ]
    assert migrated == old


@pytest.mark.parametrize("table", ["ai_chat_requests", "ai_chat_daily_limits"])
def test_migrated_old_tables_have_no_server_defaults_but_the_id_sequence(
    migrated_empty_database, table
):
    defaults = {name: default for name, _, _, default in columns(migrated_empty_database, table)}
    assert defaults.pop("id") == f"nextval('{table}_id_seq'::regclass)"
    assert set(defaults.values()) == {None}


@pytest.mark.parametrize(
    "table, column",
    [("ai_chat_requests", "tokens_used"), ("ai_chat_daily_limits", "updated_at")],
)
def test_migrated_old_tables_keep_the_old_nullable_columns(migrated_empty_database, table, column):
    nullable = {name: flag for name, _, flag, _ in columns(migrated_empty_database, table)}
    assert nullable[column] == "YES"


def test_migrated_daily_limits_telegram_id_is_the_old_unique_index(migrated_empty_database):
    definition, valid = indexes(migrated_empty_database)["ix_ai_chat_daily_limits_telegram_id"]
    assert definition == (
        "CREATE UNIQUE INDEX ix_ai_chat_daily_limits_telegram_id "
        "ON public.ai_chat_daily_limits USING btree (telegram_id)"
    )
    assert valid is True


def test_a_counter_inserted_the_old_way_is_counted_by_the_service(
    migrated_empty_database, fake_llm
):
    rows(
        migrated_empty_database,
        "INSERT INTO ai_chat_daily_limits (telegram_id, request_count, last_reset_date, "
        "created_at) VALUES (501, 7, %s, now())",
        (today(),),
    )

    with service_api(dsn_to_url(migrated_empty_database), fake_llm.url) as api:
        response = api.limits(telegram_id=501)

    assert response.status_code == 200
    assert response.get_json()["requests_today"] == 7
    assert response.get_json()["requests_remaining"] == 23


def test_an_exchange_inserted_the_old_way_is_served_as_history(
    migrated_empty_database, fake_llm
):
    rows(
        migrated_empty_database,
        "INSERT INTO ai_chat_requests (telegram_id, user_id, message, response, request_date, "
        "created_at) VALUES (502, 1, 'Вопрос оператора', 'Ответ оператора', %s, now())",
        (today(),),
    )

    with service_api(dsn_to_url(migrated_empty_database), fake_llm.url) as api:
        response = api.history(telegram_id=502)

    assert response.status_code == 200
    [item] = response.get_json()["items"]
    assert (item["message"], item["response"], item["tokens_used"], item["model"]) == (
        "Вопрос оператора", "Ответ оператора", 0, None
    )


# --- migrations: no app timeouts, instances take turns --------------------------------------


@pytest.fixture
def empty_database():
    with created_database("ai_chat_turns") as name:
        yield name


@contextmanager
def migration_lock_held(dbname: str):
    """A connection of the test holding the migrations' advisory lock."""
    with closing(pg_connect(dbname)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
        yield lambda: cursor.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))


def test_upgrade_waits_for_the_migration_lock_longer_than_the_app_timeouts(empty_database):
    with migration_lock_held(empty_database) as release, \
            upgrade_process(dsn_to_url(empty_database)) as process:
        wait_for(lambda: migration_connections(empty_database) == 1,
                 "migration connected", [process])
        # Longer than the app's statement_timeout (5 s) and lock_timeout (3 s):
        # still waiting, neither failed nor migrating without the lock.
        held_until = time.monotonic() + 6
        while time.monotonic() < held_until:
            assert process.poll() is None, process.communicate()
            assert tables_of_ours(empty_database) == []
            time.sleep(0.2)

        release()
        status, output = finished(process)

    assert status == 0, output
    assert versions(empty_database, "ai_chat_alembic_version") == HEADS


def test_two_upgrades_started_together_both_succeed_and_one_runs_the_migrations(
    empty_database,
):
    url = dsn_to_url(empty_database)
    # Both wait at the lock until both are past their start, then race for it.
    with migration_lock_held(empty_database) as release, \
            upgrade_process(url) as first, upgrade_process(url) as second:
        wait_for(lambda: migration_connections(empty_database) == 2,
                 "both migrations connected", [first, second])
        release()
        outcomes = [finished(first), finished(second)]

    assert [status for status, _ in outcomes] == [0, 0], outcomes
    assert sorted("Running upgrade" in output for _, output in outcomes) == [False, True]
    assert versions(empty_database, "ai_chat_alembic_version") == HEADS


# --- indexes on a busy adopted table ---------------------------------------------------------

NEW_ROW = (
    "INSERT INTO ai_chat_requests (telegram_id, message, response, request_date, created_at) "
    "VALUES (900, 'q', 'a', current_date, now())"
)


def test_building_an_index_on_the_busy_adopted_table_never_blocks_its_writers(
    adopted_database,
):
    url = dsn_to_url(adopted_database)
    # Up to 0002 first: its foreign key to ai_chat_requests needs a brief lock
    # that waits (retried) for open writers. The subject is 0003's index build.
    migrate_to_head(url, "0002")
    with closing(pg_connect(adopted_database)) as writer, \
            closing(pg_connect(adopted_database)) as other_writer:
        writer.autocommit = False
        with writer.cursor() as cursor:
            cursor.execute(NEW_ROW)
        with upgrade_process(url) as process:
            wait_for(
                lambda: migration_backends(
                    adopted_database, "virtualxid",
                    "CREATE INDEX CONCURRENTLY%ix_ai_chat_requests_telegram_id_id%",
                ),
                "CREATE INDEX CONCURRENTLY waiting for the open writer", [process],
            )

            with other_writer.cursor() as cursor:
                # A plain CREATE INDEX would queue this insert behind its SHARE lock.
                cursor.execute("SET lock_timeout = '1s'")
                cursor.execute(NEW_ROW)
            still_building = migration_backends(
                adopted_database, "virtualxid", "CREATE INDEX CONCURRENTLY%"
            )
            writer.commit()
            status, output = finished(process)

    assert still_building, "the index build ended before the second insert"
    assert status == 0, output
    assert indexes(adopted_database)["ix_ai_chat_requests_telegram_id_id"][1] is True
    inserted = "SELECT count(*) FROM ai_chat_requests WHERE telegram_id = 900"
    assert rows(adopted_database, inserted) == [(2,)]


def test_an_invalid_index_left_by_a_failed_concurrent_build_is_rebuilt(adopted_database):
    with closing(pg_connect(adopted_database)) as connection, connection.cursor() as cursor:
        # The old rows hold two exchanges per user: the unique build fails.
        with pytest.raises(errors.UniqueViolation):
            cursor.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY ix_ai_chat_requests_telegram_id_id "
                "ON ai_chat_requests (telegram_id)"
            )
    assert indexes(adopted_database)["ix_ai_chat_requests_telegram_id_id"][1] is False

    migrate_to_head(dsn_to_url(adopted_database))

    assert indexes(adopted_database)["ix_ai_chat_requests_telegram_id_id"] == (
        "CREATE INDEX ix_ai_chat_requests_telegram_id_id "
        "ON public.ai_chat_requests USING btree (telegram_id, id)",
        True,
    )


# --- the previous version's development database ---------------------------------------------

# What v1 of this service left: its state in alembic_version, an
# idempotency table without claim_token, a unique constraint on the counter.
V1_SCHEMA = """
CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
INSERT INTO alembic_version VALUES ('0002');
CREATE TABLE ai_chat_requests (
    id SERIAL PRIMARY KEY, telegram_id BIGINT NOT NULL, user_id INTEGER,
    message TEXT NOT NULL, response TEXT NOT NULL, tokens_used INTEGER NOT NULL,
    request_date DATE NOT NULL, created_at TIMESTAMP WITH TIME ZONE NOT NULL
);
CREATE INDEX ix_ai_chat_requests_telegram_id_id ON ai_chat_requests (telegram_id, id);
CREATE INDEX ix_ai_chat_requests_telegram_id_request_date
    ON ai_chat_requests (telegram_id, request_date);
CREATE TABLE ai_chat_daily_limits (
    id SERIAL PRIMARY KEY, telegram_id BIGINT NOT NULL, request_count INTEGER NOT NULL,
    last_reset_date DATE NOT NULL, created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    CONSTRAINT uq_ai_chat_daily_limits_telegram_id UNIQUE (telegram_id)
);
CREATE TABLE ai_chat_idempotency_keys (
    id SERIAL PRIMARY KEY, telegram_id BIGINT NOT NULL, request_id VARCHAR(128) NOT NULL,
    message_sha256 VARCHAR(64) NOT NULL,
    chat_request_id INTEGER REFERENCES ai_chat_requests (id) ON DELETE CASCADE,
    claimed_at TIMESTAMP WITH TIME ZONE NOT NULL,
    CONSTRAINT uq_ai_chat_idempotency_keys_key UNIQUE (telegram_id, request_id)
);
"""


@pytest.fixture(scope="module")
def upgraded_v1_database():
    """A v1 development database after ``flask db upgrade`` (its name)."""
    with created_database("ai_chat_v1") as name:
        rows(name, V1_SCHEMA)
        migrate_to_head(dsn_to_url(name))
        yield name


def test_v1_database_upgrades_to_our_head(upgraded_v1_database):
    assert versions(upgraded_v1_database, "ai_chat_alembic_version") == HEADS


def test_v1_database_gets_claim_token(upgraded_v1_database):
    added = {column for column, *_ in columns(upgraded_v1_database, "ai_chat_idempotency_keys")}
    assert "claim_token" in added


def test_v1_databases_alembic_version_is_left_alone(upgraded_v1_database):
    assert rows(upgraded_v1_database, "SELECT version_num FROM alembic_version") == [("0002",)]


def test_v1_database_serves_an_idempotent_send_after_the_upgrade(upgraded_v1_database, fake_llm):
    with service_api(dsn_to_url(upgraded_v1_database), fake_llm.url) as api:
        first = api.send(telegram_id=601, request_id="r-1")
        again = api.send(telegram_id=601, request_id="r-1")

    assert first.status_code == again.status_code == 200
    assert again.get_json()["response"] == first.get_json()["response"]
    assert fake_llm.calls == 1
    assert rows(upgraded_v1_database,
                "SELECT claim_token IS NOT NULL FROM ai_chat_idempotency_keys")  == [(True,)]


# --- a database that cannot be opened ------------------------------------------------------


def output_lines(completed: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (completed.stdout + completed.stderr).splitlines() if line.strip()]


def test_upgrade_on_a_missing_database_says_in_one_line_to_create_it():
    missing = f"ai_chat_missing_{uuid.uuid4().hex[:10]}"

    completed = run_upgrade(dsn_to_url(missing))

    assert completed.returncode != 0
    lines = output_lines(completed)
    assert len(lines) == 1, lines
    [line] = lines
    assert line in completed.stderr
    assert f'CREATE DATABASE "{missing}"' in line
    assert "Traceback" not in completed.stderr


def test_upgrade_on_an_unreachable_server_fails_with_one_line():
    port = free_port()

    completed = run_upgrade(f"postgresql://postgres@127.0.0.1:{port}/ai_chat")

    assert completed.returncode != 0
    lines = output_lines(completed)
    assert len(lines) == 1, lines
    [line] = lines
    assert line in completed.stderr
    assert f"127.0.0.1:{port}" in line
    assert "Traceback" not in completed.stderr


