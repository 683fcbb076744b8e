"""Every endpoint except ``POST /v1/chat/send``, against the contract: the API key,
history, forgetting a user, limits, the admin reset, stats, the probes, the
OpenAPI document and the error shape of unknown paths and methods.

Exchanges are created through the API when a few suffice and inserted with
SQL when many (or chosen dates) are needed; the service clock is pinned with
``freeze`` wherever a date decides the answer.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta

import pytest

from tests.conftest import API_KEY, exchange_count

MAX_BIGINT = 2**63 - 1
CLOSED_PORT_DATABASE = "postgresql://postgres@127.0.0.1:1/nowhere"

PROTECTED = [
    ("POST", "/v1/chat/send", {"telegram_id": 1, "message": "Как поднять продажи?"}),
    ("POST", "/v1/chat/history", {"telegram_id": 1}),
    ("DELETE", "/v1/chat/history/1", None),
    ("GET", "/v1/chat/limits/1", None),
    ("POST", "/v1/chat/reset-limit", {"telegram_id": 1}),
    ("GET", "/v1/chat/stats/1", None),
]
PROTECTED_IDS = [f"{method} {path}" for method, path, _ in PROTECTED]

BAD_KEY_HEADERS = {
    "no key": {},
    "wrong key": {"X-API-KEY": "not-the-key"},
    "key in another case": {"X-API-KEY": API_KEY.upper()},
    "empty header": {"X-API-KEY": ""},
}

PATH_ID_ENDPOINTS = [
    ("DELETE", "/v1/chat/history/{}"),
    ("GET", "/v1/chat/limits/{}"),
    ("GET", "/v1/chat/stats/{}"),
]


def call(client, method, path, body=None, headers=None):
    return client.open(path, method=method, json=body, headers=headers or {})


def insert_exchange(sql, telegram_id, message, *, tokens=10, request_date=None, created_at=None):
    """One answered exchange written straight into ai_chat_requests."""
    created_at = created_at or datetime.fromisoformat("2026-03-10T09:00:00+00:00")
    sql(
        "INSERT INTO ai_chat_requests "
        "(telegram_id, message, response, tokens_used, request_date, created_at) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (
            telegram_id,
            message,
            f"Ответ: {message}",
            tokens,
            request_date or created_at.date(),
            created_at,
        ),
    )


def counter_row(sql, telegram_id):
    rows = sql(
        "SELECT request_count, last_reset_date, updated_at FROM ai_chat_daily_limits "
        "WHERE telegram_id = %s",
        (telegram_id,),
    )
    return rows[0] if rows else None


def resolve(spec, schema):
    """Follow a ``$ref`` inside the OpenAPI document."""
    while "$ref" in schema:
        node = spec
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


# --- the API key ----------------------------------------------------------------


@pytest.mark.parametrize("headers", BAD_KEY_HEADERS.values(), ids=BAD_KEY_HEADERS.keys())
@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=PROTECTED_IDS)
def test_protected_endpoint_without_valid_key_is_forbidden(
    client, fake_llm, method, path, body, headers
):
    response = call(client, method, path, body, headers)

    assert response.status_code == 403
    assert response.get_json()["error"] == "forbidden"
    assert isinstance(response.get_json()["message"], str)
    assert fake_llm.calls == 0


@pytest.mark.parametrize("path", ["/health", "/health/ready", "/openapi.json", "/docs"])
def test_unprotected_endpoint_answers_without_key(client, path):
    response = client.get(path)

    assert response.status_code == 200


# --- POST /v1/chat/history ------------------------------------------------------


def test_history_lists_exchanges_newest_first(api):
    for message in ("первый", "второй", "третий"):
        assert api.send(message=message).status_code == 200

    response = api.history()

    assert response.status_code == 200
    assert [item["message"] for item in response.get_json()["items"]] == [
        "третий",
        "второй",
        "первый",
    ]


def test_history_echoes_default_limit_and_offset_and_the_total(api):
    assert api.send().status_code == 200
    assert api.send(message="Ещё вопрос").status_code == 200

    body = api.history().get_json()

    assert body["total"] == 2
    assert body["limit"] == 10
    assert body["offset"] == 0
    assert len(body["items"]) == 2


def test_history_items_carry_the_stored_exchange(api, sql):
    sent = api.send(message="Как снизить ДРР?").get_json()
    row_id = sql("SELECT id FROM ai_chat_requests WHERE telegram_id = 1")[0][0]

    item = api.history().get_json()["items"][0]

    assert set(item) == {
        "id", "message", "response", "tokens_used", "model", "tools", "created_at"
    }
    assert item["id"] == row_id
    assert item["model"] == sent["model"] == "gpt-4o-mini"
    assert item["message"] == "Как снизить ДРР?"
    assert item["response"] == sent["response"]
    assert item["tokens_used"] == sent["tokens_used"]


def test_history_created_at_is_iso8601_with_utc_offset(api, freeze):
    moment = freeze("2026-03-10T12:34:56+03:00")
    assert api.send().status_code == 200

    created_at = api.history().get_json()["items"][0]["created_at"]

    parsed = datetime.fromisoformat(created_at)
    assert parsed.tzinfo is not None
    assert parsed == moment


@pytest.mark.parametrize(
    ("limit", "offset", "expected"),
    [
        (5, 0, ["q12", "q11", "q10", "q9", "q8"]),
        (5, 5, ["q7", "q6", "q5", "q4", "q3"]),
        (5, 10, ["q2", "q1"]),
        (5, 12, []),
        (100, 0, [f"q{i}" for i in range(12, 0, -1)]),
    ],
)
def test_history_paginates_with_limit_and_offset(api, sql, limit, offset, expected):
    start = datetime.fromisoformat("2026-03-10T09:00:00+00:00")
    for i in range(1, 13):
        insert_exchange(sql, 1, f"q{i}", created_at=start + timedelta(minutes=i))

    body = api.history(limit=limit, offset=offset).get_json()

    assert [item["message"] for item in body["items"]] == expected
    assert (body["total"], body["limit"], body["offset"]) == (12, limit, offset)


def test_history_never_shows_other_users_rows(api, sql):
    insert_exchange(sql, 1, "мой вопрос")
    insert_exchange(sql, 2, "чужой вопрос")
    insert_exchange(sql, 3, "ещё чужой")

    body = api.history(telegram_id=1).get_json()

    assert [item["message"] for item in body["items"]] == ["мой вопрос"]
    assert body["total"] == 1


def test_history_of_user_without_exchanges_is_empty(api, sql):
    insert_exchange(sql, 2, "чужой вопрос")

    response = api.history(telegram_id=1)

    assert response.status_code == 200
    assert response.get_json() == {"items": [], "total": 0, "limit": 10, "offset": 0}


# --- DELETE /v1/chat/history/{telegram_id} --------------------------------------


def test_delete_history_reports_the_number_deleted(api):
    for message in ("один", "два", "три"):
        assert api.send(message=message).status_code == 200

    response = api.delete_history(1)

    assert response.status_code == 200
    assert response.get_json() == {"telegram_id": 1, "deleted": 3}


def test_delete_history_removes_the_rows(api, sql):
    assert api.send().status_code == 200
    assert api.send(message="Второй").status_code == 200

    api.delete_history(1)

    assert exchange_count(sql, 1) == 0
    assert api.history().get_json()["total"] == 0


def test_delete_history_keeps_the_quota_counter(api, sql):
    assert api.send().status_code == 200
    assert api.send(message="Второй").status_code == 200
    before = counter_row(sql, 1)

    api.delete_history(1)

    assert before[0] == 2
    assert counter_row(sql, 1) == before
    assert api.limits(1).get_json()["requests_today"] == 2


def test_second_delete_deletes_nothing(api):
    assert api.send().status_code == 200
    api.delete_history(1)

    response = api.delete_history(1)

    assert response.status_code == 200
    assert response.get_json() == {"telegram_id": 1, "deleted": 0}


def test_delete_history_leaves_other_users_untouched(api, sql):
    insert_exchange(sql, 1, "мой")
    insert_exchange(sql, 2, "чужой")
    insert_exchange(sql, 2, "чужой второй")

    api.delete_history(1)

    assert exchange_count(sql, 2) == 2
    assert exchange_count(sql, 1) == 0


def test_delete_history_forgets_idempotency_keys(api, fake_llm, sql):
    assert api.send(message="Вопрос", request_id="k1").status_code == 200
    assert fake_llm.calls == 1
    api.delete_history(1)

    again = api.send(message="Вопрос", request_id="k1")

    assert again.status_code == 200
    assert fake_llm.calls == 2
    assert exchange_count(sql, 1) == 1


# --- GET /v1/chat/limits/{telegram_id} ------------------------------------------


@pytest.mark.parametrize(
    ("moment", "moscow_date"),
    [
        ("2026-03-01T12:00:00+00:00", "2026-03-01"),
        ("2026-03-01T20:59:59+00:00", "2026-03-01"),
        # 21:00 UTC is already midnight in Moscow: the dates differ.
        ("2026-03-01T21:00:00+00:00", "2026-03-02"),
        ("2026-03-01T23:30:00+00:00", "2026-03-02"),
    ],
)
def test_limits_of_unknown_user_are_full(api, freeze, moment, moscow_date):
    freeze(moment)

    response = api.limits(42)

    assert response.status_code == 200
    assert response.get_json() == {
        "telegram_id": 42,
        "requests_today": 0,
        "requests_remaining": 30,
        "daily_limit": 30,
        "reset_date": moscow_date,
    }


def test_limits_count_answered_requests(api):
    assert api.send().status_code == 200
    assert api.send(message="Второй").status_code == 200

    body = api.limits(1).get_json()

    assert (body["requests_today"], body["requests_remaining"]) == (2, 28)


@pytest.mark.parametrize(
    "read_at",
    ["2026-03-10T12:00:05+03:00", "2026-03-11T12:00:00+03:00"],
    ids=["same day", "next day"],
)
def test_reading_limits_never_changes_the_counter(api, sql, freeze, read_at):
    freeze("2026-03-10T12:00:00+03:00")
    assert api.send().status_code == 200
    before = counter_row(sql, 1)
    freeze(read_at)

    assert api.limits(1).status_code == 200
    assert api.limits(1).status_code == 200

    assert counter_row(sql, 1) == before


def test_counter_from_yesterday_reads_as_zero(api, sql, freeze):
    freeze("2026-03-10T12:00:00+03:00")
    sql(
        "INSERT INTO ai_chat_daily_limits "
        "(telegram_id, request_count, last_reset_date, created_at, updated_at) "
        "VALUES (1, 30, '2026-03-09', now(), now())"
    )

    body = api.limits(1).get_json()

    assert (body["requests_today"], body["requests_remaining"]) == (0, 30)
    assert body["reset_date"] == "2026-03-10"


def test_limits_with_unlimited_quota(make_api):
    api = make_api(DAILY_LIMIT="0")

    response = api.limits(1)

    assert response.status_code == 200
    body = response.get_json()
    assert body["requests_remaining"] is None
    assert body["daily_limit"] == 0
    assert body["requests_today"] == 0


@pytest.mark.parametrize("telegram_id", [0, -1, 2**63])
@pytest.mark.parametrize(("method", "template"), PATH_ID_ENDPOINTS)
def test_out_of_range_path_id_is_a_validation_error(client, method, template, telegram_id):
    response = call(client, method, template.format(telegram_id), headers={"X-API-KEY": API_KEY})

    assert response.status_code == 422
    body = response.get_json()
    assert body["error"] == "validation_error"
    assert "telegram_id" in body["errors"]


@pytest.mark.parametrize(("method", "template"), PATH_ID_ENDPOINTS)
def test_largest_path_id_is_accepted(client, method, template):
    response = call(client, method, template.format(MAX_BIGINT), headers={"X-API-KEY": API_KEY})

    assert response.status_code == 200
    assert response.get_json()["telegram_id"] == MAX_BIGINT


@pytest.mark.parametrize(("method", "template"), PATH_ID_ENDPOINTS)
def test_non_integer_path_id_is_not_found(client, method, template):
    response = call(client, method, template.format("abc"), headers={"X-API-KEY": API_KEY})

    assert response.status_code == 404
    assert response.is_json
    assert response.get_json()["error"] == "not_found"


# --- POST /v1/chat/reset-limit --------------------------------------------------


def test_reset_limit_zeroes_an_existing_counter(api, sql):
    assert api.send().status_code == 200
    assert api.send(message="Второй").status_code == 200

    response = api.reset_limit(1)

    assert response.status_code == 200
    body = response.get_json()
    assert body["success"] is True
    assert "успешно" in body["message"]
    assert counter_row(sql, 1)[0] == 0
    assert api.limits(1).get_json()["requests_today"] == 0


def test_reset_limit_lets_an_exhausted_user_send_again(make_api, fake_llm):
    api = make_api(DAILY_LIMIT="1")
    assert api.send().status_code == 200
    assert api.send(message="Второй").status_code == 429

    assert api.reset_limit(1).get_json()["success"] is True
    again = api.send(message="Третий")

    assert again.status_code == 200
    assert again.get_json()["remaining_requests"] == 0
    assert fake_llm.calls == 2


def test_reset_limit_of_user_without_counter_reports_not_found(api, sql):
    response = api.reset_limit(77)

    assert response.status_code == 200
    body = response.get_json()
    assert body["success"] is False
    assert "не найден" in body["message"]
    assert counter_row(sql, 77) is None


def test_reset_limit_accepts_the_admin_key_when_set(make_api, sql):
    api = make_api(ADMIN_API_KEY="admin-key")
    assert api.send().status_code == 200

    response = api.reset_limit(1, key="admin-key")

    assert response.status_code == 200
    assert response.get_json()["success"] is True
    assert counter_row(sql, 1)[0] == 0


def test_reset_limit_refuses_the_ordinary_key_when_admin_key_is_set(make_api, sql):
    api = make_api(ADMIN_API_KEY="admin-key")
    assert api.send().status_code == 200
    before = counter_row(sql, 1)

    response = api.reset_limit(1, key=API_KEY)

    assert response.status_code == 403
    assert response.get_json()["error"] == "forbidden"
    assert counter_row(sql, 1) == before


def test_reset_limit_accepts_the_ordinary_key_without_admin_key(api, sql):
    assert api.send().status_code == 200

    response = api.reset_limit(1, key=API_KEY)

    assert response.status_code == 200
    assert response.get_json()["success"] is True
    assert counter_row(sql, 1)[0] == 0


# --- GET /v1/chat/stats/{telegram_id} -------------------------------------------

TODAY = date(2026, 3, 10)


@pytest.fixture
def stats_day(freeze):
    """The service's today is TODAY (Moscow), late enough that UTC agrees."""
    freeze("2026-03-10T15:00:00+03:00")
    return TODAY


