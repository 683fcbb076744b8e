"""The daily quota under concurrency (contract, "Quota rules").

Many requests for the same user hit a real threaded HTTP server at once; the
quota must hand out exactly ``DAILY_LIMIT`` answers, whatever the
interleaving, including when users are new (the INSERT path of the upsert
races), when failed answers give their unit back, and when two app instances
share the database. Counters, stored rows and the fake LLM's call count must
all agree with the answers given.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from tests.conftest import (
    assert_counted_stored_and_called,
    exchange_count,
    request_count,
    served,
)
from tests.fake_llm import ok, status
from tests.servers import post_send, send_all_at_once


@pytest.fixture
def serve():
    """Put apps on their own threaded werkzeug servers: ``serve(app)`` → base URL."""
    with ExitStack() as stack:
        yield lambda app: stack.enter_context(served(app))


# --- one user, one instance ----------------------------------------------------


@pytest.fixture
def eighty_at_once(live_server, fake_llm):
    """80 simultaneous sends for user 500 against DAILY_LIMIT=30."""
    fake_llm.latency = 0.2  # keep the answered requests in flight together
    return send_all_at_once([(live_server, 500)] * 80)


def test_concurrent_sends_give_exactly_the_daily_limit_of_answers(eighty_at_once):
    statuses = Counter(code for code, _ in eighty_at_once)
    assert statuses == {200: 30, 429: 50}


def test_concurrent_sends_over_the_limit_answer_daily_limit_exceeded(eighty_at_once):
    refused = [body for code, body in eighty_at_once if code == 429]
    assert len(refused) == 50
    assert {body["error"] for body in refused} == {"daily_limit_exceeded"}
    assert {body["requests_remaining"] for body in refused} == {0}


def test_concurrent_sends_report_each_remaining_count_once(eighty_at_once):
    remaining = sorted(body["remaining_requests"] for code, body in eighty_at_once if code == 200)
    assert remaining == list(range(30))


def test_concurrent_sends_count_store_and_call_the_llm_once_per_answer(
    eighty_at_once, sql, fake_llm
):
    assert_counted_stored_and_called(sql, fake_llm, 30, telegram_id=500)


# --- many new users at once (the INSERT path of the upsert) ---------------------

USERS = range(1001, 1021)
SENDS_PER_USER = 5


@pytest.fixture
def new_users_at_once(make_app, serve, fake_llm):
    """20 users without a counter row, 5 simultaneous sends each, DAILY_LIMIT=3."""
    fake_llm.latency = 0.2
    base_url = serve(make_app(DAILY_LIMIT="3"))
    targets = [(base_url, user) for user in USERS for _ in range(SENDS_PER_USER)]
    return list(zip((user for _, user in targets), send_all_at_once(targets), strict=True))


def test_concurrent_new_users_each_get_exactly_the_limit(new_users_at_once):
    per_user = {user: Counter() for user in USERS}
    for user, (code, _) in new_users_at_once:
        per_user[user][code] += 1
    assert per_user == {user: {200: 3, 429: 2} for user in USERS}


def test_concurrent_new_users_each_see_remaining_two_one_zero(new_users_at_once):
    remaining = {user: [] for user in USERS}
    for user, (code, body) in new_users_at_once:
        if code == 200:
            remaining[user].append(body["remaining_requests"])
    assert {user: sorted(values) for user, values in remaining.items()} == {
        user: [0, 1, 2] for user in USERS
    }


def test_concurrent_new_users_counters_and_rows_agree(new_users_at_once, sql, fake_llm):
    counters = dict(sql("SELECT telegram_id, request_count FROM ai_chat_daily_limits"))
    stored = dict(
        sql("SELECT telegram_id, count(*) FROM ai_chat_requests GROUP BY telegram_id")
    )
    assert counters == {user: 3 for user in USERS}
    assert stored == {user: 3 for user in USERS}
    assert fake_llm.calls == 3 * len(USERS)


# --- refunds racing reservations ------------------------------------------------

REFUND_LIMIT = 10
REFUND_USER = 700


@pytest.fixture
def sends_with_failures(make_app, serve, fake_llm, sql):
    """20 clients × 5 sequential sends for one user while every other LLM call
    fails; a watcher samples the counter the whole time."""
    app = make_app(DAILY_LIMIT=str(REFUND_LIMIT), OPENAI_MAX_RETRIES="0")
    base_url = serve(app)
    fake_llm.script(*[ok(delay=0.05), status(500, delay=0.05)] * 50)

    seen = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(request_count(sql, REFUND_USER))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    barrier = threading.Barrier(20)

    def client(_):
        barrier.wait(timeout=30)
        return [post_send(base_url, REFUND_USER) for _ in range(5)]

    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            results = [result for batch in pool.map(client, range(20)) for result in batch]
    finally:
        done.set()
        watcher.join(timeout=10)
    return {"results": results, "seen": seen}


def test_concurrent_failures_answer_only_200_429_or_502(sends_with_failures):
    statuses = Counter(code for code, _ in sends_with_failures["results"])
    assert set(statuses) <= {200, 429, 502}
    # Both paths really ran: answers and refunded failures.
    assert statuses[200] > 0
    assert statuses[502] > 0


def test_concurrent_refunds_keep_counter_rows_and_answers_equal(
    sends_with_failures, sql, fake_llm
):
    answers = sum(1 for code, _ in sends_with_failures["results"] if code == 200)
    failures = sum(1 for code, _ in sends_with_failures["results"] if code == 502)
    assert request_count(sql, REFUND_USER) == answers
    assert exchange_count(sql, REFUND_USER) == answers
    assert fake_llm.outcomes.count("ok") == answers
    assert fake_llm.outcomes.count("status:500") == failures
    assert fake_llm.calls == answers + failures


def test_concurrent_refunds_never_push_the_counter_over_the_limit(sends_with_failures):
    answers = sum(1 for code, _ in sends_with_failures["results"] if code == 200)
    assert answers <= REFUND_LIMIT
    assert sends_with_failures["seen"], "the watcher sampled nothing"
    assert max(sends_with_failures["seen"]) <= REFUND_LIMIT


def test_limits_after_concurrent_refunds_match_the_answers(sends_with_failures, make_api):
    answers = sum(1 for code, _ in sends_with_failures["results"] if code == 200)
    body = make_api(DAILY_LIMIT=str(REFUND_LIMIT)).limits(REFUND_USER).get_json()
    assert body["requests_today"] == answers
    assert body["requests_remaining"] == REFUND_LIMIT - answers


# --- two instances sharing the database ---------------------------------------


@pytest.fixture
def two_instances_at_once(make_app, serve, fake_llm):
    """60 simultaneous sends for user 900 split across two apps, DAILY_LIMIT=30."""
    fake_llm.latency = 0.2
    first, second = serve(make_app()), serve(make_app())
    targets = [(first if i % 2 == 0 else second, 900) for i in range(60)]
    return send_all_at_once(targets)


def test_two_instances_together_give_exactly_the_daily_limit(two_instances_at_once):
    statuses = Counter(code for code, _ in two_instances_at_once)
    assert statuses == {200: 30, 429: 30}
    remaining = sorted(body["remaining_requests"] for code, body in two_instances_at_once
                       if code == 200)
    assert remaining == list(range(30))


def test_two_instances_count_store_and_call_the_llm_once_per_answer(
    two_instances_at_once, sql, fake_llm
):
    assert_counted_stored_and_called(sql, fake_llm, 30, telegram_id=900)
