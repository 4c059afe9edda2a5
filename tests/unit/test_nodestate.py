"""What a node is now (route view, VIPs it could own, readiness) from small parts."""

from __future__ import annotations

import ipaddress
from typing import Any

from anycast_lb.bgp.liveness import Freshness
from anycast_lb.bgp.policy import DrainPhase, Ownership
from anycast_lb.config import NodeConfig, parse_config
from anycast_lb.drain import Drain, DrainMachine
from anycast_lb.nodestate import IPAddress, NodeState
from anycast_lb.pool import Pool

CONSENSUS = {"endpoints": ["http://127.0.0.1:2379"], "cluster": "c1", "lease_ttl": 2.0,
             "request_timeout": 0.5}
VIP1, VIP2, VIP3 = (ipaddress.ip_address(f"198.51.100.{n}") for n in (10, 11, 12))


def cfg() -> NodeConfig:
    def service(name: str, vip: IPAddress, port: int, **more: Any) -> dict[str, Any]:
        return {"name": name, "vip": str(vip), "port": port,
                "backends": [{"address": "10.0.0.1", "port": 8080}], **more}
    return parse_config({
        "node": {"name": "lb1"}, "consensus": CONSENSUS, "election": {"interface": "eth1"},
        "services": [
            service("web", VIP1, 80),
            service("web-tls", VIP1, 443),  # the same VIP
            service("elected", VIP2, 80, announce={"mode": "active_passive"}),
            service("lan", VIP3, 80, announce={"mode": "active_passive", "via": "l2"}),
        ]})


class Parts:
    """The data plane, the agreed health, the elections and the speaker, as sets."""

    def __init__(self) -> None:
        self.listening_on = {"web", "web-tls", "elected", "lan"}
        self.healthy = {"web", "web-tls", "elected", "lan"}
        self.owned: set[IPAddress] = set()
        self.fresh = Freshness(True, 0.5)

    def listening(self, service: str) -> bool:
        return service in self.listening_on

    def announce_healthy(self, service: str) -> bool:
        return service in self.healthy

    def owns(self, vip: IPAddress) -> bool:
        return vip in self.owned

    def freshness(self) -> Freshness:
        return self.fresh


def state(parts: Parts, drain: DrainMachine | None = None, *, elections: bool = True,
          bgp: bool = True) -> NodeState:
    config = cfg()
    return NodeState(lambda: config, drain or DrainMachine(1.0, announces=True), parts,
                     {s.name: Pool(s) for s in config.services}, consensus=parts,
                     owners=parts if elections else None, speaker=parts if bgp else None)


def test_the_route_view_leaves_l2_vips_out_and_names_ownership() -> None:
    parts = Parts()
    parts.owned = {VIP2}
    view = state(parts).view()
    assert [s.name for s in view.services] == ["web", "web-tls", "elected"]
    assert [s.ownership for s in view.services] == [Ownership.SHARED, Ownership.SHARED,
                                                     Ownership.OWNER]
    parts.owned = set()
    assert state(parts).view().services[2].ownership is Ownership.STANDBY
    assert state(parts, elections=False).view().services[2].ownership is Ownership.UNELECTED
    assert view.drain is DrainPhase.NONE and not view.standby_prepend


def test_a_vip_is_served_only_when_every_service_of_it_is() -> None:
    parts = Parts()
    parts.listening_on.discard("web-tls")
    parts.healthy.discard("lan")
    assert state(parts).serving() == {VIP1: False, VIP2: True, VIP3: False}
    drain = DrainMachine(1.0, announces=True)
    drain.handle(Drain("test"), 0.0)
    assert state(Parts(), drain).serving() == {VIP1: False, VIP2: False, VIP3: False}


def test_readiness_names_what_is_missing() -> None:
    parts = Parts()
    assert state(parts).readiness() == (True, "serving: web, web-tls, elected")
    parts.fresh = Freshness(False, 12.0)
    ready, reason = state(parts).readiness()
    assert not ready and reason.startswith("BGP state unconfirmed") and "12.0 s" in reason
    assert state(parts, bgp=False).readiness()[0]
    parts.healthy = {"lan"}  # l2 only: nothing to announce
    assert state(parts, bgp=False).readiness() == (
        False, "no service has min_healthy backends up and a listening forwarder")
    drain = DrainMachine(1.0, announces=True)
    drain.handle(Drain("test"), 0.0)
    assert state(Parts(), drain).readiness() == (False, "node is draining")
