"""POST /v1/chat/send: the answer, the stored exchange, the daily quota and its
headers, refunds and retries when the LLM fails, and verbatim storage of any
text a seller (or the model) can produce.

Everything goes through the real HTTP surface, real PostgreSQL (read back with
``sql``) and the fake OpenAI server (its script, calls and received bodies).
"""

from __future__ import annotations

import re
from datetime import date, datetime

import pytest

from app.render import render
from tests.conftest import Api, freeze_app, request_count
from tests.fake_llm import delay, drop, garbage, ok, status
from tests.telegram_html import check as check_telegram_html

CYRILLIC = re.compile(r"[А-Яа-яЁё]{3,}")


# --- helpers -------------------------------------------------------------------


def stored_rows(sql, telegram_id: int = 1) -> list[tuple]:
    return sql(
        "SELECT message, response, tokens_used, user_id, request_date "
        "FROM ai_chat_requests WHERE telegram_id = %s ORDER BY id",
        (telegram_id,),
    )


def is_russian(text: str) -> bool:
    return bool(CYRILLIC.search(text))


# --- success -------------------------------------------------------------------


def test_send_answers_with_response_tokens_and_remaining(api, fake_llm):
    fake_llm.script(ok("Поднимите рейтинг карточки.", tokens=123))

    response = api.send(telegram_id=7, message="Как поднять продажи?")

    assert response.status_code == 200
    body = response.get_json()
    assert body == {
        "response": "Поднимите рейтинг карточки.",
        "parts": ["Поднимите рейтинг карточки."],
        "model": "gpt-4o-mini",
        "tokens_used": 123,
        "remaining_requests": 29,
        "daily_limit": 30,
        "tools": [],
        "cached": False,
    }
    for name in ("tokens_used", "remaining_requests", "daily_limit"):
        assert type(body[name]) is int, name
    assert type(body["response"]) is str


def test_remaining_requests_is_limit_minus_answers_given(api):
    remaining = [api.send(telegram_id=7).get_json()["remaining_requests"] for _ in range(3)]

    assert remaining == [29, 28, 27]


def test_send_stores_the_exchange_with_moscow_request_date(api, fake_llm, sql, freeze):
    # 22:30 UTC on 1 March is already 01:30 on 2 March in Moscow.
    now = freeze("2026-03-01T22:30:00+00:00")
    fake_llm.script(ok("Ответ про остатки", tokens=123))

    response = api.send(telegram_id=77, message="Сколько остатков?", user_id=5)

    assert response.status_code == 200
    rows = sql(
        "SELECT telegram_id, user_id, message, response, tokens_used, request_date, created_at "
        "FROM ai_chat_requests"
    )
    assert rows == [
        (77, 5, "Сколько остатков?", "Ответ про остатки", 123, date(2026, 3, 2), now)
    ]


def test_send_counts_the_answer_in_daily_limits(api, sql, freeze):
    freeze("2026-03-01T22:30:00+00:00")

    api.send(telegram_id=77)
    api.send(telegram_id=77)

    assert sql(
        "SELECT telegram_id, request_count, last_reset_date FROM ai_chat_daily_limits"
    ) == [(77, 2, date(2026, 3, 2))]


def test_send_carries_ratelimit_headers(api, freeze):
    # 12:00 in Moscow: 12 hours until the local midnight.
    freeze("2026-03-01T12:00:00+03:00")

    response = api.send()

    assert response.status_code == 200
    assert response.headers["RateLimit-Policy"] == '"daily";q=30;w=86400'
    assert response.headers["RateLimit"] == '"daily";r=29;t=43200'


def test_ratelimit_t_counts_down_to_moscow_midnight_not_utc(api, freeze):
    # 22:30 UTC = 01:30 Moscow; the Moscow day ends in 22 h 30 min.
    freeze("2026-03-01T22:30:00+00:00")

    response = api.send()

    assert response.headers["RateLimit"] == '"daily";r=29;t=81000'


