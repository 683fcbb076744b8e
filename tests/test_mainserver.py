"""The main server's client (app.mainserver.client) against the fake main
server (tests/fake_main_server.py) over loopback.

What the contract asks of it ("The seller's own data"): the key in
``X-API-SECRET-KEY``, the requester's own ``telegram_id`` on every call and
no other, both envelopes unwrapped, every failure mapped to an outcome and a
short Russian sentence for the model (no cabinet, misconfiguration,
unavailable, timeout), each call bounded by its budget in total, and a
circuit breaker that stops calling a server that keeps failing — but not a
seller without a cabinet. The fake's own behaviour (the bodies and quirks of
shared/MAIN_SERVER_API.md) is pinned at the end, so that a failing tool test
points at the tools, not at their double.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import pytest
import requests
from prometheus_client import REGISTRY

from app.llm.breaker import Breaker
from app.mainserver import (
    BreakerOpen,
    MainServer,
    MainServerTimeout,
    MainServerUnavailable,
    Misconfigured,
    NoCabinet,
    NotConfigured,
)
from tests.fake_main_server import API_KEY, BASE_PATH, NO_CABINET
from tests.servers import ROOT, free_port

SELLER = 424242
ENDPOINT_PATHS = (
    "/dashboard",
    "/analytics/sales",
    "/orders/recent",
    "/orders/statistics",
    "/stocks/critical",
    "/stocks/all",
    "/reviews/summary",
)


@pytest.fixture
def main(main_server):
    """The fake main server (conftest's ``main_server``)."""
    return main_server


@pytest.fixture
def client(main):
    return MainServer(main.url, API_KEY, breaker=Breaker(1000, 30.0))


def breaker_openings() -> float:
    return REGISTRY.get_sample_value("ai_chat_mainserver_breaker_opened_total") or 0.0


# --- what is sent ------------------------------------------------------------------


def test_the_key_goes_in_x_api_secret_key(client, main):
    client.get("/dashboard", {}, SELLER, 2)

    [request] = main.requests
    assert request["headers"]["x-api-secret-key"] == API_KEY
    assert "x-api-key" not in request["headers"]


def test_the_path_is_under_the_bot_api_with_the_query(client, main):
    client.get("/orders/recent", {"limit": 5, "status": "canceled", "skipped": None}, SELLER, 2)

    [request] = main.requests
    assert request["path"] == "/orders/recent"
    assert request["query"] == {"limit": "5", "status": "canceled", "telegram_id": str(SELLER)}


def test_the_telegram_id_is_always_the_requesters_own(client, main):
    client.get("/dashboard", {"telegram_id": 1}, SELLER, 2)

    assert [r["telegram_id"] for r in main.requests] == [SELLER]


@pytest.mark.parametrize("url", ["{url}", "{url}/", "{url}/api/v1/bot", "{url}/api/v1/bot/"])
def test_the_base_path_is_added_once(main, url):
    client = MainServer(url.format(url=main.url), API_KEY)

    client.get("/dashboard", {}, SELLER, 2)

    assert main.paths == ["/dashboard"]


def test_unconfigured_client_calls_nothing(main):
    client = MainServer(None, API_KEY)

    assert client.configured is False
    with pytest.raises(NotConfigured) as raised:
        client.get("/dashboard", {}, SELLER, 2)
    assert raised.value.outcome == "unavailable"
    assert main.calls == 0


# --- envelopes -----------------------------------------------------------------------


def test_a_status_success_body_loses_its_envelope_and_the_bots_text(client):
    payload = client.get("/dashboard", {}, SELLER, 2)

    assert set(payload) == {"dashboard"}
    assert payload["dashboard"]["orders_today"]["amount"] == 18450.0


def test_order_statistics_success_data_envelope_is_unwrapped(client):
    payload = client.get("/orders/statistics", {}, SELLER, 2)

    assert set(payload) == {"orders", "sales", "summary"}
    assert payload["orders"]["total_orders"] == 1840


@pytest.mark.parametrize(
    "body",
    [{"status": "error", "message": "x"}, {"success": False, "data": {}}, [1, 2], {"data": {}}],
    ids=["status_error", "success_false", "a_list", "no_envelope"],
)
def test_an_answer_in_neither_envelope_is_unavailable(client, main, body):
    main.set_body(SELLER, "/dashboard", body)

    with pytest.raises(MainServerUnavailable):
        client.get("/dashboard", {}, SELLER, 2)


def test_a_body_that_is_not_json_is_unavailable(client, main):
    main.set_body(SELLER, "/dashboard", b"<html>502 Bad Gateway</html>")

    with pytest.raises(MainServerUnavailable) as raised:
        client.get("/dashboard", {}, SELLER, 2)
    assert raised.value.message == "данные продавца сейчас недоступны"


# --- failures: outcome and message for the model ---------------------------------------


@pytest.mark.parametrize("path", ENDPOINT_PATHS)
def test_a_seller_without_a_cabinet_is_no_cabinet_on_every_endpoint(client, main, path):
    main.disconnect(SELLER)

    with pytest.raises(NoCabinet) as raised:
        client.get(path, {}, SELLER, 2)

    assert raised.value.outcome == "no_cabinet"
    assert "кабинет WB не подключён" in raised.value.message
    # /orders/recent and /orders/statistics say it with a 500.
    expected = 500 if path in ("/orders/recent", "/orders/statistics") else 404
    assert main.requests[0]["status"] == expected


@pytest.mark.parametrize(
    ("key", "detail"),
    [(None, "Missing API Secret Key"), ("wrong-key", "Invalid API Secret Key")],
    ids=["missing", "wrong"],
)
def test_a_refused_key_is_a_misconfiguration(main, key, detail, caplog):
    client = MainServer(main.url, key)
    caplog.set_level(logging.ERROR, logger="app.mainserver")

    for _ in range(3):
        with pytest.raises(Misconfigured) as raised:
            client.get("/dashboard", {}, SELLER, 2)

    assert raised.value.outcome == "unavailable"
    assert raised.value.message == "данные продавца сейчас недоступны"
    assert [r["status"] for r in main.requests] == [403, 403, 403]
    errors = [r.getMessage() for r in caplog.records if r.name == "app.mainserver"]
    assert len(errors) == 1  # once, not once per call
    assert detail in errors[0] and "MAIN_SERVER_API_KEY" in errors[0]
    assert "wrong-key" not in errors[0]


def test_an_unknown_path_is_a_misconfiguration(client, main):
    with pytest.raises(Misconfigured):
        client.get("/user-context/1", {}, SELLER, 2)
    assert main.requests[0]["status"] == 404


def test_a_server_error_is_unavailable(client, main):
    main.fail = True

    with pytest.raises(MainServerUnavailable) as raised:
        client.get("/orders/recent", {}, SELLER, 2)

    assert raised.value.outcome == "unavailable"
    assert main.requests[0]["status"] == 500


def test_a_slow_answer_is_a_timeout_within_the_budget(client, main):
    main.delay = 5

    with pytest.raises(MainServerTimeout) as raised:
        client.get("/dashboard", {}, SELLER, 0.3)

    assert raised.value.outcome == "timeout"
    assert raised.value.message == "данные продавца не пришли вовремя"


def test_a_dripping_server_cannot_hold_the_call_past_its_budget(client, main):
    # A byte every 50 ms: every read gets data; the whole answer would take a minute.
    main.drip = 0.05

    with pytest.raises(MainServerTimeout):
        client.get("/dashboard", {}, SELLER, 0.5)


def test_a_connection_closed_without_an_answer_is_unavailable(client, main):
    main.down = True

    with pytest.raises(MainServerUnavailable):
        client.get("/dashboard", {}, SELLER, 2)
    assert main.calls == 1


def test_a_refused_connection_is_unavailable():
    client = MainServer(f"http://127.0.0.1:{free_port()}", API_KEY)

    with pytest.raises(MainServerUnavailable) as raised:
        client.get("/dashboard", {}, SELLER, 2)
    assert raised.value.outcome == "unavailable"


def test_no_budget_left_is_a_timeout_without_a_call(client, main):
    with pytest.raises(MainServerTimeout):
        client.get("/dashboard", {}, SELLER, 0)
    assert main.calls == 0


# --- circuit breaker -----------------------------------------------------------------


@pytest.fixture
def guarded(main):
    """A client whose circuit opens after 3 failures, for 0.5 s."""
    return MainServer(main.url, API_KEY, breaker=Breaker(3, 0.5))


def fail_times(client, count: int, budget: float = 2) -> None:
    for _ in range(count):
        with pytest.raises(MainServerUnavailable) as raised:
            client.get("/dashboard", {}, SELLER, budget)
        assert raised.value.outcome == "unavailable"


def test_repeated_server_errors_open_the_circuit_and_calls_fail_fast(guarded, main):
    main.fail = True
    before = breaker_openings()

    fail_times(guarded, 3)
    with pytest.raises(BreakerOpen) as raised:
        guarded.get("/dashboard", {}, SELLER, 2)

    assert raised.value.outcome == "breaker_open"
    assert raised.value.message == "данные продавца сейчас недоступны"
    assert main.calls == 3
    assert guarded.breaker.state == "open"
    assert breaker_openings() == before + 1


def test_the_circuit_lets_a_probe_through_later_and_closes_on_success(guarded, main):
    main.fail = True
    fail_times(guarded, 3)
    main.fail = False
    time.sleep(0.6)

    assert "dashboard" in guarded.get("/dashboard", {}, SELLER, 2)
    assert guarded.breaker.state == "closed"


def test_timeouts_and_refused_connections_count_as_failures(main):
    client = MainServer(main.url, API_KEY, breaker=Breaker(2, 30))
    main.delay = 5
    with pytest.raises(MainServerTimeout):
        client.get("/dashboard", {}, SELLER, 0.1)
    refused = MainServer(f"http://127.0.0.1:{free_port()}", API_KEY, breaker=client.breaker)
    with pytest.raises(MainServerUnavailable):
        refused.get("/dashboard", {}, SELLER, 1)

    assert client.breaker.state == "open"


def test_sellers_without_a_cabinet_never_open_the_circuit(guarded, main):
    main.disconnect(SELLER)

    for path in ("/dashboard", "/orders/recent", "/orders/statistics") * 3:
        with pytest.raises(NoCabinet):
            guarded.get(path, {}, SELLER, 2)

    assert guarded.breaker.state == "closed"
    assert main.calls == 9


def test_a_refused_key_does_not_open_the_circuit(main):
    client = MainServer(main.url, "wrong-key", breaker=Breaker(2, 30))

    for _ in range(4):
        with pytest.raises(Misconfigured):
            client.get("/dashboard", {}, SELLER, 2)

    assert client.breaker.state == "closed"


def test_the_app_builds_the_client_with_the_configured_breaker(make_app, main):
    app = make_app(
        MAIN_SERVER_URL=main.url,
        MAIN_SERVER_API_KEY=API_KEY,
        MAIN_SERVER_BREAKER_FAILURES="2",
        MAIN_SERVER_BREAKER_OPEN_SECONDS="7",
    )
    client = app.extensions["mainserver"]

    assert client.configured
    assert (client.breaker.failures, client.breaker.open_seconds) == (2, 7)
    assert "dashboard" in client.get("/dashboard", {}, SELLER, 2)


# --- the fake itself -----------------------------------------------------------------


def fake_get(main, path: str, key: str | None = API_KEY, **query):
    headers = {} if key is None else {"X-API-SECRET-KEY": key}
    return requests.get(f"{main.url}{BASE_PATH}{path}", params=query, headers=headers, timeout=5)


@pytest.mark.parametrize("path", ENDPOINT_PATHS)
def test_fake_answers_every_endpoint_with_its_envelope_and_text(main, path):
    body = fake_get(main, path, telegram_id=1).json()

    if path == "/orders/statistics":
        assert body["success"] is True and isinstance(body["data"], dict)
    else:
        assert body["status"] == "success" and body["message"] is None
    assert body["telegram_text"]


@pytest.mark.parametrize(
    ("key", "detail"),
    [(None, "Missing API Secret Key"), ("nope", "Invalid API Secret Key")],
)
def test_fake_checks_the_secret_key(main, key, detail):
    response = fake_get(main, "/dashboard", key, telegram_id=1)

    assert response.status_code == 403
    assert response.json() == {"detail": detail}


def test_fake_refuses_a_request_without_telegram_id_like_fastapi(main):
    response = fake_get(main, "/dashboard")

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "telegram_id"]


