"""Operator commands: ``flask --app wsgi chat ...``.

``cleanup`` (history retention); ``reset-limit``, ``stats``, ``usage`` (the
spend report), ``settings``, ``set-limit``, ``set-spend-limit`` and
``set-model`` (the admin use cases of the API, without going through HTTP);
``check`` (configuration and connectivity). Every
command runs inside an application context and exits non-zero when it could
not do what was asked, so cron jobs and deploy scripts can rely on the status.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from sqlalchemy import bindparam, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from app.chat import service
from app.chat.schemas import MAX_BIGINT, MAX_INTEGER, MAX_MONEY, USAGE_GROUPS
from app.errors import ValidationFailed
from app.extensions import db
from app.models import MIGRATION_VERSION_TABLE, UTCDateTime, begin_transaction, ping_database

chat = AppGroup("chat", help="Operator commands of the AI Chat Service.")

TELEGRAM_ID = click.IntRange(1, MAX_BIGINT)
# Seconds the LLM check may take, whatever OPENAI_TIMEOUT says: a check that
# hangs for the production timeout is no use in a deploy script.
LLM_CHECK_TIMEOUT = 5.0

# One batch of the oldest rows, picked through the primary key: old rows have
# the lowest ids, so the scan stops early and each DELETE holds its row locks
# only for one short transaction. The keys go first and explicitly, in the
# same transaction: the foreign key cascades too, but a database the old
# service created may lack it.
_OLD_BATCH = (
    "SELECT id FROM ai_chat_requests WHERE created_at < :cutoff ORDER BY id LIMIT :batch"
)
_DELETE_BATCH_KEYS = text(
    f"DELETE FROM ai_chat_idempotency_keys WHERE chat_request_id IN ({_OLD_BATCH})"
).bindparams(bindparam("cutoff", type_=UTCDateTime()))
_DELETE_BATCH = text(f"DELETE FROM ai_chat_requests WHERE id IN ({_OLD_BATCH})").bindparams(
    bindparam("cutoff", type_=UTCDateTime())
)
# Claims of requests that died before answering are taken over after minutes
# (idempotency.claim_key); past the retention period they are only clutter.
_DELETE_ABANDONED_KEYS = text(
    "DELETE FROM ai_chat_idempotency_keys "
    "WHERE chat_request_id IS NULL AND claimed_at < :cutoff"
).bindparams(bindparam("cutoff", type_=UTCDateTime()))


def delete_exchanges_before(cutoff: datetime, batch_size: int) -> tuple[int, int, int]:
    """Delete exchanges created before ``cutoff``, ``batch_size`` rows per commit.

    Returns (exchanges deleted, idempotency keys deleted, batches).
    """
    exchanges = keys = batches = 0
    params = {"cutoff": cutoff, "batch": batch_size}
    while True:
        begin_transaction()
        keys += db.session.execute(_DELETE_BATCH_KEYS, params).rowcount
        deleted = db.session.execute(_DELETE_BATCH, params).rowcount
        db.session.commit()
        if deleted == 0:
            break
        exchanges += deleted
        batches += 1
        if deleted < batch_size:
            break
    keys += db.session.execute(_DELETE_ABANDONED_KEYS, {"cutoff": cutoff}).rowcount
    db.session.commit()
    return exchanges, keys, batches


@chat.command("cleanup")
@click.option(
    "--older-than-days",
    type=click.IntRange(min=1),
    required=True,
    help="Delete exchanges created more than this many days ago.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=5000,
    show_default=True,
    help="Rows deleted per transaction.",
)
def cleanup(older_than_days: int, batch_size: int) -> None:
    """Delete history older than N days (quota counters stay)."""
    cutoff = current_app.config["CLOCK"]() - timedelta(days=older_than_days)
    exchanges, keys, batches = delete_exchanges_before(cutoff, batch_size)
    click.echo(
        f"Deleted {exchanges} exchange(s) created before {cutoff.isoformat(timespec='seconds')} "
        f"in {batches} batch(es), and {keys} idempotency key(s)."
    )


@chat.command("reset-limit")
@click.argument("telegram_id", type=TELEGRAM_ID)
def reset_limit(telegram_id: int) -> None:
    """Zero the user's counter for today (exit 1: no such user)."""
    result = service.reset_limit(telegram_id)
    click.echo(result["message"], err=not result["success"])
    if not result["success"]:
        raise SystemExit(1)


