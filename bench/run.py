"""`make bench`: measure the service against the forward-only floor and write RESULTS.md.

Usage: ``python -m bench.run [--quick] [--scenario NAME ...] [--duration S]
[--set KEY=VALUE ...] [--no-profile] [--output PATH]``.

A full run (no --quick, no --scenario, no --set) rewrites bench/RESULTS.md; any
other run writes bench/out/results.md, so a smoke check or an experiment never
overwrites the recorded figures. Every scenario prints its line as it finishes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from bench import pyspy, report, scenarios, system, whatif
from bench.loadgen import run_load
from bench.servers import BenchDatabase, FakeLLMProcess, GunicornProcess

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
RESULTS = BENCH_DIR / "RESULTS.md"

# The leak run stops here even if its requests are not all sent (a slow machine):
# `make bench` must stay under five minutes.
LEAK_LIMIT_S = 110.0
NAMES = [s.name for s in scenarios.PLAN] + [scenarios.PROFILE.name, "whatif"]


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per scenario (smoke)")
    parser.add_argument(
        "--scenario", action="append", choices=NAMES, metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(NAMES)}",
    )
    parser.add_argument("--duration", type=float, help="measured seconds per timed scenario")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each window")
    parser.add_argument("--leak-requests", type=int, help="requests of the leak run (20000)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="environment of both gunicorns, e.g. WEB_CONCURRENCY=3 or DB_POOL_SIZE=20",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument(
        "--sweep", action="append", metavar="'KEY=VALUE ...'",
        help="sizing sweep: run the --scenario list (default slow-200, fast-50) once per "
        "given setting string (repeatable; '' = defaults) into bench/out/sizing.md",
    )
    parser.add_argument("--output", type=Path, help="markdown file to write")
    args = parser.parse_args(argv)
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set wants KEY=VALUE, got {item!r}")
    return args


def _plan(args) -> list[scenarios.Scenario]:
    """The scenarios asked for, in PLAN order (--quick shortens the leak run)."""
    chosen = [s for s in scenarios.PLAN if not args.scenario or s.name in args.scenario]
    leak = args.leak_requests or (3000 if args.quick else None)
    if leak:
        chosen = [
            scenarios.Scenario(**{**s.__dict__, "leak_requests": leak}) if s.leak_requests else s
            for s in chosen
        ]
    return chosen


def _profile(server, llm, seconds: float, first_id: int) -> pyspy.Profile | str:
    executable = pyspy.available()
    if executable is None:
        return "py-spy is not installed (`.venv/bin/pip install py-spy`); profile skipped."
    output = OUT_DIR / "profile-raw.txt"
    asyncio.run(run_load("127.0.0.1", server.port, scenarios.API_KEY, scenarios.PROFILE.clients,
                         first_id=first_id, duration=1.0))
    spy = pyspy.start(executable, server.pid, seconds, output)
    asyncio.run(run_load("127.0.0.1", server.port, scenarios.API_KEY, scenarios.PROFILE.clients,
                         first_id=first_id + 5_000_000, duration=seconds + 1.0))
    try:
        _, errors = spy.communicate(timeout=30)
    except Exception:
        spy.kill()
        spy.communicate()
        return "py-spy did not finish in time; profile skipped."
    if spy.returncode != 0 or not output.exists():
        return f"py-spy failed ({spy.returncode}): {errors.decode(errors='replace')[-300:]}"
    return pyspy.parse(output.read_text())


class Runner:
    """Runs groups of scenarios, one gunicorn per group, against one database."""

    def __init__(self, database: BenchDatabase, warmup: float, duration: float, quick: bool):
        self.database = database
        self.warmup = warmup
        self.duration = duration
        self.quick = quick
        self.llms: dict[float, FakeLLMProcess] = {}
        self.failures: dict[str, str] = {}
        self.profile = None
        self.runs = 0

    def llm(self, latency: float) -> FakeLLMProcess:
        if latency not in self.llms:
            self.llms[latency] = FakeLLMProcess(latency, OUT_DIR)
        return self.llms[latency]

    def run(self, plan, overrides: dict) -> dict[str, scenarios.Measured]:
        measured: dict[str, scenarios.Measured] = {}
        groups: dict[tuple, list[scenarios.Scenario]] = {}
        for scenario in plan:
            groups.setdefault(scenario.server_key(), []).append(scenario)
        for members in groups.values():
            first = members[0]
            llm = self.llm(first.latency)
            env = scenarios.server_env(first, llm, self.database.url, overrides)
            try:
                server = GunicornProcess(first.module, env, OUT_DIR, first.name)
            except RuntimeError as error:
                # One broken configuration must not cost the other figures.
                self.failures[", ".join(s.name for s in members)] = str(error)[-1500:]
                print(f"bench: {first.module} did not start: {str(error)[-300:]}", flush=True)
                continue
            with server:
                for scenario in members:
                    self.runs += 1
                    first_id = self.runs * 100_000_000
                    self.database.truncate()
                    if scenario is scenarios.PROFILE:
                        seconds = 4.0 if self.quick else 10.0
                        self.profile = _profile(server, llm, seconds, first_id)
                        print("bench: profile done", flush=True)
                        continue
                    system.wait_quiet(limit=3.0)
                    if scenario.leak_requests:
                        result = scenarios.run_leak(
                            scenario, server, llm, self.database, self.warmup, first_id,
                            LEAK_LIMIT_S,
                        )
                    else:
                        result = scenarios.run_timed(
                            scenario, server, llm, self.database, self.warmup, self.duration,
                            first_id,
                        )
                    measured[scenario.name] = result
                    print(report.console_line(result.figures), flush=True)
                if "Traceback" in server.log_tail(20000):
                    print(f"bench: errors in {server.log_path}", flush=True)
        return measured

    def close(self) -> None:
        for llm in self.llms.values():
            llm.stop()


def main(argv=None) -> int:
    args = _parse_args(argv)
    began = time.monotonic()
    OUT_DIR.mkdir(exist_ok=True)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    duration = args.duration or (3.0 if args.quick else 10.0)
    overrides = dict(item.split("=", 1) for item in args.set)
    full_run = not (args.quick or args.scenario or args.set or args.duration or args.sweep)
    output = args.output or (RESULTS if full_run else OUT_DIR / "results.md")

    speed = [system.calibrate()]
    database = BenchDatabase()
    runner = Runner(database, warmup, duration, args.quick)
    settings = report.settings(overrides, database.max_connections())
    print(f"bench: database {database.name}; {settings['summary']}", flush=True)
    try:
        if args.sweep:
            return _sweep(runner, args, overrides, database, began)
        plan = _plan(args)
        if not args.no_profile and (not args.scenario or "profile" in args.scenario):
            plan.append(scenarios.PROFILE)
        measured = runner.run(plan, overrides)
        costs = None
        if not args.scenario or "whatif" in args.scenario:
            costs = whatif.run(database.url, runner.llm(0.0).url, 200 if args.quick else 1000)
            print("bench: single-thread costs done", flush=True)
    finally:
        runner.close()
        database.drop()
    speed.append(system.calibrate())
    settings["calibration_ms"] = speed
    elapsed = time.monotonic() - began
    text = report.render(measured, runner.profile, settings, elapsed, quick=args.quick,
                         failures=runner.failures, costs=costs)
    output.write_text(text)
    print(f"bench: {len(measured)} scenarios in {elapsed:.0f}s; wrote {output}", flush=True)
    print(report.targets_block(measured), flush=True)
    return 1 if runner.failures else 0


def _sweep(runner: Runner, args, overrides: dict, database: BenchDatabase, began: float) -> int:
    """The same scenarios under several settings, one table (bench/out/sizing.md)."""
    names = args.scenario or ["slow-200", "fast-50"]
    plan = [s for s in scenarios.PLAN if s.name in names and not s.leak_requests]
    rows = []
    for config in args.sweep:
        settings_ = dict(item.split("=", 1) for item in config.split())
        merged = {**overrides, **settings_}
        label = report.settings(merged, database.max_connections())["summary"]
        print(f"bench: sweep {config or '(defaults)'}: {label}", flush=True)
        for name, result in runner.run(plan, merged).items():
            rows.append((config or "(defaults)", name, result.figures))
    output = args.output or OUT_DIR / "sizing.md"
    output.write_text(report.sweep_table(rows, time.monotonic() - began))
    print(f"bench: sweep done; wrote {output}", flush=True)
    return 1 if runner.failures else 0


if __name__ == "__main__":
    sys.exit(main())
