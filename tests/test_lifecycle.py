"""A send's life from arrival to its last write (issue "Production switch-over",
items 4–8).

- A claim cannot be stolen: a retry that takes over an expired claim owns the
  key; the original request, answering late, stores nothing and gives its unit
  back, and a claim lives longer than any request that could still hold it.
- One deadline per request bounds the model call; a timed-out send is refunded.
- A send that waited in gunicorn's queue too long, or arrives at a stopping
  worker, is refused with 503 before anything is reserved; a graceful
  shutdown strands no unit (counter = stored rows = answers given).
- A busy connection pool is ridden out like a database blip: the answer is
  saved, the refund lands.
- The quota day never goes backwards: an instance whose clock is behind counts
  and refunds on the counter row's own day.
- An unconfigured model is refused before reserving; unstorable characters in
  the model's text are cleaned, not a 500.

Checked through real HTTP where requests must overlap (a threaded server,
gunicorn), the rows in PostgreSQL (``sql``) and what the fake LLM received.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from http.client import HTTPConnection

import pytest
import requests

from app.extensions import db
from tests.conftest import (
    Api,
    base_env,
    exchange_count,
    freeze_app,
    request_count,
    served,
)
from tests.fake_llm import hang, ok, status
from tests.servers import API_KEY, Gunicorn, post_send

MESSAGE = "Как поднять продажи?"
NOON_TODAY = "2026-03-02T12:00:00+03:00"
TODAY = date(2026, 3, 2)
# An instance whose clock is behind still thinks it is yesterday (Moscow).
LAST_SECOND_OF_YESTERDAY = "2026-03-01T23:59:59+03:00"
SLOW = {"OPENAI_TIMEOUT": "10", "LLM_DEADLINE": "10"}


# --- helpers -------------------------------------------------------------------


@dataclass
class Reply:
    """One send over real HTTP; ``status`` is None when the connection failed."""

    status: int | None
    headers: dict = field(default_factory=dict)
    body: dict | None = None


def send_over_http(base_url: str, telegram_id: int, message: str = MESSAGE) -> Reply:
    try:
        response = requests.post(
            f"{base_url}/v1/chat/send",
            json={"telegram_id": telegram_id, "message": message},
            headers={"X-API-KEY": API_KEY},
            timeout=60,
        )
    except requests.ConnectionError:
        return Reply(None)
    headers = {name.lower(): value for name, value in response.headers.items()}
    return Reply(response.status_code, headers, response.json())


def claim_ttl(app) -> float:
    """How long a claim lives (app.chat.send.Exchange.claim_ttl)."""
    config = app.config
    longest = max(config["REQUEST_DEADLINE"], config["STREAM_MAX_SECONDS"])
    return longest + config["LLM_DEADLINE"] + 30


def counter_row(sql, telegram_id: int = 1) -> tuple[int, date] | None:
    """The user's (request_count, last_reset_date), None without a row."""
    rows = sql(
        "SELECT request_count, last_reset_date FROM ai_chat_daily_limits WHERE telegram_id = %s",
        (telegram_id,),
    )
    return rows[0] if rows else None


def key_rows(sql) -> list[tuple]:
    return sql("SELECT telegram_id, request_id, chat_request_id FROM ai_chat_idempotency_keys")


def stored(sql, telegram_id: int = 1) -> list[tuple]:
    """(id, response, tokens_used, request_date) of the user's exchanges, oldest first."""
    return sql(
        "SELECT id, response, tokens_used, request_date FROM ai_chat_requests "
        "WHERE telegram_id = %s ORDER BY id",
        (telegram_id,),
    )


def asked(fake_llm) -> list[str]:
    """The seller's message of every call the fake LLM received, in order."""
    return [request["body"]["messages"][-1]["content"] for request in fake_llm.requests]


def assert_refused_before_reserving(reply_status, headers, body) -> None:
    """503 service_unavailable in the contract shape, with a Retry-After
    (``headers`` with lower-case names)."""
    assert reply_status == 503
    assert body["error"] == "service_unavailable"
    assert body["detail"]["error"] == "service_unavailable"
    assert body["detail"]["message"] == body["message"]
    assert int(headers["retry-after"]) > 0


