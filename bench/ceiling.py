"""The ceiling of one PostgreSQL for the service's hot path, measured with pgbench.

Two custom scripts, generated at every run from the app's own statements so
that they cannot drift from what the service sends (bench/out/pgbench/*.sql hold
the scripts of the last run; run them by hand with the command in their
header):

- reserve.sql: the reservation alone (app/chat/quota.py ``_RESERVE_PG``: the
  counter, the user's settings and the context, one statement);
- answer.sql: what one answered send asks of the database: the reservation,
  then the save (app/chat/records.py ``SAVE``: the exchange, its model call
  and the day's spend, one statement), two round trips. One pgbench transaction is one answer.

Each query goes as the app sends it: prefixed with the app's ``SET LOCAL``
timeouts in one simple-protocol query string (``-M simple``; pgbench's ``\\;``
keeps the three statements one query), so it is one implicit transaction,
values rendered by psycopg2 as the app's driver renders them. telegram_id is
random over ``USERS`` sellers who all have history (the context read finds
their last exchanges) and yesterday's counter (the first reservation restarts
it, later ones bump it), in the 1 000 000-exchange database that
bench/indexes.py uses too.

1 and 50 clients connect directly. 200 clients cannot (max_connections 100,
less what else is connected), so they go through a throwaway PgBouncer in
transaction pooling mode with a server pool of 20 (tests/pgbouncer.py), the
set-up the README recommends for many instances; 50 clients through it too,
to tell the bouncer's cost from the clients'. pgbench and PgBouncer share the
two cores with PostgreSQL: the figures are what this box does, CPU per
transaction is what scales to a bigger one.

Alone: ``python -m bench.ceiling [--seconds 10]`` (its own scratch database).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from psycopg2.extensions import AsIs

from bench import system
from bench.servers import (
    ADMIN_DSN,
    HISTORY_MESSAGE,
    HISTORY_RESPONSE,
    BenchDatabase,
    admin,
    admin_connection,
    max_connections,
)
from bench.stats import percentile

BENCH_DIR = Path(__file__).resolve().parent
# Generated, like every output of a run: bench/out/ is not tracked.
OUT_DIR = BENCH_DIR / "out"
SCRIPTS_DIR = OUT_DIR / "pgbench"
USERS = 100_000
HISTORY_ROWS = 1_000_000
HISTORY_DAYS = 100
# (script, clients, how the clients connect)
RUNS = (
    ("reserve", 1, "direct"),
    ("reserve", 50, "direct"),
    ("reserve", 200, "pgbouncer"),
    ("answer", 1, "direct"),
    ("answer", 50, "direct"),
    ("answer", 50, "pgbouncer"),
    ("answer", 200, "pgbouncer"),
)
BOUNCER_POOL = 20
# An answer of a real model's length (no semicolons: see bench/servers.py).
ANSWER = " ".join([HISTORY_RESPONSE] * 5)
# Connections left free for everyone else when checking that 50 fit.
SPARE_CONNECTIONS = 5


@dataclass
class Run:
    script: str
    clients: int
    via: str
    seconds: float = 0.0
    tps: float | None = None
    transactions: int = 0
    failed: int = 0
    latency_avg: float | None = None
    latency_p50: float | None = None
    latency_p99: float | None = None
    cpu_ms: dict[str, float | None] = field(default_factory=dict)
    machine_busy: float | None = None
    other_load: float | None = None
    note: str = ""


@dataclass
class Ceiling:
    runs: list[Run]
    setup: str
    scripts: dict[str, Path]
    seconds: float
    max_connections: int


def pgbench_binary() -> str | None:
    """BENCH_PGBENCH, pgbench on PATH, or the newest /usr/lib/postgresql/*/bin/pgbench."""
    found = os.environ.get("BENCH_PGBENCH") or shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"),
                        key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit()
                        else 0)
    return candidates[-1] if candidates else None


def _pgbench_query(cursor, sql: str, params: dict) -> str:
    """One query of a pgbench script: rendered by psycopg2 as the app's driver
    renders it, ``:telegram_id`` left for pgbench, semicolons escaped so that
    the timeouts and the statement stay one query."""
    text = cursor.mogrify(sql, {**params, "telegram_id": AsIs(":telegram_id")}).decode()
    return text.strip().replace(";", "\\;") + ";\n"


def write_scripts(database_url: str) -> dict[str, Path]:
    """reserve.sql and answer.sql from the app's statements and default settings."""
    from decimal import Decimal

    from app.chat import memory, quota, records
    from app.config import load_config

    config = load_config({"API_SECRET_KEY": "bench", "DATABASE_URL": database_url})
    day = quota.Day(now=datetime.now(UTC), timezone=config["TIMEZONE"])
    for text in (HISTORY_MESSAGE, ANSWER):
        assert ";" not in text, "a semicolon would end the pgbench command"
    prefix = config["SQL_TIMEOUTS"]
    # As a send at the defaults asks: no spend cap, the memory read with it.
    limits = quota.Limits(config["DAILY_LIMIT"], config["DAILY_SPEND_LIMIT"], Decimal(0))
    fold = memory.fold_offset(config) if config["SUMMARY_ENABLED"] else None
    reserve_params = quota.reservation_params(0, day, limits, config["CONTEXT_MESSAGES"], fold)
    values = {"telegram_id": 0, "user_id": None, "message": HISTORY_MESSAGE,
              "response": ANSWER, "tokens_used": 300, "request_date": day.today,
              "created_at": day.now, "model": "gpt-4o-mini", "tools": "",
              "prompt_tokens": 200, "completion_tokens": 100, "cost": None}
    call = records.Call("answer", "gpt-4o-mini", 200, 100, None)
    save_params = records.save_params(values, [call], Decimal(0))
    with closing(admin_connection()) as connection:
        cursor = connection.cursor()
        reserve = _pgbench_query(cursor, prefix + quota._RESERVE_PG.sql["postgresql"],
                                 reserve_params)
        save = _pgbench_query(cursor, prefix + records.SAVE.sql["postgresql"], save_params)
    head = (
        "-- Generated by bench/ceiling.py (do not edit: every run rewrites it) from\n"
        "-- {what}\n"
        "-- and the app's default settings (DAILY_LIMIT, CONTEXT_MESSAGES,\n"
        "-- DB_STATEMENT_TIMEOUT, DB_LOCK_TIMEOUT); today's date and time are fixed\n"
        "-- at generation. By hand, on a database prepared as bench/ceiling.py does:\n"
        "--   pgbench -n -M simple -c 50 -j 2 -T 10 -f bench/out/pgbench/{name}.sql <database>\n"
        f"\\set telegram_id random(1, {USERS})\n"
    )
    SCRIPTS_DIR.mkdir(parents=True, exist_ok=True)
    scripts = {
        "reserve": head.format(what="app/chat/quota.py _RESERVE_PG", name="reserve") + reserve,
        "answer": head.format(what="app/chat/quota.py _RESERVE_PG, app/chat/records.py SAVE",
                              name="answer") + reserve + save,
    }
    paths = {}
    for name, text in scripts.items():
        paths[name] = SCRIPTS_DIR / f"{name}.sql"
        paths[name].write_text(text)
    return paths


def prepare(database: BenchDatabase) -> str:
    """The history and yesterday's counters of USERS sellers; what was loaded."""
    seconds = database.load_history(HISTORY_ROWS, USERS, HISTORY_DAYS)
    admin(
        "INSERT INTO ai_chat_daily_limits (telegram_id, request_count, "
        "last_reset_date, created_at, updated_at) SELECT n, 3, %s, now(), now() "
        "FROM generate_series(1, %s) AS n",
        (datetime.now(UTC).date() - timedelta(days=2), USERS), dbname=database.name,
    )
    admin("VACUUM ANALYZE ai_chat_daily_limits", dbname=database.name)
    return (f"{HISTORY_ROWS:,} exchanges of {USERS:,} sellers over {HISTORY_DAYS} days and "
            f"a counter per seller from an earlier day (loaded in {seconds:.0f} s)")


def _free_connections() -> int:
    return admin("SELECT current_setting('max_connections')::int - count(*) "
                 "FROM pg_stat_activity WHERE backend_type = 'client backend'")[0]


def _log_lines(prefix: Path) -> list[tuple[float, float | None]]:
    """(completion time as epoch seconds, latency ms or None when it failed)
    of every transaction in pgbench's per-transaction logs."""
    lines = []
    for path in glob.glob(f"{prefix}.*"):
        with open(path) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) < 6:
                    continue
                done = int(parts[4]) + int(parts[5]) / 1e6
                lines.append((done, float(parts[2]) / 1000 if parts[2].isdigit() else None))
        os.remove(path)
    return lines


def _summary_value(output: str, label: str) -> str | None:
    for line in output.splitlines():
        if line.startswith(label):
            return line[len(label):].strip()
    return None


def run_one(executable: str, database: str, script: Path, clients: int, seconds: float,
            dsn: dict, bouncer_pid: int | None, run: Run) -> Run:
    """One pgbench run; CPU sampled inside it, from 1.5 s in to 1 s before its end,
    while every backend is alive (an exited process takes its CPU time with it)."""
    prefix = OUT_DIR / f"pgbench-{run.script}-{clients}-{run.via}"
    command = [
        executable, "-n", "-M", "simple", "-c", str(clients), "-j", str(min(2, clients)),
        "-T", str(int(seconds)), "-f", str(script), "-l", "--log-prefix", str(prefix),
        "-h", dsn["host"], "-p", dsn["port"], "-U", dsn["user"], database,
    ]
    admin("CHECKPOINT")
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=OUT_DIR)

    def groups():
        found = {"postgres": system.postgres_pids(database), "pgbench": [process.pid]}
        if bouncer_pid is not None:
            found["pgbouncer"] = [bouncer_pid]
        return found

    first_at, last_at = started + 1.5, started + max(2.5, seconds - 1.0)
    time.sleep(max(0.0, first_at - time.time()))
    first = system.snapshot(time.time(), groups())
    time.sleep(max(0.0, last_at - time.time()))
    last = system.snapshot(time.time(), groups())
    try:
        output, errors = process.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        output, errors = process.communicate()
        run.note = "pgbench did not finish in time"
    lines = _log_lines(prefix)
    latencies = [latency for _, latency in lines if latency is not None]
    in_window = sum(1 for done, latency in lines
                    if latency is not None and first.at <= done <= last.at)
    cpu = system.cpu_between(first, last)
    run.seconds = seconds
    run.transactions = len(latencies)
    run.failed = len(lines) - len(latencies)
    tps = _summary_value(output, "tps = ")
    run.tps = float(tps.split()[0]) if tps else None
    average = _summary_value(output, "latency average = ")
    run.latency_avg = float(average.split()[0]) if average else None
    run.latency_p50 = percentile(latencies, 0.50)
    run.latency_p99 = percentile(latencies, 0.99)
    for group in ("postgres", "pgbench", "pgbouncer"):
        if group in cpu:
            run.cpu_ms[group] = cpu[group] * 1000 / in_window if in_window else None
    run.machine_busy = cpu.get("machine_busy_share")
    run.other_load = cpu.get("other_share")
    if process.returncode != 0:
        aborted = [line for line in errors.splitlines() if "error" in line.lower()]
        run.note = (f"pgbench exited with {process.returncode}: "
                    + " / ".join(aborted[:2])[:300])
    return run


def run(database: BenchDatabase, setup: str, seconds: float = 10.0) -> Ceiling | str:
    """Every run of RUNS on ``database``, prepared with ``prepare`` (``setup``
    says what it holds)."""
    executable = pgbench_binary()
    if executable is None:
        return "pgbench is not installed (PostgreSQL's client tools); ceiling skipped."
    from tests import pgbouncer

    OUT_DIR.mkdir(exist_ok=True)
    scripts = write_scripts(database.url)
    dsn = {"host": "127.0.0.1", "port": "5432", "user": "postgres",
           **dict(item.split("=", 1) for item in ADMIN_DSN.split())}
    runs = []
    for via in ("direct", "pgbouncer"):
        chosen = [(script, clients) for script, clients, how in RUNS if how == via]
        reason = pgbouncer.unavailable_reason() if via == "pgbouncer" else None
        bouncer = None if reason else (
            pgbouncer.PgBouncer(pool_size=BOUNCER_POOL) if via == "pgbouncer" else None
        )
        with bouncer if bouncer is not None else nullcontext():
            for script, clients in chosen:
                result = Run(script, clients, via)
                if reason:
                    result.note = f"not run: {reason}"
                elif via == "direct" and _free_connections() < clients + SPARE_CONNECTIONS:
                    result.note = (f"not run: {_free_connections()} free connections "
                                   f"of max_connections")
                else:
                    where = ({"host": "127.0.0.1", "port": str(bouncer.port), "user": "postgres"}
                             if bouncer is not None else dsn)
                    run_one(executable, database.name, scripts[script], clients, seconds,
                            where, bouncer.process.pid if bouncer is not None else None,
                            result)
                runs.append(result)
                print(f"bench: pgbench {console_line(result)}", flush=True)
    return Ceiling(runs, setup, scripts, seconds, max_connections())


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def console_line(run: Run) -> str:
    if run.tps is None:
        return f"{run.script} x{run.clients} {run.via}: {run.note}"
    return (f"{run.script} x{run.clients} {run.via}: {run.tps:.0f} tps, latency avg "
            f"{_fmt(run.latency_avg, 2)} ms, p99 {_fmt(run.latency_p99, 2)} ms, failed "
            f"{run.failed}, PostgreSQL CPU {_fmt(run.cpu_ms.get('postgres'), 3)} ms/tx, busy "
            f"{_fmt((run.machine_busy or 0) * 100, 0)}%"
            + (f" ({run.note})" if run.note else ""))


def table(result: Ceiling) -> list[str]:
    """The RESULTS.md section: how it was run, one row per run, what it means."""
    lines = [
        "Scripts `bench/out/pgbench/reserve.sql` (the reservation alone: counter, settings and "
        "context in one statement) and `bench/out/pgbench/answer.sql` (reservation + save: one "
        "answer, two round trips), generated from the app's statements; every query carries "
        "the app's `SET LOCAL` timeouts in one simple-protocol query string, as the app sends "
        f"it. `pgbench -n -M simple -c C -j 2 -T {result.seconds:.0f}`, telegram_id random "
        f"over 1..{USERS:,}. Database: {result.setup}. 1 and 50 clients connect directly. "
        f"200 clients cannot (max_connections is {result.max_connections}, less what else is "
        "connected), so they go through PgBouncer in transaction pooling mode with a server "
        f"pool of {BOUNCER_POOL} (`tests/pgbouncer.py`), the set-up the README recommends "
        "for many instances; 50 clients through it too, to tell its cost from the clients'. "
        "pgbench and PgBouncer share the two cores with PostgreSQL; the CPU columns are "
        "per transaction, from 1.5 s in to 1 s before the end of each run.",
        "",
        "| script | clients | connection | transactions/s | latency avg / p50 / p99 ms "
        "| failed | PostgreSQL CPU ms/tx | pgbench CPU ms/tx | PgBouncer CPU ms/tx "
        "| machine busy | other load | note |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for run in result.runs:
        cpu = run.cpu_ms
        lines.append(
            f"| {run.script} | {run.clients} | {run.via} | {_fmt(run.tps, 0)} "
            f"| {_fmt(run.latency_avg, 2)} / {_fmt(run.latency_p50, 2)} / "
            f"{_fmt(run.latency_p99, 2)} | {run.failed} | {_fmt(cpu.get('postgres'), 3)} "
            f"| {_fmt(cpu.get('pgbench'), 3)} | {_fmt(cpu.get('pgbouncer'), 3)} "
            f"| {_fmt((run.machine_busy or 0) * 100, 0)}% "
            f"| {_fmt((run.other_load or 0) * 100, 0)}% | {run.note} |"
        )
    answers = [run for run in result.runs if run.script == "answer" and run.tps]
    if answers:
        best = max(answers, key=lambda run: run.tps)
        postgres = best.cpu_ms.get("postgres")
        lines += [
            "",
            f"Ceiling of this box for the hot path: {best.tps:.0f} answers/s (answer.sql, "
            f"{best.clients} clients, {best.via})"
            + (f"; PostgreSQL's own CPU per answer {postgres:.3f} ms, so one core given to "
               f"PostgreSQL alone serves about {1000 / postgres:.0f} answers/s"
               if postgres else "")
            + ".",
        ]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="pgbench -T per run")
    args = parser.parse_args(argv)
    database = BenchDatabase()
    try:
        setup = prepare(database)
        print(f"bench: {setup}", flush=True)
        result = run(database, setup, args.seconds)
    finally:
        database.drop()
    if isinstance(result, str):
        print(result)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
