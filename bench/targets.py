"""The issues' targets judged on a run's figures: one line each, met / NOT met
with the numbers, or "not measured" when the run did not include them.

Ratios of the service to the forward-only floor are taken per round (the two
apps run one after the other, so a round's pair saw the same machine) and
the median over the rounds (--repeat) is judged.
"""

from __future__ import annotations

from bench.stats import Figures, median

# Performance at real model latencies.
REAL_MIN_ANSWERS_PER_S = 180.0
REAL_MAX_P99_MS = 6500.0
MAX_SERVICE_RSS_MIB = 800.0
REAL_MAX_PHASE_P99_MS = 10.0
STREAM_TTFT_SLACK_MS = 150.0  # stream-1000: TTFT p99 <= the model's first token + this
SINGLE_STREAM_SLACK_MS = 100.0  # stream-5: the first delta this soon after the model's
MAX_CPU_RATIO = 1.5
FAST_MIN_RATIO = 0.6
# Earlier issues.
SLOW50_MIN_ANSWERS_PER_S = 90.0
SLOW50_MAX_P99_MS = 650.0
SLOW200_MIN_RATIO = 0.8
MAX_OVERHEAD_P50_MS = 5.0
LIGHT_MAX_PHASE_P99_MS = 2.0
# RSS growth from the middle to the end of the leak run that still counts as flat.
LEAK_TOLERANCE_MIB = 2.0


def fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**NOT met**")


def errors_text(f: Figures) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sorted(f.errors.items())) or "none"


def ratios(measured, service: str, forward: str) -> tuple[list[float], list[float]]:
    """Per round: service answers/s ÷ forward-only's, and gunicorn CPU per answer
    of the service ÷ forward-only's."""
    if service not in measured or forward not in measured:
        return [], []
    answers, cpu = [], []
    for s, f in zip(measured[service].repeats, measured[forward].repeats, strict=False):
        if f.answers_per_s:
            answers.append(s.answers_per_s / f.answers_per_s)
        cs, cf = s.cpu_ms_per_answer.get("service"), f.cpu_ms_per_answer.get("service")
        if cs and cf:
            cpu.append(cs / cf)
    return answers, cpu


def rounds_text(values: list[float]) -> str:
    """"0.52x (median of 0.49, 0.52, 0.60)", or one figure when there was one round."""
    middle = median(values)
    if len(values) < 2:
        return f"{fmt(middle, 2)}x"
    return f"{fmt(middle, 2)}x (median of {', '.join(f'{v:.2f}' for v in values)})"


def leak_growth(m) -> list[float] | None:
    points = dict(m.rss_points)
    if "middle" not in points or "end" not in points:
        return None
    return [end - middle for middle, end in zip(points["middle"], points["end"], strict=False)]


def _figures(measured, name: str) -> Figures | None:
    return measured[name].figures if name in measured else None


def _over_rounds(m, key, digits: int = 1, unit: str = "") -> tuple[float | None, str]:
    """The median over the rounds of ``key(figures)``, and its text: the median,
    with every round's value in brackets when there was more than one."""
    values = [v for v in map(key, m.repeats) if v is not None]
    if not values:
        return None, "–"
    middle = median(values)
    text = f"{fmt(middle, digits)}{unit}"
    if len(values) < 2:
        return middle, text
    return middle, f"{text} (median of {', '.join(fmt(v, digits) for v in values)})"