def test_stats_default_to_seven_days(api, sql, stats_day):
    insert_exchange(sql, 1, "сегодня", tokens=10, request_date=stats_day)

    response = api.stats(1)

    assert response.status_code == 200
    assert response.get_json()["days"] == 7


def test_stats_sum_and_average_the_window(api, sql, stats_day):
    insert_exchange(sql, 1, "сегодня", tokens=10, request_date=stats_day)
    insert_exchange(sql, 1, "вчера", tokens=20, request_date=stats_day - timedelta(days=1))
    # Six days back is the first day of a seven-day window that ends today.
    insert_exchange(sql, 1, "край", tokens=40, request_date=stats_day - timedelta(days=6))

    response = api.stats(1, days=7)

    assert response.status_code == 200
    assert response.get_json() == {
        "telegram_id": 1,
        "days": 7,
        "total_requests": 3,
        "total_tokens": 70,
        "avg_requests_per_day": 0.43,
        "avg_tokens_per_request": 23.33,
        "total_cost": 0,
        "currency": "USD",
        # Rows written without a model (the old service's) are counted under null.
        "by_model": [{"model": None, "requests": 3, "tokens": 70, "cost": None}],
        "by_tool": {},
    }


def test_stats_exclude_rows_older_than_the_window(api, sql, stats_day):
    insert_exchange(sql, 1, "сегодня", tokens=10, request_date=stats_day)
    insert_exchange(sql, 1, "давно", tokens=500, request_date=stats_day - timedelta(days=7))
    insert_exchange(sql, 1, "совсем давно", tokens=900, request_date=stats_day - timedelta(days=40))

    body = api.stats(1, days=7).get_json()

    assert (body["total_requests"], body["total_tokens"]) == (1, 10)


