"""Operator commands (``flask --app wsgi chat ...``): history retention with
``cleanup``, ``reset-limit``, ``stats`` and the ``check`` of configuration and
connectivity.

Commands run through Flask's CLI runner against the test PostgreSQL database
(rows written and read back with ``sql``) and the fake LLM; one test runs the
real ``flask`` executable the way the README shows it. Exit codes matter:
cron jobs and deploy scripts act on them.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from flask_migrate import upgrade

from tests.conftest import Api, base_env, freeze_app, request_count
from tests.fake_llm import ok
from tests.servers import ROOT, VENV_BIN, free_port

NOW = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
TODAY = NOW.astimezone(ZoneInfo("Europe/Moscow")).date()
MAX_BIGINT = 2**63 - 1


# --- helpers -------------------------------------------------------------------


@pytest.fixture
def run(app, freeze):
    """Run ``chat ...`` in ``app`` with the clock pinned at NOW: ``run("stats", "5")``."""
    freeze(NOW)
    return runner_for(app)


def runner_for(app):
    runner = app.test_cli_runner()

    def invoke(*args: str):
        return runner.invoke(args=["chat", *args])

    return invoke


def insert_exchange(sql, created_at: datetime, telegram_id: int = 1, tokens: int = 10) -> int:
    return sql(
        "INSERT INTO ai_chat_requests "
        "(telegram_id, message, response, tokens_used, request_date, created_at) "
        "VALUES (%s, 'вопрос', 'ответ', %s, %s, %s) RETURNING id",
        (telegram_id, tokens, created_at.astimezone(ZoneInfo("Europe/Moscow")).date(), created_at),
    )[0][0]


def insert_key(sql, request_id: str, chat_request_id: int | None, claimed_at=NOW) -> None:
    sql(
        "INSERT INTO ai_chat_idempotency_keys "
        "(telegram_id, request_id, message_sha256, chat_request_id, claimed_at) "
        "VALUES (1, %s, %s, %s, %s)",
        (request_id, "0" * 64, chat_request_id, claimed_at),
    )


def exchange_ids(sql) -> list[int]:
    return [row[0] for row in sql("SELECT id FROM ai_chat_requests ORDER BY id")]


def key_ids(sql) -> list[str]:
    rows = sql("SELECT request_id FROM ai_chat_idempotency_keys ORDER BY request_id")
    return [row[0] for row in rows]


def send(app, telegram_id: int, message: str = "Как поднять продажи?") -> None:
    """One answered send through the HTTP API."""
    response = Api(app.test_client()).send(telegram_id=telegram_id, message=message)
    assert response.status_code == 200, response.get_json()


def fields_of(output: str) -> dict[str, str]:
    """``name: value`` lines of a command's output as a dict."""
    return dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)


def check_lines(output: str) -> dict[str, str]:
    """``chat check`` lines: {"config": "ok - ...", "database": "FAILED - ...", ...}."""
    return {
        name: rest
        for name, rest in (line.split(": ", 1) for line in output.splitlines() if ": " in line)
        if name in ("config", "database", "schema", "llm") or name.startswith("llm ")
    }


def failed_check(app):
    """Run ``chat check``, which must exit non-zero; returns (its lines, the result)."""
    result = runner_for(app)("check")
    assert result.exit_code != 0
    return check_lines(result.output), result


# --- cleanup -------------------------------------------------------------------


def test_cleanup_deletes_only_exchanges_older_than_the_given_days(run, sql):
    insert_exchange(sql, NOW - timedelta(days=40))
    insert_exchange(sql, NOW - timedelta(days=30, minutes=1))
    kept = [
        insert_exchange(sql, NOW - timedelta(days=29, hours=23)),
        insert_exchange(sql, NOW - timedelta(minutes=5)),
    ]

    result = run("cleanup", "--older-than-days", "30")

    assert result.exit_code == 0, result.output
    assert "Deleted 2 exchange(s)" in result.output
    assert exchange_ids(sql) == kept