def real_latency_lines(measured) -> list[str]:
    """The issue "Performance at real model latencies" (and the single stream's).
    real-1000 runs in rounds (--repeat) like the other pairs: its throughput,
    latency and phase figures are medians over them, errors the sum, RSS the
    largest."""
    lines = []
    head = "- real-1000 (model 5 s, 1000 clients):"
    if "real-1000" not in measured:
        lines.append(f"{head} {verdict(None)}")
    else:
        m = measured["real-1000"]
        f = m.figures
        floor = measured.get("fwd-real-1000")
        rate, rate_text = _over_rounds(m, lambda r: r.answers_per_s, unit="/s")
        p99, p99_text = _over_rounds(m, lambda r: r.p99, 0, " ms")
        _, p50_text = _over_rounds(m, lambda r: r.p50, 0, " ms")
        errors = sum(r.error_count for r in m.repeats)
        rss = max((r.service_rss_mib for r in m.repeats if r.service_rss_mib), default=None)
        pss = max((r.service_pss_mib for r in m.repeats if r.service_pss_mib), default=None)
        floor_rate = _over_rounds(floor, lambda r: r.answers_per_s, unit="/s")[1] if floor else ""
        floor_text = f"; forward-only {floor_rate}" if floor else ""
        lines += [
            f"{head} >= {REAL_MIN_ANSWERS_PER_S:.0f} answers/s — "
            f"{verdict(rate >= REAL_MIN_ANSWERS_PER_S)} ({rate_text} "
            f"of at most {fmt(f.bound_per_s)}/s = clients ÷ model time{floor_text})",
            f"{head} p99 <= {REAL_MAX_P99_MS / 1000:.1f} s — "
            f"{verdict(p99 is not None and p99 <= REAL_MAX_P99_MS)} "
            f"(p50 {p50_text}, p99 {p99_text})",
            f"{head} zero errors — {verdict(errors == 0)} "
            f"({'; '.join(errors_text(r) for r in m.repeats) if errors else 'none in any round'})",
            f"{head} RSS of all the service's processes <= {MAX_SERVICE_RSS_MIB:.0f} MiB — "
            f"{verdict(rss is not None and rss <= MAX_SERVICE_RSS_MIB)}"
            f" ({fmt(rss, 0)} MiB RSS, {fmt(pss, 0)} MiB PSS at most, "
            "master + workers at the end of the window)",
        ]
        for phase in ("quota", "save"):
            value, text = _over_rounds(m, lambda r, p=phase: r.phases_p99.get(p), unit=" ms")
            _, p50 = _over_rounds(m, lambda r, p=phase: r.phases_p50.get(p), unit=" ms")
            lines.append(
                f"{head} {phase} p99 <= {REAL_MAX_PHASE_P99_MS:.0f} ms (Server-Timing) — "
                f"{verdict(None if value is None else value <= REAL_MAX_PHASE_P99_MS)} "
                f"({text}; p50 {p50})"
            )
    f = _figures(measured, "stream-1000")
    if f is None:
        lines.append(f"- stream-1000: TTFT p99 <= model's first token + "
                     f"{STREAM_TTFT_SLACK_MS:.0f} ms — {verdict(None)}")
    else:
        limit = f.upstream_ms + STREAM_TTFT_SLACK_MS
        lines.append(
            f"- stream-1000 (first token 500 ms, 200 pieces over 4.5 s, 1000 streams): "
            f"TTFT p99 <= {limit:.0f} ms — "
            f"{verdict(f.ttft_p99 is not None and f.ttft_p99 <= limit)} (TTFT p50 "
            f"{fmt(f.ttft_p50, 0)} ms, p99 {fmt(f.ttft_p99, 0)} ms; {f.answers_per_s:.1f} "
            f"streams/s of at most {fmt(f.bound_per_s)}/s; errors: {errors_text(f)}; RSS "
            f"{fmt(f.service_rss_mib, 0)} MiB)"
        )
    f = _figures(measured, "stream-5")
    p50, p99 = f.first_delta_after_model if f else (None, None)
    lines.append(
        f"- stream-5 (single-stream figure): first delta within "
        f"{SINGLE_STREAM_SLACK_MS:.0f} ms of the model's first token (median stream) — "
        f"{verdict(None if p50 is None else p50 <= SINGLE_STREAM_SLACK_MS)}"
        + (f" (+{fmt(p50, 0)} ms median, +{fmt(p99, 0)} ms p99, "
           f"+{fmt(f.ttft_max - f.upstream_ms if f.ttft_max else None, 0)} ms max over "
           f"{f.answers} streams)" if p50 is not None else "")
    )
    return lines


