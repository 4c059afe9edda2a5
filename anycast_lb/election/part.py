"""A node's VIP ownership part: :class:`VipOwnership` for its
``active_passive`` services, with what moves the VIP.

- ``via: l2`` VIPs move by :class:`~anycast_lb.election.etcd.L2VipActions`
  on ``election.interface`` (add the address and send gratuitous ARP / an
  unsolicited NA; remove the address).
- ``via: bgp`` VIPs move by the route policy (rule 8 of
  :mod:`anycast_lb.bgp.policy`): every take and drop calls ``on_change`` so
  the route controller evaluates again; :meth:`OwnershipPart.owns` is what
  the node's route view reads.

Qualification (:meth:`OwnershipPart.qualify`) is fed by the node on every
change of health, listeners and drain; only changes reach the machines.
:meth:`OwnershipPart.hand_over` is the first step of a drain: the node stops
qualifying, resigns, and waits (make before break) until the successor has
announced or the handover timed out.

The part has its own etcd connection (a :class:`Store` on the consensus
endpoints): the consensus agent's store lives only inside its session, and
ownership must keep fencing on its own lease whatever the agent does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from anycast_lb import log
from anycast_lb.clock import Clock, SystemClock, wait_event
from anycast_lb.config import (
    AnnounceMode,
    AnnounceVia,
    ConsensusConfig,
    ElectionConfig,
    ServiceConfig,
    StandbyMode,
)
from anycast_lb.consensus.store import Store
from anycast_lb.election.etcd import IPAddress, L2VipActions, VipOwnership
from anycast_lb.election.machine import ElectionSettings, Role, VipState
from anycast_lb.errors import L2Error

FENCE_REFRESH = 0.05
"""s between checks of the kernel fence against the fencing deadline."""


def elected_vips(services: Iterable[ServiceConfig]) -> dict[IPAddress, bool]:
    """VIP -> moved by L2 (True) or BGP (False), for ``active_passive``
    services; a VIP any of whose services says ``via: l2`` moves by L2."""
    vips: dict[IPAddress, bool] = {}
    for s in services:
        if s.announce.mode is AnnounceMode.ACTIVE_PASSIVE:
            vips[s.vip] = vips.get(s.vip, False) or s.announce.via is AnnounceVia.L2
    return vips


class OwnershipPart:
    """Elections for the node's ``active_passive`` VIPs (module docstring).

    ``store`` defaults to a new :class:`Store` on ``consensus.endpoints``
    (closed when :meth:`run` ends). ``l2`` defaults to
    :class:`L2VipActions` on ``election.interface`` when a VIP moves by L2.
    """

    def __init__(self, consensus: ConsensusConfig, election: ElectionConfig, node: str,
                 services: Sequence[ServiceConfig], *, on_change: Callable[[], None],
                 clock: Clock | None = None, store: Store | None = None,
                 l2: L2VipActions | None = None) -> None:
        self._clock = clock or SystemClock()
        self.vips = elected_vips(services)
        self.standby_prepend = election.standby is StandbyMode.PREPEND
        self._own_store = store is None
        self.store = store or Store(consensus.endpoints, consensus.request_timeout,
                                    clock=self._clock)
        if l2 is None and any(self.vips.values()):
            assert election.interface is not None  # config validation
            l2 = L2VipActions(election.interface)
        self.l2 = l2
        self._on_change = on_change
        self.settings = ElectionSettings(
            node=node, lease_ttl=consensus.lease_ttl, safety_margin=election.safety_margin,
            priority=election.priority, preempt=election.preempt,
            handover_timeout=election.handover_timeout)
        self.ownership = VipOwnership(self.store, consensus.cluster, self.settings,
                                      list(self.vips), on_take=self._take,
                                      on_announce=self._announce, on_drop=self._drop,
                                      on_resign=self._resign, clock=self._clock)
        self._qualifies: dict[IPAddress, bool] = {}
        self._held: dict[IPAddress, float | None] = {}
        """L2: the deadline each VIP's kernel fence was last set to."""
        self._leaving = False
        self._moved = asyncio.Event()
        self.fence_failures = 0
        """L2: kernel fence writes (hold or release) libnftables refused."""

    # -- what the node reads ---------------------------------------------------

    def owns(self, vip: IPAddress) -> bool:
        """This node holds ``vip`` now (fenced: False once its lease may lapse)."""
        machine = self.ownership.machines.get(vip)
        return machine is not None and machine.has_vip

    def states(self) -> dict[IPAddress, VipState]:
        return self.ownership.states()

    def status(self) -> list[dict[str, object]]:
        """``/status`` ``vips`` (:class:`~anycast_lb.status.VipOwnerStatus`)."""
        from anycast_lb.status import iso_utc

        out: list[dict[str, object]] = []
        for vip, state in self.states().items():
            out.append({"vip": str(vip), "via": "l2" if self.vips[vip] else "bgp",
                        "owner": state.owner, "term": state.term,
                        "since": iso_utc(self.wall(state.since)), "role": state.role.value,
                        "has_vip": state.has_vip, "qualifies": self._qualifies.get(vip, False)})
        return out

    def metric_families(self) -> Iterator[Metric]:
        """``anycast_lb_vip_owner{vip,owner}`` (1 for the owner observed),
        ``anycast_lb_vip_term{vip}``, ``anycast_lb_vip_is_owner{vip}`` and
        ``anycast_lb_vip_fence_failures_total`` (L2 kernel fence writes
        refused)."""
        owner = GaugeMetricFamily("anycast_lb_vip_owner",
                                  "Owner of an elected VIP as observed on etcd (1)",
                                  labels=["vip", "owner"])
        term = GaugeMetricFamily("anycast_lb_vip_term",
                                 "Term (fencing token) of an elected VIP's owner", labels=["vip"])
        mine = GaugeMetricFamily("anycast_lb_vip_is_owner",
                                 "1 while this node holds an elected VIP", labels=["vip"])
        for vip, state in self.states().items():
            if state.owner is not None:
                owner.add_metric([str(vip), state.owner], 1)
            if state.term is not None:
                term.add_metric([str(vip)], state.term)
            mine.add_metric([str(vip)], 1 if state.has_vip else 0)
        fence = CounterMetricFamily("anycast_lb_vip_fence_failures",
                                    "L2 kernel fence writes (hold or release) nftables refused")
        fence.add_metric([], float(self.fence_failures))
        yield owner
        yield term
        yield mine
        yield fence

    def wall(self, monotonic: float | None) -> float | None:
        """A monotonic time of :meth:`states` as epoch seconds."""
        if monotonic is None:
            return None
        return self._clock.wall() - (self._clock.monotonic() - monotonic)

    # -- what the node feeds ---------------------------------------------------

    def qualify(self, serving: Mapping[IPAddress, bool]) -> None:
        """Per VIP: the node can serve it now (not draining, every service of
        it listening with ``min_healthy`` up). Feeds only changes; while
        handing over, nothing qualifies."""
        for vip in self.vips:
            qualifies = serving.get(vip, False) and not self._leaving
            if self._qualifies.get(vip) != qualifies:
                self._qualifies[vip] = qualifies
                self.ownership.set_qualifies(vip, qualifies)

    async def hand_over(self, serving: Mapping[IPAddress, bool], timeout: float) -> bool:
        """Planned move (drain): stop qualifying, resign, and wait until this
        node holds no VIP (the successor announced, or the handover timed
        out, or the fence fell), at most ``timeout`` s. True if none is held."""
        self._leaving = True
        self.qualify(serving)
        if not any(self.owns(v) for v in self.vips):
            return True
        started = self._clock.monotonic()
        deadline = started + timeout
        while any(self.owns(v) for v in self.vips):
            left = deadline - self._clock.monotonic()
            self._moved.clear()
            if left <= 0 or not await wait_event(self._clock, self._moved, left):
                break
        held = [str(v) for v in self.vips if self.owns(v)]
        waited = round(self._clock.monotonic() - started, 3)
        if held:
            log.warning("vip.handover_timeout", node=self.settings.node, held=",".join(held),
                        waited_s=waited)
        else:
            log.event("vip.handover", node=self.settings.node, waited_s=waited)
        return not held

    def rejoin(self, serving: Mapping[IPAddress, bool]) -> None:
        """Undrain: qualify again as ``serving`` says."""
        self._leaving = False
        self.qualify(serving)

    async def run(self) -> None:
        """Run the elections until cancelled; drops every VIP on the way out.
        Raises L2Error at once when ``election.interface`` is missing or the
        process lacks ``CAP_NET_RAW`` (a node that could never announce must
        not win an election)."""
        if self.l2 is not None:
            self.l2.prepare([vip for vip, l2 in self.vips.items() if l2])
            # A node starts holding no VIP: an address left on the interface
            # by an earlier run that died (SIGKILL, crash) would make this
            # node's kernel answer ARP/NDP for a VIP another node owns.
            for vip, l2 in self.vips.items():
                if l2:
                    await self.l2.clear(vip)
        if self._own_store:
            self.store.connect()
        try:
            if self.l2 is not None:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._fence_loop())
                    await self.ownership.run()
            else:
                await self.ownership.run()
        finally:
            if self.l2 is not None:
                self.l2.announcer.close()
                self.l2.fence.close()
            if self._own_store:
                await self.store.close()

    # -- callbacks (VipOwnership runs them in order, one at a time) -------------

    def _changed(self) -> None:
        self._moved.set()
        self._on_change()

    def _hold(self, vip: IPAddress) -> None:
        """Kernel fence: let the kernel answer for ``vip`` until this
        node's fencing deadline (or stop it when that has passed)."""
        assert self.l2 is not None
        deadline = self.ownership.machines[vip].fence_deadline()
        self._held[vip] = deadline
        try:
            if deadline is None:
                self.l2.fence.release(vip)
            else:
                self.l2.fence.hold(vip, deadline, self._clock.monotonic())
        except L2Error as exc:
            self._fence_failed(vip, exc)
            raise

    def _release(self, vip: IPAddress) -> None:
        assert self.l2 is not None
        self._held[vip] = None
        try:
            self.l2.fence.release(vip)
        except L2Error as exc:  # the address goes anyway
            self._fence_failed(vip, exc)

    def _fence_failed(self, vip: IPAddress, exc: L2Error) -> None:
        self.fence_failures += 1
        log.error("vip.fence_failed", vip=str(vip), error=str(exc))

    async def _fence_loop(self) -> None:
        """Move each held L2 VIP's kernel fence to the deadline of the last
        renewed lease (checked every FENCE_REFRESH s; a call only when the
        deadline moved). A process that stops here leaves the kernel to
        stop answering at the last deadline by itself."""
        while True:
            for vip, l2 in self.vips.items():
                machine = self.ownership.machines[vip]
                if l2 and machine.has_vip and machine.role is Role.OWNER \
                        and machine.fence_deadline() != self._held.get(vip):
                    try:
                        self._hold(vip)
                    except L2Error:  # counted and logged; retried at the next check
                        pass
            await self._clock.sleep(FENCE_REFRESH)

    async def _take(self, vip: IPAddress, term: int) -> None:
        if self.vips.get(vip) and self.l2 is not None:
            self._hold(vip)
            await self.l2.take(vip, term)
        self._changed()

    async def _announce(self, vip: IPAddress, term: int) -> None:
        if self.vips.get(vip) and self.l2 is not None:
            await self.l2.announce(vip, term)

    async def _resign(self, vip: IPAddress, term: int) -> None:
        if self.vips.get(vip) and self.l2 is not None:
            self._release(vip)
            await self.l2.quiet(vip, term)

    async def _drop(self, vip: IPAddress, term: int, reason: str) -> None:
        try:
            if self.vips.get(vip) and self.l2 is not None:
                self._release(vip)
                await self.l2.drop(vip, term, reason)
        finally:
            self._changed()
