"""Pure parts of the lab: address plan, result figures, netlink route parsing."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

import pytest

from anycast_lb.lab import results, topology
from anycast_lb.lab.fib import parse_route
from anycast_lb.lab.results import Target


def test_plan_uses_only_documentation_prefixes() -> None:
    topo = topology.plan(topology.MAX_NODES, topology.MAX_BACKENDS)
    addresses = topology.all_addresses(topo)
    assert len(set(addresses)) == len(addresses)
    assert all(topology.in_lab_prefixes(a) for a in addresses)
    assert not any(a in ipaddress.ip_network("192.0.2.0/24") for a in addresses)
    assert all(ns.startswith(topology.NS_PREFIX) for ns in topo.namespaces)


def test_node_links_are_separate_slash30s() -> None:
    topo = topology.plan(3)
    lb1 = topo.node("lb1")
    assert (str(lb1.address), str(lb1.router_address)) == ("203.0.113.6", "203.0.113.5")
    nets = {ipaddress.ip_interface(f"{n.address}/30").network for n in topo.nodes}
    assert len(nets) == 3
    for n in topo.nodes:
        assert n.router_address in ipaddress.ip_interface(f"{n.address}/30").network
    assert topo.node_by_lan_address()["198.51.100.130"] == "lb2"


@pytest.mark.parametrize("nodes", [0, topology.MAX_NODES + 1])
def test_plan_rejects_bad_sizes(nodes: int) -> None:
    with pytest.raises(ValueError):
        topology.plan(nodes)


def _rtattr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _nexthop(gateway: str, flags: int = 0) -> bytes:
    attrs = _rtattr(5, socket.inet_aton(gateway))
    return struct.pack("=HBBi", 8 + len(attrs), flags, 0, 3) + attrs


def test_parse_multipath_route_skips_linkdown_hops() -> None:
    rtmsg = struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, 254, 186, 0, 1, 0)
    multipath = _nexthop("203.0.113.6") + _nexthop("203.0.113.10", flags=0x10) \
        + _nexthop("203.0.113.14")
    msg = rtmsg + _rtattr(15, struct.pack("=I", 254)) \
        + _rtattr(1, socket.inet_aton("198.51.100.10")) + _rtattr(9, multipath)
    assert parse_route(msg) == ("198.51.100.10/32", ["203.0.113.14", "203.0.113.6"])


def test_parse_route_ignores_other_tables() -> None:
    rtmsg = struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, 255, 2, 0, 1, 0)
    assert parse_route(rtmsg + _rtattr(15, struct.pack("=I", 255))) is None


def _traffic(rows: list[list[object]]) -> dict[str, object]:
    return {"new": rows, "long": [
        {"peer": "198.51.100.129", "established": True, "broken_at": 1.6},
        {"peer": "198.51.100.130", "established": True, "broken_at": None}]}


HOPS = ["203.0.113.10", "203.0.113.14", "203.0.113.6"]
PEERS = {"198.51.100.129": "lb1", "198.51.100.130": "lb2", "198.51.100.131": "lb3"}
NHOPS = {"203.0.113.6": "lb1", "203.0.113.10": "lb2", "203.0.113.14": "lb3"}


def test_analyse_withdraw_figures() -> None:
    rows: list[list[object]] = [
        [1.00, 2.0, 1, "198.51.100.129", "be1", ""],
        [1.10, 2.0, 1, "198.51.100.130", "be2", ""],
        [1.52, 1000.0, 0, "", "", "timeout"],        # into the blackhole
        [1.555, 1000.0, 0, "", "", "timeout"],
        [1.60, 2.0, 1, "198.51.100.131", "be3", ""],
    ]
    changes = [(0.0, HOPS), (1.57, HOPS[:2])]
    r = results.analyse("node-kill", _traffic(rows), changes, 1.5, HOPS[:2], HOPS, PEERS,
                        NHOPS, 3, Target(fib_converged_ms=300))
    assert r["fib_converged_ms"] == pytest.approx(70.0)
    assert r["all_new_ok_after_ms"] == pytest.approx(60.0)   # end of the 1.55 s window
    assert r["new_connections_failed"] == 2
    assert r["failed_after_converged"] == 0
    assert (r["established_total"], r["established_broken"]) == (2, 1)
    assert r["ecmp_spread"] == {"lb1": 1, "lb2": 1}
    assert r["pass"] is True


def test_analyse_fails_when_fib_never_converges() -> None:
    rows: list[list[object]] = [[1.6, 1000.0, 0, "", "", "timeout"]]
    r = results.analyse("node-hang", _traffic(rows), [(0.0, HOPS)], 1.5, HOPS[:2], HOPS,
                        PEERS, NHOPS, 3, Target(fib_converged_ms=1000))
    assert r["fib_converged_ms"] is None
    assert r["checks"]["fib_converged"] is False
    assert r["pass"] is False


def test_backend_fail_forgives_only_what_the_killed_backend_had_answered() -> None:
    rows: list[list[object]] = [
        [1.48, 21.0, 0, "198.51.100.129", "be1", "bad echo"],   # answered, then be1 died
        [1.49, 2.0, 1, "198.51.100.130", "be2", ""],
    ]
    target = Target(zero_new_failures=True, fib_unchanged=True, lost_with_backend="be1")
    r = results.analyse("backend-fail", _traffic(rows), [(0.0, HOPS)], 1.5, HOPS, HOPS,
                        PEERS, NHOPS, 3, target)
    assert r["new_connections_failed"] == 1
    assert r["failed_answered_by_killed_backend"] == 1
    assert r["pass"] is True
    # A failure the killed backend had not answered, or one started after
    # the event, still counts.
    for row in ([1.48, 21.0, 0, "198.51.100.129", "be2", "bad echo"],
                [1.51, 21.0, 0, "198.51.100.129", "be1", "bad echo"]):
        r = results.analyse("backend-fail", _traffic([*rows, row]), [(0.0, HOPS)], 1.5, HOPS,
                            HOPS, PEERS, NHOPS, 3, target)
        assert r["checks"]["zero_new_failures"] is False


def test_plain_drain_forgives_only_handshakes_at_the_ecmp_change() -> None:
    rows: list[list[object]] = [
        [1.563, 0.2, 0, "", "", "reset"],            # SYN before the change, ACK after
        [1.60, 2.0, 1, "198.51.100.130", "be2", ""],
    ]
    changes = [(0.0, HOPS), (1.565, HOPS[:2])]
    plain = Target(zero_new_failures=True, forgive_ecmp_change=True)
    r = results.analyse("drain", _traffic(rows), changes, 1.5, HOPS[:2], HOPS, PEERS, NHOPS,
                        3, plain)
    assert (r["new_connections_failed"], r["failed_at_ecmp_change"]) == (1, 1)
    assert r["pass"] is True
    strict = results.analyse("drain", _traffic(rows), changes, 1.5, HOPS[:2], HOPS, PEERS,
                             NHOPS, 3, Target(zero_new_failures=True))
    assert strict["checks"]["zero_new_failures"] is False
    late: list[list[object]] = [*rows, [1.70, 0.2, 0, "", "", "reset"]]   # 135 ms after it
    r = results.analyse("drain", _traffic(late), changes, 1.5, HOPS[:2], HOPS, PEERS, NHOPS,
                        3, plain)
    assert r["failed_at_ecmp_change"] == 1
    assert r["checks"]["zero_new_failures"] is False


def test_converged_requires_the_set_to_hold() -> None:
    changes = [(0.0, HOPS), (1.6, HOPS[:2]), (1.7, HOPS), (1.9, HOPS[:2])]
    assert results.converged_at(changes, 1.5, HOPS[:2]) == 1.9


def test_max_deviation_counts_missing_nodes() -> None:
    assert results.max_deviation({"lb1": 100, "lb2": 100, "lb3": 100}, 3) == 0.0
    assert results.max_deviation({"lb1": 150, "lb2": 150}, 3) == 1.0
    assert results.max_deviation({"lb1": 110, "lb2": 100, "lb3": 90}, 3) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["alb-client", "client", "alb-does-not-exist"])
def test_traffic_tools_refuse_outside_their_namespace(name: str) -> None:
    from anycast_lb.errors import UnsafeLab
    from anycast_lb.lab import netns, traffic

    with pytest.raises(UnsafeLab):
        netns.require_namespace(name)
    # The client exits before sending anything.
    assert traffic.main(["--ns", name, "--vip", "198.51.100.10", "--out", "/dev/null"]) == 1


def test_flow_survival_node_configs_share_one_private_sync_key(tmp_path: Path) -> None:
    import stat

    from anycast_lb.cluster.keys import KeyFile
    from anycast_lb.config import load_config
    from anycast_lb.lab import nodes

    topo = topology.plan(flow_survival=True)
    nodes.check_cluster_support(topo)
    rings = []
    for node in topo.nodes:
        config = load_config(nodes.write_node_config(topo, node, tmp_path))
        assert config.cluster is not None
        key_file = config.cluster.key_file
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        rings.append(KeyFile(key_file).load())
    assert len(topo.nodes) == 3 and all(ring == rings[0] for ring in rings)


@pytest.mark.parametrize("value", ["alb-", "albx-", "alb2b-"])
def test_namespace_prefix_accepts_lab_names(value: str) -> None:
    assert topology._ns_prefix(value) == value


@pytest.mark.parametrize("value", ["", "alb", "albt-", "xyz-", "alb-x-", "albtoolong-", "ALB-"])
def test_namespace_prefix_refuses_other_names(value: str) -> None:
    with pytest.raises(ValueError):
        topology._ns_prefix(value)


def test_kernel_engine_plan_and_node_config() -> None:
    """``lab up --engine kernel``: the router's LAN leg (the backends'
    gateway) in the lab's prefixes and unique; the echo service on the
    backends' port (DSR keeps ports); nodes hook the uplink and forward on
    the LAN leg; no flow survival with it."""
    from anycast_lb.config import Engine, parse_config
    from anycast_lb.lab import nodes

    topo = topology.plan(kernel=True)
    assert topo.kernel and topo.service_port == topology.BACKEND_ECHO_PORT
    assert topology.plan().service_port == topology.SERVICE_PORT
    addresses = topology.all_addresses(topo)
    assert topo.router_lan_address in addresses and len(set(addresses)) == len(addresses)
    assert all(topology.in_lab_prefixes(a) for a in addresses)
    cfg = parse_config(nodes.node_config(topo, topo.nodes[0], Path("/nonexistent/token")))
    assert cfg.forwarding.engine is Engine.KERNEL and cfg.forwarding.kernel is not None
    assert (cfg.forwarding.kernel.interface, cfg.forwarding.kernel.ingress) == ("lan0", "up0")
    assert {s.port for s in cfg.services if s.name == "echo"} == {topology.BACKEND_ECHO_PORT}
    assert {s.maglev_table_size for s in cfg.services} == {nodes.KERNEL_TABLE_SIZE}
    with pytest.raises(ValueError, match="no flow survival"):
        topology.plan(kernel=True, flow_survival=True)
