"""Several instances behind nginx (issue part 3).

Two gunicorn instances of the service (two workers each) share one PostgreSQL
database and the fake LLM. When nginx is installed they run behind the
project's own deploy/nginx.conf, rendered for loopback ports; otherwise the
load goes to both instances directly and only the nginx-specific tests skip.
Concurrent sends for one user through the whole stack must give exactly
``DAILY_LIMIT`` answers, with counter, stored rows and LLM calls agreeing.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import requests

from tests.conftest import API_KEY, assert_counted_stored_and_called, base_env
from tests.servers import (
    ROOT,
    Gunicorn,
    ServerProcess,
    free_port,
    request_log_lines,
    send_all_at_once,
)

DAILY_LIMIT = 30
SENDS = 80
USER = 4242
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
TEST_MARKER = "# test: replaced"


def render_nginx_conf(upstream_ports: list[int], listen_port: int) -> str:
    """deploy/nginx.conf with the marked lines pointed at loopback ports."""
    servers = iter(upstream_ports)
    lines = []
    for line in NGINX_CONF.read_text().splitlines():
        if TEST_MARKER in line and not line.lstrip().startswith("#"):
            indent = line[: len(line) - len(line.lstrip())]
            if line.lstrip().startswith("server "):
                port = next(servers)
                line = f"{indent}server 127.0.0.1:{port} max_fails=3 fail_timeout=10s;"
            elif line.lstrip().startswith("listen "):
                line = f"{indent}listen 127.0.0.1:{listen_port};"
            else:
                raise AssertionError(f"unexpected marked line in nginx.conf: {line!r}")
        lines.append(line)
    assert next(servers, None) is None, "nginx.conf has fewer upstream servers than instances"
    return "\n".join(lines) + "\n"


class Nginx(ServerProcess):
    """``nginx -p <dir>/ -c <dir>/nginx.conf -g 'daemon off;'`` as a child process."""

    def __init__(self, directory: Path, upstream_ports: list[int]):
        port = free_port()
        # Workers drop root privileges to "nobody"; they must reach the temp dirs.
        directory.chmod(0o755)
        (directory / "nginx.conf").write_text(render_nginx_conf(upstream_ports, port))
        super().__init__(
            [
                shutil.which("nginx"),
                "-p", f"{directory}/",
                "-c", f"{directory}/nginx.conf",
                "-g", "daemon off;",
            ],
            port=port,
            log_path=directory / "nginx.log",
            name="nginx",
        )


@pytest.fixture(scope="module")
def instances(database_url, _fake_llm_server, tmp_path_factory):
    """Two gunicorn instances (2 workers × 16 threads) on the shared test database."""
    log_dir = tmp_path_factory.mktemp("instances")
    env = {
        **base_env(database_url, _fake_llm_server.url),
        "DAILY_LIMIT": str(DAILY_LIMIT),
        # One JSON line per request, so the logs show which instance served what.
        "LOG_LEVEL": "INFO",
        # Behind nginx: trust the one X-Forwarded-* hop it adds.
        "PROXY_FIX_COUNT": "1",
    }
    servers = [Gunicorn(env, workers=2, threads=16, log_dir=log_dir) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def nginx(instances, tmp_path_factory):
    """deploy/nginx.conf in front of both instances; skips when nginx is missing."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed")
    proxy = Nginx(tmp_path_factory.mktemp("nginx"), [server.port for server in instances])
    try:
        yield proxy.start(timeout=20)
    finally:
        proxy.stop()


@pytest.fixture
def entry_urls(request, instances):
    """Where the load goes: nginx when installed, else both instances in turn."""
    if shutil.which("nginx") is not None:
        return [request.getfixturevalue("nginx").url]
    return [server.url for server in instances]


@pytest.fixture
def eighty_at_once(entry_urls, fake_llm):
    """80 simultaneous sends for one user against DAILY_LIMIT=30."""
    fake_llm.latency = 0.2  # keep the answered requests in flight together
    return send_all_at_once([(entry_urls[i % len(entry_urls)], USER) for i in range(SENDS)])


# --- the quota across instances --------------------------------------------------