def pinned_api(make_app, moment: str, **overrides) -> Api:
    app = make_app(**overrides)
    freeze_app(app, moment)
    return Api(app.test_client())


@pytest.fixture
def gunicorn(database_url, fake_llm, tmp_path):
    """Start the service under gunicorn (one worker) with env overrides."""
    servers = []

    def start(threads: int, **overrides) -> Gunicorn:
        env = {**base_env(database_url, fake_llm.url), **overrides}
        server = Gunicorn(env, workers=1, threads=threads, log_dir=tmp_path)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


# --- 1. claims cannot be stolen -----------------------------------------------


def test_late_original_of_a_taken_over_claim_stores_nothing_and_is_refunded(
    make_app, fake_llm, sql
):
    original = make_app(**SLOW)
    claimed_at = freeze_app(original, NOON_TODAY)
    retry = make_app(**SLOW)
    freeze_app(retry, claimed_at + timedelta(seconds=claim_ttl(retry) + 1))
    fake_llm.script(ok("Ответ оригинала", tokens=5, delay=3), ok("Ответ повтора", tokens=7))

    with served(original) as url, ThreadPoolExecutor(max_workers=1) as pool:
        late = pool.submit(post_send, url, 1, request_id="k")
        assert fake_llm.wait_for(lambda: fake_llm.calls == 1, timeout=10)
        taken_over = Api(retry.test_client()).send(request_id="k")
        assert taken_over.status_code == 200
        assert not late.done(), "the original must still be waiting for the model"
        late_status, late_body = late.result(timeout=30)

    assert late_status == 409
    assert late_body["error"] == "request_in_progress"
    [(row_id, response, tokens, _)] = stored(sql)
    assert (response, tokens) == ("Ответ повтора", 7)
    assert key_rows(sql) == [(1, "k", row_id)]
    assert request_count(sql) == 1
    assert asked(fake_llm) == [MESSAGE, MESSAGE]


def test_key_taken_over_replays_the_retrys_answer_without_the_model(make_app, fake_llm, sql):
    original = make_app(**SLOW)
    claimed_at = freeze_app(original, NOON_TODAY)
    retry = make_app(**SLOW)
    freeze_app(retry, claimed_at + timedelta(seconds=claim_ttl(retry) + 1))
    fake_llm.script(ok("Ответ оригинала", delay=3), ok("Ответ повтора", tokens=7))
    with served(original) as url, ThreadPoolExecutor(max_workers=1) as pool:
        late = pool.submit(post_send, url, 1, request_id="k")
        assert fake_llm.wait_for(lambda: fake_llm.calls == 1, timeout=10)
        answer = Api(retry.test_client()).send(request_id="k").get_json()
        assert late.result(timeout=30)[0] == 409

    replay = Api(retry.test_client()).send(request_id="k")

    assert replay.status_code == 200
    replayed = replay.get_json()
    assert {**replayed, "remaining_requests": None} == {**answer, "remaining_requests": None}
    # A replay reports today's usage as it is now: the original's unit came back.
    assert replayed["remaining_requests"] == 29
    assert fake_llm.calls == 2
    assert request_count(sql) == 1
    assert exchange_count(sql) == 1


# --- 2. one deadline per request -----------------------------------------------

# The model's share is what the request's deadline leaves after the write
# reserve (app.deadline.WRITE_RESERVE_SECONDS = 3): 2 s here, however long
# OPENAI_TIMEOUT is and with retries on. (REQUEST_DEADLINE may not be set
# below LLM_DEADLINE: app.config.server_settings refuses it.)
ONE_DEADLINE = {"REQUEST_DEADLINE": "5", "LLM_DEADLINE": "5", "OPENAI_TIMEOUT": "60",
                "OPENAI_MAX_RETRIES": "2"}


