"""check-config accepts exactly what the runtime accepts.

For each value that reaches a wire (ExaBGP API lines, the ExaBGP
``process`` name, an HTTP health request): the config model's verdict is
the writer's verdict, and a config the model accepts goes through the
node -> announcer path (policy, wire, renderer) without a refusal.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anycast_lb import rules
from anycast_lb.bgp import exabgp, render, wire
from anycast_lb.bgp.policy import DrainPhase, NodeView, Route, ServiceView, desired_routes
from anycast_lb.config import NodeConfig, parse_config
from anycast_lb.errors import AnnouncerError, ConfigError, UnsafeAttribute
from anycast_lb.health.probes import HttpProbe

BGP: dict[str, Any] = {
    "local_as": 65100,
    "router_id": "203.0.113.6",
    "local_address": "203.0.113.6",
    "peers": [{"address": "203.0.113.5", "peer_as": 65000}],
}
GOOD: dict[str, Any] = {
    "node": {"name": "lb1"},
    "services": [{
        "name": "web",
        "vip": "198.51.100.10",
        "port": 80,
        "backends": [{"address": "203.0.113.130", "port": 8080}],
        "health": {"kind": "http", "path": "/healthz"},
    }],
    "bgp": BGP,
}
V4 = ipaddress.ip_network("198.51.100.10/32")

COMMUNITIES = [
    "65100:1", "0:0", "65535:65535", "65535:0", "1:2",
    "65100:1\n", "\n65100:1", "65100:1\r", " 65100:1", "65100:1 ", "65100: 1",
    "٦٥١٠٠:1", "65100:١", "６５１００:1", "65536:1", "1:65536", "123456:1", "1:2:3", ":1", "1:",
    "", "1:2]", "[1:2", "1:2;", "1:2\x00", "1:2\u2028", "+1:2", "-1:2", "0x10:1", "1_0:1",
]
INTS: list[Any] = [0, 1, 2, 10, 11, 32, 100, 65535, 2**32 - 1, 2**32, -1, True, False, 1.0, 1.5, "1", None]


def config_verdict(data: dict[str, Any]) -> NodeConfig | None:
    try:
        return parse_config(data)
    except ConfigError as exc:
        assert all("\n" not in p and ": " in p for p in exc.problems), exc.problems
        return None


def runtime_lines(cfg: NodeConfig) -> list[str]:
    """What the announcer writes for ``cfg``'s routes, in every drain phase and health."""
    assert cfg.bgp is not None
    lines = []
    for drain in DrainPhase:
        for healthy in (True, False):
            view = NodeView(drain, (ServiceView("web", V4, healthy=healthy, listening=True),))
            routes = desired_routes(view, cfg.bgp)
            message = wire.decode_node_message(wire.encode_routes(1, routes))
            lines += render.full(message.routes)
    return lines


def route_verdict(**fields: Any) -> bool:
    values: dict[str, Any] = {"prefix": V4, "med": 100, "communities": (), "as_path_prepend": 0,
                              "local_as": 65100}
    values.update(fields)
    try:
        render.announce_line(Route(**values))
    except UnsafeAttribute:
        return False
    return True


def with_announce(**announce: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    data["bgp"]["announce"] = announce
    return data


def check_community_agrees(value: str) -> None:
    cfg = config_verdict(with_announce(communities=[value]))
    assert (cfg is not None) == route_verdict(communities=(value,)), value
    if cfg is not None:
        assert any(value in line for line in runtime_lines(cfg))


@pytest.mark.parametrize("value", COMMUNITIES)
def test_community_check_equals_runtime(value: str) -> None:
    check_community_agrees(value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.from_regex(r"[0-9]{1,6}:[0-9]{1,6}", fullmatch=True),
    st.text(alphabet="0123456789:٦١ \n\r\t[];", max_size=14),
    st.text(max_size=12),
))
def test_community_check_equals_runtime_generated(value: str) -> None:
    check_community_agrees(value)


