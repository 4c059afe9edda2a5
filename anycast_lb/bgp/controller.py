"""The route controller: the only writer of the node's routes.

It owns the route loop: on every change of the node (health, listeners,
drain phase) and whenever flap damping releases a prefix, it takes a
snapshot (:class:`~anycast_lb.bgp.policy.NodeView`), lets the flap damper
(:mod:`anycast_lb.bgp.damping`) observe it, asks the pure policy
(:mod:`anycast_lb.bgp.policy`) for the routes, hands them to the speaker
(:class:`RouteSink`) and publishes the whole :class:`RouteDecision`, which
``/status`` reads as it is (it never recomputes the policy).

Log events: ``route.announce`` (info: prefix, med, communities) and
``route.withdraw`` (warning: prefix), once per change of the decision.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from anycast_lb import log
from anycast_lb.bgp.damping import FlapDamper
from anycast_lb.bgp.policy import (
    NodeView,
    Prefix,
    Route,
    announcement_state,
    desired_routes,
    prefix_up,
)
from anycast_lb.clock import Clock, wait_event
from anycast_lb.config import BgpConfig

MIN_WAKE = 0.01
"""Shortest wait (s) before a damping re-evaluation, so a reuse time in the
past never spins the loop."""


class RouteSink(Protocol):
    """Where the routes go (:class:`~anycast_lb.bgp.speaker.BgpSpeaker`)."""

    def set_routes(self, routes: Mapping[Prefix, Route]) -> None:
        """Make ``routes`` the complete set to announce (others are withdrawn)."""
        ...


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """One evaluation of the policy, as published."""

    at: float
    """Monotonic s of the evaluation."""
    view: NodeView
    routes: Mapping[Prefix, Route]
    """What this node announces; a prefix absent is withdrawn."""
    intent: Mapping[Prefix, str] = field(default_factory=dict)
    """Per prefix: ``announced``, ``draining``, ``damped`` or ``withdrawn``
    (:func:`~anycast_lb.bgp.policy.announcement_state`)."""
    suppressed: frozenset[Prefix] = frozenset()
    """Prefixes flap damping holds down."""


class RouteController:
    """Evaluate ``view()`` against ``bgp`` on every :meth:`poke` and damping
    wake-up; send the routes to ``sink``; publish :attr:`decision`."""

    def __init__(self, bgp: BgpConfig, view: Callable[[], NodeView], sink: RouteSink,
                 clock: Clock) -> None:
        self._bgp = bgp
        self._view = view
        self._sink = sink
        self._clock = clock
        self.damper = FlapDamper(bgp.damping)
        self._changed = asyncio.Event()
        self.decision: RouteDecision | None = None
        """The last decision (None before the first)."""
        self.changed_at: dict[Prefix, float] = {}
        """Wall-clock s (epoch) each prefix's intent (``RouteDecision.intent``)
        last changed; set by the first decision too."""

    def poke(self) -> None:
        """Something the policy reads changed: evaluate again soon."""
        self._changed.set()

    def set_bgp(self, bgp: BgpConfig) -> None:
        """Take new announce attributes (live apply): the routes are rendered
        again at the next evaluation, which this schedules. The session
        settings of ``bgp`` are the speaker's and are not read here."""
        self._bgp = bgp
        self.poke()

    def evaluate(self) -> RouteDecision:
        """Evaluate now, send the routes to the sink and publish the decision."""
        now = self._clock.monotonic()
        view = self._view()
        for prefix, up in prefix_up(view).items():
            self.damper.observe(prefix, up, now)
        suppressed = self.damper.suppressed(now)
        routes = desired_routes(view, self._bgp, suppressed)
        before = self.decision.routes if self.decision is not None else {}
        if routes != before:
            for prefix in before.keys() - routes.keys():
                log.warning("route.withdraw", prefix=str(prefix))
            for prefix, route in routes.items():
                if before.get(prefix) != route:
                    log.event("route.announce", prefix=str(prefix), med=route.med,
                              communities=",".join(route.communities))
        intent = announcement_state(view, self._bgp, suppressed)
        before_intent = self.decision.intent if self.decision is not None else {}
        for prefix, state in intent.items():
            if before_intent.get(prefix) != state:
                self.changed_at[prefix] = self._clock.wall()
        self.decision = RouteDecision(at=now, view=view, routes=routes, intent=intent,
                                      suppressed=suppressed)
        self._sink.set_routes(routes)
        return self.decision

    def damping_status(self, prefix: Prefix) -> dict[str, float | bool]:
        """The damper's state of ``prefix`` now (``FlapDamper.status``)."""
        return self.damper.status(prefix, self._clock.monotonic())

    async def run(self) -> None:
        """The route loop; runs until cancelled."""
        while True:
            self._changed.clear()
            decision = self.evaluate()
            wake = self.damper.next_change(decision.at)
            timeout = None if wake is None else max(wake - decision.at, MIN_WAKE)
            await wait_event(self._clock, self._changed, timeout)
