"""The circuit breaker shared through Redis (app/llm/breaker.py, SharedBreaker).

Two ``Cache`` objects on one Redis stand for two instances (or two workers):
failures recorded by one open the circuit for the other, the half-open probe
is one across them, and a success anywhere closes it. With Redis down each
process counts for itself, exactly like the per-process ``Breaker``. The
healthy path is checked to cost no Redis command per call (``INFO
commandstats`` on a throwaway server that nothing else uses).
"""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import REGISTRY

from app.cache import Cache
from app.llm.breaker import SharedBreaker
from tests.conftest import Api
from tests.fake_llm import status

# Short enough that the tests need not wait a second for a view to age.
REFRESH = 0.05
# An open period the tests wait out; long enough that a busy machine does not
# end it before the test has looked at the open circuit.
OPEN = 0.5


@pytest.fixture
def instances(make_cache, redis_env):
    """Two Caches on the shared test Redis, under this test's prefix."""
    return [make_cache(redis_env["REDIS_URL"], prefix=redis_env["REDIS_PREFIX"]) for _ in range(2)]


def shared(cache: Cache, failures: int = 3, open_seconds: float = 30.0, **options):
    options.setdefault("refresh_seconds", REFRESH)
    return SharedBreaker("llm:alpha", failures, open_seconds, cache, **options)


def aged() -> None:
    """Let every breaker's view of the shared state get old enough to be re-read."""
    time.sleep(REFRESH * 1.5)


# --- one breaker for every instance ------------------------------------------------------


def test_failures_recorded_by_one_instance_open_the_circuit_for_the_other(instances):
    first, second = shared(instances[0]), shared(instances[1])
    assert first.allow() and second.allow()

    first.record_failure()
    first.record_failure()
    opened = second.record_failure()
    aged()

    assert opened is True
    assert first.state == "open" and first.allow() is False
    assert second.state == "open" and second.allow() is False