def test_fake_honours_the_query(main):
    canceled = fake_get(main, "/orders/recent", telegram_id=1, limit=3, status="canceled").json()
    later = fake_get(main, "/orders/recent", telegram_id=1, limit=3, offset=3).json()
    searched = fake_get(main, "/stocks/all", telegram_id=1, search="худи").json()
    in_kazan = fake_get(main, "/stocks/all", telegram_id=1, warehouse="Казань").json()
    bad = fake_get(main, "/reviews/summary", telegram_id=1, rating_threshold=2).json()
    month = fake_get(main, "/analytics/sales", telegram_id=1, period="30d").json()
    week = fake_get(main, "/analytics/sales", telegram_id=1, period="7d").json()
    unknown = fake_get(main, "/analytics/sales", telegram_id=1, period="1y").json()

    assert len(canceled["orders"]) == 3
    assert canceled["pagination"]["total"] < later["pagination"]["total"]
    assert later["pagination"]["offset"] == 3
    assert [p["name"] for p in searched["stocks"]["products"]] == ["Худи с капюшоном"]
    assert all(set(p["warehouses"]) == {"Казань"} for p in in_kazan["stocks"]["products"])
    assert {r["rating"] for r in bad["reviews"]["new_reviews"]} <= {1, 2}
    top = [body["analytics"]["top_products"][0]["sales_count"] for body in (week, month, unknown)]
    assert top[0] < top[1] == top[2]  # anything unknown is taken as 30d


