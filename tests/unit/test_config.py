"""Config validation: one test per kind of mistake, each naming the field path."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from anycast_lb.config import (
    HealthKind,
    NodeConfig,
    format_host_port,
    json_schema,
    load_config,
    parse_config,
    parse_host_port,
)
from anycast_lb.errors import ConfigError

GOOD: dict[str, Any] = {
    "node": {"name": "lb1"},
    "api": {"listen": "127.0.0.1:9180"},
    "services": [
        {
            "name": "web",
            "vip": "198.51.100.10",
            "port": 80,
            "protocol": "tcp",
            "backends": [
                {"address": "203.0.113.130", "port": 8080, "weight": 1},
                {"address": "203.0.113.131", "port": 8080},
            ],
            "health": {"kind": "http", "path": "/healthz", "rise": 2, "fall": 3},
        }
    ],
}


def problems_for(mutate: Any) -> list[str]:
    data = copy.deepcopy(GOOD)
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_good_config_parses_with_defaults() -> None:
    cfg = parse_config(copy.deepcopy(GOOD))
    service = cfg.services[0]
    assert service.vip == ipaddress.ip_address("198.51.100.10")
    assert service.balance.value == "maglev"
    assert service.effective_idle_timeout == 300.0
    assert service.maglev_table_size == 65537
    assert service.health.kind is HealthKind.HTTP
    assert service.backends[0].key == "203.0.113.130:8080"
    assert cfg.bgp is None


def test_udp_idle_timeout_default_is_30s() -> None:
    data = copy.deepcopy(GOOD)
    data["services"][0]["protocol"] = "udp"
    data["services"][0]["health"] = {"kind": "tcp"}
    assert parse_config(data).services[0].effective_idle_timeout == 30.0


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["services"][0].update(bogus=1), "services[0].bogus: unknown key"),
        (lambda d: d.update(extra={}), "extra: unknown key"),
        (lambda d: d["services"][0].update(port="http"), "services[0].port: "),
        (lambda d: d["services"][0]["backends"][1].update(port=70000), "services[0].backends[1].port: "),
        (lambda d: d["services"][0].update(vip="198.51.100.300"),
         "services[0].vip: '198.51.100.300' is not an IPv4 or IPv6 address"),
        (lambda d: d["services"][0]["backends"][0].update(address="example.com"),
         "services[0].backends[0].address: 'example.com' is not an IPv4 or IPv6 address"),
        (lambda d: d["services"][0]["health"].update(rise=0), "services[0].health.rise: "),
        (lambda d: d["services"][0]["health"].update(fall=0), "services[0].health.fall: "),
        (lambda d: d["services"][0].update(protocol="sctp"), "services[0].protocol: "),
        (lambda d: d["services"][0].update(balance="random"), "services[0].balance: "),
        (lambda d: d["services"][0].update(backends=[]), "services[0].backends: "),
        (lambda d: d["services"][0].update(min_healthy=3), "min_healthy (3) exceeds"),
        (lambda d: d["services"][0]["backends"][0].update(weight=0), "services[0].backends[0].weight: "),
        (lambda d: d["services"][0].update(maglev_table_size=65536), "must be a prime"),
        (lambda d: d["services"][0]["health"].update(kind="exec"), "kind exec needs a non-empty command"),
        (lambda d: d["services"][0]["health"].update(timeout=5, interval=2), "timeout must not exceed interval"),
        (lambda d: d["services"][0]["health"].update(path="healthz"), "services[0].health.path: "),
        (lambda d: d["api"].update(listen="localhost"), "api.listen: "),
        (lambda d: d["api"].update(listen="127.0.0.1:99999"), "api.listen: '99999' is not a port"),
        (lambda d: d["node"].update(name="bad name"), "node.name: "),
        (lambda d: d["services"].append(copy.deepcopy(d["services"][0])), "duplicate service name 'web'"),
        (lambda d: d["services"][0].update(proxy_protocol=True, protocol="udp"),
         "proxy_protocol is only supported for tcp"),
        (lambda d: d["services"][0]["backends"].append({"address": "203.0.113.130", "port": 8080}),
         "duplicate backend 203.0.113.130:8080"),
    ],
    ids=[
        "unknown-key", "unknown-section", "wrong-type", "port-range", "bad-vip", "hostname-backend",
        "rise-zero", "fall-zero", "bad-protocol", "bad-balance", "no-backends", "min-healthy-too-big",
        "weight-zero", "table-not-prime", "exec-without-command", "timeout-over-interval",
        "relative-path", "listen-no-port", "listen-port-range", "bad-node-name", "duplicate-service",
        "proxy-protocol-udp", "duplicate-backend",
    ],
)
def test_each_mistake_names_its_field(mutate: Any, expected: str) -> None:
    problems = problems_for(mutate)
    assert any(expected in p for p in problems), problems


def test_duplicate_vip_port_protocol() -> None:
    def mutate(d: dict[str, Any]) -> None:
        other = copy.deepcopy(d["services"][0])
        other["name"] = "web2"
        d["services"].append(other)

    assert any("duplicate VIP:port 198.51.100.10:80/tcp" in p for p in problems_for(mutate))


def test_same_vip_port_on_tcp_and_udp_is_allowed() -> None:
    data = copy.deepcopy(GOOD)
    other = copy.deepcopy(data["services"][0])
    other.update(name="dns", protocol="udp", health={"kind": "tcp"})
    data["services"].append(other)
    assert len(parse_config(data).services) == 2


def test_one_line_per_problem() -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["services"][0]["port"] = 0
        d["services"][0]["backends"][1]["port"] = -1
        d["services"][0]["health"]["rise"] = 0

    problems = problems_for(mutate)
    assert len(problems) == 3, problems


@pytest.mark.parametrize(
    ("bgp", "expected"),
    [
        ({"hold_time": 2}, "bgp.hold_time: hold time must be 0 or at least 3 s"),
        ({"peers": []}, "bgp.peers: "),
        ({"router_id": "2001:db8::1"}, "bgp.router_id: "),
        ({"announce": {"communities": ["65536:1"]}}, "is not a community"),
        ({"announce": {"communities": ["1:2\nwithdraw route 0.0.0.0/0"]}}, "is not a community"),
        ({"damping": {"reuse": 5000, "suppress": 3000}}, "reuse must be below suppress"),
        ({"damping": {"max_suppress": 10}}, "never holds a prefix down"),
        ({"peers": [{"address": "2001:db8::5", "peer_as": 65000}]}, "not in the family of local_address"),
        ({"local_address": "2001:db8::6", "peers": [{"address": "2001:db8::5", "peer_as": 65000}]},
         "cannot be announced over IPv6 sessions"),
    ],
    ids=["hold-time-1-2", "no-peers", "v6-router-id", "community-range", "community-injection", "damping",
         "damping-ceiling", "peer-family", "vip-family"],
)
def test_bgp_mistakes(bgp: dict[str, Any], expected: str) -> None:
    base = {
        "local_as": 65100,
        "router_id": "203.0.113.6",
        "local_address": "203.0.113.6",
        "peers": [{"address": "203.0.113.5", "peer_as": 65000}],
    }
    base.update(bgp)
    problems = problems_for(lambda d: d.update(bgp=base))
    assert any(expected in p for p in problems), problems


def test_load_config_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert "cannot read" in info.value.problems[0]


def test_load_config_reports_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("services: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid YAML" in info.value.problems[0]


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(ConfigError):
        parse_config(["services"])


def test_host_port_round_trip() -> None:
    assert parse_host_port("[::1]:9180") == (ipaddress.ip_address("::1"), 9180)
    assert format_host_port("::1", 9180) == "[::1]:9180"
    assert format_host_port("127.0.0.1", 80) == "127.0.0.1:80"
    with pytest.raises(ValueError):
        parse_host_port("::1:9180")


def test_config_is_frozen() -> None:
    cfg = parse_config(copy.deepcopy(GOOD))
    with pytest.raises(Exception):
        cfg.node.name = "other"  # type: ignore[misc]


def test_published_schema_is_current() -> None:
    published = Path(__file__).parents[2] / "docs" / "config.schema.json"
    assert published.read_text() == json_schema(), "run: anycast-lb schema > docs/config.schema.json"
    assert "services" in NodeConfig.model_json_schema()["properties"]