def test_model_that_hangs_is_cut_by_the_request_deadline_and_refunded(make_api, fake_llm, sql):
    api = make_api(**ONE_DEADLINE)
    fake_llm.script(hang())

    started = time.monotonic()
    response = api.send()
    elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert response.get_json()["error"] == "llm_timeout"
    assert elapsed < 5, f"answered after {elapsed:.1f}s, past the 5 s request deadline"
    assert fake_llm.wait_for(lambda: fake_llm.requests_abandoned == 1, timeout=5)
    assert request_count(sql) == 0
    assert exchange_count(sql) == 0


def test_claim_of_a_send_in_flight_is_not_taken_over_before_its_lifetime_ends(
    make_app, fake_llm, sql
):
    original = make_app(**ONE_DEADLINE)
    claimed_at = freeze_app(original, NOON_TODAY)
    retry = make_app(**ONE_DEADLINE)
    # Long after the original's own deadline, but inside the claim's lifetime.
    freeze_app(retry, claimed_at + timedelta(seconds=claim_ttl(retry) - 1))
    fake_llm.script(hang())

    with served(original) as url, ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(post_send, url, 1, request_id="k")
        assert fake_llm.wait_for(lambda: fake_llm.calls == 1, timeout=10)
        duplicate = Api(retry.test_client()).send(request_id="k")
        assert not in_flight.done(), "the original must still be waiting for the model"
        counted_while_in_flight = request_count(sql)
        original_status, original_body = in_flight.result(timeout=30)

    assert duplicate.status_code == 409
    assert duplicate.get_json()["error"] == "request_in_progress"
    assert counted_while_in_flight == 1
    assert (original_status, original_body["error"]) == (504, "llm_timeout")
    assert fake_llm.calls == 1
    assert request_count(sql) == 0
    assert key_rows(sql) == []
    assert exchange_count(sql) == 0


# --- 3. queue wait --------------------------------------------------------------


def test_send_that_waited_in_the_queue_too_long_is_refused_before_reserving(
    gunicorn, fake_llm, sql
):
    server = gunicorn(threads=1, QUEUE_TIMEOUT="0.5", **SLOW)
    fake_llm.script(ok("Ответ первому", delay=2))

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(send_over_http, server.url, 1, "Первый вопрос")
        assert fake_llm.wait_for(lambda: fake_llm.calls == 1, timeout=15)
        queued = pool.submit(send_over_http, server.url, 2, "Второй вопрос")
        first, queued = first.result(timeout=60), queued.result(timeout=60)

    assert first.status == 200
    assert_refused_before_reserving(queued.status, queued.headers, queued.body)
    assert counter_row(sql, telegram_id=2) is None
    assert asked(fake_llm) == ["Первый вопрос"]
    assert request_count(sql, telegram_id=1) == 1


# Admission by the time left: REQUEST_DEADLINE 12 s, the model at most 8 s, and
# a send admitted while 3 s of model time are left after the 3 s kept for the
# writes, i.e. after up to 6 s in the queue (a fixed queue timeout would have
# been REQUEST_DEADLINE - LLM_DEADLINE = 4 s).
BY_TIME_LEFT = {"REQUEST_DEADLINE": "12", "LLM_DEADLINE": "8", "OPENAI_TIMEOUT": "8",
                "MIN_ANSWER_SECONDS": "3"}


