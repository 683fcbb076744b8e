"""Observability: ``GET /metrics`` summed over gunicorn workers, and the one
log line per request.

Metrics: one real gunicorn server with two workers gets a fixed mix of sends
(answered, refused with 429, failed at the LLM) over fresh connections; the
scrape of ``/metrics`` must add up to exactly what the clients saw, and the
per-process files in the metrics directory prove both workers took part.

Logs: the Flask test client with ``capsys`` (the app logs to whatever stdout
is), plus the gunicorn server's own output for the one-line-per-request rule
across processes. A log line carries ids, sizes and timings, never the text
of a message or answer, nor a key.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, base_env
from tests.fake_llm import delay, ok, status
from tests.servers import Gunicorn, free_port, post_send, request_log_lines

SEND = "/v1/chat/send"
MESSAGE = "Как снизить возвраты?"
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PHASES = ("quota", "context", "llm", "save", "total")


# --- metrics under gunicorn: one run, many checks ----------------------------------


@dataclass
class Traffic:
    """What the clients saw, and what the server exposed afterwards."""

    statuses: Counter = field(default_factory=Counter)
    tokens: int = 0
    sent: dict[str, int] = field(default_factory=dict)  # X-Request-ID -> status
    families: dict = field(default_factory=dict)  # family name -> Metric
    exposition: str = ""
    sends_per_worker: dict[int, float] = field(default_factory=dict)
    log: str = ""

    def value(self, sample_name: str, **labels) -> float:
        """Sum of the samples of that name whose labels include ``labels``."""
        return sum(
            sample.value
            for family in self.families.values()
            for sample in family.samples
            if sample.name == sample_name
            and all(sample.labels.get(key) == value for key, value in labels.items())
        )


def sends_by_worker(metrics_dir: Path, master_pid: int, scratch: Path) -> dict[int, float]:
    """Sends counted in each worker's own counter file (``counter_<pid>.db``)."""
    per_worker = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        if pid == master_pid:
            continue
        copy = scratch / path.name
        shutil.copyfile(path, copy)
        total = sum(
            sample.value
            for metric in MultiProcessCollector.merge([str(copy)])
            for sample in metric.samples
            if sample.name == "ai_chat_http_requests_total" and sample.labels["endpoint"] == SEND
        )
        per_worker[pid] = total
    return per_worker


@pytest.fixture(scope="module")
def traffic(database_url, _fake_llm_server, tmp_path_factory) -> Traffic:
    """Drive a known mix of sends through two gunicorn workers, then scrape.

    DAILY_LIMIT is 2. User 101 first meets three LLM failures (400, not
    retried: 502 and a refund each), then gets 2 answers and a 429; users
    102…111 get 2 answers and a 429 each. Personalisation is fetched from a
    closed port (outcome "error") for every send that reaches the LLM.
    """
    fake = _fake_llm_server
    fake.reset()
    fake.script(status(400), status(400), status(400))
    metrics_dir = tmp_path_factory.mktemp("metrics")
    env = {
        **base_env(database_url, fake.url),
        "DAILY_LIMIT": "2",
        "LOG_LEVEL": "INFO",
        "USER_CONTEXT_URL": f"http://127.0.0.1:{free_port()}/ctx/{{telegram_id}}",
        "USER_CONTEXT_TIMEOUT": "0.5",
    }
    server = Gunicorn(env, workers=2, threads=8, log_dir=tmp_path_factory.mktemp("log"))
    # An operator-given directory (kept after exit) instead of the private one.
    server.env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    seen = Traffic()
    plan = [101] * 6 + [user for user in range(102, 112) for _ in range(3)]
    with server:
        for number, telegram_id in enumerate(plan):
            request_id = f"obs-{number}"
            # A fresh connection each time, so the kernel may hand it to either worker.
            code, body = post_send(
                server.url, telegram_id, MESSAGE,
                headers={"X-Request-ID": request_id, "Connection": "close"},
            )
            seen.statuses[code] += 1
            seen.sent[request_id] = code
            if code == 200:
                seen.tokens += body["tokens_used"]
        scrape = requests.get(f"{server.url}/metrics", timeout=10)
        assert scrape.status_code == 200
        seen.exposition = scrape.text
        seen.families = {
            family.name: family for family in text_string_to_metric_families(scrape.text)
        }
        seen.sends_per_worker = sends_by_worker(
            metrics_dir, server.process.pid, tmp_path_factory.mktemp("per-worker")
        )
    seen.log = server.log()
    fake.reset()
    return seen


