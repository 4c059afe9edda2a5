"""ExaBGP API lines: exact text, and no way to inject a second command."""

from __future__ import annotations

import ipaddress

import pytest

from anycast_lb.bgp.policy import Route
from anycast_lb.bgp.render import announce_line, diff, full, withdraw_line
from anycast_lb.errors import UnsafeAttribute

V4 = ipaddress.ip_network("198.51.100.10/32")
V4B = ipaddress.ip_network("198.51.100.11/32")
V6 = ipaddress.ip_network("2001:db8::10/128")


def route(prefix: ipaddress.IPv4Network | ipaddress.IPv6Network = V4, med: int = 100,
          communities: tuple[str, ...] = (), prepend: int = 0) -> Route:
    return Route(prefix, med, communities, prepend, 65100)


@pytest.mark.parametrize(("r", "line"), [
    (route(), "announce route 198.51.100.10/32 next-hop self med 100"),
    (route(communities=("65100:1", "65535:0"), prepend=2),
     "announce route 198.51.100.10/32 next-hop self med 100 community [65100:1 65535:0]"
     " as-path [65100 65100]"),
    (route(V6, med=0, prepend=1),
     "announce route 2001:db8::10/128 next-hop self med 0 as-path [65100]"),
    (route(med=4294967295, communities=("0:0", "65535:65535")),
     "announce route 198.51.100.10/32 next-hop self med 4294967295 community [0:0 65535:65535]"),
])
def test_announce_lines(r: Route, line: str) -> None:
    assert announce_line(r) == line


def test_withdraw_lines() -> None:
    # No next hop: ExaBGP keys its RIB by prefix, and ``next-hop self`` on a
    # withdraw of the other family (dual stack) would be refused.
    assert withdraw_line(V4) == "withdraw route 198.51.100.10/32"
    assert withdraw_line(V6) == "withdraw route 2001:db8::10/128"


NH6 = ipaddress.ip_address("2001:db8::a")
NH4 = ipaddress.ip_address("203.0.113.10")


@pytest.mark.parametrize(("r", "line"), [
    (Route(V6, 100, (), 0, 65100, next_hop=NH6),
     "announce route 2001:db8::10/128 next-hop 2001:db8::a med 100"),
    (Route(V4, 100, (), 0, 65100, next_hop=NH4),
     "announce route 198.51.100.10/32 next-hop 203.0.113.10 med 100"),
    (Route(V4, 100, ("65100:1",), 1, 65100, large_communities=("65100:1:2", "4294967295:0:0"),
           extended_communities=("target:65100:7", "origin:192.0.2.1:65535")),
     "announce route 198.51.100.10/32 next-hop self med 100 community [65100:1]"
     " large-community [65100:1:2 4294967295:0:0]"
     " extended-community [target:65100:7 origin:192.0.2.1:65535] as-path [65100]"),
])
def test_dual_stack_and_community_lines(r: Route, line: str) -> None:
    assert announce_line(r) == line


@pytest.mark.parametrize("bad", [
    Route(V6, 100, (), 0, 65100, next_hop=NH4),  # an IPv6 route with an IPv4 next hop
    Route(V4, 100, (), 0, 65100, next_hop="self\nannounce route 0.0.0.0/0"),  # type: ignore[arg-type]
    Route(V4, 100, (), 0, 65100, large_communities=("1:2:3\n",)),
    Route(V4, 100, (), 0, 65100, large_communities=("4294967296:0:0",)),
    Route(V4, 100, (), 0, 65100, large_communities=["1:2:3"]),  # type: ignore[arg-type]
    Route(V4, 100, (), 0, 65100, large_communities=("1:2:3",) * 33),
    Route(V4, 100, (), 0, 65100, extended_communities=("target:65100:1]",)),
    Route(V4, 100, (), 0, 65100, extended_communities=("redirect:65100:1",)),
    Route(V4, 100, (), 0, 65100, extended_communities=("target:4200000000:65536",)),
])
def test_unsafe_dual_stack_and_community_values_are_rejected(bad: Route) -> None:
    with pytest.raises(UnsafeAttribute):
        announce_line(bad)


@pytest.mark.parametrize("community", [
    "65100:1\nannounce route 0.0.0.0/0 next-hop self",
    "65100:1]", "[65100:1", "65100:1 65100:2", "65100:1;", "65100:1\r", "65100:1\x00",
    "65536:1", "1:65536", "65100", "a:b", "", "６５１００:1",
])
def test_unsafe_communities_are_rejected(community: str) -> None:
    with pytest.raises(UnsafeAttribute):
        announce_line(route(communities=(community,)))


@pytest.mark.parametrize("bad", [
    route(med=-1), route(med=2**32), route(prepend=-1), route(prepend=33),
    Route(V4, True, (), 0, 65100),  # type: ignore[arg-type]
    Route(V4, 100, (), 0, 0),
    Route("198.51.100.10/32\nannounce route 0.0.0.0/0", 100, (), 0, 65100),  # type: ignore[arg-type]
    Route(V4, "100 community [1:1]", (), 0, 65100),  # type: ignore[arg-type]
    Route(V4, 100, ["65100:1"], 0, 65100),  # type: ignore[arg-type]
])
def test_unsafe_values_are_rejected(bad: Route) -> None:
    with pytest.raises(UnsafeAttribute):
        announce_line(bad)


def test_non_ascii_digits_are_not_digits() -> None:
    from anycast_lb.bgp.render import check_community

    with pytest.raises(UnsafeAttribute):
        check_community("６５１００:1")


def test_withdraw_rejects_strings() -> None:
    with pytest.raises(UnsafeAttribute):
        withdraw_line("198.51.100.10/32\nannounce route 0.0.0.0/0 next-hop self")  # type: ignore[arg-type]


def test_diff_withdraws_first_then_new_and_changed_only() -> None:
    old = {V4: route(), V4B: route(V4B), V6: route(V6)}
    new = {V4: route(), V4B: route(V4B, med=1000), ipaddress.ip_network("198.51.100.12/32"):
           route(ipaddress.ip_network("198.51.100.12/32"))}
    assert diff(old, new) == [
        "withdraw route 2001:db8::10/128",
        "announce route 198.51.100.11/32 next-hop self med 1000",
        "announce route 198.51.100.12/32 next-hop self med 100",
    ]
    assert diff(new, new) == []
    assert diff({}, {}) == []


def test_diff_orders_mixed_families_stably() -> None:
    new = {V6: route(V6), V4B: route(V4B), V4: route(V4)}
    assert [line.split()[2] for line in diff({}, new)] == [
        "198.51.100.10/32", "198.51.100.11/32", "2001:db8::10/128"]
    assert diff({}, new) == full(new)


def test_diff_rejects_a_route_filed_under_another_prefix() -> None:
    with pytest.raises(UnsafeAttribute):
        diff({}, {V4: route(V4B)})