def test_stats_of_one_day_count_only_today(api, sql, stats_day):
    insert_exchange(sql, 1, "сегодня", tokens=15, request_date=stats_day)
    insert_exchange(sql, 1, "вчера", tokens=20, request_date=stats_day - timedelta(days=1))

    body = api.stats(1, days=1).get_json()

    assert (body["total_requests"], body["total_tokens"]) == (1, 15)
    assert body["avg_requests_per_day"] == 1.0
    assert body["avg_tokens_per_request"] == 15.0


def test_stats_ignore_other_users(api, sql, stats_day):
    insert_exchange(sql, 1, "мой", tokens=10, request_date=stats_day)
    insert_exchange(sql, 2, "чужой", tokens=1000, request_date=stats_day)

    body = api.stats(1).get_json()

    assert (body["total_requests"], body["total_tokens"]) == (1, 10)


def test_stats_with_nothing_are_zeros(api, stats_day):
    response = api.stats(5)

    assert response.status_code == 200
    assert response.get_json() == {
        "telegram_id": 5,
        "days": 7,
        "total_requests": 0,
        "total_tokens": 0,
        "avg_requests_per_day": 0,
        "avg_tokens_per_request": 0,
        "total_cost": 0,
        "currency": "USD",
        "by_model": [],
        "by_tool": {},
    }