@chat.command("stats")
@click.argument("telegram_id", type=TELEGRAM_ID)
@click.option("--days", type=click.IntRange(1, 365), default=7, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of lines.")
def stats(telegram_id: int, days: int, as_json: bool) -> None:
    """A user's answers and tokens over --days days, and quota."""
    result = service.stats(telegram_id, days)
    today = service.limits(telegram_id)
    result.update(
        requests_today=today["requests_today"],
        requests_remaining=today["requests_remaining"],
        daily_limit=today["daily_limit"],
    )
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
        return
    by_model, by_tool = result.pop("by_model"), result.pop("by_tool")
    for name, value in result.items():
        click.echo(f"{name}: {'unlimited' if value is None else value}")
    for row in by_model:
        cost = "" if row["cost"] is None else f", {row['cost']} {result['currency']}"
        click.echo(f"model {row['model'] or '(not recorded)'}: "
                   f"{row['requests']} request(s), {row['tokens']} token(s){cost}")
    for tool, answers in by_tool.items():
        click.echo(f"tool {tool}: {answers} answer(s)")


# --- spend ------------------------------------------------------------------------


@chat.command("usage")
@click.option("--from", "first", type=click.DateTime(["%Y-%m-%d"]), required=True,
              help="First quota day (YYYY-MM-DD).")
@click.option("--to", "last", type=click.DateTime(["%Y-%m-%d"]), required=True,
              help="Last quota day, included.")
@click.option("--group-by", type=click.Choice(USAGE_GROUPS), default="day", show_default=True)
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True,
              help="Groups shown (the most expensive first; days in order).")
@click.option("--json", "as_json", is_flag=True, help="The report as the API gives it.")
def usage(first, last, group_by: str, limit: int, as_json: bool) -> None:
    """The spend report: answers, tokens and cost by day, model or user."""
    report = service.usage(first.date(), last.date(), group_by, limit, 0)
    if as_json:
        report = {"from": report.pop("first").isoformat(), "to": report.pop("last").isoformat(),
                  **report}
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    currency = report["currency"]
    click.echo(f"{'':<24} {'answers':>8} {'tokens':>12} {'cost, ' + currency:>14}")
    rows = [*report["rows"], {"key": "total", **report["total"]}]
    for row in rows:
        key = "(not recorded)" if row["key"] is None else str(row["key"])
        cost = "-" if row["cost"] is None else f"{row['cost']:.6f}"
        click.echo(f"{key:<24} {row['answers']:>8} {row['tokens']:>12} {cost:>14}")
    if report["groups"] > len(report["rows"]):
        click.echo(f"({report['groups'] - len(report['rows'])} more group(s): --limit)")


# --- per-user settings -----------------------------------------------------------


def _print_settings(result: dict) -> None:
    click.echo(f"telegram_id: {result['telegram_id']}")
    click.echo(f"preferred_model: {result['preferred_model'] or 'default'}")
    limit = result["daily_limit"]
    shown = "default" if limit is None else ("unlimited" if limit == 0 else limit)
    click.echo(f"daily_limit: {shown}")
    spend = result["daily_spend_limit"]
    click.echo(f"daily_spend_limit: {'default' if spend is None else spend}")
    click.echo(f"models: {', '.join(result['models'])}")


def _update_settings(telegram_id: int, changes: dict) -> None:
    try:
        _print_settings(service.update_user_settings(telegram_id, changes))
    except ValidationFailed as error:
        raise click.UsageError(error.message) from None


@chat.command("settings")
@click.argument("telegram_id", type=TELEGRAM_ID)
def settings(telegram_id: int) -> None:
    """A user's own settings (default = the service's) and the models."""
    _print_settings(service.user_settings(telegram_id))


@chat.command("set-limit")
@click.argument("telegram_id", type=TELEGRAM_ID)
@click.argument("limit")
def set_limit(telegram_id: int, limit: str) -> None:
    """Give the user their own daily limit: N (0 = unlimited) or "default"."""
    if limit == "default":
        value = None
    elif limit.isascii() and limit.isdigit() and int(limit) <= MAX_INTEGER:
        value = int(limit)
    else:
        raise click.BadParameter(
            f"an integer from 0 to {MAX_INTEGER}, or 'default'", param_hint="LIMIT"
        )
    _update_settings(telegram_id, {"daily_limit": value})


