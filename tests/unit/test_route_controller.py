"""The route controller: the only writer of routes, on a fake clock."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping

from anycast_lb.bgp.controller import RouteController
from anycast_lb.bgp.policy import GRACEFUL_SHUTDOWN, DrainPhase, NodeView, Prefix, Route, ServiceView
from anycast_lb.clock import FakeClock
from anycast_lb.config import BgpConfig
from tests.waiting import wait_until

VIP = ipaddress.ip_network("198.51.100.10/32")
HALF_LIFE = 10.0


def bgp() -> BgpConfig:
    return BgpConfig.model_validate({
        "local_as": 65100, "router_id": "203.0.113.10", "local_address": "203.0.113.10",
        "peers": [{"address": "203.0.113.1", "peer_as": 65000}],
        "announce": {"med": 100, "down_med": 1000, "withdraw_on_down": True},
        # Two flaps suppress; reuse after the penalty halves below 750.
        "damping": {"penalty": 1000.0, "suppress": 1500.0, "reuse": 750.0,
                    "half_life": HALF_LIFE, "max_suppress": 60.0},
    })


class Sink:
    def __init__(self) -> None:
        self.sets: list[dict[Prefix, Route]] = []

    def set_routes(self, routes: Mapping[Prefix, Route]) -> None:
        self.sets.append(dict(routes))


class World:
    def __init__(self) -> None:
        self.healthy = True
        self.drain = DrainPhase.NONE

    def view(self) -> NodeView:
        return NodeView(self.drain, (ServiceView("web", VIP, self.healthy, True),))


def test_decision_is_published_and_sent() -> None:
    clock, sink, world = FakeClock(), Sink(), World()
    rc = RouteController(bgp(), world.view, sink, clock)
    d = rc.evaluate()
    assert rc.decision is d and d.intent == {VIP: "announced"} and set(d.routes) == {VIP}
    assert sink.sets == [dict(d.routes)]
    world.drain = DrainPhase.GRACEFUL
    d = rc.evaluate()
    assert d.intent == {VIP: "draining"} and GRACEFUL_SHUTDOWN in d.routes[VIP].communities
    world.drain = DrainPhase.WITHDRAWN
    assert rc.evaluate().routes == {} and rc.decision is not None
    assert rc.decision.intent == {VIP: "withdrawn"}


async def caught_up(rc: RouteController, world: World) -> None:
    """Let the loop run (no clock moves) until its decision saw ``world``."""
    await wait_until(lambda: rc.decision is not None and rc.decision.view == world.view(),
                     interval=0, what="the route loop to evaluate the change")


async def test_damped_prefix_comes_back_when_the_damper_releases_it() -> None:
    clock, sink, world = FakeClock(), Sink(), World()
    rc = RouteController(bgp(), world.view, sink, clock)
    task = asyncio.create_task(rc.run())
    try:
        await caught_up(rc, world)
        for _ in range(2):  # two flaps: penalty 2000 >= suppress 1500
            for healthy in (False, True):
                world.healthy = healthy
                rc.poke()
                await caught_up(rc, world)
        assert rc.decision is not None and rc.decision.intent == {VIP: "damped"}
        assert rc.decision.suppressed == frozenset({VIP}) and sink.sets[-1] == {}
        status = rc.damping_status(VIP)
        assert status["suppressed"] is True
        reuse_in = status["reuse_in_s"]
        assert isinstance(reuse_in, float) and 0 < reuse_in <= 60.0
        # Nothing else changes: the loop wakes by itself at the reuse time,
        # on the fake clock (no real waiting), once it armed that timer.
        await wait_until(lambda: clock.sleepers > 0, interval=0, what="the reuse timer armed")
        assert clock.sleepers == 1
        await clock.advance(reuse_in - 0.5)
        assert rc.decision.intent == {VIP: "damped"}
        await clock.advance(1.0)
        # The woken loop runs; the clock stays put.
        await wait_until(lambda: rc.decision is not None and rc.decision.intent != {VIP: "damped"},
                         interval=0, what="the released prefix")
        assert rc.decision.intent == {VIP: "announced"} and set(sink.sets[-1]) == {VIP}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
