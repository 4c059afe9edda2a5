"""CPU accounting for a load run: every process involved and the kernel's
softirq time, from /proc/stat and /proc/PID/stat. Pure parts first (tested
in tests/unit/test_kernel_bench.py), then the thin readers.

How Linux charges the time (``CONFIG_TICK_CPU_ACCOUNTING``, the kernel this
was written on; proc(5), kernel/sched/cputime.c): each timer tick goes to
the running task and to one ``cpuN`` column of /proc/stat. A tick that lands
in softirq is counted in the ``softirq`` column *and* in the system time of
the task it interrupted (a process sending on a veth runs the receiver's
softirq work inline, in its own context; ``ksoftirqd/N`` runs what is left).
So:

- the CPU of every process involved, plus ``ksoftirqd``, is the whole cost
  of the path (softirq work included, counted once);
- the /proc/stat ``softirq`` (+ ``irq``) columns say how much of it was
  softirq work, machine-wide: a share of the processes' time, not an addend;
- machine busy time minus the processes involved is other work sharing the
  machine (other jobs on a shared host), reported as ``other``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.lbbench import procfs

STAT_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
"""The first eight columns of a ``cpu`` line of /proc/stat, in clock ticks."""


def parse_stat_cpu(text: str) -> dict[str, int]:
    """The aggregate ``cpu`` line (all CPUs) of /proc/stat as ticks per column
    of :data:`STAT_COLUMNS`. Raises ValueError when the line is missing or short."""
    for line in text.splitlines():
        name, *values = line.split()
        if name == "cpu":
            if len(values) < len(STAT_COLUMNS):
                raise ValueError(f"short cpu line in /proc/stat: {line!r}")
            return {col: int(v) for col, v in zip(STAT_COLUMNS, values, strict=False)}
    raise ValueError("no aggregate cpu line in /proc/stat")


def busy_ticks(columns: Mapping[str, int]) -> int:
    """Busy ticks of a :func:`parse_stat_cpu` result: every column but idle and iowait."""
    return sum(v for k, v in columns.items() if k not in ("idle", "iowait"))


@dataclass(frozen=True)
class CpuSample:
    """One reading: /proc/stat's aggregate line and CPU ticks per label."""

    machine: Mapping[str, int]
    processes: Mapping[str, int]
    """utime + stime ticks per label (a label may add several process trees)."""
    wall_s: float
    extra_s: Mapping[str, float] = field(default_factory=dict)
    """Seconds per label measured another way (e.g. waited children's rusage)."""


@dataclass(frozen=True)
class CpuBreakdown:
    """CPU seconds between two samples."""

    processes: dict[str, float]
    """Per label: user + system seconds (softirq run in its context included)."""
    involved_s: float
    """Sum of ``processes``: the cost of the path."""
    softirq_s: float
    """Machine-wide softirq + irq seconds (part of ``involved_s``, and of other work's)."""
    other_s: float
    """Machine busy seconds not spent by the labelled processes (>= 0)."""
    wall_s: float


def breakdown(before: CpuSample, after: CpuSample, ticks_per_s: int) -> CpuBreakdown:
    """What the run between ``before`` and ``after`` cost, in seconds. A label
    missing from ``before`` counts from 0 (a process started in between)."""
    labels = sorted(set(after.processes) | set(after.extra_s))
    procs: dict[str, float] = {}
    for label in labels:
        ticks = after.processes.get(label, 0) - before.processes.get(label, 0)
        extra = after.extra_s.get(label, 0.0) - before.extra_s.get(label, 0.0)
        procs[label] = max(ticks, 0) / ticks_per_s + max(extra, 0.0)
    involved = sum(procs.values())
    busy = (busy_ticks(after.machine) - busy_ticks(before.machine)) / ticks_per_s
    soft = sum(after.machine[c] - before.machine[c] for c in ("softirq", "irq")) / ticks_per_s
    return CpuBreakdown(procs, involved, soft, max(busy - involved, 0.0),
                        after.wall_s - before.wall_s)


def per_unit(cpu: CpuBreakdown, units: float) -> dict[str, float | None]:
    """Seconds per unit (per GB, per connection) of each part: every label,
    ``involved`` and ``softirq``; None for a run that did no unit."""
    if units <= 0:
        return {k: None for k in [*cpu.processes, "involved", "softirq"]}
    out: dict[str, float | None] = {k: v / units for k, v in cpu.processes.items()}
    out["involved"] = cpu.involved_s / units
    out["softirq"] = cpu.softirq_s / units
    return out


_UPDATE_RE = re.compile(
    r"^(?P<label>[^:]+): (?P<slots>\d+) slots changed, (?P<lines>\d+) script lines; "
    r"render median (?P<render>[\d.]+) ms, apply median (?P<apply>[\d.]+) ms, "
    r"render\+apply median (?P<total>[\d.]+) ms, max (?P<max>[\d.]+) ms; "
    r"CPU \(this process and nft\) median (?P<cpu>[\d.]+) ms")


def parse_update_report(text: str) -> dict[str, dict[str, float]]:
    """The per-change lines benchmarks/kernel_update.py prints, by label
    (e.g. ``remove one backend (both tables)``): slots, lines and the ms
    figures (render, apply, total, max, cpu). Lines of another shape are skipped."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = _UPDATE_RE.match(line.strip())
        if match:
            fields = match.groupdict()
            label = fields.pop("label")
            out[label] = {k: float(v) for k, v in fields.items()}
    return out


# ---------------------------------------------------------------- readers


def ksoftirqd_pids(proc: Path = Path("/proc")) -> list[int]:
    """PIDs of the ``ksoftirqd/N`` kernel threads (softirq work deferred from
    interrupts and busy periods runs there)."""
    out = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().startswith("ksoftirqd/"):
                    out.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return out


def parse_stat_ticks_with_children(text: str) -> int:
    """utime + stime + cutime + cstime (fields 14-17, clock ticks) from the
    text of /proc/PID/stat: the process's own CPU and that of its children it
    waited for (e.g. the ``nft`` runs of a node). Raises ValueError on a
    malformed line."""
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 15:
        raise ValueError(f"malformed /proc/PID/stat: {text[:80]!r}")
    return sum(int(f) for f in fields[11:15])


def tree_ticks(pids: Sequence[int], proc: Path = Path("/proc")) -> int:
    """CPU ticks of each PID's process tree (live descendants, and children
    each waited for), summed."""
    ticks = 0
    for pid in pids:
        for p in procfs.process_tree(pid, proc):
            try:
                ticks += parse_stat_ticks_with_children((proc / str(p) / "stat").read_text())
            except (FileNotFoundError, ProcessLookupError):
                continue
    return ticks


def children_seconds() -> float:
    """user + system seconds of this process's waited-for children (the load
    tools the benchmark runs to completion)."""
    usage = os.times()
    return usage.children_user + usage.children_system


def sample(groups: Mapping[str, Sequence[int]], waited_label: str | None = None) -> CpuSample:
    """Read /proc/stat and every group's process trees now; ``waited_label``
    names the waited-for children (see :func:`children_seconds`)."""
    machine = parse_stat_cpu(Path("/proc/stat").read_text())
    procs = {label: tree_ticks(pids) for label, pids in groups.items()}
    extra = {waited_label: children_seconds()} if waited_label else {}
    return CpuSample(machine, procs, time.monotonic(), extra)