@chat.command("set-spend-limit")
@click.argument("telegram_id", type=TELEGRAM_ID)
@click.argument("amount")
def set_spend_limit(telegram_id: int, amount: str) -> None:
    """Cap the user's spend a day: AMOUNT in PRICE_CURRENCY, or "default"."""
    if amount == "default":
        value = None
    else:
        try:
            value = Decimal(amount)
        except InvalidOperation:
            value = None
        # The API's bounds (schemas.money_amount): the column holds no more.
        if value is None or not value.is_finite() or not 0 <= value <= MAX_MONEY:
            raise click.BadParameter(
                f"an amount from 0 to {MAX_MONEY}, or 'default'", param_hint="AMOUNT"
            )
    _update_settings(telegram_id, {"daily_spend_limit": value})


@chat.command("set-model")
@click.argument("telegram_id", type=TELEGRAM_ID)
@click.argument("model")
def set_model(telegram_id: int, model: str) -> None:
    """Set the user's preferred model: a configured MODEL or "default"."""
    _update_settings(telegram_id, {"preferred_model": None if model == "default" else model})


# --- check ---------------------------------------------------------------------


def _reason(error: BaseException) -> str:
    """The error class and the first line of its text, for the operator's eyes.

    Wrapped errors (SQLAlchemy's ``orig``, the openai SDK's "Connection error.")
    are unwrapped: the driver's own text says what is wrong.
    """
    original = getattr(error, "orig", None) or error.__cause__ or error
    first_line = (str(original).strip().splitlines() or [""])[0][:200]
    return f"{type(original).__name__}: {first_line}" if first_line else type(original).__name__


def _check_config() -> tuple[bool, str]:
    config = current_app.config
    llm = current_app.extensions["llm"]
    url = make_url(config["SQLALCHEMY_DATABASE_URI"]).render_as_string(hide_password=True)
    models = (
        f"models {', '.join(f'{m.name}@{m.provider.name}' for m in llm.models.values())} "
        f"(default {llm.default.name}"
        + (f", fallbacks {', '.join(m.name for m in llm.fallbacks)})" if llm.fallbacks else ")")
        if llm.configured
        else "LLM not configured"
    )
    admin = "set" if config["ADMIN_API_KEY"] else "not set"
    return True, (
        f"{len(config['API_KEYS'])} API key(s), admin key {admin}, {models}, "
        f"daily limit {config['DAILY_LIMIT'] or 'unlimited'}, database {url}"
    )


def _check_database() -> tuple[bool, str]:
    try:
        ping_database()
    except SQLAlchemyError as error:
        return False, _reason(error)
    return True, f"SELECT 1 answered ({db.engine.dialect.name})"


def _check_schema() -> tuple[bool, str]:
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    migrate = current_app.extensions["migrate"].migrate
    heads = set(ScriptDirectory.from_config(migrate.get_config()).get_heads())
    try:
        with db.engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"version_table": MIGRATION_VERSION_TABLE}
            )
            current = set(context.get_current_heads())
    except SQLAlchemyError as error:
        return False, _reason(error)
    if current == heads:
        return True, f"migrated to {', '.join(sorted(heads))}"
    found = f"at {', '.join(sorted(current))}" if current else "not migrated"
    return False, (
        f"{found}, head is {', '.join(sorted(heads))}: run `flask --app wsgi db upgrade`"
    )


def _llm_checks() -> list[tuple[str, tuple[bool, str]]]:
    """One check per provider that a configured model uses."""
    llm = current_app.extensions["llm"]
    if not llm.configured:
        return [("llm", (False, "not configured: set OPENAI_API_KEY (OpenAI) or OPENAI_BASE_URL"))]
    timeout = min(llm.settings.timeout, LLM_CHECK_TIMEOUT)
    checks = []
    used = {model.provider.name: model.provider for model in llm.models.values()}
    for name, provider in used.items():
        try:
            result = True, llm.ping(provider, timeout)
        except Exception as error:  # any failure is the check's answer
            result = False, f"{provider.base_url}: {_reason(error)}"
        checks.append((f"llm {name}", result))
    return checks


CHECKS = (
    ("config", _check_config),
    ("database", _check_database),
    ("schema", _check_schema),
)


@chat.command("check")
def check() -> None:
    """Check config, database, schema and every LLM provider."""
    failed = []
    results = [(name, run()) for name, run in CHECKS] + _llm_checks()
    for name, (ok, detail) in results:
        click.echo(f"{name}: {'ok' if ok else 'FAILED'} - {detail}")
        if not ok:
            failed.append(name)
    if failed:
        click.echo(f"check failed: {', '.join(failed)}", err=True)
        raise SystemExit(1)


def init_app(app: Flask) -> None:
    """Register the ``chat`` command group."""
    app.cli.add_command(chat)
