"""Security properties of the service: API-key checks, no secrets or message
text in logs, no exception text in error bodies, a capped request size, what
is (and is not) forwarded to the LLM, and tame request ids.

Everything is observed from outside: status codes and bodies, the captured
log output (stdout JSON lines and the logging records), the headers the fake
LLM received. Upstream error bodies carrying secrets come from a tiny local
OpenAI-style server defined here.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import API_KEY
from tests.fake_llm import ok
from tests.servers import free_port, request_log_lines

OPENAI_KEY = "sk-test-secret-123"
UPSTREAM_SECRET = "secret upstream detail"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


# --- a leaky upstream ----------------------------------------------------------


class _LeakyHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = self.server.status
        body = json.dumps(
            {"error": {"message": f"{UPSTREAM_SECRET} key=sk-live-upstream-999", "type": "x"}}
        ).encode()
        with self.server.lock:
            self.server.calls += 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


@pytest.fixture
def leaky_upstream():
    """An OpenAI-style server whose errors carry secrets: ``start(status)`` → URL."""
    servers = []

    def start(status: int):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _LeakyHandler)
        server.daemon_threads = True
        server.status, server.calls, server.lock = status, 0, threading.Lock()
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        servers.append((server, thread))
        return server, f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def failing_insert(sql):
    """Make the database refuse to store one marked message (an unexpected error)."""
    marker = "trigger-internal-error"
    sql(
        "ALTER TABLE ai_chat_requests ADD CONSTRAINT security_test_refuse "
        f"CHECK (position('{marker}' in message) = 0) NOT VALID"
    )
    yield marker
    sql("ALTER TABLE ai_chat_requests DROP CONSTRAINT IF EXISTS security_test_refuse")


# --- API keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        API_KEY[:-1],
        API_KEY + "x",
        API_KEY.upper(),
        f" {API_KEY}",
        f"{API_KEY} ",
        f"{API_KEY},{API_KEY}",
        "test-k\u00e9y",
        "",
    ],
    ids=[
        "prefix",
        "suffix",
        "other_case",
        "leading_space",
        "trailing_space",
        "list",
        "latin1",
        "empty",
    ],
)
def test_near_miss_api_keys_are_forbidden(client, key):
    response = client.get("/v1/chat/limits/1", headers={"X-API-KEY": key})

    assert response.status_code == 403
    assert response.get_json()["error"] == "forbidden"
    if key:
        assert key not in response.get_data(as_text=True)


# --- logs -----------------------------------------------------------------------


def captured_logs(capsys, caplog) -> tuple[str, list[dict]]:
    """Everything logged so far (stdout/stderr lines, every record with its
    extras and traceback) and the request lines parsed from stdout."""
    out, err = capsys.readouterr()
    records = [
        json.dumps(vars(record), default=str, ensure_ascii=False) for record in caplog.records
    ]
    formatted = [record.getMessage() for record in caplog.records]
    text = "\n".join([out, err, caplog.text, *records, *formatted])
    return text, request_log_lines(out)


@pytest.fixture
def logged_api(make_api, caplog):
    """Builds an ``Api`` on an app logging at INFO, every record captured down to DEBUG."""

    def build(**overrides):
        api = make_api(LOG_LEVEL="INFO", OPENAI_API_KEY=OPENAI_KEY, **overrides)
        caplog.set_level(logging.DEBUG)
        return api

    return build


def assert_not_in_logs(logs: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in logs, f"{secret!r} was logged"


def test_successful_send_logs_no_text_or_keys(logged_api, fake_llm, capsys, caplog):
    api = logged_api()
    fake_llm.script(ok("Секретный ответ модели 5521"))

    response = api.send(message="Мой секретный вопрос 8812")

    assert response.status_code == 200
    logs, request_lines = captured_logs(capsys, caplog)
    assert [line["status"] for line in request_lines] == [200]
    assert_not_in_logs(logs, "секретный вопрос 8812", "Секретный ответ модели 5521")
    assert_not_in_logs(logs, API_KEY, OPENAI_KEY)


def test_failed_send_logs_no_text_keys_or_upstream_body(
    logged_api, leaky_upstream, capsys, caplog
):
    upstream, url = leaky_upstream(500)
    api = logged_api(OPENAI_BASE_URL=url)

    response = api.send(message="Мой секретный вопрос 8812")

    assert response.status_code == 502
    assert upstream.calls == 3
    logs, request_lines = captured_logs(capsys, caplog)
    assert [line["status"] for line in request_lines] == [502]
    assert_not_in_logs(logs, "секретный вопрос 8812", API_KEY, OPENAI_KEY)
    assert_not_in_logs(logs, UPSTREAM_SECRET, "sk-live-upstream-999")


def test_forbidden_request_does_not_log_the_wrong_key(logged_api, capsys, caplog):
    response = logged_api().send(
        message="Мой секретный вопрос 8812", headers={"X-API-KEY": "wrong-key-77341"}
    )

    assert response.status_code == 403
    logs, request_lines = captured_logs(capsys, caplog)
    assert [line["status"] for line in request_lines] == [403]
    assert_not_in_logs(logs, "wrong-key-77341", API_KEY, "секретный вопрос 8812", OPENAI_KEY)


def test_internal_error_logs_no_text_or_keys(
    logged_api, fake_llm, failing_insert, capsys, caplog
):
    api = logged_api()
    fake_llm.script(ok("Секретный ответ модели 5521"))

    response = api.send(message=f"Мой секретный вопрос 8812 {failing_insert}")

    assert response.status_code == 500
    logs, request_lines = captured_logs(capsys, caplog)
    assert [line["status"] for line in request_lines] == [500]
    assert_not_in_logs(logs, "секретный вопрос 8812", "Секретный ответ модели 5521")
    assert_not_in_logs(logs, API_KEY, OPENAI_KEY)


# --- error bodies -----------------------------------------------------------------


@pytest.mark.parametrize("upstream_status", [400, 500])
def test_llm_error_detail_never_reaches_the_client(make_api, leaky_upstream, upstream_status):
    _, url = leaky_upstream(upstream_status)
    api = make_api(OPENAI_BASE_URL=url)

    response = api.send()

    assert response.status_code == 502
    body = response.get_json()
    assert body["error"] == "llm_unavailable"
    text = response.get_data(as_text=True)
    assert UPSTREAM_SECRET not in text
    assert "sk-live-upstream-999" not in text


def test_database_outage_answers_without_driver_text(make_api, fake_llm):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/ai_chat"
    api = make_api(DATABASE_URL=url)

    response = api.send()

    assert response.status_code == 503
    assert response.get_json()["error"] == "database_unavailable"
    text = response.get_data(as_text=True).lower()
    for leak in ("psycopg", "sqlalchemy", "operationalerror", "connection", "refused",
                 "127.0.0.1", "select", "insert", "traceback"):
        assert leak not in text, leak
    assert fake_llm.calls == 0


def test_internal_error_body_carries_only_code_message_and_request_id(api, failing_insert):
    response = api.send(message=f"Вопрос {failing_insert}")

    assert response.status_code == 500
    body = response.get_json()
    assert set(body) == {"error", "message", "request_id", "detail"}
    assert body["detail"] == {key: body[key] for key in ("error", "message", "request_id")}
    assert body["error"] == "internal_error"
    assert body["request_id"] == response.headers["X-Request-ID"]
    text = response.get_data(as_text=True).lower()
    for leak in ("integrity", "psycopg", "sqlalchemy", "security_test_refuse", "insert",
                 "ai_chat_requests", "traceback", failing_insert):
        assert leak not in text, leak


# --- request size -----------------------------------------------------------------


def test_body_over_max_content_length_is_refused_with_413(api, fake_llm, sql):
    response = api.send(user_context="я" * 40_000)

    assert response.status_code == 413
    assert response.get_json()["error"] == "payload_too_large"
    assert fake_llm.calls == 0
    assert sql("SELECT count(*) FROM ai_chat_daily_limits") == [(0,)]


# --- what the LLM receives ------------------------------------------------------


def test_llm_gets_the_openai_key_and_never_our_api_key(make_api, fake_llm):
    api = make_api(OPENAI_API_KEY=OPENAI_KEY)

    assert api.send().status_code == 200

    headers = fake_llm.requests[0]["headers"]
    assert headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "x-api-key" not in headers
    assert not any(API_KEY in value for value in headers.values())


# --- request ids -------------------------------------------------------------------


def test_tame_request_id_is_echoed(client):
    response = client.get("/health", headers={"X-Request-ID": "bot-update:123.4_5"})

    assert response.headers["X-Request-ID"] == "bot-update:123.4_5"


@pytest.mark.parametrize(
    "value",
    [
        "abc\r\nSet-Cookie: x=1",
        "abc\nforged log line",
        "a" * 129,
        "two words",
        "<script>",
        "id;rm -rf",
        "идентификатор",
        "",
    ],
    ids=["crlf", "newline", "too_long", "space", "markup", "semicolon", "non_ascii", "empty"],
)
def test_untame_request_id_is_replaced_by_a_generated_one(client, value):
    # Straight into the WSGI environ: the test client refuses newlines in headers.
    response = client.get("/health", environ_overrides={"HTTP_X_REQUEST_ID": value})

    assert response.status_code == 200
    assert response.headers["X-Request-ID"] != value
    assert GENERATED_ID.fullmatch(response.headers["X-Request-ID"])