def test_send_reports_server_timing_per_phase(api):
    response = api.send()

    assert response.status_code == 200
    entries = {}
    for part in response.headers["Server-Timing"].split(","):
        name, _, duration = part.strip().partition(";dur=")
        entries[name] = float(duration)
    assert set(entries) == {"quota", "context", "llm", "save", "total"}
    assert all(value >= 0 for value in entries.values())


# --- quota exhausted ------------------------------------------------------------


@pytest.fixture
def limited(make_app):
    """An ``Api`` on an app with DAILY_LIMIT=2 and its clock at noon in Moscow."""
    app = make_app(DAILY_LIMIT="2")
    freeze_app(app, "2026-03-01T12:00:00+03:00")
    return Api(app.test_client())


def exhaust(api, count: int = 2, telegram_id: int = 1) -> None:
    for _ in range(count):
        assert api.send(telegram_id=telegram_id).status_code == 200


def test_send_over_the_limit_answers_429_with_details(limited):
    exhaust(limited)

    response = limited.send()

    assert response.status_code == 429
    body = response.get_json()
    assert body["error"] == "daily_limit_exceeded"
    assert body["daily_limit"] == 2
    assert body["requests_today"] == 2
    assert body["requests_remaining"] == 0
    assert is_russian(body["message"])


def test_429_reset_at_is_next_moscow_midnight(limited):
    exhaust(limited)

    reset_at = limited.send().get_json()["reset_at"]

    assert reset_at.endswith("+03:00")
    assert datetime.fromisoformat(reset_at) == datetime.fromisoformat("2026-03-02T00:00:00+03:00")


def test_429_carries_retry_after_and_ratelimit_zero(limited):
    exhaust(limited)

    response = limited.send()

    assert response.headers["Retry-After"] == "43200"
    assert response.headers["RateLimit-Policy"] == '"daily";q=2;w=86400'
    assert response.headers["RateLimit"] == '"daily";r=0;t=43200'


def test_429_neither_calls_the_llm_nor_writes(limited, fake_llm, sql):
    exhaust(limited)
    calls_before = fake_llm.calls

    limited.send(message="третий вопрос")

    assert fake_llm.calls == calls_before
    assert len(stored_rows(sql)) == 2
    assert request_count(sql) == 2


def test_quota_is_per_user(limited):
    exhaust(limited, telegram_id=1)

    response = limited.send(telegram_id=2)

    assert response.status_code == 200
    assert response.get_json()["remaining_requests"] == 1


# --- unlimited ------------------------------------------------------------------


def test_unlimited_quota_answers_null_remaining(make_api):
    api = make_api(DAILY_LIMIT="0")

    body = api.send().get_json()

    assert body["daily_limit"] == 0
    assert body["remaining_requests"] is None


def test_unlimited_quota_sends_no_ratelimit_headers(make_api):
    api = make_api(DAILY_LIMIT="0")

    response = api.send()

    assert response.status_code == 200
    assert "RateLimit" not in response.headers
    assert "RateLimit-Policy" not in response.headers


def test_unlimited_quota_still_counts_answers(make_api, sql):
    api = make_api(DAILY_LIMIT="0")

    for _ in range(3):
        assert api.send().status_code == 200

    assert request_count(sql) == 3


# --- the day turns ----------------------------------------------------------------


def test_yesterdays_answers_do_not_count_today(make_app, sql):
    app = make_app(DAILY_LIMIT="2")
    api = Api(app.test_client())
    freeze_app(app, "2026-03-01T23:59:59+03:00")
    exhaust(api)
    assert api.send().status_code == 429

    freeze_app(app, "2026-03-02T00:00:01+03:00")
    response = api.send()

    assert response.status_code == 200
    assert response.get_json()["remaining_requests"] == 1
    assert sql("SELECT request_count, last_reset_date FROM ai_chat_daily_limits") == [
        (1, date(2026, 3, 2))
    ]


def send_at_20_59_59_and_21_00_utc(app) -> tuple[int, int]:
    """The statuses of one send a second before 21:00 UTC and one at 21:00."""
    api = Api(app.test_client())
    freeze_app(app, "2026-03-01T20:59:59+00:00")
    first = api.send()
    freeze_app(app, "2026-03-01T21:00:00+00:00")
    second = api.send()
    return first.status_code, second.status_code


