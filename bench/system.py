"""CPU time and memory of the processes under test, read from /proc (Linux).

CPU is utime + stime of each process; the service's figure sums the gunicorn
master and its workers (children of the master). The machine's busy share
comes from /proc/stat, so a run can tell whether the two cores were saturated.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (gunicorn workers of a master)."""
    found = []
    for candidate in _all_pids():
        fields = _stat_fields(candidate)
        if fields is not None and fields[1] == str(pid):
            found.append(candidate)
    return found


def pids_named(name: str) -> list[int]:
    found = []
    for pid in _all_pids():
        try:
            with open(f"/proc/{pid}/comm") as handle:
                if handle.read().strip() == name:
                    found.append(pid)
        except OSError:
            continue
    return found


def postgres_pids(database: str) -> list[int]:
    """PostgreSQL's own processes and the backends connected to ``database``.

    Backends of other databases (other test runs on the machine) are left out.
    A backend that exits inside the window (a pool overflow connection) takes
    its CPU time with it: the PostgreSQL figure is a lower bound.
    """
    found = []
    for pid in pids_named("postgres"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                title = handle.read().decode("utf-8", "replace")
        except OSError:
            continue
        is_backend = "(" in title or "[local]" in title
        if not is_backend or f" {database} " in title:
            found.append(pid)
    return found


def _proc_mib(path: str, field: str) -> float:
    """A ``field: N kB`` line of a /proc file, in MiB (0 when the process is gone
    or the file does not exist)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mib(pid: int) -> float:
    """Resident set size in MiB (0 when the process is gone)."""
    return _proc_mib(f"/proc/{pid}/status", "VmRSS:")


def pss_mib(pid: int) -> float:
    """Proportional set size in MiB: pages shared between the gunicorn master and
    its workers (preload_app, copy-on-write) counted once across them, unlike RSS.
    0 when the process is gone or the kernel has no smaps_rollup."""
    return _proc_mib(f"/proc/{pid}/smaps_rollup", "Pss:")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot."""
    with open("/proc/stat") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def wait_quiet(limit: float = 5.0, busy_share: float = 0.15) -> float:
    """Wait (at most ``limit`` s) until the machine is under ``busy_share`` busy.

    Other work on the machine (another test run) skews every figure; a short
    wait before each scenario lets a burst pass. Returns the last busy share.
    """
    deadline = time.monotonic() + limit
    while True:
        first = machine_ticks()
        time.sleep(0.5)
        last = machine_ticks()
        total = last[1] - first[1]
        share = (last[0] - first[0]) / total if total else 0.0
        if share < busy_share or time.monotonic() >= deadline:
            return share


@dataclass
class CpuSnapshot:
    at: float
    seconds: dict[str, float]
    machine: tuple[int, int]


def snapshot(at: float, groups: dict[str, list[int]]) -> CpuSnapshot:
    return CpuSnapshot(
        at=at,
        seconds={name: sum(cpu_seconds(pid) for pid in pids) for name, pids in groups.items()},
        machine=machine_ticks(),
    )


def cpu_between(first: CpuSnapshot, last: CpuSnapshot) -> dict[str, float]:
    """CPU seconds per group between two snapshots, plus the machine's busy share."""
    used = {name: last.seconds[name] - first.seconds.get(name, 0.0) for name in last.seconds}
    busy = last.machine[0] - first.machine[0]
    total = last.machine[1] - first.machine[1]
    used["machine_busy_share"] = busy / total if total else 0.0
    # Whatever else ran on the machine meanwhile (other sessions' tests, say): it
    # makes the window's figures unreliable, so the report shows it.
    groups = sum(value for name, value in used.items()
                 if name != "machine_busy_share" and not name.startswith("worker:"))
    used["other_share"] = max(0.0, (busy / TICKS - groups) / (total / TICKS)) if total else 0.0
    return used


def calibrate(rounds: int = 5) -> float:
    """Milliseconds of CPU for a fixed pure-Python loop, best of ``rounds``.

    The machine is a VM that may share its host: when this figure differs
    between two runs, so does every CPU figure, whatever the service did.
    """
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        total = 0
        for number in range(1_000_000):
            total += number
        best = min(best, (time.process_time() - started) * 1000)
    return best
