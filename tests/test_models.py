"""Models, providers, fallback and the circuit breaker; the user's own settings
(contract, "Models" and "Per-user settings").

Three fake OpenAI-compatible providers run side by side, each with an API key
of its own: the built-in ``openai`` (the shared ``fake_llm``), ``alpha`` and
``beta-eu`` (whose key variable, LLM_PROVIDER_BETA_EU_API_KEY, shows the name
mapping). Which model answered is read from outside: the model name and the
``Authorization`` header each fake received, the ``model`` of the 200 (or of
the stream's ``done``), the stored row, and ``/metrics`` scraped before and
after (the registry is per process, so counters are compared as deltas).

The breaker tests set LLM_BREAKER_FAILURES themselves (base_env keeps it at
1000 for every other test); waits past LLM_BREAKER_OPEN_SECONDS are sleeps
beyond the configured time, never timed assertions. Per-user limits are
checked under concurrency against a real threaded server.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    Api,
    exchange_count,
    freeze_app,
    pg_connect,
    request_count,
    served,
)
from tests.fake_llm import FakeLLM, delay, drop, hang, ok, status, stream_break
from tests.servers import API_KEY, free_port

OPENAI_KEY = "key-openai-for-tests"
ALPHA_KEY = "key-alpha-for-tests"
BETA_KEY = "key-beta-for-tests"
ADMIN_KEY = "admin-key-for-tests"

DEFAULT_MODEL = "gpt-4o-mini"
ALPHA_MODEL = "alpha-large"
BETA_MODEL = "beta-small"
MODELS = [DEFAULT_MODEL, ALPHA_MODEL, BETA_MODEL]
KEYS = {DEFAULT_MODEL: OPENAI_KEY, ALPHA_MODEL: ALPHA_KEY, BETA_MODEL: BETA_KEY}
DAILY_LIMIT = 30  # base_env
RETRIES = 2  # OPENAI_MAX_RETRIES in base_env: three attempts per model
ATTEMPTS = RETRIES + 1

NOW = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
TODAY = NOW.astimezone(ZoneInfo("Europe/Moscow")).date()


# --- providers and apps ----------------------------------------------------------


@pytest.fixture(scope="module")
def _extra_providers():
    alpha, beta = FakeLLM().start(), FakeLLM().start()
    yield alpha, beta
    alpha.stop()
    beta.stop()


def _clean(fake: FakeLLM):
    fake.reset()
    yield fake
    fake.reset()


@pytest.fixture
def alpha(_extra_providers):
    """The fake behind provider ``alpha`` (model alpha-large), clean."""
    yield from _clean(_extra_providers[0])


@pytest.fixture
def beta(_extra_providers):
    """The fake behind provider ``beta-eu`` (model beta-small), clean."""
    yield from _clean(_extra_providers[1])


@pytest.fixture
def fakes(fake_llm, alpha, beta) -> dict[str, FakeLLM]:
    """The fake serving each model."""
    return {DEFAULT_MODEL: fake_llm, ALPHA_MODEL: alpha, BETA_MODEL: beta}


@pytest.fixture
def models_env(fake_llm, alpha, beta) -> dict:
    return {
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_MODEL": DEFAULT_MODEL,
        "LLM_PROVIDERS": f"alpha={alpha.url},beta-eu={beta.url}",
        "LLM_PROVIDER_ALPHA_API_KEY": ALPHA_KEY,
        "LLM_PROVIDER_BETA_EU_API_KEY": BETA_KEY,
        "LLM_MODELS": f"{DEFAULT_MODEL}@openai,{ALPHA_MODEL}@alpha,{BETA_MODEL}@beta-eu",
    }


@pytest.fixture
def build(make_app, models_env):
    """An app with the three providers, plus env-style overrides."""
    return lambda **overrides: make_app(**{**models_env, **overrides})


class ModelsApi(Api):
    """The chat API plus the settings endpoints and the stream."""

    def settings(self, telegram_id=1):
        return self.client.get(f"/v1/chat/users/{telegram_id}/settings", headers=self.headers)

    def put_settings(self, telegram_id=1, key=API_KEY, **fields):
        return self.client.put(
            f"/v1/chat/users/{telegram_id}/settings", json=fields, headers={"X-API-KEY": key}
        )

    def stream_events(self, telegram_id=1, message="Как поднять продажи?", **fields):
        """POST /v1/chat/stream (must answer 200); its events as (name, data)."""
        body = {"telegram_id": telegram_id, "message": message, **fields}
        with self.client.post("/v1/chat/stream", json=body, headers=self.headers) as response:
            assert response.status_code == 200, response.get_data(as_text=True)
            raw = response.get_data(as_text=True)
        events = []
        for block in raw.split("\n\n"):
            name = data = None
            for line in block.splitlines():
                if line.startswith("event: "):
                    name = line[len("event: "):]
                elif line.startswith("data: "):
                    data = json.loads(line[len("data: "):])
            if name is not None:
                events.append((name, data))
        return events

    def metric(self, sample: str, **labels) -> float:
        """One sample of ``/metrics`` with exactly these labels (0 when absent)."""
        text = self.client.get("/metrics").get_data(as_text=True)
        for family in text_string_to_metric_families(text):
            for found in family.samples:
                if found.name == sample and found.labels == labels:
                    return found.value
        return 0.0


def api_for(app) -> ModelsApi:
    return ModelsApi(app.test_client())


@pytest.fixture
def api(build) -> ModelsApi:
    """The chat API of an app with the three providers and no fallback."""
    return api_for(build())


def stored_models(sql, telegram_id: int = 1) -> list[str | None]:
    rows = sql(
        "SELECT model FROM ai_chat_requests WHERE telegram_id = %s ORDER BY id", (telegram_id,)
    )
    return [row[0] for row in rows]


def stored_settings(sql, telegram_id: int = 1):
    rows = sql(
        "SELECT preferred_model, daily_limit FROM ai_chat_user_settings WHERE telegram_id = %s",
        (telegram_id,),
    )
    return rows[0] if rows else None


def post_send(url: str, telegram_id: int, **fields):
    """One send over real HTTP: (status, JSON body, headers)."""
    response = requests.post(
        f"{url}/v1/chat/send",
        json={"telegram_id": telegram_id, "message": "Как поднять продажи?", **fields},
        headers={"X-API-KEY": API_KEY},
        timeout=60,
    )
    return response.status_code, response.json(), response.headers


def send_concurrently(url: str, telegram_id: int, count: int, **fields):
    """``count`` sends for one user released together by a barrier."""
    barrier = threading.Barrier(count)

    def one(_):
        barrier.wait(timeout=30)
        return post_send(url, telegram_id, **fields)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


# --- which model answers ------------------------------------------------------------


@dataclass
class Chosen:
    response: object
    model: str


WAYS = {
    # id: (fields of the send, preference stored before it, the model that must answer)
    "request-model": ({"model": ALPHA_MODEL}, None, ALPHA_MODEL),
    "user-preference": ({}, BETA_MODEL, BETA_MODEL),
    "default-model": ({}, None, DEFAULT_MODEL),
    "request-model-over-preference": ({"model": ALPHA_MODEL}, BETA_MODEL, ALPHA_MODEL),
}


@pytest.fixture(params=list(WAYS))
def chosen(request, api) -> Chosen:
    """One send whose model is chosen one of the contract's ways."""
    fields, preference, model = WAYS[request.param]
    if preference is not None:
        assert api.put_settings(preferred_model=preference).status_code == 200
    return Chosen(api.send(**fields), model)


