"""The bad-input matrix: every malformed request gets a 4xx in the contract's
error shape and spends nothing.

"Spends nothing" means: the fake LLM got no call, no exchange was stored, no
idempotency key was claimed and the seeded daily counter is unchanged. Every
rejected answer is also checked for leaks (exception names, tracebacks,
driver/ORM names, SQL, the API key). The accepted edge of each bound is tested
next to its rejected neighbour, so a bound that drifts fails one side.
"""

from __future__ import annotations

import http.client
import json
import re
from datetime import datetime
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import API_KEY

SEND = "/v1/chat/send"
HISTORY = "/v1/chat/history"
RESET = "/v1/chat/reset-limit"
AUTH = {"X-API-KEY": API_KEY}
MAX_BIGINT = 2**63 - 1
MISSING = object()  # a field left out of the body altogether

SEEDED_ID = 1
SEEDED_COUNT = 3

ERROR_CODE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z0-9]*(?:Error|Exception|Warning)\b")
LEAKS = ("Traceback", "psycopg2", "sqlalchemy", "SELECT", "ai_chat_", 'File "', API_KEY)


def without_missing(body: dict) -> dict:
    """``body`` without the fields whose value is MISSING."""
    return {name: value for name, value in body.items() if value is not MISSING}


def send_body(**fields) -> dict:
    """A valid /send body with ``fields`` replaced (MISSING removes a field)."""
    return without_missing({"telegram_id": SEEDED_ID, "message": "Как поднять продажи?", **fields})


def post_json(client, path, body, headers=None):
    """POST ``body`` serialised by the stdlib (which escapes lone surrogates)."""
    return client.post(
        path,
        data=json.dumps(body),
        content_type="application/json",
        headers={**AUTH, **(headers or {})},
    )


def post_raw(client, path, data, content_type="application/json", headers=AUTH):
    return client.post(path, data=data, content_type=content_type, headers=headers)


def counters(sql):
    return sql(
        "SELECT telegram_id, request_count, last_reset_date, updated_at "
        "FROM ai_chat_daily_limits ORDER BY telegram_id"
    )


@pytest.fixture
def assert_nothing_spent(sql, fake_llm):
    """Seed a counter row now; the returned check proves nothing was spent since."""
    today = datetime.now(ZoneInfo("Europe/Moscow")).date()
    sql(
        "INSERT INTO ai_chat_daily_limits "
        "(telegram_id, request_count, last_reset_date, created_at, updated_at) "
        "VALUES (%s, %s, %s, now() - interval '1 hour', now() - interval '1 hour')",
        (SEEDED_ID, SEEDED_COUNT, today),
    )
    before = counters(sql)

    def check():
        assert fake_llm.calls == 0, fake_llm.requests
        assert sql("SELECT count(*) FROM ai_chat_requests") == [(0,)]
        assert sql("SELECT count(*) FROM ai_chat_idempotency_keys") == [(0,)]
        assert counters(sql) == before

    return check


@pytest.fixture
def rejected(assert_nothing_spent):
    """Check a rejection: status, error shape, field errors, no leaks, nothing spent."""

    def check(response, status, error, field=None):
        assert response.status_code == status, response.get_data(as_text=True)[:500]
        assert response.mimetype == "application/json"
        body = response.get_json()
        assert isinstance(body, dict)
        assert body["error"] == error
        assert ERROR_CODE.fullmatch(body["error"])
        assert isinstance(body["message"], str) and body["message"].strip()
        if status == 422 or field is not None:
            assert isinstance(body.get("errors"), dict) and body["errors"], body
        if field is not None:
            assert field in body["errors"], body["errors"]
            assert body["errors"][field], body["errors"]
        text = response.get_data(as_text=True) + json.dumps(body, ensure_ascii=False)
        for leak in LEAKS:
            assert leak not in text, f"{leak!r} leaked: {text[:500]}"
        assert not EXCEPTION_NAME.search(text), text[:500]
        assert_nothing_spent()
        return body

    return check


