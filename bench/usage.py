"""The spend report over a million model calls: ``GET /v1/chat/usage`` timed
by day, by model and by user (its first page), over a range that covers every
row and over one day, with the plans of its statements.

The scratch database is bench/ceiling.py's (1 000 000 exchanges of 100 000
sellers over 100 days); ``ai_chat_llm_calls`` gets one row per exchange
(``CALLS`` in all): most of them answers, some tool rounds and summaries, of
three models, with tokens and a cost, on the exchange's day. Each request
runs through the app itself (its Flask test client, in a child process, so
that this process never imports the app's metrics) with the admin key;
``REPEAT`` times each, the median is the figure. The plans are ``EXPLAIN
(ANALYZE, BUFFERS)`` of the very statements the app sends (their text
printed by the child), run here.

Alone: ``python -m bench.usage`` (its own scratch database).
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
from datetime import date

from bench import ceiling
from bench.servers import ROOT, BenchDatabase, admin_connection

CALLS = 1_000_000
REPEAT = 5
TARGET_MS = 500.0
GROUPS = ("day", "model", "user")
ADMIN_KEY = "bench-admin-key"

# In the child: the app against the scratch database, each request REPEAT
# times (milliseconds), and the PostgreSQL text of each grouping's statement.
_CHILD = r"""
import json, sys, time
from app import create_app
from app.chat import service
ranges = json.loads(sys.argv[1])
repeat, key = int(sys.argv[2]), sys.argv[3]
app = create_app({"LOG_LEVEL": "WARNING"})
client = app.test_client()
out = {"sql": {g: service.USAGE[g].sql["postgresql"] for g in service.USAGE},
       "timeouts": app.config["SQL_TIMEOUTS"], "times": {}}
for label, (first, last) in ranges.items():
    for group in ("day", "model", "user"):
        url = f"/v1/chat/usage?from={first}&to={last}&group_by={group}"
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            response = client.get(url, headers={"X-API-KEY": key})
            times.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise SystemExit(f"{url}: {response.status_code} {response.get_data(True)[:300]}")
        body = response.get_json()
        out["times"][f"{label}|{group}"] = {"ms": times, "groups": body["groups"],
                                            "rows": len(body["rows"])}
print(json.dumps(out))
"""


@dataclass
class UsageFigures:
    setup: str
    ranges: dict[str, tuple[str, str]] = field(default_factory=dict)
    # "<range>|<group>" -> {"ms": [...], "groups": n, "rows": n}
    times: dict[str, dict] = field(default_factory=dict)
    plans: dict[str, list[str]] = field(default_factory=dict)
    indexes: list[str] = field(default_factory=list)
    error: str = ""

    def median_ms(self, key: str) -> float | None:
        values = sorted(self.times.get(key, {}).get("ms", []))
        return values[(len(values) - 1) // 2] if values else None


def load_calls(database: BenchDatabase) -> tuple[str, date, date]:
    """One call per exchange into ai_chat_llm_calls (the secondary indexes
    dropped for the load and built again after it, as load_history does)."""
    with closing(admin_connection(database.name)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = "
                       "'ai_chat_llm_calls' AND indexname <> 'ai_chat_llm_calls_pkey'")
        indexes = cursor.fetchall()
        for name, _ in indexes:
            cursor.execute(f'DROP INDEX "{name}"')
        cursor.execute("SET synchronous_commit = off")
        cursor.execute(
            """
            INSERT INTO ai_chat_llm_calls (telegram_id, chat_request_id, purpose, model,
                prompt_tokens, completion_tokens, cost, usage_date, created_at)
            SELECT telegram_id, id,
                   CASE WHEN id %% 20 = 0 THEN 'summary' WHEN id %% 10 = 1 THEN 'tool_round'
                        ELSE 'answer' END,
                   (ARRAY['gpt-4o-mini', 'gpt-4o', 'claude-haiku'])[1 + id %% 3],
                   800 + id %% 400, 200 + id %% 100,
                   ((800 + id %% 400) * 0.15 + (200 + id %% 100) * 0.60) / 1000000,
                   request_date, created_at
            FROM ai_chat_requests ORDER BY id LIMIT %s
            """,
            (CALLS,),
        )
        loaded = cursor.rowcount
        for _, definition in indexes:
            cursor.execute(definition)
        cursor.execute("SELECT min(usage_date), max(usage_date) FROM ai_chat_llm_calls")
        first, last = cursor.fetchone()
    return f"{loaded:,} calls over {first} … {last}", first, last


def vacuum(database: BenchDatabase, tries: int = 15) -> float:
    """VACUUM ANALYZE the calls until the visibility map covers (almost) every
    page, and return the share it covers. An index-only scan skips the table
    only for pages marked all-visible, and VACUUM cannot mark pages while an
    older transaction is open: on a PostgreSQL shared with other work the
    first VACUUM may leave the map empty, and the planner then prices the
    covering index like a plain one (and may pick another plan)."""
    share = 0.0
    with closing(admin_connection(database.name)) as connection, connection.cursor() as cursor:
        for attempt in range(tries):
            cursor.execute("VACUUM ANALYZE ai_chat_llm_calls")
            cursor.execute("SELECT relallvisible::float / greatest(relpages, 1) FROM pg_class "
                           "WHERE relname = 'ai_chat_llm_calls'")
            share = cursor.fetchone()[0]
            if share >= 0.99:
                break
            time.sleep(2.0 + attempt)
    return share


def _explain(database: BenchDatabase, sql: str, params: dict) -> list[str]:
    with closing(admin_connection(database.name)) as connection, connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
        return [row[0] for row in cursor.fetchall()]


def _index_list(database: BenchDatabase) -> list[str]:
    with closing(admin_connection(database.name)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'ai_chat_llm_calls' "
                       "ORDER BY indexname")
        return [row[0] for row in cursor.fetchall()]


def measure(database: BenchDatabase, setup: str, first: date, last: date) -> UsageFigures:
    """The report's requests through the app, and the plans of its statements
    (after a VACUUM that marks the table's pages all-visible)."""
    middle = first + (last - first) / 2
    ranges = {"all": (first.isoformat(), last.isoformat()),
              "one day": (middle.isoformat(), middle.isoformat())}
    visible = vacuum(database)
    result = UsageFigures(f"{setup}; {visible:.0%} of the table's pages all-visible", ranges)
    env = {**os.environ, "DATABASE_URL": database.url, "API_SECRET_KEY": "bench",
           "ADMIN_API_KEY": ADMIN_KEY, "LOG_LEVEL": "WARNING", "AI_CHAT_ENV_FILE": os.devnull}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(ranges), str(REPEAT),
                           ADMIN_KEY],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        result.error = (done.stderr or done.stdout)[-1500:]
        return result
    out = json.loads(done.stdout.strip().splitlines()[-1])
    result.times = out["times"]
    for label, (first_day, last_day) in ranges.items():
        for group in GROUPS:
            params = {"first": date.fromisoformat(first_day), "last": date.fromisoformat(last_day),
                      "limit": 100, "offset": 0}
            result.plans[f"{label}|{group}"] = _explain(database, out["sql"][group], params)
    result.indexes = _index_list(database)
    return result


