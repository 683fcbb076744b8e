"""Redis in front of PostgreSQL (app/cache.py), against real Redis servers.

The primitives and the generation guard run on the machine's shared Redis,
each test under a key prefix of its own (``redis_env``). Faults — a killed,
paused, restarted or flushed Redis — run on a throwaway ``redis-server`` of
the test's own (``throwaway_redis``). Counters are compared as deltas: the
Prometheus registry is per process and shared by every test.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from datetime import date

import pytest
import redis
from prometheus_client import REGISTRY

from app.cache import CONTEXT_TTL, GEN_TTL, LIMITS_TTL, MISS, Cache, UserView
from app.llm.breaker import Breaker, SharedBreaker

RETRY = 0.5  # make_cache's retry_interval
LIMITS = {"day": "2026-12-02", "used": 30, "limit": 30}


@pytest.fixture
def cache(make_cache, redis_env):
    """A Cache on the shared test Redis under this test's own prefix."""
    return make_cache(redis_env["REDIS_URL"], prefix=redis_env["REDIS_PREFIX"])


@pytest.fixture
def raw(redis_env):
    """A plain client on the shared test Redis, for looking behind the Cache."""
    with redis.Redis.from_url(redis_env["REDIS_URL"], decode_responses=True) as client:
        yield client


@pytest.fixture
def down_cache(make_cache, throwaway_redis):
    """A Cache on the throwaway server, used once (so its process is started)."""
    cache = make_cache(throwaway_redis.url)
    assert cache.ping() == "ok"
    return cache


