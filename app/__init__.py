"""AI Chat Service: the application factory."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import click
import swagger_ui_bundle
from flask import Flask, send_from_directory
from sqlalchemy import event
from werkzeug.middleware.proxy_fix import ProxyFix

__version__ = "1.2.0"


def create_app(overrides: dict | None = None) -> Flask:
    """Build the WSGI app: config → extensions → blueprints → errors → logging.

    ``overrides`` take the place of environment variables (tests); without
    them the process environment and ``.env`` are read.
    """
    from app import cli, config, errors, logs, metrics, sql
    from app.api import document_models
    from app.cache import Cache
    from app.chat.memory import Folder
    from app.chat.routes import blp as chat_blp
    from app.extensions import api, db, migrate
    from app.health.routes import blp as health_blp
    from app.llm import LLM
    from app.mainserver import MainServer

    app = Flask(__name__)
    # Russian answers as readable UTF-8, not \uXXXX escapes, in the order the
    # schemas give (Flask 3 reads these from the JSON provider, not config).
    app.json.ensure_ascii = False
    app.json.sort_keys = False
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
        # Served by the service itself from the pinned swagger-ui-bundle
        # package: no third-party script on the API's origin, works offline.
        OPENAPI_SWAGGER_UI_URL=SWAGGER_UI_STATIC + "/",
        API_SPEC_OPTIONS={
            "components": {
                "securitySchemes": {
                    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"}
                }
            },
        },
    )

    db.init_app(app)
    with app.app_context():
        if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
            event.listen(db.engine, "connect", _sqlite_pragmas)
        sql.bound_every_statement(db.engine, app.config["SQL_TIMEOUTS"])
        sql.keep_pool_clean(db.engine)
    migrate.init_app(app, db, directory=str(config.PROJECT_ROOT / "migrations"))
    api.init_app(app)
    api.register_blueprint(chat_blp)
    api.register_blueprint(health_blp)
    errors.register_error_handlers(app)
    logs.init_app(app)
    metrics.init_app(app)
    cli.init_app(app)
    app.extensions["cache"] = Cache.from_config(app.config)
    app.extensions["llm"] = LLM(app.config, app.extensions["cache"])
    app.extensions["memory"] = Folder(app)
    app.extensions["mainserver"] = MainServer.from_config(app.config, app.extensions["cache"])
    document_models(api.spec, app.extensions["llm"].names)
    app.add_url_rule(
        f"{SWAGGER_UI_STATIC}/<path:filename>", "swagger_ui_static", _swagger_ui_file
    )

    if app.config["PROXY_FIX_COUNT"]:
        count = app.config["PROXY_FIX_COUNT"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=count, x_proto=count, x_host=count)

    # Said once, by the server: `flask db upgrade` before it (boot.sh) and the
    # operator commands (`chat check` reports it itself) stay quiet.
    if not app.extensions["llm"].configured and click.get_current_context(silent=True) is None:
        app.logger.warning(
            "LLM not configured: set OPENAI_API_KEY (OpenAI) or OPENAI_BASE_URL "
            "(vLLM, Ollama, llama.cpp …); /v1/chat/send answers 503 until then"
        )
    return app


SWAGGER_UI_STATIC = "/docs/static"


def _swagger_ui_file(filename: str):
    """Swagger UI's scripts and styles, from the pinned package."""
    return send_from_directory(swagger_ui_bundle.swagger_ui_path, filename, max_age=86400)


def _sqlite_pragmas(connection, _record) -> None:
    """WAL lets readers run beside the one writer; SQLite leaves foreign keys
    (the idempotency key → exchange cascade) off unless asked."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