def send_behind_a_slow_one(server, fake_llm, first_takes: float) -> tuple[Reply, Reply]:
    """With one thread: a send whose model takes ``first_takes`` s, and a second
    send that waits in the queue behind it all that time."""
    fake_llm.script(ok("Ответ первому", delay=first_takes), ok("Ответ второму"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(send_over_http, server.url, 1, "Первый вопрос")
        assert fake_llm.wait_for(lambda: fake_llm.calls == 1, timeout=15)
        queued = pool.submit(send_over_http, server.url, 2, "Второй вопрос")
        return first.result(timeout=60), queued.result(timeout=60)


def test_send_that_waited_long_but_still_has_time_for_the_model_is_answered(
    gunicorn, fake_llm, sql
):
    server = gunicorn(threads=1, **BY_TIME_LEFT)

    first, queued = send_behind_a_slow_one(server, fake_llm, first_takes=5.0)

    assert (first.status, queued.status) == (200, 200)
    assert queued.body["response"] == "Ответ второму"
    assert request_count(sql, telegram_id=2) == 1


def test_send_left_with_too_little_time_for_the_model_is_refused_before_reserving(
    gunicorn, fake_llm, sql
):
    server = gunicorn(threads=1, **BY_TIME_LEFT)

    first, queued = send_behind_a_slow_one(server, fake_llm, first_takes=7.5)

    assert first.status == 200
    assert_refused_before_reserving(queued.status, queued.headers, queued.body)
    assert counter_row(sql, telegram_id=2) is None
    assert asked(fake_llm) == ["Первый вопрос"]


# --- 4. a busy pool is not an outage -----------------------------------------------

ONE_CONNECTION = {"DB_POOL_SIZE": "1", "DB_MAX_OVERFLOW": "0", "DB_POOL_TIMEOUT": "0.2",
                  "OPENAI_MAX_RETRIES": "0"}


def send_while_the_pool_is_held(app, fake_llm, hold: float = 1.5) -> tuple[int, dict]:
    """Send; while the model thinks, hold the app's only pooled connection for
    ``hold`` seconds. Returns the send's (status, body)."""
    with served(app) as url, ThreadPoolExecutor(max_workers=1) as pool:
        send = pool.submit(post_send, url, 1)
        assert fake_llm.wait_for(lambda: fake_llm.calls == 1, timeout=10)
        with app.app_context():
            raw = db.engine.raw_connection()
        try:
            time.sleep(hold)  # the model answers meanwhile; the write must wait
            assert not send.done(), "the send finished without a pooled connection"
        finally:
            raw.close()
        return send.result(timeout=30)


def test_answer_is_saved_after_the_only_pooled_connection_comes_back(make_app, fake_llm, sql):
    app = make_app(**ONE_CONNECTION)
    fake_llm.script(ok("Ответ после занятого пула", tokens=9, delay=0.3))

    send_status, body = send_while_the_pool_is_held(app, fake_llm)

    assert send_status == 200
    assert body["tokens_used"] == 9
    assert [row[1:3] for row in stored(sql)] == [("Ответ после занятого пула", 9)]
    assert request_count(sql) == 1


def test_failed_answer_is_refunded_after_the_only_pooled_connection_comes_back(
    make_app, fake_llm, sql
):
    app = make_app(**ONE_CONNECTION)
    fake_llm.script(status(500, delay=0.3))

    send_status, body = send_while_the_pool_is_held(app, fake_llm)

    assert (send_status, body["error"]) == (502, "llm_unavailable")
    assert fake_llm.calls == 1
    assert request_count(sql) == 0
    assert exchange_count(sql) == 0


def test_a_send_that_finds_the_pool_busy_waits_for_it_and_is_answered(make_app, fake_llm, sql):
    """A busy pool before the reservation (a starved CPU) is waited for while
    the request could still be admitted: no 503 for a request with time."""
    app = make_app(**ONE_CONNECTION)
    with app.app_context():
        raw = db.engine.raw_connection()
    with served(app) as url, ThreadPoolExecutor(max_workers=1) as pool:
        send = pool.submit(post_send, url, 1)
        try:
            time.sleep(1.0)  # five times DB_POOL_TIMEOUT
            assert not send.done(), "the send did not wait for the pool"
        finally:
            raw.close()
        send_status, _ = send.result(timeout=30)

    assert send_status == 200
    assert request_count(sql) == 1


# --- 5. the quota day never goes backwards ------------------------------------------


def test_send_from_a_clock_behind_is_counted_on_the_rows_later_day(make_app, fake_llm, sql):
    today = pinned_api(make_app, NOON_TODAY)
    behind = pinned_api(make_app, LAST_SECOND_OF_YESTERDAY)
    assert today.send().status_code == 200

    response = behind.send()

    assert response.status_code == 200
    assert response.get_json()["remaining_requests"] == 28
    assert counter_row(sql) == (2, TODAY)
    assert [row[3] for row in stored(sql)] == [TODAY, TODAY]


def test_failed_send_from_a_clock_behind_is_refunded_on_the_day_it_was_counted(
    make_app, fake_llm, sql
):
    today = pinned_api(make_app, NOON_TODAY)
    behind = make_app(OPENAI_MAX_RETRIES="0")
    freeze_app(behind, LAST_SECOND_OF_YESTERDAY)
    assert today.send().status_code == 200
    fake_llm.script(status(500, delay=1))

    with served(behind) as url, ThreadPoolExecutor(max_workers=1) as pool:
        failing = pool.submit(post_send, url, 1)
        assert fake_llm.wait_for(lambda: fake_llm.calls == 2, timeout=10)
        counted_while_in_flight = counter_row(sql)
        failed_status, _ = failing.result(timeout=30)

    assert counted_while_in_flight == (2, TODAY)
    assert failed_status == 502
    assert counter_row(sql) == (1, TODAY)
    assert exchange_count(sql) == 1


def test_refund_of_a_send_in_flight_lands_after_a_reservation_from_a_clock_behind(
    make_app, fake_llm, sql
):
    today = make_app(OPENAI_MAX_RETRIES="0")
    freeze_app(today, NOON_TODAY)
    behind = pinned_api(make_app, LAST_SECOND_OF_YESTERDAY)
    fake_llm.script(status(500, delay=1.5), ok("Ответ отстающему"))

    with served(today) as url, ThreadPoolExecutor(max_workers=1) as pool:
        failing = pool.submit(post_send, url, 1)
        assert fake_llm.wait_for(lambda: fake_llm.calls == 1, timeout=10)
        assert behind.send().status_code == 200
        after_stale_reservation = counter_row(sql)
        failed_status, _ = failing.result(timeout=30)

    assert after_stale_reservation == (2, TODAY)
    assert failed_status == 502
    assert counter_row(sql) == (1, TODAY)
    assert [row[1] for row in stored(sql)] == ["Ответ отстающему"]


def test_send_from_a_clock_behind_over_todays_limit_gets_429_and_leaves_the_counter(
    make_app, fake_llm, sql
):
    today = pinned_api(make_app, NOON_TODAY, DAILY_LIMIT="2")
    behind = pinned_api(make_app, LAST_SECOND_OF_YESTERDAY, DAILY_LIMIT="2")
    assert [today.send().status_code for _ in range(2)] == [200, 200]

    response = behind.send()

    assert response.status_code == 429
    body = response.get_json()
    assert body["error"] == "daily_limit_exceeded"
    assert (body["requests_today"], body["requests_remaining"]) == (2, 0)
    assert counter_row(sql) == (2, TODAY)
    assert fake_llm.calls == 2
    assert exchange_count(sql) == 2


def test_429_from_a_clock_behind_reports_the_reset_of_the_rows_day(make_app, fake_llm, sql):
    today = pinned_api(make_app, NOON_TODAY, DAILY_LIMIT="1")
    behind = pinned_api(make_app, LAST_SECOND_OF_YESTERDAY, DAILY_LIMIT="1")
    assert today.send().status_code == 200

    response = behind.send()

    assert response.status_code == 429
    reset_at = datetime.fromisoformat(response.get_json()["reset_at"])
    assert reset_at.date() == TODAY + timedelta(days=1)
    assert int(response.headers["Retry-After"]) > 3600


def test_limits_from_a_clock_behind_report_the_counters_day(make_app, fake_llm):
    today = pinned_api(make_app, NOON_TODAY, DAILY_LIMIT="5")
    behind = pinned_api(make_app, LAST_SECOND_OF_YESTERDAY, DAILY_LIMIT="5")
    assert today.send().status_code == 200

    body = behind.limits().get_json()

    assert (body["requests_today"], body["requests_remaining"]) == (1, 4)
    assert body["reset_date"] == TODAY.isoformat()


# --- 6. shutdown ---------------------------------------------------------------------

SHUTDOWN_THREADS = 20
SHUTDOWN_SENDS = 40


def test_sigterm_strands_no_unit_counter_rows_and_answers_agree(gunicorn, fake_llm, sql):
    server = gunicorn(threads=SHUTDOWN_THREADS, DAILY_LIMIT="1000")
    fake_llm.latency = 1.5
    users = range(1001, 1001 + SHUTDOWN_SENDS)
    barrier = threading.Barrier(SHUTDOWN_SENDS)

    def one(telegram_id: int) -> Reply:
        barrier.wait(timeout=30)
        return send_over_http(server.url, telegram_id)

    with ThreadPoolExecutor(max_workers=SHUTDOWN_SENDS) as pool:
        sends = [pool.submit(one, user) for user in users]
        assert fake_llm.wait_for(lambda: fake_llm.calls >= SHUTDOWN_THREADS, timeout=30)
        server.process.send_signal(signal.SIGTERM)
        replies = dict(zip(users, (send.result(timeout=90) for send in sends), strict=True))
    assert server.process.wait(timeout=60) == 0

    statuses = [reply.status for reply in replies.values()]
    assert set(statuses) <= {200, 503, None}, statuses
    answered = [user for user, reply in replies.items() if reply.status == 200]
    assert len(answered) >= SHUTDOWN_THREADS, statuses
    # Every thread was busy at SIGTERM, so the sends the worker had already
    # accepted were waiting in its queue: they are served, and refused.
    assert 503 in statuses, statuses
    for reply in replies.values():
        if reply.status == 503:
            assert_refused_before_reserving(reply.status, reply.headers, reply.body)
    for user in users:
        expected = 1 if user in answered else 0
        assert (request_count(sql, user), exchange_count(sql, user)) == (expected, expected), user
    assert fake_llm.calls == len(answered)


def http_call(conn: HTTPConnection, method: str, path: str, body: dict | None = None):
    """One request on ``conn``; returns (status, headers, parsed JSON body)."""
    headers = {"X-API-KEY": API_KEY}
    payload = None
    if body is not None:
        payload = json.dumps(body)
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=payload, headers=headers)
    response = conn.getresponse()
    data = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data)