def test_cleanup_reports_nothing_to_delete(run, sql):
    kept = insert_exchange(sql, NOW - timedelta(days=1))

    result = run("cleanup", "--older-than-days", "7")

    assert result.exit_code == 0, result.output
    assert "Deleted 0 exchange(s)" in result.output
    assert exchange_ids(sql) == [kept]


@pytest.mark.parametrize(("batch_size", "batches"), [(1, 5), (2, 3), (5, 1), (100, 1)])
def test_cleanup_deletes_in_batches_of_the_given_size(run, sql, batch_size, batches):
    for days in range(31, 36):
        insert_exchange(sql, NOW - timedelta(days=days))

    result = run("cleanup", "--older-than-days", "30", "--batch-size", str(batch_size))

    assert result.exit_code == 0, result.output
    assert f"Deleted 5 exchange(s) created before {(NOW - timedelta(days=30)).isoformat()}" in (
        result.output
    )
    assert f"in {batches} batch(es)" in result.output
    assert exchange_ids(sql) == []


def test_cleanup_deletes_the_idempotency_keys_of_deleted_exchanges_only(run, sql):
    old = insert_exchange(sql, NOW - timedelta(days=60))
    new = insert_exchange(sql, NOW - timedelta(days=1))
    insert_key(sql, "old-key", old, claimed_at=NOW - timedelta(days=60))
    insert_key(sql, "new-key", new)
    insert_key(sql, "in-flight-key", None)

    result = run("cleanup", "--older-than-days", "30")

    assert result.exit_code == 0, result.output
    assert "and 1 idempotency key(s)" in result.output
    assert key_ids(sql) == ["in-flight-key", "new-key"]


def test_cleanup_deletes_claims_abandoned_before_the_cutoff(run, sql):
    insert_key(sql, "abandoned", None, claimed_at=NOW - timedelta(days=45))
    insert_key(sql, "recent-claim", None, claimed_at=NOW - timedelta(minutes=1))

    result = run("cleanup", "--older-than-days", "30")

    assert result.exit_code == 0, result.output
    assert key_ids(sql) == ["recent-claim"]


def test_cleanup_leaves_quota_counters_alone(app, run, sql):
    send(app, telegram_id=7)
    sql("UPDATE ai_chat_requests SET created_at = %s", (NOW - timedelta(days=90),))

    result = run("cleanup", "--older-than-days", "30")

    assert result.exit_code == 0, result.output
    assert exchange_ids(sql) == []
    assert request_count(sql, 7) == 1


def test_cleanup_on_sqlite_deletes_keys_although_foreign_keys_are_not_enforced(
    make_app, tmp_path
):
    from app.extensions import db
    from app.models import ChatRequest, IdempotencyKey

    app = make_app(DATABASE_URL=f"sqlite:///{tmp_path}/chat.db")
    freeze_app(app, NOW)
    with app.app_context():
        upgrade()
        for request_id, age in (("old", 60), ("new", 1)):
            row = ChatRequest(
                telegram_id=1, message="вопрос", response="ответ", tokens_used=1,
                request_date=TODAY, created_at=NOW - timedelta(days=age),
            )
            db.session.add(row)
            db.session.flush()
            db.session.add(IdempotencyKey(
                telegram_id=1, request_id=request_id, message_sha256="0" * 64,
                chat_request_id=row.id, claimed_at=NOW - timedelta(days=age),
            ))
        db.session.commit()

    result = runner_for(app)("cleanup", "--older-than-days", "30")

    assert result.exit_code == 0, result.output
    assert "Deleted 1 exchange(s)" in result.output
    with app.app_context():
        keys = db.session.execute(db.select(IdempotencyKey.request_id)).scalars().all()
        rows = db.session.execute(db.select(ChatRequest.created_at)).scalars().all()
        db.session.commit()
    assert keys == ["new"]
    assert rows == [NOW - timedelta(days=1)]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--older-than-days", "0"],
        ["--older-than-days", "-3"],
        ["--older-than-days", "soon"],
        ["--older-than-days", "30", "--batch-size", "0"],
    ],
    ids=["missing age", "zero days", "negative days", "not a number", "zero batch"],
)
def test_cleanup_refuses_bad_arguments_and_deletes_nothing(run, sql, args):
    insert_exchange(sql, NOW - timedelta(days=400))

    result = run("cleanup", *args)

    assert result.exit_code == 2, result.output
    assert len(exchange_ids(sql)) == 1


