"""Config validation: one test per kind of mistake, each naming the field path."""

from __future__ import annotations

import copy
import ipaddress
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Strict, ValidationError

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
         "IPv4 VIPs over IPv6 sessions need bgp.next_hop_v4"),
        ({"next_hop_v6": "203.0.113.6"}, "bgp.next_hop_v6: "),
        ({"next_hop_v6": "::"}, "cannot be a next hop"),
        ({"next_hop_v4": "224.0.0.1"}, "cannot be a next hop"),
        ({"announce": {"large_communities": ["1:2:4294967296"]}}, "is not a large community"),
        ({"announce": {"large_communities": ["1:2:3"] * 33}}, "at most 32"),
        ({"announce": {"extended_communities": ["target:70000:70000"]}},
         "is not an extended community"),
        ({"announce": {"extended_communities": ["target:1:2\nwithdraw route 0.0.0.0/0"]}},
         "is not an extended community"),
    ],
    ids=["hold-time-1-2", "no-peers", "v6-router-id", "community-range", "community-injection", "damping",
         "damping-ceiling", "peer-family", "vip-family", "v4-as-next-hop-v6", "unspecified-next-hop",
         "multicast-next-hop", "large-range", "large-count", "extended-range", "extended-injection"],
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
    with pytest.raises(ValidationError):
        cfg.node.name = "other"  # type: ignore[misc]


def test_published_schema_is_current() -> None:
    published = Path(__file__).parents[2] / "docs" / "config.schema.json"
    assert published.read_text() == json_schema(), "run: anycast-lb schema > docs/config.schema.json"
    assert "services" in NodeConfig.model_json_schema()["properties"]


