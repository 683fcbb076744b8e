"""AI Chat Service: the application factory."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from flask import Flask
from sqlalchemy import event
from werkzeug.middleware.proxy_fix import ProxyFix

__version__ = "1.0.0"


def create_app(overrides: dict | None = None) -> Flask:
    """Build the WSGI app: config → extensions → blueprints → errors → logging.

    ``overrides`` take the place of environment variables (tests); without
    them the process environment and ``.env`` are read.
    """
    from app import cli, config, errors, llm, logs, metrics
    from app.chat.routes import blp as chat_blp
    from app.extensions import api, db, migrate
    from app.health.routes import blp as health_blp

    app = Flask(__name__)
    # Russian answers as readable UTF-8, not \uXXXX escapes.
    app.json.ensure_ascii = False
    env = {**os.environ, **overrides} if overrides is not None else config.environ()
    app.config.update(config.load_config(env))
    app.config.update(
        VERSION=__version__,
        CLOCK=lambda: datetime.now(UTC),
        API_TITLE="AI Chat Service",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL="https://cdn.jsdelivr.net/npm/swagger-ui-dist/",
        API_SPEC_OPTIONS={
            "components": {
                "securitySchemes": {
                    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"}
                }
            },
        },
        JSON_SORT_KEYS=False,
    )

    db.init_app(app)
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        with app.app_context():
            event.listen(db.engine, "connect", _sqlite_pragmas)
    migrate.init_app(app, db, directory=str(config.PROJECT_ROOT / "migrations"))
    api.init_app(app)
    api.register_blueprint(chat_blp)
    api.register_blueprint(health_blp)
    errors.register_error_handlers(app)
    logs.init_app(app)
    metrics.init_app(app)
    cli.init_app(app)
    app.extensions["llm"] = llm.LLMClient(llm.LLMSettings.from_config(app.config))

    if app.config["PROXY_FIX_COUNT"]:
        count = app.config["PROXY_FIX_COUNT"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=count, x_proto=count, x_host=count)

    if not app.extensions["llm"].configured:
        app.logger.warning(
            "LLM not configured: set OPENAI_API_KEY (OpenAI) or OPENAI_BASE_URL "
            "(vLLM, Ollama, llama.cpp …); /v1/chat/send answers 503 until then"
        )
    return app


def _sqlite_pragmas(connection, _record) -> None:
    """WAL lets readers run beside the one writer; SQLite leaves foreign keys
    (the idempotency key → exchange cascade) off unless asked."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
