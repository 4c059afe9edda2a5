"""The one writer of a node's drain state: feeds the pure
:class:`~anycast_lb.drain.DrainMachine` and acts on its outcomes.

Every drain event (``POST /drain``, ``POST /undrain``, SIGTERM, the grace
timer, the data path going idle) goes through :meth:`Drainer.submit`, the
only place the drain state changes. :meth:`Drainer.run` is the grace timer
(a task in the node's ``TaskGroup``); time comes from the injected clock.

Log events: ``node.drain`` (reason), ``node.drain_withdraw``,
``node.drained`` (timed_out), ``node.undrain``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from anycast_lb import log
from anycast_lb.clock import Clock
from anycast_lb.drain import DrainMachine, DrainState, Event, GraceElapsed, Outcome, Phase


class Drainer:
    """Drive ``machine`` on ``clock``; ``on_change`` is called (synchronously)
    after every event that changed the state, with its outcome."""

    def __init__(self, machine: DrainMachine, clock: Clock,
                 on_change: Callable[[Outcome], None] | None = None) -> None:
        self._machine = machine
        self._clock = clock
        self._on_change = on_change
        self._rearm = asyncio.Event()
        self._moved = asyncio.Event()

    @property
    def state(self) -> DrainState:
        return self._machine.state

    def submit(self, event: Event) -> Outcome:
        """Apply ``event`` now; the outcome (``accepted`` False: refused)."""
        outcome = self._machine.handle(event, self._clock.monotonic())
        if outcome.changed:
            _log(outcome)
            self._rearm.set()
            moved, self._moved = self._moved, asyncio.Event()
            moved.set()
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
        """The grace timer: feed GraceElapsed at ``grace_until``. Runs until cancelled."""
        while True:
            self._rearm.clear()
            until = self.state.grace_until
            if until is None:
                await self._rearm.wait()
                continue
            await self._clock.sleep(max(until - self._clock.monotonic(), 0.0))
            self.submit(GraceElapsed())


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