@pytest.mark.parametrize("days", ["0", "366", "-1", "abc", "1.5"])
def test_stats_reject_days_out_of_range(api, days):
    response = api.stats(1, days=days)

    assert response.status_code == 400
    body = response.get_json()
    assert body["error"] == "bad_request"
    assert "days" in body["errors"]


@pytest.mark.parametrize("days", [1, 365])
def test_stats_accept_days_at_the_bounds(api, sql, stats_day, days):
    insert_exchange(sql, 1, "давно", tokens=8, request_date=stats_day - timedelta(days=364))

    response = api.stats(1, days=days)

    assert response.status_code == 200
    body = response.get_json()
    assert body["days"] == days
    assert body["total_requests"] == (1 if days == 365 else 0)


# --- /health and /health/ready --------------------------------------------------


def test_health_reports_service_and_version(client):
    response = client.get("/health")

    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["service"] == "ai_chat"
    assert re.fullmatch(r"\d+\.\d+\.\d+", body["version"])


def test_health_does_not_need_the_database(make_app):
    client = make_app(DATABASE_URL=CLOSED_PORT_DATABASE).test_client()

    response = client.get("/health")

    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"


def test_ready_is_unavailable_when_the_database_is_down(make_app):
    client = make_app(DATABASE_URL=CLOSED_PORT_DATABASE).test_client()

    response = client.get("/health/ready")

    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "unavailable"