def test_moscow_day_turns_at_21_utc(make_app, sql):
    statuses = send_at_20_59_59_and_21_00_utc(make_app(DAILY_LIMIT="1"))

    assert statuses == (200, 200)
    assert [row[4] for row in stored_rows(sql)] == [date(2026, 3, 1), date(2026, 3, 2)]


def test_utc_time_zone_keeps_20_59_and_21_00_utc_in_one_day(make_app, sql):
    statuses = send_at_20_59_59_and_21_00_utc(make_app(DAILY_LIMIT="1", AI_CHAT_TIMEZONE="UTC"))

    assert statuses == (200, 429)
    assert request_count(sql) == 1
    assert [row[4] for row in stored_rows(sql)] == [date(2026, 3, 1)]


# --- failures refund the unit ---------------------------------------------------

RETRIES = 2  # OPENAI_MAX_RETRIES of the apps below: 3 attempts in all
ATTEMPTS = RETRIES + 1

FAILURES = [
    pytest.param([status(500)] * ATTEMPTS, 502, "llm_unavailable", id="500-repeated"),
    pytest.param([status(503)] * ATTEMPTS, 502, "llm_unavailable", id="503-repeated"),
    pytest.param([status(429)] * ATTEMPTS, 502, "llm_unavailable", id="429-repeated"),
    pytest.param([delay(1.0)] * ATTEMPTS, 504, "llm_timeout", id="timeout-repeated"),
    pytest.param([drop()] * ATTEMPTS, 502, "llm_unavailable", id="dropped-connection"),
    pytest.param([status(400)], 502, "llm_unavailable", id="400"),
    pytest.param([status(401)], 502, "llm_unavailable", id="401"),
    pytest.param([status(404)], 502, "llm_unavailable", id="404"),
    pytest.param([garbage()] * ATTEMPTS, 502, "llm_unavailable", id="non-json"),
]


@pytest.fixture
def fast_failing(make_api):
    """An ``Api`` with a short per-attempt timeout, so timeouts cost fractions of a second."""
    return make_api(OPENAI_TIMEOUT="0.3", OPENAI_MAX_RETRIES=str(RETRIES), LLM_DEADLINE="5")


@pytest.mark.parametrize("earlier_answers", [0, 2], ids=["first-time-user", "returning-user"])
@pytest.mark.parametrize(("steps", "expected_status", "expected_error"), FAILURES)
def test_llm_failure_answers_contract_error_and_refunds(
    fast_failing, fake_llm, sql, steps, expected_status, expected_error, earlier_answers
):
    exhaust(fast_failing, count=earlier_answers)
    fake_llm.script(*steps)

    response = fast_failing.send(message="Этот вопрос останется без ответа")

    assert response.status_code == expected_status
    body = response.get_json()
    assert body["error"] == expected_error
    assert is_russian(body["message"])
    assert request_count(sql) == earlier_answers
    assert len(stored_rows(sql)) == earlier_answers


def test_failed_send_leaves_the_full_quota_for_the_next_question(fast_failing, fake_llm):
    fake_llm.script(status(400))
    fast_failing.send()

    response = fast_failing.send()

    assert response.status_code == 200
    assert response.get_json()["remaining_requests"] == 29


# --- retries --------------------------------------------------------------------


@pytest.mark.parametrize(
    "transient",
    [
        pytest.param(status(500), id="500"),
        pytest.param(status(429), id="429"),
        pytest.param(drop(), id="drop"),
        pytest.param(delay(1.0), id="timeout"),
    ],
)
def test_transient_error_is_retried_to_success(fast_failing, fake_llm, sql, transient):
    fake_llm.script(transient, ok("Со второй попытки", tokens=9))

    response = fast_failing.send()

    assert response.status_code == 200
    assert response.get_json()["response"] == "Со второй попытки"
    assert fake_llm.calls == 2
    assert request_count(sql) == 1
    assert len(stored_rows(sql)) == 1


def test_client_error_is_not_retried(fast_failing, fake_llm):
    fake_llm.script(status(400), ok())

    response = fast_failing.send()

    assert response.status_code == 502
    assert fake_llm.calls == 1


