"""Are two indexes worth keeping? Each measured with it and without it (dropped,
measured, built again by its own definition), on a scratch database migrated
to head that holds the history bench/ceiling.py uses (1 000 000 exchanges of
100 000 sellers over 100 days, the oldest with the lowest ids).

1. ``ix_ai_chat_idempotency_keys_chat_request_id``. DELETE /v1/chat/history/<id>
   deletes the user's keys, then their exchanges (app/chat/service.py), in one
   transaction whose statements carry the app's timeouts. Each deleted
   exchange fires the foreign key's ON DELETE CASCADE, a lookup of keys by
   chat_request_id. Measured for a seller with 100 000 exchanges while the
   table holds 100 000 keys of other sellers (on their newest exchanges), and
   for one with 200 exchanges (without the index, its time times 500 says
   what the big one would take if no timeout stopped it). Each
   deletion runs under EXPLAIN ANALYZE (the cascade shows as the trigger's
   time and calls) and is rolled back.
2. ``ix_ai_chat_requests_created_at``. ``flask chat cleanup --older-than-days
   90`` (app/cli.py ``delete_exchanges_before``) deletes the oldest 10 % (about
   100 000 exchanges) in batches of 5 000 picked by ``created_at < cutoff
   ORDER BY id LIMIT 5000``. Measured: EXPLAIN ANALYZE of its first batch
   (rolled back), the whole cleanup (the app's own function in a child
   process, start-up not counted), and EXPLAIN ANALYZE of the batch query
   once nothing is older than the cutoff, which is what a daily cron run
   mostly does. The deleted rows are put back between the two cleanups.

Alone: ``python -m bench.indexes`` (its own scratch database).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg2

from bench import ceiling
from bench.servers import (
    HISTORY_MESSAGE,
    HISTORY_RESPONSE,
    ROOT,
    BenchDatabase,
    admin_connection,
)

KEYS_INDEX = "ix_ai_chat_idempotency_keys_chat_request_id"
CREATED_INDEX = "ix_ai_chat_requests_created_at"
# Sellers outside the history's 1..100 000, so their rows are theirs alone.
HEAVY_USER, HEAVY_ROWS = 900_000_001, 100_000
LIGHT_USER, LIGHT_ROWS = 900_000_002, 200
OTHER_KEYS = 100_000
CLEANUP_DAYS = 90
BATCH = 5000  # the CLI's default --batch-size
# Plan lines worth printing: the scans, the cascade trigger, the time.
_KEY_WORDS = ("Scan", "Limit", "Sort", "Delete on", "Trigger", "Execution Time",
              "Rows Removed", "Nested Loop", "Hash Join", "Hash Semi Join")


@dataclass
class Timed:
    """One measured operation: seconds, or why it has none, and its plan's key lines."""

    seconds: float | None = None
    cancelled: str = ""
    plan: list[str] = field(default_factory=list)
    detail: str = ""  # what was done, for the row's label
    note: str = ""  # said next to the figure


@dataclass
class IndexFigures:
    setup: str
    sizes_mib: dict[str, float] = field(default_factory=dict)
    # measurement name -> {"with": Timed, "without": Timed}
    history: dict[str, dict[str, Timed]] = field(default_factory=dict)
    cleanup: dict[str, dict[str, Timed]] = field(default_factory=dict)
    timeouts: str = ""


def _key_lines(rows) -> list[str]:
    lines = [row[0] for row in rows]
    return [line.rstrip() for line in lines if any(word in line for word in _KEY_WORDS)]


def _execution_ms(plan: list[str]) -> float | None:
    for line in plan:
        if "Execution Time:" in line:
            return float(line.split("Execution Time:")[1].split()[0])
    return None


def _prepare(cursor) -> str:
    """The heavy and the light seller, and the other sellers' keys."""
    now = datetime.now(UTC)
    for user, rows in ((HEAVY_USER, HEAVY_ROWS), (LIGHT_USER, LIGHT_ROWS)):
        # Recent rows (the last 10 days): the cleanup does not touch them.
        cursor.execute(
            """
            INSERT INTO ai_chat_requests (telegram_id, message, response, tokens_used,
                request_date, created_at, model)
            SELECT %(user)s, %(message)s, %(response)s, 300, at::date, at, 'gpt-4o-mini'
            FROM generate_series(1, %(rows)s) AS n,
                 LATERAL (SELECT %(now)s - interval '10 days' * n / %(rows)s) AS t(at)
            """,
            {"user": user, "rows": rows, "now": now, "message": HISTORY_MESSAGE,
             "response": HISTORY_RESPONSE},
        )
    cursor.execute(
        """
        INSERT INTO ai_chat_idempotency_keys (telegram_id, request_id, message_sha256,
            claim_token, claimed_at, chat_request_id)
        SELECT telegram_id, 'bench-' || id, repeat('0', 64), NULL, created_at, id
        FROM ai_chat_requests WHERE telegram_id <= %s ORDER BY id DESC LIMIT %s
        """,
        (ceiling.USERS, OTHER_KEYS),
    )
    cursor.execute("VACUUM ANALYZE")
    return (f"a seller with {HEAVY_ROWS:,} exchanges and one with {LIGHT_ROWS:,}, "
            f"{OTHER_KEYS:,} idempotency keys of other sellers")


