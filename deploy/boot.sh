#!/bin/sh
# Entry point of the service (Docker CMD and `make run`): migrate, then become gunicorn.
# It uses whatever `flask` and `gunicorn` come first on PATH; the Makefile and the
# Dockerfile put the right virtualenv there, so this script knows nothing of venvs.
set -e

# Run from the project root whatever the caller's directory: `wsgi`, `migrations/`,
# `.env` and `gunicorn.conf.py` are all found relative to it.
cd "$(dirname "$0")/.."

# Flask's CLI would also load a .env it finds in any parent directory; the app reads
# its own (AI_CHAT_ENV_FILE, default the project's .env), exactly as gunicorn.conf.py
# does, so both steps below see the same settings.
export FLASK_SKIP_DOTENV=1

# Schema changes go through Alembic only (the app never calls create_all); a failed
# migration stops the boot here instead of serving against the wrong schema. The
# migration state lives in ai_chat_alembic_version, so a database shared with the
# main server (which keeps its own alembic_version) is fine; instances booting at
# once take turns on an advisory lock.
flask --app wsgi db upgrade

# exec, not a child: SIGTERM from Docker/systemd must reach the gunicorn master
# directly so it can let in-flight answers finish (graceful_timeout) before exiting.
exec gunicorn -c gunicorn.conf.py wsgi:app
