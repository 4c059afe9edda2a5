"""The descriptor budget (pure arithmetic) and the shedding counters."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anycast_lb.config import parse_config
from anycast_lb.errors import ConfigError
from anycast_lb.limits import (
    BASE_FDS,
    MARGIN_FDS,
    Refusals,
    Slots,
    SourceCounts,
    plan,
    source_key,
)


def config(*services: dict[str, Any], **sections: Any) -> Any:
    return parse_config({"services": list(services), **sections})


def tcp(name: str = "web", backends: int = 2, kind: str = "tcp") -> dict[str, Any]:
    return {"name": name, "vip": "192.0.2.1", "port": 80, "protocol": "tcp",
            "backends": [{"address": f"192.0.2.{10 + i}", "port": 80} for i in range(backends)],
            "health": {"kind": kind} if kind != "exec" else {"kind": "exec", "command": ["true"]}}


def udp(name: str = "dns", backends: int = 2, **extra: Any) -> dict[str, Any]:
    return {"name": name, "vip": "192.0.2.2", "port": 53, "protocol": "udp",
            "backends": [{"address": f"192.0.2.{20 + i}", "port": 53} for i in range(backends)],
            **extra}


API = 256 + 1
FIXED = BASE_FDS + API + MARGIN_FDS


@pytest.mark.parametrize(
    ("limit", "cfg", "reserve", "pipes", "tcp_cap", "udp_caps", "per_source"),
    [
        # One TCP service, relay with splice: reserve 337 + 1 listener + 2
        # tcp probes = 340; data 684, pipes 684 // 16 = 42, (684 - 84) // 2.
        (1024, config(tcp()), FIXED + 1 + 2, 42, 300, {}, {}),
        # Without splice no pipes are kept back.
        (1024, config(tcp(), forwarding={"splice": False}), FIXED + 3, 0, 342, {}, {}),
        # The asyncio engine has no pipes either.
        (1024, config(tcp(), forwarding={"engine": "asyncio"}), FIXED + 3, 0, 342, {}, {}),
        # UDP only: every data descriptor is a flow; a quarter per source.
        (1024, config(udp()), FIXED + 3, 0, 0, {"dns": 684}, {"dns": 171}),
        # The default max_flows (65536) still bounds a large limit.
        (1_000_000, config(udp()), FIXED + 3, 0, 0, {"dns": 65536}, {"dns": 16384}),
        # TCP and UDP share equally: data 20000 - 343 = 19657, pipes 1228,
        # 17201 left, two shares of 8600.
        (20000, config(tcp(), udp()), FIXED + 2 + 4, 1228, 4300, {"dns": 8600}, {"dns": 2150}),
        # An explicit TCP cap takes its descriptors first; UDP gets the rest.
        (20000, config(tcp(), udp(), forwarding={"max_tcp_connections": 1000}),
         FIXED + 6, 1228, 1000, {"dns": 17201 - 2000}, {"dns": 3800}),
        # An explicit max_flows is kept as set; max_flows_per_source too.
        (20000, config(tcp(), udp(max_flows=500, max_flows_per_source=7)),
         FIXED + 6, 1228, (17201 - 500) // 2, {"dns": 500}, {"dns": 7}),
        # exec probes cost 6 each; bgp and cluster sections reserve 16 each.
        (4096, config(tcp(kind="exec"), forwarding={"splice": False},
                      bgp={"local_as": 65001, "router_id": "192.0.2.100",
                           "local_address": "192.0.2.100",
                           "peers": [{"address": "192.0.2.254", "peer_as": 65000}]}),
         FIXED + 1 + 12 + 16, 0, (4096 - FIXED - 29) // 2, {}, {}),
        # Worker processes reserve their pipes in the node.
        (4096, config(tcp(), forwarding={"splice": False, "workers": 3}),
         FIXED + 3 + 8, 0, (4096 - FIXED - 11) // 2, {}, {}),
    ],
)
def test_plan(limit: int, cfg: Any, reserve: int, pipes: int, tcp_cap: int,
              udp_caps: dict[str, int], per_source: dict[str, int]) -> None:
    budget = plan(limit, cfg)
    assert budget.reserve.total == reserve
    assert budget.data == limit - reserve
    assert budget.pipes == pipes
    assert budget.tcp_connections == tcp_cap
    assert budget.udp_flows == udp_caps
    assert budget.udp_flows_per_source == per_source
    # Whatever the split, the data path fits in what the reserve leaves.
    used = 2 * budget.tcp_connections + sum(budget.udp_flows.values()) + 2 * budget.pipes
    assert used <= budget.data


@pytest.mark.parametrize(
    ("limit", "forwarding", "tcp_cap", "per_source"),
    [
        # Default: a quarter of the TCP cap.
        (1024, {}, 300, 75),
        (20000, {"max_tcp_connections": 1000}, 1000, 250),
        # A tiny cap still lets each source hold one.
        (20000, {"max_tcp_connections": 3}, 3, 1),
        # Set: kept as set, never above the cap.
        (20000, {"max_tcp_connections": 1000, "max_tcp_connections_per_source": 10}, 1000, 10),
        (20000, {"max_tcp_connections": 10, "max_tcp_connections_per_source": 50}, 10, 10),
    ],
)
def test_tcp_per_source_cap(limit: int, forwarding: dict[str, Any], tcp_cap: int,
                            per_source: int) -> None:
    budget = plan(limit, config(tcp(), forwarding=forwarding))
    assert budget.tcp_connections == tcp_cap
    assert budget.tcp_connections_per_source == per_source
    assert budget.as_dict()["tcp_connections_per_source"] == per_source


def test_no_tcp_per_source_cap_without_a_tcp_service() -> None:
    budget = plan(1024, config(udp(), forwarding={"max_tcp_connections_per_source": 5}))
    assert budget.tcp_connections == budget.tcp_connections_per_source == 0


def test_two_udp_services_split_the_udp_part() -> None:
    second = udp("ntp") | {"port": 123}
    budget = plan(10000, config(udp(), second))
    assert budget.udp_flows["dns"] == budget.udp_flows["ntp"] == budget.data // 2


def test_caps_that_cannot_fit_are_refused_with_the_numbers() -> None:
    cfg = config(tcp(), udp(max_flows=300), forwarding={"max_tcp_connections": 400})
    with pytest.raises(ConfigError) as err:
        plan(1024, cfg, source="node.yaml")
    text = str(err.value)
    assert err.value.source == "node.yaml"
    assert "forwarding.max_tcp_connections: 400 needs 800 descriptors" in text
    assert "services[1].max_flows: 300 needs 300 descriptors" in text
    assert "the open-file limit 1024" in text and "need 1100" in text


def test_a_limit_below_the_reserve_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"open-file limit 256 leaves 0 descriptors.*at least"):
        plan(256, config(tcp()))


def test_a_limit_too_small_for_one_connection_is_refused() -> None:
    # data 1: one descriptor cannot carry a TCP connection (2).
    cfg = config(tcp(), forwarding={"splice": False})
    limit = plan(10000, cfg).reserve.total + 1
    with pytest.raises(ConfigError, match="too few for one connection"):
        plan(limit, cfg)
    assert plan(limit + 1, cfg).tcp_connections == 1


def test_api_connections_come_from_the_reserve() -> None:
    cfg = config(udp())
    small = cfg.model_copy(update={"api": cfg.api.model_copy(update={"max_connections": 16})})
    assert cfg.api.max_connections == 256
    assert plan(4096, small).udp_flows["dns"] == plan(4096, cfg).udp_flows["dns"] + 240


@pytest.mark.parametrize(
    ("host", "v4", "v6", "key"),
    [
        ("198.51.100.7", 32, 64, "198.51.100.7"),
        ("198.51.100.7", 24, 64, "198.51.100.0/24"),
        ("2001:db8:1:2:3:4:5:6", 32, 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 32, 128, "2001:db8:1:2:3:4:5:6"),
        ("2001:db8:1:2:3:4:5:6", 32, 48, "2001:db8:1::/48"),
    ],
)
def test_source_key(host: str, v4: int, v6: int, key: str) -> None:
    assert source_key(host, v4, v6) == key


@pytest.mark.parametrize("host", ["example.com", "", "1.2.3", "2001:db8::g", "1.2.3.4/24"])
def test_source_key_refuses_what_is_no_address(host: str) -> None:
    with pytest.raises(ValueError):
        source_key(host)


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
       st.integers(8, 32), st.integers(16, 128))
def test_source_key_is_the_network_whatever_the_spelling(
        address: ipaddress.IPv4Address | ipaddress.IPv6Address, v4: int, v6: int) -> None:
    prefix = v4 if address.version == 4 else v6
    key = source_key(str(address), v4, v6)
    assert key == source_key(address.exploded, v4, v6)
    host, _, length = key.partition("/")
    network = ipaddress.ip_network((address, prefix), strict=False)
    assert ipaddress.ip_address(host) == network.network_address
    assert length == ("" if prefix == address.max_prefixlen else str(prefix))


def test_source_counts_hold_at_most_the_cap_per_key() -> None:
    counts = SourceCounts(2)
    assert counts.take("a") and counts.take("a")
    assert not counts.take("a")
    assert counts.take("b")
    counts.give("a")
    assert counts.held("a") == 1 and counts.take("a")
    counts.give("b")
    assert len(counts) == 1  # "b" is forgotten at zero


def test_slots() -> None:
    slots = Slots(2)
    assert slots.take() and slots.take() and not slots.take()
    assert slots.used == 2
    slots.give()
    assert slots.take()
    unlimited = Slots(None)
    assert all(unlimited.take() for _ in range(10_000))


def test_slots_admit_per_source_then_the_cap() -> None:
    slots = Slots(5, 2)
    assert slots.admit("192.0.2.1") is None and slots.admit("192.0.2.1") is None
    assert slots.admit("192.0.2.1") == "source_cap"  # its share, not the cap
    assert slots.admit("192.0.2.2") is None and slots.admit("192.0.2.2") is None
    assert slots.admit("192.0.2.3") is None
    assert slots.used == 5
    assert slots.admit("192.0.2.4") == "cap"
    assert slots.admit("192.0.2.1") == "source_cap"  # both full: named as the source's
    # A refusal takes nothing: the cap's refusal gave the source's count back.
    assert slots.used == 5 and slots.sources is not None and len(slots.sources) == 3
    slots.release("192.0.2.3")
    assert slots.admit("192.0.2.4") is None


def test_slots_counts_return_to_zero_and_the_source_connects_again() -> None:
    slots = Slots(100, 4)
    for _ in range(3):  # three rounds of filling a source's share and closing it all
        assert all(slots.admit("2001:db8::7") is None for _ in range(4))
        assert slots.admit("2001:db8::7") == "source_cap"
        for _ in range(4):
            slots.release("2001:db8::7")
        assert slots.used == 0
        assert slots.sources is not None and len(slots.sources) == 0


@pytest.mark.parametrize(
    ("v4", "v6", "same", "other"),
    [
        # Per address (v4 default); a /64 per subnet (v6 default).
        (32, 64, [], "198.51.100.8"),
        (32, 64, ["2001:db8:0:1::99", "2001:DB8:0:1:0:0:0:5"], "2001:db8:0:2::1"),
        (24, 64, ["198.51.100.200"], "198.51.101.7"),
        (32, 128, ["2001:0db8:0:1:0:0:0:1"], "2001:db8:0:1::2"),
    ],
)
def test_slots_group_sources_by_prefix(v4: int, v6: int, same: list[str], other: str) -> None:
    first = "2001:db8:0:1::1" if ":" in other else "198.51.100.7"
    slots = Slots(None, 1 + len(same), prefix_v4=v4, prefix_v6=v6)
    assert slots.admit(first) is None
    assert all(slots.admit(host) is None for host in same)
    assert slots.admit(first) == "source_cap"  # the group's share is held
    assert slots.admit(other) is None  # another group
    for host in [first, *same]:  # released by any spelling of a member
        slots.release(host)
    assert slots.sources is not None and slots.sources.held(slots.source(first)) == 0
    assert slots.admit(first) is None


def test_slots_without_per_source_count_only_the_cap() -> None:
    slots = Slots(2)
    assert slots.admit("192.0.2.1") is None and slots.admit("192.0.2.1") is None
    assert slots.admit("192.0.2.1") == "cap" and slots.per_source is None
    slots.release("192.0.2.1")
    assert slots.used == 1


def test_refusals_by_reason() -> None:
    refusals = Refusals()
    refusals.count("cap")
    refusals.count("cap")
    refusals.count("descriptors")
    assert refusals.by_reason(no_backend=3) == {
        "cap": 2, "source_cap": 0, "descriptors": 1, "no_backend": 3, "connect_failed": 0}
    with pytest.raises(AttributeError):
        refusals.count("no_such_reason")