def cpu_lines(measured) -> list[str]:
    """CPU per answer and throughput against the forward-only floor (medians of rounds)."""
    lines = []
    for service, forward in (("fast-50", "fwd-fast-50"), ("slow-50", "fwd-slow-50"),
                             ("slow-200", "fwd-slow-200")):
        _, cpu = ratios(measured, service, forward)
        ok = None if not cpu else median(cpu) <= MAX_CPU_RATIO
        figures = ""
        if cpu:
            costs = [median([r.cpu_ms_per_answer.get("service") for r in measured[name].repeats])
                     for name in (service, forward)]
            figures = (f" ({rounds_text(cpu)}; {fmt(costs[0], 2)} vs {fmt(costs[1], 2)} "
                       "ms median)")
        lines.append(f"- gunicorn CPU per answer at INFO <= {MAX_CPU_RATIO}x forward-only, "
                     f"{service}: {verdict(ok)}{figures}")
    answers, _ = ratios(measured, "fast-50", "fwd-fast-50")
    ok = None if not answers else median(answers) >= FAST_MIN_RATIO
    lines.append(
        f"- upstream 0 ms, 50 clients (CPU-bound): answers/s >= {FAST_MIN_RATIO}x "
        f"forward-only — {verdict(ok)}" + (f" ({rounds_text(answers)})" if answers else "")
    )
    return lines


def earlier_lines(measured) -> list[str]:
    lines = []
    f = _figures(measured, "slow-50")
    ok = None if not f else (f.answers_per_s >= SLOW50_MIN_ANSWERS_PER_S
                             and (f.p99 or 1e9) <= SLOW50_MAX_P99_MS and f.error_count == 0)
    lines.append(
        f"- upstream 500 ms, 50 clients: >= {SLOW50_MIN_ANSWERS_PER_S:.0f} answers/s, p99 <= "
        f"{SLOW50_MAX_P99_MS:.0f} ms, zero errors — {verdict(ok)}"
        + (f" ({f.answers_per_s:.1f} answers/s, p99 {fmt(f.p99)} ms, "
           f"{f.error_count} errors)" if f else "")
    )
    f = _figures(measured, "slow-200")
    answers, _ = ratios(measured, "slow-200", "fwd-slow-200")
    ok = None if not f or not answers else (f.error_count == 0
                                            and median(answers) >= SLOW200_MIN_RATIO)
    lines.append(
        f"- upstream 500 ms, 200 clients: zero errors, >= {SLOW200_MIN_RATIO}x forward-only — "
        f"{verdict(ok)}" + (f" ({f.error_count} errors, {rounds_text(answers)})"
                            if ok is not None else "")
    )
    f = _figures(measured, "slow-20")
    ok = None if not f or f.overhead_p50 is None else f.overhead_p50 <= MAX_OVERHEAD_P50_MS
    lines.append(
        f"- service overhead p50 <= {MAX_OVERHEAD_P50_MS:.0f} ms at 20 clients — {verdict(ok)}"
        + (f" (client latency − upstream call p50 = {fmt(f.overhead_p50)} ms; "
           f"Server-Timing total − llm p50 = {fmt(f.own_p50)} ms)" if ok is not None else "")
    )
    quota = f and f.phases_p99.get("quota")
    save = f and f.phases_p99.get("save")
    ok = None if quota is None or save is None else (
        quota <= LIGHT_MAX_PHASE_P99_MS and save <= LIGHT_MAX_PHASE_P99_MS)
    lines.append(
        f"- quota reservation and save <= {LIGHT_MAX_PHASE_P99_MS:.0f} ms p99 each "
        f"(Server-Timing, 20 clients) — {verdict(ok)}"
        + (f" (quota {fmt(quota)} ms, save {fmt(save)} ms)" if ok is not None else "")
    )
    leak = measured.get("leak")
    growth = leak and leak_growth(leak)
    ok = None if not growth else all(value <= LEAK_TOLERANCE_MIB for value in growth)
    lines.append(
        f"- no leak: worker RSS flat over the leak run (<= {LEAK_TOLERANCE_MIB:.0f} MiB growth "
        f"from its middle to its end) — {verdict(ok)}"
        + (f" ({leak.figures.extra.get('requests')} requests; growth "
           f"{', '.join(f'{g:+.1f}' for g in growth)} MiB per worker)" if ok is not None else "")
    )
    lines.append("- at most 3 database statements per answered send, 1 per 429 — asserted by "
                 "`tests/test_round_trips.py` (counts statements, not times)")
    return lines