@pytest.mark.parametrize("value", INTS, ids=repr)
@pytest.mark.parametrize(("field", "route_field"), [
    ("med", "med"), ("down_med", "med"), ("as_path_prepend", "as_path_prepend"),
])
def test_announce_numbers_check_equals_runtime(field: str, route_field: str, value: Any) -> None:
    announce: dict[str, Any] = {field: value}
    if field == "down_med":
        announce["withdraw_on_down"] = False  # so down_med is rendered
    cfg = config_verdict(with_announce(**announce))
    assert (cfg is not None) == route_verdict(**{route_field: value}), (field, value)
    if cfg is not None:
        assert runtime_lines(cfg)


@pytest.mark.parametrize("value", INTS, ids=repr)
def test_local_as_check_equals_runtime(value: Any) -> None:
    data = copy.deepcopy(GOOD)
    data["bgp"]["local_as"] = value
    data["bgp"]["announce"] = {"as_path_prepend": 1}  # so local_as is rendered
    cfg = config_verdict(data)
    assert (cfg is not None) == route_verdict(local_as=value, as_path_prepend=1), value
    if cfg is not None:
        assert runtime_lines(cfg)


LARGE = [
    "65100:1:2", "0:0:0", "4294967295:4294967295:4294967295", "4294967296:0:0", "0:0:4294967296",
    "1:2", "1:2:3:4", "1:2:3\n", " 1:2:3", "1:2:3]", "1:2:3 4:5:6", "٦:1:2", "0x1:2:3", "", "1::3",
]
EXTENDED = [
    "target:65100:1", "origin:65100:1", "target:0:4294967295", "target:65535:4294967295",
    "target:65536:65535", "origin:4294967295:0", "target:192.0.2.1:65535", "target:10.0.0.1:0",
    "target:65536:65536", "target:4294967296:0", "target:192.0.2.1:65536", "target:256.0.0.1:1",
    "target:01.0.0.1:1", "target:1.2.3:1", "redirect:65100:1", "l2info:1:2:3:4", "65100:1",
    "target:65100:1L", "target:65100:0x1", "target:65100:1\n", "target:65100:1]", "Target:1:1",
    "target:65100:1 origin:1:1", "", "target::1",
]


def check_list_agrees(field: str, route_field: str, value: str) -> None:
    cfg = config_verdict(with_announce(**{field: [value]}))
    assert (cfg is not None) == route_verdict(**{route_field: (value,)}), (field, value)
    if cfg is not None:
        assert any(value in line for line in runtime_lines(cfg))


@pytest.mark.parametrize("value", LARGE, ids=repr)
def test_large_community_check_equals_runtime(value: str) -> None:
    check_list_agrees("large_communities", "large_communities", value)


@pytest.mark.parametrize("value", EXTENDED, ids=repr)
def test_extended_community_check_equals_runtime(value: str) -> None:
    check_list_agrees("extended_communities", "extended_communities", value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.from_regex(r"(target|origin):([0-9]{1,11}|[0-9]{1,3}(\.[0-9]{1,3}){3}):[0-9]{1,11}",
                  fullmatch=True),
    st.from_regex(r"[0-9]{1,11}:[0-9]{1,11}:[0-9]{1,11}", fullmatch=True),
    st.text(alphabet="0123456789:.targeoin \n[]", max_size=24),
))
def test_large_and_extended_checks_equal_runtime_generated(value: str) -> None:
    check_list_agrees("large_communities", "large_communities", value)
    check_list_agrees("extended_communities", "extended_communities", value)


def test_extended_communities_are_accepted_by_exabgp_parser() -> None:
    # ExaBGP's own parser reads what the rule accepts (and encodes the
    # documented layout: 2-octet AS, 4-octet AS, IPv4 address specific).
    parser = pytest.importorskip("exabgp.configuration.static.parser")
    for value in EXTENDED:
        try:
            rules.check_extended_community(value)
        except ValueError:
            continue
        packed = parser._extended_community(value).pack()
        assert len(packed) == 8, value
    for value in LARGE:
        try:
            rules.check_large_community(value)
        except ValueError:
            continue
        assert len(parser._large_community(value).pack()) == 12, value


