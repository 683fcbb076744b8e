"""Storage: database outages, the embedded SQLite default, the database URL
settings, and migrations (contract, "Storage" and "Errors").

An unreachable database must answer 503 ``database_unavailable`` in Russian
without driver text; SQLite must run the whole API and keep the quota under
concurrency; migrations must build exactly the models' schema from nothing,
adopt the tables the old service created, and keep the contract's columns.
"""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, upgrade

from app import create_app
from app.extensions import db
from app.models import MIGRATION_VERSION_TABLE
from tests.conftest import API_KEY, Api, created_database, dsn_to_url, served
from tests.servers import ROOT, send_all_at_once

DEAD_DATABASE_URL = "postgresql://postgres@127.0.0.1:1/nowhere"
CYRILLIC = re.compile("[А-Яа-яЁё]")
DRIVER_WORDS = ("psycopg2", "connection", "127.0.0.1", "OperationalError")
APP_TABLES = {
    "ai_chat_requests", "ai_chat_daily_limits", "ai_chat_idempotency_keys",
    "ai_chat_user_settings",
}


def migrate(app) -> None:
    with app.app_context():
        upgrade()


def schema_differences(app) -> list:
    """What autogenerate would still change to make the database match the models."""
    with app.app_context(), db.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": MIGRATION_VERSION_TABLE}
        )
        return compare_metadata(context, db.metadata)


def table_names(app) -> set[str]:
    with app.app_context(), db.engine.connect() as connection:
        return set(sa.inspect(connection).get_table_names())


@pytest.fixture
def fresh_postgres():
    """An empty PostgreSQL database: yields its name, dropped afterwards."""
    with created_database("ai_chat_mig") as name:
        yield name


