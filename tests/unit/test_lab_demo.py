"""Which scenarios `anycast-lb lab demo` runs in each phase (pure: no lab)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from anycast_lb.lab import abuse, consensus_scenarios, flow_scenarios, scenarios
from anycast_lb.lab import l2 as l2_
from anycast_lb.lab.cli import KERNEL_DEMO, _chosen


def _demo_set(registry: Mapping[str, Any]) -> list[str]:
    return [n for n, s in registry.items() if s.in_demo]


def test_chosen_default_full_and_named() -> None:
    names = ["a", "b", "c"]
    in_demo = {"a": True, "b": False, "c": True}
    assert _chosen(names, in_demo, (), False) == ["a", "c"]
    assert _chosen(names, in_demo, (), True) == names
    assert _chosen(names, in_demo, ("b", "zz"), False) == ["b"]
    assert _chosen(names, in_demo, ("zz",), True) == []  # a phase without them builds no lab


def test_the_default_demo_shows_each_capability_once() -> None:
    assert _demo_set(scenarios.SCENARIOS) == ["ecmp", "health-fail", "drain", "node-kill",
                                              "backend-fail"]
    assert _demo_set(flow_scenarios.FLOW_SCENARIOS) == ["flows-drain", "flows-node-kill"]
    assert _demo_set(consensus_scenarios.CONSENSUS_SCENARIOS) == [
        "etcd-quorum-loss", "config-push", "backend-kill-agreed"]
    assert _demo_set(abuse.ABUSE_SCENARIOS) == ["udp-flood"]
    assert _demo_set(l2_.L2_SCENARIOS) == ["l2-owner-kill", "l2-drain"]
    assert set(KERNEL_DEMO) <= set(flow_scenarios.KERNEL_SCENARIOS)