def test_the_traffic_mix_got_the_expected_answers(traffic):
    assert traffic.statuses == {200: 22, 429: 11, 502: 3}


def test_both_workers_served_sends(traffic):
    busy = [pid for pid, sends in traffic.sends_per_worker.items() if sends > 0]
    assert len(busy) == 2, traffic.sends_per_worker


def test_metrics_are_the_sum_of_the_workers_files(traffic):
    assert traffic.value("ai_chat_http_requests_total", endpoint=SEND) == sum(
        traffic.sends_per_worker.values()
    )


@pytest.mark.parametrize("status_code", [200, 429, 502])
def test_http_requests_are_counted_by_endpoint_method_and_status(traffic, status_code):
    counted = traffic.value(
        "ai_chat_http_requests_total", endpoint=SEND, method="POST", status=str(status_code)
    )
    assert counted == traffic.statuses[status_code]


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        # Every send that got past the quota reserved a unit: answers and failures.
        ("ai_chat_quota_reservations_total", lambda t: t.statuses[200] + t.statuses[502]),
        ("ai_chat_quota_rejections_total", lambda t: t.statuses[429]),
        ("ai_chat_quota_refunds_total", lambda t: t.statuses[502]),
    ],
    ids=["reservations", "rejections", "refunds"],
)
def test_quota_counters_add_up(traffic, metric, expected):
    assert traffic.value(metric) == expected(traffic)


@pytest.mark.parametrize(
    ("outcome", "expected"),
    # A 400 from the model is the request's fault: "rejected", never a fallback.
    [("ok", lambda t: t.statuses[200]), ("rejected", lambda t: t.statuses[502])],
)
def test_llm_calls_are_counted_by_outcome_model_and_provider(traffic, outcome, expected):
    assert traffic.value(
        "ai_chat_llm_requests_total", outcome=outcome, model="gpt-4o-mini", provider="openai"
    ) == expected(traffic)


def test_llm_tokens_are_the_sum_of_tokens_used_answered(traffic):
    assert traffic.tokens > 0
    assert traffic.value("ai_chat_llm_tokens_total") == traffic.tokens


def test_personalisation_fetches_are_counted_by_outcome(traffic):
    fetches = traffic.statuses[200] + traffic.statuses[502]
    assert traffic.value("ai_chat_user_context_fetches_total", outcome="error") == fetches


def test_no_database_errors_are_counted(traffic):
    assert "ai_chat_database_errors_total" in traffic.exposition
    assert traffic.value("ai_chat_database_errors_total") == 0


def test_http_latency_histogram_counts_every_send(traffic):
    count = traffic.value(
        "ai_chat_http_request_duration_seconds_count", endpoint=SEND, method="POST"
    )
    infinite_bucket = traffic.value(
        "ai_chat_http_request_duration_seconds_bucket", endpoint=SEND, method="POST", le="+Inf"
    )
    assert count == infinite_bucket == sum(traffic.statuses.values())


def test_llm_latency_histogram_counts_every_llm_call(traffic):
    calls = traffic.statuses[200] + traffic.statuses[502]
    assert traffic.value("ai_chat_llm_request_duration_seconds_count") == calls


@pytest.mark.parametrize("phase", PHASES)
def test_send_phase_histograms_count_every_answer(traffic, phase):
    count = traffic.value("ai_chat_send_phase_duration_seconds_count", phase=phase)
    assert count == traffic.statuses[200]


def test_metric_names_follow_prometheus_conventions(traffic):
    assert traffic.families, "nothing scraped"
    problems = []
    for family in traffic.families.values():
        if not family.name.startswith("ai_chat_"):
            problems.append(f"{family.name}: no ai_chat_ prefix")
        if not family.documentation:
            problems.append(f"{family.name}: no HELP text")
        if family.type == "counter":
            problems += [
                f"{sample.name}: counter sample without _total"
                for sample in family.samples
                if not sample.name.endswith("_total")
            ]
        elif family.type == "histogram":
            if not family.name.endswith("_seconds"):
                problems.append(f"{family.name}: duration histogram not in _seconds")
        elif family.type == "gauge":
            if not family.name.endswith("_in_flight"):
                problems.append(f"{family.name}: gauge is not an _in_flight count")
        else:
            problems.append(f"{family.name}: unexpected type {family.type}")
        for sample in family.samples:
            problems += [
                f"{sample.name}: label {label} is not snake_case"
                for label in sample.labels
                if not re.fullmatch(r"[a-z][a-z0-9_]*", label)
            ]
    assert problems == []