def test_the_chosen_model_is_asked_for_by_name(chosen, fakes):
    assert fakes[chosen.model].models == [chosen.model]


def test_the_chosen_provider_receives_its_own_api_key(chosen, fakes):
    assert fakes[chosen.model].authorizations == [f"Bearer {KEYS[chosen.model]}"]


def test_the_other_providers_receive_nothing(chosen, fakes):
    others = {model: fake.calls for model, fake in fakes.items() if model != chosen.model}
    assert others == dict.fromkeys(others, 0)


def test_the_answer_names_the_model_that_answered(chosen):
    assert chosen.response.status_code == 200
    assert chosen.response.get_json()["model"] == chosen.model


def test_the_stored_exchange_names_the_model_that_answered(chosen, sql):
    assert stored_models(sql) == [chosen.model]


def test_the_stream_done_names_the_requested_model(api, alpha):
    events = api.stream_events(model=ALPHA_MODEL)

    assert events[-1][0] == "done"
    assert events[-1][1]["model"] == ALPHA_MODEL
    assert alpha.streamed == [True]


def test_settings_of_a_new_user_are_the_defaults_and_the_models(api):
    response = api.settings(telegram_id=42)

    assert response.status_code == 200
    assert response.get_json() == {
        "telegram_id": 42, "preferred_model": None, "daily_limit": None,
        "daily_spend_limit": None, "models": MODELS,
    }


# --- unknown and retired models -------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/send", "/v1/chat/stream"])
def test_unknown_model_is_refused_with_the_available_models(api, path):
    body = {"telegram_id": 1, "message": "Вопрос", "model": "gpt-9-ultra"}
    response = api.client.post(path, json=body, headers=api.headers)

    assert response.status_code == 422
    message = response.get_json()["message"]
    assert "gpt-9-ultra" in message
    assert all(model in message for model in MODELS)


@pytest.mark.parametrize("path", ["/v1/chat/send", "/v1/chat/stream"])
def test_unknown_model_spends_nothing_and_calls_no_provider(api, fakes, sql, path):
    body = {"telegram_id": 1, "message": "Вопрос", "model": "gpt-9-ultra"}
    api.client.post(path, json=body, headers=api.headers)

    assert [fake.calls for fake in fakes.values()] == [0, 0, 0]
    assert request_count(sql) == 0


def test_unknown_preferred_model_is_refused_with_the_available_models(api, sql):
    response = api.put_settings(preferred_model="gpt-9-ultra")

    assert response.status_code == 422
    assert all(model in response.get_json()["message"] for model in MODELS)
    assert stored_settings(sql) is None


def test_a_preference_no_longer_configured_falls_back_to_the_default_silently(api, fakes, sql):
    sql(
        "INSERT INTO ai_chat_user_settings (telegram_id, preferred_model, updated_at) "
        "VALUES (1, 'retired-model', now())"
    )

    response = api.send()

    assert response.status_code == 200
    assert response.get_json()["model"] == DEFAULT_MODEL
    assert [fake.models for fake in fakes.values()] == [[DEFAULT_MODEL], [], []]


# --- fallback on transient failures -----------------------------------------------------


@dataclass
class FellBack:
    response: object
    fallbacks_counted: float


TRANSIENT_FAILURES = [
    pytest.param((status(500), {}), id="500"),
    pytest.param((status(429), {}), id="429"),
    # Three attempts of 0.3 s each, well inside alpha's half of LLM_DEADLINE.
    pytest.param((delay(1), {"OPENAI_TIMEOUT": "0.3"}), id="timeout"),
    pytest.param((drop(), {}), id="dropped-connection"),
]


@pytest.fixture(params=TRANSIENT_FAILURES)
def fell_back(request, build, alpha) -> FellBack:
    """alpha-large fails every attempt one transient way; beta-small is the fallback."""
    failure, env = request.param
    api = api_for(build(LLM_FALLBACK_MODELS=BETA_MODEL, LLM_DEADLINE="10", **env))
    alpha.script_for(ALPHA_MODEL, *[failure] * ATTEMPTS)
    labels = {"from_model": ALPHA_MODEL, "to_model": BETA_MODEL}
    before = api.metric("ai_chat_llm_fallbacks_total", **labels)
    response = api.send(model=ALPHA_MODEL)
    return FellBack(response, api.metric("ai_chat_llm_fallbacks_total", **labels) - before)