class Clock:
    """A monotonic clock moved by hand, for a Cache's ``clock``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clocked_cache(make_cache, throwaway_redis):
    """(A Cache on the throwaway server on a hand-moved ``Clock``, the clock);
    used once, so its connection is open."""
    clock = Clock()
    cache = make_cache(throwaway_redis.url, clock=clock)
    assert cache.ping() == "ok"
    return cache, clock


def received_once_resumed(server, before: int, expected: int) -> int:
    """The commands ``server`` received since it had ``before``, once those
    sent while it was paused have run (waits for ``expected`` at most 10 s)."""
    deadline = time.monotonic() + 10
    while (received := server.commands_received() - before) < expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return received


def counted(use: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "ai_chat_redis_requests_total", {"use": use, "outcome": outcome}
    )
    return value or 0.0


def redis_up(cache: Cache) -> float | None:
    return REGISTRY.get_sample_value("ai_chat_redis_up", {"server": cache.server})


def warnings_and_infos(caplog) -> tuple[list[str], list[str]]:
    records = [r for r in caplog.records if r.name == "app.cache"]
    return ([r.getMessage() for r in records if r.levelno == logging.WARNING],
            [r.getMessage() for r in records if r.levelno == logging.INFO])


def every_method(cache: Cache) -> list:
    """Call each method once; returns their results."""
    view = cache.read_user(7)
    return [
        cache.get("answer", "q"),
        cache.set("answer", "q", "a", 60),
        view,
        cache.write_limits(7, 1, LIMITS),
        cache.write_context(7, 1, []),
        cache.append_context(7, 1, (1, "m", "r"), 5),
        cache.invalidate_user(7),
        cache.breaker_state("b"),
        cache.breaker_failure("b", 3, 60),
        cache.breaker_probe("b", 30),
        cache.breaker_success("b"),
    ]


DEFAULTS = [None, False, MISS, False, False, False, False, None, None, None, False]


# --- not configured ---------------------------------------------------------------------


def test_without_redis_url_every_method_returns_its_default_at_once():
    cache = Cache(None)
    before = counted("answer", "fallback")

    results = every_method(cache)

    assert results == DEFAULTS
    assert cache.ping() == "not_configured"
    assert counted("answer", "fallback") == before
    assert cache._client is None  # no client, no pool: nothing to connect with


def test_an_unknown_use_is_refused_as_a_programming_error(cache):
    with pytest.raises(ValueError, match="unknown cache use"):
        cache.get("answers", "q")


def test_the_app_without_redis_has_an_unconfigured_cache_and_per_process_breakers(make_app):
    app = make_app()

    assert app.extensions["cache"].configured is False
    breakers = [p.breaker for p in app.extensions["llm"].providers.values()]
    assert breakers and all(type(b) is Breaker for b in breakers)


def test_building_the_app_opens_no_connection_to_redis(make_app, throwaway_redis):
    app = make_app(REDIS_URL=throwaway_redis.url, REDIS_PREFIX="t:")

    assert app.extensions["cache"].configured
    assert throwaway_redis.connected_clients() == []
    breaker = app.extensions["llm"].providers["openai"].breaker
    assert isinstance(breaker, SharedBreaker) and breaker.name == "llm:openai"


# --- generic entries ----------------------------------------------------------------------


def test_a_stored_value_is_a_hit_and_an_absent_one_a_miss(cache):
    hits, misses = counted("answer", "hit"), counted("answer", "miss")

    assert cache.set("answer", "question", "Ответ <b>жирный</b>", 60) is True
    assert cache.get("answer", "question") == "Ответ <b>жирный</b>"
    assert cache.get("answer", "other") is None

    assert counted("answer", "hit") - hits == 1
    assert counted("answer", "miss") - misses == 1


def test_a_value_expires_after_its_ttl(cache):
    cache.set("tool", "sales", "{}", 0.2)
    time.sleep(0.3)
    assert cache.get("tool", "sales") is None


def test_every_key_lives_under_the_prefix(cache, raw, redis_env):
    every_method(cache)
    prefix = redis_env["REDIS_PREFIX"]

    keys = set(raw.scan_iter(match=f"{prefix}*"))

    assert keys >= {f"{prefix}gen:{{7}}", f"{prefix}answer:{{q}}"}
    assert cache.key("limits", 7) == f"{prefix}limits:{{7}}"


def test_a_digest_keeps_long_inputs_short_and_distinct():
    first = Cache.digest("gpt-4o-mini", "v3", "как поднять продажи " * 300)
    second = Cache.digest("gpt-4o-mini", "v3", "как поднять продажи " * 299)
    assert len(first) == 64 and first != second


# --- read_user ------------------------------------------------------------------------------


def test_a_new_user_has_a_token_and_no_entries(cache):
    limits_misses, context_misses = counted("limits", "miss"), counted("context", "miss")

    view = cache.read_user(1)

    assert isinstance(view.gen, int) and view.gen > 0
    assert (view.limits, view.limits_age, view.context) == (None, None, None)
    assert counted("limits", "miss") - limits_misses == 1
    assert counted("context", "miss") - context_misses == 1


def test_the_token_stays_until_the_user_is_invalidated(cache):
    first = cache.read_user(1).gen
    assert cache.read_user(1).gen == first

    cache.invalidate_user(1)

    assert cache.read_user(1).gen not in (first, None)


def test_only_the_entries_asked_for_are_read_and_counted(cache):
    view = cache.read_user(1)
    cache.write_limits(1, view.gen, LIMITS)
    cache.write_context(1, view.gen, [])
    context_hits = counted("context", "hit")

    limited = cache.read_user(1, context=False)

    assert limited.limits is not None and limited.context is None
    assert counted("context", "hit") == context_hits


def test_users_do_not_see_each_others_entries(cache):
    view = cache.read_user(1)
    cache.write_limits(1, view.gen, LIMITS)
    cache.write_context(1, view.gen, [(3, "m", "r")])

    other = cache.read_user(2)

    assert (other.limits, other.context) == (None, None)


# --- write_limits ---------------------------------------------------------------------------


def test_limits_are_stored_with_redis_time_and_their_age(cache):
    view = cache.read_user(1)
    assert cache.write_limits(1, view.gen, {**LIMITS, "day": date(2026, 12, 2)}) is True
    time.sleep(0.2)

    stored = cache.read_user(1)

    assert {k: v for k, v in stored.limits.items() if k != "written_at"} == LIMITS
    assert abs(stored.limits["written_at"] - time.time()) < 5  # Redis's clock, this machine
    assert 0.2 <= stored.limits_age < 2


def test_limits_expire_after_sixty_seconds(cache, raw):
    view = cache.read_user(1)
    cache.write_limits(1, view.gen, LIMITS)

    ttl = raw.pttl(cache.key("limits", 1))

    assert LIMITS_TTL * 1000 - 2000 < ttl <= LIMITS_TTL * 1000
    assert raw.pttl(cache.key("gen", 1)) > CONTEXT_TTL * 1000


def test_limits_read_before_an_invalidation_are_never_stored_after_it(cache):
    """A refund must never be followed by a cached refusal."""
    before_refund = cache.read_user(1)  # ... then PostgreSQL says 30/30
    cache.invalidate_user(1)  # the refund, committed meanwhile

    stored = cache.write_limits(1, before_refund.gen, LIMITS)

    assert stored is False
    assert cache.read_user(1).limits is None


def test_a_late_write_deletes_a_newer_entry_instead_of_keeping_it(cache):
    late = cache.read_user(1)
    cache.invalidate_user(1)
    fresh = cache.read_user(1)
    cache.write_limits(1, fresh.gen, {**LIMITS, "used": 3})

    cache.write_limits(1, late.gen, LIMITS)

    assert cache.read_user(1).limits is None


def test_an_older_reading_does_not_replace_a_newer_one(cache):
    """Two sends of one user finishing out of order: 6 used stays 6."""
    view = cache.read_user(1)
    cache.write_limits(1, view.gen, {**LIMITS, "used": 6})

    assert cache.write_limits(1, view.gen, {**LIMITS, "used": 5}) is False
    assert cache.read_user(1).limits["used"] == 6


def test_a_new_day_replaces_a_higher_count_of_the_day_before(cache):
    view = cache.read_user(1)
    cache.write_limits(1, view.gen, {"day": date(2026, 12, 1), "used": 30, "limit": 30})

    assert cache.write_limits(1, view.gen, {"day": date(2026, 12, 2), "used": 1, "limit": 30})
    assert cache.read_user(1).limits == {
        "day": "2026-12-02", "used": 1, "limit": 30,
        "written_at": cache.read_user(1).limits["written_at"],
    }


def test_a_lower_count_after_a_refund_is_stored_under_the_new_token(cache):
    view = cache.read_user(1)
    cache.write_limits(1, view.gen, LIMITS)
    cache.invalidate_user(1)  # the refund
    fresh = cache.read_user(1)

    assert cache.write_limits(1, fresh.gen, {**LIMITS, "used": 29}) is True
    assert cache.read_user(1).limits["used"] == 29


def test_without_a_token_nothing_is_written_and_stored_limits_are_dropped(cache):
    view = cache.read_user(1)
    cache.write_limits(1, view.gen, {**LIMITS, "used": 3})

    assert cache.write_limits(1, None, LIMITS) is False
    assert cache.write_context(1, None, []) is False
    after = cache.read_user(1)
    assert (after.limits, after.context) == (None, None)


# --- contexts -------------------------------------------------------------------------------


EXCHANGES = [(11, "Как поднять продажи?", "Снизьте цену."), (12, "А ещё?", 'Фото "как у всех"\n')]


def test_a_populated_context_reads_back_oldest_first(cache):
    view = cache.read_user(1)

    assert cache.write_context(1, view.gen, reversed(EXCHANGES)) is True

    assert cache.read_user(1).context == [list(e) for e in EXCHANGES]


def test_a_known_empty_context_is_not_an_absent_one(cache):
    view = cache.read_user(1)
    cache.write_context(1, view.gen, [])

    assert cache.read_user(1).context == []


def test_a_populate_never_overwrites_an_existing_context(cache):
    view = cache.read_user(1)
    cache.write_context(1, view.gen, EXCHANGES)

    assert cache.write_context(1, view.gen, EXCHANGES[:1]) is False
    assert len(cache.read_user(1).context) == 2


def test_a_context_read_before_a_history_deletion_never_comes_back(cache):
    before = cache.read_user(1)  # ... then PostgreSQL returns the old exchanges
    cache.invalidate_user(1)  # DELETE history, committed meanwhile

    assert cache.write_context(1, before.gen, EXCHANGES) is False
    assert cache.read_user(1).context is None


def test_an_append_keeps_the_newest_exchanges_by_row_id(cache):
    view = cache.read_user(1)
    cache.write_context(1, view.gen, EXCHANGES)

    # Two saves finishing out of order.
    assert cache.append_context(1, view.gen, (14, "m14", "r14"), keep=3) is True
    assert cache.append_context(1, view.gen, (13, "m13", "r13"), keep=3) is True

    assert [e[0] for e in cache.read_user(1).context] == [12, 13, 14]


def test_appending_the_same_exchange_twice_keeps_one(cache):
    view = cache.read_user(1)
    cache.write_context(1, view.gen, [])
    cache.append_context(1, view.gen, (5, "m", "r"), keep=5)
    cache.append_context(1, view.gen, (5, "m", "r"), keep=5)

    assert cache.read_user(1).context == [[5, "m", "r"]]


def test_an_append_to_an_absent_context_does_not_create_it(cache):
    view = cache.read_user(1)

    assert cache.append_context(1, view.gen, (13, "m", "r"), keep=5) is False
    assert cache.read_user(1).context is None


def test_an_append_that_cannot_apply_drops_populates_in_flight(cache):
    """A populate read from PostgreSQL before a save must not land after it
    (the saved exchange would be missing from the cache for good)."""
    populate = cache.read_user(1)  # ... PostgreSQL read: rows 11, 12
    saver = cache.read_user(1)
    cache.append_context(1, saver.gen, (13, "m", "r"), keep=5)  # row 13 saved meanwhile

    assert cache.write_context(1, populate.gen, EXCHANGES) is False
    assert cache.read_user(1).context is None


def test_an_append_with_an_old_token_drops_the_context(cache):
    old = cache.read_user(1)
    cache.invalidate_user(1)
    fresh = cache.read_user(1)
    cache.write_context(1, fresh.gen, EXCHANGES)

    assert cache.append_context(1, old.gen, (13, "m", "r"), keep=5) is False
    assert cache.read_user(1).context is None


def test_a_context_expires_and_each_write_refreshes_it(cache, raw):
    view = cache.read_user(1)
    cache.write_context(1, view.gen, EXCHANGES)
    raw.pexpire(cache.key("context", 1), 10_000)

    cache.append_context(1, view.gen, (13, "m", "r"), keep=5)

    assert raw.pttl(cache.key("context", 1)) > CONTEXT_TTL * 1000 - 2000
    assert raw.pttl(cache.key("gen", 1)) > GEN_TTL * 1000 - 2000


def test_long_exchanges_survive_the_round_trip(cache):
    exchange = (2**40, "вопрос " * 600, "ответ\u2028 \\ \"x\" " * 900)
    view = cache.read_user(1)
    cache.write_context(1, view.gen, [exchange])

    assert cache.read_user(1).context == [list(exchange)]


# --- invalidate_user ------------------------------------------------------------------------


def test_an_invalidation_deletes_the_limits_and_the_context(cache):
    view = cache.read_user(1)
    cache.write_limits(1, view.gen, LIMITS)
    cache.write_context(1, view.gen, EXCHANGES)

    assert cache.invalidate_user(1) is True

    after = cache.read_user(1)
    assert (after.limits, after.context) == (None, None)


def test_entries_written_after_an_invalidation_with_the_new_token_are_kept(cache):
    cache.invalidate_user(1)
    view = cache.read_user(1)

    assert cache.write_limits(1, view.gen, LIMITS) is True
    assert cache.read_user(1).limits["used"] == 30


def test_a_flushed_token_is_never_matched_again(make_cache, throwaway_redis):
    """An evicted or flushed token reads as absent; a write holding the old
    one must not match the token created next."""
    cache = make_cache(throwaway_redis.url)
    old = cache.read_user(1)
    throwaway_redis.flushall()

    fresh = cache.read_user(1)

    assert fresh.gen != old.gen
    assert cache.write_limits(1, old.gen, LIMITS) is False
    assert cache.read_user(1).limits is None


# --- ping -----------------------------------------------------------------------------------


def test_ping_says_ok_when_redis_answers(cache):
    assert cache.ping() == "ok"


def test_ping_says_degraded_within_the_timeout_when_redis_is_gone(down_cache, throwaway_redis):
    throwaway_redis.kill()

    assert down_cache.ping() == "degraded"


def test_a_unix_socket_url_works(make_cache, throwaway_redis):
    cache = make_cache(throwaway_redis.unix_url)
    view = cache.read_user(1)
    assert cache.write_limits(1, view.gen, LIMITS) is True
    assert cache.read_user(1).limits["used"] == 30
    assert cache.server == str(throwaway_redis.socket_path)


# --- faults ---------------------------------------------------------------------------------


def test_a_killed_redis_is_a_miss_for_every_method(down_cache, throwaway_redis, caplog):
    throwaway_redis.kill()
    fallbacks = counted("limits", "fallback")

    results = every_method(down_cache)

    assert results == DEFAULTS
    assert counted("limits", "fallback") - fallbacks == 2  # read_user and write_limits
    assert redis_up(down_cache) == 0


def test_redis_going_away_is_logged_once_however_many_calls(
    down_cache, throwaway_redis, caplog
):
    caplog.set_level(logging.INFO, logger="app.cache")
    throwaway_redis.kill()

    def calls():
        for _ in range(20):
            down_cache.read_user(1)
            down_cache.get("answer", "q")

    threads = [threading.Thread(target=calls) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    warnings, infos = warnings_and_infos(caplog)
    assert len(warnings) == 1
    assert warnings[0].startswith("redis unavailable (")
    assert "falling back to PostgreSQL" in warnings[0]
    assert infos == []


def test_a_paused_redis_costs_one_timeout_then_is_skipped(clocked_cache, throwaway_redis):
    cache, _ = clocked_cache
    before = throwaway_redis.commands_received()
    throwaway_redis.pause()
    try:
        assert cache.read_user(1) == MISS  # sent, no answer within the timeout
        for _ in range(100):
            assert cache.read_user(1) == MISS  # within the retry interval
    finally:
        throwaway_redis.resume()

    # No network while down: Redis got the first call only.
    assert received_once_resumed(throwaway_redis, before, 1) == 1
    assert redis_up(cache) == 0


def test_a_paused_redis_is_probed_once_per_retry_interval(clocked_cache, throwaway_redis):
    cache, clock = clocked_cache
    before = throwaway_redis.commands_received()
    throwaway_redis.pause()
    try:
        cache.get("answer", "q")  # sent, no answer: marks it down
        for step in (RETRY / 2, RETRY / 2, RETRY):
            clock.advance(step)
            for _ in range(5):
                assert cache.get("answer", "q") is None
    finally:
        throwaway_redis.resume()

    # Half an interval later nothing was sent; then, each time the interval
    # had passed, its first call was the probe (a new connection's opening
    # command) and the other four skipped.
    assert received_once_resumed(throwaway_redis, before, 3) == 3


def test_redis_coming_back_is_logged_once_and_sets_the_gauge(
    down_cache, throwaway_redis, caplog
):
    caplog.set_level(logging.INFO, logger="app.cache")
    throwaway_redis.pause()
    try:
        down_cache.read_user(1)
        assert redis_up(down_cache) == 0
    finally:
        throwaway_redis.resume()
    time.sleep(RETRY + 0.05)

    views = [down_cache.read_user(1) for _ in range(5)]

    warnings, infos = warnings_and_infos(caplog)
    assert len(warnings) == 1 and len(infos) == 1
    assert infos[0].startswith("redis is back")
    assert all(view.gen is not None for view in views)
    assert redis_up(down_cache) == 1


def test_while_down_calls_before_the_retry_interval_stay_misses(down_cache, throwaway_redis):
    throwaway_redis.kill()
    down_cache.read_user(1)
    throwaway_redis.start()  # back at once, but not asked before the interval

    assert down_cache.read_user(1) == MISS
    time.sleep(RETRY + 0.05)
    assert down_cache.read_user(1).gen is not None


def test_a_restarted_empty_redis_gives_misses_and_the_scripts_are_sent_again(
    down_cache, throwaway_redis, caplog
):
    caplog.set_level(logging.INFO, logger="app.cache")
    view = down_cache.read_user(1)
    down_cache.write_limits(1, view.gen, LIMITS)

    throwaway_redis.restart()

    # The pooled connection's reset is seen when it is taken from the pool: a
    # restart between two calls is not even a fault.
    after = down_cache.read_user(1)
    assert after.gen is not None and after.gen != view.gen
    assert after.limits is None
    assert down_cache.write_limits(1, view.gen, LIMITS) is False
    assert down_cache.write_limits(1, after.gen, LIMITS) is True
    assert warnings_and_infos(caplog) == ([], [])
    # NOSCRIPT after the restart: EVAL sent each of the two scripts once.
    assert throwaway_redis.command_calls("eval") == 2


def test_forgotten_scripts_are_sent_again_without_a_fault(down_cache, throwaway_redis, caplog):
    caplog.set_level(logging.INFO, logger="app.cache")
    down_cache.read_user(1)
    with throwaway_redis.client() as client:
        client.script_flush()

    assert down_cache.read_user(1).gen is not None
    assert warnings_and_infos(caplog) == ([], [])


def test_a_flushall_turns_every_entry_into_a_miss(down_cache, throwaway_redis, caplog):
    caplog.set_level(logging.INFO, logger="app.cache")
    view = down_cache.read_user(1)
    down_cache.write_limits(1, view.gen, LIMITS)
    down_cache.write_context(1, view.gen, EXCHANGES)
    down_cache.set("answer", "q", "a", 60)

    throwaway_redis.flushall()

    after = down_cache.read_user(1)
    assert (after.limits, after.context) == (None, None)
    assert down_cache.get("answer", "q") is None
    assert warnings_and_infos(caplog) == ([], [])


def test_an_invalidation_missed_while_down_is_replayed_before_the_next_read(
    down_cache, throwaway_redis
):
    """A refund while Redis is unreachable: the refusal cached before it must
    not be served once Redis answers again (the entries survived a pause)."""
    view = down_cache.read_user(1)
    down_cache.write_limits(1, view.gen, LIMITS)
    throwaway_redis.pause()
    try:
        assert down_cache.invalidate_user(1) is False
    finally:
        throwaway_redis.resume()
    time.sleep(RETRY + 0.05)

    after = down_cache.read_user(1)

    assert after.gen not in (None, view.gen)
    assert after.limits is None


def test_an_invalidation_is_sent_even_while_this_process_thinks_redis_is_down(
    down_cache, make_cache, throwaway_redis
):
    """Another process that reaches Redis must not read what a refund made
    stale, however long this one still takes Redis for down."""
    other = make_cache(throwaway_redis.url, retry_interval=60)
    view = other.read_user(1)
    other.write_limits(1, view.gen, LIMITS)
    throwaway_redis.pause()
    try:
        other.read_user(1)  # times out: this process now takes Redis for down
    finally:
        throwaway_redis.resume()

    assert other.invalidate_user(1) is True  # within the 60 s it would skip calls

    assert down_cache.read_user(1).limits is None


def test_an_append_lost_while_down_drops_the_context_once_redis_answers(
    down_cache, throwaway_redis
):
    """The saved exchange never reached the cached context: the context must
    not be served without it."""
    view = down_cache.read_user(1)
    down_cache.write_context(1, view.gen, EXCHANGES)
    throwaway_redis.pause()
    try:
        assert down_cache.append_context(1, view.gen, (13, "m", "r"), keep=5) is False
    finally:
        throwaway_redis.resume()
    time.sleep(RETRY + 0.05)

    assert down_cache.read_user(1).context is None


def test_a_reply_of_an_unexpected_shape_is_a_miss(down_cache, throwaway_redis):
    with throwaway_redis.client() as client:
        client.set(down_cache.key("limits", 1), "not a hash")

    assert down_cache.read_user(1) == MISS
    assert redis_up(down_cache) == 0


# --- processes ------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_process_uses_connections_of_its_own(make_cache, throwaway_redis):
    cache = make_cache(throwaway_redis.url)
    cache.set("answer", "who", "parent", 60)
    (parent_address,) = cache_addresses(throwaway_redis)
    reader, writer = os.pipe()

    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        status = 1
        try:
            report = {
                "read": cache.get("answer", "who"),
                "wrote": cache.set("answer", "who", "child", 60),
                "addresses": sorted(cache_addresses(throwaway_redis)),
            }
            os.write(writer, json.dumps(report).encode())
            status = 0
        finally:
            os._exit(status)

    os.close(writer)
    with os.fdopen(reader) as pipe:
        report = json.loads(pipe.read() or "{}")
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert report["read"] == "parent" and report["wrote"] is True
    assert len(report["addresses"]) == 2 and parent_address in report["addresses"]
    # The parent's connection was left alone by the child: still usable.
    assert cache.get("answer", "who") == "child"
    assert cache_addresses(throwaway_redis) == [parent_address]


def cache_addresses(server) -> list[str]:
    """Client addresses of the Caches' connections (no CLIENT SETINFO name,
    unlike the inspecting redis-py client)."""
    return [c["addr"] for c in server.connected_clients() if not c.get("lib-name")]


def test_many_threads_share_a_bounded_pool(make_cache, throwaway_redis):
    cache = make_cache(throwaway_redis.url, pool_size=8)
    view = cache.read_user(1)
    cache.write_context(1, view.gen, EXCHANGES)
    barrier = threading.Barrier(64)
    results = []

    def read():
        barrier.wait()
        results.extend(cache.read_user(1).context for _ in range(20))

    threads = [threading.Thread(target=read) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(cache_addresses(throwaway_redis)) <= 8
    assert len(results) == 64 * 20


def test_a_pool_with_no_free_connection_is_a_fallback_not_an_outage(
    make_cache, throwaway_redis, caplog
):
    caplog.set_level(logging.INFO, logger="app.cache")
    cache = make_cache(throwaway_redis.url, pool_size=1)
    assert cache.ping() == "ok"
    pool = cache._client.connection_pool
    taken = pool.get_connection()  # another thread's call, in the middle of it
    try:
        fallbacks = counted("answer", "fallback")
        assert cache.get("answer", "q") is None
        assert cache.get("answer", "q") is None
        assert counted("answer", "fallback") - fallbacks == 2
    finally:
        pool.release(taken)

    assert cache.get("answer", "q") is None and cache.ping() == "ok"
    warnings, _ = warnings_and_infos(caplog)
    assert len(warnings) == 1 and "pooled connections" in warnings[0]
    assert redis_up(cache) == 1


def test_user_view_defaults_mean_redis_was_not_asked():
    assert MISS == UserView(None, None, None, None)
