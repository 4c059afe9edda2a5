"""A real lab with a 3-member etcd on the management segment (``lab up
--consensus``): the etcd members and the two etcd fault scenarios the issue
runs in CI, against their targets.

``etcd-leader-kill``: 0 failed new connections, 0 withdraws, every node's
table digests equal throughout. ``etcd-quorum-loss``: 0 withdraws, 0 failed
new connections, every node ``isolated`` within 5 s and back in sync within
5 s of quorum returning. Both read the nodes' ``/status`` (per service
table digest, ``consensus.state``); a build whose node does not show them
fails here, naming the field. Needs root, FRR, ExaBGP and etcd.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from anycast_lb.lab import builder, etcd, netns
from anycast_lb.lab import consensus_scenarios as CS
from anycast_lb.lab import topology as T
from anycast_lb.lab.builder import Lab
from anycast_lb.lab.cli import status_data
from anycast_lb.lab.scenarios import run_scenario
from tests.lab.support import fresh_lab, require

pytestmark = pytest.mark.lab

require(("etcd", shutil.which("etcd") is not None and shutil.which("etcdctl") is not None))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from fresh_lab(bfd=False, consensus=True)


def _failed(result: dict[str, object]) -> str:
    checks = result["checks"]
    assert isinstance(checks, dict)
    return (f"failed checks {[k for k, v in checks.items() if not v]}, "
            f"not available {result.get('not_available')}")


def test_etcd_members_on_the_management_segment(lab: Lab) -> None:
    members = status_data(lab)["etcd"]["members"]
    assert [m["name"] for m in members] == ["etcd1", "etcd2", "etcd3"]
    assert all(m["pid"] and m["answering"] for m in members)
    assert sum(1 for m in members if m["leader"]) == 1
    for m in members:
        host = ipaddress.ip_address(m["client_url"].split("//")[1].split(":")[0])
        assert host in T.MGMT_PREFIX
        assert not str(etcd.data_dir(lab.topo.etcd_member(m["name"]))).startswith("/run")
    # The nodes reach etcd; the client has no route to the management segment.
    out = netns.run(["etcdctl", "--endpoints", ",".join(lab.topo.etcd_urls()),
                     "--dial-timeout=1s", "endpoint", "status", "-w", "json"],
                    ns=lab.topo.nodes[0].ns)
    assert len(json.loads(out)) == 3
    router = netns.run(["ip", "route", "get", str(lab.topo.etcd[0].address)],
                       ns=lab.topo.router_ns, check=False)
    assert not router.strip(), router     # no route: the client's packets go nowhere

def test_etcd_leader_kill(lab: Lab, tmp_path: Path) -> None:
    result = run_scenario(lab, "etcd-leader-kill", tmp_path,
                          scenario=CS.CONSENSUS_SCENARIOS["etcd-leader-kill"])
    assert (tmp_path / "timeline.png").exists()
    assert result["new_connections_failed"] == 0
    assert result["checks"]["fib_unchanged"]
    assert result["etcd_new_leader"] != result["etcd_leader"]
    assert result["pass"], _failed(result)
    assert etcd.healthy(lab.topo)        # the killed member is back


def test_etcd_quorum_loss(lab: Lab, tmp_path: Path) -> None:
    result = run_scenario(lab, "etcd-quorum-loss", tmp_path,
                          scenario=CS.CONSENSUS_SCENARIOS["etcd-quorum-loss"])
    assert len(result["etcd_killed"]) == 2
    assert result["new_connections_failed"] == 0
    assert result["checks"]["fib_unchanged"]
    assert result["etcd_down_s"] is not None and result["etcd_down_s"] >= CS.QUORUM_LOSS_S
    assert result["pass"], _failed(result)
    assert etcd.healthy(lab.topo)


def test_teardown_removes_etcd(lab: Lab) -> None:
    pids = [(p.pid, p.start) for p in lab.state.processes if p.role == etcd.ROLE]
    assert len(pids) == 3
    builder.down()
    assert netns.lab_namespaces() == []
    assert not any(netns.proc_start(pid) == start and netns.pid_alive(pid)
                   for pid, start in pids)
    assert not (etcd.DATA_DIR / "etcd").exists()
    assert builder.leftovers() == []
