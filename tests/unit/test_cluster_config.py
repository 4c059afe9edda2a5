"""The ``cluster`` config section: defaults, peer forms, and each kind of mistake."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest

from anycast_lb.config import json_schema, parse_config
from anycast_lb.errors import ConfigError

BASE: dict[str, Any] = {
    "services": [{"name": "web", "vip": "198.51.100.10", "port": 80,
                  "backends": [{"address": "203.0.113.130", "port": 8080}]}],
    "cluster": {"address": "203.0.113.1", "interface": "lan0",
                "key_file": "/etc/anycast-lb/cluster.key",
                "peers": ["203.0.113.1", "203.0.113.3", "203.0.113.2:7000",
                          {"address": "203.0.113.4", "port": 7946}]},
}


def with_cluster(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["cluster"].update(changes)
    return data


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_defaults_and_sorted_remote_peers_without_this_node() -> None:
    cluster = parse_config(copy.deepcopy(BASE)).cluster
    assert cluster is not None
    assert cluster.flow_survival and cluster.port == 7946
    assert (cluster.heartbeat_interval, cluster.peer_expiry, cluster.apply_interval) == (
        0.1, 0.4, 0.05)
    ip = ipaddress.IPv4Address
    assert cluster.remote_peers == [
        (ip("203.0.113.2"), 7000), (ip("203.0.113.3"), 7946), (ip("203.0.113.4"), 7946)]


def test_no_cluster_section_is_fine() -> None:
    data = copy.deepcopy(BASE)
    del data["cluster"]
    assert parse_config(data).cluster is None


@pytest.mark.parametrize(("changes", "expected"), [
    ({"interface": 'lan0" drop'}, "cluster.interface: String should match pattern"),
    ({"interface": "a-very-long-ifname"}, "cluster.interface: String should match pattern"),
    ({"nft_table": "bad-name"}, "cluster.nft_table: String should match pattern"),
    ({"peers": []}, "cluster.peers: List should have at least 1 item"),
    ({"peers": ["2001:db8::2"]}, "cluster.peers[0].address: Input is not a valid IPv4 address"),
    ({"peers": ["203.0.113.2", "203.0.113.2:7946"]}, "duplicate peer 203.0.113.2:7946"),
    ({"peer_expiry": 0.1}, "peer_expiry must exceed heartbeat_interval"),
    ({"address": "2001:db8::1"}, "cluster.address: Input is not a valid IPv4 address"),
    ({"unknown": 1}, "cluster.unknown: unknown key"),
    ({"key_file": None}, "cluster.key_file: Input is not a valid path"),
])
def test_bad_cluster_sections(changes: dict[str, Any], expected: str) -> None:
    assert any(expected in p for p in problems(with_cluster(**changes))), problems(
        with_cluster(**changes))


def test_too_many_peers() -> None:
    peers = [f"203.0.113.{i}" for i in range(10, 80)]
    assert any("at most 63 peers" in p for p in problems(with_cluster(peers=peers)))


def test_ipv6_vip_is_refused_with_flow_survival_only() -> None:
    data = with_cluster()
    data["services"][0]["vip"] = "2001:db8::10"
    assert any("supports IPv4 VIPs only" in p for p in problems(data))
    data["cluster"]["flow_survival"] = False
    assert parse_config(data).cluster is not None


def test_schema_documents_the_cluster_section() -> None:
    assert '"ClusterConfig"' in json_schema()
