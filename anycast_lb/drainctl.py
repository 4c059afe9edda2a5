"""Drain and undrain requests (``POST /drain``, ``POST /undrain``,
``anycast-lb drain|undrain``), with the node's elected VIPs moved first.

The drain state itself has one writer, :class:`~anycast_lb.drainer.Drainer`;
this part only asks it, around the VIP elections: a drain first hands the
elected VIPs over (make before break: resign, wait until a successor holds
them) once this node may drain (it holds a drain slot, or has none to take,
:class:`~anycast_lb.drainer.HandOverFirst`), and a drain refused or undone
lets the node qualify as a candidate again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from anycast_lb.api import DrainAnswer
from anycast_lb.drain import Undrain
from anycast_lb.drainer import Drainer
from anycast_lb.election.machine import ElectionSettings
from anycast_lb.nodestate import IPAddress

Serving = Callable[[], Mapping[IPAddress, bool]]
"""Per VIP: this node could own it now (:meth:`NodeState.serving
<anycast_lb.nodestate.NodeState.serving>`)."""


class Elections(Protocol):
    """The VIP elections (:class:`anycast_lb.election.part.OwnershipPart`)."""

    @property
    def settings(self) -> ElectionSettings: ...

    async def hand_over(self, serving: Mapping[IPAddress, bool], timeout: float) -> bool:
        """Resign and wait up to ``timeout`` s until this node holds no VIP."""
        ...

    def rejoin(self, serving: Mapping[IPAddress, bool]) -> None:
        """Qualify again as ``serving`` says (undrain)."""
        ...


class SlotHolders(Protocol):
    """The consensus agent (:class:`anycast_lb.consensus.agent.ConsensusAgent`)."""

    @property
    def slot_holders(self) -> tuple[str, ...]:
        """Nodes holding a drain slot, as last read."""
        ...


class DrainControl:
    """Drain requests on ``drainer``; ``owners`` when the node runs VIP
    elections, ``consensus`` when it takes drain slots."""

    def __init__(self, drainer: Drainer, serving: Serving, *, owners: Elections | None = None,
                 consensus: SlotHolders | None = None) -> None:
        self._drainer, self._serving = drainer, serving
        self._owners, self._consensus = owners, consensus

    async def hand_over(self) -> None:
        """Planned move of the elected VIPs before a drain (make before
        break); waits up to ``handover_timeout + lease_ttl`` s."""
        if self._owners is not None:
            settings = self._owners.settings
            await self._owners.hand_over(self._serving(),
                                         settings.handover_timeout + settings.lease_ttl)

    async def drain(self, reason: str, wait: bool = True) -> DrainAnswer:
        """Start a drain (idempotent). With consensus, once this node holds a
        drain slot: ``wait`` queues the drain until one frees, otherwise it
        is refused when every slot is held. Raises ConsensusError (``wait``
        False) when etcd cannot say."""
        drainer = self._drainer
        if not drainer.state.draining and drainer.holds_slot:
            await self.hand_over()  # else once the slot is taken (HandOverFirst)
        draining = await drainer.request_drain(reason, wait=wait)
        if not draining and self._owners is not None:
            self._owners.rejoin(self._serving())
        holders = tuple(self._consensus.slot_holders) if self._consensus is not None else ()
        return DrainAnswer(draining=draining, waiting=drainer.waiting_for_slot,
                           holders=() if draining else holders)

    def undrain(self) -> bool:
        """End a drain. False (and nothing changes) while the node stops."""
        accepted = self._drainer.submit(Undrain()).accepted
        if accepted and self._owners is not None:
            self._owners.rejoin(self._serving())
        return accepted
