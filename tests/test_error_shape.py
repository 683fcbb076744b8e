"""Every error body in the shape the production bot reads (contract, "Errors").

The old FastAPI service answered ``{"detail": {...}}`` and the bot shows the
seller ``detail.message``: every error — ours, werkzeug's and flask-smorest's —
carries ``detail`` with the same ``error`` and ``message`` (and, on a 429, the
same quota fields) next to the contract's own fields.
"""

from __future__ import annotations

import re

import pytest

from app.chat.idempotency import message_digest
from tests.conftest import API_KEY
from tests.fake_llm import delay, ok, status

CYRILLIC = re.compile("[А-Яа-яЁё]")
HEADERS = {"X-API-KEY": API_KEY}
SEND = "/v1/chat/send"


def assert_bot_shape(body: dict, status_code: int, error: str) -> None:
    """``error`` and ``message`` at the top, and ``detail`` repeating every field."""
    assert body["error"] == error, body
    assert isinstance(body["message"], str) and body["message"]
    fields = {key: value for key, value in body.items() if key != "detail"}
    assert body["detail"] == fields, status_code


# Each case: how to provoke it (on the default app) → (status, error).
CASES = {
    "403 no key": (lambda c: c.post(SEND, json={}), 403, "forbidden"),
    "403 wrong key": (
        lambda c: c.get("/v1/chat/limits/1", headers={"X-API-KEY": "nope"}), 403, "forbidden"
    ),
    "400 not json": (lambda c: c.post(SEND, data="{", headers=HEADERS), 400, "bad_request"),
    "400 bad query": (
        lambda c: c.get("/v1/chat/stats/1?days=0", headers=HEADERS), 400, "bad_request"
    ),
    "404 no route (werkzeug)": (lambda c: c.get("/nowhere"), 404, "not_found"),
    "405 method (werkzeug)": (lambda c: c.get(SEND, headers=HEADERS), 405, "method_not_allowed"),
    "405 junk method": (
        lambda c: c.open(SEND, method="ZZZA", headers=HEADERS), 405, "method_not_allowed"
    ),
    "413 too large": (
        lambda c: c.post(SEND, data="x" * 70_000, headers=HEADERS), 413, "payload_too_large"
    ),
    "422 schema (webargs)": (
        lambda c: c.post(SEND, json={"telegram_id": "1"}, headers=HEADERS),
        422, "validation_error",
    ),
    "422 path id": (
        lambda c: c.get("/v1/chat/limits/0", headers=HEADERS), 422, "validation_error"
    ),
    "422 unknown model": (
        lambda c: c.post(SEND, json={"telegram_id": 1, "message": "a", "model": "x"},
                         headers=HEADERS),
        422, "validation_error",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_every_client_error_carries_detail(client, case):
    provoke, status_code, error = case

    response = provoke(client)

    assert response.status_code == status_code
    assert response.content_type.startswith("application/json")
    assert_bot_shape(response.get_json(), status_code, error)


def test_validation_detail_keeps_the_field_errors(api):
    body = api.send(telegram_id=True).get_json()

    assert body["detail"]["errors"] == body["errors"]
    assert "telegram_id" in body["detail"]["errors"]


def test_409_in_flight_key_carries_detail(api, fake_llm, sql):
    sql(
        "INSERT INTO ai_chat_idempotency_keys (telegram_id, request_id, message_sha256, "
        "claim_token, claimed_at) VALUES (1, 'busy', %s, 't', now())",
        (message_digest("Вопрос"),),
    )
    response = api.send(message="Вопрос", request_id="busy")

    assert response.status_code == 409
    assert_bot_shape(response.get_json(), 409, "request_in_progress")


# --- what the bot shows the seller: detail.message in Russian ---------------------


def test_429_detail_is_what_the_bot_shows_with_the_quota_fields(make_api, fake_llm):
    api = make_api(DAILY_LIMIT="1")
    assert api.send().status_code == 200

    body = api.send().get_json()

    assert_bot_shape(body, 429, "daily_limit_exceeded")
    detail = body["detail"]
    assert CYRILLIC.search(detail["message"])
    assert (detail["daily_limit"], detail["requests_today"], detail["requests_remaining"]) == (
        1, 1, 0
    )
    assert detail["reset_at"] == body["reset_at"]


@pytest.mark.parametrize(
    ("step", "status_code", "error"),
    [(status(500), 502, "llm_unavailable"), (delay(5), 504, "llm_timeout")],
    ids=["502", "504"],
)
def test_llm_failure_detail_is_russian(make_api, fake_llm, step, status_code, error):
    api = make_api(OPENAI_MAX_RETRIES="0", OPENAI_TIMEOUT="0.3", LLM_DEADLINE="1")
    fake_llm.script(step)

    response = api.send()

    assert response.status_code == status_code
    body = response.get_json()
    assert_bot_shape(body, status_code, error)
    assert CYRILLIC.search(body["detail"]["message"])


def test_llm_not_configured_detail_is_russian(make_api):
    response = make_api(OPENAI_BASE_URL="", OPENAI_API_KEY="").send()

    assert response.status_code == 503
    body = response.get_json()
    assert_bot_shape(body, 503, "llm_not_configured")
    assert CYRILLIC.search(body["detail"]["message"])


def test_database_outage_detail_is_russian(make_api):
    api = make_api(DATABASE_URL="postgresql://postgres@127.0.0.1:1/nowhere")

    response = api.limits()

    assert response.status_code == 503
    body = response.get_json()
    assert_bot_shape(body, 503, "database_unavailable")
    assert CYRILLIC.search(body["detail"]["message"])


def test_internal_error_detail_has_the_request_id(api, fake_llm, sql):
    # A check constraint the service does not know about turns the save into a bug.
    sql(
        "ALTER TABLE ai_chat_requests ADD CONSTRAINT shape_test_refuse "
        "CHECK (position('shape-test' in message) = 0) NOT VALID"
    )
    try:
        fake_llm.script(ok("ответ"))
        response = api.send(message="shape-test")
    finally:
        sql("ALTER TABLE ai_chat_requests DROP CONSTRAINT shape_test_refuse")

    assert response.status_code == 500
    body = response.get_json()
    assert_bot_shape(body, 500, "internal_error")
    assert body["detail"]["request_id"] == response.headers["X-Request-ID"]