def test_transient_failure_is_answered_by_the_fallback_model(fell_back):
    assert fell_back.response.status_code == 200
    assert fell_back.response.get_json()["model"] == BETA_MODEL


def test_failed_model_gets_its_retries_before_the_fallback(fell_back, alpha):
    assert alpha.models == [ALPHA_MODEL] * ATTEMPTS


def test_fallback_model_gets_one_call_with_its_own_key(fell_back, beta, fake_llm):
    assert beta.models == [BETA_MODEL]
    assert beta.authorizations == [f"Bearer {BETA_KEY}"]
    assert fake_llm.calls == 0


def test_fallback_answer_is_stored_under_the_fallback_model(fell_back, sql):
    assert stored_models(sql) == [BETA_MODEL]
    assert request_count(sql) == 1


def test_fallback_is_counted_by_from_and_to_model(fell_back):
    assert fell_back.fallbacks_counted == 1


def test_stream_falls_back_before_the_first_token(build, alpha, beta, sql):
    api = api_for(build(LLM_FALLBACK_MODELS=BETA_MODEL))
    alpha.script_for(ALPHA_MODEL, *[status(500)] * ATTEMPTS)

    events = api.stream_events(model=ALPHA_MODEL)

    assert [name for name, _ in events if name in ("done", "error")] == ["done"]
    assert events[-1][1]["model"] == BETA_MODEL
    assert (alpha.calls, beta.streamed) == (ATTEMPTS, [True])
    assert stored_models(sql) == [BETA_MODEL]


def test_stream_broken_after_its_first_token_is_not_restarted_on_the_fallback(
    build, alpha, beta, sql
):
    api = api_for(build(LLM_FALLBACK_MODELS=BETA_MODEL))
    alpha.script_for(ALPHA_MODEL, stream_break(after=1))

    events = api.stream_events(model=ALPHA_MODEL)

    assert events[-1][0] == "error"
    assert events[-1][1]["error"] == "llm_unavailable"
    assert (alpha.calls, beta.calls) == (1, 0)
    assert (request_count(sql), exchange_count(sql)) == (0, 0)


# --- no fallback on the request's own fault ----------------------------------------------


@pytest.fixture(params=[400, 401, 404])
def rejected(request, build, alpha):
    """alpha-large answers a 4xx other than 429; beta-small is configured as fallback."""
    api = api_for(build(LLM_FALLBACK_MODELS=BETA_MODEL))
    alpha.script_for(ALPHA_MODEL, status(request.param))
    return api.send(model=ALPHA_MODEL)


def test_client_error_answers_502_llm_unavailable(rejected):
    assert rejected.status_code == 502
    body = rejected.get_json()
    assert (body["error"], body["detail"]["error"]) == ("llm_unavailable", "llm_unavailable")


def test_client_error_is_neither_retried_nor_passed_to_the_fallback(rejected, alpha, beta):
    assert (alpha.calls, beta.calls) == (1, 0)


def test_client_error_refunds_the_unit(rejected, sql):
    assert (request_count(sql), exchange_count(sql)) == (0, 0)


# --- the circuit breaker ---------------------------------------------------------------------


BREAKER_FAILURES = 3


def breaker_api(build, open_seconds: float) -> ModelsApi:
    return api_for(build(
        LLM_FALLBACK_MODELS=BETA_MODEL,
        LLM_BREAKER_FAILURES=str(BREAKER_FAILURES),
        LLM_BREAKER_OPEN_SECONDS=str(open_seconds),
    ))


def fail_requests(api: ModelsApi, alpha: FakeLLM, count: int) -> None:
    """``count`` sends whose alpha-large attempts all fail (beta-small answers)."""
    alpha.script_for(ALPHA_MODEL, *[status(500)] * (ATTEMPTS * count))
    for _ in range(count):
        response = api.send(model=ALPHA_MODEL)
        assert response.get_json()["model"] == BETA_MODEL


def open_circuit(api: ModelsApi, alpha: FakeLLM) -> None:
    fail_requests(api, alpha, BREAKER_FAILURES)
    assert alpha.calls == ATTEMPTS * BREAKER_FAILURES


def test_circuit_stays_closed_below_n_failed_requests(build, alpha):
    api = breaker_api(build, open_seconds=60)
    # 2 × 3 failed attempts: six failures if each attempt counted, two requests as it must.
    fail_requests(api, alpha, BREAKER_FAILURES - 1)

    response = api.send(model=ALPHA_MODEL)

    assert response.get_json()["model"] == ALPHA_MODEL
    assert alpha.calls == ATTEMPTS * (BREAKER_FAILURES - 1) + 1


def test_open_circuit_skips_the_provider_and_the_fallback_answers(build, alpha):
    api = breaker_api(build, open_seconds=60)
    open_circuit(api, alpha)

    answered_by = [api.send(model=ALPHA_MODEL).get_json()["model"] for _ in range(3)]

    assert answered_by == [BETA_MODEL] * 3
    assert alpha.calls == ATTEMPTS * BREAKER_FAILURES


def test_circuit_opening_is_counted_once(build, alpha):
    api = breaker_api(build, open_seconds=60)
    before = api.metric("ai_chat_llm_breaker_opened_total", provider="alpha")
    open_circuit(api, alpha)
    api.send(model=ALPHA_MODEL)

    assert api.metric("ai_chat_llm_breaker_opened_total", provider="alpha") - before == 1


def test_skipped_calls_are_counted(build, alpha):
    api = breaker_api(build, open_seconds=60)
    open_circuit(api, alpha)
    before = api.metric("ai_chat_llm_skipped_total", provider="alpha")

    for _ in range(3):
        api.send(model=ALPHA_MODEL)

    assert api.metric("ai_chat_llm_skipped_total", provider="alpha") - before == 3


