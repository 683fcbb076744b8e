"""Shared fixtures: a throwaway PostgreSQL database migrated once per session,
a fake OpenAI-compatible server on loopback, and apps built from env-style
overrides, layered app → client → api helpers."""

from __future__ import annotations

import functools
import os
import threading
import uuid
from contextlib import closing, contextmanager
from datetime import UTC, datetime

import psycopg2
import pytest
import redis
from flask_migrate import upgrade
from werkzeug.serving import make_server

# The suite must not depend on a developer's .env: the app, gunicorn.conf.py and
# every process the tests start read this file instead of <repo>/.env.
os.environ["AI_CHAT_ENV_FILE"] = os.devnull

from app import create_app  # noqa: E402
from app.cache import Cache  # noqa: E402
from tests.fake_llm import FakeLLM  # noqa: E402
from tests.fake_main_server import FakeMainServer  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.redis_server import unavailable_reason as redis_server_missing  # noqa: E402
from tests.servers import API_KEY  # noqa: E402

ADMIN_DSN = os.environ.get("TEST_POSTGRES_DSN", "host=127.0.0.1 port=5432 user=postgres")
TABLES = (
    "ai_chat_idempotency_keys", "ai_chat_requests", "ai_chat_daily_limits", "ai_chat_user_settings",
    "ai_chat_llm_calls", "ai_chat_summaries",
)


def pg_connect(dbname: str):
    connection = psycopg2.connect(f"{ADMIN_DSN} dbname={dbname}")
    connection.autocommit = True
    return connection


def dsn_to_url(dbname: str) -> str:
    parts = dict(item.split("=", 1) for item in ADMIN_DSN.split())
    user = parts.get("user", "postgres")
    host = parts.get("host", "127.0.0.1")
    port = parts.get("port", "5432")
    return f"postgresql://{user}@{host}:{port}/{dbname}"


@contextmanager
def created_database(prefix: str):
    """An empty PostgreSQL database (its name), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with closing(pg_connect("postgres")) as admin, admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
        try:
            yield name
        finally:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def counters_and_rows(dsn: str) -> tuple[dict, dict]:
    """Per telegram_id: the quota counter, and the number of stored exchanges."""
    with closing(psycopg2.connect(dsn)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT telegram_id, request_count FROM ai_chat_daily_limits")
        counters = dict(cursor.fetchall())
        cursor.execute("SELECT telegram_id, count(*) FROM ai_chat_requests GROUP BY telegram_id")
        return counters, dict(cursor.fetchall())


def request_count(sql, telegram_id: int = 1) -> int:
    """The user's stored quota counter, 0 when there is no counter row."""
    rows = sql(
        "SELECT request_count FROM ai_chat_daily_limits WHERE telegram_id = %s", (telegram_id,)
    )
    return rows[0][0] if rows else 0


def exchange_count(sql, telegram_id: int = 1) -> int:
    """How many exchanges of the user are stored."""
    return sql("SELECT count(*) FROM ai_chat_requests WHERE telegram_id = %s", (telegram_id,))[0][0]


def assert_counted_stored_and_called(sql, fake_llm, answers: int, telegram_id: int = 1) -> None:
    """The user's counter, stored exchanges and the LLM's calls all equal ``answers``."""
    assert request_count(sql, telegram_id) == answers
    assert exchange_count(sql, telegram_id) == answers
    assert fake_llm.calls == answers


@pytest.fixture(scope="session")
def database_name():
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    with created_database("ai_chat_test") as name:
        yield name


