"""Spend in money: the tokens and cost of every model call, the spend cap and
the operator's report (contract, "Spend in money").

Prices are set per test (``LLM_PRICES``); the fake LLM's usage is
predictable (tests/fake_llm.py: ``tokens`` scripts the total, split so that
both parts stay valid), so the expected costs are computed here from the
rows the calls left, the way an operator would check a bill.
"""

from __future__ import annotations

import subprocess
from datetime import date, timedelta
from decimal import Decimal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, Api, exchange_count, request_count, served
from tests.fake_llm import ok, status
from tests.servers import send_all_at_once

# Per million tokens, input and output: dear output on purpose, so that an
# answer of 1000 tokens (at most OPENAI_MAX_TOKENS of them output) costs about
# 2.3 cents, and the most an answer can cost (what a reservation holds against
# the cap) is under 2 answers.
PRICES = "gpt-4o-mini=0.01:40"
ANSWER = ok("Ответ.", tokens=1000)
ADMIN = "admin-key-for-spend"


@pytest.fixture
def priced(make_app):
    """An API with prices and an admin key: ``priced(**env)``."""
    return lambda **env: Api(make_app(**{"LLM_PRICES": PRICES, "ADMIN_API_KEY": ADMIN,
                                         **env}).test_client())


def admin(api: Api) -> Api:
    other = Api(api.client)
    other.headers = {"X-API-KEY": ADMIN}
    return other


def costs(sql, telegram_id: int = 1) -> list[tuple]:
    return sql("SELECT purpose, prompt_tokens, completion_tokens, cost FROM ai_chat_llm_calls "
               "WHERE telegram_id = %s ORDER BY id", (telegram_id,))


def expected_cost(prompt_tokens: int, completion_tokens: int) -> Decimal:
    rate_in, rate_out = (Decimal(r) for r in PRICES.split("=")[1].split(":"))
    return (prompt_tokens * rate_in + completion_tokens * rate_out) / 1_000_000


def test_every_answer_records_its_tokens_and_cost(priced, fake_llm, sql):
    assert priced().send(1).status_code == 200

    (purpose, prompt, completion, cost), = costs(sql)
    assert purpose == "answer"
    assert cost == expected_cost(prompt, completion) > 0
    row = sql("SELECT prompt_tokens, completion_tokens, tokens_used, cost "
              "FROM ai_chat_requests")[0]
    assert row == (prompt, completion, prompt + completion, cost)


def test_a_model_without_a_price_costs_null_not_zero(make_api, fake_llm, sql):
    assert make_api().send(1).status_code == 200

    assert costs(sql)[0][3] is None
    assert sql("SELECT cost FROM ai_chat_requests")[0][0] is None


def test_stats_show_the_total_cost_and_the_cost_by_model(priced, fake_llm, sql):
    api = priced()
    for _ in range(3):
        assert api.send(1).status_code == 200

    stats = api.stats(1).get_json()

    spent = sum(cost for *_, cost in costs(sql))
    assert stats["total_cost"] == pytest.approx(float(spent))
    assert stats["currency"] == "USD"
    assert stats["by_model"][0]["cost"] == pytest.approx(float(spent))


def test_the_cost_counter_of_prometheus_grows_by_the_recorded_cost(priced, fake_llm, sql):
    api = priced()
    before = cost_counter(api)

    assert api.send(1).status_code == 200

    assert cost_counter(api) - before == pytest.approx(float(costs(sql)[0][3]))


def cost_counter(api: Api) -> float:
    text = api.client.get("/metrics").get_data(as_text=True)
    return sum(
        sample.value
        for family in text_string_to_metric_families(text) if family.name == "ai_chat_llm_cost"
        for sample in family.samples
        if sample.name == "ai_chat_llm_cost_total" and sample.labels["model"] == "gpt-4o-mini"
    )


def test_the_spend_alert_threshold_is_exported_only_when_set(make_app):
    with_alert = make_app(ALERT_SPEND_PER_HOUR="2.5").test_client().get("/metrics")
    assert 'ai_chat_alert_spend_per_hour{currency="USD"} 2.5' in with_alert.get_data(as_text=True)


# --- the spend cap ----------------------------------------------------------------


def test_the_answer_that_reaches_the_cap_is_the_last_and_the_next_gets_a_429(
    priced, fake_llm, sql
):
    fake_llm.script(*[ANSWER] * 5)
    # About 2.3 cents an answer: a cap of 5 cents is passed by the third, and
    # nothing is answered after it.
    api = priced(DAILY_SPEND_LIMIT="0.05")
    statuses = [api.send(1).status_code for _ in range(5)]

    answered = statuses.count(200)
    assert statuses == [200] * answered + [429] * (5 - answered)
    spent = sum(cost for *_, cost in costs(sql))
    before_last = spent - costs(sql)[-1][3]
    assert before_last < Decimal("0.05") <= spent  # only the last answer went past
    refused = api.send(1)
    body = refused.get_json()
    assert body["error"] == "daily_spend_limit_exceeded"
    assert body["detail"]["error"] == "daily_spend_limit_exceeded"
    assert body["daily_spend_limit"] == 0.05
    assert body["spend_today"] == pytest.approx(float(spent))
    assert body["requests_remaining"] == 0 and "reset_at" in body
    assert int(refused.headers["Retry-After"]) > 0
    assert request_count(sql) == answered