def test_open_circuit_without_a_fallback_answers_502_and_refunds(build, alpha, sql):
    api = api_for(build(
        LLM_BREAKER_FAILURES=str(BREAKER_FAILURES), LLM_BREAKER_OPEN_SECONDS="60",
    ))
    alpha.script_for(ALPHA_MODEL, *[status(500)] * (ATTEMPTS * BREAKER_FAILURES))
    for _ in range(BREAKER_FAILURES):
        assert api.send(model=ALPHA_MODEL).status_code == 502

    response = api.send(model=ALPHA_MODEL)

    assert response.status_code == 502
    assert response.get_json()["error"] == "llm_unavailable"
    assert alpha.calls == ATTEMPTS * BREAKER_FAILURES
    assert request_count(sql) == 0


def test_circuit_is_shared_by_the_models_of_one_provider(build, models_env, alpha):
    api = api_for(build(
        LLM_MODELS=f"{models_env['LLM_MODELS']},alpha-mini@alpha",
        LLM_FALLBACK_MODELS=BETA_MODEL,
        LLM_BREAKER_FAILURES=str(BREAKER_FAILURES),
        LLM_BREAKER_OPEN_SECONDS="60",
    ))
    open_circuit(api, alpha)

    response = api.send(model="alpha-mini")

    assert response.get_json()["model"] == BETA_MODEL
    assert "alpha-mini" not in alpha.models


def test_after_open_seconds_one_probe_goes_to_the_primary(build, alpha):
    api = breaker_api(build, open_seconds=0.5)
    open_circuit(api, alpha)
    time.sleep(0.7)

    response = api.send(model=ALPHA_MODEL)

    assert response.get_json()["model"] == ALPHA_MODEL
    assert alpha.calls == ATTEMPTS * BREAKER_FAILURES + 1


def test_successful_probe_closes_the_circuit(build, alpha):
    api = breaker_api(build, open_seconds=0.5)
    open_circuit(api, alpha)
    time.sleep(0.7)
    api.send(model=ALPHA_MODEL)  # the probe, answered

    answered_by = [api.send(model=ALPHA_MODEL).get_json()["model"] for _ in range(2)]

    assert answered_by == [ALPHA_MODEL] * 2
    assert alpha.calls == ATTEMPTS * BREAKER_FAILURES + 3


def test_failed_probe_opens_the_circuit_again(build, alpha):
    api = breaker_api(build, open_seconds=1.5)
    open_circuit(api, alpha)
    time.sleep(1.7)
    before = api.metric("ai_chat_llm_breaker_opened_total", provider="alpha")
    fail_requests(api, alpha, 1)  # the probe, with its retries
    probed = alpha.calls

    response = api.send(model=ALPHA_MODEL)

    assert probed == ATTEMPTS * (BREAKER_FAILURES + 1)
    assert response.get_json()["model"] == BETA_MODEL
    assert alpha.calls == probed
    assert api.metric("ai_chat_llm_breaker_opened_total", provider="alpha") - before == 1


def test_half_open_circuit_lets_one_probe_through_at_a_time(build, alpha):
    # The probe takes 1.5 s; requests arriving meanwhile go to the fallback.
    app = build(
        LLM_FALLBACK_MODELS=BETA_MODEL,
        LLM_BREAKER_FAILURES=str(BREAKER_FAILURES),
        LLM_BREAKER_OPEN_SECONDS="1.5",
        OPENAI_TIMEOUT="5",
    )
    open_circuit(api_for(app), alpha)
    time.sleep(1.7)
    alpha.script_for(ALPHA_MODEL, ok(delay=1.5))

    with served(app) as url:
        results = send_concurrently(url, 1, 5, model=ALPHA_MODEL)

    assert sorted(body["model"] for _, body, _ in results) == sorted(
        [ALPHA_MODEL] + [BETA_MODEL] * 4
    )
    assert alpha.calls == ATTEMPTS * BREAKER_FAILURES + 1


# --- the deadline bounds the whole chain ---------------------------------------------------


@dataclass
class Hung:
    response: object
    seconds: float


@pytest.fixture
def hung_chain(build, alpha, beta) -> Hung:
    """alpha-large and its fallback beta-small both never answer; LLM_DEADLINE=2."""
    api = api_for(build(LLM_FALLBACK_MODELS=BETA_MODEL, LLM_DEADLINE="2"))
    alpha.script_for(ALPHA_MODEL, *[hang()] * ATTEMPTS)
    beta.script_for(BETA_MODEL, *[hang()] * ATTEMPTS)
    started = time.monotonic()
    response = api.send(model=ALPHA_MODEL)
    return Hung(response, time.monotonic() - started)


def test_hanging_chain_answers_504_llm_timeout_within_the_deadline(hung_chain):
    assert hung_chain.response.status_code == 504
    assert hung_chain.response.get_json()["error"] == "llm_timeout"
    assert hung_chain.seconds < 6


def test_hanging_primary_leaves_the_fallback_its_share_of_the_deadline(hung_chain, alpha, beta):
    assert alpha.calls >= 1
    assert beta.calls >= 1


def test_hanging_chain_refunds_the_unit(hung_chain, sql):
    assert (request_count(sql), exchange_count(sql)) == (0, 0)


def test_hanging_primary_leaves_the_fallback_time_to_answer(build, alpha, beta):
    # The primary gets half of LLM_DEADLINE=4, so beta-small still has about 2 s.
    api = api_for(build(LLM_FALLBACK_MODELS=BETA_MODEL, LLM_DEADLINE="4"))
    alpha.script_for(ALPHA_MODEL, *[hang()] * ATTEMPTS)

    response = api.send(model=ALPHA_MODEL)

    assert response.status_code == 200
    assert response.get_json()["model"] == BETA_MODEL
    assert beta.calls == 1


# --- a user's own limit under concurrency ------------------------------------------------------


OWN_LIMIT = 7
CONCURRENT = 24


@pytest.fixture
def own_limit_rush(build, fake_llm):
    """24 sends at once for user 700, whose own limit is 7 (DAILY_LIMIT is 30)."""
    app = build()
    assert api_for(app).put_settings(700, daily_limit=OWN_LIMIT).status_code == 200
    fake_llm.latency = 0.2  # keep the answered sends in flight together
    with served(app) as url:
        return send_concurrently(url, 700, CONCURRENT)


