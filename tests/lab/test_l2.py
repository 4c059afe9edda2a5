"""A real L2 lab (``lab up --l2``): the elected VIP moved by gratuitous ARP
between real nodes, measured at a client on the same segment.

``l2-owner-kill`` (SIGKILL of the owner's anycast-lb) and
``l2-owner-isolated`` (the owner cut from etcd only, still on the LAN)
against their targets: traffic resumes within ``lease_ttl`` + 0.5 s, the
next node (lb2) owns the VIP, and no probe round is answered by two MACs.
Needs root, FRR, ExaBGP, etcd and nft. About 60 s.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from anycast_lb.lab import l2, netns, nodes
from anycast_lb.lab import topology as T
from anycast_lb.lab.builder import Lab
from tests.lab.support import fresh_lab, require

pytestmark = pytest.mark.lab

require(("etcd", shutil.which("etcd") is not None))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from fresh_lab(bfd=False, l2=True)


def _explain(result: dict[str, object]) -> str:
    keep = ("checks", "udp_lost", "resumed_ms", "split_brain_ms", "split_brain_spans_ms",
            "old_owner", "new_owner", "announcements", "probe_answering")
    return json.dumps({k: result.get(k) for k in keep})


def test_the_owner_alone_holds_the_vips(lab: Lab) -> None:
    for node in lab.topo.nodes:
        out = json.loads(netns.run(["ip", "-j", "addr", "show", node.lan_if], ns=node.ns))
        held = {a["local"] for link in out for a in link["addr_info"]}
        has = {str(T.L2_VIP), str(T.L2_VIP6)} & held
        assert has == ({str(T.L2_VIP), str(T.L2_VIP6)} if node.name == "lb1" else set())
    assert l2.holders(lab, str(T.L2_VIP)) == ["lb1"]


@pytest.mark.parametrize("name", ["l2-owner-kill", "l2-owner-isolated"])
def test_unplanned_move(lab: Lab, tmp_path: Path, name: str) -> None:
    result = l2.run_l2_scenario(lab, name, tmp_path / name)
    bound = (nodes.L2_LEASE_TTL_S + l2.RESUME_SLACK_S) * 1000
    assert result["new_owner"] == "lb2", _explain(result)
    assert result["split_brain_ms"] == 0, _explain(result)
    assert result["passive_overlap_ms"] == 0, _explain(result)
    assert result["resumed_ms"] is not None and 0 < result["resumed_ms"] <= bound, \
        _explain(result)
    assert result["recovered"], "lb1 did not own the VIPs again after the fault was undone"
    assert (tmp_path / name / "timeline.png").stat().st_size > 0