@pytest.mark.parametrize("max_retries", [0, 1, 2])
def test_retries_stop_after_openai_max_retries(make_api, fake_llm, max_retries):
    api = make_api(OPENAI_MAX_RETRIES=str(max_retries))
    # One more failure than allowed, then a success the service must not reach.
    fake_llm.script(*[status(500)] * (max_retries + 1), ok())

    response = api.send()

    assert response.status_code == 502
    assert fake_llm.calls == max_retries + 1


def test_llm_deadline_bounds_the_retries(make_api, fake_llm, sql):
    api = make_api(OPENAI_TIMEOUT="1", LLM_DEADLINE="1.5", OPENAI_MAX_RETRIES="5")
    fake_llm.script(*[delay(3)] * 6)

    response = api.send()

    assert response.status_code == 504
    assert response.get_json()["error"] == "llm_timeout"
    assert fake_llm.calls <= 2
    assert request_count(sql) == 0


# --- not configured ---------------------------------------------------------------


def test_unconfigured_llm_answers_503_and_spends_nothing(make_api, fake_llm, sql):
    api = make_api(OPENAI_BASE_URL="", OPENAI_API_KEY="")

    response = api.send()

    assert response.status_code == 503
    body = response.get_json()
    assert body["error"] == "llm_not_configured"
    assert is_russian(body["message"])
    assert fake_llm.calls == 0
    assert request_count(sql) == 0
    assert stored_rows(sql) == []


# --- verbatim text --------------------------------------------------------------

HOSTILE_TEXTS = [
    pytest.param("'; DROP TABLE ai_chat_requests; --", id="sql-injection"),
    pytest.param("%s %(x)s {0} $1 \\x00 \\' \"", id="placeholders-and-escapes"),
    pytest.param("<script>alert('x')</script><b onmouseover=\"x()\">&amp;</b>", id="html"),
    pytest.param("abc \u202eevil\u202c \u200f\u200e \u2066rtl\u2069", id="rtl-marks"),
    pytest.param("👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇷🇺 \u200d", id="emoji-zwj"),
    pytest.param("Как снизить возвраты на Wildberries? Ёжик «ёлка» — №1", id="cyrillic"),
    pytest.param("  spaces around\tand tab\r\nCRLF  ", id="whitespace"),
    pytest.param("Ы1" * 2000, id="4000-chars"),
]


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_message_reaches_llm_and_storage_verbatim(api, fake_llm, sql, text):
    response = api.send(message=text)

    assert response.status_code == 200
    assert fake_llm.requests[-1]["body"]["messages"][-1] == {"role": "user", "content": text}
    assert stored_rows(sql)[0][0] == text
    assert api.history().get_json()["items"][0]["message"] == text


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_llm_answer_is_stored_verbatim_and_returned_as_the_model_wrote_it_in_markdown(
    api, fake_llm, sql, text
):
    fake_llm.script(ok(text))

    response = api.send(format="markdown")

    assert response.status_code == 200
    assert response.get_json()["response"] == text
    assert stored_rows(sql)[0][1] == text
    assert api.history(format="markdown").get_json()["items"][0]["response"] == text


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_llm_answer_is_returned_as_telegram_html_by_default(api, fake_llm, text):
    fake_llm.script(ok(text))

    body = api.send().get_json()

    assert body["response"] == render(text, "telegram_html").text
    assert body["parts"] == list(render(text, "telegram_html").parts)
    for part in body["parts"]:
        check_telegram_html(part)


def test_sql_injection_text_leaves_the_table_intact(api, sql):
    api.send(message="'; DROP TABLE ai_chat_requests; --")
    api.send(message="второй вопрос")

    assert sql("SELECT count(*) FROM ai_chat_requests") == [(2,)]


# --- user_id ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"user_id": 42}, 42, id="given"),
        pytest.param({}, None, id="absent"),
        pytest.param({"user_id": None}, None, id="null"),
    ],
)
def test_user_id_is_stored_when_given(api, sql, fields, expected):
    response = api.send(**fields)

    assert response.status_code == 200
    assert sql("SELECT user_id FROM ai_chat_requests") == [(expected,)]
