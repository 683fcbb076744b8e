"""Idempotency keys on POST /v1/chat/send (contract, "Idempotency").

A ``request_id`` (body) or ``Idempotency-Key`` (header) already answered for a
user replays the stored answer without an LLM call and without spending
quota; a duplicate of a request still in flight gets 409; a failed or refused
first attempt leaves the key free; a claim whose request died is taken over;
deleting the user's history forgets their keys; and under a burst of
identical requests exactly one of them reaches the model and pays.

Checked through real HTTP (test client and a threaded live server), the
counter and rows in PostgreSQL (``sql``) and the fake LLM's call count.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import assert_counted_stored_and_called, exchange_count, request_count
from tests.fake_llm import ok, status
from tests.servers import post_send, send_all_at_once

MESSAGE = "Как поднять продажи?"


# --- helpers -------------------------------------------------------------------


def key_rows(sql) -> list[tuple]:
    return sql(
        "SELECT telegram_id, request_id, chat_request_id IS NOT NULL "
        "FROM ai_chat_idempotency_keys ORDER BY id"
    )


def insert_claim(sql, telegram_id: int, request_id: str, message: str, age: str) -> None:
    """A claim of a request still (or no longer) in flight, ``age`` old."""
    sql(
        "INSERT INTO ai_chat_idempotency_keys "
        "(telegram_id, request_id, message_sha256, chat_request_id, claimed_at) "
        "VALUES (%s, %s, %s, NULL, now() - %s::interval)",
        (telegram_id, request_id, hashlib.sha256(message.encode()).hexdigest(), age),
    )


def wait_for_llm_calls(fake_llm, count: int, timeout: float = 10.0) -> None:
    """Block until the fake LLM has seen ``count`` calls (bounded wait)."""
    deadline = time.monotonic() + timeout
    while fake_llm.calls < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the LLM saw {fake_llm.calls} calls, expected {count}")
        time.sleep(0.01)


def send_with_key(api, way: str, key: str, **fields):
    """Send with the key in the body, in the header, or in both (equal)."""
    if way == "body":
        return api.send(request_id=key, **fields)
    if way == "header":
        return api.send(headers={"Idempotency-Key": key}, **fields)
    return api.send(request_id=key, headers={"Idempotency-Key": key}, **fields)


# --- replay of an answered key -------------------------------------------------


@pytest.mark.parametrize("way", ["body", "header", "body_and_header"])
def test_answered_key_replays_stored_answer_without_llm_or_quota(api, fake_llm, sql, way):
    fake_llm.script(ok("Поднимите рейтинг карточки.", tokens=42))
    first = send_with_key(api, way, "upd-1:1")

    replay = send_with_key(api, way, "upd-1:1")

    assert first.status_code == 200
    assert replay.status_code == 200
    assert replay.get_json() == {
        "response": "Поднимите рейтинг карточки.",
        "parts": ["Поднимите рейтинг карточки."],
        "tokens_used": 42,
        "remaining_requests": 29,
        "daily_limit": 30,
        "model": "gpt-4o-mini",
        "tools": [],
        "cached": False,
    }
    assert_counted_stored_and_called(sql, fake_llm, 1)


def test_key_in_body_and_key_in_header_are_the_same_key(api, fake_llm, sql):
    first = api.send(request_id="upd-2:1")

    replay = api.send(headers={"Idempotency-Key": "upd-2:1"})

    assert replay.status_code == 200
    assert replay.get_json()["response"] == first.get_json()["response"]
    assert fake_llm.calls == 1
    assert request_count(sql) == 1


def test_replay_is_answered_even_when_today_quota_is_used_up(make_api, fake_llm, sql):
    api = make_api(DAILY_LIMIT="1")
    fake_llm.script(ok("Единственный ответ", tokens=9))
    assert api.send(request_id="k1").status_code == 200

    replay = api.send(request_id="k1")
    new_key = api.send(request_id="k2")

    assert replay.status_code == 200
    assert replay.get_json()["response"] == "Единственный ответ"
    assert replay.get_json()["tokens_used"] == 9
    assert replay.get_json()["remaining_requests"] == 0
    assert new_key.status_code == 429
    assert new_key.get_json()["error"] == "daily_limit_exceeded"
    assert_counted_stored_and_called(sql, fake_llm, 1)


def test_header_and_body_keys_that_differ_are_rejected(api, fake_llm, sql):
    response = api.send(request_id="key-a", headers={"Idempotency-Key": "key-b"})

    assert response.status_code == 422
    body = response.get_json()
    assert body["error"] == "validation_error"
    assert "request_id" in body["errors"]
    assert fake_llm.calls == 0
    assert request_count(sql) == 0
    assert key_rows(sql) == []


def test_same_key_of_another_user_is_another_key(api, fake_llm, sql):
    fake_llm.script(ok("Ответ первому"), ok("Ответ второму"))

    first = api.send(telegram_id=1, request_id="shared-key")
    second = api.send(telegram_id=2, request_id="shared-key")

    assert (first.status_code, second.status_code) == (200, 200)
    assert first.get_json()["response"] == "Ответ первому"
    assert second.get_json()["response"] == "Ответ второму"
    assert fake_llm.calls == 2
    assert (request_count(sql, 1), request_count(sql, 2)) == (1, 1)
    assert key_rows(sql) == [(1, "shared-key", True), (2, "shared-key", True)]


def test_key_reused_with_another_message_is_rejected_and_spends_nothing(api, fake_llm, sql):
    api.send(message="Как снизить возвраты?", request_id="k1")

    response = api.send(message="Как поднять продажи?", request_id="k1")

    assert response.status_code == 422
    assert response.get_json()["error"] == "idempotency_key_reused"
    assert_counted_stored_and_called(sql, fake_llm, 1)


# --- a duplicate while the first is in flight ----------------------------------


def test_duplicate_of_request_in_flight_gets_409_then_the_answer(live_server, fake_llm, sql):
    fake_llm.script(ok("Медленный ответ", tokens=11, delay=1.0))
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(post_send, live_server, 1, request_id="slow-1")
        wait_for_llm_calls(fake_llm, 1)

        in_flight = post_send(live_server, 1, request_id="slow-1")

        assert in_flight[0] == 409
        assert in_flight[1]["error"] == "request_in_progress"
        # Only the first request's reservation is counted.
        assert request_count(sql) == 1
        assert first.result(timeout=30)[0] == 200

    after = post_send(live_server, 1, request_id="slow-1")

    assert after == (200, first.result()[1])
    assert after[1]["response"] == "Медленный ответ"
    assert_counted_stored_and_called(sql, fake_llm, 1)


# --- failures leave the key free ----------------------------------------------


def test_key_of_failed_first_attempt_is_free_to_retry(api, fake_llm, sql):
    # OPENAI_MAX_RETRIES=2: three attempts, all failing.
    fake_llm.script(status(500), status(500), status(500), ok("Со второй попытки"))
    failed = api.send(request_id="retry-me")
    assert failed.status_code == 502
    assert key_rows(sql) == []

    retried = api.send(request_id="retry-me")

    assert retried.status_code == 200
    assert retried.get_json()["response"] == "Со второй попытки"
    assert fake_llm.calls == 4
    assert request_count(sql) == 1
    assert exchange_count(sql) == 1


def test_key_refused_with_429_is_free_after_the_limit_is_reset(make_api, fake_llm, sql):
    api = make_api(DAILY_LIMIT="1")
    assert api.send(request_id="k0").status_code == 200
    refused = api.send(request_id="k1")
    assert refused.status_code == 429
    assert api.reset_limit(telegram_id=1).get_json()["success"] is True

    retried = api.send(request_id="k1")

    assert retried.status_code == 200
    assert fake_llm.calls == 2
    assert request_count(sql) == 1
    assert exchange_count(sql) == 2


# --- claims left by requests that died ----------------------------------------


def test_stale_claim_is_taken_over(api, fake_llm, sql):
    insert_claim(sql, 1, "orphan", MESSAGE, age="1 day")

    response = api.send(message=MESSAGE, request_id="orphan")

    assert response.status_code == 200
    assert fake_llm.calls == 1
    assert request_count(sql) == 1
    assert key_rows(sql) == [(1, "orphan", True)]


def test_fresh_claim_of_another_request_gets_409(api, fake_llm, sql):
    insert_claim(sql, 1, "busy", MESSAGE, age="0 seconds")

    response = api.send(message=MESSAGE, request_id="busy")

    assert response.status_code == 409
    assert response.get_json()["error"] == "request_in_progress"
    assert fake_llm.calls == 0
    assert request_count(sql) == 0
    assert key_rows(sql) == [(1, "busy", False)]


# --- forgetting ---------------------------------------------------------------


def test_deleting_history_forgets_the_keys(api, fake_llm, sql):
    fake_llm.script(ok("Первый ответ"), ok("Новый ответ"))
    api.send(request_id="k1")
    assert api.delete_history(telegram_id=1).status_code == 200
    assert key_rows(sql) == []

    again = api.send(request_id="k1")

    assert again.status_code == 200
    assert again.get_json()["response"] == "Новый ответ"
    assert fake_llm.calls == 2
    assert request_count(sql) == 2
    assert exchange_count(sql) == 1


# --- concurrency --------------------------------------------------------------


def test_burst_of_one_key_reaches_the_llm_once_and_pays_once(live_server, fake_llm, sql):
    fake_llm.latency = 0.3

    results = send_all_at_once([(live_server, 1)] * 20, request_id="burst-1")

    answers = [body for code, body in results if code == 200]
    assert {code for code, _ in results} <= {200, 409}
    assert answers, "no request was answered"
    assert all(body == answers[0] for body in answers)
    assert all(body["error"] == "request_in_progress" for code, body in results if code == 409)
    assert_counted_stored_and_called(sql, fake_llm, 1)