def _index_definition(cursor, name: str) -> str:
    cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (name,))
    return cursor.fetchone()[0]


def _sizes(cursor) -> dict[str, float]:
    sizes = {}
    for name in (KEYS_INDEX, CREATED_INDEX):
        cursor.execute("SELECT pg_relation_size(%s::regclass)", (name,))
        sizes[name] = cursor.fetchone()[0] / 1024 / 1024
    return sizes


def _delete_history(connection, user: int, timeouts: str) -> Timed:
    """The endpoint's two statements with the app's timeouts, under EXPLAIN
    ANALYZE, in one transaction that is rolled back."""
    timed = Timed()
    cursor = connection.cursor()
    cursor.execute("BEGIN")
    started = time.perf_counter()
    try:
        cursor.execute(timeouts + "DELETE FROM ai_chat_idempotency_keys WHERE telegram_id = %s",
                       (user,))
        cursor.execute(timeouts + "EXPLAIN ANALYZE DELETE FROM ai_chat_requests "
                       "WHERE telegram_id = %s", (user,))
        timed.plan = _key_lines(cursor.fetchall())
        timed.seconds = time.perf_counter() - started
    except psycopg2.errors.QueryCanceled as error:
        timed.cancelled = (f"cancelled after {time.perf_counter() - started:.1f} s: "
                           f"{str(error).splitlines()[0]}")
    finally:
        cursor.execute("ROLLBACK")
    return timed


def _measure_history(figures: IndexFigures, database: BenchDatabase, timeouts: str) -> None:
    with closing(admin_connection(database.name)) as connection:
        cursor = connection.cursor()
        definition = _index_definition(cursor, KEYS_INDEX)
        heavy, light = f"{HEAVY_ROWS:,} exchanges", f"{LIGHT_ROWS:,} exchanges"
        figures.history[heavy] = {"with": _delete_history(connection, HEAVY_USER, timeouts)}
        figures.history[light] = {"with": _delete_history(connection, LIGHT_USER, timeouts)}
        cursor.execute(f'DROP INDEX "{KEYS_INDEX}"')
        try:
            # Without the app's timeouts: this one is there to be extrapolated.
            without = _delete_history(connection, LIGHT_USER, "")
            without.note = "no statement_timeout"
            figures.history[light]["without"] = without
            figures.history[heavy]["without"] = _delete_history(connection, HEAVY_USER, timeouts)
            if without.seconds:
                estimate = without.seconds * HEAVY_ROWS / LIGHT_ROWS
                figures.history[heavy]["without"].note = (
                    f"~{estimate:.0f} s if no timeout stopped it (the {LIGHT_ROWS:,}-exchange "
                    f"seller's time x {HEAVY_ROWS // LIGHT_ROWS})"
                )
        finally:
            cursor.execute(definition)


def _cleanup_batch(connection, cutoff: datetime, delete: bool) -> Timed:
    """EXPLAIN ANALYZE of the cleanup's batch: the DELETE (rolled back) or its SELECT."""
    from app import cli

    query = cli._OLD_BATCH.replace(":cutoff", "%(cutoff)s").replace(":batch", "%(batch)s")
    if delete:
        query = f"DELETE FROM ai_chat_requests WHERE id IN ({query})"
    cursor = connection.cursor()
    cursor.execute("BEGIN")
    try:
        cursor.execute("EXPLAIN ANALYZE " + query, {"cutoff": cutoff, "batch": BATCH})
        plan = _key_lines(cursor.fetchall())
    finally:
        cursor.execute("ROLLBACK")
    return Timed(seconds=(_execution_ms(plan) or 0) / 1000, plan=plan)