def test_own_limit_gives_exactly_that_many_answers_under_concurrency(own_limit_rush):
    statuses = Counter(code for code, _, _ in own_limit_rush)
    assert statuses == {200: OWN_LIMIT, 429: CONCURRENT - OWN_LIMIT}


def test_refusals_report_the_users_own_limit_in_body_and_detail(own_limit_rush):
    refused = [body for code, body, _ in own_limit_rush if code == 429]
    assert {(body["daily_limit"], body["detail"]["daily_limit"]) for body in refused} == {
        (OWN_LIMIT, OWN_LIMIT)
    }


def test_answers_report_the_users_own_limit(own_limit_rush):
    answered = [body for code, body, _ in own_limit_rush if code == 200]
    assert {body["daily_limit"] for body in answered} == {OWN_LIMIT}
    assert sorted(body["remaining_requests"] for body in answered) == list(range(OWN_LIMIT))


def test_ratelimit_headers_report_the_users_own_limit(own_limit_rush):
    policies = {headers.get("RateLimit-Policy") for _, _, headers in own_limit_rush}
    assert policies == {f'"daily";q={OWN_LIMIT};w=86400'}


def test_own_limit_counts_and_stores_exactly_the_answers(own_limit_rush, sql, fake_llm):
    assert request_count(sql, 700) == OWN_LIMIT
    assert exchange_count(sql, 700) == OWN_LIMIT
    assert fake_llm.calls == OWN_LIMIT


# --- a refusal behind a concurrent reservation ------------------------------------------------

# The 429's count is read from the statement's snapshot (taken before it waited for the
# row lock), while the refusal is decided on the count committed since: the service
# never reports less than the limit that refused.


@pytest.fixture
def refused_behind_a_reservation(build, sql, database_name):
    """User 900 (own limit 2) has 1 answer today. Another transaction takes the
    counter row to 2 and holds it while a send arrives (it waits for the row
    lock, as concurrent reservations do), then commits: the send is refused."""
    app = build()
    freeze_app(app, NOW)
    api = api_for(app)
    assert api.put_settings(900, daily_limit=2).status_code == 200
    sql(
        "INSERT INTO ai_chat_daily_limits "
        "(telegram_id, request_count, last_reset_date, created_at, updated_at) "
        "VALUES (900, 1, %s, %s, %s)",
        (TODAY, NOW, NOW),
    )
    holder = pg_connect(database_name)
    try:
        with holder.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute(
                "UPDATE ai_chat_daily_limits SET request_count = 2 WHERE telegram_id = 900"
            )
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(api.send, 900)
                waiting = wait_until(lambda: lock_waiters(sql) == 1, timeout=10)
                cursor.execute("COMMIT")
                response = pending.result(timeout=30)
    finally:
        holder.close()
    assert waiting, "the send never waited for the counter row"
    return response


def lock_waiters(sql) -> int:
    return sql(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )[0][0]


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_send_behind_a_concurrent_reservation_is_refused_at_the_users_limit(
    refused_behind_a_reservation, sql
):
    assert refused_behind_a_reservation.status_code == 429
    assert refused_behind_a_reservation.get_json()["daily_limit"] == 2
    assert request_count(sql, 900) == 2


def test_refusal_behind_a_concurrent_reservation_reports_the_count_that_refused_it(
    refused_behind_a_reservation,
):
    body = refused_behind_a_reservation.get_json()
    assert (body["requests_today"], body["detail"]["requests_today"]) == (2, 2)


def test_refusal_behind_a_concurrent_reservation_says_nothing_remains(
    refused_behind_a_reservation,
):
    assert refused_behind_a_reservation.headers["RateLimit"].startswith('"daily";r=0;')


# --- the limit lowered while sends are in flight --------------------------------------------


@dataclass
class Lowered:
    in_flight: int
    limit: int
    in_flight_at_change: int
    earlier: list
    later: list


LATER_SENDS = 16


@pytest.fixture(params=[(4, 7), (8, 5)], ids=["in-flight-below-new-limit", "in-flight-above"])
def lowered(request, build, fake_llm) -> Lowered:
    """User 800 has limit 100; ``in_flight`` sends are held by the model (1 s) when
    the limit is lowered; then 16 more sends race for what is left."""
    in_flight, limit = request.param
    app = build(OPENAI_TIMEOUT="15")
    api = api_for(app)
    assert api.put_settings(800, daily_limit=100).status_code == 200
    fake_llm.script(*[ok(delay=1)] * in_flight)
    with served(app) as url, ThreadPoolExecutor(max_workers=in_flight) as pool:
        slow = [pool.submit(post_send, url, 800) for _ in range(in_flight)]
        assert fake_llm.wait_for(lambda: fake_llm.calls == in_flight, timeout=30)
        assert api.put_settings(800, daily_limit=limit).status_code == 200
        in_flight_at_change = sum(not future.done() for future in slow)
        later = send_concurrently(url, 800, LATER_SENDS)
        earlier = [future.result() for future in slow]
    return Lowered(in_flight, limit, in_flight_at_change, earlier, later)


def test_reservations_after_lowering_are_granted_only_up_to_the_new_limit(lowered):
    assert lowered.in_flight_at_change == lowered.in_flight  # the change met them in flight
    granted_after = sum(code == 200 for code, _, _ in lowered.later)
    assert granted_after == max(0, lowered.limit - lowered.in_flight)


def test_refusals_after_lowering_report_the_new_limit(lowered):
    refused = [body for code, body, _ in lowered.later if code == 429]
    assert {body["daily_limit"] for body in refused} == {lowered.limit}


def test_sends_in_flight_when_the_limit_was_lowered_keep_their_answers(lowered, sql):
    assert [code for code, _, _ in lowered.earlier] == [200] * lowered.in_flight
    assert request_count(sql, 800) == max(lowered.in_flight, lowered.limit)
    assert exchange_count(sql, 800) == max(lowered.in_flight, lowered.limit)


# --- settings: who may change what -------------------------------------------------------------


