"""The pure CPU accounting of benchmarks/kernel_path.py (benchmarks/lbbench/cpuacct.py)."""

from __future__ import annotations

import pytest

from benchmarks.lbbench import cpuacct

STAT = """\
cpu  1000 20 300 5000 40 6 70 0 0 0
cpu0 500 10 150 2500 20 3 35 0 0 0
cpu1 500 10 150 2500 20 3 35 0 0 0
intr 12345
"""


def test_parse_stat_cpu_reads_the_aggregate_line() -> None:
    cols = cpuacct.parse_stat_cpu(STAT)
    assert cols == {"user": 1000, "nice": 20, "system": 300, "idle": 5000, "iowait": 40,
                    "irq": 6, "softirq": 70, "steal": 0}
    assert cpuacct.busy_ticks(cols) == 1000 + 20 + 300 + 6 + 70


@pytest.mark.parametrize("text", ["cpu0 1 2 3 4 5 6 7 8\n", "cpu 1 2 3\n", ""])
def test_parse_stat_cpu_refuses_missing_or_short_lines(text: str) -> None:
    with pytest.raises(ValueError):
        cpuacct.parse_stat_cpu(text)


def test_stat_ticks_with_children_adds_fields_14_to_17() -> None:
    # Fields: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
    # majflt cmajflt utime stime cutime cstime ...
    text = "42 (anycast lb) (x)) S 1 42 42 0 -1 4194560 10 0 0 0 7 5 30 11 20 0 3 0"
    assert cpuacct.parse_stat_ticks_with_children(text) == 7 + 5 + 30 + 11
    with pytest.raises(ValueError):
        cpuacct.parse_stat_ticks_with_children("42 (x) S 1 2")


def _machine(busy_user: int, softirq: int, idle: int) -> dict[str, int]:
    return {"user": busy_user, "nice": 0, "system": 0, "idle": idle, "iowait": 0,
            "irq": 0, "softirq": softirq, "steal": 0}


def test_breakdown_charges_processes_softirq_and_other_work() -> None:
    before = cpuacct.CpuSample(_machine(100, 10, 1000), {"lb": 50, "server": 20}, 10.0,
                               {"client": 1.0})
    after = cpuacct.CpuSample(_machine(400, 60, 1200), {"lb": 150, "server": 70, "new": 10},
                              12.0, {"client": 1.5})
    cpu = cpuacct.breakdown(before, after, ticks_per_s=100)
    assert cpu.processes == {"client": 0.5, "lb": 1.0, "new": 0.1, "server": 0.5}
    assert cpu.involved_s == pytest.approx(2.1)
    assert cpu.softirq_s == pytest.approx(0.5)
    # Machine busy 3.5 s (300 user + 50 softirq ticks), 2.1 s of it involved.
    assert cpu.other_s == pytest.approx(1.4)
    assert cpu.wall_s == 2.0
    per_gb = cpuacct.per_unit(cpu, 4.0)
    assert per_gb["involved"] == pytest.approx(0.525)
    assert per_gb["softirq"] == pytest.approx(0.125)
    assert per_gb["lb"] == pytest.approx(0.25)
    assert set(cpuacct.per_unit(cpu, 0).values()) == {None}


def test_breakdown_never_reports_negative_other_work() -> None:
    before = cpuacct.CpuSample(_machine(0, 0, 0), {"lb": 0}, 0.0)
    after = cpuacct.CpuSample(_machine(100, 0, 0), {"lb": 150}, 1.0)
    assert cpuacct.breakdown(before, after, 100).other_s == 0.0


def test_parse_update_report_reads_kernel_update_lines() -> None:
    text = """backends 1000, slots 65537
maglev build: 45 ms; first full load (render + nft -f): 676 ms
remove one backend (both tables): 471 slots changed, 7 script lines; render median 10.6 ms, \
apply median 36.8 ms, render+apply median 47.8 ms, max 68.4 ms; CPU (this process and nft) \
median 25.1 ms (15 runs)
drain one backend (current table): 471 slots changed, 2 script lines; render median 5.0 ms, \
apply median 31.9 ms, render+apply median 37.1 ms, max 41.2 ms; CPU (this process and nft) \
median 16.3 ms (15 runs)
"""
    got = cpuacct.parse_update_report(text)
    assert set(got) == {"remove one backend (both tables)", "drain one backend (current table)"}
    remove = got["remove one backend (both tables)"]
    assert remove == {"slots": 471.0, "lines": 7.0, "render": 10.6, "apply": 36.8,
                      "total": 47.8, "max": 68.4, "cpu": 25.1}
    assert cpuacct.parse_update_report("nothing here") == {}