@pytest.fixture(params=["postgresql", "sqlite"])
def fresh_database_url(request, tmp_path):
    """An empty database of each supported kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fresh.db"
    return dsn_to_url(request.getfixturevalue("fresh_postgres"))


# --- database unreachable -------------------------------------------------------

ENDPOINTS = {
    "send": lambda api: api.send(telegram_id=42),
    "history": lambda api: api.history(telegram_id=42),
    "limits": lambda api: api.limits(telegram_id=42),
    "stats": lambda api: api.stats(telegram_id=42, days=7),
    "reset-limit": lambda api: api.reset_limit(telegram_id=42),
    "delete-history": lambda api: api.delete_history(telegram_id=42),
}


@pytest.fixture
def dead_db_api(make_api):
    return make_api(DATABASE_URL=DEAD_DATABASE_URL)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_unreachable_database_answers_503_database_unavailable(dead_db_api, endpoint):
    response = ENDPOINTS[endpoint](dead_db_api)
    assert response.status_code == 503
    assert response.get_json()["error"] == "database_unavailable"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_unreachable_database_message_is_russian_without_driver_text(dead_db_api, endpoint):
    response = ENDPOINTS[endpoint](dead_db_api)
    assert CYRILLIC.search(response.get_json()["message"])
    body = response.get_data(as_text=True)
    for word in DRIVER_WORDS:
        assert word.lower() not in body.lower()


def test_unreachable_database_send_does_not_call_the_llm(dead_db_api, fake_llm):
    response = dead_db_api.send(telegram_id=42)
    assert response.status_code == 503
    assert fake_llm.calls == 0


# --- SQLite, the embedded default ------------------------------------------------


@pytest.fixture
def sqlite_path(tmp_path):
    return tmp_path / "t.db"


@pytest.fixture
def sqlite_api(make_app, sqlite_path):
    """An ``Api`` on an app on a migrated SQLite file with DAILY_LIMIT=2."""
    app = make_app(DATABASE_URL=f"sqlite:///{sqlite_path}", DAILY_LIMIT="2")
    migrate(app)
    return Api(app.test_client())


def sqlite_rows(path: Path, statement: str, params=()) -> list:
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute(statement, params).fetchall()


def test_sqlite_send_answers_and_stores_the_exchange(sqlite_api, sqlite_path, fake_llm):
    response = sqlite_api.send(telegram_id=7, message="Как снизить возвраты?")
    assert response.status_code == 200
    body = response.get_json()
    assert body["response"] == "Ответ: Как снизить возвраты?"
    assert body["remaining_requests"] == 1
    assert body["daily_limit"] == 2
    assert sqlite_rows(
        sqlite_path, "SELECT telegram_id, message, response, tokens_used FROM ai_chat_requests"
    ) == [(7, "Как снизить возвраты?", "Ответ: Как снизить возвраты?", body["tokens_used"])]
    assert sqlite_rows(
        sqlite_path, "SELECT telegram_id, request_count FROM ai_chat_daily_limits"
    ) == [(7, 1)]
    assert fake_llm.calls == 1


def test_sqlite_exhausted_quota_answers_429(sqlite_api, sqlite_path, fake_llm):
    assert [sqlite_api.send(telegram_id=7).status_code for _ in range(2)] == [200, 200]
    response = sqlite_api.send(telegram_id=7)
    assert response.status_code == 429
    assert response.get_json()["error"] == "daily_limit_exceeded"
    assert sqlite_rows(sqlite_path, "SELECT request_count FROM ai_chat_daily_limits") == [(2,)]
    assert fake_llm.calls == 2


def test_sqlite_history_lists_exchanges_newest_first(sqlite_api):
    sqlite_api.send(telegram_id=7, message="первый")
    sqlite_api.send(telegram_id=7, message="второй")
    response = sqlite_api.history(telegram_id=7)
    assert response.status_code == 200
    body = response.get_json()
    assert body["total"] == 2
    assert [item["message"] for item in body["items"]] == ["второй", "первый"]
    assert all(re.search(r"(\+00:00|Z)$", item["created_at"]) for item in body["items"])


def test_sqlite_limits_report_todays_usage(sqlite_api):
    sqlite_api.send(telegram_id=7)
    response = sqlite_api.limits(telegram_id=7)
    assert response.status_code == 200
    body = response.get_json()
    assert (body["requests_today"], body["requests_remaining"], body["daily_limit"]) == (1, 1, 2)


def test_sqlite_stats_count_answers_and_tokens(sqlite_api):
    tokens = [sqlite_api.send(telegram_id=7).get_json()["tokens_used"] for _ in range(2)]
    response = sqlite_api.stats(telegram_id=7, days=7)
    assert response.status_code == 200
    body = response.get_json()
    assert body["total_requests"] == 2
    assert body["total_tokens"] == sum(tokens)


def test_sqlite_reset_limit_gives_the_quota_back(sqlite_api):
    sqlite_api.send(telegram_id=7)
    sqlite_api.send(telegram_id=7)
    response = sqlite_api.reset_limit(telegram_id=7)
    assert response.status_code == 200
    assert response.get_json()["success"] is True
    assert sqlite_api.limits(telegram_id=7).get_json()["requests_today"] == 0
    assert sqlite_api.send(telegram_id=7).status_code == 200


def test_sqlite_delete_history_removes_exchanges_and_keeps_the_counter(sqlite_api, sqlite_path):
    sqlite_api.send(telegram_id=7)
    sqlite_api.send(telegram_id=7)
    response = sqlite_api.delete_history(telegram_id=7)
    assert response.status_code == 200
    assert response.get_json() == {"telegram_id": 7, "deleted": 2}
    assert sqlite_rows(sqlite_path, "SELECT count(*) FROM ai_chat_requests") == [(0,)]
    assert sqlite_api.limits(telegram_id=7).get_json()["requests_today"] == 2


@pytest.fixture
def sqlite_server(make_app, sqlite_path):
    """A migrated SQLite app with DAILY_LIMIT=5 on a threaded werkzeug server."""
    app = make_app(DATABASE_URL=f"sqlite:///{sqlite_path}", DAILY_LIMIT="5")
    migrate(app)
    with served(app) as url:
        yield url


def test_sqlite_concurrent_sends_give_exactly_the_limit(sqlite_server, sqlite_path, fake_llm):
    fake_llm.latency = 0.2

    results = send_all_at_once([(sqlite_server, 7)] * 20)

    assert Counter(code for code, _ in results) == {200: 5, 429: 15}
    assert sqlite_rows(sqlite_path, "SELECT request_count FROM ai_chat_daily_limits") == [(5,)]
    assert sqlite_rows(sqlite_path, "SELECT count(*) FROM ai_chat_requests") == [(5,)]
    assert fake_llm.calls == 5


# --- which database -------------------------------------------------------------


def test_without_a_database_url_the_default_is_sqlite_under_var(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("AI_CHAT_DATABASE_URL", raising=False)
    app = create_app({"API_SECRET_KEY": API_KEY})
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    assert uri.startswith("sqlite:///")
    path = Path(uri.removeprefix("sqlite:///"))
    assert path.is_absolute()
    assert path.parent == ROOT / "var"


@pytest.mark.parametrize(
    "ai_chat_url, plain_url, expected",
    [
        ("sqlite:////srv/ai.db", "postgresql+psycopg2://u@db/main", "sqlite:////srv/ai.db"),
        (
            "postgresql+psycopg2://u@db/ai",
            "sqlite:////srv/main.db",
            "postgresql+psycopg2://u@db/ai",
        ),
    ],
)
def test_ai_chat_database_url_wins_over_database_url(ai_chat_url, plain_url, expected):
    app = create_app(
        {
            "API_SECRET_KEY": API_KEY,
            "AI_CHAT_DATABASE_URL": ai_chat_url,
            "DATABASE_URL": plain_url,
        }
    )
    assert app.config["SQLALCHEMY_DATABASE_URI"] == expected


# --- migrations -----------------------------------------------------------------


def test_migrations_on_an_empty_database_match_the_models(make_app, fresh_database_url):
    app = make_app(DATABASE_URL=fresh_database_url)
    migrate(app)
    assert APP_TABLES <= table_names(app)
    assert schema_differences(app) == []


def test_downgrade_to_base_then_upgrade_again_matches_the_models(make_app, fresh_database_url):
    app = make_app(DATABASE_URL=fresh_database_url)
    migrate(app)
    with app.app_context():
        downgrade(revision="base")
    assert not APP_TABLES & table_names(app)
    migrate(app)
    assert schema_differences(app) == []


# --- the contract's tables and columns ------------------------------------------

CONTRACT_COLUMNS = [
    ("ai_chat_requests", "telegram_id", "BIGINT"),
    ("ai_chat_requests", "user_id", "INTEGER"),
    ("ai_chat_requests", "message", "TEXT"),
    ("ai_chat_requests", "response", "TEXT"),
    ("ai_chat_requests", "tokens_used", "INTEGER"),
    ("ai_chat_requests", "request_date", "DATE"),
    ("ai_chat_requests", "created_at", "TIMESTAMP WITH TIME ZONE"),
    ("ai_chat_daily_limits", "telegram_id", "BIGINT"),
    ("ai_chat_daily_limits", "request_count", "INTEGER"),
    ("ai_chat_daily_limits", "last_reset_date", "DATE"),
]


@pytest.fixture
def inspected(make_app):
    """Reflect the migrated PostgreSQL test database: table → {column: info}."""
    app = make_app()
    with app.app_context(), db.engine.connect() as connection:
        inspector = sa.inspect(connection)
        dialect = connection.dialect
        tables = {
            table: {
                "columns": {
                    column["name"]: {
                        "type": column["type"].compile(dialect=dialect),
                        "nullable": column["nullable"],
                    }
                    for column in inspector.get_columns(table)
                },
                "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
                "unique": [c["column_names"] for c in inspector.get_unique_constraints(table)]
                + [i["column_names"] for i in inspector.get_indexes(table) if i["unique"]],
            }
            for table in ("ai_chat_requests", "ai_chat_daily_limits")
        }
    return tables


@pytest.mark.parametrize("table, column, sql_type", CONTRACT_COLUMNS)
def test_contract_column_keeps_its_type(inspected, table, column, sql_type):
    assert inspected[table]["columns"][column]["type"] == sql_type


@pytest.mark.parametrize("table", ["ai_chat_requests", "ai_chat_daily_limits"])
def test_contract_table_has_id_primary_key(inspected, table):
    assert inspected[table]["primary_key"] == ["id"]


@pytest.mark.parametrize(
    "table, columns",
    [
        (
            "ai_chat_requests",
            {"id", "telegram_id", "user_id", "message", "response", "tokens_used",
             "request_date", "created_at"},
        ),
        (
            "ai_chat_daily_limits",
            {"id", "telegram_id", "request_count", "last_reset_date", "created_at",
             "updated_at"},
        ),
    ],
)
def test_contract_table_has_all_its_columns(inspected, table, columns):
    assert columns <= set(inspected[table]["columns"])


def test_user_id_is_nullable(inspected):
    assert inspected["ai_chat_requests"]["columns"]["user_id"]["nullable"] is True


def test_daily_limits_telegram_id_is_unique(inspected):
    assert ["telegram_id"] in inspected["ai_chat_daily_limits"]["unique"]