@pytest.fixture
def guarded(build) -> ModelsApi:
    """An app whose ADMIN_API_KEY is set."""
    return api_for(build(ADMIN_API_KEY=ADMIN_KEY))


@pytest.mark.parametrize(
    "fields",
    [
        {"daily_limit": 5},
        {"daily_limit": None},
        {"daily_limit": 5, "preferred_model": BETA_MODEL},
    ],
    ids=["limit", "limit-null", "limit-and-model"],
)
def test_bot_key_cannot_set_daily_limit_when_admin_key_is_set(guarded, sql, fields):
    response = guarded.put_settings(**fields)

    assert response.status_code == 403
    body = response.get_json()
    assert (body["error"], body["detail"]["error"]) == ("forbidden", "forbidden")
    assert body["detail"]["message"] == body["message"]
    assert stored_settings(sql) is None


def test_bot_key_can_set_preferred_model_when_admin_key_is_set(guarded, sql):
    response = guarded.put_settings(preferred_model=BETA_MODEL)

    assert response.status_code == 200
    assert response.get_json()["preferred_model"] == BETA_MODEL
    assert stored_settings(sql) == (BETA_MODEL, None)


def test_admin_key_can_set_daily_limit(guarded, sql):
    response = guarded.put_settings(key=ADMIN_KEY, daily_limit=5)

    assert response.status_code == 200
    assert response.get_json()["daily_limit"] == 5
    assert stored_settings(sql) == (None, 5)


def test_setting_one_field_keeps_the_other(guarded):
    guarded.put_settings(key=ADMIN_KEY, daily_limit=5)
    guarded.put_settings(preferred_model=ALPHA_MODEL)

    body = guarded.settings().get_json()

    assert (body["preferred_model"], body["daily_limit"]) == (ALPHA_MODEL, 5)


def test_null_preferred_model_restores_the_default_model(api, fakes):
    api.put_settings(preferred_model=BETA_MODEL)
    api.put_settings(preferred_model=None)

    response = api.send()

    assert response.get_json()["model"] == DEFAULT_MODEL
    assert fakes[BETA_MODEL].calls == 0


def test_limits_report_the_users_own_limit(api):
    api.put_settings(daily_limit=5)
    api.send()

    body = api.limits().get_json()

    assert (body["daily_limit"], body["requests_today"], body["requests_remaining"]) == (5, 1, 4)


def test_send_reports_the_users_own_limit(api):
    api.put_settings(daily_limit=5)

    response = api.send()

    body = response.get_json()
    assert (body["daily_limit"], body["remaining_requests"]) == (5, 4)
    assert response.headers["RateLimit-Policy"] == '"daily";q=5;w=86400'


def test_null_daily_limit_restores_the_default(guarded):
    guarded.put_settings(key=ADMIN_KEY, daily_limit=5)

    response = guarded.put_settings(key=ADMIN_KEY, daily_limit=None)

    assert response.get_json()["daily_limit"] is None
    assert guarded.limits().get_json()["daily_limit"] == DAILY_LIMIT


def test_zero_daily_limit_is_unlimited(api):
    api.put_settings(daily_limit=0)

    response = api.send()

    body = response.get_json()
    assert (body["daily_limit"], body["remaining_requests"]) == (0, None)
    assert "RateLimit-Policy" not in response.headers
    assert "RateLimit" not in response.headers
    assert api.limits().get_json()["requests_remaining"] is None


def test_own_limit_applies_when_the_default_is_unlimited(build):
    api = api_for(build(DAILY_LIMIT="0"))
    api.put_settings(daily_limit=1)

    statuses = [api.send().status_code for _ in range(2)]

    assert statuses == [200, 429]


def test_concurrent_first_settings_updates_for_one_user_all_succeed(build, sql):
    app = build()
    with served(app) as url:
        barrier = threading.Barrier(8)

        def put(limit):
            barrier.wait(timeout=30)
            return requests.put(
                f"{url}/v1/chat/users/1/settings", json={"daily_limit": limit},
                headers={"X-API-KEY": API_KEY}, timeout=60,
            ).status_code

        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(put, range(1, 9)))

    assert statuses == [200] * 8
    assert stored_settings(sql)[1] in range(1, 9)


def test_zero_daily_limit_lifts_a_lower_default(build):
    api = api_for(build(DAILY_LIMIT="1"))
    api.put_settings(daily_limit=0)

    statuses = [api.send().status_code for _ in range(3)]

    assert statuses == [200, 200, 200]


@pytest.mark.parametrize(
    "value", [-1, 1.5, "5", True, 2**31],
    ids=["negative", "float", "string", "bool", "too-big"],
)
def test_invalid_daily_limit_is_refused(api, sql, value):
    response = api.put_settings(daily_limit=value)

    assert response.status_code == 422
    assert "daily_limit" in response.get_json()["errors"]
    assert stored_settings(sql) is None


@pytest.mark.parametrize(
    "value", ["", 5, "m" * 201], ids=["empty", "number", "too-long"]
)
def test_invalid_preferred_model_is_refused(api, sql, value):
    response = api.put_settings(preferred_model=value)

    assert response.status_code == 422
    assert stored_settings(sql) is None


def test_replayed_answer_reports_the_model_and_the_users_own_limit(api, fake_llm):
    api.put_settings(daily_limit=5)
    first = api.send(model=ALPHA_MODEL, request_id="upd-1")

    replay = api.send(model=ALPHA_MODEL, request_id="upd-1")

    assert first.status_code == replay.status_code == 200
    assert replay.get_json()["model"] == ALPHA_MODEL
    assert (replay.get_json()["daily_limit"], replay.get_json()["remaining_requests"]) == (5, 4)


# --- history, stats and metrics record the model ---------------------------------------------


