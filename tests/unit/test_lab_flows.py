"""Pure parts of the lab's flow scenarios: figures and verdicts from flow records."""

from __future__ import annotations

from typing import Any

import pytest

from anycast_lb.lab import flows
from anycast_lb.lab.flow_results import FlowTarget, analyse, end_time

PEERS = {"198.51.100.129": "lb1", "198.51.100.130": "lb2", "198.51.100.131": "lb3"}
NHOPS = {"203.0.113.6": "lb1", "203.0.113.10": "lb2", "203.0.113.14": "lb3"}
ALL = ["203.0.113.10", "203.0.113.14", "203.0.113.6"]
WITHOUT_LB1 = ["203.0.113.10", "203.0.113.14"]
EVENT = 2.0


def flow(peer: str, open_s: float | None = 0.5, failed_s: float | None = None,
         kind: str = "", late_kind: str = "", late_s: float | None = None,
         connect_s: float = 0.4, open_error: str = "") -> dict[str, Any]:
    return {"index": 0, "connect_s": connect_s, "open_s": open_s, "open_error": open_error,
            "backend": "be1", "peer": peer, "messages": 10, "last_ok_s": 1.9,
            "failed_s": failed_s, "kind": kind, "sent_s": failed_s, "late_kind": late_kind,
            "late_s": late_s}


def run(records: list[dict[str, Any]], target: FlowTarget, victim_dies: bool = False,
        changes: list[tuple[float, list[str]]] | None = None,
        expected: list[str] = WITHOUT_LB1) -> dict[str, Any]:
    if changes is None:
        changes = [(0.0, ALL), (EVENT + 0.06, WITHOUT_LB1)]
    return analyse("flows-test", {"flows": records}, EVENT, changes, expected, "lb1",
                   victim_dies, PEERS, NHOPS, target)


def test_nothing_broken_meets_the_flow_survival_target() -> None:
    records = [flow("198.51.100.129"), flow("198.51.100.130"), flow("198.51.100.131")]
    r = run(records, FlowTarget(min_established=3, max_broken=0))
    assert (r["established_total"], r["established_broken"], r["victim_flows"]) == (3, 0, 1)
    assert r["established_by_node"] == {"lb1": 1, "lb2": 1, "lb3": 1}
    assert r["fib_converged_ms"] == 60.0
    assert r["checks"] == {"enough_established": True, "fib_changed": True,
                           "broken_within_target": True}
    assert r["pass"]


def test_victim_and_collateral_breaks_are_split() -> None:
    records = [flow("198.51.100.129", failed_s=2.07, kind="reset"),
               flow("198.51.100.130", failed_s=2.09, kind="reset"),
               flow("198.51.100.131")]
    r = run(records, FlowTarget(min_established=3, max_broken=0))
    assert (r["established_broken"], r["victim_broken"], r["collateral_broken"]) == (2, 1, 1)
    assert r["broken_by_node"] == {"lb1": 1, "lb2": 1}
    assert (r["first_break_ms"], r["last_break_ms"]) == (70.0, 90.0)
    assert r["failure_kinds"] == {"reset": 2}
    assert not r["checks"]["broken_within_target"] and not r["pass"]


def test_the_baseline_target_only_needs_a_valid_run() -> None:
    records = [flow("198.51.100.129", failed_s=2.07, kind="reset"), flow("198.51.100.130")]
    assert run(records, FlowTarget(min_established=2))["pass"]
    assert not run(records, FlowTarget(min_established=3))["checks"]["enough_established"]
    never = run(records, FlowTarget(min_established=2), changes=[(0.0, ALL)])
    assert never["fib_converged_ms"] is None and not never["pass"]


def test_dead_owner_resets_are_timed_from_the_event() -> None:
    records = [flow("198.51.100.129", failed_s=2.3, kind="reset"),
               flow("198.51.100.129", failed_s=2.5, kind="eof"),
               flow("198.51.100.130")]
    target = FlowTarget(min_established=3, zero_collateral=True, dead_owner_reset_ms=1000)
    r = run(records, target, victim_dies=True)
    assert (r["dead_owner_flows"], r["dead_owner_closed"], r["dead_owner_hang"]) == (2, 2, 0)
    assert r["dead_owner_reset_ms"] == {"median": 400.0, "max": 500.0, "min": 300.0}
    assert r["dead_owner_end_kinds"] == {"reset": 1, "eof": 1}
    assert r["checks"]["dead_owner_reset_fast"] and r["checks"]["zero_collateral"]
    assert r["pass"]