# Migration 0007 made the (telegram_id, usage_date) index covering; "before"
# puts 0006's plain index back for a measurement, then restores 0007's.
COVER = "ix_ai_chat_llm_calls_telegram_id_usage_date_cover"
PLAIN = "ix_ai_chat_llm_calls_telegram_id_usage_date"


def _swap(database: BenchDatabase, drop: str, create: str) -> None:
    with closing(admin_connection(database.name)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (COVER,))
        row = cursor.fetchone()
        if row is None and drop == COVER:
            raise RuntimeError(f"{COVER} is missing: is the database at head?")
        cursor.execute(f'DROP INDEX IF EXISTS "{drop}"')
        cursor.execute(create)


def run(database: BenchDatabase) -> dict[str, UsageFigures]:
    """On a database that holds bench/ceiling.py's exchanges: at head, and
    with the index of migration 0006 instead of 0007's ("before 0007")."""
    setup, first, last = load_calls(database)
    results = {"head": measure(database, setup, first, last)}
    cover = next((d for d in results["head"].indexes if f" {COVER} " in d), None)
    if cover is None:
        return results
    _swap(database, COVER, f"CREATE INDEX {PLAIN} ON ai_chat_llm_calls (telegram_id, usage_date)")
    try:
        results["before 0007"] = measure(database, setup, first, last)
    finally:
        _swap(database, PLAIN, cover)
    return results


def console_lines(results: dict[str, UsageFigures]) -> list[str]:
    lines = []
    for schema, result in results.items():
        if result.error:
            lines.append(f"usage ({schema}): failed: {result.error[-300:]}")
            continue
        lines += [f"usage ({schema}) {key}: median {result.median_ms(key):.1f} ms "
                  f"({result.times[key]['groups']} groups)" for key in result.times]
    return lines


def table(results: dict[str, UsageFigures] | str | None) -> list[str]:
    if results is None:
        return ["Not run."]
    if isinstance(results, str):
        return [results]
    lines = [
        "Scratch database: one model call per exchange of the ceiling's "
        f"history (bench/ceiling.py; 1 in 20 a summary, 1 in 10 a tool round, three "
        f"models). `GET /v1/chat/usage` through the app (Flask test client, admin key, "
        f"first page of 100), {REPEAT} times each; the median and the fastest. Target: "
        f"≤ {TARGET_MS:.0f} ms. \"before 0007\": the same with migration 0006's plain "
        f"`{PLAIN}` in place of 0007's covering `{COVER}`.",
        "",
        *[f"- {schema}: {result.setup}" for schema, result in results.items()],
        "",
        "| schema | range | group_by | groups | median ms | fastest ms | target |",
        "|---|---|---|--:|--:|--:|---|",
    ]
    for schema, result in results.items():
        if result.error:
            lines.append(f"| {schema} | failed: `{result.error[-300:]}` | | | | | |")
            continue
        for key, figures in result.times.items():
            label, group = key.split("|")
            first, last = result.ranges[label]
            median = result.median_ms(key)
            lines.append(
                f"| {schema} | {label} ({first} … {last}) | {group} | {figures['groups']} "
                f"| {median:.1f} | {min(figures['ms']):.1f} "
                f"| {'met' if median <= TARGET_MS else '**NOT met**'} |"
            )
    for schema, result in results.items():
        if result.error:
            continue
        lines += ["", f"Indexes of `ai_chat_llm_calls` ({schema}):", "",
                  *[f"- `{definition}`" for definition in result.indexes], "",
                  f"Plans ({schema}; `EXPLAIN (ANALYZE, BUFFERS)` of the app's statement"
                  + ("" if schema == "head" else "; the one that uses the changed index")
                  + "):", ""]
        for key, plan in result.plans.items():
            if schema != "head" and key != "all|user":
                continue  # the other plans do not use the index 0007 changed
            label, group = key.split("|")
            lines += [f"{schema}, {label}, by {group}:", "", "```", *plan, "```", ""]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.usage",
                                     description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    database = BenchDatabase()
    try:
        print(f"bench: database loaded: {ceiling.prepare(database)}", flush=True)
        result = run(database)
    finally:
        database.drop()
    print("\n".join(console_lines(result)))
    print("\n".join(table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
