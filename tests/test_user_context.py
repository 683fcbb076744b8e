"""Personalisation of answers with the seller's data (contract, "Context and
prompt" → personalisation).

When a send has no ``user_context`` and ``USER_CONTEXT_URL`` is set, the
service fetches ``{sales, stocks, orders, reviews}`` from the main server with
``X-API-KEY`` and hands it to the model as a size-bounded, delimited block of
the seller's own message (``<seller_data>``), with Russian section titles. A
``user_context`` in the request is used as is (``""`` means none); any failure
of the fetch only means the answer is not personalised, and each fetch is
counted in ``ai_chat_user_context_fetches_total{outcome}``. The fetch has a
total budget, and its key goes to the configured origin only.

The main server is a small scriptable stdlib HTTP server defined here; what
the model received is read from the fake LLM.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, Api, request_count
from tests.servers import free_port

CONTEXT_PATH = "/api/v1/bot/user-context/{telegram_id}"
SELLER_DATA = {
    "sales": {"revenue_rub": 1234567, "units": 321},
    "stocks": [{"sku": "WB-42", "quantity": 17}],
    "orders": {"today": 5},
    "reviews": {"average_rating": 4.7},
}
TITLES = ("Продажи", "Остатки", "Заказы", "Отзывы")
FETCH_OUTCOMES = ("ok", "empty", "timeout", "http_error", "bad_response", "error")


# --- the fake main server ------------------------------------------------------


class _MainServer(ThreadingHTTPServer):
    daemon_threads = True
    # A handler may still be sleeping past the client's timeout; closing the
    # server must not wait for it.
    block_on_close = False

    def handle_error(self, request, client_address):
        # The service gave up on a slow answer: a broken pipe is expected.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _MainServer

    def do_GET(self):
        main = self.server.main
        main.record(self.path, self.headers.get("X-API-KEY"))
        reply = main.replies.pop(0) if main.replies else main.reply
        if reply.get("sleep"):
            time.sleep(reply["sleep"])
        body = reply["body"]
        head = (
            f"HTTP/1.1 {reply['status']} X\r\n"
            f"Content-Type: {reply.get('content_type', 'application/json')}\r\n"
            f"Content-Length: {len(body)}\r\n"
            + (f"Location: {reply['location']}\r\n" if reply.get("location") else "")
            + "\r\n"
        ).encode()
        if not reply.get("drip"):
            self.wfile.write(head + body)
            return
        # One byte at a time: every read of the client gets data before its timeout.
        for byte in head + body:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(reply["drip"])

    def log_message(self, format, *args):
        pass


class FakeMainServer:
    """GET /api/v1/bot/user-context/{telegram_id}, answering what it is told."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: list[dict] = []
        self.reply: dict = {}
        # Served first, one per request, before ``reply`` (e.g. a redirect).
        self.replies: list[dict] = []
        self.reply_json(SELLER_DATA)
        self._server = _MainServer(("127.0.0.1", 0), _Handler)
        self._server.main = self
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def reply_json(self, payload, status: int = 200, sleep: float = 0.0) -> None:
        self.reply_raw(json.dumps(payload, ensure_ascii=False).encode(), status, sleep)

    def reply_raw(self, body: bytes, status: int = 200, sleep: float = 0.0, **extra) -> None:
        self.reply = {"body": body, "status": status, "sleep": sleep, **extra}

    def redirect_once(self, location: str, status: int = 307) -> None:
        self.replies.append({"body": b"", "status": status, "location": location})

    def record(self, path: str, api_key: str | None) -> None:
        with self._lock:
            self._requests.append({"path": path, "api_key": api_key})

    @property
    def requests(self) -> list[dict]:
        with self._lock:
            return list(self._requests)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def main_server():
    server = FakeMainServer()
    yield server
    server.stop()


@pytest.fixture
def context_app(make_app, main_server):
    """Builds an app that fetches from the fake main server (0.5 s timeout)."""

    def build(**overrides):
        env = {
            "USER_CONTEXT_URL": main_server.url + CONTEXT_PATH,
            "USER_CONTEXT_TIMEOUT": "0.5",
            **overrides,
        }
        return make_app(**env)

    return build


@pytest.fixture
def api(context_app):
    return Api(context_app().test_client())


# --- helpers -------------------------------------------------------------------


