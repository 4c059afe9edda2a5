"""The drain machine (pure) and its one writer, the Drainer, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from anycast_lb.bgp.policy import DrainPhase
from anycast_lb.clock import FakeClock
from anycast_lb.drain import (
    Drain,
    DrainMachine,
    DrainState,
    Event,
    FlowsIdle,
    GraceElapsed,
    Phase,
    Stop,
    TimedOut,
    Undrain,
)
from anycast_lb.drainer import Drainer
from tests.waiting import wait_until

GRACE = 2.0
T0 = 100.0

S, G, W, D = Phase.SERVING, Phase.GRACEFUL, Phase.WITHDRAWN, Phase.DRAINED


def machine_in(phase: Phase, *, stopping: bool = False, announces: bool = True) -> DrainMachine:
    """A machine brought to ``phase`` at T0 through its own events."""
    m = DrainMachine(GRACE, announces=announces)
    if phase is not S:
        m.handle(Drain("test"), T0)
    if phase in (W, D):
        m.handle(GraceElapsed(), T0 + GRACE)
    if phase is D:
        m.handle(FlowsIdle(), T0 + GRACE)
    if stopping:
        m.handle(Stop(), T0 + GRACE)
    assert m.state.phase is phase and m.state.stopping is stopping
    return m


NOW = T0 + GRACE + 1.0  # past the grace deadline

# (phase, stopping, event, phase after, stopping after, accepted)
TABLE: list[tuple[Phase, bool, Event, Phase, bool, bool]] = [
    (S, False, Drain("api"), G, False, True),
    (S, False, Undrain(), S, False, True),
    (S, False, GraceElapsed(), S, False, True),
    (S, False, FlowsIdle(), S, False, True),
    (S, False, TimedOut(), S, False, True),
    (S, False, Stop(), G, True, True),
    (G, False, Drain("again"), G, False, True),
    (G, False, Undrain(), S, False, True),
    (G, False, GraceElapsed(), W, False, True),
    (G, False, FlowsIdle(), G, False, True),
    (G, False, TimedOut(), G, False, True),
    (G, False, Stop(), G, True, True),
    (W, False, Drain("again"), W, False, True),
    (W, False, Undrain(), S, False, True),
    (W, False, GraceElapsed(), W, False, True),
    (W, False, FlowsIdle(), D, False, True),
    (W, False, TimedOut(), D, False, True),
    (W, False, Stop(), W, True, True),
    (D, False, Drain("again"), D, False, True),
    (D, False, Undrain(), S, False, True),
    (D, False, FlowsIdle(), D, False, True),
    (D, False, Stop(), D, True, True),
    (G, True, Undrain(), G, True, False),
    (G, True, GraceElapsed(), W, True, True),
    (W, True, Undrain(), W, True, False),
    (W, True, FlowsIdle(), D, True, True),
    (W, True, TimedOut(), D, True, True),
    (W, True, Drain("again"), W, True, True),
    (D, True, Undrain(), D, True, False),
    (D, True, Stop(), D, True, True),
]


@pytest.mark.parametrize(("phase", "stopping", "event", "after", "stopping_after", "accepted"),
                         TABLE)
def test_transition_table(phase: Phase, stopping: bool, event: Event, after: Phase,
                          stopping_after: bool, accepted: bool) -> None:
    m = machine_in(phase, stopping=stopping)
    outcome = m.handle(event, NOW)
    assert (m.state.phase, m.state.stopping, outcome.accepted) == (after, stopping_after, accepted)
    assert outcome.after == m.state
    assert outcome.phase_changed == (phase is not after)
    if phase is not after:
        assert m.state.since == NOW


def test_every_phase_and_event_is_in_the_table() -> None:
    kinds = {type(e) for _, _, e, *_ in TABLE}
    assert kinds == {Drain, Undrain, GraceElapsed, FlowsIdle, TimedOut, Stop}
    assert {p for p, *_ in TABLE} == set(Phase)


def test_grace_elapsed_before_its_deadline_is_ignored() -> None:
    m = machine_in(G)
    assert m.state.grace_until == T0 + GRACE
    m.handle(GraceElapsed(), T0 + GRACE - 0.001)
    assert m.state.phase is G
    m.handle(GraceElapsed(), T0 + GRACE)
    assert m.state.phase is W and m.state.grace_until is None


def test_a_stale_grace_timer_cannot_cut_a_later_drain_short() -> None:
    m = machine_in(G)
    m.handle(Undrain(), T0 + 1.0)
    m.handle(Drain("again"), T0 + 1.5)
    m.handle(GraceElapsed(), T0 + GRACE)  # the first drain's timer
    assert m.state.phase is G and m.state.grace_until == T0 + 1.5 + GRACE


def test_a_node_that_announces_nothing_skips_graceful() -> None:
    m = DrainMachine(GRACE, announces=False)
    assert m.handle(Drain("api"), T0).after.phase is W
    m2 = DrainMachine(GRACE, announces=False)
    assert m2.handle(Stop(), T0).after == DrainState(
        phase=W, stopping=True, reason="shutdown", since=T0, grace_until=None)


def test_route_phase_and_routes_changed() -> None:
    assert [p.route_phase for p in Phase] == [
        DrainPhase.NONE, DrainPhase.GRACEFUL, DrainPhase.WITHDRAWN, DrainPhase.WITHDRAWN]
    m = machine_in(W)
    outcome = m.handle(FlowsIdle(), NOW)
    assert outcome.phase_changed and not outcome.routes_changed  # still withdrawn
    assert m.handle(Undrain(), NOW).routes_changed


def test_timed_out_is_recorded_and_cleared_by_undrain() -> None:
    m = machine_in(W)
    assert m.handle(TimedOut(), NOW).after.timed_out
    assert not m.handle(Undrain(), NOW).after.timed_out


async def armed(clock: FakeClock) -> None:
    """Let the timer task run (the clock stays put) until it sleeps."""
    await wait_until(lambda: clock.sleepers > 0, interval=0, what="the grace timer armed")


async def test_drainer_withdraws_after_the_grace_on_the_injected_clock() -> None:
    clock = FakeClock(T0)
    outcomes = []
    drainer = Drainer(DrainMachine(GRACE, announces=True), clock, on_change=outcomes.append)
    task = asyncio.create_task(drainer.run())
    try:
        drainer.submit(Drain("api"))
        await armed(clock)
        await clock.advance(GRACE - 0.5)
        assert drainer.state.phase is G
        waiter = asyncio.create_task(drainer.wait_past(G))
        await clock.advance(0.5)
        assert (await asyncio.wait_for(waiter, 1)).phase is W
        assert [o.after.phase for o in outcomes] == [G, W]
        assert outcomes[1].routes_changed
        # Undrain, drain again: the grace starts over.
        drainer.submit(Undrain())
        drainer.submit(Drain("again"))
        await armed(clock)
        await clock.advance(GRACE - 0.1)
        assert drainer.state.phase is G
        await clock.advance(0.1)
        assert drainer.state.phase is W
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