# -- strict numbers and booleans ---------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["services"][0].update(port=True), "services[0].port: Input should be a valid integer, "
                                                      "got a boolean (True)"),
        (lambda d: d["services"][0].update(port=1.5), "services[0].port: Input should be a valid integer, "
                                                     "got a number (1.5)"),
        (lambda d: d["services"][0].update(port=80.0), "services[0].port: "),
        (lambda d: d["services"][0].update(port="80"), "services[0].port: "),
        (lambda d: d["services"][0]["backends"][0].update(weight=False), "services[0].backends[0].weight: "),
        (lambda d: d["services"][0].update(proxy_protocol=1), "services[0].proxy_protocol: Input should be "
                                                             "a valid boolean, got an integer (1)"),
        (lambda d: d["services"][0].update(proxy_protocol="yes"), "services[0].proxy_protocol: "),
        (lambda d: d["services"][0]["health"].update(interval=True), "services[0].health.interval: "),
        (lambda d: d["services"][0]["health"].update(interval="2"), "services[0].health.interval: "),
        (lambda d: d["services"][0]["health"].update(expect_status=[200, True]),
         "services[0].health.expect_status[1]: "),
        (lambda d: d.update(drain={"timeout": float("nan")}), "drain.timeout: "),
        (lambda d: d.update(drain={"timeout": float("inf")}), "drain.timeout: "),
        (lambda d: d["api"].update(listen="127.0.0.1:٩١٨٠"), "api.listen: "),
        (lambda d: d["api"].update(listen="127.0.0.1:9180\n"), "api.listen: "),
        (lambda d: d["services"][0].update(vip="198.51.100.10\n"), "services[0].vip: "),
        (lambda d: d["node"].update(name="lb1\n"), "node.name: "),
        (lambda d: d["services"][0].update(name="web\n"), "services[0].name: "),
        (lambda d: d["services"][0]["health"].update(host="a\r\nX: 1"), "services[0].health.host: "),
        (lambda d: d["services"][0]["health"].update(path="/a\x00"), "services[0].health.path: "),
        (lambda d: d["services"][0].update(health={"kind": "exec", "command": ["/bin/true", "a\x00b"]}),
         "services[0].health.command[1]: "),
        (lambda d: d["services"][0].update(health={"kind": "exec", "command": [""]}),
         "services[0].health.command[0]: "),
        (lambda d: d["api"].update(admin_token_file="/etc/tok\x00en"), "api.admin_token_file: "),
        (lambda d: d.update(extra={"a\nb": 1}), "extra: unknown key"),
        (lambda d: d["services"][0].update({"a\nb": 1}), "services[0].'a\\nb': unknown key"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_strict_values(mutate: Any, expected: str) -> None:
    problems = problems_for(mutate)
    assert any(p.startswith(expected) for p in problems), problems
    assert all("\n" not in p for p in problems), problems


def test_durations_take_ints() -> None:
    data = copy.deepcopy(GOOD)
    data["services"][0]["health"].update(interval=3, timeout=1)
    data["drain"] = {"timeout": 0}
    cfg = parse_config(data)
    assert cfg.services[0].health.interval == 3.0 and cfg.drain.timeout == 0.0


def test_damping_with_a_tiny_half_life_is_a_field_error_not_an_overflow() -> None:
    bgp = {"local_as": 65100, "router_id": "203.0.113.6", "local_address": "203.0.113.6",
           "peers": [{"address": "203.0.113.5", "peer_as": 65000}],
           "damping": {"half_life": 0.001, "max_suppress": 86400}}
    # 2 ** (86400 / 0.001) overflows a float; the check is done in log space.
    assert parse_config({**copy.deepcopy(GOOD), "bgp": bgp}).bgp is not None


def test_cluster_names_are_anchored() -> None:
    cluster = {"address": "203.0.113.10", "interface": "eth0\n", "peers": ["203.0.113.11"],
               "nft_table": "anycast_lb\n"}
    problems = problems_for(lambda d: d.update(cluster=cluster))
    assert any(p.startswith("cluster.interface: ") for p in problems), problems
    assert any(p.startswith("cluster.nft_table: ") for p in problems), problems


def test_cluster_peer_port_takes_ascii_digits_only() -> None:
    cluster = {"address": "203.0.113.10", "interface": "eth0", "peers": ["203.0.113.11:٧٩٤٦"],
               "key_file": "/etc/anycast-lb/cluster.key"}
    problems = problems_for(lambda d: d.update(cluster=cluster))
    assert any(p.startswith("cluster.peers[0].port: ") for p in problems), problems
    cluster["peers"] = ["203.0.113.11:7947"]
    cfg = parse_config({**copy.deepcopy(GOOD), "cluster": cluster})
    assert cfg.cluster is not None and cfg.cluster.peers[0].port == 7947


# -- reading the file ------------------------------------------------------------------


def load_problem(tmp_path: Path, content: bytes | str) -> str:
    path = tmp_path / "node.yaml"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1, info.value.problems
    assert "\n" not in info.value.problems[0]
    return info.value.problems[0]


GOOD_YAML = yaml.safe_dump(GOOD, sort_keys=False)


def test_duplicate_key_is_refused_with_both_lines(tmp_path: Path) -> None:
    text = "node: {name: lb1}\nservices: []\nnode: {name: lb2}\n"
    assert load_problem(tmp_path, text) == (
        "not valid YAML: line 3, column 1: duplicate key 'node' (first at line 1)")


def test_duplicate_key_in_a_nested_mapping_is_refused(tmp_path: Path) -> None:
    text = GOOD_YAML.replace("  port: 80\n", "  port: 80\n  port: 81\n")
    assert "duplicate key 'port'" in load_problem(tmp_path, text)


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = (
        "x-backend: &b {address: 203.0.113.130, port: 8080}\n"
        "services:\n"
        "  - {name: web, vip: 198.51.100.10, port: 80,\n"
        "     backends: [{<<: *b, port: 8081}, *b]}\n"
    )
    # x-backend is an unknown key, so the file is refused, but not as YAML.
    problem = load_problem(tmp_path, text)
    assert problem == "x-backend: unknown key"


def test_anchors_and_aliases_work(tmp_path: Path) -> None:
    text = (
        "services:\n"
        "  - {name: web, vip: 198.51.100.10, port: 80, backends: &pool [{address: 203.0.113.130, port: 8080}]}\n"
        "  - {name: web2, vip: 198.51.100.11, port: 80, backends: *pool}\n"
    )
    path = tmp_path / "node.yaml"
    path.write_text(text)
    assert len(load_config(path).services) == 2


@pytest.mark.parametrize(("levels", "ok"), [(64, True), (65, False), (500, False), (5000, False)])
def test_nesting_limit(tmp_path: Path, levels: int, ok: bool) -> None:
    # The top-level mapping is level 1; `extra` holds the rest.
    text = GOOD_YAML + "extra: " + "[" * (levels - 1) + "]" * (levels - 1) + "\n"
    problem = load_problem(tmp_path, text)
    line = GOOD_YAML.count("\n") + 1
    if ok:
        assert problem == "extra: unknown key"
    elif levels < 1000:
        assert problem == "extra" + "[0]" * 63 + f": nested deeper than 64 levels (line {line})"
    else:  # libyaml stops at 1000 levels while it looks ahead, before our check sees them
        assert problem.startswith(f"not valid YAML: line {line}, column "), problem
        assert problem.endswith(": exceeded maximum nesting depth"), problem


def test_nesting_limit_names_the_field_path(tmp_path: Path) -> None:
    text = GOOD_YAML.replace("  port: 80\n", "  port: " + "{a: " * 70 + "1" + "}" * 70 + "\n")
    problem = load_problem(tmp_path, text)
    assert problem.startswith("services[0].port.a.a."), problem
    assert "nested deeper than 64 levels (line " in problem


def test_size_limit(tmp_path: Path) -> None:
    text = GOOD_YAML + "#" * (1024 * 1024) + "\n"
    assert load_problem(tmp_path, text) == "(file): larger than 1048576 bytes (1 MiB)"


def test_non_utf8_is_refused_with_offset_and_line(tmp_path: Path) -> None:
    problem = load_problem(tmp_path, b"node:\n  name: caf\xe9\n")
    assert problem == "(file): not UTF-8: byte 0xe9 at offset 17 (line 2)"


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_YAML.encode())
    assert load_config(path).node.name == "lb1"


