"""The drain sequence (pure): events in, the node's drain state out.

No I/O, no clock, no logging: every event comes with ``now`` (monotonic
seconds) and :meth:`DrainMachine.handle` returns an :class:`Outcome`. The
node has one writer of the drain state (:class:`anycast_lb.drainer.Drainer`)
that feeds this machine and acts on what it says.

Phases::

    SERVING --Drain--> GRACEFUL --GraceElapsed--> WITHDRAWN --FlowsIdle/TimedOut--> DRAINED
       ^                  |                           |                               |
       +------Undrain-----+-----------Undrain---------+-----------Undrain-------------+
                          (refused once Stop was received)

- ``GRACEFUL``: every route still announced, tagged with the well-known
  community GRACEFUL_SHUTDOWN 65535:0 (RFC 8326 section 3), for
  ``announce_grace`` s, so routers move traffic to other nodes before the
  withdraw. A node that announces nothing (no ``bgp`` section) skips it.
- ``WITHDRAWN``: every route withdrawn; established connections finish.
- ``DRAINED``: withdrawn, and the data path went idle (``FlowsIdle``) or
  ``drain.timeout`` passed (``TimedOut``).

``Stop`` (SIGTERM) drains if the node serves and marks the state
``stopping``: from then on ``Undrain`` is refused and the phases only move
forward. ``GraceElapsed`` is ignored unless its deadline (``grace_until``)
has passed, so a timer armed for an earlier drain cannot cut a later one
short.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from anycast_lb.bgp.policy import DrainPhase


class Phase(str, Enum):
    """Where the node is in its drain sequence (module docstring)."""

    SERVING = "serving"
    GRACEFUL = "graceful"
    WITHDRAWN = "withdrawn"
    DRAINED = "drained"

    @property
    def route_phase(self) -> DrainPhase:
        """What the route policy sees (:class:`~anycast_lb.bgp.policy.DrainPhase`)."""
        return _ROUTE_PHASE[self]


_ROUTE_PHASE = {
    Phase.SERVING: DrainPhase.NONE,
    Phase.GRACEFUL: DrainPhase.GRACEFUL,
    Phase.WITHDRAWN: DrainPhase.WITHDRAWN,
    Phase.DRAINED: DrainPhase.WITHDRAWN,
}


@dataclass(frozen=True, slots=True)
class Drain:
    """Start a drain (``POST /drain``, ``anycast-lb drain``)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Undrain:
    """End a drain and serve again."""


@dataclass(frozen=True, slots=True)
class GraceElapsed:
    """The GRACEFUL_SHUTDOWN announcement has been up for ``announce_grace`` s."""


@dataclass(frozen=True, slots=True)
class FlowsIdle:
    """Every connection and flow of the data path ended."""


@dataclass(frozen=True, slots=True)
class TimedOut:
    """``drain.timeout`` passed with connections or flows still open."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Graceful stop (SIGTERM): drain, and never undrain again."""

    reason: str = "shutdown"


Event = Drain | Undrain | GraceElapsed | FlowsIdle | TimedOut | Stop


@dataclass(frozen=True, slots=True)
class DrainState:
    phase: Phase = Phase.SERVING
    stopping: bool = False
    """A Stop was received: Undrain is refused."""
    reason: str | None = None
    """Why the current drain started (None while serving)."""
    since: float | None = None
    """Monotonic s the current phase began (None before the first event)."""
    grace_until: float | None = None
    """Monotonic s the GRACEFUL phase ends (None outside it)."""
    timed_out: bool = False
    """DRAINED because ``drain.timeout`` passed, not because the data path went idle."""

    @property
    def draining(self) -> bool:
        return self.phase is not Phase.SERVING


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one event did. ``accepted`` is False only for an Undrain refused
    while stopping; ``before`` and ``after`` are the states around it."""

    accepted: bool
    before: DrainState
    after: DrainState

    @property
    def changed(self) -> bool:
        return self.before != self.after

    @property
    def phase_changed(self) -> bool:
        return self.before.phase is not self.after.phase

    @property
    def routes_changed(self) -> bool:
        """The route policy's input moved: routes must be recomputed."""
        return self.before.phase.route_phase is not self.after.phase.route_phase


class DrainMachine:
    """The drain state of one node and its transition rule.

    ``announce_grace`` is in s (``drain.announce_grace``); ``announces`` is
    False for a node without a ``bgp`` section, whose drains skip GRACEFUL.
    """

    def __init__(self, announce_grace: float, announces: bool) -> None:
        self.announce_grace = announce_grace
        self.announces = announces
        self.state = DrainState()

    def handle(self, event: Event, now: float) -> Outcome:
        """Apply ``event`` at ``now`` (monotonic s); the outcome (module docstring)."""
        before = self.state
        after, accepted = self._next(before, event, now)
        self.state = after
        return Outcome(accepted=accepted, before=before, after=after)

    def _enter(self, state: DrainState, phase: Phase, now: float, *, reason: str | None,
               timed_out: bool = False) -> DrainState:
        grace_until = now + self.announce_grace if phase is Phase.GRACEFUL else None
        return DrainState(phase=phase, stopping=state.stopping, reason=reason, since=now,
                          grace_until=grace_until, timed_out=timed_out)

    def _start(self, state: DrainState, reason: str, now: float) -> DrainState:
        phase = Phase.GRACEFUL if self.announces else Phase.WITHDRAWN
        return self._enter(state, phase, now, reason=reason)

    def _next(self, state: DrainState, event: Event, now: float) -> tuple[DrainState, bool]:
        phase = state.phase
        if isinstance(event, Drain):
            if phase is Phase.SERVING:
                return self._start(state, event.reason, now), True
            return state, True
        if isinstance(event, Stop):
            if phase is Phase.SERVING:
                return replace(self._start(state, event.reason, now), stopping=True), True
            return replace(state, stopping=True), True
        if isinstance(event, Undrain):
            if state.stopping:
                return state, False
            if phase is Phase.SERVING:
                return state, True
            return self._enter(state, Phase.SERVING, now, reason=None), True
        if isinstance(event, GraceElapsed):
            due = state.grace_until is not None and now >= state.grace_until
            if phase is Phase.GRACEFUL and due:
                return self._enter(state, Phase.WITHDRAWN, now, reason=state.reason), True
            return state, True
        if isinstance(event, FlowsIdle | TimedOut):
            if phase is Phase.WITHDRAWN:
                return self._enter(state, Phase.DRAINED, now, reason=state.reason,
                                   timed_out=isinstance(event, TimedOut)), True
            return state, True
        raise AssertionError(f"unknown drain event {event!r}")  # pragma: no cover