def target_lines(measured) -> list[str]:
    return [
        "Performance at real model latencies (and the single stream):",
        "",
        *real_latency_lines(measured),
        "",
        "CPU per answer and throughput against the forward-only app (LOG_LEVEL=INFO):",
        "",
        *cpu_lines(measured),
        "",
        "Earlier targets:",
        "",
        *earlier_lines(measured),
        "",
        "v1.2 (overload, tools, Redis, memory, spend; medians of rounds):",
        "",
        *v12_lines(measured),
    ]


# --- v1.2 (bench/scenarios.py V12_PAIRS) -----------------------------------------------
STARVED_MIN_RATIO = 0.9  # answers/s of the service ÷ the starved floor's
STARVED_FLOOR_P99_MS = 60_000.0  # no 503 while the floor's p99 is under this
MAIN_SERVER_DELAY_MS = 100.0
TOOL_ROUND_SLACK_MS = 30.0  # a round of two calls <= one call + this
TOOLS_MAX_OWN_RATIO = 1.5  # own time per answer with tools <= this x a send's
CACHE_HIT_MAX_P99_MS = 20.0
REDIS_MAX_PG_CPU_RATIO = 0.7
REDIS_MAX_SERVICE_CPU_RATIO = 1.1
# "Does not move": the median of the rounds with the part is under this much
# more than the median without, or under the highest round without.
NOISE_RATIO = 1.1


def _rounds(measured, first: str, second: str):
    """The rounds of two scenarios, paired (they ran one after the other)."""
    if first not in measured or second not in measured:
        return []
    return list(zip(measured[first].repeats, measured[second].repeats, strict=False))


def own_outside_ms(f: Figures) -> float | None:
    """The service's own time per answer outside the model and the main server
    (ms, mean over the window): the send's Server-Timing total (from
    /metrics) less the model calls' time less the tool rounds' time as the
    fake main server saw it (from the first call's arrival to the last's
    answer)."""
    count = f.metric("ai_chat_send_phase_duration_seconds_count", phase="total")
    if not count:
        return None
    total = f.metric("ai_chat_send_phase_duration_seconds_sum", phase="total")
    model = f.metric("ai_chat_llm_request_duration_seconds_sum")
    rounds = f.extra.get("rounds") or 0
    main = (f.extra.get("round_mean") or 0.0) * rounds / count
    return (total - model) / count * 1000 - main


def redis_hit_share(f: Figures, use: str) -> float | None:
    """Hits of one Redis use (limits, context, answer) as a share of its lookups."""
    outcomes = {o: f.metric("ai_chat_redis_requests_total", use=use, outcome=o)
                for o in ("hit", "miss", "fallback")}
    total = sum(outcomes.values())
    return outcomes["hit"] / total if total else None


def summary_calls(f: Figures) -> float:
    """The summary model calls of the window (folds that called the model)."""
    return sum(f.metric("ai_chat_summary_folds_total", outcome=outcome)
               for outcome in ("ok", "dropped", "failed"))


def _moved(with_values: list[float], without_values: list[float]) -> bool | None:
    """True when the median with the part is above both the noise bound and
    every round without it."""
    if not with_values or not without_values:
        return None
    middle = median(with_values)
    return middle > NOISE_RATIO * median(without_values) and middle > max(without_values)


def _values(pairs, side: int, key) -> list[float]:
    return [v for v in (key(pair[side]) for pair in pairs) if v is not None]


def _list(values, digits: int = 1) -> str:
    return ", ".join(fmt(v, digits) for v in values) or "–"


