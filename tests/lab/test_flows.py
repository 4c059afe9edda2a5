"""Long-lived flows through drain, join and silent death: plain anycast vs
flow survival, in a real lab (FRR with BFD, three nodes, 300 flows).

Two labs, one after the other (the lab's namespace names are fixed): plain
anycast first, whose runs must be valid and show the breakage flow survival
exists to prevent (hash-threshold ECMP moves flows between survivors), then the same scenarios with
``--flow-survival``, which must break nothing on drain and join and must
reset a silently dead node's clients within 1 s without touching anyone
else's flow. Both labs run BFD (100 ms x 3), so a silent death is noticed
in about 0.3 s, not after the 3 s hold time. Needs root, FRR and ExaBGP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anycast_lb.lab import builder, flow_scenarios
from anycast_lb.lab.builder import Lab
from tests.lab.support import fresh_lab, require

pytestmark = pytest.mark.lab

require(("FRR bfdd", Path("/usr/lib/frr/bfdd").exists()))

FLOWS = flow_scenarios.FLOWS


def _lab(flow_survival: bool) -> Iterator[Lab]:
    yield from fresh_lab(bfd=True, flow_survival=flow_survival)


# Class scope: each lab is torn down when its class is done, before the next.
@pytest.fixture(scope="class")
def plain_lab() -> Iterator[Lab]:
    yield from _lab(flow_survival=False)


@pytest.fixture(scope="class")
def fs_lab() -> Iterator[Lab]:
    yield from _lab(flow_survival=True)


def _run(lab: Lab, name: str, out: Path) -> dict[str, Any]:
    result = flow_scenarios.run_flow_scenario(lab, name, out)
    assert (out / "timeline.png").stat().st_size > 1000
    assert result["established_total"] >= FLOWS, result
    assert result["broken_before_event"] == 0, result
    return result


def _explain(result: dict[str, Any]) -> str:
    keys = ("established_broken", "broken_by_node", "failure_kinds", "collateral_broken",
            "dead_owner_end_kinds", "dead_owner_reset_ms", "fib_converged_ms", "checks")
    return ", ".join(f"{k}={result.get(k)}" for k in keys)


class TestPlainAnycast:
    """The baseline: each run is valid, and plain anycast breaks flows."""

    @pytest.fixture
    def lab(self, plain_lab: Lab) -> Lab:
        return plain_lab

    def test_drain_breaks_the_victims_flows_and_more(self, lab: Lab, tmp_path: Path) -> None:
        r = _run(lab, "flows-drain", tmp_path)
        assert r["pass"], _explain(r)
        # Out of ECMP, nobody has its sockets: every one of its flows is
        # reset, and hash-threshold moves some of the others too.
        assert r["victim_flows"] > 0 and r["victim_broken"] == r["victim_flows"], _explain(r)
        assert r["collateral_broken"] > 0, _explain(r)
        assert set(r["failure_kinds"]) == {"reset"}, _explain(r)

    def test_join_breaks_moved_flows(self, lab: Lab, tmp_path: Path) -> None:
        r = _run(lab, "flows-join", tmp_path)
        assert r["pass"], _explain(r)
        assert r["victim_flows"] == 0       # it was not running when they opened
        assert r["established_broken"] > 0, _explain(r)
        assert builder.node_running(lab, lab.topo.node("lb1"))

    def test_silent_death_breaks_the_victims_flows_and_more(self, lab: Lab,
                                                            tmp_path: Path) -> None:
        r = _run(lab, "flows-node-silent", tmp_path)
        assert r["pass"], _explain(r)
        assert r["dead_owner_flows"] > 0, _explain(r)
        assert r["victim_broken"] == r["victim_flows"], _explain(r)
        assert r["collateral_broken"] > 0, _explain(r)


class TestFlowSurvival:
    """The same events with flow survival on: no flow of a live node breaks."""

    @pytest.fixture
    def lab(self, fs_lab: Lab) -> Lab:
        return fs_lab

    def test_drain_breaks_no_flow(self, lab: Lab, tmp_path: Path) -> None:
        r = _run(lab, "flows-drain", tmp_path)
        assert r["victim_flows"] > 0, _explain(r)
        assert r["established_broken"] == 0, _explain(r)
        assert r["pass"], _explain(r)

    def test_join_breaks_no_flow(self, lab: Lab, tmp_path: Path) -> None:
        r = _run(lab, "flows-join", tmp_path)
        assert r["established_broken"] == 0, _explain(r)
        assert r["pass"], _explain(r)

    def test_silent_death_resets_its_clients_fast_and_no_one_else(
            self, lab: Lab, tmp_path: Path) -> None:
        r = _run(lab, "flows-node-silent", tmp_path)
        assert r["dead_owner_flows"] > 0, _explain(r)
        assert r["collateral_broken"] == 0, _explain(r)
        assert r["dead_owner_hang"] == 0, _explain(r)
        assert r["dead_owner_reset_ms"]["max"] <= flow_scenarios.DEAD_OWNER_RESET_MS, \
            _explain(r)
        assert r["pass"], _explain(r)