def test_every_send_left_exactly_one_json_log_line_under_gunicorn(traffic):
    request_lines = request_log_lines(traffic.log)
    logged = Counter(line["request_id"] for line in request_lines if line["path"] == SEND)
    assert logged == Counter(traffic.sent.keys())
    statuses = {line["request_id"]: line["status"] for line in request_lines}
    assert {rid: statuses[rid] for rid in traffic.sent} == traffic.sent


def test_gunicorn_log_never_contains_the_message_text(traffic):
    assert traffic.log
    assert MESSAGE not in traffic.log
    assert API_KEY not in traffic.log


# --- metrics in a single process ---------------------------------------------------


def test_metrics_endpoint_serves_prometheus_text_without_an_api_key(client):
    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"ai_chat_http_requests", "ai_chat_llm_requests"} <= names


# --- request logs --------------------------------------------------------------------


def request_lines(capsys) -> list[dict]:
    """The JSON request lines written to stdout so far."""
    return request_log_lines(capsys.readouterr().out)


@pytest.fixture
def logged_api(make_api):
    return make_api(LOG_LEVEL="INFO")


def test_send_echoes_the_given_request_id_in_header_and_log(logged_api, capsys):
    response = logged_api.send(headers={"X-Request-ID": "abc-123"})

    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "abc-123"
    [line] = request_lines(capsys)
    assert line["request_id"] == "abc-123"


def test_answered_send_log_line_has_the_request_fields(logged_api, fake_llm, capsys):
    fake_llm.script(ok("Ответ", tokens=77))

    response = logged_api.send(telegram_id=42, headers={"X-Request-ID": "abc-123"})

    assert response.status_code == 200
    [line] = request_lines(capsys)
    assert {
        key: line.get(key)
        for key in ("level", "request_id", "method", "path", "status", "telegram_id",
                    "outcome", "tokens")
    } == {
        "level": "INFO",
        "request_id": "abc-123",
        "method": "POST",
        "path": SEND,
        "status": 200,
        "telegram_id": 42,
        "outcome": "answered",
        "tokens": 77,
    }
    assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0
    assert isinstance(line["llm_ms"], int | float) and 0 <= line["llm_ms"] <= line["duration_ms"]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line["time"])


@pytest.mark.parametrize(
    "given",
    [None, "has spaces in it", "x" * 200, "semi;colon", ""],
    ids=["none", "spaces", "200 chars", "semicolon", "empty"],
)
def test_request_id_is_generated_when_missing_or_invalid(logged_api, capsys, given):
    headers = {} if given is None else {"X-Request-ID": given}

    response = logged_api.send(headers=headers)

    generated = response.headers["X-Request-ID"]
    assert generated != given
    assert SAFE_REQUEST_ID.fullmatch(generated)
    [line] = request_lines(capsys)
    assert line["request_id"] == generated


def test_generated_request_ids_differ_between_requests(logged_api, capsys):
    first = logged_api.send().headers["X-Request-ID"]
    second = logged_api.send().headers["X-Request-ID"]

    assert first != second
    assert [line["request_id"] for line in request_lines(capsys)] == [first, second]


def test_log_never_contains_the_message_the_answer_or_a_key(make_api, fake_llm, capsys):
    secrets = {
        "message": "Мой секретный вопрос про поставки 9137",
        "answer": "Секретный ответ ассистента 5521",
        "user_context": "Продажи продавца 7703",
        "api key": API_KEY,
        "llm key": "sk-llm-secret-4410",
    }
    api = make_api(LOG_LEVEL="INFO", OPENAI_API_KEY=secrets["llm key"])
    fake_llm.script(ok(secrets["answer"], tokens=5))

    response = api.send(message=secrets["message"], user_context=secrets["user_context"])

    assert response.status_code == 200
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert '"ai_chat.request"' in output
    assert [name for name, secret in secrets.items() if secret in output] == []