def test_forty_concurrent_sends_pass_the_cap_by_at_most_one_answer(make_app, fake_llm, sql):
    """A cap that 3 answers exceed (2.5 answers' worth), 40 sends at once."""
    app = make_app(LLM_PRICES=PRICES, DAILY_SPEND_LIMIT="0.058", OPENAI_MAX_TOKENS="1000")
    fake_llm.script(*[ok("Ответ.", tokens=1000, delay=0.2)] * 40)
    with served(app) as url:
        replies = send_all_at_once([(url, 1)] * 40)

    answers = [body for status_code, body in replies if status_code == 200]
    refusals = [body for status_code, body in replies if status_code == 429]
    assert len(answers) + len(refusals) == 40
    assert {body["error"] for body in refusals} == {"daily_spend_limit_exceeded"}
    # Several were answered at once: the cap did not serialise the seller.
    assert 2 <= len(answers) <= 3
    calls = costs(sql)
    assert len(calls) == len(answers) == request_count(sql) == exchange_count(sql)
    spent = [cost for *_, cost in calls]
    assert sum(spent) - max(spent) < Decimal("0.058")  # at most one answer past the cap
    # Nothing is held any more once the answers are saved.
    assert sql("SELECT spend_reserved FROM ai_chat_daily_limits")[0][0] == 0


def test_a_refund_gives_back_what_the_reservation_held(priced, fake_llm, sql):
    fake_llm.script(status(500))
    api = priced(DAILY_SPEND_LIMIT="0.05", OPENAI_MAX_RETRIES="0")

    assert api.send(1).status_code == 502

    assert sql("SELECT request_count, spend, spend_reserved FROM ai_chat_daily_limits") == [
        (0, 0, 0)
    ]


def test_a_users_own_spend_cap_is_set_by_the_admin_and_applies_at_once(priced, fake_llm, sql):
    api = priced()
    assert api.send(1).status_code == 200
    put = {"daily_spend_limit": 0.000001}
    assert api.client.put("/v1/chat/users/1/settings", json=put,
                          headers=api.headers).status_code == 403

    settings = admin(api).client.put("/v1/chat/users/1/settings", json=put,
                                     headers=admin(api).headers)

    assert settings.get_json()["daily_spend_limit"] == 0.000001
    assert api.send(1).get_json()["error"] == "daily_spend_limit_exceeded"
    assert api.send(2).status_code == 200  # another seller: no cap


@pytest.mark.parametrize("history", ["new user", "answered yesterday"])
def test_a_spend_cap_of_zero_answers_nothing(priced, fake_llm, sql, history):
    api = priced(DAILY_SPEND_LIMIT="0")
    if history == "answered yesterday":
        sql("INSERT INTO ai_chat_daily_limits (telegram_id, request_count, last_reset_date, "
            "created_at, spend, spend_reserved) VALUES (1, 4, current_date - 1, now(), 1, 0)")

    refused = api.send(1)

    assert refused.status_code == 429
    assert refused.get_json()["error"] == "daily_spend_limit_exceeded"
    assert fake_llm.calls == 0


def test_summaries_count_against_the_spend_of_the_day(make_app, fake_llm, sql):
    app = make_app(LLM_PRICES=PRICES, SUMMARY_ENABLED="true")
    api = Api(app.test_client())
    for number in range(10):
        assert api.send(3, message=f"Вопрос {number}").status_code == 200
    assert fake_llm.wait_for(
        lambda: sql("SELECT count(*) FROM ai_chat_llm_calls WHERE purpose = 'summary'")[0][0] == 1,
        timeout=10,
    )

    spend = sql("SELECT spend FROM ai_chat_daily_limits WHERE telegram_id = 3")[0][0]
    assert spend == sum(cost for *_, cost in costs(sql, 3))


# --- the report -------------------------------------------------------------------------


