"""Configuration: the only module that reads the environment.

Every setting is parsed once into a typed value and handed to Flask's
``app.config``; the rest of the code reads it from there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from app.render import FORMATS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SQLITE_PATH = PROJECT_ROOT / "var" / "ai_chat.db"
# The bot gives up on an answer after this many seconds.
BOT_TIMEOUT_SECONDS = 60
# Values copied from examples and documentation; a key that anyone can read is no key.
PLACEHOLDER_KEYS = frozenset(
    {"change-me", "changeme", "change_me", "replace-me", "your-secret-key", "secret", "example"}
)


class ConfigError(SystemExit):
    """A setting is missing or malformed; the message names what to set.

    It is a ``SystemExit`` so that gunicorn, ``flask`` and ``python`` all stop
    with this one line and a non-zero status instead of a traceback.
    """

    def __init__(self, message: str):
        super().__init__(f"ai_chat: configuration error: {message}")


def env_text(env: Mapping, name: str, default: str | None = None) -> str | None:
    """A string setting; unset or blank means ``default``."""
    value = env.get(name)
    if value is None:
        return default
    value = str(value).strip()
    return value if value else default


def env_number(env: Mapping, name: str, default, kind, minimum=None, maximum=None):
    """A number setting within bounds, or a ConfigError naming the variable."""
    raw = env_text(env, name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ConfigError(f"{name}={raw!r} must be between {minimum} and {maximum}")
    return value


FLAGS = {"true": True, "1": True, "yes": True, "on": True,
         "false": False, "0": False, "no": False, "off": False}


def env_flag(env: Mapping, name: str, default: bool) -> bool:
    """A yes/no setting: true/false, 1/0, yes/no, on/off (any case); unset or
    blank means ``default``."""
    raw = env_text(env, name)
    if raw is None:
        return default
    if raw.lower() not in FLAGS:
        raise ConfigError(f"{name}={raw!r} must be true or false (or 1/0, yes/no, on/off)")
    return FLAGS[raw.lower()]


def _choice(env: Mapping, name: str, default: str, choices) -> str:
    value = env_text(env, name, default)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def _keys(raw: str | None) -> tuple[str, ...]:
    return tuple(key.strip() for key in (raw or "").split(",") if key.strip())


def _refuse_placeholder(name: str, keys) -> None:
    for key in keys:
        if key.lower() in PLACEHOLDER_KEYS:
            raise ConfigError(
                f"{name} is the placeholder {key!r} (from .env.example); set a secret of "
                "your own, e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )


def database_url(env: Mapping, name: str | None = None) -> str | None:
    """The SQLAlchemy URL, with PostgreSQL URLs pinned to psycopg2.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, and the old
    service used ``postgresql+asyncpg://``; we ship psycopg2-binary only.
    Without ``name``: the service's database (SQLite by default).
    """
    if name is not None:
        url = env_text(env, name)
        if url is None:
            return None
    else:
        url = env_text(env, "AI_CHAT_DATABASE_URL") or env_text(env, "DATABASE_URL")
    if url is None:
        DEFAULT_SQLITE_PATH.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{DEFAULT_SQLITE_PATH}"
    scheme, sep, rest = url.partition("://")
    if sep and scheme.split("+")[0] in ("postgres", "postgresql"):
        return f"postgresql+psycopg2://{rest}"
    return url


def _engine_options(url: str, pool: dict) -> dict:
    if url.startswith("sqlite") and url.split("://", 1)[1] in ("", "/:memory:"):
        # In-memory SQLite (checks, tools): one shared connection, no pool.
        return {"hide_parameters": True, "isolation_level": "AUTOCOMMIT"}
    common = {
        # Bound values are sellers' texts: keep them out of exception messages.
        "hide_parameters": True,
        # Every statement of the hot path is a unit of work by itself (the
        # quota is one atomic statement), so BEGIN and COMMIT would only add
        # two round trips each; multi-statement units open a transaction
        # explicitly (app.models.begin_transaction, app.sql.transaction).
        "isolation_level": "AUTOCOMMIT",
        # A thread that finds every connection busy waits this long for one
        # (the hot path retries within the request's deadline after that).
        "pool_timeout": pool["timeout"],
    }
    if url.startswith("sqlite"):
        # SQLite serialises writers; wait for the lock instead of failing.
        # One connection per thread at most, so no thread ever waits for the
        # pool (SQLAlchemy's default of 5 + 10 would starve 600 threads).
        return {
            **common,
            "pool_size": pool["threads"],
            "max_overflow": 0,
            "connect_args": {"timeout": 15, "check_same_thread": False},
        }
    return {
        **common,
        "pool_size": pool["size"],
        "max_overflow": pool["overflow"],
        "pool_recycle": 1800,
        # No session settings (libpq "options"): PgBouncer in transaction
        # pooling mode refuses them, and a SET would stick to a server
        # connection other clients share. The timeouts travel with every
        # statement instead (SQL_TIMEOUTS below).
        "connect_args": {"connect_timeout": 3, "application_name": "ai_chat"},
    }


def sql_timeouts(url: str, env: Mapping) -> str:
    """The prefix that bounds every statement the app sends to PostgreSQL.

    ``SET LOCAL`` lasts for the transaction; sent in the same query string as
    the statement, it makes one implicit transaction with it on an autocommit
    connection, so it holds through PgBouncer's transaction pooling and never
    leaks to another client. It costs no round trip (about 3 µs).
    """
    if not url.startswith("postgresql"):
        return ""
    statement_ms = env_number(env, "DB_STATEMENT_TIMEOUT", 5.0, float, 0.1, 600.0) * 1000
    lock_ms = env_number(env, "DB_LOCK_TIMEOUT", 3.0, float, 0.1, 600.0) * 1000
    return (
        f"SET LOCAL statement_timeout = {statement_ms:.0f}; "
        f"SET LOCAL lock_timeout = {lock_ms:.0f}; "
    )


def _names(env: Mapping, name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in (env_text(env, name) or "").split(",") if part.strip())


def _known(setting: str, model: str, models: Mapping[str, str], what: str = "") -> None:
    """ConfigError unless ``model`` is one of LLM_MODELS (``setting`` names
    where it was given: "NAME=" or "NAME: ")."""
    if model not in models:
        raise ConfigError(
            f"{setting}{model!r}{what} is not one of LLM_MODELS ({', '.join(models)})"
        )


def llm_settings(env: Mapping) -> dict:
    """Providers, models, fallbacks and the breaker (contract, "Models").

    Raises:
        ConfigError: a malformed pair, an unknown provider, a duplicate model,
            a fallback or default model that is not configured.
    """
    openai_key = env_text(env, "OPENAI_API_KEY")
    openai_url = env_text(env, "OPENAI_BASE_URL")
    # The provider "openai" always exists; it is configured when either is set
    # (a local server such as vLLM needs no key).
    providers = {"openai": {"base_url": openai_url, "api_key": openai_key,
                            "configured": bool(openai_key or openai_url)}}
    for pair in _names(env, "LLM_PROVIDERS"):
        name, sep, base_url = pair.partition("=")
        name, base_url = name.strip(), base_url.strip()
        if not sep or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) or not base_url:
            raise ConfigError(
                f"LLM_PROVIDERS: {pair!r} is not name=base_url (name: a-z 0-9 _ -)"
            )
        if name == "openai":
            raise ConfigError("LLM_PROVIDERS: 'openai' is built in (OPENAI_BASE_URL)")
        if name in providers:
            raise ConfigError(f"LLM_PROVIDERS: provider {name!r} is listed twice")
        key_name = f"LLM_PROVIDER_{name.upper().replace('-', '_')}_API_KEY"
        providers[name] = {
            "base_url": base_url, "api_key": env_text(env, key_name), "configured": True,
        }
    default_model = env_text(env, "OPENAI_MODEL", "gpt-4o-mini")
    models: dict[str, str] = {}
    for pair in _names(env, "LLM_MODELS") or (f"{default_model}@openai",):
        model, sep, provider = pair.rpartition("@")
        if not sep or not model:
            raise ConfigError(f"LLM_MODELS: {pair!r} is not model@provider")
        if provider not in providers:
            raise ConfigError(
                f"LLM_MODELS: {pair!r} names provider {provider!r}, which is not in "
                f"LLM_PROVIDERS ({', '.join(providers)})"
            )
        if model in models:
            raise ConfigError(f"LLM_MODELS: model {model!r} is listed twice")
        if not providers[provider]["configured"] and env_text(env, "LLM_MODELS"):
            raise ConfigError(
                f"LLM_MODELS: {pair!r} needs the provider openai: set OPENAI_API_KEY "
                "or OPENAI_BASE_URL"
            )
        models[model] = provider
    _known("OPENAI_MODEL=", default_model, models, " (the default model)")
    fallbacks = _names(env, "LLM_FALLBACK_MODELS")
    if len(set(fallbacks)) != len(fallbacks):
        raise ConfigError("LLM_FALLBACK_MODELS: a model is listed twice")
    for model in fallbacks:
        _known("LLM_FALLBACK_MODELS: ", model, models)
    return {
        "LLM_PROVIDERS": providers,
        "LLM_MODELS": models,
        "LLM_DEFAULT_MODEL": default_model,
        "LLM_FALLBACK_MODELS": fallbacks,
        "LLM_BREAKER_FAILURES": env_number(env, "LLM_BREAKER_FAILURES", 5, int, 1, 1000),
        "LLM_BREAKER_OPEN_SECONDS": env_number(
            env, "LLM_BREAKER_OPEN_SECONDS", 30.0, float, 0.1, 3600.0
        ),
    }


def server_settings(env: Mapping) -> dict:
    """What gunicorn.conf.py and the app both need: one parse, one default.

    ``request_deadline`` bounds a request from its arrival (queue wait,
    personalisation, the model with its retries, the writes after it); the
    model gets at most ``llm_deadline`` of it. A send is admitted while what
    is left of its deadline still holds ``min_answer_seconds`` of model time
    (app.deadline.admit): under overload a request that waited long in the
    queue is still answered when it can be, and refused, before anything is
    spent, when it no longer can. 15 s holds a whole answer of a real model
    (about 5 s, 10 s for the longest) with room for a retry of a quick
    failure; below that a call would mostly end in a timeout. ``queue_timeout``
    (off by default) is a fixed cap on the wait on top of that.
    """
    llm_deadline = env_number(env, "LLM_DEADLINE", 45.0, float, 1.0, 600.0)
    request_deadline = env_number(
        env, "REQUEST_DEADLINE", llm_deadline + 10.0, float, llm_deadline, 900.0
    )
    return {
        "port": env_number(env, "AI_CHAT_PORT", 9001, int, 1, 65535),
        "workers": env_number(env, "WEB_CONCURRENCY", 2, int, 1),
        # Threads from concurrent chats: a chat holds its thread while the model
        # answers, so a 2-core box with 1000 chats at once needs 500 per worker,
        # plus headroom for the uneven split of connections between workers.
        "threads": env_number(env, "GUNICORN_THREADS", 600, int, 1),
        "llm_deadline": llm_deadline,
        "request_deadline": request_deadline,
        # A third of the model's deadline when that is shorter (tests, tight setups).
        "min_answer_seconds": env_number(
            env, "MIN_ANSWER_SECONDS", min(15.0, llm_deadline / 3), float, 0.0, llm_deadline
        ),
        "queue_timeout": env_number(env, "QUEUE_TIMEOUT", 0.0, float, 0.0, 900.0),
        # A stream's write that a client does not take within this long: the
        # client is gone (gunicorn's graceful timeout leaves room for it).
        "stream_write_timeout": env_number(env, "STREAM_WRITE_TIMEOUT", 10.0, float, 0.5, 120.0),
    }


def _money(env: Mapping, name: str) -> Decimal | None:
    """An amount in PRICE_CURRENCY (unset = None), exact: Decimal, never a float."""
    raw = env_text(env, name)
    if raw is None:
        return None
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ConfigError(f"{name}={raw!r} is not an amount (e.g. 1.50)") from None
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{name}={raw!r} must be an amount of 0 or more")
    return value


def spend_settings(env: Mapping, models: Mapping[str, str]) -> dict:
    """Prices, currency, the spend cap and the spend alert (contract, "Spend in money").

    ``LLM_PRICES``: ``model=<input>:<output>`` per million tokens, comma-separated.

    Raises:
        ConfigError: a malformed price, a price of a model that is not configured.
    """
    prices: dict[str, tuple[Decimal, Decimal]] = {}
    for pair in _names(env, "LLM_PRICES"):
        model, sep, rates = pair.rpartition("=")
        given, colon, taken = rates.partition(":")
        try:
            rate = (Decimal(given), Decimal(taken))
        except InvalidOperation:
            rate = None
        if not sep or not colon or rate is None or not all(
            r.is_finite() and r >= 0 for r in rate
        ):
            raise ConfigError(
                f"LLM_PRICES: {pair!r} is not model=<input>:<output> (per million tokens, "
                "e.g. gpt-4o-mini=0.15:0.60)"
            )
        _known("LLM_PRICES: ", model, models)
        prices[model] = rate
    currency = env_text(env, "PRICE_CURRENCY", "USD")
    if not re.fullmatch(r"[A-Z]{3}", currency):
        raise ConfigError(f"PRICE_CURRENCY={currency!r} must be a currency code like USD or RUB")
    return {
        "LLM_PRICES": prices,
        "PRICE_CURRENCY": currency,
        "DAILY_SPEND_LIMIT": _money(env, "DAILY_SPEND_LIMIT"),
        "ALERT_SPEND_PER_HOUR": _money(env, "ALERT_SPEND_PER_HOUR"),
    }


def memory_settings(env: Mapping, models: Mapping[str, str], default_model: str) -> dict:
    """The summary of long conversations (contract, "Memory of long conversations")."""
    model = env_text(env, "SUMMARY_MODEL", default_model)
    _known("SUMMARY_MODEL=", model, models)
    return {
        "SUMMARY_ENABLED": env_flag(env, "SUMMARY_ENABLED", True),
        "SUMMARY_MODEL": model,
        "SUMMARY_MAX_CHARS": env_number(env, "SUMMARY_MAX_CHARS", 1500, int, 200, 20000),
        "SUMMARY_EVERY": env_number(env, "SUMMARY_EVERY", 5, int, 1, 1000),
        # Folds under way at once per process: each waits on the model, so a
        # process folds at most SUMMARY_THREADS / model latency sellers a second.
        "SUMMARY_THREADS": env_number(env, "SUMMARY_THREADS", 2, int, 1, 64),
    }


# --- Redis (v1.2; app/cache.py) -------------------------------------------------------

REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_settings(env: Mapping) -> dict:
    """Redis in front of PostgreSQL (contract, "Redis"); ``REDIS_URL`` unset = no Redis.

    Raises:
        ConfigError: a URL that is not redis://, rediss:// or unix://, a timeout
            outside 1 ms … 5 s, a malformed flag or TTL.
    """
    url = env_text(env, "REDIS_URL")
    if url is not None and url.partition("://")[0].lower() not in REDIS_SCHEMES:
        # The URL may hold a password: never repeat it in the message.
        raise ConfigError("REDIS_URL must start with redis://, rediss:// or unix://")
    return {
        "REDIS_URL": url,
        # Redis answers in well under a millisecond on a LAN; a Redis slower
        # than this is treated as down and PostgreSQL answers instead.
        "REDIS_TIMEOUT": env_number(env, "REDIS_TIMEOUT", 0.05, float, 0.001, 5.0),
        "REDIS_PREFIX": env_text(env, "REDIS_PREFIX", "ai_chat:"),
        "ANSWER_CACHE": env_flag(env, "ANSWER_CACHE", True),
        # Limits and contexts copied to Redis (bench/RESULTS.md, v1.2): three
        # round trips per send cost the workers more CPU than the context rows
        # they spare PostgreSQL, which reads them in the reservation anyway.
        "REDIS_USER_CACHE": env_flag(env, "REDIS_USER_CACHE", False),
        "ANSWER_CACHE_TTL": env_number(env, "ANSWER_CACHE_TTL", 86400, int, 1, 30 * 86400),
    }


def load_config(env: Mapping) -> dict:
    """Parse the environment mapping into Flask config values.

    Raises:
        ConfigError: when ``API_SECRET_KEY`` is missing or a number is malformed.
    """
    api_keys = _keys(env_text(env, "API_SECRET_KEY"))
    if not api_keys:
        raise ConfigError(
            "API_SECRET_KEY is not set; set API_SECRET_KEY=<key> "
            "(comma-separated for rotation) in the environment or .env"
        )
    _refuse_placeholder("API_SECRET_KEY", api_keys)
    admin_key = env_text(env, "ADMIN_API_KEY")
    _refuse_placeholder("ADMIN_API_KEY", _keys(admin_key))
    timezone_name = env_text(env, "AI_CHAT_TIMEZONE", "Europe/Moscow")
    try:
        timezone = ZoneInfo(timezone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"AI_CHAT_TIMEZONE={timezone_name!r} is not a known time zone") from None

    url = database_url(env)
    server = server_settings(env)
    # A thread holds a connection only for its short statements, never while
    # the model answers: the pool is sized by the database phases' duty cycle,
    # not by threads. 2 instances x 2 workers x 20 = 80 connections stay under
    # PostgreSQL's default max_connections of 100. No overflow: under load an
    # overflow connection is opened and closed again for each burst (hundreds
    # of connects per 10 s measured); a thread rather waits a moment.
    pool = {
        "size": env_number(env, "DB_POOL_SIZE", 20, int, 1),
        "overflow": env_number(env, "DB_MAX_OVERFLOW", 0, int, 0),
        "timeout": env_number(env, "DB_POOL_TIMEOUT", 5.0, float, 0.1, 60.0),
        "threads": server["threads"],
    }
    deadline = server["llm_deadline"]
    llm = llm_settings(env)
    return {
        "API_KEYS": api_keys,
        "ADMIN_API_KEY": admin_key,
        "SQLALCHEMY_DATABASE_URI": url,
        # Migrations need a session of their own (an advisory lock held across
        # CREATE INDEX CONCURRENTLY), which PgBouncer's transaction pooling does
        # not give: behind it, point this at PostgreSQL itself.
        "MIGRATIONS_DATABASE_URL": database_url(env, "MIGRATIONS_DATABASE_URL") or url,
        "SQLALCHEMY_ENGINE_OPTIONS": _engine_options(url, pool),
        "SQL_TIMEOUTS": sql_timeouts(url, env),
        "MAX_CONTENT_LENGTH": env_number(env, "MAX_CONTENT_LENGTH", 64 * 1024, int, 1024),
        **llm,
        **spend_settings(env, llm["LLM_MODELS"]),
        **memory_settings(env, llm["LLM_MODELS"], llm["LLM_DEFAULT_MODEL"]),
        **redis_settings(env),
        "OPENAI_TEMPERATURE": env_number(env, "OPENAI_TEMPERATURE", 0.7, float, 0.0, 2.0),
        "OPENAI_MAX_TOKENS": env_number(env, "OPENAI_MAX_TOKENS", 1000, int, 1),
        "OPENAI_TIMEOUT": env_number(env, "OPENAI_TIMEOUT", min(20.0, deadline), float, 0.1),
        "OPENAI_MAX_RETRIES": env_number(env, "OPENAI_MAX_RETRIES", 2, int, 0, 10),
        "OPENAI_RETRY_BASE_DELAY": env_number(
            env, "OPENAI_RETRY_BASE_DELAY", 0.5, float, 0.0, 10.0
        ),
        "LLM_DEADLINE": deadline,
        "REQUEST_DEADLINE": server["request_deadline"],
        "MIN_ANSWER_SECONDS": server["min_answer_seconds"],
        "QUEUE_TIMEOUT": server["queue_timeout"],
        "STREAM_WRITE_TIMEOUT": server["stream_write_timeout"],
        "DAILY_LIMIT": env_number(env, "DAILY_LIMIT", 30, int, 0),
        "TIMEZONE": timezone,
        "CONTEXT_MESSAGES": env_number(env, "CONTEXT_MESSAGES", 5, int, 0, 100),
        "CONTEXT_MAX_CHARS": env_number(env, "CONTEXT_MAX_CHARS", 12000, int, 0),
        "USER_CONTEXT_URL": env_text(env, "USER_CONTEXT_URL"),
        "USER_CONTEXT_TIMEOUT": env_number(env, "USER_CONTEXT_TIMEOUT", 2.0, float, 0.05, 30.0),
        "USER_CONTEXT_API_KEY": env_text(env, "USER_CONTEXT_API_KEY", api_keys[0]),
        **mainserver_settings(env, llm["LLM_MODELS"]),
        "PROXY_FIX_COUNT": env_number(env, "PROXY_FIX_COUNT", 0, int, 0, 10),
        "RESPONSE_FORMAT": _choice(env, "RESPONSE_FORMAT", "telegram_html", FORMATS),
        "STREAM_SNAPSHOT_INTERVAL": env_number(
            env, "STREAM_SNAPSHOT_INTERVAL", 1.0, float, 0.05, 60.0
        ),
        "STREAM_MAX_SECONDS": env_number(env, "STREAM_MAX_SECONDS", 300.0, float, 1.0, 3600.0),
        # Under the contract's 15 s, so no proxy ever sees 15 s of silence.
        "STREAM_KEEPALIVE_SECONDS": env_number(
            env, "STREAM_KEEPALIVE_SECONDS", 10.0, float, 0.05, 15.0
        ),
        "LOG_LEVEL": (env_text(env, "LOG_LEVEL", "INFO") or "INFO").upper(),
        "LOG_FORMAT": env_text(env, "LOG_FORMAT", "json"),
    }


# --- the seller's own data: the main server's bot API and its tools (v1.2) ---------


def mainserver_settings(env: Mapping, models: Mapping[str, str]) -> dict:
    """The main server's bot API and the tools over it (contract, "The seller's
    own data"). Without ``MAIN_SERVER_URL`` nothing is ever called.

    Raises:
        ConfigError: a URL that is not http(s), a placeholder key, a malformed
            number or flag, or a model in LLM_MODELS_WITHOUT_TOOLS that is not
            one of LLM_MODELS.
    """
    url = env_text(env, "MAIN_SERVER_URL")
    if url is not None:
        url = url.rstrip("/")
        scheme, sep, rest = url.partition("://")
        if scheme not in ("http", "https") or not sep or not rest:
            raise ConfigError(
                f"MAIN_SERVER_URL={url!r} must be an http(s) URL, e.g. http://server:8000"
            )
    api_key = env_text(env, "MAIN_SERVER_API_KEY")
    _refuse_placeholder("MAIN_SERVER_API_KEY", _keys(api_key))
    without_tools = _names(env, "LLM_MODELS_WITHOUT_TOOLS")
    for model in without_tools:
        _known("LLM_MODELS_WITHOUT_TOOLS: ", model, models)
    return {
        "MAIN_SERVER_URL": url,
        "MAIN_SERVER_API_KEY": api_key,
        "TOOLS_ENABLED": env_flag(env, "TOOLS_ENABLED", True),
        "TOOLS_MAX_ROUNDS": env_number(env, "TOOLS_MAX_ROUNDS", 3, int, 1, 10),
        "TOOL_TIMEOUT": env_number(env, "TOOL_TIMEOUT", 5.0, float, 0.1, 60.0),
        "TOOL_RESULT_MAX_CHARS": env_number(env, "TOOL_RESULT_MAX_CHARS", 6000, int, 500),
        "TOOL_CACHE_SECONDS": env_number(env, "TOOL_CACHE_SECONDS", 60.0, float, 0.0, 86400.0),
        "MAIN_SERVER_BREAKER_FAILURES": env_number(
            env, "MAIN_SERVER_BREAKER_FAILURES", 5, int, 1, 1000
        ),
        "MAIN_SERVER_BREAKER_OPEN_SECONDS": env_number(
            env, "MAIN_SERVER_BREAKER_OPEN_SECONDS", 30.0, float, 0.1, 3600.0
        ),
        "LLM_MODELS_WITHOUT_TOOLS": without_tools,
    }


def env_file() -> str:
    """The ``.env`` file to read: ``AI_CHAT_ENV_FILE``, else the project's own.

    Only this one file, never one found in a parent directory (tests point it
    at /dev/null, so a developer's ``.env`` cannot change what they see).
    """
    return os.environ.get("AI_CHAT_ENV_FILE") or str(PROJECT_ROOT / ".env")


def environ() -> dict:
    """The process environment (``.env`` applied underneath it)."""
    from dotenv import dotenv_values

    return {**dotenv_values(env_file()), **os.environ}