def test_ready_is_ok_with_the_database(client):
    response = client.get("/health/ready")

    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == "ok"


# --- /openapi.json and /docs ----------------------------------------------------

OPERATIONS = [
    ("/v1/chat/send", "post", True),
    ("/v1/chat/users/{telegram_id}/settings", "get", True),
    ("/v1/chat/users/{telegram_id}/settings", "put", True),
    ("/v1/chat/history", "post", True),
    ("/v1/chat/history/{telegram_id}", "delete", True),
    ("/v1/chat/limits/{telegram_id}", "get", True),
    ("/v1/chat/reset-limit", "post", True),
    ("/v1/chat/stats/{telegram_id}", "get", True),
    ("/health", "get", False),
    ("/health/ready", "get", False),
]


@pytest.fixture
def spec(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def test_openapi_is_version_3(spec):
    assert spec["openapi"].startswith("3.")
    assert spec["info"]["title"]
    assert spec["info"]["version"]


@pytest.mark.parametrize(
    ("path", "method", "protected"), OPERATIONS, ids=[f"{m} {p}" for p, m, _ in OPERATIONS]
)
def test_openapi_documents_every_operation(spec, path, method, protected):
    operation = spec["paths"][path][method]

    assert operation["summary"].strip()
    ok = operation["responses"]["200"]
    assert resolve(spec, ok["content"]["application/json"]["schema"])
    assert ("403" in operation["responses"]) is protected


def test_openapi_send_request_schema_lists_the_fields(spec):
    body = spec["paths"]["/v1/chat/send"]["post"]["requestBody"]
    schema = resolve(spec, body["content"]["application/json"]["schema"])

    assert {"telegram_id", "message", "user_context", "user_id", "request_id"} <= set(
        schema["properties"]
    )
    assert {"telegram_id", "message"} <= set(schema["required"])


def test_openapi_names_the_configured_models_as_the_only_valid_ones(make_app):
    app = make_app(LLM_PROVIDERS="backup=http://127.0.0.1:9/v1",
                   LLM_MODELS="gpt-4o-mini@openai,qwen2.5-7b@backup")
    spec = app.test_client().get("/openapi.json").get_json()
    send = resolve(spec, spec["paths"]["/v1/chat/send"]["post"]["requestBody"]["content"]
                   ["application/json"]["schema"])
    settings = resolve(spec, spec["paths"]["/v1/chat/users/{telegram_id}/settings"]["put"]
                       ["requestBody"]["content"]["application/json"]["schema"])

    assert send["properties"]["model"]["enum"] == ["gpt-4o-mini", "qwen2.5-7b", None]
    assert settings["properties"]["preferred_model"]["enum"] == ["gpt-4o-mini", "qwen2.5-7b", None]


def test_openapi_says_request_id_and_the_idempotency_key_header_must_agree(spec):
    operation = spec["paths"]["/v1/chat/send"]["post"]
    body = resolve(spec, operation["requestBody"]["content"]["application/json"]["schema"])
    header = next(p for p in operation["parameters"] if p["name"] == "Idempotency-Key")

    assert "422" in body["properties"]["request_id"]["description"]
    assert "422" in header["description"]


def test_openapi_declares_the_api_key_scheme(spec):
    schemes = spec["components"]["securitySchemes"].values()

    assert {"type": "apiKey", "in": "header", "name": "X-API-KEY"} in [
        {key: scheme.get(key) for key in ("type", "in", "name")} for scheme in schemes
    ]


def test_openapi_documents_the_stream_as_server_sent_events(spec):
    operation = spec["paths"]["/v1/chat/stream"]["post"]

    assert "text/event-stream" in operation["responses"]["200"]["content"]
    assert {"403", "409", "422", "429", "503"} <= set(operation["responses"])


def test_docs_serve_swagger_ui(client):
    response = client.get("/docs")

    assert response.status_code == 200
    assert response.mimetype == "text/html"


def test_docs_load_swagger_ui_from_the_service_itself_not_a_cdn(client):
    page = client.get("/docs").get_data(as_text=True)

    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources, page
    assert not [source for source in sources if "://" in source or source.startswith("//")]
    for source in sources:
        with client.get(source) as asset:
            assert asset.status_code == 200, source
            assert len(asset.get_data()) > 1000, source
    assert "swagger-ui-bundle.js" in " ".join(sources)


# --- unknown paths and methods --------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/v1/chat/nope", "/v1/chat/history/1/extra"])
def test_unknown_path_is_json_not_found(client, path):
    response = client.get(path, headers={"X-API-KEY": API_KEY})

    assert response.status_code == 404
    assert response.is_json
    assert response.get_json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/send"),
        ("GET", "/v1/chat/history"),
        ("POST", "/v1/chat/limits/1"),
        ("PUT", "/v1/chat/reset-limit"),
        ("POST", "/health"),
    ],
)
def test_wrong_method_is_json_method_not_allowed(client, method, path):
    response = call(client, method, path, headers={"X-API-KEY": API_KEY})

    assert response.status_code == 405
    assert response.is_json
    assert response.get_json()["error"] == "method_not_allowed"
