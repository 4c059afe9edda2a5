"""The shared config document, the key layout and etcd URLs (pure)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from anycast_lb.config import parse_config
from anycast_lb.consensus import document
from anycast_lb.consensus.keys import Layout, client_target
from anycast_lb.errors import ConfigError

NODE: dict[str, Any] = {
    "node": {"name": "lb1"},
    "api": {"listen": "127.0.0.1:9181"},
    "bgp": {"local_as": 65001, "router_id": "192.0.2.10", "local_address": "192.0.2.10",
            "peers": [{"address": "192.0.2.1", "peer_as": 65000}], "announce": {"med": 100}},
    "services": [{"name": "web", "vip": "198.51.100.10", "port": 80,
                  "backends": [{"address": "10.0.0.1", "port": 80}]}],
}


def test_node_file_and_shared_document_give_the_same_shared_part() -> None:
    from_node = document.from_data(copy.deepcopy(NODE))
    from_doc = document.from_data({"services": NODE["services"], "announce": {"med": 100}})
    assert from_node == from_doc
    assert document.from_json(from_doc.to_json()) == from_doc


def test_merge_replaces_only_the_shared_part() -> None:
    node = parse_config(copy.deepcopy(NODE))
    shared = document.from_data({
        "services": [{"name": "api", "vip": "198.51.100.20", "port": 443,
                      "backends": [{"address": "10.0.2.1", "port": 443, "weight": 3}]}],
        "announce": {"med": 7, "communities": ["65000:1"]}})
    merged = document.merge(node, shared)
    assert [s.name for s in merged.services] == ["api"]
    assert merged.bgp is not None and merged.bgp.announce.med == 7
    assert merged.api == node.api and merged.node == node.node
    assert merged.bgp.peers == node.bgp.peers if node.bgp else False
    assert document.merge(node, document.from_data(copy.deepcopy(NODE))) == node


def test_defaults_left_out_stay_defaults_through_push_and_merge() -> None:
    """A UDP service without max_flows gets its cap from each node's
    descriptor budget; a pushed document must not turn the default into an
    explicit 65536 the budget then refuses."""
    udp = {"name": "dns", "vip": "198.51.100.10", "port": 53, "protocol": "udp",
           "backends": [{"address": "10.0.0.1", "port": 53}]}
    stored = document.from_data({"services": [udp]}).to_json()
    assert "max_flows" not in stored
    merged = document.merge(parse_config(copy.deepcopy(NODE)), document.from_json(stored))
    assert "max_flows" not in merged.services[0].model_fields_set
    assert "max_flows" in document.merge(
        parse_config(copy.deepcopy(NODE)),
        document.from_data({"services": [{**udp, "max_flows": 100}]})).services[0].model_fields_set

def test_merge_validates_the_whole_node() -> None:
    node = parse_config(copy.deepcopy(NODE))
    v6 = document.from_data({"services": [{"name": "web6", "vip": "2001:db8::10", "port": 80,
                                           "backends": [{"address": "2001:db8::1", "port": 80}]}]})
    with pytest.raises(ConfigError, match=r"IPv6 VIPs over IPv4 sessions need bgp\.next_hop_v6"):
        document.merge(node, v6)


@pytest.mark.parametrize("data,where", [
    ({"services": []}, "services"),
    ({"services": NODE["services"], "announce": {"med": "high"}}, "announce.med"),
    ([1], "(top level)"),
])
def test_bad_documents_name_the_field(data: Any, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        document.from_data(data)
    assert any(p.startswith(where) for p in info.value.problems), info.value.problems


def test_bad_json_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        document.from_json(b"{not json")


def test_layout_round_trips() -> None:
    lay = Layout("prod-eu1")
    assert lay.current == "/anycast-lb/prod-eu1/config/current"
    assert lay.revision_number(lay.revision(42)) == 42
    assert lay.revision_number(lay.current) is None
    assert lay.member_name(lay.member("lb1")) == "lb1"
    assert lay.vote_parts(lay.vote("web", "[2001:db8::1]:80", "lb1")) == ("web", "[2001:db8::1]:80", "lb1")
    assert lay.vote_parts(lay.votes + "web/only-two") is None
    assert lay.slot_index(lay.drain_slot(3)) == 3
    # Sorted keys list config revisions in order (fixed width).
    assert sorted([lay.revision(10), lay.revision(9)]) == [lay.revision(9), lay.revision(10)]


@pytest.mark.parametrize("url,target", [
    ("http://127.0.0.1:2379", "127.0.0.1:2379"),
    ("http://198.51.100.201:2379/", "198.51.100.201:2379"),
])
def test_client_target(url: str, target: str) -> None:
    assert client_target(url) == target


@pytest.mark.parametrize("url", [
    "https://127.0.0.1:2379", "http://etcd1:2379", "http://127.0.0.1", "http://[::1]:2379",
    "127.0.0.1:2379", "http://127.0.0.1:2379/v3", "http://u@127.0.0.1:2379", "http://127.0.0.1:0",
    "http://127.0.0.1:99999",
])
def test_client_target_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        client_target(url)


def test_consensus_section_rules() -> None:
    base = copy.deepcopy(NODE)
    assert parse_config(base).consensus is None
    base["consensus"] = {"endpoints": ["http://127.0.0.1:2379"], "cluster": "c1",
                         "lease_ttl": 1.0, "request_timeout": 0.5}
    with pytest.raises(ConfigError, match="request_timeout"):
        parse_config(base)
    base["consensus"]["lease_ttl"] = 2
    cfg = parse_config(base)
    assert cfg.consensus is not None and cfg.consensus.lease_ttl == 2.0
    base["consensus"]["lease_ttl"] = True
    with pytest.raises(ConfigError, match="lease_ttl"):
        parse_config(base)