def test_two_instances_give_exactly_the_daily_limit_of_answers(eighty_at_once):
    statuses = Counter(code for code, _ in eighty_at_once)
    assert statuses == {200: DAILY_LIMIT, 429: SENDS - DAILY_LIMIT}


def test_two_instances_report_each_remaining_count_once(eighty_at_once):
    remaining = sorted(body["remaining_requests"] for code, body in eighty_at_once if code == 200)
    assert remaining == list(range(DAILY_LIMIT))


def test_two_instances_refuse_the_rest_with_daily_limit_exceeded(eighty_at_once):
    refused = [body for code, body in eighty_at_once if code == 429]
    assert {body["error"] for body in refused} == {"daily_limit_exceeded"}
    assert {body["requests_remaining"] for body in refused} == {0}


def test_two_instances_count_store_and_call_the_llm_once_per_answer(
    eighty_at_once, sql, fake_llm
):
    assert_counted_stored_and_called(sql, fake_llm, DAILY_LIMIT, telegram_id=USER)


# --- nginx in front ------------------------------------------------------------------


def test_nginx_spreads_sends_over_both_instances(nginx, instances, fake_llm):
    before = [len(request_log_lines(server.log())) for server in instances]
    results = send_all_at_once([(nginx.url, USER)] * 20)
    assert Counter(code for code, _ in results) == {200: 20}
    served = [
        [line for line in request_log_lines(server.log())[count:]
         if line["path"] == "/v1/chat/send"]
        for server, count in zip(instances, before, strict=True)
    ]
    assert sum(len(lines) for lines in served) == 20
    assert all(len(lines) > 0 for lines in served), [len(lines) for lines in served]


def test_nginx_passes_the_clients_request_id_to_the_app_and_back(nginx, instances):
    response = requests.get(
        f"{nginx.url}/v1/chat/limits/{USER}", timeout=10,
        headers={"X-API-KEY": API_KEY, "X-Request-ID": "bot-upd-77:1"},
    )
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "bot-upd-77:1"
    logged = [line for server in instances for line in request_log_lines(server.log())
              if line.get("request_id") == "bot-upd-77:1"]
    assert [(line["path"], line["status"]) for line in logged] == [
        (f"/v1/chat/limits/{USER}", 200)
    ]


def test_nginx_makes_up_a_request_id_when_the_client_sends_none(nginx, instances):
    response = requests.get(
        f"{nginx.url}/v1/chat/limits/{USER}", headers={"X-API-KEY": API_KEY}, timeout=10
    )
    assert response.status_code == 200
    request_id = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    logged = [line for server in instances for line in request_log_lines(server.log())
              if line.get("request_id") == request_id]
    assert len(logged) == 1


def test_nginx_replaces_a_malformed_request_id(nginx):
    response = requests.get(
        f"{nginx.url}/v1/chat/limits/{USER}", timeout=10,
        headers={"X-API-KEY": API_KEY, "X-Request-ID": "bad id; drop table"},
    )
    assert response.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


def test_nginx_refuses_a_body_over_64_kib_with_json_413(nginx, fake_llm, sql):
    body = json.dumps({"telegram_id": USER, "message": "x" * (64 * 1024)}).encode()
    response = requests.post(
        f"{nginx.url}/v1/chat/send", data=body, timeout=10,
        headers={"X-API-KEY": API_KEY, "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"] == "payload_too_large"
    assert fake_llm.calls == 0
    assert sql("SELECT count(*) FROM ai_chat_daily_limits") == [(0,)]


def test_nginx_passes_a_body_just_under_the_limit_to_the_app(nginx, fake_llm):
    # 64 KiB of JSON, not a valid message: the app (not nginx) answers 422.
    padding = 64 * 1024 - len(json.dumps({"telegram_id": USER, "message": ""}))
    body = json.dumps({"telegram_id": USER, "message": "x" * padding}).encode()
    assert len(body) == 64 * 1024
    response = requests.post(
        f"{nginx.url}/v1/chat/send", data=body, timeout=10,
        headers={"X-API-KEY": API_KEY, "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"
    assert "message" in response.json()["errors"]
    assert fake_llm.calls == 0
