"""The one writer of a node's drain state: feeds the pure
:class:`~anycast_lb.drain.DrainMachine` and acts on its outcomes.

Every drain event (``POST /drain``, ``POST /undrain``, SIGTERM, the grace
timer, the data path going idle) goes through :meth:`Drainer.submit`, the
only place the drain state changes. :meth:`Drainer.run` is the grace timer
(a task in the node's ``TaskGroup``); time comes from the injected clock.

With consensus the drain is gated by a cluster-wide semaphore
(:class:`DrainSlots`, ``drain.max_concurrent``): :meth:`Drainer.request_drain`
feeds ``Drain`` only once this node holds a slot (a queued request waits in
:meth:`Drainer.run`; ``wait=False`` tries once and refuses), the slot is
given back when the drain completes (DRAINED) or is undone (Undrain), and
:meth:`Drainer.stop` waits for a slot at most ``slot_timeout`` s before it
feeds ``Stop`` anyway, so shutdown never hangs on etcd. The waiting happens
here, so the drain state keeps one writer.

Log events: ``node.drain`` (reason), ``node.drain_withdraw``,
``node.drained`` (timed_out), ``node.undrain``, ``drain.slot_wait``
(reason), ``drain.slot_timeout`` (waited_s).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from anycast_lb import log
from anycast_lb.clock import Clock, wait_for
from anycast_lb.drain import (
    Drain,
    DrainMachine,
    DrainState,
    Event,
    FlowsIdle,
    GraceElapsed,
    Outcome,
    Phase,
    Stop,
    TimedOut,
    Undrain,
)
from anycast_lb.errors import ConsensusError


class DrainSlots(Protocol):
    """The cluster-wide drain semaphore, as the drainer sees it."""

    async def acquire(self) -> None:
        """Return once this node holds a slot; wait (riding out etcd
        trouble) as long as it takes otherwise."""
        ...

    async def try_acquire(self) -> bool:
        """One attempt: True when this node holds a slot now. Raises
        ConsensusError when etcd cannot say."""
        ...

    async def release(self) -> None:
        """Give the slot back; never raises (a slot left behind goes with
        the node's lease)."""
        ...


class Drainer:
    """Drive ``machine`` on ``clock``; ``on_change`` is called (synchronously)
    after every event that changed the state, with its outcome."""

    def __init__(self, machine: DrainMachine, clock: Clock,
                 on_change: Callable[[Outcome], None] | None = None,
                 slots: DrainSlots | None = None,
                 wait_idle: Callable[[float], Awaitable[bool]] | None = None,
                 drain_timeout: float = 0.0) -> None:
        self._machine = machine
        self._clock = clock
        self._on_change = on_change
        self._rearm = asyncio.Event()
        self._moved = asyncio.Event()
        self._slots = slots
        self._wait_idle = wait_idle
        self._drain_timeout = drain_timeout
        self._pending: str | None = None
        self._holding = False
        self._slot_wake = asyncio.Event()
        self._slot_lock = asyncio.Lock()

    @property
    def waiting_for_slot(self) -> bool:
        """A drain was requested and waits for a drain slot."""
        return self._pending is not None

    @property
    def holds_slot(self) -> bool:
        return self._holding

    async def request_drain(self, reason: str, *, wait: bool = True) -> bool:
        """Drain once this node may: True if it drains now. Without slots
        (standalone) or already draining, at once. ``wait`` True queues the
        request (False returned, the drain starts when a slot frees);
        ``wait`` False tries once and returns False if every slot is held.
        Either way one attempt is made at once, so a free slot drains now.
        Raises ConsensusError (``wait`` False) when etcd cannot say."""
        if self._slots is None or self.state.draining or self._holding:
            self.submit(Drain(reason))
            return True
        if self._pending is None and not self._slot_lock.locked():
            async with self._slot_lock:
                try:
                    self._holding = self._holding or await self._slots.try_acquire()
                except ConsensusError:
                    if not wait:
                        raise
            if self._holding:
                self.submit(Drain(reason))
                return True
        if not wait:
            return False
        if self._pending is None:
            log.event("drain.slot_wait", reason=reason)
        self._pending = reason
        self._slot_wake.set()
        return False

    async def stop(self, slot_timeout: float) -> Outcome:
        """Feed ``Stop`` (SIGTERM): with slots, after taking one or after
        ``slot_timeout`` s, whichever comes first."""
        if self._slots is not None and not self.state.draining and not self._holding:
            started = self._clock.monotonic()
            try:
                await wait_for(self._clock, self._take_slot(), slot_timeout)
            except TimeoutError:
                log.warning("drain.slot_timeout",
                            waited_s=round(self._clock.monotonic() - started, 3))
        self._pending = None
        return self.submit(Stop())

    async def _take_slot(self) -> None:
        assert self._slots is not None
        async with self._slot_lock:
            if not self._holding:
                await self._slots.acquire()
                self._holding = True

    @property
    def state(self) -> DrainState:
        return self._machine.state

    def submit(self, event: Event) -> Outcome:
        """Apply ``event`` now; the outcome (``accepted`` False: refused)."""
        outcome = self._machine.handle(event, self._clock.monotonic())
        if isinstance(event, Undrain) and outcome.accepted:
            self._pending = None
            self._slot_wake.set()
        if outcome.changed:
            _log(outcome)
            self._rearm.set()
            moved, self._moved = self._moved, asyncio.Event()
            moved.set()
            if self._holding and outcome.after.phase in (Phase.SERVING, Phase.DRAINED):
                self._slot_wake.set()
            if self._on_change is not None:
                self._on_change(outcome)
        return outcome

    async def wait_past(self, phase: Phase) -> DrainState:
        """Wait until the phase is past ``phase`` in the drain order (or the
        node serves again); the state then."""
        order = list(Phase)
        while True:
            state = self.state
            if state.phase is Phase.SERVING and phase is not Phase.SERVING:
                return state
            if order.index(state.phase) > order.index(phase):
                return state
            await self._moved.wait()

    async def run(self) -> None:
        """The grace timer and (with slots) the slot waiter. Runs until cancelled."""
        if self._slots is None:
            await self._grace_timer()
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._grace_timer())
            tg.create_task(self._slot_loop())
            if self._wait_idle is not None:
                tg.create_task(self._complete_loop())

    async def _complete_loop(self) -> None:
        """With slots, a drain ends (DRAINED) once the data path is idle or
        ``drain_timeout`` s passed, so its slot frees for the next node.
        A stop is completed by the node itself."""
        assert self._wait_idle is not None
        while True:
            state = await self.wait_past(Phase.GRACEFUL)
            if state.phase is not Phase.WITHDRAWN or state.stopping:
                await self._moved.wait()
                continue
            idle = await self._wait_idle(self._drain_timeout)
            now = self.state
            if now.phase is Phase.WITHDRAWN and now.since == state.since and not now.stopping:
                self.submit(FlowsIdle() if idle else TimedOut())

    async def _slot_loop(self) -> None:
        """Take a slot for a queued drain, then drain; give the slot back
        once the drain completed or was undone."""
        assert self._slots is not None
        while True:
            await self._slot_wake.wait()
            self._slot_wake.clear()
            if self._pending is not None and not self.state.draining:
                await self._take_slot()
                reason, self._pending = self._pending, None
                if reason is not None:
                    self.submit(Drain(reason))
            if (self._holding and self._pending is None
                    and self.state.phase in (Phase.SERVING, Phase.DRAINED)):
                async with self._slot_lock:
                    self._holding = False
                    await self._slots.release()

    async def _grace_timer(self) -> None:
        while True:
            self._rearm.clear()
            until = self.state.grace_until
            if until is None:
                await self._rearm.wait()
                continue
            await self._clock.sleep(max(until - self._clock.monotonic(), 0.0))
            self.submit(GraceElapsed())


class HandOverFirst:
    """``slots`` (:class:`DrainSlots`) with ``hand_over`` awaited once a slot
    is taken and before the drainer feeds ``Drain``: a drain queued for a
    slot keeps the node's elected VIPs while it waits (make before break)."""

    def __init__(self, slots: DrainSlots, hand_over: Callable[[], Awaitable[None]]) -> None:
        self._slots, self._hand_over = slots, hand_over

    async def acquire(self) -> None:
        await self._slots.acquire()
        await self._hand_over()

    async def try_acquire(self) -> bool:
        held = await self._slots.try_acquire()
        if held:
            await self._hand_over()
        return held

    async def release(self) -> None:
        await self._slots.release()


def _log(outcome: Outcome) -> None:
    before, after = outcome.before, outcome.after
    if not outcome.phase_changed:
        return
    if before.phase is Phase.SERVING:
        log.event("node.drain", reason=after.reason or "", phase=after.phase.value)
    elif after.phase is Phase.SERVING:
        log.event("node.undrain")
    elif after.phase is Phase.WITHDRAWN:
        log.warning("node.drain_withdraw")
    elif after.phase is Phase.DRAINED:
        log.event("node.drained", timed_out=after.timed_out)