def test_limit_exceeded_line_has_outcome_limit_exceeded(make_api, capsys):
    api = make_api(LOG_LEVEL="INFO", DAILY_LIMIT="1")
    assert api.send().status_code == 200

    response = api.send()

    assert response.status_code == 429
    line = request_lines(capsys)[-1]
    assert (line["status"], line["outcome"], line["telegram_id"]) == (429, "limit_exceeded", 1)
    assert line["refused_by"] == "postgresql"


def test_a_refusal_from_redis_says_so_in_its_line(make_api, redis_env, capsys):
    api = make_api(LOG_LEVEL="INFO", DAILY_LIMIT="1", **redis_env)
    assert api.send().status_code == 200  # its count (1 of 1) is written to Redis

    response = api.send()

    assert response.status_code == 429
    line = request_lines(capsys)[-1]
    assert (line["outcome"], line["refused_by"]) == ("limit_exceeded", "redis")


@pytest.mark.parametrize(
    ("step", "status_code", "outcome"),
    [(status(400), 502, "llm_unavailable"), (delay(1.0), 504, "llm_timeout")],
    ids=["llm_unavailable", "llm_timeout"],
)
def test_llm_failure_line_names_the_failure(make_api, fake_llm, capsys, step, status_code, outcome):
    api = make_api(LOG_LEVEL="INFO", OPENAI_TIMEOUT="0.3", OPENAI_MAX_RETRIES="0")
    fake_llm.script(step)

    response = api.send()

    assert response.status_code == status_code
    [line] = request_lines(capsys)
    assert (line["status"], line["outcome"]) == (status_code, outcome)
    assert "tokens" not in line


@pytest.mark.parametrize(
    ("method", "path", "headers", "status_code", "outcome"),
    [
        ("GET", "/health", {}, 200, "ok"),
        ("GET", "/v1/chat/limits/1", {"X-API-KEY": API_KEY}, 200, "ok"),
        ("GET", "/v1/chat/limits/1", {}, 403, "error"),
        ("GET", "/no/such/path", {}, 404, "error"),
    ],
    ids=["health", "limits", "forbidden", "unknown path"],
)
def test_every_request_leaves_one_line(logged_api, capsys, method, path, headers, status_code,
                                       outcome):
    response = logged_api.client.open(path, method=method, headers=headers)

    assert response.status_code == status_code
    [line] = request_lines(capsys)
    assert (line["method"], line["path"], line["status"], line["outcome"]) == (
        method, path, status_code, outcome
    )


def test_no_request_lines_below_info(make_api, capsys):
    api = make_api(LOG_LEVEL="WARNING")

    assert api.send().status_code == 200

    assert request_lines(capsys) == []


def test_text_format_gives_a_human_line_with_the_request_fields(make_api, capsys):
    api = make_api(LOG_LEVEL="INFO", LOG_FORMAT="text")

    response = api.send(headers={"X-Request-ID": "abc-123"})

    assert response.status_code == 200
    lines = [line for line in capsys.readouterr().out.splitlines() if "ai_chat.request" in line]
    assert len(lines) == 1, lines
    [line] = lines
    assert not line.lstrip().startswith("{")
    for expected in ("INFO", "POST", SEND, "200", "abc-123", "answered"):
        assert expected in line, f"{expected!r} missing from {line!r}"


def test_junk_methods_and_paths_fold_into_fixed_label_values(make_app):
    client = make_app().test_client()
    junk = [f"ZZZ{chr(65 + n)}" for n in range(15)]
    for method in junk:
        client.open("/x", method=method)
        client.open(f"/nowhere/{method}", method=method)
        client.open("/v1/chat/send", method=method)

    families = text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
    labels = {
        (sample.labels["endpoint"], sample.labels["method"])
        for family in families
        if family.name == "ai_chat_http_requests"
        for sample in family.samples
    }
    methods = {method for _, method in labels}
    assert not methods & set(junk)
    assert "other" in methods
    # 45 junk requests, one series: no route matches a method it does not allow.
    assert {endpoint for endpoint, method in labels if method == "other"} == {"unmatched"}