def migrate_to_head(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to the head revision (or ``revision``)
    through Flask-Migrate, in this process."""
    from app.extensions import db

    app = create_app({"API_SECRET_KEY": API_KEY, "DATABASE_URL": url})
    with app.app_context():
        upgrade(revision=revision)
        db.engine.dispose()


@pytest.fixture(scope="session")
def database_url(database_name):
    """The test database, migrated to head through Flask-Migrate."""
    url = dsn_to_url(database_name)
    migrate_to_head(url)
    return url


@pytest.fixture(scope="session")
def _fake_llm_server():
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm(_fake_llm_server):
    """The fake OpenAI-compatible server, with a clean script and records."""
    _fake_llm_server.reset()
    yield _fake_llm_server
    _fake_llm_server.reset()


@pytest.fixture
def sql(database_name):
    """Run SQL against the test database: ``sql("SELECT ...", params)`` → rows."""
    connection = pg_connect(database_name)

    def run(statement: str, params=None):
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else cursor.rowcount

    yield run
    connection.close()


@pytest.fixture(autouse=True)
def _clean_tables(request):
    """Every test starts from empty tables (when it uses the database)."""
    yield
    if "database_url" in request.fixturenames:
        connection = pg_connect(request.getfixturevalue("database_name"))
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        connection.close()


def base_env(database_url: str, llm_url: str) -> dict:
    return {
        "API_SECRET_KEY": API_KEY,
        "ADMIN_API_KEY": "",
        "DATABASE_URL": database_url,
        "OPENAI_BASE_URL": llm_url,
        "OPENAI_API_KEY": "",
        "OPENAI_TIMEOUT": "2",
        "OPENAI_MAX_RETRIES": "2",
        "OPENAI_RETRY_BASE_DELAY": "0.01",
        "LLM_DEADLINE": "6",
        "DAILY_LIMIT": "30",
        "AI_CHAT_TIMEZONE": "Europe/Moscow",
        "CONTEXT_MESSAGES": "5",
        "CONTEXT_MAX_CHARS": "12000",
        "USER_CONTEXT_URL": "",
        # Tests script upstream failures by the dozen; the circuit breaker would
        # turn some into skipped calls. Its own tests set it (tests/test_models.py).
        "LLM_BREAKER_FAILURES": "1000",
        # A fold of a long conversation calls the model in the background and
        # would take a scripted step; the memory's own tests turn it on.
        "SUMMARY_ENABLED": "false",
        "LOG_LEVEL": "WARNING",
    }


@pytest.fixture
def make_app(database_url, fake_llm):
    """Build an app from env-style overrides on top of the test defaults."""
    apps = []

    def build(**overrides):
        app = create_app({**base_env(database_url, fake_llm.url), **overrides})
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield build
    from app.extensions import db

    for app in apps:
        # Keep-alive sockets left to the garbage collector would warn (= fail).
        app.extensions["llm"].close()
        app.extensions["memory"].close()
        app.extensions["cache"].close()
        with app.app_context():
            db.engine.dispose()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


class Api:
    """Calls the chat API with the test key, the way the bot does."""

    def __init__(self, client):
        self.client = client
        self.headers = {"X-API-KEY": API_KEY}

    def send(self, telegram_id=1, message="Как поднять продажи?", headers=None, **fields):
        body = {"telegram_id": telegram_id, "message": message, **fields}
        headers = {**self.headers, **(headers or {})}
        return self.client.post("/v1/chat/send", json=body, headers=headers)

    def history(self, telegram_id=1, **fields):
        body = {"telegram_id": telegram_id, **fields}
        return self.client.post("/v1/chat/history", json=body, headers=self.headers)

    def limits(self, telegram_id=1):
        return self.client.get(f"/v1/chat/limits/{telegram_id}", headers=self.headers)

    def stats(self, telegram_id=1, days=None):
        query = "" if days is None else f"?days={days}"
        return self.client.get(f"/v1/chat/stats/{telegram_id}{query}", headers=self.headers)

    def delete_history(self, telegram_id=1):
        return self.client.delete(f"/v1/chat/history/{telegram_id}", headers=self.headers)

    def reset_limit(self, telegram_id=1, key=API_KEY):
        return self.client.post(
            "/v1/chat/reset-limit", json={"telegram_id": telegram_id}, headers={"X-API-KEY": key}
        )


@pytest.fixture
def api(client):
    return Api(client)


@pytest.fixture
def make_api(make_app):
    """An ``Api`` on an app built from env-style overrides: ``make_api(DAILY_LIMIT="1")``."""
    return lambda **overrides: Api(make_app(**overrides).test_client())


def freeze_app(app, moment: str | datetime) -> datetime:
    """Pin ``app``'s service clock at ``moment`` (ISO text or aware datetime); returns it."""
    now = datetime.fromisoformat(moment) if isinstance(moment, str) else moment
    app.config["CLOCK"] = lambda: now.astimezone(UTC)
    return now


@pytest.fixture
def freeze(app):
    """Pin the default app's clock: ``freeze("2026-03-01T20:59:59+00:00")``."""
    return functools.partial(freeze_app, app)


@contextmanager
def served(app):
    """``app`` on a real threaded HTTP server on loopback; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()


@pytest.fixture
def live_server(app):
    """The app on a real threaded HTTP server (for concurrency)."""
    with served(app) as url:
        yield url


# --- Redis (v1.2) ---------------------------------------------------------------------

# The machine's shared Redis: tests only ever touch keys under a prefix of their own.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def delete_keys(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (never FLUSHALL: the server is shared)."""
    with redis.Redis.from_url(url, decode_responses=True) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.unlink(*keys[start:start + 500])


@pytest.fixture
def redis_env():
    """Env overrides for ``make_app`` / ``Cache``: the shared test Redis under a
    key prefix of this test's own, whose keys are deleted afterwards, with
    every use of Redis on (limits and contexts too, off by default).

    ``make_app(**redis_env)``.
    """
    prefix = f"ai_chat_test_{uuid.uuid4().hex[:12]}:"
    yield {"REDIS_URL": TEST_REDIS_URL, "REDIS_PREFIX": prefix, "REDIS_USER_CACHE": "true"}
    delete_keys(TEST_REDIS_URL, prefix)


@pytest.fixture
def throwaway_redis():
    """A ``RedisServer`` of this test's own, which it may kill, pause, restart
    or flush (tests/redis_server.py); removed afterwards."""
    reason = redis_server_missing()
    if reason:
        pytest.skip(reason)
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def _main_server():
    with FakeMainServer() as server:
        yield server


@pytest.fixture
def main_server(_main_server):
    """The fake main server (tests/fake_main_server.py), with fresh records,
    sellers and modes."""
    _main_server.reset()
    yield _main_server
    _main_server.reset()


@pytest.fixture
def make_cache():
    """Build Caches on a Redis URL, closed afterwards: ``make_cache(url, prefix=…)``."""
    caches = []

    def build(url, **options):
        options.setdefault("timeout", 0.05)
        options.setdefault("retry_interval", 0.5)
        cache = Cache(url, **options)
        caches.append(cache)
        return cache

    yield build
    for cache in caches:
        cache.close()
