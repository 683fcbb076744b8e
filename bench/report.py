"""RESULTS.md: machine, settings, figures, targets met or not, leak check, profile,
the PostgreSQL ceiling and the index measurements, and the hand-written analysis.

The analysis is the one part written by hand: a full run keeps whatever stands
between the analysis markers of the file it rewrites, so figures can be
regenerated without losing it (review it after every full run).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime

from bench import ceiling, indexes, targets, usage, whatif
from bench.loadgen import STREAM_POLL_S
from bench.scenarios import PAIRS, PLAN, V12_PAIRS
from bench.servers import ROOT
from bench.stats import Figures, median
from bench.targets import fmt as _fmt

ANALYSIS_START = "<!-- analysis: by hand; make bench keeps it when it rewrites this file -->"
ANALYSIS_END = "<!-- end of analysis -->"
ANALYSIS_PLACEHOLDER = """\
_To be written by hand after a full run on a quiet machine: what the figures above
mean, which targets are not met and why (with the profile and the ceiling as
evidence), what the index measurements decide, and the sizing rule (workers,
threads, pool, max_connections, PgBouncer) that the figures support._"""


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
    if f.stream:
        lateness = f.first_delta_after_model
        return (
            f"{f.name:>15}: {f.answers_per_s:7.1f} streams/s (of {_fmt(f.bound_per_s)})  TTFT "
            f"p50 {_fmt(f.ttft_p50)} ms p99 {_fmt(f.ttft_p99)} ms (first delta +{_fmt(lateness[0])}"
            f" / +{_fmt(lateness[1])} ms after the model's)  done p99 {_fmt(f.p99)} ms  "
            f"errors {targets.errors_text(f)}  CPU {_fmt(f.cpu_ms_per_answer.get('service'), 2)} "
            f"ms/stream  RSS {_fmt(f.service_rss_mib, 0)} MiB  busy "
            f"{_fmt((f.machine_busy or 0) * 100, 0)}% (other {_fmt((f.other_load or 0) * 100, 0)}%)"
            f"  workers {_split(f)}"
        )
    return (
        f"{f.name:>15}: {f.answers_per_s:7.1f} answers/s  p50 {_fmt(f.p50)} ms  "
        f"p99 {_fmt(f.p99)} ms  overhead p50 {_fmt(f.overhead_p50)} ms  "
        f"own p50 {_fmt(f.own_p50)} ms  "
        f"quota/save p99 {_pair(f.phases_p99.get('quota'), f.phases_p99.get('save'))} ms  "
        f"errors {f.error_count}  CPU {_fmt(f.cpu_ms_per_answer.get('service'), 2)} ms/answer  "
        f"RSS {_fmt(f.service_rss_mib, 0)} MiB  busy {_fmt((f.machine_busy or 0) * 100, 0)}% "
        f"(other {_fmt((f.other_load or 0) * 100, 0)}%)  new conns {f.new_db_connections}  "
        f"workers {_split(f)}" + _v12_console(f)
    )


def _v12_console(f: Figures) -> str:
    parts = []
    if f.refused:
        parts.append(f"refused {f.refused}")
    if f.hits:
        parts.append(f"hits {f.hits} p50/p99 {_pair(f.hit_p50, f.hit_p99)} ms")
    if f.extra.get("rounds"):
        parts.append(f"tool round p50/p99 {_pair(f.extra['round_p50'], f.extra['round_p99'])}"
                     f" ms skew p99 {_fmt(f.extra.get('skew_p99'))} ms")
    own = targets.own_outside_ms(f)
    if own is not None:
        parts.append(f"own {own:.2f} ms")
    calls = targets.summary_calls(f)
    if calls:
        parts.append(f"summary calls {calls:.0f}")
    burner = f.core_share("burner")
    if burner:
        parts.append(f"burner {burner * 100:.0f}%")
    redis = [(use, targets.redis_hit_share(f, use)) for use in ("limits", "context", "answer")]
    redis = [f"{use} {share * 100:.0f}%" for use, share in redis if share is not None]
    if redis:
        fallbacks = f.metric("ai_chat_redis_requests_total", outcome="fallback")
        parts.append(f"Redis hits {', '.join(redis)} (fallbacks {fallbacks:.0f})")
    if f.cpu_ms_per_answer.get("postgres") is not None:
        parts.append(f"PG CPU {f.cpu_ms_per_answer['postgres']:.2f} ms/answer")
    return ("  " + "  ".join(parts)) if parts else ""


def _errors(f: Figures) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(f.errors.items())) or "0"


def _figures_tables(measured) -> list[str]:
    lines = [
        "| scenario | app | upstream ms | clients | answers/s | p50 ms | p99 ms "
        "| overhead p50 / p99 ms | own p50 / p99 ms | quota p50 / p99 ms "
        "| save p50 / p99 ms | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in measured.values():
        f = m.figures
        lines.append(
            f"| {f.name} | {f.app} | {f.upstream_ms:.0f} | {f.clients} | {f.answers_per_s:.1f} "
            f"| {_fmt(f.p50)} | {_fmt(f.p99)} | {_pair(f.overhead_p50, f.overhead_p99)} "
            f"| {_pair(f.own_p50, f.own_p99)} "
            f"| {_pair(f.phases_p50.get('quota'), f.phases_p99.get('quota'))} "
            f"| {_pair(f.phases_p50.get('save'), f.phases_p99.get('save'))} | {_errors(f)} |"
        )
    lines += [
        "",
        "| scenario | answers | window s | gunicorn CPU ms/answer | PostgreSQL CPU ms/answer "
        "| fake LLM CPU ms/answer | load generator CPU ms/answer | machine busy "
        "| other load | new DB connections | worker CPU split % | worker RSS MiB "
        "| service RSS / PSS MiB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
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
            f"| {_split(f)} | {rss} | {_pair(f.service_rss_mib, f.service_pss_mib, 0)} |"
        )
    return lines


def _real_tables(measured) -> list[str]:
    """The 1000-client scenarios and the streams, with what the model allows."""
    real = [(f.name if len(m.repeats) < 2 else f"{f.name} (round {number})", f)
            for m in measured.values() if not m.figures.stream and m.figures.upstream_ms >= 1000
            for number, f in enumerate(m.repeats, 1)]
    streams = [m.figures for m in measured.values() if m.figures.stream]
    if not real and not streams:
        return ["Not run."]
    lines = [
        "Clients start one after another over the ramp (client i at i x ramp ÷ clients "
        "seconds), each on its own keep-alive connection; the window starts after the "
        "warm-up (the ramp, one whole answer of the model and 1 s), so every client is in "
        "its steady loop. Bound = clients ÷ the model's time for a whole answer: what a "
        "closed loop could get if the service added nothing. One row per round (--repeat); "
        "the targets take the medians. Errors count the whole run, "
        "ramp included, and the drain after the window (two whole answers of the model + "
        "2 s; requests still running then are cut, counted neither as answers nor as "
        "errors). RSS / PSS: the gunicorn master and its workers together "
        "at the end of the window (PSS counts the pages they share once). Load generator "
        "and fake LLM: their CPU in the window as % of one core (each is one Python "
        "process: near 100 % it would set the pace, not the service).",
        "",
    ]
    if real:
        lines += [
            "| scenario | app | model ms | clients | ramp / warm-up / window s | answers/s "
            "| bound /s | p50 ms | p99 ms | quota p50 / p99 ms | save p50 / p99 ms | errors "
            "| service RSS / PSS MiB | gunicorn CPU ms/answer "
            "| load generator / fake LLM CPU % |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for label, f in real:
            lines.append(
                f"| {label} | {f.app} | {f.answer_ms:.0f} | {f.clients} "
                f"| {f.ramp_s:.0f} / {f.warmup_s:.0f} / {f.window_s:.0f} "
                f"| {f.answers_per_s:.1f} | {_fmt(f.bound_per_s)} | {_fmt(f.p50, 0)} "
                f"| {_fmt(f.p99, 0)} "
                f"| {_pair(f.phases_p50.get('quota'), f.phases_p99.get('quota'))} "
                f"| {_pair(f.phases_p50.get('save'), f.phases_p99.get('save'))} | {_errors(f)} "
                f"| {_pair(f.service_rss_mib, f.service_pss_mib, 0)} "
                f"| {_fmt(f.cpu_ms_per_answer.get('service'), 2)} | {_shares(f)} |"
            )
        lines.append("")
    if streams:
        lines += [
            "Streams: POST /v1/chat/stream read as Server-Sent Events. TTFT = time from the "
            "request to the first `delta` event; the model sends its first token "
            f"{streams[0].upstream_ms:.0f} ms after it gets the call, so TTFT − that = how "
            "late the service's first delta is (its own work before the model call, the "
            "model call's set-up, and getting the piece to the client). A stream is answered "
            "when it ends with `done`. After the first delta the load generator reads each "
            f"stream every {STREAM_POLL_S * 1000:.0f} ms, not at every piece (see "
            "bench/loadgen.py), so \"done\" is up to that much late.",
            "",
            "| scenario | app | clients | ramp / warm-up / window s | streams/s | bound /s "
            "| TTFT p50 / p99 / max ms | first delta after the model's p50 / p99 ms "
            "| done p50 / p99 ms | errors | service RSS / PSS MiB | gunicorn CPU ms/stream "
            "| load generator / fake LLM CPU % |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for f in streams:
            late = f.first_delta_after_model
            lines.append(
                f"| {f.name} | {f.app} | {f.clients} "
                f"| {f.ramp_s:.0f} / {f.warmup_s:.0f} / {f.window_s:.0f} "
                f"| {f.answers_per_s:.1f} | {_fmt(f.bound_per_s)} "
                f"| {_fmt(f.ttft_p50, 0)} / {_fmt(f.ttft_p99, 0)} / {_fmt(f.ttft_max, 0)} "
                f"| {_pair(late[0], late[1], 0)} | {_pair(f.p50, f.p99, 0)} | {_errors(f)} "
                f"| {_pair(f.service_rss_mib, f.service_pss_mib, 0)} "
                f"| {_fmt(f.cpu_ms_per_answer.get('service'), 2)} | {_shares(f)} |"
            )
    return lines


def _shares(f: Figures) -> str:
    shares = [f.core_share(group) for group in ("loadgen", "fake_llm")]
    return " / ".join("–" if share is None else f"{share * 100:.0f}" for share in shares)


def _comparisons(measured, repeat: int) -> list[str]:
    lines = [
        f"Pairs measured in {repeat} round(s), the two apps one after the other in each round; "
        "the ratios are per round, and the median is the figure (the rounds in brackets).",
        "",
        "| service | forward-only | rounds | answers/s (median) | answers/s ratio "
        "| gunicorn CPU ms/answer (median) | CPU ratio |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    pairs = [*PAIRS, ("stream-1000", "fwd-stream-1000"), ("stream-5", "fwd-stream-5")]
    for service, forward in pairs:
        if service not in measured or forward not in measured:
            continue
        answers, cpu = targets.ratios(measured, service, forward)
        rates = [_median_of(measured[name], lambda r: r.answers_per_s)
                 for name in (service, forward)]
        costs = [_median_of(measured[name], lambda r: r.cpu_ms_per_answer.get("service"))
                 for name in (service, forward)]
        lines.append(
            f"| {service} | {forward} | {len(answers)} | {_pair(*rates)} "
            f"| {targets.rounds_text(answers)} | {_pair(*costs, 2)} "
            f"| {targets.rounds_text(cpu)} |"
        )
    if "fast-50" in measured and "fast-50-warning" in measured:
        info, plain = measured["fast-50"].figures, measured["fast-50-warning"].figures
        ci, cp = info.cpu_ms_per_answer.get("service"), plain.cpu_ms_per_answer.get("service")
        change = (info.answers_per_s / plain.answers_per_s - 1) * 100 if plain.answers_per_s else 0
        lines += [
            "",
            f"Cost of the per-request log line (LOG_LEVEL=INFO, the default, vs WARNING; "
            f"upstream 0 ms, 50 clients, first round): {info.answers_per_s:.1f} vs "
            f"{plain.answers_per_s:.1f} answers/s ({change:+.0f}%), gunicorn CPU {_fmt(ci, 2)} "
            f"vs {_fmt(cp, 2)} ms/answer" + (f" ({ci - cp:+.2f} ms)." if ci and cp else "."),
        ]
    return lines


def _v12_names(measured) -> list[str]:
    wanted = {name for pair in V12_PAIRS for name in pair[:2]} | {"cache-50"}
    return [s.name for s in PLAN if s.name in measured and s.name in wanted]


def _v12_tables(measured) -> list[str]:
    """Every round of the v1.2 scenarios and of the twins they are judged against."""
    names = _v12_names(measured)
    if not names:
        return ["Not run."]
    lines = [
        "One row per round (the scenario and its twin ran one after the other in each "
        "round). Refused: 429s of the returning users at their limit (a fifth of the "
        "pool; expected, not errors). Hits: answers from the common-answer cache "
        "(Server-Timing without `llm`). Own: the service's time per answer outside the "
        "model and the main server (mean; `bench/targets.py` `own_outside_ms`). Summary "
        "calls: folds that called the model (`ai_chat_summary_folds_total`). CPU columns in "
        "ms per answer; burner: the CPU burner's share of a core.",
        "",
        "| scenario | round | answers/s | p50 / p99 ms | quota p50 / p99 ms "
        "| save p99 ms | refused | hits (p50 / p99 ms) | tool round p50 / p99 ms "
        "| own ms | summary calls / 100 answers | Redis context hits % (fallbacks) | errors "
        "| gunicorn CPU | PostgreSQL CPU | machine busy / other | burner % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name in names:
        for number, f in enumerate(measured[name].repeats, 1):
            own = targets.own_outside_ms(f)
            calls = targets.summary_calls(f) / f.answers * 100 if f.answers else None
            burner = f.core_share("burner")
            hits = (f"{f.hits} ({_pair(f.hit_p50, f.hit_p99)})" if f.hits else "–")
            rounds = (_pair(f.extra.get("round_p50"), f.extra.get("round_p99"))
                      if f.extra.get("rounds") else "–")
            lines.append(
                f"| {name} | {number} | {f.answers_per_s:.1f} | {_pair(f.p50, f.p99, 0)} "
                f"| {_pair(f.phases_p50.get('quota'), f.phases_p99.get('quota'))} "
                f"| {_fmt(f.phases_p99.get('save'))} | {f.refused or '–'} | {hits} "
                f"| {rounds} | {_fmt(own, 2)} | {_fmt(calls)} | {_redis(f)} | {_errors(f)} "
                f"| {_fmt(f.cpu_ms_per_answer.get('service'), 2)} "
                f"| {_fmt(f.cpu_ms_per_answer.get('postgres'), 2)} "
                f"| {_fmt((f.machine_busy or 0) * 100, 0)}% / "
                f"{_fmt((f.other_load or 0) * 100, 0)}% "
                f"| {_fmt(None if burner is None else burner * 100, 0)} |"
            )
    return lines


def _redis(f: Figures) -> str:
    share = targets.redis_hit_share(f, "context")
    if share is None:
        return "–"
    fallbacks = f.metric("ai_chat_redis_requests_total", outcome="fallback")
    return f"{share * 100:.0f} ({fallbacks:.0f})"


def _median_of(m, key):
    return median([key(r) for r in m.repeats])


def targets_block(measured) -> str:
    return "\n".join(["Targets:", *targets.target_lines(measured)])


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


def fault_lines(result) -> list[str]:
    """The fault-injection run (bench/faults.py): faults, what they did,
    requests, answers and the invariants' violations."""
    if result is None:
        return ["Not run."]
    if isinstance(result, str):
        return [result]
    lines = [
        f"`bench/faults.py` (the driver of `tests/test_fault_injection.py`, "
        f"`tests/fault_run.py`): {result.clients} clients asking for "
        f"{result.planned_seconds:.0f} s ({result.seconds:.0f} s until every client had its "
        "answer; sends and streams, half with a `request_id` retried after a failure, a few "
        "busy users who reach the daily limit, a fifth of the questions a seller's general "
        "first question for the common-answer cache) against the service at its defaults on a "
        "throwaway PostgreSQL cluster and a throwaway Redis, while the faults below fire at "
        "seeded moments and an operator deletes histories, resets counters and sets limits. "
        "After it: quiet, every user's `GET /v1/chat/limits` (twice), one more PostgreSQL "
        "restart with nothing running, one normal send, and the invariants.",
        "",
        "| fault | planned | injected |",
        "|---|--:|--:|",
        *[f"| {name} | {planned} | {result.faults.get(name, 0)} |"
          for name, planned in result.planned.items()],
        "",
        "Redis faults, seconds into the run: " + ", ".join(
            f"{kind} {began:.1f}-{ended:.1f}" for kind, began, ended in result.redis_faults_at)
        + ".",
        "",
        "| operation | planned | done (200) |",
        "|---|--:|--:|",
        *[f"| {name} | {planned} | {done} |"
          for name, (planned, done) in result.operations.items()],
        "",
        "What the faults were seen to do (PostgreSQL's log, the fake model's outcomes, the "
        "service's log and `/metrics`, the `/health/ready` answers asked all along):",
        "",
        "| effect | count |",
        "|---|--:|",
        *[f"| {name} | {count} |" for name, count in result.effects.items()],
        "",
        "Sessions terminated: by pg_terminate_backend and by each restart (every session). "
        "Backends hit while active / idle: the state of the session a cancel or terminate "
        "picked. Stuck streams: those of clients that stopped reading which began (200) and "
        "which the service ended before the client closed its socket. Redis kills / pauses "
        "the service fell back from / came back from: those within which it logged "
        "\"redis unavailable\" (or within 1 s after) / after which it logged \"redis is "
        "back\" (within 5 s). `redis <use> <outcome>`: `ai_chat_redis_requests_total`.",
        "",
        f"{result.questions} questions, {result.answered} answered. Answers p50 / p99: "
        + ", ".join(f"{kind} {_fmt(p50, 0)} / {_fmt(p99, 0)} ms"
                    for kind, (p50, p99) in result.latency_ms.items()) + ".",
        "",
        "| requests (kind, status, code) | count |",
        "|---|--:|",
        *[f"| {name} | {count} |" for name, count in sorted(result.requests.items())],
        "",
        "The checks examined: " + ", ".join(
            f"{name} {count}" for name, count in result.checked.items()) + ".",
        "",
        *[f"Note: {note}." for note in result.notes],
        f"**Invariant violations: {len(result.violations)}** (goal 0)"
        + (":" if result.violations else "."),
        *[f"- {violation}" for violation in result.violations],
    ]
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


