"""Configuration: the only module that reads the environment.

Every setting is parsed once into a typed value and handed to Flask's
``app.config``; the rest of the code reads it from there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SQLITE_PATH = PROJECT_ROOT / "var" / "ai_chat.db"


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


def _keys(raw: str | None) -> tuple[str, ...]:
    return tuple(key.strip() for key in (raw or "").split(",") if key.strip())


def database_url(env: Mapping) -> str:
    """The SQLAlchemy URL, with PostgreSQL URLs pinned to psycopg2.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, and the old
    service used ``postgresql+asyncpg://``; we ship psycopg2-binary only.
    """
    url = env_text(env, "AI_CHAT_DATABASE_URL") or env_text(env, "DATABASE_URL")
    if url is None:
        DEFAULT_SQLITE_PATH.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{DEFAULT_SQLITE_PATH}"
    scheme, sep, rest = url.partition("://")
    if sep and scheme.split("+")[0] in ("postgres", "postgresql"):
        return f"postgresql+psycopg2://{rest}"
    return url


def _engine_options(url: str, pool_size: int, max_overflow: int) -> dict:
    common = {
        # Bound values are sellers' texts: keep them out of exception messages.
        "hide_parameters": True,
        # Every statement of the hot path is a unit of work by itself (the
        # quota is one atomic statement), so BEGIN and COMMIT would only add
        # two round trips each; multi-statement units open a transaction
        # explicitly (app.models.begin_transaction).
        "isolation_level": "AUTOCOMMIT",
    }
    if url.startswith("sqlite"):
        # SQLite serialises writers; wait for the lock instead of failing.
        return {**common, "connect_args": {"timeout": 15, "check_same_thread": False}}
    return {
        **common,
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        # Fail fast (503) instead of hanging when the pool or the server is gone.
        "pool_timeout": 5,
        "pool_recycle": 1800,
        "connect_args": {
            "connect_timeout": 3,
            "options": "-c statement_timeout=5000 -c lock_timeout=3000",
            "application_name": "ai_chat",
        },
    }


def server_settings(env: Mapping) -> dict:
    """What gunicorn.conf.py and the app both need: one parse, one default."""
    return {
        "port": env_number(env, "AI_CHAT_PORT", 9001, int, 1, 65535),
        "workers": env_number(env, "WEB_CONCURRENCY", 2, int, 1),
        "threads": env_number(env, "GUNICORN_THREADS", 150, int, 1),
        "llm_deadline": env_number(env, "LLM_DEADLINE", 45.0, float, 1.0, 600.0),
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
    timezone_name = env_text(env, "AI_CHAT_TIMEZONE", "Europe/Moscow")
    try:
        timezone = ZoneInfo(timezone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"AI_CHAT_TIMEZONE={timezone_name!r} is not a known time zone") from None

    url = database_url(env)
    server = server_settings(env)
    threads = server["threads"]
    # A thread holds a connection only around its short queries; a pool much
    # smaller than the threads makes SQLAlchemy open and close overflow
    # connections under load (measured in bench/RESULTS.md), so ~threads/5.
    pool_size = env_number(env, "DB_POOL_SIZE", max(10, threads // 5), int, 1)
    max_overflow = env_number(env, "DB_MAX_OVERFLOW", 10, int, 0)
    deadline = server["llm_deadline"]
    return {
        "API_KEYS": api_keys,
        "ADMIN_API_KEY": env_text(env, "ADMIN_API_KEY"),
        "SQLALCHEMY_DATABASE_URI": url,
        "SQLALCHEMY_ENGINE_OPTIONS": _engine_options(url, pool_size, max_overflow),
        "MAX_CONTENT_LENGTH": env_number(env, "MAX_CONTENT_LENGTH", 64 * 1024, int, 1024),
        "OPENAI_API_KEY": env_text(env, "OPENAI_API_KEY"),
        "OPENAI_BASE_URL": env_text(env, "OPENAI_BASE_URL"),
        "OPENAI_MODEL": env_text(env, "OPENAI_MODEL", "gpt-4o-mini"),
        "OPENAI_TEMPERATURE": env_number(env, "OPENAI_TEMPERATURE", 0.7, float, 0.0, 2.0),
        "OPENAI_MAX_TOKENS": env_number(env, "OPENAI_MAX_TOKENS", 1000, int, 1),
        "OPENAI_TIMEOUT": env_number(env, "OPENAI_TIMEOUT", min(20.0, deadline), float, 0.1),
        "OPENAI_MAX_RETRIES": env_number(env, "OPENAI_MAX_RETRIES", 2, int, 0, 10),
        "OPENAI_RETRY_BASE_DELAY": env_number(
            env, "OPENAI_RETRY_BASE_DELAY", 0.5, float, 0.0, 10.0
        ),
        "LLM_DEADLINE": deadline,
        "DAILY_LIMIT": env_number(env, "DAILY_LIMIT", 30, int, 0),
        "TIMEZONE": timezone,
        "CONTEXT_MESSAGES": env_number(env, "CONTEXT_MESSAGES", 5, int, 0, 100),
        "CONTEXT_MAX_CHARS": env_number(env, "CONTEXT_MAX_CHARS", 12000, int, 0),
        "USER_CONTEXT_URL": env_text(env, "USER_CONTEXT_URL"),
        "USER_CONTEXT_TIMEOUT": env_number(env, "USER_CONTEXT_TIMEOUT", 2.0, float, 0.05, 30.0),
        "USER_CONTEXT_API_KEY": env_text(env, "USER_CONTEXT_API_KEY", api_keys[0]),
        "PROXY_FIX_COUNT": env_number(env, "PROXY_FIX_COUNT", 0, int, 0, 10),
        "LOG_LEVEL": (env_text(env, "LOG_LEVEL", "INFO") or "INFO").upper(),
        "LOG_FORMAT": env_text(env, "LOG_FORMAT", "json"),
    }


def environ() -> dict:
    """The process environment (``.env`` applied underneath it)."""
    from dotenv import dotenv_values

    return {**dotenv_values(PROJECT_ROOT / ".env"), **os.environ}
