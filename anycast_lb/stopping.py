"""A node's graceful stop (SIGTERM), in order.

1. ExaBGP is no longer restarted if it exits (it is stopped last, for good).
2. The node's elected VIPs are handed over (make before break).
3. The drainer feeds ``Stop`` (with drain slots, after taking one or after
   ``drain.slot_timeout`` s): GRACEFUL_SHUTDOWN 65535:0 (RFC 8326) for
   ``drain.announce_grace`` s, then withdraw.
4. With BGP: the withdraw settles (:func:`settle_withdraw`), so SYNs already
   in flight towards the node while routers converge still succeed.
5. The listeners stop accepting; established connections get up to
   ``drain.timeout`` s (UDP flows count as finished once idle for
   :data:`~anycast_lb.forward.udp.DRAIN_IDLE` s); the drainer is told
   ``FlowsIdle`` or ``TimedOut``.
6. With flow survival: peers steer this node's flows here until it owns
   none, within what is left of ``drain.timeout``.
7. ExaBGP stops: the routes are withdrawn, so closing its sessions changes
   nothing the routers still use.

Log events: ``node.stopping`` (drain_timeout), ``route.withdraw_unacked``,
``node.drain_timeout`` (open_connections or owned_flows).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sized
from typing import Protocol

from anycast_lb import log
from anycast_lb.clock import Clock
from anycast_lb.config import DrainConfig
from anycast_lb.drain import FlowsIdle, Phase, TimedOut
from anycast_lb.drainer import Drainer

WITHDRAW_SETTLE = 1.0
"""Seconds between a withdraw and closing listeners, so SYNs already in
flight towards this node while routers converge still succeed."""


class Synced(Protocol):
    """What waiting for a withdraw needs of the BGP speaker."""

    async def wait_synced(self) -> None:
        """Return once ExaBGP acknowledged the current route set."""
        ...


class Speaker(Synced, Protocol):
    """The BGP speaker (:class:`anycast_lb.bgp.speaker.BgpSpeaker`) as the stop drives it."""

    def begin_stop(self) -> None:
        """ExaBGP is not restarted from now on."""
        ...

    async def stop_exabgp(self) -> None:
        """Stop ExaBGP for good; return once it has exited."""
        ...


class DataPath(Protocol):
    """The data plane (:class:`anycast_lb.dataplane.DataPlane`) as the stop drives it."""

    @property
    def active(self) -> int:
        """Open connections and UDP flows."""
        ...

    def stop_accepting(self) -> None: ...

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every connection to end; True if they did."""
        ...


class OwnedFlows(Protocol):
    """Flow survival (:class:`anycast_lb.cluster.Cluster`) as the stop waits for it."""

    @property
    def local(self) -> Sized:
        """The flows this node owns."""
        ...

    async def wait_owned_zero(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until this node owns no flow; True if so."""
        ...


async def settle_withdraw(speaker: Synced, clock: Clock, **fields: object) -> None:
    """After a withdraw: wait up to :data:`WITHDRAW_SETTLE` s for ExaBGP to
    acknowledge it (``route.withdraw_unacked`` with ``fields`` if not),
    then :data:`WITHDRAW_SETTLE` s more for the routers to converge."""
    try:
        async with asyncio.timeout(WITHDRAW_SETTLE):
            await speaker.wait_synced()
    except TimeoutError:
        log.warning("route.withdraw_unacked", **fields)
    await clock.sleep(WITHDRAW_SETTLE)


class GracefulStop:
    """The stop sequence of the module docstring over the node's parts.
    ``hand_over`` moves the elected VIPs away; ``routes_changed`` makes the
    route controller and the VIP elections decide again (the listeners
    stopped accepting)."""

    def __init__(self, drain: DrainConfig, drainer: Drainer, data: DataPath, clock: Clock, *,
                 speaker: Speaker | None, cluster: OwnedFlows | None,
                 hand_over: Callable[[], Awaitable[None]],
                 routes_changed: Callable[[], None]) -> None:
        self._drain, self._drainer, self._data, self._clock = drain, drainer, data, clock
        self._speaker, self._cluster = speaker, cluster
        self._hand_over, self._routes_changed = hand_over, routes_changed

    async def run(self) -> None:
        """Carry the stop out; returns once ExaBGP (if any) has exited."""
        drain, speaker, cluster = self._drain, self._speaker, self._cluster
        log.event("node.stopping", drain_timeout=drain.timeout)
        if speaker is not None:
            speaker.begin_stop()  # an ExaBGP that exits now stays down
        await self._hand_over()
        await self._drainer.stop(drain.slot_timeout)
        if speaker is not None:
            await self._drainer.wait_past(Phase.GRACEFUL)
            await settle_withdraw(speaker, self._clock)
        self._data.stop_accepting()
        self._routes_changed()
        waited = self._clock.monotonic()
        idle = await self._data.wait_idle(drain.timeout)
        self._drainer.submit(FlowsIdle() if idle else TimedOut())
        if not idle:
            log.warning("node.drain_timeout", open_connections=self._data.active)
        if cluster is not None:
            # Planned drain: peers steer this node's
            # flows here until it owns none; only then does steering go.
            left = drain.timeout - (self._clock.monotonic() - waited)
            if not await cluster.wait_owned_zero(max(left, 0.0)):
                log.warning("node.drain_timeout", owned_flows=len(cluster.local))
        if speaker is not None:
            # Last: the routes are withdrawn, so closing the sessions changes
            # nothing the routers still use.
            await speaker.stop_exabgp()
