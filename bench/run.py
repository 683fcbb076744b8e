"""`make bench`: measure the service against the forward-only floor and write RESULTS.md.

Usage: ``python -m bench.run [--quick] [--scenario NAME ...] [--duration S]
[--repeat N] [--set KEY=VALUE ...] [--sweep 'KEY=VALUE ...' ...] [--output PATH]``.

A full run (none of --quick, --scenario, --duration, --set) rewrites bench/RESULTS.md,
keeping its hand-written analysis; any other run writes bench/out/results.md (a
sweep bench/out/sizing.md) unless --output names a file, so a smoke check or an
experiment never overwrites the recorded figures. Every scenario prints its line
as it finishes.

Order: the HTTP scenarios, each app's server in turn (never two at once: they
would share PostgreSQL's 100 connections and the two cores); --repeat more
rounds of the service/forward-only pairs whose ratios are targets (the report
takes the median); the profile; the single-thread costs (whatif); the
fault-injection run (bench/faults.py, on a PostgreSQL cluster of its own; 90 s
of load, --duration sets it); then, on the same scratch database loaded with a
million exchanges, the pgbench ceiling (bench/ceiling.py) and the index
measurements (bench/indexes.py) and, with a million model calls added, the
spend report (bench/usage.py). Names for --scenario: every scenario of
bench/scenarios.py, ``profile``, ``whatif``, ``faults``, ``pgbench``,
``indexes`` and ``usage``. The last three also run alone, each on
a scratch database of its own: ``python -m bench.ceiling``, ``python -m
bench.indexes``, ``python -m bench.usage``. The v1.2 scenarios and their
twins (scenarios.V12_PAIRS) run in rounds like the other pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from bench import ceiling, faults, indexes, pyspy, report, scenarios, system, usage, whatif
from bench.loadgen import raise_open_files, run_load
from bench.servers import (
    BenchDatabase,
    CpuBurner,
    FakeLLMProcess,
    FakeMainServerProcess,
    GunicornProcess,
    RedisKeys,
    max_connections,
)
from bench.stats import percentile

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
RESULTS = BENCH_DIR / "RESULTS.md"

# The leak run stops here even if its requests are not all sent (a slow machine;
# the report says how many it made): `make bench` must stay within ~12 minutes.
LEAK_LIMIT_S = 90.0
# Ratios of a full run are medians of this many rounds (--repeat).
FULL_REPEAT = 3
DATABASE_STEPS = ("pgbench", "indexes", "usage")
NAMES = [s.name for s in scenarios.PLAN] + [scenarios.PROFILE.name, "whatif", "faults",
                                            *DATABASE_STEPS]


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not key or not sep:
        raise argparse.ArgumentTypeError(f"want KEY=VALUE, got {text!r}")
    return key, value


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per scenario (smoke)")
    parser.add_argument(
        "--scenario", action="append", choices=NAMES, metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(NAMES)}",
    )
    parser.add_argument("--duration", type=float,
                        help="measured seconds per timed scenario (default 10; 20 for the "
                        "1000-client ones)")
    parser.add_argument(
        "--repeat", type=int, metavar="N",
        help="rounds of the service/forward-only pairs "
        f"{', '.join(map('/'.join, scenarios.PAIRS))} (default {FULL_REPEAT} in a full run, "
        "else 1); the report takes the median ratio",
    )
    parser.add_argument(
        "--set", action="append", default=[], type=_setting, metavar="KEY=VALUE",
        help="environment of both gunicorns, e.g. WEB_CONCURRENCY=3 or DB_POOL_SIZE=20",
    )
    parser.add_argument(
        "--sweep", action="append", metavar="'KEY=VALUE ...'",
        type=lambda text: dict(_setting(item) for item in text.split()),
        help="sizing sweep: run the --scenario list (default slow-200, fast-50) once per "
        "given setting string (repeatable; '' = defaults) into bench/out/sizing.md",
    )
    parser.add_argument("--output", type=Path, help="markdown file to write")
    return parser.parse_args(argv)


def _wanted(args, name: str) -> bool:
    return not args.scenario or name in args.scenario


def _plan(args) -> list[scenarios.Scenario]:
    """The scenarios asked for, in PLAN order (--quick shortens the leak run)."""
    chosen = [s for s in scenarios.PLAN if _wanted(args, s.name)]
    if args.quick:
        chosen = [dataclasses.replace(s, leak_requests=3000) if s.leak_requests else s
                  for s in chosen]
    if _wanted(args, scenarios.PROFILE.name):
        chosen.append(scenarios.PROFILE)
    return chosen


def _profile(server: GunicornProcess, seconds: float, first_id: int) -> pyspy.Profile | str:
    executable = pyspy.available()
    if executable is None:
        return "py-spy is not installed (`.venv/bin/pip install py-spy`); profile skipped."
    output = OUT_DIR / "profile-raw.txt"

    def load(first: int, duration: float) -> None:
        asyncio.run(run_load("127.0.0.1", server.port, scenarios.API_KEY,
                             scenarios.PROFILE.clients, first_id=first, duration=duration))

    load(first_id, 1.0)  # warm-up
    spy = pyspy.start(executable, server.process.pid, seconds, output)
    load(first_id + 5_000_000, seconds + 1.0)
    try:
        _, errors = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.communicate()
        return "py-spy did not finish in time; profile skipped."
    if spy.returncode != 0 or not output.exists():
        return f"py-spy failed ({spy.returncode}): {errors.decode(errors='replace')[-300:]}"
    return pyspy.parse(output.read_text())


class Runner:
    """Runs groups of scenarios, one gunicorn per group, against one database."""

    def __init__(self, database: BenchDatabase, quick: bool, duration: float | None):
        self.database = database
        self.quick = quick
        self.warmup = 1.0 if quick else 2.0
        self.duration = duration
        self.profile_s = 4.0 if quick else 10.0
        self.llms: dict[scenarios.Upstream, FakeLLMProcess] = {}
        self.failures: dict[str, str] = {}
        self.profile = None
        self.runs = 0
        self.began = time.monotonic()
        # The run's own keys on the machine's Redis, deleted when it ends.
        self.redis = RedisKeys(f"ai_chat_bench_{uuid.uuid4().hex[:10]}:")
        self.redis_ok: bool | None = None

    def say(self, text: str) -> None:
        """A console line, stamped with the seconds since the run began."""
        print(f"[{time.monotonic() - self.began:4.0f} s] {text}", flush=True)

    def window(self, scenario: scenarios.Scenario) -> float:
        """Measured seconds: --duration, else the scenario's own, else 10 (--quick: less)."""
        if self.duration:
            return self.duration
        if scenario.window:
            return min(scenario.window, 8.0) if self.quick else scenario.window
        return 3.0 if self.quick else 10.0

    def llm(self, upstream: scenarios.Upstream) -> FakeLLMProcess:
        # One fake per kind of answer, kept for the whole run: it holds no state
        # a scenario could leave behind.
        if upstream not in self.llms:
            self.llms[upstream] = FakeLLMProcess(upstream, OUT_DIR)
        return self.llms[upstream]

    def run(self, plan, settings: dict, label: str = "") -> dict[str, scenarios.Measured]:
        """``settings`` as report.settings gives them (overrides, gunicorn values)."""
        measured: dict[str, scenarios.Measured] = {}
        groups: dict[tuple, list[scenarios.Scenario]] = {}
        for scenario in plan:
            groups.setdefault(scenario.server_key(), []).append(scenario)
        for members in groups.values():
            first = members[0]
            names = ", ".join(s.name for s in members) + label
            if first.redis and not self._redis_available():
                self.failures[names] = f"no Redis at {RedisKeys.URL}"
                continue
            llm = self.llm(first.upstream)
            env = {**scenarios.service_env(self.database.url, llm.url),
                   **settings["overrides"], **dict(first.env)}
            if first.redis:
                env.update(REDIS_URL=RedisKeys.URL, REDIS_PREFIX=self.redis.prefix)
            main = burners = None
            if first.main_server is not None:
                main = FakeMainServerProcess(first.main_server, OUT_DIR)
                env.update(MAIN_SERVER_URL=main.url, MAIN_SERVER_API_KEY=main.api_key)
            server = GunicornProcess(first.module, env, settings["gunicorn"], OUT_DIR, first.name,
                                     cpus=first.cpus)
            try:
                server.start()
            except RuntimeError as error:
                # One broken configuration must not cost the other figures.
                self.failures[names] = str(error)[-1500:]
                self.say(f"bench: {str(error)[-300:]}")
                if main is not None:
                    main.stop()
                continue
            group = {}
            try:
                scenarios.EXTRA_GROUPS.clear()
                if main is not None:
                    scenarios.EXTRA_GROUPS["fake_main_server"] = [main.process.pid]
                if first.burners:
                    burners = CpuBurner(first.cpus or "0", first.burners)
                    scenarios.EXTRA_GROUPS["burner"] = burners.pids
                for scenario in members:
                    result = self._measure(scenario, server, llm)
                    if result is not None:
                        group[scenario.name] = result
                        if main is None:
                            self.say(report.console_line(result.figures) + label)
            finally:
                scenarios.EXTRA_GROUPS.clear()
                server.stop()
                if burners is not None:
                    burners.stop()
                if main is not None:
                    timings = main.stop()
                    for result in group.values():
                        tool_rounds(result.figures, timings)
                        self.say(report.console_line(result.figures) + label)
            measured.update(group)
            if "Traceback" in server.log()[-20000:]:
                self.say(f"bench: errors in {server.log_path}")
        return measured

    def _redis_available(self) -> bool:
        if self.redis_ok is None:
            self.redis_ok = self.redis.available()
        return self.redis_ok

    def _measure(self, scenario, server, llm) -> scenarios.Measured | None:
        """One scenario on a running server (the profile: None, kept in self.profile)."""
        self.runs += 1
        first_id = self.runs * 100_000_000
        self.database.truncate()
        if scenario.redis:
            # Every round starts from an empty cache (the common answers included).
            self.redis.clear()
        if scenario.users:
            users = scenario.users
            today = datetime.now(ZoneInfo("Europe/Moscow")).date()
            took = self.database.load_users(first_id, users.size, users.history,
                                            users.at_limit, users.limit, today)
            self.say(f"bench: {users.size} returning users loaded in {took:.1f} s")
        if scenario is scenarios.PROFILE:
            self.profile = _profile(server, self.profile_s, first_id)
            self.say("bench: profile done")
            return None
        system.wait_quiet(limit=2.0)
        warmup = scenario.warmup(self.warmup)
        if scenario.leak_requests:
            return scenarios.run_leak(scenario, server, llm, self.database, warmup,
                                      first_id, LEAK_LIMIT_S)
        return scenarios.run_timed(scenario, server, llm, self.database, warmup,
                                   self.window(scenario), first_id)

    def close(self) -> None:
        for llm in self.llms.values():
            llm.stop()
        self.llms.clear()
        if self.redis_ok:
            self.redis.clear()


