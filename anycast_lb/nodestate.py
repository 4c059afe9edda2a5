"""What a node is now, as its parts decide on it: the route policy's
:class:`~anycast_lb.bgp.policy.NodeView`, the VIPs it could own
(``serving``, for the VIP elections) and its readiness (``/readyz``).

Read at each decision from the parts (the drainer's state, the data plane's
listeners, the pools or, with consensus, the agreed backend health, the VIP
elections, ExaBGP's last answer); nothing is cached here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Protocol

from anycast_lb.bgp.liveness import CONFIRM_DEADLINE, Freshness
from anycast_lb.bgp.policy import NodeView, Ownership, ServiceView
from anycast_lb.config import AnnounceMode, AnnounceVia, NodeConfig, ServiceConfig, StandbyMode
from anycast_lb.drain import DrainState
from anycast_lb.pool import Pool

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Drain(Protocol):
    """The drainer (:class:`anycast_lb.drainer.Drainer`)."""

    @property
    def state(self) -> DrainState: ...


class Listeners(Protocol):
    """The data plane (:class:`anycast_lb.dataplane.DataPlane`)."""

    def listening(self, service: str) -> bool: ...


class AgreedHealth(Protocol):
    """The consensus agent (:class:`anycast_lb.consensus.agent.ConsensusAgent`)."""

    def announce_healthy(self, service: str) -> bool:
        """The agreed backends of ``service`` pass this node's own checks too."""
        ...


class Owners(Protocol):
    """The VIP elections (:class:`anycast_lb.election.part.OwnershipPart`)."""

    def owns(self, vip: IPAddress) -> bool: ...


class Confirmed(Protocol):
    """The BGP speaker (:class:`anycast_lb.bgp.speaker.BgpSpeaker`)."""

    def freshness(self) -> Freshness: ...


class NodeState:
    """``config`` gives the config in effect; ``pools`` the node's pools
    (service health standalone); ``consensus`` the agreed health instead."""

    def __init__(self, config: Callable[[], NodeConfig], drain: Drain, data: Listeners,
                 pools: Mapping[str, Pool], *, consensus: AgreedHealth | None = None,
                 owners: Owners | None = None, speaker: Confirmed | None = None) -> None:
        self._config, self._drain, self._data, self._pools = config, drain, data, pools
        self._consensus, self._owners, self._speaker = consensus, owners, speaker

    @property
    def draining(self) -> bool:
        return self._drain.state.draining

    def healthy(self, service: str) -> bool:
        """``service`` has ``min_healthy`` backends up (with consensus: agreed
        up and passing this node's checks)."""
        if self._consensus is not None:
            return self._consensus.announce_healthy(service)
        return self._pools[service].healthy

    def view(self) -> NodeView:
        """The node snapshot the route policy decides on."""
        config = self._config()
        return NodeView(
            drain=self._drain.state.phase.route_phase,
            services=tuple(
                ServiceView(name=s.name, prefix=s.prefix, healthy=self.healthy(s.name),
                            listening=self._data.listening(s.name),
                            ownership=self._ownership(s))
                # via: l2 VIPs move by ARP/NA only, never over BGP.
                for s in config.services if s.announce.via is not AnnounceVia.L2
            ),
            standby_prepend=config.election.standby is StandbyMode.PREPEND,
        )

    def _ownership(self, service: ServiceConfig) -> Ownership:
        if service.announce.mode is not AnnounceMode.ACTIVE_PASSIVE:
            return Ownership.SHARED
        if self._owners is None:
            return Ownership.UNELECTED
        return Ownership.OWNER if self._owners.owns(service.vip) else Ownership.STANDBY

    def serving(self) -> dict[IPAddress, bool]:
        """Per VIP: this node could own it now (not draining; every service
        of the VIP listening with ``min_healthy`` backends up)."""
        out: dict[IPAddress, bool] = {}
        draining = self.draining
        for s in self._config().services:
            ok = (not draining and self._data.listening(s.name) and self.healthy(s.name))
            out[s.vip] = out.get(s.vip, True) and ok
        return out

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) for ``/readyz``: not draining, ExaBGP answered
        within :data:`~anycast_lb.bgp.liveness.CONFIRM_DEADLINE` s (with
        BGP), and at least one service listening and healthy."""
        if self.draining:
            return False, "node is draining"
        if self._speaker is not None:
            fresh = self._speaker.freshness()
            if not fresh.confirmed:
                return False, (f"BGP state unconfirmed: no answer from ExaBGP for "
                               f"{fresh.age:.1f} s (deadline {CONFIRM_DEADLINE:g} s)")
        healthy = [s.name for s in self.view().services if s.listening and s.healthy]
        if not healthy:
            return False, "no service has min_healthy backends up and a listening forwarder"
        return True, f"serving: {', '.join(healthy)}"