# --- POST /v1/chat/send: telegram_id -------------------------------------------

BAD_TELEGRAM_IDS = [
    pytest.param(MISSING, id="missing"),
    pytest.param(None, id="null"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param(1.0, id="float-1.0"),
    pytest.param(1.5, id="float-1.5"),
    pytest.param("123", id="numeric-string"),
    pytest.param("abc", id="string"),
    pytest.param([], id="list"),
    pytest.param({}, id="object"),
    pytest.param(0, id="zero"),
    pytest.param(-1, id="negative"),
    pytest.param(2**63, id="2^63-one-over-max"),
    pytest.param(10**30, id="10^30"),
]


@pytest.mark.parametrize("telegram_id", BAD_TELEGRAM_IDS)
def test_send_rejects_bad_telegram_id(client, rejected, telegram_id):
    response = post_json(client, SEND, send_body(telegram_id=telegram_id))
    rejected(response, 422, "validation_error", field="telegram_id")


@pytest.mark.parametrize("telegram_id", [1, MAX_BIGINT], ids=["1", "2^63-1"])
def test_send_accepts_telegram_id_at_its_bounds(client, sql, fake_llm, telegram_id):
    response = post_json(client, SEND, send_body(telegram_id=telegram_id))
    assert response.status_code == 200, response.get_json()
    assert fake_llm.calls == 1
    assert sql("SELECT telegram_id FROM ai_chat_requests") == [(telegram_id,)]
    assert sql("SELECT telegram_id, request_count FROM ai_chat_daily_limits") == [
        (telegram_id, 1)
    ]


# --- POST /v1/chat/send: message -------------------------------------------------

BAD_MESSAGES = [
    pytest.param(MISSING, id="missing"),
    pytest.param(None, id="null"),
    pytest.param("", id="empty"),
    pytest.param("   ", id="spaces"),
    pytest.param("\n\t ", id="whitespace"),
    pytest.param("a\u0000b", id="nul"),
    pytest.param("a" * 4001, id="4001-ascii"),
    pytest.param("я" * 4001, id="4001-cyrillic"),
    pytest.param(123, id="number"),
    pytest.param(True, id="true"),
    pytest.param([], id="list"),
    pytest.param({}, id="object"),
]


@pytest.mark.parametrize("message", BAD_MESSAGES)
def test_send_rejects_bad_message(client, rejected, message):
    response = post_json(client, SEND, send_body(message=message))
    rejected(response, 422, "validation_error", field="message")


def test_send_rejects_message_with_lone_surrogate(client, rejected):
    # requests/json= cannot encode "\ud800"; the raw JSON escape gets through.
    data = '{"telegram_id": 1, "message": "a\\ud800b"}'
    response = post_raw(client, SEND, data)
    rejected(response, 422, "validation_error", field="message")


@pytest.mark.parametrize(
    "message", ["?", "a" * 4000, "я" * 4000], ids=["1-char", "4000-ascii", "4000-cyrillic"]
)
def test_send_accepts_message_at_its_bounds(client, sql, fake_llm, message):
    response = post_json(client, SEND, send_body(message=message))
    assert response.status_code == 200, response.get_json()
    assert fake_llm.requests[-1]["body"]["messages"][-1] == {"role": "user", "content": message}
    assert sql("SELECT message FROM ai_chat_requests") == [(message,)]


# --- POST /v1/chat/send: optional fields ----------------------------------------

BAD_OPTIONAL_FIELDS = [
    pytest.param("user_context", "x" * 8001, id="user_context-8001-chars"),
    pytest.param("user_context", 123, id="user_context-number"),
    pytest.param("user_context", "a\u0000b", id="user_context-nul"),
    pytest.param("user_context", "a\ud800b", id="user_context-lone-surrogate"),
    pytest.param("user_id", "x", id="user_id-string"),
    pytest.param("user_id", 1.5, id="user_id-float"),
    pytest.param("user_id", True, id="user_id-true"),
    pytest.param("user_id", 0, id="user_id-zero"),
    pytest.param("user_id", -1, id="user_id-negative"),
    pytest.param("user_id", 2**31, id="user_id-2^31"),
    pytest.param("request_id", "", id="request_id-empty"),
    pytest.param("request_id", "has space", id="request_id-space"),
    pytest.param("request_id", "é", id="request_id-non-ascii"),
    pytest.param("request_id", "a" * 129, id="request_id-129-chars"),
    pytest.param("request_id", 123, id="request_id-number"),
    pytest.param("request_id", "a/b", id="request_id-slash"),
]


@pytest.mark.parametrize(("field", "value"), BAD_OPTIONAL_FIELDS)
def test_send_rejects_bad_optional_field(client, rejected, field, value):
    response = post_json(client, SEND, send_body(**{field: value}))
    rejected(response, 422, "validation_error", field=field)


GOOD_OPTIONAL_FIELDS = [
    pytest.param("user_context", "x" * 8000, id="user_context-8000-chars"),
    pytest.param("user_context", "", id="user_context-empty"),
    pytest.param("user_context", None, id="user_context-null"),
    pytest.param("user_id", 1, id="user_id-1"),
    pytest.param("user_id", 2**31 - 1, id="user_id-2^31-1"),
    pytest.param("user_id", None, id="user_id-null"),
    pytest.param("request_id", "a" * 128, id="request_id-128-chars"),
    pytest.param("request_id", "Az09._:-", id="request_id-every-char-class"),
]


@pytest.mark.parametrize(("field", "value"), GOOD_OPTIONAL_FIELDS)
def test_send_accepts_optional_field_at_its_bounds(client, sql, fake_llm, field, value):
    response = post_json(client, SEND, send_body(**{field: value}))
    assert response.status_code == 200, response.get_json()
    assert fake_llm.calls == 1
    assert sql("SELECT count(*) FROM ai_chat_requests") == [(1,)]
    if field == "user_id":
        assert sql("SELECT user_id FROM ai_chat_requests") == [(value,)]


@pytest.mark.parametrize(
    "key", ["", "has space", "a" * 129, "a/b", "é"],
    ids=["empty", "space", "129-chars", "slash", "non-ascii"],
)
def test_send_rejects_invalid_idempotency_key_header(client, rejected, key):
    response = post_json(client, SEND, send_body(), headers={"Idempotency-Key": key})
    body = rejected(response, 422, "validation_error")
    assert any("idempotency" in name.lower() for name in body["errors"]), body["errors"]


def test_send_rejects_request_id_differing_from_idempotency_key(client, rejected):
    response = post_json(
        client, SEND, send_body(request_id="key-1"), headers={"Idempotency-Key": "key-2"}
    )
    rejected(response, 422, "validation_error", field="request_id")


def test_send_accepts_request_id_equal_to_idempotency_key(client, sql):
    response = post_json(
        client, SEND, send_body(request_id="key-1"), headers={"Idempotency-Key": "key-1"}
    )
    assert response.status_code == 200, response.get_json()
    assert sql("SELECT request_id FROM ai_chat_idempotency_keys") == [("key-1",)]


# --- POST /v1/chat/send: the body as a whole ------------------------------------

NOT_A_JSON_OBJECT = [
    pytest.param(b"{bad", id="malformed"),
    pytest.param(b'{"telegram_id": 1,', id="truncated"),
    pytest.param(b'{"telegram_id": 1, "message": "hi"} trailing', id="trailing-garbage"),
    pytest.param(b'{"telegram_id": 1, "message": "hi"}{}', id="two-objects"),
    pytest.param(b"", id="empty-body"),
    pytest.param(b'[{"telegram_id": 1, "message": "hi"}]', id="array"),
    pytest.param(b'"hello"', id="string"),
    pytest.param(b"42", id="number"),
    pytest.param(b"null", id="null"),
    pytest.param(b"true", id="true"),
    pytest.param(b'{"telegram_id": NaN, "message": "hi"}', id="nan-literal"),
    pytest.param(b'{"telegram_id": 1, "message": Infinity}', id="infinity-literal"),
    # Fits the default 64 KiB limit yet is far deeper than Python's recursion limit.
    pytest.param(b"[" * 30000 + b"]" * 30000, id="30000-nested-arrays"),
    pytest.param(
        b'{"telegram_id": 1, "message": "hi", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}",
        id="deep-nesting-in-ignored-field",
    ),
    pytest.param(b'{"telegram_id": 1, "message": "\xff\xfe\xfd"}', id="invalid-utf8"),
    pytest.param(
        b'{"telegram_id": 1, "message": "' + "привет".encode("cp1251") + b'"}', id="cp1251"
    ),
]


@pytest.mark.parametrize("data", NOT_A_JSON_OBJECT)
def test_send_answers_400_to_a_body_that_is_not_a_json_object(client, rejected, data):
    response = post_raw(client, SEND, data)
    rejected(response, 400, "bad_request")


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded"],
    ids=["no-content-type", "text-plain", "form-urlencoded"],
)
def test_send_answers_400_to_malformed_json_whatever_the_content_type(
    client, rejected, content_type
):
    response = post_raw(client, SEND, b"telegram_id=1&message=hi", content_type=content_type)
    rejected(response, 400, "bad_request")