def test_send_on_a_kept_alive_connection_after_sigterm_is_refused_before_reserving(
    gunicorn, fake_llm, sql
):
    server = gunicorn(threads=4)
    host, port = "127.0.0.1", server.port
    with closing(HTTPConnection(host, port, timeout=30)) as probe, \
            closing(HTTPConnection(host, port, timeout=30)) as kept:
        for conn in (probe, kept):
            assert http_call(conn, "GET", "/health")[1]["connection"] == "keep-alive"
        server.process.send_signal(signal.SIGTERM)
        # The worker has the signal once it closes the connections it answers.
        deadline = time.monotonic() + 1.5
        while http_call(probe, "GET", "/health")[1]["connection"] != "close":
            assert time.monotonic() < deadline, "the worker never began to stop"
            time.sleep(0.01)
        assert kept.sock is not None, "the kept-alive connection was closed"

        send_status, headers, body = http_call(
            kept, "POST", "/v1/chat/send", {"telegram_id": 7, "message": MESSAGE}
        )

    assert_refused_before_reserving(send_status, headers, body)
    assert headers["connection"] == "close"
    assert counter_row(sql, telegram_id=7) is None
    assert fake_llm.calls == 0
    assert server.process.wait(timeout=60) == 0


# --- 7. llm_not_configured before reserving --------------------------------------------


def test_unconfigured_model_is_refused_before_the_key_or_the_quota(make_api, fake_llm, sql):
    api = make_api(OPENAI_BASE_URL="", OPENAI_API_KEY="")

    response = api.send(request_id="upd-7")

    assert response.status_code == 503
    assert response.get_json()["error"] == "llm_not_configured"
    assert counter_row(sql) is None
    assert key_rows(sql) == []
    assert exchange_count(sql) == 0
    assert fake_llm.calls == 0


# --- 8. the model's output is cleaned ----------------------------------------------


def test_nul_and_lone_surrogate_in_the_answer_are_cleaned_and_stored(api, fake_llm, sql):
    fake_llm.script(ok("Ответ\u0000 с \ud800 символом", tokens=23))

    response = api.send()

    assert response.status_code == 200
    body = response.get_json()
    assert "\x00" not in body["response"] and "\ufffd" in body["response"]
    assert body["tokens_used"] == 23
    assert [row[1:3] for row in stored(sql)] == [("Ответ с \ufffd символом", 23)]
    assert request_count(sql) == 1