def test_fake_caches_like_the_main_server(main):
    sales = fake_get(main, "/analytics/sales", telegram_id=1)
    stocks = fake_get(main, "/stocks/all", telegram_id=1)

    assert sales.headers["Cache-Control"] == "public, max-age=900"
    assert stocks.headers["Cache-Control"] == "public, max-age=300"


def test_fake_without_a_cabinet_answers_404_or_500(main):
    main.connected_by_default = False
    main.connect(7)

    statuses = {path: fake_get(main, path, telegram_id=8).status_code for path in ENDPOINT_PATHS}

    assert fake_get(main, "/dashboard", telegram_id=7).status_code == 200
    assert fake_get(main, "/dashboard", telegram_id=8).json() == {"detail": NO_CABINET}
    assert {path for path, status in statuses.items() if status == 500} == {
        "/orders/recent",
        "/orders/statistics",
    }
    assert set(statuses.values()) == {404, 500}


def test_fake_counts_requests_in_flight(main):
    main.delay = 0.3
    threads = [
        threading.Thread(target=fake_get, args=(main, "/dashboard"), kwargs={"telegram_id": 1})
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert main.max_in_flight == 3
    assert main.wait_for(lambda: main.in_flight == 0, timeout=2)
    first, *others = main.requests
    assert all(other["started"] < first["ended"] for other in others)


def test_fake_command_line_serves_with_a_delay():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_main_server", "--port", str(port), "--delay", "0.1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}{BASE_PATH}/dashboard"
        deadline = time.monotonic() + 15
        while True:
            try:
                started = time.monotonic()
                response = requests.get(
                    url, params={"telegram_id": 1}, headers={"X-API-SECRET-KEY": API_KEY},
                    timeout=5,
                )
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "the fake main server did not start"
                time.sleep(0.1)
        elapsed = time.monotonic() - started
    finally:
        process.terminate()
        process.wait(10)
    assert response.status_code == 200
    assert response.json()["dashboard"]["orders_today"]["count"] == 12
    assert elapsed >= 0.1
    assert process.returncode == 0