@pytest.fixture
def billed(priced, fake_llm, sql):
    """Answers of two users and two models over two days, and a summary."""
    api = priced(LLM_PROVIDERS="second=" + fake_llm.url,
                 LLM_MODELS="gpt-4o-mini@openai,cheap@second",
                 LLM_PRICES=PRICES + ",cheap=10:40")
    for telegram_id, model in ((1, None), (1, "cheap"), (2, None)):
        assert api.send(telegram_id, model=model).status_code == 200
    sql("UPDATE ai_chat_llm_calls SET usage_date = usage_date - 1 WHERE telegram_id = 2")
    sql("INSERT INTO ai_chat_llm_calls (telegram_id, purpose, model, prompt_tokens, "
        "completion_tokens, cost, usage_date, created_at) VALUES "
        "(1, 'summary', 'gpt-4o-mini', 100, 50, 0.3, "
        "(SELECT max(usage_date) FROM ai_chat_llm_calls), now())")
    return api


def report(api: Api, **query):
    query = {"from": (date.today() - timedelta(days=7)).isoformat(),
             "to": (date.today() + timedelta(days=1)).isoformat(), **query}
    return admin(api).client.get("/v1/chat/usage", query_string=query,
                                 headers=admin(api).headers)


def test_the_report_by_model_sums_every_call_and_counts_answers(billed, sql):
    body = report(billed, group_by="model").get_json()

    calls = sql("SELECT model, purpose, cost FROM ai_chat_llm_calls")
    by_model = {row["key"]: row for row in body["rows"]}
    assert set(by_model) == {"gpt-4o-mini", "cheap"}
    assert by_model["gpt-4o-mini"]["answers"] == 2  # the summary is no answer
    assert by_model["gpt-4o-mini"]["cost"] == pytest.approx(
        float(sum(c for m, _, c in calls if m == "gpt-4o-mini"))
    )
    assert body["total"]["answers"] == 3
    assert body["total"]["cost"] == pytest.approx(float(sum(c for *_, c in calls)))
    assert [row["key"] for row in body["rows"]][0] == "gpt-4o-mini"  # the dearest first


def test_the_report_by_day_lists_days_in_order(billed):
    body = report(billed, group_by="day").get_json()

    days = [row["key"] for row in body["rows"]]
    assert days == sorted(days) and len(days) == 2
    assert [row["answers"] for row in body["rows"]] == [1, 2]


def test_the_report_by_user_is_paged_most_expensive_first(billed):
    first_page = report(billed, group_by="user", limit=1).get_json()
    second_page = report(billed, group_by="user", limit=1, offset=1).get_json()

    past_the_end = report(billed, group_by="user", limit=1, offset=2).get_json()

    assert first_page["groups"] == second_page["groups"] == past_the_end["groups"] == 2
    assert [row["key"] for row in first_page["rows"] + second_page["rows"]] == [1, 2]
    assert first_page["total"] == second_page["total"] == past_the_end["total"]
    assert past_the_end["rows"] == []


@pytest.mark.parametrize(
    "query",
    [{"from": "yesterday", "to": "2026-12-01"}, {"to": "2026-12-01"},
     {"from": "2026-12-01", "to": "2026-12-01", "group_by": "week"},
     {"from": "2026-12-01", "to": "2026-12-01", "limit": "0"}],
)
def test_a_malformed_report_query_is_a_400(billed, query):
    response = admin(billed).client.get("/v1/chat/usage", query_string=query,
                                        headers=admin(billed).headers)
    assert response.status_code == 400
    assert response.get_json()["error"] == "bad_request"


def test_a_report_whose_range_ends_before_it_begins_is_empty(billed):
    body = report(billed, **{"from": "2026-12-02", "to": "2026-12-01"}).get_json()

    assert (body["rows"], body["groups"], body["total"]["answers"]) == ([], 0, 0)


def test_the_report_needs_the_admin_key(billed):
    response = billed.client.get("/v1/chat/usage?from=2026-12-01&to=2026-12-01",
                                 headers={"X-API-KEY": API_KEY})
    assert response.status_code == 403


def test_the_cli_prints_the_same_report(billed, database_url, fake_llm):
    from tests.servers import ROOT, VENV_BIN

    first = (date.today() - timedelta(days=7)).isoformat()
    last = (date.today() + timedelta(days=1)).isoformat()
    result = subprocess.run(
        [str(VENV_BIN / "flask"), "--app", "wsgi", "chat", "usage", "--from", first, "--to",
         last, "--group-by", "model"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "AI_CHAT_ENV_FILE": "/dev/null",
             "API_SECRET_KEY": API_KEY, "DATABASE_URL": database_url,
             "LLM_PROVIDERS": "second=" + fake_llm.url, "OPENAI_BASE_URL": fake_llm.url,
             "LLM_MODELS": "gpt-4o-mini@openai,cheap@second",
             "LLM_PRICES": PRICES + ",cheap=10:40", "LOG_LEVEL": "WARNING"},
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    api_rows = report(billed, group_by="model").get_json()["rows"]
    assert [line.split()[0] for line in lines[1:-1]] == [row["key"] for row in api_rows]
    assert lines[-1].split()[:2] == ["total", "3"]