@pytest.mark.parametrize("record, why", [
    (flow("198.51.100.129", failed_s=3.0, kind="hang", late_kind="reset", late_s=3.2),
     "a hang, even with a late RST"),
    (flow("198.51.100.129", failed_s=3.1, kind="reset"), "a RST after 1.1 s"),
    (flow("198.51.100.129"), "a flow of the dead node that never ended"),
])
def test_dead_owner_target_misses(record: dict[str, Any], why: str) -> None:
    target = FlowTarget(min_established=1, zero_collateral=True, dead_owner_reset_ms=1000)
    r = run([flow("198.51.100.129", failed_s=2.3, kind="reset"), record], target,
            victim_dies=True)
    assert not r["checks"]["dead_owner_reset_fast"], why
    assert not r["pass"]


def test_a_hang_with_a_late_reset_counts_as_closed_late() -> None:
    hung = flow("198.51.100.129", failed_s=3.0, kind="hang", late_kind="reset", late_s=4.5)
    assert end_time(hung) == 4.5
    assert end_time(flow("198.51.100.129", failed_s=3.0, kind="hang")) is None
    r = run([hung], FlowTarget(min_established=1), victim_dies=True)
    assert r["dead_owner_end_kinds"] == {"hang+reset": 1}
    assert r["dead_owner_reset_ms"]["max"] == 2500.0


def test_collateral_with_a_dead_owner_misses_the_target() -> None:
    records = [flow("198.51.100.129", failed_s=2.3, kind="reset"),
               flow("198.51.100.131", failed_s=2.3, kind="reset")]
    target = FlowTarget(min_established=2, zero_collateral=True, dead_owner_reset_ms=1000)
    r = run(records, target, victim_dies=True)
    assert r["checks"]["dead_owner_reset_fast"]
    assert not r["checks"]["zero_collateral"] and not r["pass"]


def test_churn_figures() -> None:
    records = [flow("198.51.100.130", connect_s=1.5, open_s=1.51),
               # Handshake under way when the FIB changed at 2.06 s.
               flow("198.51.100.129", connect_s=2.05, open_s=2.07),
               flow("198.51.100.131", connect_s=2.5, open_s=2.51),
               flow("", connect_s=2.055, open_s=None, open_error="reset")]
    target = FlowTarget(min_established=3, max_broken=0, churn=True)
    r = run(records, target, expected=WITHOUT_LB1)
    assert (r["flows_total"], r["established_total"], r["open_failed"]) == (4, 3, 1)
    assert r["open_failure_kinds"] == {"reset": 1}
    assert r["opened_after_event"] == 2
    assert r["opening_at_fib_change"] == 2
    assert (r["opened_1s_before_fib_change"], r["opened_1s_after_fib_change"]) == (1, 2)
    assert r["checks"]["opening_across_fib_change"] and r["pass"]
    # Every flow open long before the join: not a churn run.
    early = [flow("198.51.100.130", connect_s=0.1, open_s=0.11)] * 3
    assert not run(early, target)["checks"]["opening_across_fib_change"]


def test_flow_client_refuses_to_run_outside_its_namespace(tmp_path: Any) -> None:
    out = tmp_path / "flows.json"
    assert flows.main(["--ns", "alb-client", "--vip", "198.51.100.10",
                       "--out", str(out)]) == 1
    assert not out.exists()


def test_longest_gaps_over_the_run_and_at_the_event() -> None:
    """The run's longest gap between two echoes of a surviving flow, and the
    longest one the event caused (overlapping event .. FIB settled + 1 s);
    a broken flow's gaps do not count; per backend counts."""
    quiet = {**flow("203.0.113.2"), "max_gap_s": 0.4, "max_gap_at_s": 5.0,
             "slow": [(5.0, 0.4)], "backend": "be1"}
    moved = {**flow("203.0.113.2"), "max_gap_s": 0.23, "max_gap_at_s": 2.2,
             "slow": [(2.2, 0.23), (0.9, 0.3)], "backend": "be2"}
    broken = {**flow("203.0.113.2", failed_s=2.1, kind="reset"), "max_gap_s": 0.9,
              "max_gap_at_s": 2.05, "slow": [(2.05, 0.9)]}
    r = run([quiet, moved, broken], FlowTarget(min_established=3))
    assert r["longest_gap_ms"] == 400.0 and r["longest_gap_at_ms"] == 3000.0
    assert r["longest_gap_at_event_ms"] == 230.0 and r["flows_slowed_at_event"] == 1
    assert r["flows_gap_over_500ms"] == 0
    assert r["established_by_backend"] == {"be1": 2, "be2": 1}
    assert run([flow("203.0.113.2")], FlowTarget(min_established=1))["longest_gap_ms"] is None
