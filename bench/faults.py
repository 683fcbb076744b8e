"""The fault-injection run of `make bench` (``python -m bench.run --scenario
faults``): tests/fault_run.py's driver, the same as tests/test_fault_injection.py
runs, but against the service at its full defaults and for longer.

The service runs under the project's gunicorn.conf.py on a throwaway
PostgreSQL cluster of its own (tests/pg_cluster.py: the restart must never
touch the shared server) and a throwaway Redis of its own
(tests/redis_server.py: killed, paused, flushed and evicted, never the
shared one), with the fake LLM in this process (the run turns its chaos on
and off and scripts the slow model), and an ADMIN_API_KEY for the operator's
resets, limits and deletions. Nothing of the service is scaled down (Redis
at its defaults too: REDIS_TIMEOUT 50 ms, the common-answer cache on); only
what makes a fault happen at all is set, each on the fake or the driver's
side:

- the fake's chaos "delay" lasts OPENAI_TIMEOUT + 1 s (21 s), so that it is a
  timeout of the service's model call (tests/fault_run.py sets it);
- a client that stops reading stays 20 s (8 s for the socket buffers to
  fill, then STREAM_WRITE_TIMEOUT's 10 s, and 2 s), and the slow model's
  streams last 30 s, so none of them can reach ``done`` first;
- a counter row is held 6.5 s, past DB_LOCK_TIMEOUT's 3 s;
- Redis stays down 2 s after a kill and hangs 2 s in a pause (past the
  cache's 1 s retry interval, so probes fail in it too).

Needs root (initdb as the postgres user) and redis-server like the outage
tests; otherwise the section says why it did not run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bench.servers import GunicornProcess
from tests import pg_cluster, redis_server
from tests.fake_llm import FakeLLM
from tests.fault_run import FaultRun, Report, Shape, Target, fault_env
from tests.redis_server import RedisServer
from tests.servers import API_KEY, ROOT, VENV_BIN  # API_KEY: what the driver's clients send

SEED = 20260309
SECONDS = 90.0
QUICK_SECONDS = 20.0
# Per 90 s of run; a shorter run fires proportionally fewer (at least one each).
FAULTS = {
    "row_lock": 8,
    "pg_cancel_backend": 15,
    "pg_terminate_backend": 10,
    "postgres_restart": 2,
    "model_chaos": 6,
    "client_leaves": 20,
    "client_stops_reading": 6,
    "redis_kill": 3,
    "redis_pause": 3,
    "redis_flushall": 2,
    "redis_evict": 4,
}
# The operator's actions per 90 s, scaled as the faults.
OPERATIONS = {"delete_history": 20, "reset_limit": 20, "set_limit": 15}
ADMIN_KEY = "bench-faults-admin-key"


def shape(seconds: float) -> Shape:
    """~100 clients; a model of 500 ms (the first token of a stream too, then a
    piece per word 100 ms apart); chaos bursts of 5 s; outages of 1.5 s;
    Redis down or hung 2 s."""
    scale = seconds / SECONDS
    return Shape(
        seconds=seconds,
        seed=SEED,
        faults={name: max(1, round(count * scale)) for name, count in FAULTS.items()},
        operations={name: max(1, round(count * scale)) for name, count in OPERATIONS.items()},
        model_latency=0.5,
        chunk_delay=0.1,
        chaos_burst=5.0,
        outage=1.5,
        redis_outage=2.0,
        redis_pause=2.0,
    )


def _migrate(url: str) -> None:
    # In a child, as BenchDatabase does: prometheus_client must not be imported here.
    done = subprocess.run(
        [str(VENV_BIN / "flask"), "--app", "wsgi", "db", "upgrade"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DATABASE_URL": url, "API_SECRET_KEY": API_KEY,
             "LOG_LEVEL": "WARNING"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"migration failed:\n{done.stdout}\n{done.stderr}")


def run(settings: dict, out_dir: Path, seconds: float) -> Report | str:
    """One run at the service's defaults (``settings`` as report.settings gives
    them: --set overrides and gunicorn's values); the report, or why it did
    not run."""
    reason = pg_cluster.unavailable_reason() or redis_server.unavailable_reason()
    if reason:
        return f"Not run: {reason}."
    # record=True: the report counts the fake's outcomes (the chaos it served),
    # and the checks read the prompts it was sent.
    with (FakeLLM(seed=SEED, record=True) as fake, pg_cluster.PgCluster() as cluster,
          RedisServer() as redis):
        _migrate(cluster.url())
        env = {**fault_env(fake.url, cluster.url(), ADMIN_KEY, redis.url), **settings["overrides"]}
        server = GunicornProcess("wsgi:app", env, settings["gunicorn"], out_dir, "faults")
        with server:
            target = Target(server.url, cluster.dsn(), cluster, fake, server.env, server.log,
                            redis, ADMIN_KEY)
            return FaultRun(target, shape(seconds)).run()
