"""The fault-injection run (reliability issue, item 9; Redis issue: "the
fault-injection run gains Redis faults, with 0 invariant violations").

About a hundred clients send and stream against the service under gunicorn
with the project's gunicorn.conf.py at its defaults (2 workers, their default
threads and pool, LOG_LEVEL=INFO), on a throwaway PostgreSQL cluster
(tests/pg_cluster.py) and a throwaway Redis (tests/redis_server.py), while
row locks, cancelled and terminated backends, a PostgreSQL restart, a
failing model, clients that leave and clients that stop reading, and Redis
killed, paused, flushed and evicted are injected, and an operator deletes
histories, resets counters and sets limits (tests/fault_run.py). Afterwards
every user's counter equals the answers delivered since its last reset,
every answer delivered since its last deletion is in history, no refusal,
prompt or ``GET /limits`` was stale, no key is left claimed, no session is
left in a transaction, nothing answered 500, ``/health/ready`` stayed 200
while the database answered, and, after one more PostgreSQL restart while
the service is quiet, a normal send answers 200 within a second
(tests/fault_checks.py).

Scaled down from the defaults so that the run takes about a minute, and why:

- ``OPENAI_TIMEOUT`` 1 s, ``LLM_DEADLINE`` 4 s, ``REQUEST_DEADLINE`` 10 s
  (defaults 20, 45, 55 s): a model timeout costs seconds, not most of the
  run; the 6 s the deadline keeps after the model still outlast the
  restart's outage (1 s), so an answer in flight is saved after it.
- ``DB_LOCK_TIMEOUT`` 0.5 s (3 s): a held counter row stalls a user for
  half a second, and several locks fit in the run.
- ``STREAM_WRITE_TIMEOUT`` 1 s (10 s): a client that stops reading is given
  up within seconds, and its slow stream need not last a minute.
- ``DAILY_LIMIT`` 8 (30): the busiest users reach it within the run.

Redis at its defaults (REDIS_TIMEOUT 50 ms, the common-answer cache on), and
an ADMIN_API_KEY of its own for the operator.

Skipped only when a throwaway cluster or Redis cannot be made here (the
reason says why), as tests/test_database_outage.py is.
"""

from __future__ import annotations

import pytest

from tests import pg_cluster, redis_server
from tests.conftest import migrate_to_head
from tests.fake_llm import FakeLLM
from tests.fault_injectors import REDIS_FAULTS
from tests.fault_run import FaultRun, Report, Shape, Target, fault_env
from tests.redis_server import RedisServer
from tests.servers import Gunicorn

SEED = 20260309
SHAPE = Shape(
    seconds=35,
    seed=SEED,
    faults={
        "row_lock": 6,
        "pg_cancel_backend": 10,
        "pg_terminate_backend": 8,
        "postgres_restart": 1,
        "model_chaos": 4,
        "client_leaves": 10,
        "client_stops_reading": 4,
        "redis_kill": 2,
        "redis_pause": 2,
        "redis_flushall": 2,
        "redis_evict": 3,
    },
    operations={"delete_history": 10, "reset_limit": 10, "set_limit": 8},
)
ADMIN_KEY = "fault-run-admin-key"
SCALED = {
    "OPENAI_TIMEOUT": "1",
    "LLM_DEADLINE": "4",
    "REQUEST_DEADLINE": "10",
    "DB_LOCK_TIMEOUT": "0.5",
    "STREAM_WRITE_TIMEOUT": "1",
    "DAILY_LIMIT": "8",
}

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Report:
    """Run the whole thing once; every test reads its report."""
    reason = pg_cluster.unavailable_reason() or redis_server.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with (FakeLLM(seed=SEED) as fake, pg_cluster.PgCluster() as cluster,
          RedisServer() as redis):
        migrate_to_head(cluster.url())
        env = {**fault_env(fake.url, cluster.url(), ADMIN_KEY, redis.url), **SCALED}
        server = Gunicorn(env, log_dir=tmp_path_factory.mktemp("faults"))
        # gunicorn.conf.py's own workers and threads, not the tests' small sizing.
        server.env.pop("WEB_CONCURRENCY")
        server.env.pop("GUNICORN_THREADS")
        with server:
            target = Target(server.url, cluster.dsn(), cluster, fake, server.env, server.log,
                            redis, ADMIN_KEY)
            result = FaultRun(target, SHAPE).run()
    print(f"\n{result.text()}")
    return result


def test_the_fault_run_breaks_no_invariant(report):
    assert report.violations == []


def test_every_fault_kind_was_injected(report):
    missing = [name for name, planned in report.planned.items()
               if planned and report.faults.get(name, 0) == 0]
    assert missing == []


def test_the_database_faults_reached_the_service(report):
    effects = report.effects
    assert effects["statements cancelled by the lock timeout"] > 0
    assert effects["sessions terminated"] > 0
    assert effects["PostgreSQL starts"] >= 2  # the first start, and the restart
    assert effects["backends hit while active"] > 0


def test_the_model_failed_in_every_way_the_fake_knows(report):
    effects = report.effects
    for outcome in ("status:500", "status:503", "drop", "delay", "stream_break"):
        assert effects[f"model {outcome}"] > 0, outcome


def test_the_service_saw_every_client_that_left_go(report):
    left = report.requests.get("leaver stream 200 left", 0)
    assert left > 0
    assert report.effects["leavers' streams ended client_gone"] == left


def test_the_service_gave_up_on_every_client_that_stopped_reading_by_the_write_timeout(report):
    begun = report.effects["stuck streams begun"]
    assert begun > 0
    assert report.effects["stuck streams ended by the write timeout"] == begun


def test_some_users_reached_the_daily_limit_and_most_questions_were_answered(report):
    refused = sum(count for outcome, count in report.requests.items()
                  if "daily_limit_exceeded" in outcome)
    assert refused > 0
    assert report.answered > report.questions / 2


def test_every_operation_was_done(report):
    assert {kind: done for kind, (_, done) in report.operations.items()} == {
        kind: planned for kind, (planned, _) in report.operations.items()}


def test_the_service_fell_back_from_every_redis_kill_and_pause_and_came_back(report):
    effects = report.effects
    for kind, label in (("redis_kill", "redis kills"), ("redis_pause", "redis pauses")):
        injected = report.faults[kind]
        assert effects[f"{label} the service fell back from"] == injected, kind
        assert effects[f"{label} the service came back from"] == injected, kind
        assert effects[f"{label} /health/ready said degraded in"] > 0, kind
    assert effects["ai_chat_redis_up at the end"] == 1


def test_every_redis_fault_was_injected_as_planned(report):
    # A flush or an eviction counts only when it removed some of the service's keys.
    assert {kind: report.faults[kind] for kind in REDIS_FAULTS} == {
        kind: report.planned[kind] for kind in REDIS_FAULTS}


def test_flushes_and_evictions_removed_the_services_keys(report):
    assert report.effects["redis keys flushed"] > 0
    assert report.effects["redis keys evicted"] > 0


def test_the_traffic_went_through_redis_paths(report):
    effects = report.effects
    assert effects["refusals answered from Redis"] > 0
    assert effects["common answers delivered (cached: true)"] > 0
    assert effects["redis answer hit"] > 0
    assert effects["redis limits hit"] > 0 and effects["redis context hit"] > 0
    # Faults made lookups fall back to PostgreSQL, which answered them.
    assert effects["redis limits fallback"] > 0