_CLEANUP_CHILD = """
import json, sys, time
from datetime import datetime
from app import create_app
from app.cli import delete_exchanges_before
app = create_app()
with app.app_context():
    started = time.perf_counter()
    exchanges, keys, batches = delete_exchanges_before(datetime.fromisoformat(sys.argv[1]),
                                                       int(sys.argv[2]))
    print(json.dumps({"seconds": time.perf_counter() - started, "exchanges": exchanges,
                      "keys": keys, "batches": batches}))
"""


def _cleanup_total(database: BenchDatabase, cutoff: datetime) -> Timed:
    """What ``flask chat cleanup`` runs, in a child process (the app stays out of
    this one), timed from its first batch to its end."""
    env = {**os.environ, "DATABASE_URL": database.url, "API_SECRET_KEY": "bench",
           "LOG_LEVEL": "WARNING", "AI_CHAT_ENV_FILE": os.devnull}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the child's metrics need no files
    done = subprocess.run(
        [sys.executable, "-c", _CLEANUP_CHILD, cutoff.isoformat(), str(BATCH)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    if done.returncode != 0:
        return Timed(cancelled=f"failed: {done.stderr.strip().splitlines()[-1][:200]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Timed(seconds=result["seconds"],
                 detail=f"{result['exchanges']:,} exchanges in {result['batches']} batches")


def _measure_cleanup(figures: IndexFigures, database: BenchDatabase) -> None:
    cutoff = datetime.now(UTC) - timedelta(days=CLEANUP_DAYS)
    first, total, empty = "first batch (DELETE)", "whole cleanup", "batch with nothing to delete"
    for name in (first, total, empty):
        figures.cleanup[name] = {}
    with closing(admin_connection(database.name)) as connection:
        cursor = connection.cursor()
        definition = _index_definition(cursor, CREATED_INDEX)
        # The rows the cleanup deletes, to put them back between the two runs.
        cursor.execute("CREATE TABLE bench_old_exchanges AS SELECT * FROM ai_chat_requests "
                       "WHERE created_at < %s", (cutoff,))
        try:
            for state in ("with", "without"):
                if state == "without":
                    cursor.execute("INSERT INTO ai_chat_requests SELECT * FROM "
                                   "bench_old_exchanges ON CONFLICT (id) DO NOTHING")
                    cursor.execute(f'DROP INDEX "{CREATED_INDEX}"')
                cursor.execute("VACUUM ANALYZE ai_chat_requests")
                figures.cleanup[first][state] = _cleanup_batch(connection, cutoff, delete=True)
                figures.cleanup[total][state] = _cleanup_total(database, cutoff)
                cursor.execute("VACUUM ANALYZE ai_chat_requests")
                figures.cleanup[empty][state] = _cleanup_batch(connection, cutoff, delete=False)
        finally:
            cursor.execute("DROP TABLE IF EXISTS bench_old_exchanges")
            cursor.execute(f"{definition.replace('CREATE INDEX', 'CREATE INDEX IF NOT EXISTS')}")


def run(database: BenchDatabase, setup: str) -> IndexFigures:
    """Both measurements on ``database``, prepared by ``ceiling.prepare``."""
    from app.config import load_config

    timeouts = load_config({"API_SECRET_KEY": "bench", "DATABASE_URL": database.url})[
        "SQL_TIMEOUTS"]
    with closing(admin_connection(database.name)) as connection:
        cursor = connection.cursor()
        figures = IndexFigures(f"{setup}; {_prepare(cursor)}", _sizes(cursor))
    figures.timeouts = timeouts.strip()
    _measure_history(figures, database, timeouts)
    print("bench: history deletion measured", flush=True)
    _measure_cleanup(figures, database)
    print("bench: cleanup measured", flush=True)
    return figures


def _time(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1000:.3f} ms"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _trigger(plan: list[str]) -> str:
    """"cascade 639 ms, 100000 calls" from EXPLAIN ANALYZE's trigger line."""
    for line in plan:
        if line.startswith("Trigger for constraint"):
            fields = dict(part.split("=") for part in line.split(": ", 1)[1].split())
            return f"cascade {float(fields['time']):.0f} ms, {fields['calls']} calls"
    return ""


def _cell(timed: Timed | None) -> str:
    if timed is None:
        return "–"
    if timed.cancelled:
        text = timed.cancelled
    else:
        text = _time(timed.seconds)
        if _trigger(timed.plan):
            text += f" ({_trigger(timed.plan)})"
    return text + (f"; {timed.note}" if timed.note else "")


def _ratio(slow: Timed | None, fast: Timed | None) -> float | None:
    if not slow or not fast or not slow.seconds or not fast.seconds:
        return None
    return slow.seconds / fast.seconds


def _conclusions(figures: IndexFigures) -> list[str]:
    heavy = figures.history.get(f"{HEAVY_ROWS:,} exchanges", {})
    lines = []
    with_, without = heavy.get("with"), heavy.get("without")
    ratio = _ratio(without, with_)
    if with_ and without and (without.cancelled or (ratio and ratio >= 2)):
        lines.append(
            f"- `{KEYS_INDEX}`: **worth it.** Deleting the history of a seller with "
            f"{HEAVY_ROWS:,} exchanges takes {_cell(with_)} with it; without it every "
            "deleted exchange scans the whole keys table for the cascade, and the "
            + ("request is cancelled by the app's statement_timeout (the endpoint fails)"
               if without.cancelled else f"deletion takes {ratio:.0f}x as long")
            + f". It costs {figures.sizes_mib.get(KEYS_INDEX, 0):.1f} MiB here."
        )
    elif with_ and without:
        lines.append(f"- `{KEYS_INDEX}`: not clearly worth it here ({_cell(with_)} with it, "
                     f"{_cell(without)} without).")
    cleanup = figures.cleanup
    total = cleanup.get("whole cleanup", {})
    empty = cleanup.get("batch with nothing to delete", {})
    first = cleanup.get("first batch (DELETE)", {})
    measured = [pair.get(state) for pair in (total, empty) for state in ("with", "without")]
    if not all(timed and timed.seconds is not None for timed in measured):
        lines.append(f"- `{CREATED_INDEX}`: not concluded, a cleanup measurement failed.")
    else:
        total_ratio = _ratio(total["without"], total["with"])
        used = any(CREATED_INDEX in line for line in first["with"].plan) if first.get(
            "with") else False
        worth = (total_ratio or 0) >= 1.5 or (empty["without"].seconds or 0) >= 1.0
        lines.append(
            f"- `{CREATED_INDEX}`: "
            + ("**worth it**" if worth else "**not needed by the cleanup**")
            + f". The whole cleanup takes {_cell(total['with'])} with it and "
            f"{_cell(total['without'])} without; its first batch "
            + ("uses the index" if used else "walks the id order (the oldest exchanges have "
               "the lowest ids) whether the index exists or not")
            + f"; the look for more old rows once none is left takes {_cell(empty['with'])} "
            f"with it and {_cell(empty['without'])} without (once per cleanup run). It costs "
            f"{figures.sizes_mib.get(CREATED_INDEX, 0):.1f} MiB here and an index entry on "
            "every saved answer."
        )
    return lines


def table(figures: IndexFigures) -> list[str]:
    """The RESULTS.md section: the timings, the plans' key lines, the conclusions."""
    lines = [
        f"Scratch database migrated to head; {figures.setup}. Each index dropped for its "
        "\"without\" measurements and built again after them. History deletion: the "
        f"endpoint's two statements with the app's timeouts (`{figures.timeouts}`) under "
        "EXPLAIN ANALYZE, rolled back. Cleanup: `chat cleanup --older-than-days "
        f"{CLEANUP_DAYS}` with the CLI's batch of {BATCH:,} (the app's "
        "`delete_exchanges_before` in a child process, start-up not counted); the deleted "
        "rows are put back and the table vacuumed before the second run.",
        "",
        "| measurement | with the index | without it |",
        "|---|---|---|",
    ]
    for name, pair in figures.history.items():
        lines.append(f"| DELETE /v1/chat/history of a seller with {name} | "
                     f"{_cell(pair.get('with'))} | {_cell(pair.get('without'))} |")
    for name, pair in figures.cleanup.items():
        detail = pair.get("with").detail if pair.get("with") else ""
        lines.append(f"| cleanup: {name}{f' ({detail})' if detail else ''} "
                     f"| {_cell(pair.get('with'))} | {_cell(pair.get('without'))} |")
    lines += ["", "Index sizes: " + ", ".join(f"`{name}` {size:.1f} MiB"
                                             for name, size in figures.sizes_mib.items()), ""]
    lines += ["Key lines of the plans:", ""]
    for title, group in (("history", figures.history), ("cleanup", figures.cleanup)):
        for name, pair in group.items():
            for state in ("with", "without"):
                timed = pair.get(state)
                if timed is None or not timed.plan:
                    continue
                lines += [f"{title}, {name}, {state} the index:", "", "```",
                          *timed.plan, "```", ""]
    lines += ["Conclusions:", "", *_conclusions(figures)]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.indexes",
                                     description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    database = BenchDatabase()
    try:
        figures = run(database, ceiling.prepare(database))
    finally:
        database.drop()
    print("\n".join(table(figures)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