@pytest.mark.parametrize(
    "data",
    [b"[" * 100000 + b"]" * 100000, b'{"a":' * 100000 + b"1" + b"}" * 100000],
    ids=["100000-nested-arrays", "100000-nested-objects"],
)
def test_send_answers_400_to_deeply_nested_json(make_app, rejected, data):
    client = make_app(MAX_CONTENT_LENGTH=str(2 * 1024 * 1024)).test_client()
    response = post_raw(client, SEND, data)
    rejected(response, 400, "bad_request")


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/json; charset=utf-8", "application/x-www-form-urlencoded"],
    ids=["no-content-type", "text-plain", "json-charset", "form-urlencoded"],
)
def test_send_reads_a_json_object_whatever_the_content_type(
    client, sql, fake_llm, content_type
):
    data = json.dumps(send_body(message="Привет")).encode()
    response = post_raw(client, SEND, data, content_type=content_type)
    assert response.status_code == 200, response.get_json()
    assert fake_llm.requests[-1]["body"]["messages"][-1]["content"] == "Привет"
    assert sql("SELECT telegram_id, message FROM ai_chat_requests") == [(SEEDED_ID, "Привет")]


def test_send_ignores_unknown_fields(client, sql, fake_llm):
    body = send_body(mood="happy", extra={"nested": [1, 2]}, telegram_id_2="x")
    response = post_json(client, SEND, body)
    assert response.status_code == 200, response.get_json()
    sent = json.dumps(fake_llm.requests[-1]["body"]["messages"], ensure_ascii=False)
    assert "happy" not in sent and "nested" not in sent
    assert sql("SELECT telegram_id, message FROM ai_chat_requests") == [
        (SEEDED_ID, body["message"])
    ]