NAMES = ["lb1", "a", "lb-1.b_2", "x" * 63, "x" * 64, "lb1\n", "\nlb1", "lb 1", "-lb", "lb\x00",
         "lb١", "lb/1", "lb1\u2028", ""]


@pytest.mark.parametrize("name", NAMES, ids=repr)
def test_node_name_check_equals_exabgp_process_name(name: str) -> None:
    data = copy.deepcopy(GOOD)
    data["node"]["name"] = name
    cfg = config_verdict(data)
    try:
        exabgp.process_name(name)
        runtime_ok = True
    except AnnouncerError:
        runtime_ok = False
    assert (cfg is not None) == runtime_ok, name
    if cfg is not None:
        assert cfg.bgp is not None
        argv = exabgp.announcer_argv(exabgp.DEFAULT_RUN_ROOT / name / exabgp.SOCKET_NAME, 0.6, 30.0,
                                     "/usr/bin/python3")
        assert f"process announcer-{name} {{" in exabgp.render_config(cfg.bgp, name, argv)


HOSTS = ["www.example.com", "www.example.com:8080", "[2001:db8::1]", "[2001:db8::1]:80", "203.0.113.1",
         "a%20b", "a\r\nX-Evil: 1", "a\n", "a b", "", "a:b:c", "a:", "a:٨٠", "a%zz", "a\x00", "é.example",
         "a/b", "a@b"]
PATHS = ["/", "/healthz", "/a?b=c&d=%20", "/a#frag", "healthz", "", "/a b", "/a\r\nX: 1", "/a\n",
         "/é", "/a\x7f", "/" + "a" * 2047, "/" + "a" * 2048]


async def probe_accepts(path: str, host: str | None) -> bool:
    async with aiohttp.ClientSession() as session:
        try:
            HttpProbe(session, "127.0.0.1", 8080, path, 1.0, [200], host=host)
        except ValueError:
            return False
    return True


@pytest.mark.parametrize("host", HOSTS, ids=repr)
async def test_health_host_check_equals_probe(host: str) -> None:
    data = copy.deepcopy(GOOD)
    data["services"][0]["health"]["host"] = host
    assert (config_verdict(data) is not None) == await probe_accepts("/healthz", host), host


@pytest.mark.parametrize("path", PATHS, ids=repr)
async def test_health_path_check_equals_probe(path: str) -> None:
    data = copy.deepcopy(GOOD)
    data["services"][0]["health"]["path"] = path
    assert (config_verdict(data) is not None) == await probe_accepts(path, None), path


def test_the_refusals_the_issue_reported() -> None:
    for value in ("65100:1\n", "٦٥١٠٠:1"):
        assert config_verdict(with_announce(communities=[value])) is None
        with pytest.raises(UnsafeAttribute):
            render.check_community(value)
    data = copy.deepcopy(GOOD)
    data["services"][0]["health"]["host"] = "backend\r\nX-Injected: 1"
    assert config_verdict(data) is None


def test_rules_use_ascii_digits_and_whole_matches() -> None:
    # The traps: str.isdigit and int() take non-ASCII digits, `$` takes a trailing newline.
    assert "٦".isdigit() and int("٦٥") == 65
    for bad in ("٦٥١٠٠:1", "65100:1\n"):
        with pytest.raises(ValueError):
            rules.check_community(bad)
    with pytest.raises(ValueError):
        rules.check_name("lb1\n")
    with pytest.raises(ValueError):
        rules.check_uint("port", True, 0, 65535)


def test_the_most_communities_the_config_allows_render_while_draining() -> None:
    most = [f"65100:{i}" for i in range(rules.MAX_COMMUNITIES - 1)]
    cfg = config_verdict(with_announce(communities=most,
                                       large_communities=["1:2:3"] * rules.MAX_COMMUNITIES,
                                       extended_communities=["target:1:2"] * rules.MAX_COMMUNITIES))
    assert cfg is not None
    lines = runtime_lines(cfg)  # every drain phase, GRACEFUL adds 65535:0 (the 32nd)
    assert any("65535:0" in line for line in lines)
    assert config_verdict(with_announce(communities=[*most, "65100:99"])) is None
