"""Configuration read from the environment (contract, "Configuration").

The service refuses to start without ``API_SECRET_KEY`` (one line, from both
``python`` and ``flask``), stops on malformed settings naming the variable,
pins PostgreSQL URLs to psycopg2, accepts a comma-separated key list, has the
documented defaults, and starts without an LLM while saying so.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from zoneinfo import ZoneInfo

import pytest

from app import create_app
from tests.conftest import API_KEY
from tests.servers import ROOT, VENV_BIN

# Every setting the service reads (app/config.py; checked below by
# test_settings_lists_every_setting_the_service_reads); tests that check
# defaults remove them all. Besides these, one API key per extra provider:
# LLM_PROVIDER_<NAME>_API_KEY.
SETTINGS = (
    "AI_CHAT_DATABASE_URL", "DATABASE_URL", "MIGRATIONS_DATABASE_URL", "API_SECRET_KEY",
    "ADMIN_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_TEMPERATURE",
    "OPENAI_MAX_TOKENS", "OPENAI_TIMEOUT", "OPENAI_MAX_RETRIES", "OPENAI_RETRY_BASE_DELAY",
    "LLM_DEADLINE", "REQUEST_DEADLINE", "MIN_ANSWER_SECONDS", "QUEUE_TIMEOUT", "DAILY_LIMIT",
    "AI_CHAT_TIMEZONE", "CONTEXT_MESSAGES", "CONTEXT_MAX_CHARS", "USER_CONTEXT_URL",
    "USER_CONTEXT_TIMEOUT", "USER_CONTEXT_API_KEY", "MAX_CONTENT_LENGTH", "AI_CHAT_PORT",
    "WEB_CONCURRENCY", "GUNICORN_THREADS", "DB_POOL_SIZE", "DB_MAX_OVERFLOW", "DB_POOL_TIMEOUT",
    "DB_STATEMENT_TIMEOUT", "DB_LOCK_TIMEOUT", "PROXY_FIX_COUNT", "LOG_LEVEL", "LOG_FORMAT",
    "RESPONSE_FORMAT", "STREAM_SNAPSHOT_INTERVAL", "STREAM_MAX_SECONDS",
    "STREAM_KEEPALIVE_SECONDS", "STREAM_WRITE_TIMEOUT",
    # v1.1: models, providers, spend and memory
    "LLM_PROVIDERS", "LLM_MODELS", "LLM_FALLBACK_MODELS", "LLM_BREAKER_FAILURES",
    "LLM_BREAKER_OPEN_SECONDS", "LLM_PRICES", "PRICE_CURRENCY", "DAILY_SPEND_LIMIT",
    "ALERT_SPEND_PER_HOUR", "SUMMARY_ENABLED", "SUMMARY_MODEL", "SUMMARY_MAX_CHARS",
    "SUMMARY_EVERY", "SUMMARY_THREADS",
    # v1.2: the main server and its tools, Redis
    "MAIN_SERVER_URL", "MAIN_SERVER_API_KEY", "TOOLS_ENABLED", "TOOLS_MAX_ROUNDS",
    "TOOL_TIMEOUT", "TOOL_RESULT_MAX_CHARS", "TOOL_CACHE_SECONDS",
    "MAIN_SERVER_BREAKER_FAILURES", "MAIN_SERVER_BREAKER_OPEN_SECONDS",
    "LLM_MODELS_WITHOUT_TOOLS", "REDIS_URL", "REDIS_TIMEOUT", "REDIS_PREFIX", "ANSWER_CACHE",
    "ANSWER_CACHE_TTL", "REDIS_USER_CACHE",
)
PROVIDER_KEY_PREFIX = "LLM_PROVIDER_"

BOT_TIMEOUT_SECONDS = 60


@pytest.fixture
def bare_environment(monkeypatch):
    """The process environment without any of the service's settings."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith(PROVIDER_KEY_PREFIX):
            monkeypatch.delenv(name)