def sent_messages(fake_llm) -> list[dict]:
    """The messages of the only call the fake LLM received."""
    assert fake_llm.calls == 1
    return fake_llm.requests[0]["body"]["messages"]


def seller_data(fake_llm) -> str | None:
    """The ``<seller_data>`` block of the new user message, None without one."""
    messages = sent_messages(fake_llm)
    assert [m["role"] for m in messages] == ["system", "user"]
    question = messages[-1]["content"]
    if "<seller_data>" not in question:
        return None
    return question.split("<seller_data>", 1)[1].split("</seller_data>", 1)[0]


def all_fetches(api) -> dict[str, float]:
    """``ai_chat_user_context_fetches_total`` by outcome, as ``GET /metrics`` shows it."""
    counted = dict.fromkeys(FETCH_OUTCOMES, 0.0)
    for family in text_string_to_metric_families(api.client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "ai_chat_user_context_fetches_total":
                counted[sample.labels["outcome"]] = sample.value
    return counted


def fetches(api, outcome: str) -> float:
    return all_fetches(api)[outcome]


# --- fetched context -----------------------------------------------------------


def test_absent_context_is_fetched_for_the_user_id_in_the_path(api, main_server):
    response = api.send(telegram_id=424242)

    assert response.status_code == 200
    assert [r["path"] for r in main_server.requests] == ["/api/v1/bot/user-context/424242"]


def test_fetched_data_reaches_the_llm_as_the_seller_data_block(api, fake_llm):
    api.send(message="Что у меня с продажами?")

    personal = seller_data(fake_llm)
    assert "1234567" in personal
    assert "WB-42" in personal
    for title in TITLES:
        assert title in personal
    assert sent_messages(fake_llm)[-1]["content"].endswith("Что у меня с продажами?")


def test_wrapped_payload_is_unwrapped(api, main_server, fake_llm):
    main_server.reply_json({"success": True, "data": SELLER_DATA})

    api.send()

    personal = seller_data(fake_llm)
    assert "1234567" in personal
    assert "success" not in personal


def test_huge_payload_gives_a_bounded_personalisation_block(api, main_server, fake_llm):
    # ~150 KB: under any sane response cap, far over what belongs in a prompt.
    rows = [{"sku": f"WB-{n}", "quantity": n} for n in range(1000)]
    main_server.reply_json({"sales": rows, "stocks": rows, "orders": rows, "reviews": rows})

    response = api.send()

    assert response.status_code == 200
    personal = seller_data(fake_llm)
    assert "WB-0" in personal
    assert len(personal) < 8000


@pytest.mark.parametrize(
    ("overrides", "expected_key"),
    [
        ({"USER_CONTEXT_API_KEY": "main-server-key"}, "main-server-key"),
        ({}, API_KEY),
        ({"API_SECRET_KEY": f"first-key,{API_KEY}"}, "first-key"),
    ],
    ids=["user_context_api_key", "only_api_key", "first_of_rotated_keys"],
)
def test_fetch_sends_the_configured_api_key(context_app, main_server, overrides, expected_key):
    api = Api(context_app(**overrides).test_client())

    assert api.send().status_code == 200

    assert [r["api_key"] for r in main_server.requests] == [expected_key]


def test_successful_fetch_is_counted_as_ok(api):
    before = fetches(api, "ok")

    api.send()

    assert fetches(api, "ok") == before + 1


# --- context given in the request ----------------------------------------------


def test_context_in_request_is_used_and_nothing_is_fetched(api, main_server, fake_llm):
    api.send(user_context="Выручка за неделю: 777000 ₽")

    assert main_server.requests == []
    assert "Выручка за неделю: 777000 ₽" in seller_data(fake_llm)


def test_empty_context_in_request_means_no_personalisation(api, main_server, fake_llm):
    before = all_fetches(api)

    response = api.send(user_context="")

    assert response.status_code == 200
    assert main_server.requests == []
    assert seller_data(fake_llm) is None
    assert all_fetches(api) == before


def test_null_context_in_request_is_fetched(api, main_server, fake_llm):
    api.send(user_context=None)

    assert len(main_server.requests) == 1
    assert "1234567" in seller_data(fake_llm)


def test_nothing_is_fetched_without_user_context_url(make_api, fake_llm):
    api = make_api(USER_CONTEXT_URL="")
    before = all_fetches(api)

    response = api.send()

    assert response.status_code == 200
    assert seller_data(fake_llm) is None
    assert all_fetches(api) == before


# --- failures: answer without personalisation ----------------------------------


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        ({"body": b"{}", "sleep": 1.5}, "timeout"),
        ({"body": b'{"detail": "Not found"}', "status": 404}, "http_error"),
        ({"body": b'{"detail": "boom"}', "status": 500}, "http_error"),
        ({"body": b"<html>not json</html>", "content_type": "text/html"}, "bad_response"),
        ({"body": json.dumps([SELLER_DATA]).encode()}, "bad_response"),
        ({"body": b'{"sales": "' + b"x" * 300_000 + b'"}'}, "bad_response"),
        ({"body": b'{"detail": "' + b"x" * 300_000 + b'"}', "status": 500}, "http_error"),
        ({"body": b"{}"}, "empty"),
        ({"body": b'{"sales": null, "stocks": [], "orders": {}, "reviews": ""}'}, "empty"),
    ],
    ids=[
        "timeout",
        "404",
        "500",
        "not_json",
        "json_list",
        "oversized",
        "500_oversized",
        "empty_object",
        "all_sections_empty",
    ],
)
def test_unusable_context_answers_without_personalisation(
    api, main_server, fake_llm, sql, reply, outcome
):
    main_server.reply_raw(**reply)
    before = fetches(api, outcome)

    response = api.send()

    assert response.status_code == 200
    assert len(main_server.requests) == 1
    assert seller_data(fake_llm) is None
    assert request_count(sql) == 1
    assert fetches(api, outcome) == before + 1