def tool_rounds(figures, timings: list[tuple[int, float, float]]) -> None:
    """The tool rounds of the window as the fake main server saw them: per
    request (a fresh telegram_id each), from its first call's arrival to its
    last call's answer (the span), and between the calls' arrivals (the
    skew). Into ``figures.extra``."""
    if not figures.window_at:
        return
    start, end = figures.window_at
    rounds: dict[int, list[tuple[float, float]]] = {}
    for telegram_id, started, ended in timings:
        rounds.setdefault(telegram_id, []).append((started, ended))
    spans, skews, calls = [], [], []
    for entries in rounds.values():
        first = min(started for started, _ in entries)
        if not start <= first <= end:
            continue
        spans.append((max(ended for _, ended in entries) - first) * 1000)
        skews.append((max(started for started, _ in entries) - first) * 1000)
        calls.append(len(entries))
    figures.extra.update(
        rounds=len(spans), calls_per_round=(sum(calls) / len(calls)) if calls else None,
        round_p50=percentile(spans, 0.5), round_p99=percentile(spans, 0.99),
        round_mean=(sum(spans) / len(spans)) if spans else None,
        round_max=max(spans, default=None), skew_p50=percentile(skews, 0.5),
        skew_p99=percentile(skews, 0.99),
    )


def _repeat(runner: Runner, measured: dict, settings: dict, rounds: int) -> None:
    """More rounds of the pairs measured in full, into each one's ``repeats``."""
    pairs = [*scenarios.PAIRS, *((first, second) for first, second, _ in scenarios.V12_PAIRS)]
    names = {name for pair in pairs if all(n in measured for n in pair) for name in pair}
    names |= {name for name in scenarios.ALONE_IN_ROUNDS if name in measured}
    again = [s for s in scenarios.PLAN if s.name in names]
    for number in range(2, rounds + 1):
        if not again:
            return
        for name, result in runner.run(again, settings, f" (round {number})").items():
            measured[name].repeats.append(result.figures)


