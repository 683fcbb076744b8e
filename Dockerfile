# Container image of the AI Chat Service: gunicorn (gthread) serving wsgi:app,
# migrations applied at start by deploy/boot.sh.
#
# Stop it with enough grace for answers in flight (gunicorn's graceful_timeout is
# REQUEST_DEADLINE + 5 = 60 s): `docker run --stop-timeout 70`, or stop_grace_period in
# docker-compose.yml. Docker's default of 10 s would cut paid-for answers off.
# Builds with the classic builder and BuildKit alike (no BuildKit-only syntax).

# --- build: compile/install the dependencies into a self-contained venv ----------
FROM python:3.11-slim AS build

RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
# All dependencies ship as wheels (psycopg2-binary included), so no compiler is
# needed; the separate stage still keeps pip's leftovers out of the final image.
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        -r /tmp/requirements.txt

# --- runtime ----------------------------------------------------------------------
FROM python:3.11-slim

# No .pyc writes into the (root-owned) code at run time; logs leave unbuffered so
# `docker logs` sees a line as soon as it is written. The venv's flask and gunicorn
# come first on PATH: boot.sh calls them by name.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# A fixed uid, so files in mounted volumes have a predictable owner.
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home app

COPY --from=build /opt/venv /opt/venv
# Only what runs: no tests, bench, .env or local database (see .dockerignore too).
COPY app/ app/
COPY migrations/ migrations/
COPY deploy/boot.sh deploy/boot.sh
COPY wsgi.py gunicorn.conf.py ./

# The code stays root-owned (the app cannot rewrite itself); only var/, where the
# embedded SQLite default lives, is writable. It is not a volume: production uses
# PostgreSQL (DATABASE_URL), and a SQLite file here dies with the container.
RUN mkdir var && chown app:app var

USER app

EXPOSE 9001

# "Is the server accepting connections": a TCP connect to the port. An HTTP probe
# of /health would wait in the same thread pool as the answers, and with every
# thread busy on a slow model (a normal evening) it would time out and get a
# healthy, saturated instance restarted, answers in flight included. The gthread
# main loop accepts connections whatever the threads do, and gunicorn's master
# replaces a worker whose main loop stops (timeout); /health and /health/ready
# stay the probes of a load balancer. The slim image has no curl.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
    CMD python -c "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ.get('AI_CHAT_PORT', '9001'))), 2).close()" || exit 1

# Run through sh: the script's mode bits then do not matter (a checkout on a system
# that drops them still starts); it execs gunicorn, which becomes PID 1's only child.
CMD ["sh", "./deploy/boot.sh"]
