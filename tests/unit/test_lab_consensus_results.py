"""Reading the consensus fields of node /status samples (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from anycast_lb.lab import consensus_results as C
from anycast_lb.lab import topology


def status(digest: str | None = None, state: str | None = None, be_state: str = "up",
           drain: str = "serving", nest: str | None = None) -> dict[str, Any]:
    svc: dict[str, Any] = {"name": "echo", "backends": [
        {"address": "198.51.100.193", "port": 9000, "state": be_state}]}
    if digest is not None:
        if nest:
            svc[nest] = {"digest": digest, "revision": 7}
        else:
            svc["table_digest"] = digest
            svc["table_revision"] = 7
    doc: dict[str, Any] = {"node": {"drain_state": drain}, "services": [svc]}
    if state is not None:
        doc["consensus"] = {"state": state}
    return doc


def test_fields_absent_read_as_none() -> None:
    s = status()
    assert C.digests(s) is None
    assert C.revisions(s) is None
    assert C.consensus_state(s) is None
    assert C.digests(None) is None


@pytest.mark.parametrize("nest", [None, "table", "maglev", "consensus", "agreed"])
def test_digest_found_flat_or_nested(nest: str | None) -> None:
    s = status("abc", nest=nest)
    assert C.digests(s) == {"echo": "abc"}
    assert C.revisions(s) == {"echo": 7}


def test_state_backend_and_drain() -> None:
    s = status("d", state="isolated", be_state="down", drain="graceful")
    assert C.consensus_state(s) == "isolated"
    assert C.backend_down(s, "198.51.100.193") is True
    assert C.backend_down(s, "198.51.100.194") is None
    assert C.drain_state(s) == "graceful"
    local = status("d")
    local["services"][0]["backends"][0]["local_state"] = "down"   # preferred over state
    assert C.backend_down(local, "198.51.100.193") is True



@pytest.mark.parametrize(("agreed", "listed", "local"), [
    ("up", False, "up"), ("up", True, "down"), ("down", True, "up"), ("down", False, "down")])
def test_local_state_is_the_agreed_one_flipped_by_disagreement(
        agreed: str, listed: bool, local: str) -> None:
    s = status("d", state="synced", be_state=agreed)
    s["consensus"]["disagreement"] = {"echo": ["198.51.100.193:9000"] if listed else [],
                                      "web": ["198.51.100.193:9000"]}
    service = s["services"][0]
    assert C.local_state(s, service, service["backends"][0]) == local
    assert C.backend_down(s, "198.51.100.193") is (local == "down")

def test_views_wait_for_every_node_and_keep_the_latest() -> None:
    tl = C.Timeline(["a", "b"], [C.Sample(1.0, "a", status("x")),
                                 C.Sample(2.0, "b", status("x")),
                                 C.Sample(3.0, "a", status("y"))])
    views = list(tl.views())
    assert [t for t, _ in views] == [2.0, 3.0]
    assert C.all_equal_digests(views[0][1])
    assert not C.all_equal_digests(views[1][1])
    report = C.digest_report(tl, 0.0, 10.0)
    assert report == {"available": True, "views": 2, "unequal_views": 1,
                      "unanswered_views": 0, "distinct": 2}
    assert tl.first_view(C.all_equal_digests, 2.5) is None
    assert tl.first("a", lambda s: C.digests(s) == {"echo": "y"}, 0.0) == 3.0


def test_digest_report_without_digests_is_not_available() -> None:
    tl = C.Timeline(["a"], [C.Sample(1.0, "a", status()), C.Sample(2.0, "a", None)])
    report = C.digest_report(tl, 0.0, 10.0)
    assert report["available"] is False
    assert report["unanswered_views"] == 1


def test_percentile_nearest_rank() -> None:
    assert C.percentile([], 50) is None
    assert C.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert C.percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert C.percentile([5.0], 99) == 5.0


def test_not_available_names_each_field_once() -> None:
    result: dict[str, Any] = {}
    C.not_available(result, "consensus.state")
    C.not_available(result, "consensus.state")
    assert result["not_available"] == ["consensus.state"]


def test_consensus_plan_uses_a_separate_management_segment() -> None:
    plain = topology.plan()
    topo = topology.plan(consensus=True)
    assert plain.etcd == () and not plain.consensus
    assert topology.NS_PREFIX + "mgmt" not in plain.namespaces
    assert [m.ns for m in topo.etcd] == ["alb-etcd1", "alb-etcd2", "alb-etcd3"]
    assert {"alb-mgmt", "alb-etcd1"} <= set(topo.namespaces)
    addresses = topology.all_addresses(topo)
    assert len(addresses) == len(set(addresses))
    assert all(topology.in_lab_prefixes(a) for a in addresses)
    mgmt = [topology.mgmt_address(n) for n in topo.nodes] + [m.address for m in topo.etcd]
    assert all(a in topology.MGMT_PREFIX for a in mgmt)
    others = set(topology.all_addresses(plain))
    assert not any(a in topology.MGMT_PREFIX for a in others)
    assert topo.etcd_urls()[0] == "http://198.51.100.49:2379"
    big = topology.plan(topology.MAX_NODES, topology.MAX_BACKENDS, consensus=True)
    big_mgmt = [topology.mgmt_address(n) for n in big.nodes] + [m.address for m in big.etcd]
    assert len(set(big_mgmt)) == len(big_mgmt)


def test_consensus_node_configs_name_the_etcd_members(tmp_path: Any) -> None:
    from anycast_lb.config import load_config
    from anycast_lb.lab import nodes
    topo = topology.plan(consensus=True)
    config = load_config(nodes.write_node_config(topo, topo.nodes[0], tmp_path))
    assert config.consensus is not None
    assert config.consensus.endpoints == topo.etcd_urls()
    assert config.consensus.cluster == topology.CONSENSUS_CLUSTER
    plain = load_config(nodes.write_node_config(topology.plan(), topo.nodes[0], tmp_path / "p"))
    assert plain.consensus is None


def test_config_push_documents_validate(tmp_path: Any) -> None:
    from anycast_lb.consensus import document
    from anycast_lb.lab import consensus_scenarios, state
    from anycast_lb.lab.builder import Lab
    topo = topology.plan(consensus=True)
    lab = Lab(topo, state.LabState(path=tmp_path / "s.json"), tmp_path, "node")
    doc = document.from_data(consensus_scenarios._shared_doc(lab, {"be2", "be3"}))
    for service in doc.services:
        assert [str(b.address) for b in service.backends] == ["198.51.100.194",
                                                              "198.51.100.195"]


def _line(ts: str, event: str, **fields: str) -> str:
    rest = " ".join(f'{k}="{v}"' if " " in v else f"{k}={v}" for k, v in fields.items())
    return f"ts=2026-12-03T14:33:{ts}Z level=info event={event} {rest}"


def test_parse_log_reads_kv_lines_of_the_named_events() -> None:
    lines = [_line("12.984", "health.transition", backend="a:1", state="down",
                   detail="connect refused"),
             "not a log line", _line("13.000", "route.announce", prefix="x")]
    events = C.parse_log(lines, C.TRACE_EVENTS)
    assert len(events) == 1
    assert events[0].fields["detail"] == "connect refused"
    assert events[0].t == pytest.approx(1796308392.984)


def test_agreement_trace_from_node_times() -> None:
    kill = 1796308390.0  # 14:33:10.000
    logs = {
        # n1 never saw the backend back up: it counts as detected (and voted) at the kill
        "n1": C.parse_log([_line("05.000", "health.transition", backend="a:1", state="down"),
                           _line("10.150", "consensus.agreed", down="a:1")], C.TRACE_EVENTS),
        "n2": C.parse_log([_line("10.100", "health.transition", backend="a:1", state="down"),
                           _line("10.140", "consensus.voted", down="a:1"),
                           _line("10.145", "consensus.agreed", down="a:1")], C.TRACE_EVENTS),
        "n3": C.parse_log([_line("10.300", "health.transition", backend="a:1", state="down"),
                           _line("10.160", "consensus.agreed", down="a:1")], C.TRACE_EVENTS),
    }
    tables = {"n1": kill + 0.151, "n2": kill + 0.146, "n3": kill + 0.170}
    trace = C.agreement_trace(logs, {"a:1"}, kill, kill + 5, tables)
    assert trace["majority_detect_ms"] == 100.0
    assert trace["majority_vote_committed_ms"] == 40.0
    assert trace["stages_ms"]["n3"]["detect"] == 200.0
    assert trace["latency_ms"] == 70.0
    assert C.agreement_trace(logs, {"a:1"}, kill, kill + 5, {**tables, "n3": None}
                             )["latency_ms"] is None


def test_table_since_is_the_latest_service_table() -> None:
    status = {"services": [{"table_since": 5.0}, {"table_since": 7.5}]}
    assert C.table_since(status) == 7.5
    assert C.table_since({"services": [{"table_since": 5.0}, {}]}) is None
    assert C.table_since(None) is None


def test_etcd_data_dir_follows_the_namespace_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from anycast_lb.lab import etcd
    monkeypatch.delenv("ANYCAST_LB_LAB_DATA", raising=False)
    assert etcd._data_dir("alb-") == Path("/var/lib/anycast-lb-lab")
    assert etcd._data_dir("albx-") == Path("/var/lib/anycast-lb-lab-albx")
    monkeypatch.setenv("ANYCAST_LB_LAB_DATA", "/srv/lab")
    assert etcd._data_dir("albx-") == Path("/srv/lab")
