"""Figures of one scenario from its raw samples and CPU snapshots."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.loadgen import LoadResult


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile (``share`` in 0..1); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(share * len(ordered) + 0.5)))
    return ordered[rank - 1]


def parse_server_timing(raw: bytes) -> dict[str, float]:
    """``b"quota;dur=0.4, llm;dur=501.2"`` → ``{"quota": 0.4, "llm": 501.2}`` (ms)."""
    timings = {}
    for part in raw.decode("ascii", "replace").split(","):
        name, _, rest = part.strip().partition(";")
        for parameter in rest.split(";"):
            key, _, value = parameter.strip().partition("=")
            if key == "dur":
                try:
                    timings[name] = float(value)
                except ValueError:
                    pass
    return timings


@dataclass
class Figures:
    """What the report shows for one scenario (times in ms, CPU in ms per answer)."""

    name: str
    app: str
    upstream_ms: float  # the model's time to its first (or only) token
    clients: int
    window_s: float
    stream: bool = False
    answer_ms: float = 0.0  # the model's time to its whole answer
    warmup_s: float = 0.0
    ramp_s: float = 0.0
    answers: int = 0
    answers_per_s: float = 0.0
    p50: float | None = None
    p99: float | None = None
    overhead_p50: float | None = None
    overhead_p99: float | None = None
    own_p50: float | None = None
    own_p99: float | None = None
    # Streams: time to the first delta event, from the request's first byte.
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    ttft_max: float | None = None
    phases_p50: dict[str, float | None] = field(default_factory=dict)
    phases_p99: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    cpu_ms_per_answer: dict[str, float | None] = field(default_factory=dict)
    machine_busy: float | None = None
    other_load: float | None = None
    new_db_connections: int | None = None
    worker_cpu_split: list[float] = field(default_factory=list)
    worker_rss_mib: list[float] = field(default_factory=list)
    # The gunicorn master and its workers together, at the end of the window.
    service_rss_mib: float | None = None
    service_pss_mib: float | None = None
    extra: dict = field(default_factory=dict)
    # 429s of returning users at their limit (expected, not errors), in the window.
    refused: int = 0
    # Answers from the common-answer cache (Server-Timing without ``llm``) and
    # their latency; the other answers' latency.
    hits: int = 0
    hit_p50: float | None = None
    hit_p99: float | None = None
    miss_p50: float | None = None
    miss_p99: float | None = None
    # What the service's /metrics counters, histogram sums and counts grew by
    # in the window (service only; bench/scenarios.py ``metrics_between``).
    metrics: dict = field(default_factory=dict)
    window_at: tuple[float, float] | None = None  # perf_counter bounds of the window

    def metric(self, name: str, **labels: str) -> float:
        """The growth of a metric in the window, summed over the series whose
        labels include ``labels`` (0 when none grew)."""
        total = 0.0
        for key, value in self.metrics.items():
            base, _, rest = key.partition("{")
            if base != name:
                continue
            if all(f'{label}="{wanted}"' in rest for label, wanted in labels.items()):
                total += value
        return total

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def core_share(self, group: str) -> float | None:
        """CPU of a process group in the window as a share of one core: the load
        generator and the fake LLM are one Python process each, so near 1.0 they,
        not the service, would set the pace."""
        per_answer = self.cpu_ms_per_answer.get(group)
        return None if per_answer is None else per_answer * self.answers_per_s / 1000

    @property
    def bound_per_s(self) -> float | None:
        """Answers/s the clients could get at best: each waits for the model."""
        return self.clients / (self.answer_ms / 1000) if self.answer_ms > 0 else None

    @property
    def first_delta_after_model(self) -> tuple[float | None, float | None]:
        """Streams: p50 and p99 of the first delta's lateness behind the
        model's first token (ms)."""
        return tuple(None if value is None else value - self.upstream_ms
                     for value in (self.ttft_p50, self.ttft_p99))


def summarise(
    figures: Figures, result: LoadResult, window: tuple[float, float], cpu: dict[str, float]
) -> Figures:
    """Fill ``figures`` from the answers completed inside ``window`` (perf_counter).

    Errors are those of the whole run, warm-up and drain included: an error
    while the clients ramp up is as much an error.
    """
    start, end = window
    inside = [s for s in result.samples if start <= s.started + s.latency <= end]
    answered = [s for s in inside if s.answered]
    latencies = [s.latency * 1000 for s in answered]
    figures.answers = len(answered)
    figures.refused = sum(1 for s in inside if s.status == 429)
    figures.answers_per_s = len(answered) / (end - start)
    figures.p50 = percentile(latencies, 0.50)
    figures.p99 = percentile(latencies, 0.99)
    if figures.stream:
        firsts = [s.first_delta * 1000 for s in answered if s.first_delta is not None]
        figures.ttft_p50 = percentile(firsts, 0.50)
        figures.ttft_p99 = percentile(firsts, 0.99)
        figures.ttft_max = max(firsts, default=None)
    parsed = [(s, parse_server_timing(s.server_timing) if s.server_timing else {})
              for s in answered]
    timings = [t for _, t in parsed if t]
    if not figures.stream:
        # Overhead: what the client waited beyond the upstream call as the app
        # itself timed it (Server-Timing llm), so the fake LLM's own slowness is
        # not counted.
        # (An answer from the common-answer cache has no ``llm`` phase: no call.)
        overheads = [s.latency * 1000 - t.get("llm", 0.0 if "total" in t else figures.upstream_ms)
                     for s, t in parsed]
        figures.overhead_p50 = percentile(overheads, 0.50)
        figures.overhead_p99 = percentile(overheads, 0.99)
    if figures.app == "service" and not figures.stream:
        hits = [s.latency * 1000 for s, t in parsed if t and "llm" not in t]
        misses = [s.latency * 1000 for s, t in parsed if t and "llm" in t]
        figures.hits = len(hits)
        figures.hit_p50, figures.hit_p99 = percentile(hits, 0.5), percentile(hits, 0.99)
        figures.miss_p50, figures.miss_p99 = percentile(misses, 0.5), percentile(misses, 0.99)
    if timings:
        own = [t["total"] - t.get("llm", 0.0) for t in timings if "total" in t]
        figures.own_p50 = percentile(own, 0.50)
        figures.own_p99 = percentile(own, 0.99)
        for phase in ("quota", "context", "llm", "save", "total"):
            values = [t[phase] for t in timings if phase in t]
            figures.phases_p50[phase] = percentile(values, 0.50)
            figures.phases_p99[phase] = percentile(values, 0.99)
    figures.errors = dict(result.errors)
    for group in ("service", "postgres", "fake_llm", "loadgen", "fake_main_server", "burner"):
        if group in cpu:
            figures.cpu_ms_per_answer[group] = (
                cpu[group] * 1000 / figures.answers if figures.answers else None
            )
    workers = [value for name, value in sorted(cpu.items()) if name.startswith("worker:")]
    if sum(workers) > 0:
        figures.worker_cpu_split = [value / sum(workers) for value in workers]
    figures.machine_busy = cpu.get("machine_busy_share")
    figures.other_load = cpu.get("other_share")
    return figures


def median(values: list[float | None]) -> float | None:
    """The median of the known values (the lower middle one of an even count)."""
    known = sorted(value for value in values if value is not None)
    return known[(len(known) - 1) // 2] if known else None