@pytest.fixture
def mixed_history(build, alpha, fake_llm, sql) -> ModelsApi:
    """User 1 today: one old row without a model (5 tokens), then alpha-large
    twice (11 and 13 tokens) and the default model once (7 tokens)."""
    app = build()
    freeze_app(app, NOW)
    sql(
        "INSERT INTO ai_chat_requests "
        "(telegram_id, message, response, tokens_used, request_date, created_at) "
        "VALUES (1, 'старый вопрос', 'старый ответ', 5, %s, %s)",
        (TODAY, NOW - timedelta(hours=1)),
    )
    alpha.script_for(ALPHA_MODEL, ok(tokens=11), ok(tokens=13))
    fake_llm.script(ok(tokens=7))
    api = api_for(app)
    for fields in ({"model": ALPHA_MODEL}, {"model": ALPHA_MODEL}, {}):
        assert api.send(**fields).status_code == 200
    return api


def test_stats_by_model_counts_each_model_and_old_rows_as_null(mixed_history):
    by_model = mixed_history.stats().get_json()["by_model"]

    assert sorted(by_model, key=lambda row: row["model"] or "") == [
        {"model": None, "requests": 1, "tokens": 5, "cost": None},
        {"model": ALPHA_MODEL, "requests": 2, "tokens": 24, "cost": None},
        {"model": DEFAULT_MODEL, "requests": 1, "tokens": 7, "cost": None},
    ]


def test_stats_by_model_adds_up_to_the_totals(mixed_history):
    body = mixed_history.stats().get_json()

    assert sum(row["requests"] for row in body["by_model"]) == body["total_requests"] == 4
    assert sum(row["tokens"] for row in body["by_model"]) == body["total_tokens"] == 36


def test_history_names_the_model_of_each_exchange(mixed_history):
    items = mixed_history.history().get_json()["items"]

    assert [item["model"] for item in items] == [DEFAULT_MODEL, ALPHA_MODEL, ALPHA_MODEL, None]


def test_llm_calls_are_counted_under_the_model_and_provider_that_answered(api):
    labels = {"model": ALPHA_MODEL, "provider": "alpha", "outcome": "ok"}
    before = api.metric("ai_chat_llm_requests_total", **labels)

    api.send(model=ALPHA_MODEL)

    assert api.metric("ai_chat_llm_requests_total", **labels) - before == 1


def test_tokens_are_counted_under_the_model_and_provider_that_answered(api, alpha):
    alpha.script_for(ALPHA_MODEL, ok(tokens=17))
    labels = {"model": ALPHA_MODEL, "provider": "alpha"}
    before = api.metric("ai_chat_llm_tokens_total", **labels)

    api.send(model=ALPHA_MODEL)

    assert api.metric("ai_chat_llm_tokens_total", **labels) - before == 17


# --- operator commands -------------------------------------------------------------------------


def cli(app, *args: str):
    return app.test_cli_runner().invoke(args=["chat", *args])


def output_fields(output: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)


def test_cli_settings_shows_the_defaults_and_the_models(build):
    result = cli(build(), "settings", "1")

    assert result.exit_code == 0, result.output
    fields = output_fields(result.output)
    assert (fields["preferred_model"], fields["daily_limit"]) == ("default", "default")
    assert fields["models"] == ", ".join(MODELS)


def test_cli_settings_shows_the_users_own_settings(build, sql):
    sql(
        "INSERT INTO ai_chat_user_settings (telegram_id, preferred_model, daily_limit, "
        "updated_at) VALUES (1, %s, 0, now())",
        (BETA_MODEL,),
    )

    fields = output_fields(cli(build(), "settings", "1").output)

    assert (fields["preferred_model"], fields["daily_limit"]) == (BETA_MODEL, "unlimited")


@pytest.fixture
def user_with_settings(sql):
    """User 1 prefers alpha-large and has a limit of 9."""
    sql(
        "INSERT INTO ai_chat_user_settings (telegram_id, preferred_model, daily_limit, "
        "updated_at) VALUES (1, %s, 9, now())",
        (ALPHA_MODEL,),
    )


@pytest.mark.parametrize(
    ("given", "stored"), [("5", 5), ("0", 0), ("default", None)], ids=["n", "zero", "default"]
)
def test_cli_set_limit_stores_the_users_limit(build, sql, user_with_settings, given, stored):
    result = cli(build(), "set-limit", "1", given)

    assert result.exit_code == 0, result.output
    assert stored_settings(sql) == (ALPHA_MODEL, stored)


@pytest.mark.parametrize("given", ["-1", "abc", "1.5", ""])
def test_cli_set_limit_refuses_what_is_not_a_limit(build, sql, user_with_settings, given):
    result = cli(build(), "set-limit", "1", given)

    assert result.exit_code != 0
    assert stored_settings(sql) == (ALPHA_MODEL, 9)


@pytest.mark.parametrize("given", ["99999999999", "²"], ids=["beyond-int32", "superscript"])
def test_cli_set_limit_refuses_digits_that_are_not_a_limit_as_a_usage_error(
    build, sql, user_with_settings, given
):
    result = cli(build(), "set-limit", "1", given)

    assert result.exit_code == 2
    assert "LIMIT" in result.output
    assert stored_settings(sql) == (ALPHA_MODEL, 9)


def stored_spend_limit(sql):
    return sql("SELECT daily_spend_limit FROM ai_chat_user_settings WHERE telegram_id = 1")[0][0]


@pytest.mark.parametrize(
    ("given", "stored"),
    [("2.5", Decimal("2.5")), ("0", Decimal(0)), ("1000000000", Decimal(10**9)),
     ("default", None)],
    ids=["amount", "zero", "max", "default"],
)
def test_cli_set_spend_limit_stores_the_users_cap(build, sql, user_with_settings, given, stored):
    result = cli(build(), "set-spend-limit", "1", given)

    assert result.exit_code == 0, result.output
    assert stored_spend_limit(sql) == stored
    assert stored_settings(sql) == (ALPHA_MODEL, 9)