@pytest.mark.parametrize(("text", "expected"), [
    ("a: &a [*a]\n", "a[0]: alias *a refers to a collection that contains it (line 1)"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")),
     "f[8]: more than 1000000 values once aliases are expanded (line 6)"),
    ("node: {name: 2001-13-45}\n", "not valid YAML: line 1, column 14: cannot read value: month must be in 1..12"),
    ("port: !!int x\n", "not valid YAML: line 1, column 7: cannot read value: invalid literal for int() with "
                       "base 10: 'x'"),
    ("a: !!python/object:os.system x\n", "not valid YAML: line 1, column 4: could not determine a constructor "
                                         "for the tag 'tag:yaml.org,2002:python/object:os.system'"),
    ("a: 1\n---\nb: 2\n", "not valid YAML: line 2, column 1: but found another document"),
    ("a: \x00\n", "not valid YAML: character '\\x00' at offset 3 is not allowed"),
    ("{[1]: 2}\n", "not valid YAML: line 1, column 2: found unhashable key"),
])
def test_hostile_yaml_is_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    assert load_problem(tmp_path, text) == expected


def test_the_c_loader_is_used_when_available() -> None:
    from anycast_lb import yamlload

    if yaml.__with_libyaml__:
        assert issubclass(yamlload._Loader, yaml.CSafeLoader)
    else:
        assert issubclass(yamlload._Loader, yaml.SafeLoader)


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    if model not in seen:
        seen.add(model)
        for field in model.model_fields.values():
            for arg in _type_args(field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    _models(arg, seen)
    return seen


def _type_args(annotation: Any) -> list[Any]:
    out = [annotation]
    for arg in typing.get_args(annotation):
        out += _type_args(arg)
    return out


def _lax_numbers(annotation: Any, metadata: list[Any]) -> list[Any]:
    """Bare int/float/bool in ``annotation`` with no Strict() beside them."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        return _lax_numbers(base, extra)
    if annotation in (int, float, bool):
        return [] if any(isinstance(m, Strict) and m.strict for m in metadata) else [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out += _lax_numbers(arg, [])
    return out


def test_every_number_and_boolean_field_is_strict() -> None:
    # A new field written as `int` would take `true` as 1 again: use StrictInt,
    # StrictFloat (takes ints) or StrictBool.
    lax = []
    for model in _models(NodeConfig, set()):
        for name, field in model.model_fields.items():
            if _lax_numbers(field.annotation, list(field.metadata)):
                lax.append(f"{model.__name__}.{name}")
    assert lax == []


def test_dual_stack_needs_the_next_hop_of_the_other_family() -> None:
    def add_v6(d: dict[str, Any]) -> None:
        web6 = copy.deepcopy(d["services"][0])
        web6.update(name="web6", vip="2001:db8::10")
        d["services"].append(web6)
        d["bgp"] = {"local_as": 65100, "router_id": "203.0.113.6", "local_address": "203.0.113.6",
                    "peers": [{"address": "203.0.113.5", "peer_as": 65000}]}

    assert any("IPv6 VIPs over IPv4 sessions need bgp.next_hop_v6" in p for p in problems_for(add_v6))
    data = copy.deepcopy(GOOD)
    add_v6(data)
    data["bgp"]["next_hop_v6"] = "2001:db8::6"
    cfg = parse_config(data)
    assert cfg.bgp is not None and cfg.bgp.families() == (4, 6)
    assert cfg.bgp.next_hop(6) == ipaddress.ip_address("2001:db8::6") and cfg.bgp.next_hop(4) is None


@pytest.mark.parametrize(("health", "expected"), [
    ({"kind": "udp"}, "kind udp needs payload"),
    ({"kind": "udp", "payload": "a", "payload_hex": "61"}, "not both"),
    ({"kind": "udp", "payload_hex": "6"}, "payload_hex: "),
    ({"kind": "udp", "payload_hex": "zz"}, "is not hex bytes"),
    ({"kind": "udp", "payload": "a", "expect": "("}, "is not a regular expression"),
    ({"kind": "udp", "payload": ""}, "payload: "),
    ({"kind": "tcp", "payload": "a"}, "only for kind udp"),
    ({"kind": "udp", "payload": "a", "query_name": "a.b"}, "only for kind dns"),
    ({"kind": "dns", "query_name": "a..b"}, "is not a DNS name"),
    ({"kind": "dns", "query_name": "a b.example"}, "is not a DNS name"),
    ({"kind": "dns", "query_name": "x" * 64 + ".example"}, "is not a DNS name"),
    ({"kind": "dns", "query_type": "ANY"}, "query_type: "),
    ({"kind": "dns", "expect_rcode": []}, "expect_rcode: "),
    ({"kind": "dns", "expect_rcode": ["NOPE"]}, "expect_rcode[0]: "),
], ids=repr)
def test_udp_and_dns_health_mistakes(health: dict[str, Any], expected: str) -> None:
    problems = problems_for(lambda d: d["services"][0].update(health=health))
    assert any(expected in p for p in problems), problems


def test_udp_and_dns_health_defaults() -> None:
    from anycast_lb.config import DNS_TYPES, HealthConfig

    dns = HealthConfig.model_validate({"kind": "dns", "query_name": "_sip._udp.example.com."})
    assert dns.query_type is None and dns.expect_rcode is None  # SOA and [NOERROR] at probe time
    assert set(typing.get_args(typing.get_args(HealthConfig.model_fields["query_type"].annotation)[0])
               ) == set(DNS_TYPES)
    udp = HealthConfig.model_validate({"kind": "udp", "payload_hex": "00ff", "expect": "^ok"})
    assert udp.payload_hex == "00ff"