def test_unreachable_main_server_answers_without_personalisation(make_api, fake_llm, sql):
    url = f"http://127.0.0.1:{free_port()}{CONTEXT_PATH}"
    api = make_api(USER_CONTEXT_URL=url, USER_CONTEXT_TIMEOUT="0.5")
    before = fetches(api, "error")

    response = api.send()

    assert response.status_code == 200
    assert seller_data(fake_llm) is None
    assert request_count(sql) == 1
    assert fetches(api, "error") == before + 1


# --- a bounded fetch -------------------------------------------------------------


def test_a_dripping_main_server_cannot_hold_the_request_past_the_fetch_budget(
    api, main_server, fake_llm, sql
):
    # A byte every 0.2 s: each read gets data long before any per-read timeout,
    # and the whole answer would take about 30 s.
    main_server.reply_json(SELLER_DATA)
    main_server.reply["drip"] = 0.2
    before = fetches(api, "timeout")
    started = time.monotonic()

    response = api.send()

    assert response.status_code == 200
    # The fetch budget is USER_CONTEXT_TIMEOUT (0.5 s); a wide margin for a busy CI.
    assert time.monotonic() - started < 3
    assert seller_data(fake_llm) is None
    assert fetches(api, "timeout") == before + 1
    assert request_count(sql) == 1


# --- redirects -------------------------------------------------------------------


def test_a_redirect_on_the_same_origin_is_followed_with_the_key(api, main_server, fake_llm):
    # FastAPI answers a missing trailing slash like this.
    main_server.redirect_once("/api/v1/bot/user-context/1/")

    assert api.send(telegram_id=1).status_code == 200

    assert [(r["path"], r["api_key"]) for r in main_server.requests] == [
        ("/api/v1/bot/user-context/1", API_KEY),
        ("/api/v1/bot/user-context/1/", API_KEY),
    ]
    assert "1234567" in seller_data(fake_llm)


def test_a_redirect_to_another_origin_never_carries_the_key(api, main_server, fake_llm):
    elsewhere = FakeMainServer()
    try:
        main_server.redirect_once(f"{elsewhere.url}/collect")

        assert api.send(telegram_id=1).status_code == 200

        assert [r["api_key"] for r in main_server.requests] == [API_KEY]
        assert [(r["path"], r["api_key"]) for r in elsewhere.requests] == [("/collect", None)]
    finally:
        elsewhere.stop()


def test_endless_redirects_end_without_personalisation(api, main_server, fake_llm):
    for _ in range(10):
        main_server.redirect_once("/api/v1/bot/user-context/1")

    assert api.send(telegram_id=1).status_code == 200

    assert len(main_server.requests) == 4  # the first request and three redirects
    assert seller_data(fake_llm) is None