# --- reset-limit ---------------------------------------------------------------


def test_reset_limit_zeroes_todays_counter(app, run, sql):
    send(app, telegram_id=5)
    send(app, telegram_id=5)
    assert request_count(sql, 5) == 2

    result = run("reset-limit", "5")

    assert result.exit_code == 0, result.output
    assert "успешно" in result.output
    # The row stays, zeroed (not deleted).
    assert sql("SELECT request_count FROM ai_chat_daily_limits WHERE telegram_id = 5") == [(0,)]


def test_reset_limit_lets_the_user_send_again_after_the_limit(make_app, sql):
    app = make_app(DAILY_LIMIT="1")
    send(app, telegram_id=5)
    refused = Api(app.test_client()).send(telegram_id=5, message="Ещё?")
    assert refused.status_code == 429

    result = runner_for(app)("reset-limit", "5")

    assert result.exit_code == 0, result.output
    send(app, telegram_id=5, message="Ещё?")
    assert request_count(sql, 5) == 1


def test_reset_limit_of_an_unknown_user_exits_1_and_creates_no_row(run, sql):
    result = run("reset-limit", "404")

    assert result.exit_code == 1
    assert "не найден" in result.stderr
    assert sql("SELECT count(*) FROM ai_chat_daily_limits WHERE telegram_id = 404") == [(0,)]


@pytest.mark.parametrize("telegram_id", ["abc", "0", "-5", str(MAX_BIGINT + 1), "1.5"])
def test_reset_limit_refuses_invalid_telegram_ids(run, telegram_id):
    result = run("reset-limit", telegram_id)

    assert result.exit_code == 2, result.output


# --- stats -----------------------------------------------------------------------


def test_stats_prints_totals_and_todays_quota(app, run, fake_llm):
    fake_llm.script(ok("Первый ответ", tokens=10), ok("Второй ответ", tokens=30))
    send(app, telegram_id=5)
    send(app, telegram_id=5)

    result = run("stats", "5")

    assert result.exit_code == 0, result.output
    assert fields_of(result.output) == {
        "telegram_id": "5",
        "days": "7",
        "total_requests": "2",
        "total_tokens": "40",
        "avg_requests_per_day": "0.29",
        "avg_tokens_per_request": "20.0",
        "total_cost": "0.0",
        "currency": "USD",
        "requests_today": "2",
        "requests_remaining": "28",
        "daily_limit": "30",
        "model gpt-4o-mini": "2 request(s), 40 token(s)",
    }


def test_stats_json_is_one_object_with_the_same_numbers(app, run, fake_llm):
    fake_llm.script(ok("Ответ", tokens=12))
    send(app, telegram_id=5)

    result = run("stats", "5", "--days", "1", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "telegram_id": 5,
        "days": 1,
        "total_requests": 1,
        "total_tokens": 12,
        "avg_requests_per_day": 1.0,
        "avg_tokens_per_request": 12.0,
        "total_cost": 0,
        "currency": "USD",
        "requests_today": 1,
        "requests_remaining": 29,
        "daily_limit": 30,
        "by_model": [{"model": "gpt-4o-mini", "requests": 1, "tokens": 12, "cost": None}],
        "by_tool": {},
    }


@pytest.mark.parametrize(("days", "counted"), [(7, 1), (11, 2), (365, 3)])
def test_stats_counts_only_the_requested_days(run, sql, days, counted):
    for age in (0, 10, 300):
        insert_exchange(sql, NOW - timedelta(days=age), telegram_id=5)

    result = run("stats", "5", "--days", str(days))

    assert result.exit_code == 0, result.output
    assert fields_of(result.output)["total_requests"] == str(counted)