def _database_side(args, database: BenchDatabase, say):
    """The pgbench ceiling and the index measurements, on one loaded database."""
    if not any(_wanted(args, name) for name in DATABASE_STEPS):
        return None, None, None
    database.truncate()
    setup = ceiling.prepare(database)
    say(f"bench: database loaded: {setup}")
    ceiling_result = index_result = usage_result = None
    if _wanted(args, "pgbench"):
        ceiling_result = ceiling.run(database, setup, 3.0 if args.quick else 10.0)
    if _wanted(args, "indexes"):
        index_result = indexes.run(database, setup)
    if _wanted(args, "usage"):
        usage_result = usage.run(database)
        for line in usage.console_lines(usage_result):
            say(f"bench: {line}")
    return ceiling_result, index_result, usage_result


def main(argv=None) -> int:
    args = _parse_args(argv)
    began = time.monotonic()
    OUT_DIR.mkdir(exist_ok=True)
    # The service's defaults, not whatever a developer's .env sets (--set is for that).
    os.environ.setdefault("AI_CHAT_ENV_FILE", os.devnull)
    files_before, files_now = raise_open_files(scenarios.OPEN_FILES)
    overrides = dict(args.set)
    partial = args.quick or args.scenario or args.set or args.duration
    repeat = args.repeat or (1 if partial else FULL_REPEAT)
    calibration = [system.calibrate()]
    # Every setting is checked (by gunicorn.conf.py and app.config) before a run starts.
    connections = max_connections()
    settings = report.settings(overrides, connections)
    settings["open_files"] = (files_before, files_now)
    sweeps = [(" ".join(f"{k}={v}" for k, v in sweep.items()) or "(defaults)",
               report.settings({**overrides, **sweep}, connections)) for sweep in args.sweep or ()]
    database = BenchDatabase()
    runner = Runner(database, args.quick, args.duration)
    print(f"bench: database {database.name}; {settings['summary']}; open files "
          f"{files_before} -> {files_now}", flush=True)
    costs = ceiling_result = index_result = fault_result = usage_result = None
    try:
        if sweeps:
            return _sweep(runner, args, sweeps, began)
        measured = runner.run(_plan(args), settings)
        _repeat(runner, measured, settings, repeat)
        if _wanted(args, "whatif"):
            costs = whatif.run(database.url, runner.llm(scenarios.FAST).url,
                               200 if args.quick else 1000)
            runner.say("bench: single-thread costs done")
        runner.close()
        if _wanted(args, "faults"):
            fault_result = _faults(args, settings, runner.say)
        ceiling_result, index_result, usage_result = _database_side(args, database, runner.say)
    finally:
        runner.close()
        database.drop()
    settings["calibration_ms"] = [*calibration, system.calibrate()]
    elapsed = time.monotonic() - began
    output = args.output or (OUT_DIR / "results.md" if partial else RESULTS)
    previous = output.read_text() if output.exists() else ""
    text = report.render(measured, runner.profile, settings, elapsed, quick=args.quick,
                         failures=runner.failures, costs=costs, ceiling=ceiling_result,
                         indexes=index_result, repeat=repeat,
                         analysis=report.kept_analysis(previous), faults=fault_result,
                         usage=usage_result)
    output.write_text(text)
    print(f"bench: {len(measured)} scenarios in {elapsed:.0f}s; wrote {output}", flush=True)
    print(report.targets_block(measured), flush=True)
    violations = getattr(fault_result, "violations", None)
    return 1 if runner.failures or violations else 0


def _faults(args, settings: dict, say):
    """The fault-injection run; its report (or why it did not run)."""
    seconds = args.duration or (faults.QUICK_SECONDS if args.quick else faults.SECONDS)
    say(f"bench: fault injection, {seconds:.0f} s of load")
    result = faults.run(settings, OUT_DIR, seconds)
    say(result if isinstance(result, str) else f"bench: {result.text()}")
    return result


def _sweep(runner: Runner, args, sweeps: list[tuple[str, dict]], began: float) -> int:
    """The same scenarios under several settings, one table (bench/out/sizing.md)."""
    names = args.scenario or ["slow-200", "fast-50"]
    plan = [s for s in scenarios.PLAN if s.name in names and not s.leak_requests]
    rows = []
    for label, settings in sweeps:
        print(f"bench: sweep {label}: {settings['summary']}", flush=True)
        for name, result in runner.run(plan, settings).items():
            rows.append((label, name, result.figures))
    output = args.output or OUT_DIR / "sizing.md"
    output.write_text(report.sweep_table(rows, time.monotonic() - began))
    print(f"bench: sweep done; wrote {output}", flush=True)
    return 1 if runner.failures else 0


if __name__ == "__main__":
    sys.exit(main())
