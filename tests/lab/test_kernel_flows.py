"""Long-lived flows on the kernel engine (``lab up --engine kernel``): a
node killed under 300 flows, and a backend drained on every node followed
by a node drain that moves flows to nodes that never saw them. Maglev in
nftables with direct server return: every node sends a flow to the same
backend, so neither may break a single flow, and after the backend drain
no new flow may reach the drained backend. Needs root, FRR, nft and
ExaBGP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anycast_lb.lab import flow_scenarios
from anycast_lb.lab.builder import Lab
from tests.lab.support import fresh_lab, require

pytestmark = pytest.mark.lab

require()

FLOWS = flow_scenarios.FLOWS


@pytest.fixture(scope="module")
def kernel_lab() -> Iterator[Lab]:
    yield from fresh_lab(engine="kernel")


def _run(lab: Lab, name: str, out: Path) -> dict[str, Any]:
    result = flow_scenarios.run_flow_scenario(lab, name, out)
    assert (out / "timeline.png").stat().st_size > 1000
    assert result["engine"] == "kernel"
    assert result["established_total"] >= FLOWS, result
    assert result["broken_before_event"] == 0, result
    # Every backend took flows: the tables spread them (3 backends).
    assert len(result["established_by_backend"]) == len(lab.topo.backends), result
    return result


def _explain(result: dict[str, Any]) -> str:
    keys = ("established_broken", "failure_kinds", "fib_converged_ms", "longest_gap_ms",
            "longest_gap_at_ms", "new_flows_by_backend", "checks")
    return ", ".join(f"{k}={result.get(k)}" for k in keys)


def test_node_kill_breaks_no_flow(kernel_lab: Lab, tmp_path: Path) -> None:
    """SIGKILL of a node: the router moves its flows to the live nodes,
    which hash them to the same backends."""
    result = _run(kernel_lab, "flows-node-kill", tmp_path)
    assert result["established_broken"] == 0, _explain(result)
    assert result["pass"], _explain(result)
    assert result["longest_gap_ms"] is not None


def test_backend_drain_keeps_its_flows_and_takes_no_new_ones(kernel_lab: Lab,
                                                             tmp_path: Path) -> None:
    """be1 drained on every node, then the victim drains: flows pinned to
    be1 that move to another node miss its flow map and take the previous
    table (still be1); new flows never reach be1."""
    result = _run(kernel_lab, "flows-backend-drain", tmp_path)
    assert result["established_by_backend"].get("be1", 0) > 0, _explain(result)
    assert result["established_broken"] == 0, _explain(result)
    assert result["new_flows_probed"] >= flow_scenarios.PROBE_FLOWS // 2, _explain(result)
    assert result["new_flows_to_drained_backend"] == 0, _explain(result)
    assert result["pass"], _explain(result)