def test_send_answers_413_to_a_body_over_64_kib(client, rejected):
    response = post_json(client, SEND, send_body(message="a" * 70000))
    rejected(response, 413, "payload_too_large")


def test_send_answers_413_above_a_lowered_max_content_length(make_app, rejected):
    client = make_app(MAX_CONTENT_LENGTH="2048").test_client()
    data = json.dumps(send_body(message="a" * 3000)).encode()
    assert len(data) > 3000
    response = post_raw(client, SEND, data)
    rejected(response, 413, "payload_too_large")


def test_send_accepts_a_body_just_under_a_lowered_max_content_length(make_app, fake_llm):
    client = make_app(MAX_CONTENT_LENGTH="2048").test_client()
    data = json.dumps(send_body(message="a" * 1900)).encode()
    assert len(data) <= 2048
    response = post_raw(client, SEND, data)
    assert response.status_code == 200, response.get_json()
    assert fake_llm.calls == 1


OVERSIZE_CHUNKED_BODIES = [
    pytest.param(json.dumps(send_body(message="a" * 70000)).encode(), id="long-message"),
    # A valid object padded past the limit: cut at 64 KiB it is still valid JSON.
    pytest.param(json.dumps(send_body()).encode() + b" " * 70000, id="padded-valid-object"),
]