def kept_analysis(previous: str) -> str | None:
    """The hand-written analysis of a RESULTS.md (between the markers), if any."""
    start = previous.find(ANALYSIS_START)
    end = previous.find(ANALYSIS_END, start)
    if start < 0 or end < 0:
        return None
    return previous[start + len(ANALYSIS_START) : end].strip("\n")


def render(measured, profile, settings_, elapsed: float, quick: bool, failures=None,
           costs=None, ceiling=None, indexes=None, repeat: int = 1,
           analysis: str | None = None, faults=None, usage=None) -> str:
    gunicorn = settings_["gunicorn"]
    engine = settings_["engine"]
    overrides = settings_["overrides"]
    files = settings_.get("open_files")
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench.run`); the analysis at the end is "
        "written by hand. Compare figures within one run only: the load generator, "
        "PostgreSQL and the fake LLM share the two cores with the service.",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; whole run {elapsed:.0f} s "
        f"({elapsed / 60:.1f} min)"
        + (" (**--quick: smoke figures, not for comparison**)" if quick else ""),
        f"- Machine: {_machine()}; CPU calibration (1M-step Python loop, best of 5) "
        + " ms at the start, ".join(f"{ms:.1f}" for ms in settings_.get("calibration_ms", []))
        + " ms at the end",
        f"- Service at its defaults: gunicorn {gunicorn['worker_class']}, {gunicorn['workers']} "
        f"workers x {gunicorn['threads']} threads, timeout {gunicorn['timeout']} s, "
        f"keepalive {gunicorn['keepalive']} s; SQLAlchemy pool {engine['pool_size']} + "
        f"overflow {engine['max_overflow']} per worker, pool_timeout {engine['pool_timeout']} s; "
        "LOG_LEVEL=INFO (the request log line goes to a file, as the container's stdout "
        "would) except in fast-50-warning; DAILY_LIMIT high, a fresh telegram_id per "
        "request (new user: the context read finds nothing)",
        "- Forward-only app: `bench/forward_app.py`, same gunicorn.conf.py and settings, same "
        "`openai` client settings; no Flask, validation, database, logging or metrics; "
        "never alive at the same time as the service",
        "- Load: closed loop, C clients with one keep-alive connection each "
        "(`bench/loadgen.py`, asyncio); the window starts after a warm-up"
        + ("" if not files else f"; open files (soft limit) {files[1]}"
           + (f", raised from {files[0]} for the bench and its children"
              if files[1] != files[0] else "")),
        f"- Rounds of the service/forward-only pairs: {repeat} (--repeat)",
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
        "## Real model latencies: 1000 chats and 1000 streams",
        "",
        *_real_tables(measured),
        "",
        "## Service against the forward-only floor",
        "",
        *_comparisons(measured, repeat),
        "",
        "## Targets",
        "",
        *targets.target_lines(measured),
        "",
        "## v1.2: overload, tools, Redis, memory, spend",
        "",
        *_v12_tables(measured),
        "",
        "## Spend report over a million model calls",
        "",
        *usage_lines(usage),
        "",
        "## Leak run",
        "",
        *_leak(measured),
        "",
        "## Fault injection",
        "",
        *fault_lines(faults),
        "",
        "## Ceiling of one PostgreSQL for the hot path (pgbench)",
        "",
        *(ceiling_lines(ceiling)),
        "",
        "## Indexes: worth keeping?",
        "",
        *(index_lines(indexes) if indexes is not None else ["Not run."]),
        "",
        "## Profile of a send under load",
        "",
        *_profile(profile),
        "",
        "## Single-thread cost of one send and of its database work",
        "",
        "`bench/whatif.py`: in-process, one thread, CPU of this process only (the fake LLM "
        "runs elsewhere), fastest of 5 interleaved batches. No GIL contention, so this is "
        "the floor of the service's own work.",
        "",
        *(whatif.table(costs) if costs else ["Not run."]),
        "",
        "## Analysis (hand-written)",
        "",
        ANALYSIS_START,
        analysis if analysis is not None else ANALYSIS_PLACEHOLDER,
        ANALYSIS_END,
    ]
    return "\n".join(lines) + "\n"


def ceiling_lines(result) -> list[str]:
    if result is None:
        return ["Not run."]
    if isinstance(result, str):
        return [result]
    return ceiling.table(result)


def usage_lines(result) -> list[str]:
    return usage.table(result)


def index_lines(result) -> list[str]:
    return indexes.table(result)