def test_stats_of_an_unknown_user_is_all_zero(run, sql):
    insert_exchange(sql, NOW, telegram_id=1)

    result = run("stats", "999")

    assert result.exit_code == 0, result.output
    fields = fields_of(result.output)
    assert (fields["total_requests"], fields["total_tokens"], fields["requests_today"]) == (
        "0", "0", "0"
    )


@pytest.mark.parametrize("days", ["0", "366", "week"])
def test_stats_refuses_days_out_of_range(run, days):
    result = run("stats", "5", "--days", days)

    assert result.exit_code == 2, result.output


def test_stats_says_unlimited_when_the_quota_is_off(make_app):
    app = make_app(DAILY_LIMIT="0")

    result = runner_for(app)("stats", "5")

    assert result.exit_code == 0, result.output
    assert fields_of(result.output)["requests_remaining"] == "unlimited"


# --- check -----------------------------------------------------------------------


def test_check_passes_against_the_database_and_the_fake_llm(run):
    result = run("check")

    assert result.exit_code == 0, result.output
    lines = check_lines(result.output)
    assert list(lines) == ["config", "database", "schema", "llm openai"]
    assert all(detail.startswith("ok") for detail in lines.values()), result.output
    assert "/v1/models" in lines["llm openai"]


def test_check_fails_when_the_llm_endpoint_is_unreachable(make_app):
    app = make_app(OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1", OPENAI_TIMEOUT="0.5")

    lines, result = failed_check(app)

    assert lines["llm openai"].startswith("FAILED"), result.output
    assert lines["database"].startswith("ok"), result.output
    assert "check failed: llm openai" in result.stderr


def test_check_fails_when_the_llm_is_not_configured(make_app):
    lines, result = failed_check(make_app(OPENAI_BASE_URL="", OPENAI_API_KEY=""))

    assert "LLM not configured" in lines["config"]
    assert lines["llm"].startswith("FAILED"), result.output
    assert "OPENAI_API_KEY" in lines["llm"]


def test_check_fails_when_the_database_is_unreachable(make_app):
    app = make_app(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")

    lines, result = failed_check(app)

    assert lines["database"].startswith("FAILED"), result.output
    assert lines["llm openai"].startswith("ok"), result.output


def test_check_fails_when_the_schema_is_not_migrated(make_app, tmp_path):
    lines, result = failed_check(make_app(DATABASE_URL=f"sqlite:///{tmp_path}/empty.db"))

    assert lines["database"].startswith("ok"), result.output
    assert lines["schema"].startswith("FAILED"), result.output
    assert "db upgrade" in lines["schema"]


def test_check_masks_the_database_password(make_app, database_name):
    # Local PostgreSQL trusts loopback, so the password is ignored and the check passes.
    app = make_app(DATABASE_URL=f"postgresql://postgres:s3cret-pw@127.0.0.1:5432/{database_name}")

    result = runner_for(app)("check")

    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output
    assert "postgres:***@127.0.0.1:5432" in check_lines(result.output)["config"]


def test_check_counts_api_keys_without_printing_any_key(make_app):
    secrets = ("first-key-123", "second-key-456", "admin-key-789", "sk-openai-000")
    app = make_app(
        API_SECRET_KEY=f"{secrets[0]},{secrets[1]}",
        ADMIN_API_KEY=secrets[2],
        OPENAI_API_KEY=secrets[3],
    )

    result = runner_for(app)("check")

    assert result.exit_code == 0, result.output
    assert "2 API key(s), admin key set" in check_lines(result.output)["config"]
    assert not [secret for secret in secrets if secret in result.output]


# --- the real command line ---------------------------------------------------------


def test_flask_command_line_runs_the_chat_commands(database_url, fake_llm, sql):
    insert_exchange(sql, datetime.now(UTC), telegram_id=5, tokens=7)
    env = {
        **os.environ,
        **base_env(database_url, fake_llm.url),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }

    completed = subprocess.run(
        [str(VENV_BIN / "flask"), "--app", "wsgi", "chat", "stats", "5", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 0, completed.stderr
    assert '"total_tokens": 7' in completed.stdout