@pytest.mark.parametrize("data", OVERSIZE_CHUNKED_BODIES)
def test_send_answers_413_to_an_oversize_chunked_body(live_server, assert_nothing_spent, data):
    # No Content-Length: the limit must hold while the body is being read.
    url = urlsplit(live_server)
    chunks = [data[i : i + 8192] for i in range(0, len(data), 8192)]
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        connection.request(
            "POST",
            SEND,
            body=iter(chunks),
            headers={**AUTH, "Content-Type": "application/json"},
            encode_chunked=True,
        )
        response = connection.getresponse()
        status, payload = response.status, json.loads(response.read())
    finally:
        connection.close()
    assert status == 413, payload
    assert payload["error"] == "payload_too_large"
    assert_nothing_spent()


# --- POST /v1/chat/history -------------------------------------------------------

BAD_HISTORY_FIELDS = [
    pytest.param("telegram_id", MISSING, id="telegram_id-missing"),
    pytest.param("telegram_id", "1", id="telegram_id-string"),
    pytest.param("telegram_id", True, id="telegram_id-true"),
    pytest.param("telegram_id", 1.5, id="telegram_id-float"),
    pytest.param("telegram_id", 0, id="telegram_id-zero"),
    pytest.param("telegram_id", 2**63, id="telegram_id-2^63"),
    pytest.param("limit", 0, id="limit-0"),
    pytest.param("limit", 101, id="limit-101"),
    pytest.param("limit", -1, id="limit-negative"),
    pytest.param("limit", "10", id="limit-string"),
    pytest.param("limit", 1.5, id="limit-float"),
    pytest.param("limit", True, id="limit-true"),
    pytest.param("limit", None, id="limit-null"),
    pytest.param("offset", -1, id="offset-negative"),
    pytest.param("offset", "x", id="offset-string"),
    pytest.param("offset", 1.5, id="offset-float"),
    pytest.param("offset", True, id="offset-true"),
    pytest.param("offset", 2**63, id="offset-2^63"),
]


@pytest.mark.parametrize(("field", "value"), BAD_HISTORY_FIELDS)
def test_history_rejects_bad_field(client, rejected, field, value):
    response = post_json(client, HISTORY, without_missing({"telegram_id": SEEDED_ID, field: value}))
    rejected(response, 422, "validation_error", field=field)


@pytest.mark.parametrize(
    "data", [b"{bad", b"[]", b'"x"', b"", b"null"],
    ids=["malformed", "array", "string", "empty-body", "null"],
)
def test_history_answers_400_to_a_body_that_is_not_a_json_object(client, rejected, data):
    rejected(post_raw(client, HISTORY, data), 400, "bad_request")


@pytest.mark.parametrize(
    "page", [{"limit": 1}, {"limit": 100}, {"offset": 0}], ids=["limit-1", "limit-100", "offset-0"]
)
def test_history_accepts_paging_at_its_bounds(client, page):
    response = post_json(client, HISTORY, {"telegram_id": SEEDED_ID, **page})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["items"] == [] and body["total"] == 0
    assert body["limit"] == page.get("limit", 10) and body["offset"] == page.get("offset", 0)


# --- POST /v1/chat/reset-limit ---------------------------------------------------


@pytest.mark.parametrize(
    "telegram_id",
    [MISSING, None, "1", True, 1.5, 0, -1, 2**63],
    ids=["missing", "null", "string", "true", "float", "zero", "negative", "2^63"],
)
def test_reset_limit_rejects_bad_telegram_id_and_keeps_the_counter(
    client, rejected, telegram_id
):
    response = post_json(client, RESET, without_missing({"telegram_id": telegram_id}))
    rejected(response, 422, "validation_error", field="telegram_id")


