"""Route policy: every combination of health, listening, drain, withdraw_on_down,
damping and shared prefixes."""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from anycast_lb.bgp.policy import (
    GRACEFUL_SHUTDOWN,
    DrainPhase,
    NodeView,
    Route,
    ServiceView,
    announcement_state,
    desired_routes,
    prefix_up,
)
from anycast_lb.config import BgpConfig

VIP = ipaddress.ip_network("198.51.100.10/32")
VIP2 = ipaddress.ip_network("198.51.100.11/32")
VIP6 = ipaddress.ip_network("2001:db8::10/128")


def bgp(withdraw_on_down: bool = True, communities: tuple[str, ...] = ("65100:1",),
        prepend: int = 0) -> BgpConfig:
    return BgpConfig.model_validate({
        "local_as": 65100, "router_id": "203.0.113.10", "local_address": "203.0.113.10",
        "peers": [{"address": "203.0.113.1", "peer_as": 65000}],
        "announce": {"med": 100, "down_med": 1000, "communities": list(communities),
                     "withdraw_on_down": withdraw_on_down, "as_path_prepend": prepend},
    })


def svc(name: str, healthy: bool, listening: bool, prefix: ipaddress.IPv4Network
        | ipaddress.IPv6Network = VIP) -> ServiceView:
    return ServiceView(name=name, prefix=prefix, healthy=healthy, listening=listening)


def expected(healthy: bool, listening: bool, drain: DrainPhase, withdraw_on_down: bool,
             damped: bool) -> tuple[str, int | None, bool]:
    """(announcement state, MED or None when withdrawn, graceful community)."""
    if not listening or drain is DrainPhase.WITHDRAWN:
        return "withdrawn", None, False
    if not healthy and withdraw_on_down:
        return "withdrawn", None, False
    if damped:
        return "damped", None, False
    med = 100 if healthy else 1000
    graceful = drain is DrainPhase.GRACEFUL
    return ("draining" if graceful else "announced"), med, graceful


CASES = list(itertools.product([True, False], [True, False], list(DrainPhase),
                               [True, False], [True, False]))


@pytest.mark.parametrize(("healthy", "listening", "drain", "withdraw_on_down", "damped"), CASES)
def test_single_service_every_state(healthy: bool, listening: bool, drain: DrainPhase,
                                    withdraw_on_down: bool, damped: bool) -> None:
    view = NodeView(drain, (svc("web", healthy, listening),))
    cfg = bgp(withdraw_on_down)
    suppressed = frozenset({VIP}) if damped else frozenset()
    state, med, graceful = expected(healthy, listening, drain, withdraw_on_down, damped)

    routes = desired_routes(view, cfg, suppressed)
    assert announcement_state(view, cfg, suppressed) == {VIP: state}
    if med is None:
        assert routes == {}
    else:
        communities = ("65100:1", GRACEFUL_SHUTDOWN) if graceful else ("65100:1",)
        assert routes == {VIP: Route(VIP, med, communities, 0, 65100)}


# Two services on one VIP (tcp/80 and udp/53): the node must not attract
# traffic for a port it cannot serve.
@pytest.mark.parametrize(
    ("a", "b", "withdraw_on_down", "med"),
    [
        ((True, True), (True, True), True, 100),
        ((True, True), (False, True), True, None),  # one unhealthy
        ((True, True), (False, True), False, 1000),  # ... announced worse
        ((True, True), (True, False), True, None),  # one not listening
        ((True, True), (True, False), False, None),  # ... never softened
        ((False, True), (False, True), False, 1000),
        ((False, False), (False, False), False, None),
    ],
)
def test_shared_prefix_needs_every_service(a: tuple[bool, bool], b: tuple[bool, bool],
                                           withdraw_on_down: bool, med: int | None) -> None:
    view = NodeView(DrainPhase.NONE, (svc("web", *a), svc("dns", *b)))
    routes = desired_routes(view, bgp(withdraw_on_down))
    assert (routes[VIP].med if VIP in routes else None) == med
    assert prefix_up(view) == {VIP: all(a) and all(b)}


def test_prefixes_are_independent_and_v6_works() -> None:
    view = NodeView(DrainPhase.NONE, (
        svc("web", True, True, VIP), svc("api", False, True, VIP2), svc("web6", True, True, VIP6),
    ))
    routes = desired_routes(view, bgp(), frozenset({VIP6}))
    assert set(routes) == {VIP}
    assert announcement_state(view, bgp(), frozenset({VIP6})) == {
        VIP: "announced", VIP2: "withdrawn", VIP6: "damped"}


def test_graceful_community_is_not_doubled_and_prepend_is_carried() -> None:
    view = NodeView(DrainPhase.GRACEFUL, (svc("web", True, True),))
    routes = desired_routes(view, bgp(communities=(GRACEFUL_SHUTDOWN,), prepend=2))
    assert routes[VIP] == Route(VIP, 100, (GRACEFUL_SHUTDOWN,), 2, 65100)


def test_prefix_up_ignores_drain_so_drain_is_no_flap() -> None:
    view = NodeView(DrainPhase.WITHDRAWN, (svc("web", True, True),))
    assert prefix_up(view) == {VIP: True}
    assert desired_routes(view, bgp()) == {}


def test_no_services_no_routes() -> None:
    assert desired_routes(NodeView(DrainPhase.NONE, ()), bgp()) == {}


def test_dual_stack_routes_carry_the_next_hop_of_their_family() -> None:
    dual = BgpConfig.model_validate({
        "local_as": 65100, "router_id": "203.0.113.10", "local_address": "203.0.113.10",
        "next_hop_v6": "2001:db8::a",
        "peers": [{"address": "203.0.113.1", "peer_as": 65000}],
        "announce": {"large_communities": ["65100:1:2"], "extended_communities": ["target:65100:7"]},
    })
    view = NodeView(DrainPhase.NONE, (svc("web", True, True), svc("web6", True, True, VIP6)))
    routes = desired_routes(view, dual)
    assert routes[VIP].next_hop is None  # next-hop self: the IPv4 session's own address
    assert routes[VIP6].next_hop == ipaddress.ip_address("2001:db8::a")
    for route in routes.values():
        assert route.large_communities == ("65100:1:2",)
        assert route.extended_communities == ("target:65100:7",)
    assert dual.families() == (4, 6)
    assert bgp().families() == (4,)
