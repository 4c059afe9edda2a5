"""Route policy rule 8: active-passive ownership (owner, standby withdraw or
prepend, unelected prepend-only, shared), crossed with health, listening,
drain and the configured prepend."""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from anycast_lb.bgp.policy import (
    GRACEFUL_SHUTDOWN,
    DrainPhase,
    NodeView,
    Ownership,
    ServiceView,
    announcement_state,
    desired_routes,
    prefix_up,
)
from anycast_lb.config import BgpConfig

VIP = ipaddress.ip_network("198.51.100.10/32")


def bgp(prepend: int) -> BgpConfig:
    return BgpConfig.model_validate({
        "local_as": 65100, "router_id": "203.0.113.10", "local_address": "203.0.113.10",
        "peers": [{"address": "203.0.113.1", "peer_as": 65000}],
        "announce": {"med": 100, "as_path_prepend": prepend},
    })


def expected_prepend(ownership: Ownership, standby_prepend: bool, prepend: int) -> int | None:
    """The AS-path prepend announced for a healthy, listening, undrained
    prefix, or None when it is withdrawn (rule 8)."""
    if ownership is Ownership.OWNER:
        return 0
    if ownership is Ownership.STANDBY:
        return max(prepend, 1) if standby_prepend else None
    return prepend


CASES = list(itertools.product(list(Ownership), [True, False], [0, 3],
                               [True, False], [True, False], list(DrainPhase)))


@pytest.mark.parametrize(("ownership", "standby_prepend", "prepend", "healthy", "listening",
                          "drain"), CASES)
def test_ownership_rule(ownership: Ownership, standby_prepend: bool, prepend: int,
                        healthy: bool, listening: bool, drain: DrainPhase) -> None:
    view = NodeView(drain=drain, standby_prepend=standby_prepend, services=(
        ServiceView("web", VIP, healthy=healthy, listening=listening, ownership=ownership),))
    routes = desired_routes(view, bgp(prepend))
    want = expected_prepend(ownership, standby_prepend, prepend)
    # Ownership only narrows what rules 1-7 announce (withdraw_on_down is on).
    if not healthy or not listening or drain is DrainPhase.WITHDRAWN:
        want = None
    if want is None:
        assert VIP not in routes
        assert announcement_state(view, bgp(prepend))[VIP] == "withdrawn"
    else:
        route = routes[VIP]
        assert route.as_path_prepend == want
        assert route.med == 100
        assert (GRACEFUL_SHUTDOWN in route.communities) is (drain is DrainPhase.GRACEFUL)
        state = announcement_state(view, bgp(prepend))[VIP]
        assert state == ("draining" if drain is DrainPhase.GRACEFUL else "announced")
    # A move of ownership is never a flap.
    assert prefix_up(view)[VIP] is (healthy and listening)


@pytest.mark.parametrize(("first", "second", "announced"), [
    (Ownership.SHARED, Ownership.OWNER, True),
    (Ownership.SHARED, Ownership.STANDBY, False),
    (Ownership.STANDBY, Ownership.SHARED, False),
    (Ownership.OWNER, Ownership.SHARED, True),
])
def test_a_shared_and_an_elected_service_on_one_vip_follow_the_election(
        first: Ownership, second: Ownership, announced: bool) -> None:
    view = NodeView(drain=DrainPhase.NONE, services=(
        ServiceView("tcp", VIP, healthy=True, listening=True, ownership=first),
        ServiceView("udp", VIP, healthy=True, listening=True, ownership=second)))
    assert (VIP in desired_routes(view, bgp(2))) is announced