@pytest.mark.parametrize(
    "data", [b"{bad", b"[1]", b"1", b"", b"null", b'"1"'],
    ids=["malformed", "array", "number", "empty-body", "null", "string"],
)
def test_reset_limit_answers_400_to_a_body_that_is_not_a_json_object(client, rejected, data):
    rejected(post_raw(client, RESET, data), 400, "bad_request")


# --- path ids and query parameters ----------------------------------------------

PATH_ENDPOINTS = [
    pytest.param("GET", "/v1/chat/limits/{}", id="limits"),
    pytest.param("GET", "/v1/chat/stats/{}", id="stats"),
    pytest.param("DELETE", "/v1/chat/history/{}", id="delete-history"),
]


@pytest.mark.parametrize(("method", "template"), PATH_ENDPOINTS)
@pytest.mark.parametrize(
    "telegram_id", ["0", "-5", "9223372036854775808"], ids=["zero", "negative", "2^63"]
)
def test_path_telegram_id_out_of_range_is_422(client, rejected, method, template, telegram_id):
    response = client.open(template.format(telegram_id), method=method, headers=AUTH)
    rejected(response, 422, "validation_error", field="telegram_id")


@pytest.mark.parametrize(("method", "template"), PATH_ENDPOINTS)
@pytest.mark.parametrize("telegram_id", ["abc", "1.5", "0x10"], ids=["word", "float", "hex"])
def test_path_telegram_id_that_is_not_a_number_is_a_json_404(
    client, rejected, method, template, telegram_id
):
    response = client.open(template.format(telegram_id), method=method, headers=AUTH)
    rejected(response, 404, "not_found")


@pytest.mark.parametrize(
    "days", ["0", "366", "-1", "abc", "1.5", "", "7x", "true", "1e2"],
    ids=["zero", "366", "negative", "word", "float", "empty", "suffix", "true", "exponent"],
)
def test_stats_rejects_bad_days_with_400(api, rejected, days):
    response = api.stats(SEEDED_ID, days=days)
    rejected(response, 400, "bad_request", field="days")


@pytest.mark.parametrize("days", [1, 365])
def test_stats_accepts_days_at_its_bounds(api, days):
    response = api.stats(SEEDED_ID, days=days)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["days"] == days


# --- authentication comes first -------------------------------------------------

UNAUTHENTICATED_BAD_REQUESTS = [
    pytest.param("POST", SEND, b"{bad", id="send-malformed"),
    pytest.param("POST", SEND, b'{"telegram_id": "x", "message": ""}', id="send-schema"),
    pytest.param("POST", SEND, b"a" * 70000, id="send-oversize"),
    pytest.param("POST", HISTORY, b'{"telegram_id": 1, "limit": 0}', id="history-schema"),
    pytest.param("POST", RESET, b"[]", id="reset-limit-not-object"),
    pytest.param("POST", RESET, b'{"telegram_id": 0}', id="reset-limit-schema"),
    pytest.param("GET", "/v1/chat/limits/0", None, id="limits-bad-id"),
    pytest.param("GET", "/v1/chat/stats/1?days=0", None, id="stats-bad-days"),
    pytest.param("DELETE", "/v1/chat/history/0", None, id="delete-history-bad-id"),
]


@pytest.mark.parametrize(("method", "path", "data"), UNAUTHENTICATED_BAD_REQUESTS)
@pytest.mark.parametrize(
    "headers", [{}, {"X-API-KEY": "wrong"}], ids=["no-key", "wrong-key"]
)
def test_bad_request_without_a_valid_key_is_403(client, rejected, method, path, data, headers):
    response = client.open(
        path, method=method, data=data, content_type="application/json", headers=headers
    )
    rejected(response, 403, "forbidden")