@pytest.mark.parametrize("given", ["-1", "abc", "NaN", "Infinity", "1e10", "1000000000.01"])
def test_cli_set_spend_limit_refuses_what_the_api_refuses_as_a_usage_error(
    build, sql, user_with_settings, given
):
    result = cli(build(), "set-spend-limit", "1", given)

    # Beyond the API's bound used to reach the column and end in a traceback.
    assert result.exit_code == 2, result.output
    assert "AMOUNT" in result.output
    assert stored_spend_limit(sql) is None


@pytest.mark.parametrize(
    ("given", "stored"), [(BETA_MODEL, BETA_MODEL), ("default", None)], ids=["model", "default"]
)
def test_cli_set_model_stores_the_preference(build, sql, user_with_settings, given, stored):
    result = cli(build(), "set-model", "1", given)

    assert result.exit_code == 0, result.output
    assert stored_settings(sql) == (stored, 9)


def test_cli_set_model_refuses_an_unknown_model_with_the_list(build, sql, user_with_settings):
    result = cli(build(), "set-model", "1", "gpt-9-ultra")

    assert result.exit_code != 0
    assert all(model in result.output for model in MODELS)
    assert stored_settings(sql) == (ALPHA_MODEL, 9)


def llm_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("llm ")]


def test_cli_check_passes_with_every_provider_up(build):
    result = cli(build(), "check")

    assert result.exit_code == 0, result.output
    assert sorted(line.split(":")[0] for line in llm_lines(result.output)) == [
        "llm alpha", "llm beta-eu", "llm openai"
    ]


@pytest.fixture
def gamma_down(build, models_env):
    """The three providers plus ``gamma`` (model gamma-one) on a closed port."""
    return build(
        LLM_PROVIDERS=f"{models_env['LLM_PROVIDERS']},gamma=http://127.0.0.1:{free_port()}/v1",
        LLM_MODELS=f"{models_env['LLM_MODELS']},gamma-one@gamma",
    )


def test_cli_check_prints_one_line_per_provider(gamma_down):
    names = [line.split(":")[0] for line in llm_lines(cli(gamma_down, "check").output)]

    assert sorted(names) == ["llm alpha", "llm beta-eu", "llm gamma", "llm openai"]


def test_cli_check_fails_a_provider_on_a_closed_port(gamma_down):
    result = cli(gamma_down, "check")

    assert result.exit_code != 0
    verdicts = {line.split(":")[0]: line.split(": ", 1)[1] for line in llm_lines(result.output)}
    assert verdicts["llm gamma"].startswith("FAILED")
    assert [verdicts[f"llm {name}"][:2] for name in ("openai", "alpha", "beta-eu")] == ["ok"] * 3


# --- configuration errors stop start-up -----------------------------------------------------


URL = "http://127.0.0.1:9/v1"


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        pytest.param({"LLM_PROVIDERS": "alpha"}, "LLM_PROVIDERS", id="provider-without-url"),
        pytest.param({"LLM_PROVIDERS": "alpha="}, "LLM_PROVIDERS", id="provider-empty-url"),
        pytest.param({"LLM_PROVIDERS": f"={URL}"}, "LLM_PROVIDERS", id="provider-empty-name"),
        pytest.param({"LLM_PROVIDERS": f"Alpha={URL}"}, "LLM_PROVIDERS", id="provider-uppercase"),
        pytest.param({"LLM_PROVIDERS": f"openai={URL}"}, "LLM_PROVIDERS", id="provider-openai"),
        pytest.param(
            {"LLM_MODELS": "gpt-4o-mini@openai,m@nowhere"}, "LLM_MODELS", id="unknown-provider"
        ),
        pytest.param({"LLM_MODELS": "gpt-4o-mini"}, "LLM_MODELS", id="model-without-provider"),
        pytest.param({"LLM_MODELS": "gpt-4o-mini@"}, "LLM_MODELS", id="model-empty-provider"),
        pytest.param(
            {"LLM_PROVIDERS": f"alpha={URL}", "LLM_MODELS": "gpt-4o-mini@openai,@alpha"},
            "LLM_MODELS", id="empty-model-name",
        ),
        pytest.param(
            {"LLM_PROVIDERS": f"alpha={URL}",
             "LLM_MODELS": "gpt-4o-mini@openai,gpt-4o-mini@alpha"},
            "LLM_MODELS", id="duplicate-model",
        ),
        pytest.param(
            {"LLM_MODELS": "gpt-4o-mini@openai", "OPENAI_BASE_URL": "", "OPENAI_API_KEY": ""},
            "LLM_MODELS", id="openai-model-without-openai",
        ),
        pytest.param(
            {"LLM_PROVIDERS": f"alpha={URL}", "LLM_MODELS": "alpha-large@alpha"},
            "OPENAI_MODEL", id="default-model-not-listed",
        ),
        pytest.param(
            {"OPENAI_MODEL": "gpt-4o", "LLM_MODELS": "gpt-4o-mini@openai"},
            "OPENAI_MODEL", id="openai-model-not-listed",
        ),
        pytest.param(
            {"LLM_FALLBACK_MODELS": "gpt-4o"}, "LLM_FALLBACK_MODELS", id="unknown-fallback"
        ),
        pytest.param(
            {"LLM_MODELS": "gpt-4o-mini@openai", "LLM_FALLBACK_MODELS": "gpt-4o-mini,x"},
            "LLM_FALLBACK_MODELS", id="one-unknown-fallback",
        ),
        pytest.param({"LLM_BREAKER_FAILURES": "0"}, "LLM_BREAKER_FAILURES", id="breaker-zero"),
        pytest.param(
            {"LLM_BREAKER_FAILURES": "three"}, "LLM_BREAKER_FAILURES", id="breaker-not-a-number"
        ),
        pytest.param(
            {"LLM_BREAKER_OPEN_SECONDS": "-1"}, "LLM_BREAKER_OPEN_SECONDS", id="open-negative"
        ),
    ],
)
def test_config_error_stops_start_up_with_one_line_naming_the_variable(
    make_app, overrides, variable
):
    with pytest.raises(SystemExit) as stopped:
        make_app(**overrides)

    message = str(stopped.value.code)
    assert variable in message
    assert "\n" not in message