def v12_lines(measured) -> list[str]:
    """The v1.2 issues' targets (overload, tools, Redis, memory, spend)."""
    lines = []
    # 1. Overload.
    pairs = _rounds(measured, "real-1000-starved", "fwd-real-1000-starved")
    head = "- overload (real-1000 on one core beside a CPU burner)"
    if not pairs:
        lines.append(f"{head}: {verdict(None)}")
    else:
        ratios_ = [s.answers_per_s / f.answers_per_s for s, f in pairs if f.answers_per_s]
        lines.append(
            f"{head}: answers/s >= {STARVED_MIN_RATIO}x the starved floor's — "
            f"{verdict(median(ratios_) >= STARVED_MIN_RATIO if ratios_ else None)} "
            f"({rounds_text(ratios_)}; {_list([s.answers_per_s for s, _ in pairs])} vs "
            f"{_list([f.answers_per_s for _, f in pairs])} answers/s)"
        )
        refused = [s.errors.get("http_503", 0) for s, _ in pairs]
        floor_p99 = [f.p99 for _, f in pairs]
        applies = all(p is not None and p < STARVED_FLOOR_P99_MS for p in floor_p99)
        lines.append(
            f"{head}: no 503 while the floor's p99 < {STARVED_FLOOR_P99_MS / 1000:.0f} s — "
            f"{verdict(sum(refused) == 0 if applies else None)} (503s per round "
            f"{', '.join(map(str, refused))}; floor p99 {_list(floor_p99, 0)} ms, service p99 "
            f"{_list([s.p99 for s, _ in pairs], 0)} ms; other errors: "
            f"{'; '.join(errors_text(s) for s, _ in pairs)})"
        )
    # 2. Tools.
    m = measured.get("tools-50")
    head = "- tools-50 (two tools of one round, main server 100 ms, model 500 ms)"
    if m is None:
        lines.append(f"{head}: {verdict(None)}")
    else:
        limit = MAIN_SERVER_DELAY_MS + TOOL_ROUND_SLACK_MS
        p99, p99_text = _over_rounds(m, lambda r: r.extra.get("round_p99"), unit=" ms")
        _, p50_text = _over_rounds(m, lambda r: r.extra.get("round_p50"), unit=" ms")
        _, skew = _over_rounds(m, lambda r: r.extra.get("skew_p99"), unit=" ms")
        lines.append(
            f"{head}: the round's two calls <= one call + {TOOL_ROUND_SLACK_MS:.0f} ms "
            f"({limit:.0f} ms, p99, as the main server saw them) — "
            f"{verdict(None if p99 is None else p99 <= limit)} (p50 {p50_text}, p99 {p99_text};"
            f" second call's arrival after the first's p99 {skew})"
        )
        pairs = _rounds(measured, "tools-50", "slow-50")
        ratios_ = [a / b for a, b in ((own_outside_ms(t), own_outside_ms(s)) for t, s in pairs)
                   if a is not None and b]
        lines.append(
            f"{head}: the service's own time per answer outside the model and the main "
            f"server <= {TOOLS_MAX_OWN_RATIO}x a send's (slow-50) — "
            f"{verdict(median(ratios_) <= TOOLS_MAX_OWN_RATIO if ratios_ else None)} "
            f"({rounds_text(ratios_)}; {_list([own_outside_ms(t) for t, _ in pairs], 2)} vs "
            f"{_list([own_outside_ms(s) for _, s in pairs], 2)} ms)"
        )
        errors = sum(r.error_count for r in m.repeats)
        lines.append(f"{head}: zero errors — {verdict(errors == 0)} "
                     f"({'; '.join(errors_text(r) for r in m.repeats)})")
    # 3. Redis.
    m = measured.get("cache-50")
    head = "- cache-50 (20 common questions, a tenth asked once; Redis)"
    if m is None:
        lines.append(f"{head}: {verdict(None)}")
    else:
        p99, text = _over_rounds(m, lambda r: r.hit_p99, unit=" ms")
        _, p50 = _over_rounds(m, lambda r: r.hit_p50, unit=" ms")
        _, rate = _over_rounds(m, lambda r: r.hits / r.answers * 100 if r.answers else None,
                               unit=" %")
        saved = [r.hits / r.window_s for r in m.repeats if r.window_s]
        lines.append(
            f"{head}: a hit answers with p99 <= {CACHE_HIT_MAX_P99_MS:.0f} ms — "
            f"{verdict(None if p99 is None else p99 <= CACHE_HIT_MAX_P99_MS)} (p50 {p50}, "
            f"p99 {text}; hit rate {rate}; model calls saved {_list(saved)} /s; errors: "
            f"{'; '.join(errors_text(r) for r in m.repeats)})"
        )
    for base, suffix in (("fast-50-users", "-redis"), ("slow-200-users", "-redis"),
                         ("fast-50-users", "-redis500"), ("slow-200-users", "-redis500"),
                         ("fast-50-users", "-redisdefault")):
        pairs = _rounds(measured, f"{base}{suffix}", base)
        head = f"- {base} with Redis against without" + {
            "-redis": " (REDIS_USER_CACHE=true)",
            "-redis500": " (REDIS_USER_CACHE=true, REDIS_TIMEOUT=0.5)",
            "-redisdefault": " (at its defaults: common answers and breakers only)",
        }[suffix]
        if not pairs:
            lines.append(f"{head}: {verdict(None)}")
            continue
        checks = (("postgres", REDIS_MAX_PG_CPU_RATIO, "PostgreSQL"),
                  ("service", REDIS_MAX_SERVICE_CPU_RATIO, "gunicorn"))
        # At its defaults Redis holds nothing of a returning user: PostgreSQL
        # does the same work, and the workers must not pay for Redis.
        for group, limit, what in checks[1:] if suffix == "-redisdefault" else checks:
            values = [(r.cpu_ms_per_answer.get(group), b.cpu_ms_per_answer.get(group))
                      for r, b in pairs]
            ratios_ = [a / b for a, b in values if a is not None and b]
            context = [redis_hit_share(r, "context") for r, _ in pairs]
            fallbacks = [sum(r.metric("ai_chat_redis_requests_total", use=u, outcome="fallback")
                             for u in ("limits", "context")) for r, _ in pairs]
            lines.append(
                f"{head}: {what} CPU per answer <= {limit}x — "
                f"{verdict(median(ratios_) <= limit if ratios_ else None)} "
                f"({rounds_text(ratios_)}; {_list([a for a, _ in values], 2)} vs "
                f"{_list([b for _, b in values], 2)} ms; Redis context hits "
                f"{_list([None if c is None else c * 100 for c in context], 0)} %, "
                f"fallbacks {_list(fallbacks, 0)})"
            )
    # 4. Memory.
    for base in ("fast-50-users", "slow-200-users"):
        pairs = _rounds(measured, base, f"{base}-nosum")
        head = f"- {base} with summaries against without"
        if not pairs:
            lines.append(f"{head}: {verdict(None)}")
            continue
        with_p99 = _values(pairs, 0, lambda r: r.p99)
        without_p99 = _values(pairs, 1, lambda r: r.p99)
        moved = _moved(with_p99, without_p99)
        calls = [summary_calls(r) / r.answers * 100 for r, _ in pairs if r.answers]
        lines.append(
            f"{head}: send p99 does not move — "
            f"{verdict(None if moved is None else not moved)} (p99 {_list(with_p99, 0)} vs "
            f"{_list(without_p99, 0)} ms; {_list(calls)} summary calls per 100 answers)"
        )
    # 5. Spend.
    for base in ("fast-50", "real-1000"):
        pairs = _rounds(measured, f"{base}-spend", base)
        head = f"- {base} with prices and a spend cap against without"
        if not pairs:
            lines.append(f"{head}: {verdict(None)}")
            continue
        with_p99 = _values(pairs, 0, lambda r: r.phases_p99.get("quota"))
        without_p99 = _values(pairs, 1, lambda r: r.phases_p99.get("quota"))
        moved = _moved(with_p99, without_p99)
        lines.append(
            f"{head}: quota p99 does not move — "
            f"{verdict(None if moved is None else not moved)} (quota p99 "
            f"{_list(with_p99)} vs {_list(without_p99)} ms; answers/s "
            f"{_list(_values(pairs, 0, lambda r: r.answers_per_s))} vs "
            f"{_list(_values(pairs, 1, lambda r: r.answers_per_s))})"
        )
    return lines
