"""Route policy (pure): node and service state -> the routes to announce.

No I/O, no clock, no logging. The node builds a :class:`NodeView` from its
health monitor, forwarders and drain state, asks the flap damper which
prefixes are suppressed, and calls :func:`desired_routes`; the result goes to
:meth:`BgpSpeaker.set_routes <anycast_lb.bgp.speaker.BgpSpeaker.set_routes>`.

The rule, per VIP prefix (a /32 or /128; several services may share one VIP,
e.g. tcp/80 and udp/53):

1. drain phase ``WITHDRAWN``                                  -> withdrawn
2. any service of the prefix not listening                    -> withdrawn
   (the node cannot serve that traffic; ``withdraw_on_down`` does not
   soften this: a socket that is not bound black-holes every flow)
3. the prefix is suppressed by the flap damper                -> withdrawn
4. every service of the prefix healthy                        -> announced
   with ``announce.med``
5. some service unhealthy, ``announce.withdraw_on_down`` true -> withdrawn
6. some service unhealthy, ``announce.withdraw_on_down`` false-> announced
   with ``announce.down_med`` (routers prefer other nodes, yet this one
   still catches traffic if it is the last)
7. drain phase ``GRACEFUL`` adds the GRACEFUL_SHUTDOWN community 65535:0
   (RFC 8326 section 3) to whatever 4 or 6 announces.
8. ownership (``announce.mode: active_passive``, docs/l2.md), applied to
   what 4 to 7 announce: ``OWNER`` announces with no AS-path prepend; a
   ``STANDBY`` withdraws, or with ``NodeView.standby_prepend`` announces
   with ``announce.as_path_prepend`` (at least 1) as a warm standby;
   ``UNELECTED`` (no consensus: prepend-only, the routers decide) and
   ``SHARED`` (active-active) announce with ``announce.as_path_prepend`` as
   configured.

"Every service of the prefix" is deliberate: with ECMP a router sends all
flows for the VIP to every announcing node, whatever the port, so a node must
not attract traffic for a port it cannot serve.

Damping observes :func:`prefix_up` (rules 2, 4 and 5 without the drain), so an
operator drain is never counted as a flap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Annotations only: the announcer (ExaBGP's API process) imports this
    # module for Prefix and Route, and pydantic's config models would cost
    # it ~0.12 s of CPU at every start.
    from anycast_lb.config import BgpConfig

Prefix = IPv4Network | IPv6Network

GRACEFUL_SHUTDOWN = "65535:0"
"""Well-known community GRACEFUL_SHUTDOWN (RFC 8326 section 3)."""


class DrainPhase(str, Enum):
    """Where a node is in its drain sequence (docs/bgp.md, drain)."""

    NONE = "none"
    GRACEFUL = "graceful"
    """Still announced, tagged GRACEFUL_SHUTDOWN so routers move away first."""
    WITHDRAWN = "withdrawn"
    """Every VIP withdrawn; established connections finish."""


class Ownership(str, Enum):
    """This node's part in a service's VIP (rule 8 of the module docstring)."""

    SHARED = "shared"
    """``active_active``: every healthy node announces."""
    UNELECTED = "unelected"
    """``active_passive`` without consensus: prepend-only, no election."""
    OWNER = "owner"
    """``active_passive``: this node holds the VIP (elected, fenced)."""
    STANDBY = "standby"
    """``active_passive``: another node owns the VIP, or none does yet."""


@dataclass(frozen=True)
class ServiceView:
    """One service as the policy sees it."""

    name: str
    prefix: Prefix
    healthy: bool
    """At least ``min_healthy`` backends up, after rise/fall hysteresis."""
    listening: bool
    """The forwarder for VIP:port/protocol is bound."""
    ownership: Ownership = Ownership.SHARED


@dataclass(frozen=True)
class NodeView:
    drain: DrainPhase
    services: tuple[ServiceView, ...]
    standby_prepend: bool = False
    """``election.standby: prepend``: a standby announces with a prepend."""


@dataclass(frozen=True)
class Route:
    """One announcement, as handed to the announcer.

    ``med`` is the MULTI_EXIT_DISC (RFC 4271 section 5.1.4), 0..2**32-1;
    ``communities`` are RFC 1997 ``ASN:VALUE`` strings, in order;
    ``as_path_prepend`` is how many times ``local_as`` is put in the AS_PATH
    (0 = none, ExaBGP then adds ``local_as`` once itself on eBGP);
    ``large_communities`` are RFC 8092 ``ASN:DATA1:DATA2`` strings and
    ``extended_communities`` RFC 4360 ``target:ADMIN:N``/``origin:ADMIN:N``;
    ``next_hop`` is the NEXT_HOP (or MP_REACH_NLRI next hop, RFC 4760
    section 3), None meaning ExaBGP's ``self`` (the session's local address,
    so only for a prefix of the session's family).
    """

    prefix: Prefix
    med: int
    communities: tuple[str, ...]
    as_path_prepend: int
    local_as: int
    large_communities: tuple[str, ...] = ()
    extended_communities: tuple[str, ...] = ()
    next_hop: IPv4Address | IPv6Address | None = None


def _by_prefix(services: Iterable[ServiceView]) -> dict[Prefix, list[ServiceView]]:
    groups: dict[Prefix, list[ServiceView]] = {}
    for service in services:
        groups.setdefault(service.prefix, []).append(service)
    return groups


def prefix_up(view: NodeView) -> dict[Prefix, bool]:
    """Per prefix: every service of it listening and healthy.

    This is what the flap damper observes (drain ignored on purpose).
    """
    return {
        prefix: all(s.listening and s.healthy for s in group)
        for prefix, group in _by_prefix(view.services).items()
    }


def _ownership(group: list[ServiceView]) -> Ownership:
    """The prefix's ownership: its first elected service's (one election per
    VIP, so they agree), else SHARED."""
    for service in group:
        if service.ownership is not Ownership.SHARED:
            return service.ownership
    return Ownership.SHARED


def _route_for(
    group: list[ServiceView], drain: DrainPhase, bgp: BgpConfig, suppressed: bool,
    standby_prepend: bool = False,
) -> Route | None:
    ownership = _ownership(group)
    if ownership is Ownership.STANDBY and not standby_prepend:
        return None
    if drain is DrainPhase.WITHDRAWN or suppressed:
        return None
    if not all(s.listening for s in group):
        return None
    announce = bgp.announce
    if all(s.healthy for s in group):
        med = announce.med
    elif announce.withdraw_on_down:
        return None
    else:
        med = announce.down_med
    communities = tuple(announce.communities)
    if drain is DrainPhase.GRACEFUL and GRACEFUL_SHUTDOWN not in communities:
        communities += (GRACEFUL_SHUTDOWN,)
    prepend = announce.as_path_prepend
    if ownership is Ownership.OWNER:
        prepend = 0
    elif ownership is Ownership.STANDBY:
        prepend = max(prepend, 1)
    prefix = group[0].prefix
    return Route(
        prefix=prefix,
        med=med,
        communities=communities,
        as_path_prepend=prepend,
        local_as=bgp.local_as,
        large_communities=tuple(announce.large_communities),
        extended_communities=tuple(announce.extended_communities),
        next_hop=bgp.next_hop_v4 if prefix.version == 4 else bgp.next_hop_v6,
    )


def desired_routes(
    view: NodeView, bgp: BgpConfig, suppressed: frozenset[Prefix] = frozenset()
) -> dict[Prefix, Route]:
    """The routes this node should announce now (the module docstring has the rule).

    ``suppressed`` holds the prefixes the flap damper holds down
    (:meth:`FlapDamper.suppressed <anycast_lb.bgp.damping.FlapDamper.suppressed>`).
    A prefix absent from the result is to be withdrawn. Each route's next
    hop is ``bgp.next_hop_v4`` or ``bgp.next_hop_v6`` for its family (None,
    ``self``, when unset; config validation refuses a VIP whose family the
    sessions cannot carry that way).
    """
    routes: dict[Prefix, Route] = {}
    for prefix, group in _by_prefix(view.services).items():
        route = _route_for(group, view.drain, bgp, prefix in suppressed,
                           view.standby_prepend)
        if route is not None:
            routes[prefix] = route
    return routes


def announcement_state(
    view: NodeView, bgp: BgpConfig, suppressed: frozenset[Prefix] = frozenset()
) -> dict[Prefix, str]:
    """Per prefix, for /status: ``announced``, ``draining``, ``damped`` or ``withdrawn``.

    ``damped`` means the damper is what keeps the prefix down (it would be
    announced otherwise); ``draining`` means announced with GRACEFUL_SHUTDOWN.
    This is the policy's intent; whether ExaBGP has it yet is
    :meth:`BgpSpeaker.status <anycast_lb.bgp.speaker.BgpSpeaker.status>`.
    """
    states: dict[Prefix, str] = {}
    for prefix, group in _by_prefix(view.services).items():
        route = _route_for(group, view.drain, bgp, False, view.standby_prepend)
        if route is None:
            states[prefix] = "withdrawn"
        elif prefix in suppressed:
            states[prefix] = "damped"
        elif view.drain is DrainPhase.GRACEFUL:
            states[prefix] = "draining"
        else:
            states[prefix] = "announced"
    return states


def sort_key(prefix: Prefix) -> tuple[int, int, int]:
    """Total order over mixed IPv4/IPv6 prefixes (v4 first), for stable output."""
    return (prefix.version, int(prefix.network_address), prefix.prefixlen)


def sorted_prefixes(prefixes: Iterable[Prefix]) -> list[Prefix]:
    return sorted(prefixes, key=sort_key)

