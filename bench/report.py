"""RESULTS.md: machine, settings, figures, targets met or not, leak check, profile."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime

from bench import whatif
from bench.servers import ROOT
from bench.stats import Figures

# (service scenario, forward scenario) pairs shown as ratios.
PAIRS = (("slow-50", "fwd-slow-50"), ("slow-200", "fwd-slow-200"), ("fast-50", "fwd-fast-50"))
# RSS growth from the middle to the end of the leak run that still counts as flat.
LEAK_TOLERANCE_MIB = 2.0


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pair(first, second, digits: int = 1) -> str:
    return f"{_fmt(first, digits)} / {_fmt(second, digits)}"


def _gunicorn_settings(overrides: dict) -> dict:
    """Execute gunicorn.conf.py the way gunicorn does, in a child, and read its values."""
    with tempfile.TemporaryDirectory(prefix="bench-conf-") as metrics_dir:
        env = {**os.environ, **overrides, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        env.pop("AI_CHAT_METRICS_MASTER_PID", None)
        code = (
            "import json, runpy; c = runpy.run_path('gunicorn.conf.py'); print(json.dumps("
            "{k: c[k] for k in ('worker_class', 'workers', 'threads', 'timeout', "
            "'graceful_timeout', 'keepalive')}))"
        )
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"gunicorn.conf.py failed with {overrides}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def settings(overrides: dict, max_connections: int) -> dict:
    """The effective gunicorn and pool settings of the run, from the project's own code."""
    from app.config import load_config

    gunicorn = _gunicorn_settings(overrides)
    env = {"API_SECRET_KEY": "bench", "DATABASE_URL": "postgresql://x@localhost/x",
           **os.environ, **overrides}
    engine = load_config(env)["SQLALCHEMY_ENGINE_OPTIONS"]
    workers = gunicorn["workers"]
    per_worker = engine["pool_size"] + engine["max_overflow"]
    summary = (
        f"{workers} {gunicorn['worker_class']} workers x {gunicorn['threads']} threads, "
        f"pool {engine['pool_size']}+{engine['max_overflow']} per worker "
        f"(<= {workers * per_worker} of max_connections {max_connections}), "
        f"pool_timeout {engine['pool_timeout']}s, worker timeout {gunicorn['timeout']}s"
    )
    return {"gunicorn": gunicorn, "engine": engine, "overrides": overrides, "summary": summary}


