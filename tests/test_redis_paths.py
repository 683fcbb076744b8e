"""Redis in the service's paths, with PostgreSQL as the truth (contract,
"Redis, as the original architecture draws it").

Against the real Redis of the machine (a key prefix of each test's own) and,
for faults, a throwaway ``redis-server`` of the test's own that it kills,
pauses, restarts or flushes. What PostgreSQL did is counted at the driver
(tests/test_round_trips.py's ``counted``), and every test checks that the
answers, the counters and the rows agree whatever Redis did.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import redis as redis_py

from tests.conftest import Api, exchange_count, freeze_app, request_count, served
from tests.fake_llm import ok, status, tool_calls
from tests.fake_main_server import API_KEY as MAIN_KEY
from tests.fake_main_server import FakeMainServer
from tests.servers import post_send, send_all_at_once
from tests.test_round_trips import counted  # noqa: F401  (a fixture)
from tests.test_stream import read_stream

QUESTION = "Как работает FBS на Wildberries?"


@pytest.fixture
def redis_api(make_app, redis_env):
    """The API on the shared test Redis (own prefix): ``redis_api(**env)``."""
    return lambda **env: Api(make_app(**{**redis_env, **env}).test_client())


def answered(response) -> dict:
    assert response.status_code == 200, response.get_json()
    return response.get_json()


# --- the common-answer cache ---------------------------------------------------------


def test_a_common_first_question_is_answered_from_the_cache_without_the_model(
    redis_api, fake_llm, sql
):
    api = redis_api()
    fake_llm.script(ok("FBS: вы храните товар сами.", tokens=30))
    first = answered(api.send(1, message=QUESTION))

    # The same question, as another seller types it.
    second = answered(api.send(2, message="  как работает FBS   на wildberries?!  "))

    assert fake_llm.calls == 1
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["response"] == first["response"]
    assert second["tokens_used"] == 0 and second["model"] == "gpt-4o-mini"
    # A normal answer otherwise: a unit spent, saved in history.
    assert request_count(sql, 2) == 1 and exchange_count(sql, 2) == 1
    # Recorded as an answer (the spend report counts it) that cost nothing.
    assert sql("SELECT purpose, prompt_tokens + completion_tokens, cost FROM ai_chat_llm_calls "
               "WHERE telegram_id = 2") == [("answer", 0, 0)]


def test_questions_that_differ_in_one_number_never_share_an_answer(redis_api, fake_llm):
    api = redis_api()
    answered(api.send(1, message="Какая комиссия при цене 500 рублей?"))

    reply = answered(api.send(2, message="Какая комиссия при цене 600 рублей?"))

    assert reply["cached"] is False and fake_llm.calls == 2


def test_a_question_asked_with_past_exchanges_is_neither_looked_up_nor_stored(
    redis_api, fake_llm
):
    api = redis_api()
    answered(api.send(1, message="Привет"))
    answered(api.send(1, message=QUESTION))  # has a past exchange: not stored

    reply = answered(api.send(2, message=QUESTION))

    assert reply["cached"] is False and fake_llm.calls == 3


def test_an_answer_that_ran_a_tool_is_never_given_to_another_seller(
    make_app, redis_env, fake_llm
):
    with FakeMainServer() as main:
        app = make_app(**redis_env, MAIN_SERVER_URL=main.url, MAIN_SERVER_API_KEY=MAIN_KEY)
        api = Api(app.test_client())
        fake_llm.script(tool_calls(("get_sales", {})))
        assert answered(api.send(1, message=QUESTION))["tools"] == ["get_sales"]

        reply = answered(api.send(2, message=QUESTION))

    assert reply["cached"] is False
    assert fake_llm.calls == 3


def test_a_question_with_seller_data_is_not_looked_up(redis_api, fake_llm):
    api = redis_api()
    answered(api.send(1, message=QUESTION))

    reply = answered(api.send(2, message=QUESTION, user_context="Продажи: 10 шт."))

    assert reply["cached"] is False and fake_llm.calls == 2


def test_a_failed_answer_is_not_stored(redis_api, fake_llm):
    api = redis_api(OPENAI_MAX_RETRIES="0")
    fake_llm.script(status(500))
    assert api.send(1, message=QUESTION).status_code == 502

    reply = answered(api.send(2, message=QUESTION))

    assert reply["cached"] is False


def test_answer_cache_off_asks_the_model_every_time(redis_api, fake_llm):
    api = redis_api(ANSWER_CACHE="false")
    answered(api.send(1, message=QUESTION))

    assert answered(api.send(2, message=QUESTION))["cached"] is False
    assert fake_llm.calls == 2


def test_a_stream_of_a_cached_question_is_one_delta_and_done(make_app, redis_env, fake_llm):
    app = make_app(**redis_env)
    answered(Api(app.test_client()).send(1, message=QUESTION))
    with served(app) as url:
        reading = read_stream(url, telegram_id=2, message=QUESTION)

    assert reading.names() == ["delta", "snapshot", "done"]
    assert reading.last().data["cached"] is True
    assert fake_llm.calls == 1


# --- limits and contexts: fewer statements, nothing stale -------------------------------


def test_by_default_redis_holds_common_answers_but_no_limits_or_contexts(
    counted, redis_env, fake_llm  # noqa: F811
):
    """REDIS_USER_CACHE is off unless set (it costs more than it saves): the
    reservation reads the context, the limits come from PostgreSQL, and
    Redis holds the common answers and nothing of any user."""
    api, counter = counted(**{**redis_env, "REDIS_USER_CACHE": "false"}, DAILY_LIMIT="2")
    answered(api.send(1, message=QUESTION))
    counter.reset()
    second = answered(api.send(1, message="Второй вопрос"))
    refused = api.send(1)
    limits = api.limits(1).get_json()

    assert second["cached"] is False and refused.status_code == 429
    assert counter.parameters[0]["context"] == 5  # the reservation read the context
    assert len(counter.statements) == 4  # reservation, save; refusal; limits
    assert limits["requests_today"] == 2
    assert answered(api.send(2, message=QUESTION))["cached"] is True
    with redis_py.Redis.from_url(redis_env["REDIS_URL"], decode_responses=True) as client:
        kinds = {key.removeprefix(redis_env["REDIS_PREFIX"]).partition(":")[0]
                 for key in client.scan_iter(match=f"{redis_env['REDIS_PREFIX']}*")}
    assert kinds == {"answer"}


def test_a_user_at_the_limit_is_refused_from_redis_without_a_statement(
    counted, redis_env, fake_llm  # noqa: F811
):
    api, counter = counted(**redis_env, DAILY_LIMIT="1")
    answered(api.send(1))
    counter.reset()

    refused = api.send(1)

    assert refused.status_code == 429
    assert refused.get_json()["requests_today"] == 1
    assert counter.statements == []
    assert fake_llm.calls == 1


def test_limits_are_read_from_redis_without_a_statement(counted, redis_env):  # noqa: F811
    api, counter = counted(**redis_env)
    answered(api.send(1))
    counter.reset()

    limits = api.limits(1).get_json()

    assert (limits["requests_today"], limits["requests_remaining"]) == (1, 29)
    assert counter.statements == []


def test_an_answered_send_with_the_context_in_redis_reads_no_context_rows(
    counted, redis_env, fake_llm  # noqa: F811
):
    api, counter = counted(**redis_env)
    answered(api.send(1, message="Первый вопрос"))
    answered(api.send(1, message="Второй вопрос"))
    counter.reset()

    answered(api.send(1, message="Третий вопрос"))

    assert len(counter.statements) == 2  # the reservation and the save
    assert counter.parameters[0]["context"] == 0  # the reservation read no context rows
    messages = fake_llm.requests[-1]["body"]["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "Первый вопрос", "Второй вопрос", "Третий вопрос"
    ]


@pytest.mark.parametrize("change", ["refund", "reset", "limit", "midnight"])
def test_a_refusal_is_never_served_after_the_quota_changed(
    redis_api, redis_env, fake_llm, sql, change
):
    api = redis_api(DAILY_LIMIT="2", OPENAI_MAX_RETRIES="0")
    app = api.client.application
    if change == "refund":
        answered(api.send(1))
        fake_llm.script(status(500, delay=1.5))
        with served(app) as url, ThreadPoolExecutor(max_workers=1) as pool:
            # The second send's unit is taken (its model call has come in)...
            failing = pool.submit(post_send, url, 1)
            assert fake_llm.wait_for(lambda: fake_llm.calls == 2, timeout=10)
            # ...a third, refused by PostgreSQL, writes "2 of 2" to Redis...
            refused, _ = post_send(url, 1)
            with redis_py.Redis.from_url(redis_env["REDIS_URL"], decode_responses=True) as client:
                limits_key = app.extensions["cache"].key("limits", 1)
                assert client.hget(limits_key, "used") == "2"
            # ...then the model fails and the second's unit is refunded.
            failed, _ = failing.result(timeout=30)
        assert (refused, failed) == (429, 502)
        assert fake_llm.calls == 2
        assert request_count(sql, 1) == 1
    else:
        answered(api.send(1))
        answered(api.send(1))
        assert api.send(1).status_code == 429  # now cached in Redis
        if change == "reset":
            assert api.reset_limit(1).get_json()["success"] is True
        elif change == "limit":
            assert api.client.put("/v1/chat/users/1/settings", json={"daily_limit": 5},
                                  headers=api.headers).status_code == 200
        else:
            freeze_app(app, app.config["CLOCK"]() + timedelta(days=1))

    used = request_count(sql, 1)
    limits = api.limits(1).get_json()
    assert limits["requests_today"] == (used if change != "midnight" else 0)
    # Every change left room for another answer: no stale refusal is served.
    assert answered(api.send(1, message="Ещё вопрос"))


def test_a_copy_of_the_context_that_missed_an_exchange_is_not_used(redis_api, fake_llm, sql):
    """An append to Redis skipped (this process took Redis for down) while the
    exchange was saved: the next prompt holds it all the same."""
    api = redis_api()
    answered(api.send(1, message="Первый вопрос"))
    sql("INSERT INTO ai_chat_requests (telegram_id, message, response, tokens_used, "
        "request_date, created_at) VALUES (1, 'Сохранён мимо Redis', 'Ответ', 1, "
        "current_date, now())")

    answered(api.send(1, message="Третий вопрос"))
    answered(api.send(1, message="Четвёртый вопрос"))

    for request in fake_llm.requests[1:]:
        users = [m["content"] for m in request["body"]["messages"] if m["role"] == "user"]
        assert "Сохранён мимо Redis" in users


def test_a_deleted_history_never_comes_back_from_redis(redis_api, fake_llm):
    api = redis_api()
    answered(api.send(1, message="Старый вопрос"))
    assert api.delete_history(1).get_json()["deleted"] == 1

    answered(api.send(1, message="Новый вопрос"))

    messages = fake_llm.requests[-1]["body"]["messages"]
    assert "Старый вопрос" not in [m["content"] for m in messages]


def test_the_quota_stays_exact_at_eighty_concurrent_sends_with_redis(
    make_app, redis_env, fake_llm, sql
):
    app = make_app(**redis_env)
    fake_llm.latency = 0.05
    with served(app) as url:
        replies = send_all_at_once([(url, 1)] * 80)

    statuses = sorted(code for code, _ in replies)
    assert statuses == [200] * 30 + [429] * 50
    assert request_count(sql) == 30 and exchange_count(sql) == 30
    assert Api(app.test_client()).limits(1).get_json()["requests_today"] == 30


# --- Redis failing ---------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["kill", "flush", "restart", "pause"])
def test_the_quota_stays_exact_when_redis_fails_in_the_middle_of_the_load(
    make_app, throwaway_redis, fake_llm, sql, caplog, fault
):
    app = make_app(REDIS_URL=throwaway_redis.url, REDIS_USER_CACHE="true", REDIS_TIMEOUT="0.05")
    fake_llm.latency = 0.1
    results = []
    with served(app) as url:
        def load():
            results.extend(send_all_at_once([(url, 1)] * 40))

        first = threading.Thread(target=load)
        first.start()
        time.sleep(0.3)
        {"kill": throwaway_redis.kill, "flush": throwaway_redis.flushall,
         "restart": throwaway_redis.restart, "pause": throwaway_redis.pause}[fault]()
        first.join(60)
        load()
        if fault == "pause":
            throwaway_redis.resume()

    statuses = sorted(code for code, _ in results)
    assert statuses == [200] * 30 + [429] * 50
    assert request_count(sql) == 30 and exchange_count(sql) == 30
    assert "Traceback" not in caplog.text


def test_redis_down_at_boot_changes_nothing_for_the_client(
    make_app, throwaway_redis, fake_llm, sql
):
    throwaway_redis.stop()
    api = Api(make_app(REDIS_URL=throwaway_redis.url, REDIS_USER_CACHE="true").test_client())

    assert answered(api.send(1, message=QUESTION))["cached"] is False
    assert api.limits(1).get_json()["requests_today"] == 1
    ready = api.client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.get_json()["checks"]["redis"] == "degraded"


def test_redis_going_away_and_coming_back_is_logged_once_each(
    make_app, throwaway_redis, fake_llm, caplog
):
    api = Api(make_app(REDIS_URL=throwaway_redis.url, REDIS_USER_CACHE="true").test_client())
    caplog.set_level(logging.INFO, logger="app.cache")
    answered(api.send(1))
    throwaway_redis.kill()
    for telegram_id in range(2, 8):
        answered(api.send(telegram_id))
    throwaway_redis.restart()
    time.sleep(1.1)  # the cache probes a down Redis once a second
    for telegram_id in range(8, 12):
        answered(api.send(telegram_id))

    assert caplog.text.count("redis unavailable") == 1
    assert caplog.text.count("redis is back") == 1
    assert api.client.get("/health/ready").get_json()["checks"]["redis"] == "ok"


def test_keys_evicted_or_flushed_are_misses_answered_by_postgresql(
    make_app, throwaway_redis, fake_llm, sql
):
    app = make_app(REDIS_URL=throwaway_redis.url, REDIS_USER_CACHE="true", DAILY_LIMIT="2")
    api = Api(app.test_client())
    answered(api.send(1, message="Первый"))
    answered(api.send(1, message="Второй"))
    redis_py.Redis.from_url(throwaway_redis.url).flushall()

    assert api.send(1).status_code == 429
    assert api.limits(1).get_json()["requests_today"] == 2
    assert request_count(sql) == 2


def test_two_instances_share_one_breaker_through_redis(make_app, redis_env, fake_llm):
    settings = {**redis_env, "LLM_BREAKER_FAILURES": "2", "LLM_BREAKER_OPEN_SECONDS": "30",
                "OPENAI_MAX_RETRIES": "0"}
    first = Api(make_app(**settings).test_client())
    second = Api(make_app(**settings).test_client())
    fake_llm.script(status(500), status(500))
    assert first.send(1).status_code == 502
    assert first.send(2).status_code == 502  # the second failure opens the circuit

    time.sleep(1.1)  # the other instance's local view of the breaker is refreshed
    refused = second.send(3)

    assert refused.status_code == 502
    assert fake_llm.calls == 2  # the other instance did not call the provider