class ReadNames(dict):
    """An environment mapping that notes every name asked of it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, name, default=None):
        self.read.add(name)
        return super().get(name, default)

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)

    def __contains__(self, name):
        self.read.add(name)
        return super().__contains__(name)


def test_settings_lists_every_setting_the_service_reads():
    from app.config import load_config

    # Only parsed, never connected to. PostgreSQL: its statement timeouts are read too.
    env = ReadNames({
        "API_SECRET_KEY": "k", "DATABASE_URL": "postgresql://u@db/x",
        "LLM_PROVIDERS": "local=http://ollama:11434/v1",
    })
    load_config(env)

    provider_keys = {name for name in env.read if name.startswith(PROVIDER_KEY_PREFIX)}
    assert provider_keys == {"LLM_PROVIDER_LOCAL_API_KEY"}
    assert env.read - provider_keys == set(SETTINGS)


@pytest.fixture
def sqlite_url(tmp_path):
    # Only inspected, never connected: no file is created.
    return f"sqlite:///{tmp_path}/config.db"


def environment_without_key(case: str) -> dict:
    env = dict(os.environ)
    env.pop("API_SECRET_KEY", None)
    if case != "absent":
        env["API_SECRET_KEY"] = case
    # Flask's CLI also looks for .env files up from the working directory.
    env["FLASK_SKIP_DOTENV"] = "1"
    return env


MISSING_KEY_CASES = ["absent", "", " , "]


# --- refusing to start --------------------------------------------------------------


START_COMMANDS = {
    "create_app": [sys.executable, "-c", "from app import create_app; create_app()"],
    "flask db upgrade": [str(VENV_BIN / "flask"), "--app", "wsgi", "db", "upgrade"],
}


@pytest.mark.parametrize("case", MISSING_KEY_CASES)
@pytest.mark.parametrize("command", START_COMMANDS.values(), ids=START_COMMANDS.keys())
def test_start_without_api_secret_key_exits_with_one_line(command, case):
    result = subprocess.run(
        command, cwd=ROOT, env=environment_without_key(case),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "API_SECRET_KEY" in lines[0]


@pytest.mark.parametrize(
    "name, value",
    [
        ("DAILY_LIMIT", "abc"),
        ("DAILY_LIMIT", "-1"),
        ("OPENAI_TIMEOUT", "-1"),
        ("OPENAI_TEMPERATURE", "warm"),
        ("LLM_DEADLINE", "0"),
        ("CONTEXT_MESSAGES", "1.5"),
        ("MAX_CONTENT_LENGTH", "64k"),
        ("AI_CHAT_TIMEZONE", "Mars/Olympus"),
    ],
)
def test_malformed_setting_stops_start_up_naming_the_variable(
    bare_environment, sqlite_url, name, value
):
    with pytest.raises(SystemExit) as stopped:
        create_app({"API_SECRET_KEY": "k", "DATABASE_URL": sqlite_url, name: value})
    message = str(stopped.value)
    assert name in message
    assert "\n" not in message


# --- database URL -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("postgresql://u:p@db:5432/wb", "postgresql+psycopg2://u:p@db:5432/wb"),
        ("postgres://u:p@db:5432/wb", "postgresql+psycopg2://u:p@db:5432/wb"),
        ("postgresql+asyncpg://u:p@db:5432/wb", "postgresql+psycopg2://u:p@db:5432/wb"),
        ("postgresql+psycopg2://u:p@db:5432/wb", "postgresql+psycopg2://u:p@db:5432/wb"),
        ("sqlite:////srv/ai_chat.db", "sqlite:////srv/ai_chat.db"),
        ("sqlite://", "sqlite://"),
    ],
)
@pytest.mark.parametrize("variable", ["DATABASE_URL", "AI_CHAT_DATABASE_URL"])
def test_database_url_is_pinned_to_psycopg2(bare_environment, variable, url, expected):
    app = create_app({"API_SECRET_KEY": "k", variable: url})
    assert app.config["SQLALCHEMY_DATABASE_URI"] == expected


# --- API keys -----------------------------------------------------------------------


ROTATED_KEYS = "old-key, new-key ,newest-key"


@pytest.fixture
def rotated_keys_client(make_app):
    return make_app(API_SECRET_KEY=ROTATED_KEYS).test_client()


@pytest.mark.parametrize("key", ["old-key", "new-key", "newest-key"])
def test_comma_separated_api_keys_are_each_accepted(rotated_keys_client, key):
    response = rotated_keys_client.get("/v1/chat/limits/1", headers={"X-API-KEY": key})
    assert response.status_code == 200
    assert response.get_json()["telegram_id"] == 1


@pytest.mark.parametrize(
    "key",
    ["other-key", API_KEY, "old-key,new-key", ROTATED_KEYS],
    ids=["unknown", "default-test-key", "two-keys-joined", "the-whole-setting"],
)
def test_key_outside_the_comma_separated_list_is_forbidden(rotated_keys_client, key):
    response = rotated_keys_client.get("/v1/chat/limits/1", headers={"X-API-KEY": key})
    assert response.status_code == 403
    assert response.get_json()["error"] == "forbidden"


def test_comma_separated_api_keys_are_trimmed(bare_environment, sqlite_url):
    app = create_app({"API_SECRET_KEY": "a, b ,c", "DATABASE_URL": sqlite_url})
    assert app.config["API_KEYS"] == ("a", "b", "c")


# --- defaults -----------------------------------------------------------------------


@pytest.fixture
def default_app(bare_environment, sqlite_url):
    return create_app({"API_SECRET_KEY": "first,second", "DATABASE_URL": sqlite_url})


@pytest.mark.parametrize(
    "name, expected",
    [
        ("LLM_DEFAULT_MODEL", "gpt-4o-mini"),
        ("LLM_MODELS", {"gpt-4o-mini": "openai"}),
        ("LLM_FALLBACK_MODELS", ()),
        ("LLM_BREAKER_FAILURES", 5),
        ("LLM_BREAKER_OPEN_SECONDS", 30),
        ("RESPONSE_FORMAT", "telegram_html"),
        ("STREAM_SNAPSHOT_INTERVAL", 1),
        ("STREAM_MAX_SECONDS", 300),
        ("REQUEST_DEADLINE", 55),
        ("QUEUE_TIMEOUT", 0),
        ("MIN_ANSWER_SECONDS", 15),
        ("STREAM_WRITE_TIMEOUT", 10),
        ("OPENAI_TEMPERATURE", 0.7),
        ("OPENAI_MAX_TOKENS", 1000),
        ("DAILY_LIMIT", 30),
        ("CONTEXT_MESSAGES", 5),
        ("CONTEXT_MAX_CHARS", 12000),
        ("USER_CONTEXT_TIMEOUT", 2),
        ("MAX_CONTENT_LENGTH", 65536),
        ("TIMEZONE", ZoneInfo("Europe/Moscow")),
        ("USER_CONTEXT_API_KEY", "first"),
    ],
)
def test_default_setting(default_app, name, expected):
    assert default_app.config[name] == expected


def test_default_llm_deadline_is_below_the_bots_timeout(default_app):
    assert 0 < default_app.config["LLM_DEADLINE"] < BOT_TIMEOUT_SECONDS


def test_default_openai_timeout_fits_in_the_deadline(default_app):
    assert 0 < default_app.config["OPENAI_TIMEOUT"] <= default_app.config["LLM_DEADLINE"]


# --- no LLM configured --------------------------------------------------------------


def test_without_llm_the_app_starts_and_warns_what_to_set(make_app, caplog):
    caplog.set_level(logging.WARNING)
    make_app(OPENAI_API_KEY="", OPENAI_BASE_URL="")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("OPENAI_API_KEY" in text and "OPENAI_BASE_URL" in text for text in warnings)


def test_without_llm_readiness_reports_llm_not_configured(make_app):
    app = make_app(OPENAI_API_KEY="", OPENAI_BASE_URL="")
    response = app.test_client().get("/health/ready")
    assert response.status_code == 200
    body = response.get_json()
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["llm"] == "not_configured"


# --- v1.1: placeholders, pools, the .env file, one warning --------------------------


@pytest.mark.parametrize("variable", ["API_SECRET_KEY", "ADMIN_API_KEY"])
@pytest.mark.parametrize("placeholder", ["change-me", "CHANGEME", "your-secret-key"])
def test_a_placeholder_key_stops_start_up_with_one_line(sqlite_url, variable, placeholder):
    env = {"API_SECRET_KEY": "real-key", "DATABASE_URL": sqlite_url, variable: placeholder}

    with pytest.raises(SystemExit) as stopped:
        create_app(env)

    message = str(stopped.value)
    assert variable in message and placeholder in message
    assert "\n" not in message


def test_the_env_example_does_not_start_as_it_is(tmp_path):
    """.env.example ships an active placeholder: copied as the quick start says,
    the service refuses it in one line instead of running with a public key."""
    env = {**os.environ, "AI_CHAT_ENV_FILE": str(ROOT / ".env.example"),
           "FLASK_SKIP_DOTENV": "1", "DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    env.pop("API_SECRET_KEY", None)

    result = subprocess.run(
        [str(VENV_BIN / "flask"), "--app", "wsgi", "db", "upgrade"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )

    assert result.returncode != 0
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert "API_SECRET_KEY" in result.stderr and "change-me" in result.stderr


def test_the_env_file_is_the_one_ai_chat_env_file_names(tmp_path, monkeypatch):
    dotenv = tmp_path / "custom.env"
    dotenv.write_text(f"API_SECRET_KEY=from-file\nDATABASE_URL=sqlite:///{tmp_path}/f.db\n")
    monkeypatch.delenv("API_SECRET_KEY", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("AI_CHAT_ENV_FILE", str(dotenv))

    app = create_app()

    assert app.config["API_KEYS"] == ("from-file",)


def test_default_pool_keeps_two_instances_under_postgres_max_connections(default_app):
    options = create_app(
        {"API_SECRET_KEY": "k", "DATABASE_URL": "postgresql://u@db/x"}
    ).config["SQLALCHEMY_ENGINE_OPTIONS"]
    per_worker = options["pool_size"] + options["max_overflow"]
    workers = 2
    assert 2 * workers * per_worker < 100
    # A thread waits for a connection rather than failing at once.
    assert options["pool_timeout"] >= 1
    # No session settings: PgBouncer's transaction pooling refuses them.
    assert "options" not in options["connect_args"]


def test_default_threads_hold_a_thousand_concurrent_chats_on_two_workers(bare_environment):
    from app.config import server_settings

    settings = server_settings({})
    assert settings["workers"] * settings["threads"] >= 1000


def test_sqlite_pool_fits_every_thread(sqlite_url):
    app = create_app({"API_SECRET_KEY": "k", "DATABASE_URL": sqlite_url,
                      "GUNICORN_THREADS": "250"})

    options = app.config["SQLALCHEMY_ENGINE_OPTIONS"]
    assert options["pool_size"] + options["max_overflow"] >= 250


def test_error_mapping_does_not_import_the_metrics_module():
    """app.errors → app.metrics → app.extensions → app.api → app.errors was a cycle."""
    result = subprocess.run(
        [sys.executable, "-c",
         "import sys, app.errors; print('app.metrics' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )
    assert result.stdout.strip() == "False"


# --- v1.2: the main server and its tools ---------------------------------------------


@pytest.fixture
def tools_app(bare_environment, sqlite_url):
    """Builds an app from the tool settings given, nothing else of them set."""
    return lambda **env: create_app({"API_SECRET_KEY": "k", "DATABASE_URL": sqlite_url, **env})


@pytest.mark.parametrize(
    "name, expected",
    [
        ("MAIN_SERVER_URL", None),
        ("MAIN_SERVER_API_KEY", None),
        ("TOOLS_ENABLED", True),
        ("TOOLS_MAX_ROUNDS", 3),
        ("TOOL_TIMEOUT", 5),
        ("TOOL_RESULT_MAX_CHARS", 6000),
        ("TOOL_CACHE_SECONDS", 60),
        ("MAIN_SERVER_BREAKER_FAILURES", 5),
        ("MAIN_SERVER_BREAKER_OPEN_SECONDS", 30),
        ("LLM_MODELS_WITHOUT_TOOLS", ()),
    ],
)
def test_default_tool_setting(tools_app, name, expected):
    assert tools_app().config[name] == expected


def test_without_main_server_url_the_client_calls_nothing(tools_app):
    client = tools_app().extensions["mainserver"]

    assert client.configured is False


def test_main_server_settings_reach_the_client(tools_app):
    app = tools_app(
        MAIN_SERVER_URL="http://server:8000/", MAIN_SERVER_API_KEY="s3cret",
        TOOL_TIMEOUT="2.5", TOOL_RESULT_MAX_CHARS="800", TOOL_CACHE_SECONDS="0",
        MAIN_SERVER_BREAKER_FAILURES="3", MAIN_SERVER_BREAKER_OPEN_SECONDS="12",
    )
    client = app.extensions["mainserver"]

    assert app.config["MAIN_SERVER_URL"] == "http://server:8000"
    assert client.configured
    assert client.base_url == "http://server:8000/api/v1/bot"
    assert client.api_key == "s3cret"
    assert (client.settings.timeout, client.settings.max_chars) == (2.5, 800)
    assert client.settings.cache_seconds == 0
    assert (client.breaker.failures, client.breaker.open_seconds) == (3, 12)


# --- v1.2: Redis ---------------------------------------------------------------------


def test_without_redis_url_there_is_no_redis_and_the_defaults_apply():
    from app.config import redis_settings

    assert redis_settings({}) == {
        "REDIS_URL": None,
        "REDIS_TIMEOUT": 0.05,
        "REDIS_PREFIX": "ai_chat:",
        "ANSWER_CACHE": True,
        "ANSWER_CACHE_TTL": 86400,
        "REDIS_USER_CACHE": False,
    }


@pytest.mark.parametrize(
    "url",
    ["redis://redis:6379/0", "rediss://:secret@cache.example:6380/1", "unix:///run/redis.sock",
     "REDIS://redis"],
)
def test_redis_urls_of_the_three_schemes_are_accepted(url):
    from app.config import redis_settings

    assert redis_settings({"REDIS_URL": url})["REDIS_URL"] == url


@pytest.mark.parametrize(
    "env, name",
    [
        pytest.param({"REDIS_URL": "http://:pw@redis:6379"}, "REDIS_URL", id="url-scheme"),
        pytest.param({"REDIS_URL": "redis-host:6379"}, "REDIS_URL", id="url-no-scheme"),
        pytest.param({"REDIS_TIMEOUT": "0"}, "REDIS_TIMEOUT", id="timeout-zero"),
        pytest.param({"REDIS_TIMEOUT": "10"}, "REDIS_TIMEOUT", id="timeout-too-long"),
        pytest.param({"REDIS_TIMEOUT": "50ms"}, "REDIS_TIMEOUT", id="timeout-not-a-number"),
        pytest.param({"ANSWER_CACHE": "maybe"}, "ANSWER_CACHE", id="flag-not-a-flag"),
        pytest.param({"ANSWER_CACHE_TTL": "0"}, "ANSWER_CACHE_TTL", id="ttl-zero"),
        pytest.param({"ANSWER_CACHE_TTL": "1.5"}, "ANSWER_CACHE_TTL", id="ttl-not-an-integer"),
    ],
)
def test_a_malformed_redis_setting_stops_start_up_naming_it(env, name):
    from app.config import ConfigError, redis_settings

    with pytest.raises(ConfigError) as stopped:
        redis_settings(env)

    message = str(stopped.value)
    assert name in message and "\n" not in message
    assert "pw" not in message  # a URL's password is never repeated


@pytest.mark.parametrize(
    "raw, expected",
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True),
     ("false", False), ("False", False), ("0", False), ("no", False), ("", True)],
)
def test_tools_enabled_reads_yes_and_no(tools_app, raw, expected):
    assert tools_app(TOOLS_ENABLED=raw).config["TOOLS_ENABLED"] is expected


@pytest.mark.parametrize(
    "name, value",
    [
        ("TOOLS_ENABLED", "maybe"),
        ("TOOLS_MAX_ROUNDS", "0"),
        ("TOOLS_MAX_ROUNDS", "11"),
        ("TOOLS_MAX_ROUNDS", "2.5"),
        ("TOOL_TIMEOUT", "0"),
        ("TOOL_TIMEOUT", "fast"),
        ("TOOL_RESULT_MAX_CHARS", "499"),
        ("TOOL_CACHE_SECONDS", "-1"),
        ("MAIN_SERVER_BREAKER_FAILURES", "0"),
        ("MAIN_SERVER_BREAKER_OPEN_SECONDS", "0"),
        ("MAIN_SERVER_URL", "server:8000"),
        ("MAIN_SERVER_URL", "ftp://server"),
        ("LLM_MODELS_WITHOUT_TOOLS", "qwen2.5-7b"),
    ],
)
def test_malformed_tool_setting_stops_start_up_naming_the_variable(tools_app, name, value):
    with pytest.raises(SystemExit) as stopped:
        tools_app(**{name: value})
    message = str(stopped.value)
    assert name in message
    assert "\n" not in message


@pytest.mark.parametrize("placeholder", ["change-me", "CHANGEME", "your-secret-key"])
def test_a_placeholder_main_server_key_stops_start_up(tools_app, placeholder):
    with pytest.raises(SystemExit) as stopped:
        tools_app(MAIN_SERVER_URL="http://server:8000", MAIN_SERVER_API_KEY=placeholder)
    assert "MAIN_SERVER_API_KEY" in str(stopped.value)


def test_models_without_tools_are_configured_models(tools_app):
    app = tools_app(
        OPENAI_BASE_URL="http://vllm:8000/v1",
        LLM_PROVIDERS="local=http://ollama:11434/v1",
        LLM_MODELS="gpt-4o-mini@openai,qwen2.5-7b@local,llama3@local",
        LLM_MODELS_WITHOUT_TOOLS=" qwen2.5-7b , llama3 ",
    )

    assert app.config["LLM_MODELS_WITHOUT_TOOLS"] == ("qwen2.5-7b", "llama3")


@pytest.mark.parametrize(
    "raw, expected",
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
     ("false", False), ("0", False), ("No", False), ("off", False), ("", True)],
)
def test_answer_cache_accepts_the_usual_yes_and_no_words(raw, expected):
    from app.config import redis_settings

    assert redis_settings({"ANSWER_CACHE": raw})["ANSWER_CACHE"] is expected


def test_redis_settings_reach_the_app_config(bare_environment, sqlite_url):
    app = create_app({
        "API_SECRET_KEY": "k", "DATABASE_URL": sqlite_url, "REDIS_URL": "redis://redis:6379",
        "REDIS_TIMEOUT": "0.2", "REDIS_PREFIX": "wb:", "ANSWER_CACHE": "no",
        "ANSWER_CACHE_TTL": "600", "REDIS_USER_CACHE": "yes",
    })

    assert (app.config["REDIS_URL"], app.config["REDIS_TIMEOUT"], app.config["REDIS_PREFIX"],
            app.config["ANSWER_CACHE"], app.config["ANSWER_CACHE_TTL"],
            app.config["REDIS_USER_CACHE"]) == ("redis://redis:6379", 0.2, "wb:", False, 600, True)
    assert app.extensions["cache"].configured and app.extensions["cache"].user_entries