def _machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with open("/proc/meminfo") as handle:
        memory_gib = int(handle.readline().split()[1]) / 1024 / 1024
    return (
        f"{os.cpu_count()} CPUs ({model}), {memory_gib:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def _split(f: Figures) -> str:
    """Share of the gunicorn CPU each worker used, e.g. "52/48"."""
    return "/".join(f"{share * 100:.0f}" for share in f.worker_cpu_split) or "–"


def console_line(f: Figures) -> str:
    return (
        f"{f.name:>13}: {f.answers_per_s:7.1f} answers/s  p50 {_fmt(f.p50)} ms  "
        f"p99 {_fmt(f.p99)} ms  overhead p50 {_fmt(f.overhead_p50)} ms  "
        f"own p50 {_fmt(f.own_p50)} ms  "
        f"quota/save p99 {_pair(f.phases_p99.get('quota'), f.phases_p99.get('save'))} ms  "
        f"errors {f.error_count}  CPU {_fmt(f.cpu_ms_per_answer.get('service'), 2)} ms/answer  "
        f"busy {_fmt((f.machine_busy or 0) * 100, 0)}% "
        f"(other {_fmt((f.other_load or 0) * 100, 0)}%)  new conns {f.new_db_connections}  "
        f"workers {_split(f)}"
    )


def _figures_tables(measured) -> list[str]:
    lines = [
        "| scenario | app | upstream ms | clients | answers/s | p50 ms | p99 ms "
        "| overhead p50 / p99 ms | own p50 / p99 ms | quota p50 / p99 ms "
        "| save p50 / p99 ms | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in measured.values():
        f = m.figures
        errors = ", ".join(f"{k} {v}" for k, v in sorted(f.errors.items())) or "0"
        lines.append(
            f"| {f.name} | {f.app} | {f.upstream_ms:.0f} | {f.clients} | {f.answers_per_s:.1f} "
            f"| {_fmt(f.p50)} | {_fmt(f.p99)} | {_pair(f.overhead_p50, f.overhead_p99)} "
            f"| {_pair(f.own_p50, f.own_p99)} "
            f"| {_pair(f.phases_p50.get('quota'), f.phases_p99.get('quota'))} "
            f"| {_pair(f.phases_p50.get('save'), f.phases_p99.get('save'))} | {errors} |"
        )
    lines += [
        "",
        "| scenario | answers | window s | gunicorn CPU ms/answer | PostgreSQL CPU ms/answer "
        "| fake LLM CPU ms/answer | load generator CPU ms/answer | machine busy "
        "| other load | new DB connections | worker CPU split % | worker RSS MiB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in measured.values():
        f = m.figures
        cpu = f.cpu_ms_per_answer
        rss = ", ".join(f"{value:.0f}" for value in f.worker_rss_mib)
        lines.append(
            f"| {f.name} | {f.answers} | {f.window_s:.1f} | {_fmt(cpu.get('service'), 2)} "
            f"| {_fmt(cpu.get('postgres'), 2)} | {_fmt(cpu.get('fake_llm'), 2)} "
            f"| {_fmt(cpu.get('loadgen'), 2)} | {_fmt((f.machine_busy or 0) * 100, 0)}% "
            f"| {_fmt((f.other_load or 0) * 100, 0)}% | {_fmt(f.new_db_connections, 0)} "
            f"| {_split(f)} | {rss} |"
        )
    return lines


def _ratio(measured, service: str, forward: str):
    if service in measured and forward in measured:
        floor = measured[forward].figures.answers_per_s
        return measured[service].figures.answers_per_s / floor if floor else None
    return None


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**NOT met**")


def leak_growth(m) -> list[float] | None:
    points = dict(m.rss_points)
    if "middle" not in points or "end" not in points:
        return None
    return [end - middle for middle, end in zip(points["middle"], points["end"], strict=False)]


def target_lines(measured) -> list[str]:
    """One line per target of the issue: met / NOT met, with the numbers."""
    get = measured.get
    lines = []
    f = get("slow-50") and get("slow-50").figures
    ok = None if not f else (f.answers_per_s >= 90 and (f.p99 or 1e9) <= 650
                             and f.error_count == 0)
    lines.append(
        f"- upstream 500 ms, 50 clients: >= 90 answers/s, p99 <= 650 ms, zero errors — "
        f"{_verdict(ok)}"
        + (f" ({f.answers_per_s:.1f} answers/s, p99 {_fmt(f.p99)} ms, "
           f"{f.error_count} errors)" if f else "")
    )
    f = get("slow-200") and get("slow-200").figures
    ratio = _ratio(measured, "slow-200", "fwd-slow-200")
    ok = None if not f or ratio is None else (f.error_count == 0 and ratio >= 0.8)
    lines.append(
        f"- upstream 500 ms, 200 clients: zero errors, >= 0.8x forward-only — {_verdict(ok)}"
        + (f" ({f.error_count} errors, {f.answers_per_s:.1f} vs "
           f"{get('fwd-slow-200').figures.answers_per_s:.1f} answers/s = {ratio:.2f}x)"
           if ok is not None else "")
    )
    ratio = _ratio(measured, "fast-50", "fwd-fast-50")
    ok = None if ratio is None else ratio >= 0.6
    lines.append(
        f"- upstream 0 ms, 50 clients (CPU-bound): >= 0.6x forward-only — {_verdict(ok)}"
        + (f" ({get('fast-50').figures.answers_per_s:.1f} vs "
           f"{get('fwd-fast-50').figures.answers_per_s:.1f} answers/s = {ratio:.2f}x)"
           if ok is not None else "")
    )
    f = get("slow-20") and get("slow-20").figures
    ok = None if not f or f.overhead_p50 is None else f.overhead_p50 <= 5
    lines.append(
        f"- service overhead p50 <= 5 ms at 20 clients — {_verdict(ok)}"
        + (f" (client latency − upstream call p50 = {_fmt(f.overhead_p50)} ms; "
           f"Server-Timing total − llm p50 = {_fmt(f.own_p50)} ms)" if ok is not None else "")
    )
    quota = f and f.phases_p99.get("quota")
    save = f and f.phases_p99.get("save")
    ok = None if quota is None or save is None else (quota <= 2 and save <= 2)
    lines.append(
        f"- quota reservation and save <= 2 ms p99 each (Server-Timing, 20 clients) — "
        f"{_verdict(ok)}" + (f" (quota {_fmt(quota)} ms, save {_fmt(save)} ms)"
                             if ok is not None else "")
    )
    leak = get("leak")
    growth = leak and leak_growth(leak)
    ok = None if not growth else all(value <= LEAK_TOLERANCE_MIB for value in growth)
    lines.append(
        f"- no leak: worker RSS flat over the leak run (<= {LEAK_TOLERANCE_MIB:.0f} MiB growth "
        f"from its middle to its end) — {_verdict(ok)}"
        + (f" ({leak.figures.extra.get('requests')} requests; growth "
           f"{', '.join(f'{g:+.1f}' for g in growth)} MiB per worker)" if ok is not None else "")
    )
    return lines


def targets_block(measured) -> str:
    return "\n".join(["Targets:", *target_lines(measured)])


def sweep_table(rows, elapsed: float) -> str:
    """One line per (settings, scenario) of a sizing sweep."""
    lines = [
        "# Sizing sweep",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {_machine()}; {elapsed:.0f} s.",
        "",
        "| settings | scenario | answers/s | p50 ms | p99 ms | own p50 / p99 ms "
        "| quota p99 ms | save p99 ms | errors | gunicorn CPU ms/answer | new DB connections "
        "| other load | worker CPU split % | worker RSS MiB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for config, name, f in rows:
        lines.append(
            f"| `{config}` | {name} | {f.answers_per_s:.1f} | {_fmt(f.p50)} | {_fmt(f.p99)} "
            f"| {_pair(f.own_p50, f.own_p99)} | {_fmt(f.phases_p99.get('quota'))} "
            f"| {_fmt(f.phases_p99.get('save'))} | {f.error_count} "
            f"| {_fmt(f.cpu_ms_per_answer.get('service'), 2)} | {_fmt(f.new_db_connections, 0)} "
            f"| {_fmt((f.other_load or 0) * 100, 0)}% | {_split(f)} "
            f"| {', '.join(f'{v:.0f}' for v in f.worker_rss_mib)} |"
        )
    return "\n".join(lines) + "\n"


def _comparisons(measured) -> list[str]:
    lines = [
        "| service | forward-only | answers/s | ratio | gunicorn CPU ms/answer | CPU ratio |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for service, forward in PAIRS:
        if service in measured and forward in measured:
            s, f = measured[service].figures, measured[forward].figures
            cs, cf = s.cpu_ms_per_answer.get("service"), f.cpu_ms_per_answer.get("service")
            lines.append(
                f"| {service} | {forward} | {s.answers_per_s:.1f} / {f.answers_per_s:.1f} "
                f"| {_fmt(_ratio(measured, service, forward), 2)} | {_pair(cs, cf, 2)} "
                f"| {_fmt(cs / cf if cs and cf else None, 2)} |"
            )
    if "fast-50" in measured and "fast-50-info" in measured:
        plain, info = measured["fast-50"].figures, measured["fast-50-info"].figures
        cp, ci = plain.cpu_ms_per_answer.get("service"), info.cpu_ms_per_answer.get("service")
        lines += [
            "",
            f"Cost of the per-request log line (LOG_LEVEL=INFO vs WARNING, upstream 0 ms, "
            f"50 clients): {info.answers_per_s:.1f} vs {plain.answers_per_s:.1f} answers/s "
            f"({(info.answers_per_s / plain.answers_per_s - 1) * 100:+.0f}%), "
            f"gunicorn CPU {_fmt(ci, 2)} vs {_fmt(cp, 2)} ms/answer"
            + (f" ({ci - cp:+.2f} ms)." if ci and cp else "."),
        ]
    return lines


def _leak(measured) -> list[str]:
    leak = measured.get("leak")
    if not leak:
        return ["Not run."]
    lines = ["| point | " + " | ".join(f"worker {i + 1} RSS MiB"
                                      for i in range(len(leak.rss_points[0][1]))) + " |",
             "|---|" + "--:|" * len(leak.rss_points[0][1])]
    for name, values in leak.rss_points:
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    f = leak.figures
    lines += ["", f"{f.extra.get('requests')} requests at upstream 0 ms, {f.clients} clients, "
              f"{f.answers_per_s:.1f} answers/s, {f.error_count} errors. 'start' is taken after "
              f"the warm-up, 'middle' after half of the requests."]
    return lines


def _profile(profile) -> list[str]:
    if profile is None:
        return ["Not run (--no-profile or a partial run)."]
    if isinstance(profile, str):
        return [profile]
    total = profile.samples or 1
    lines = [
        f"py-spy (`record --gil --subprocesses`, 200 Hz) on the master and its "
        f"workers for the profile run (upstream 0 ms, 50 clients): {profile.samples} samples "
        f"of a thread holding the GIL, i.e. of CPU spent in Python. Shares are of those samples.",
        "",
        "Leaf frame by library (self time):",
        "",
        "| library | share |",
        "|---|--:|",
    ]
    lines += [f"| {name} | {count / total:.0%} |" for name, count in
              profile.by_category.most_common()]
    lines += ["", "Inclusive time of the steps of one send:", "", "| step | function | share |",
              "|---|---|--:|"]
    watched = sorted(profile.watched.items(), key=lambda item: -item[1][1])
    lines += [f"| {label} | `{func}` | {count / total:.0%} |" for label, (func, count) in watched]
    lines += ["", "Top functions by self time:", "", "| function | share |", "|---|--:|"]
    lines += [f"| `{name}` | {count / total:.1%} |" for name, count in
              profile.self_time.most_common(15)]
    return lines


def render(measured, profile, settings_, elapsed: float, quick: bool, failures=None,
           costs=None) -> str:
    gunicorn = settings_["gunicorn"]
    engine = settings_["engine"]
    overrides = settings_["overrides"]
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench.run`); the analysis at the end is "
        "written by hand. Compare figures within one run only: the load generator, "
        "PostgreSQL and the fake LLM share the two cores with the service.",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; whole run {elapsed:.0f} s"
        + (" (**--quick: smoke figures, not for comparison**)" if quick else ""),
        f"- Machine: {_machine()}; CPU calibration (1M-step Python loop, best of 5) "
        + " ms at the start, ".join(f"{ms:.1f}" for ms in settings_.get("calibration_ms", []))
        + " ms at the end",
        f"- Service: gunicorn {gunicorn['worker_class']}, {gunicorn['workers']} workers "
        f"x {gunicorn['threads']} threads, timeout {gunicorn['timeout']} s, "
        f"keepalive {gunicorn['keepalive']} s; SQLAlchemy pool {engine['pool_size']} + "
        f"overflow {engine['max_overflow']} per worker, pool_timeout {engine['pool_timeout']} s; "
        "LOG_LEVEL=WARNING unless the scenario says INFO; DAILY_LIMIT high, a fresh "
        "telegram_id per request (new user: the context read finds nothing)",
        "- Forward-only app: `bench/forward_app.py`, same gunicorn.conf.py and settings, same "
        "`openai` client settings; no Flask, validation, database, logging or metrics",
        "- Load: closed loop, C clients with one keep-alive connection each "
        "(`bench/loadgen.py`, asyncio); the window starts after a warm-up",
        "- Environment overrides: "
        + (", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "none"),
        "",
        "overhead = client latency − the upstream call as the app timed it (Server-Timing "
        "`llm`, which both apps send): gunicorn, the app's own work and the loopback hops; "
        "own = Server-Timing `total − llm` (the service's work outside the LLM call); quota and "
        "save are the service's Server-Timing phases. CPU per answer = CPU seconds of the "
        "process group in the window / answers.",
        "",
        "## Figures",
        "",
        *[f"**Not run: the server for {names} did not start:**\n\n```\n{error}\n```\n"
          for names, error in (failures or {}).items()],
        *_figures_tables(measured),
        "",
        "## Service against the forward-only floor",
        "",
        *_comparisons(measured),
        "",
        "## Targets",
        "",
        *target_lines(measured),
        "- at most 3 database statements per answered send, 1 per 429 — asserted by "
        "`tests/test_round_trips.py` (counts statements, not times)",
        "",
        "## Leak run",
        "",
        *_leak(measured),
        "",
        "## Profile of a send under load",
        "",
        *_profile(profile),
        "",
        "## Single-thread cost of one send and of its database work",
        "",
        "`bench/whatif.py`: in-process, one thread, CPU of this process only (the fake LLM "
        "runs elsewhere), fastest of 5 interleaved batches. No GIL contention, so this is "
        "the floor of the service's own work; the \"proposed\" rows are statements the "
        "service does not run, timed to put a number on the recommendations below.",
        "",
        *(whatif.table(costs) if costs else ["Not run."]),
        "",
        ANALYSIS,
    ]
    return "\n".join(lines) + "\n"


# Hand-written: what the figures above mean and what to change. Review after a
# change to the service, gunicorn.conf.py or the pool defaults.
ANALYSIS = """\
## Analysis and sizing rule (hand-written, 2026-11-25; the figures above are regenerated)

**Read the figures with care.** The two vCPUs are shared with PostgreSQL, the fake LLM and
the load generator ("other load" counts the rest of the machine). The same scenario moves
from run to run: on 2026-11-25, with the code as it is now, slow-200 gave 255-322 answers/s
(0.64-0.81x of the floor) and fast-50 346-413 (0.29-0.45x). Compare the service with the
forward-only floor of the same run, and
settings only inside one `--sweep` run.

**What was changed after the first measurements** (first run -> now, same scenarios):
the engine runs in autocommit mode, so an answered send is 3 network round trips
(reserve, context read, save) instead of 7 (each statement had a BEGIN and a COMMIT of
its own); the context read and the save are prebuilt SQL instead of ORM statements built
per call; the pool defaults to threads / 5 (30 + 10 per worker), which stopped the
connection churn (hundreds of new PostgreSQL connections per 10 s at 0 ms upstream,
now 0); threads default to 150 per worker. Effect: single-thread CPU of one send
2.6 -> 2.0-2.6 ms (it varies with the machine's state), slow-200 210 -> 255-322 answers/s
(0.53x -> 0.64-0.81x of the floor),
fast-50 303 -> 346-413, own time at 20 clients 6.7 -> 3.5-4.0 ms p50.

**Targets not met, and why.**

- *200 clients, >= 0.8x forward-only*: 0.64-0.81x over the runs (0.78x in the run above). At 200
  clients both workers are CPU/GIL-bound: ~4 ms of gunicorn CPU per answer against
  ~2 ms for the floor. With `WEB_CONCURRENCY=4 GUNICORN_THREADS=75` one sweep reached
  364 answers/s (0.92x): more GILs on the same two cores, at ~100 MiB per extra worker
  and a worse quota/save p99; the default stays at one worker per core.
- *0 ms upstream, >= 0.6x forward-only*: 0.29-0.45x. The floor spends ~1 ms of CPU per
  answer (JSON in, openai SDK, JSON out); the service ~2-2.6 ms single-threaded, ~3.3-4 ms
  under load: Flask + flask-smorest + marshmallow (~0.3 ms), the SQLAlchemy session and
  execution machinery for 3 statements (~0.35 ms), the Server-Timing, metrics and log
  hooks (~0.1 ms), and GIL hand-offs after each round trip. 0.6x would need roughly
  halving that, e.g. dropping the ORM session for raw driver calls - not worth the
  loss of the stack's conventions for a case (an LLM answering in 0 ms) that does not
  exist in production.
- *overhead p50 <= 5 ms at 20 clients*: the service's own time (Server-Timing
  total - llm) is 3.5-4.0 ms p50 (met); measured from the client, which adds gunicorn's
  accept/parse and the loopback hop, 5.2-6.2 ms (not met by a millisecond).
- *quota and save <= 2 ms p99*: p50 is ~1-1.3 ms each; p99 5-8 ms at 20 clients. The
  tail is waiting for the GIL after the round trip while other threads parse LLM
  answers (the switch interval is 5 ms; a 1 ms interval, tried once in the
  workers, was no better). A single CTE for reserve + context
  (PostgreSQL only, the "proposed" row above) would save one more round trip.

**Sizing rule** (defaults: 2 workers x 150 threads, pool 30 + 10 per worker):

- *workers* = cores. A worker is one GIL; more workers than cores buy throughput at
  saturation (above) for ~100 MiB RSS each.
- *threads per worker* >= 1.5 x in-flight sends per worker, where in-flight =
  answers/s x LLM latency (Little's law): 200 in flight at 400/s x 0.5 s -> 2 x 150.
  The 1.5 covers the uneven split of keep-alive connections between workers. A 2-core
  box serves ~100 concurrent chats per core at a 0.5 s LLM and proportionally more at
  the seconds real models take (the work per answer does not grow with latency).
- *DB pool per worker*: `pool_size` ~ threads / 5, `max_overflow` 10, and
  instances x workers x (pool_size + max_overflow) <= PostgreSQL `max_connections` - 10
  (one instance: 2 x 40 = 80 of 100; for two, raise `max_connections` as
  docker-compose.yml does rather than shrinking the pool and churning connections).
- *timeouts*: `pool_timeout` 5 s was never reached; worker `timeout` = LLM_DEADLINE +
  15 s, `graceful_timeout` = LLM_DEADLINE + 5 s, `keepalive` 5 s.
- *memory*: ~100-115 MiB RSS per worker under load, flat over 20k sends (leak run).
"""