def test_the_opening_is_reported_by_exactly_one_failure_across_instances(instances):
    breakers = [shared(cache, failures=5) for cache in instances]
    barrier = threading.Barrier(20)
    opened = []

    def fail(breaker):
        barrier.wait()
        opened.append(breaker.record_failure())

    threads = [threading.Thread(target=fail, args=(breakers[i % 2],)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert opened.count(True) == 1


def open_shared_circuit(breakers, failures: int = 3) -> None:
    for _ in range(failures):
        breakers[0].record_failure()
    aged()


def test_after_open_seconds_one_probe_goes_through_across_instances(instances):
    first, second = shared(instances[0], open_seconds=OPEN), shared(instances[1], open_seconds=OPEN)
    open_shared_circuit([first, second])
    assert second.allow() is False
    time.sleep(OPEN + 0.1)

    assert second.state == "half_open"
    assert second.allow() is True  # the probe
    assert first.allow() is False
    assert second.allow() is False


def test_a_successful_probe_closes_the_circuit_for_every_instance(instances):
    first, second = shared(instances[0], open_seconds=OPEN), shared(instances[1], open_seconds=OPEN)
    open_shared_circuit([first, second])
    time.sleep(OPEN + 0.1)
    assert first.allow() is True

    first.record_success()
    aged()

    assert second.state == "closed" and second.allow() is True


def test_a_failed_probe_opens_the_circuit_again_for_every_instance(instances):
    first, second = shared(instances[0], open_seconds=OPEN), shared(instances[1], open_seconds=OPEN)
    open_shared_circuit([first, second])
    time.sleep(OPEN + 0.1)
    assert first.allow() is True

    assert first.record_failure() is True
    aged()

    assert second.state == "open" and second.allow() is False


def test_a_success_elsewhere_restarts_the_count_of_consecutive_failures(instances):
    first, second = shared(instances[0]), shared(instances[1])
    first.record_failure()
    first.record_failure()
    aged()
    assert second.allow()  # sees two failures

    second.record_success()

    assert first.record_failure() is False
    aged()
    assert first.state == "closed"


def test_a_probe_whose_outcome_never_comes_is_replaced_after_open_seconds(instances):
    first, second = shared(instances[0], open_seconds=OPEN), shared(instances[1], open_seconds=OPEN)
    open_shared_circuit([first, second])
    time.sleep(OPEN + 0.1)
    assert first.allow() is True  # ... and this request vanishes
    time.sleep(OPEN + 0.1)

    assert second.allow() is True


# --- the healthy path --------------------------------------------------------------------


def test_the_healthy_path_asks_redis_at_most_once_per_refresh(make_cache, throwaway_redis):
    now = [1000.0]
    breaker = shared(make_cache(throwaway_redis.url), refresh_seconds=1.0, clock=lambda: now[0])
    assert breaker.allow()  # the first look at the shared state

    def scripts() -> int:
        return throwaway_redis.command_calls("evalsha") + throwaway_redis.command_calls("eval")

    # Per stretch of healthy calls, the clock moved by: 0 (the first look is
    # fresh), a whole refresh, half of one, the other half.
    asked = []
    for step in (0.0, 1.0, 0.5, 0.5):
        now[0] += step
        before = scripts()
        for _ in range(500):
            assert breaker.allow()
            assert breaker.state == "closed"
            breaker.record_success()
        asked.append(scripts() - before)

    assert asked == [0, 1, 0, 1]
    assert throwaway_redis.command_calls("del") == 0


def test_a_success_is_written_only_while_failures_are_counted(make_cache, throwaway_redis):
    breaker = shared(make_cache(throwaway_redis.url))
    breaker.record_failure()

    breaker.record_success()  # resets the shared count: one DEL
    breaker.record_success()  # nothing left to reset
    breaker.record_success()

    assert throwaway_redis.command_calls("del") == 1


# --- Redis down: one breaker per process, as before --------------------------------------


def test_with_redis_down_each_process_counts_for_itself(make_cache, throwaway_redis):
    caches = [make_cache(throwaway_redis.url) for _ in range(2)]
    first, second = shared(caches[0], failures=2), shared(caches[1], failures=2)
    throwaway_redis.kill()

    assert first.record_failure() is False
    assert first.record_failure() is True

    assert first.state == "open" and first.allow() is False
    assert second.state == "closed" and second.allow() is True


def test_with_redis_down_the_open_period_and_the_probe_work_per_process(
    make_cache, throwaway_redis
):
    breaker = shared(make_cache(throwaway_redis.url), failures=1, open_seconds=OPEN)
    throwaway_redis.kill()
    breaker.record_failure()
    time.sleep(OPEN + 0.1)

    assert breaker.state == "half_open"
    assert breaker.allow() is True
    assert breaker.allow() is False


def test_failures_counted_while_redis_was_up_still_count_when_it_goes(
    make_cache, throwaway_redis
):
    breaker = shared(make_cache(throwaway_redis.url), failures=3)
    breaker.record_failure()
    breaker.record_failure()
    throwaway_redis.kill()

    assert breaker.record_failure() is True
    assert breaker.allow() is False


# --- wired into the model layer ----------------------------------------------------------


def opened_total(provider: str) -> float:
    value = REGISTRY.get_sample_value(
        "ai_chat_llm_breaker_opened_total", {"provider": provider}
    )
    return value or 0.0


def test_two_instances_of_the_service_share_a_providers_circuit(make_app, redis_env, fake_llm):
    settings = {**redis_env, "LLM_BREAKER_FAILURES": "2", "LLM_BREAKER_OPEN_SECONDS": "60"}
    first, second = Api(make_app(**settings).test_client()), Api(make_app(**settings).test_client())
    opened_before = opened_total("openai")
    fake_llm.script(*[status(500)] * 6)  # two requests, three attempts each

    assert [first.send().status_code for _ in range(2)] == [502, 502]
    calls = fake_llm.calls

    response = second.send()

    assert response.status_code == 502
    assert response.get_json()["error"] == "llm_unavailable"
    assert fake_llm.calls == calls == 6  # the second instance never called the provider
    assert opened_total("openai") - opened_before == 1
