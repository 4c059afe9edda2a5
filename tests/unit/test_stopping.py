"""The graceful stop sequence on a fake clock, over small complete parts."""

from __future__ import annotations

import asyncio

import pytest

from anycast_lb.clock import FakeClock
from anycast_lb.config import DrainConfig
from anycast_lb.drain import DrainMachine, Phase
from anycast_lb.drainer import Drainer
from anycast_lb.stopping import WITHDRAW_SETTLE, GracefulStop
from tests.waiting import wait_until

GRACE, TIMEOUT = 2.0, 5.0


class Speaker:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def begin_stop(self) -> None:
        self.calls.append("begin_stop")

    async def wait_synced(self) -> None:
        self.calls.append("wait_synced")

    async def stop_exabgp(self) -> None:
        self.calls.append("stop_exabgp")


class Data:
    def __init__(self, calls: list[str], drainer: Drainer, idle: bool) -> None:
        self.calls, self.drainer, self.idle = calls, drainer, idle
        self.active = 0 if idle else 3

    def stop_accepting(self) -> None:
        # Listeners close only once the routes are withdrawn.
        assert self.drainer.state.phase is Phase.WITHDRAWN
        self.calls.append("stop_accepting")

    async def wait_idle(self, timeout: float) -> bool:
        assert timeout == TIMEOUT
        self.calls.append("wait_idle")
        return self.idle


class Flows:
    def __init__(self, calls: list[str]) -> None:
        self.calls, self.local = calls, {("a",)}

    async def wait_owned_zero(self, timeout: float) -> bool:
        self.calls.append(f"wait_owned_zero {timeout:g}")
        return True


@pytest.mark.parametrize("idle", [True, False])
async def test_the_stop_runs_in_order_and_ends_drained(idle: bool) -> None:
    clock = FakeClock()
    calls: list[str] = []
    drainer = Drainer(DrainMachine(GRACE, announces=True), clock)

    async def hand_over() -> None:
        calls.append("hand_over")

    stop = GracefulStop(DrainConfig(timeout=TIMEOUT, announce_grace=GRACE), drainer,
                        Data(calls, drainer, idle), clock, speaker=Speaker(calls),
                        cluster=Flows(calls), hand_over=hand_over,
                        routes_changed=lambda: calls.append("routes_changed"))
    timer = asyncio.create_task(drainer.run())
    stopping = asyncio.create_task(stop.run())
    await wait_until(lambda: drainer.state.phase is Phase.GRACEFUL and clock.sleepers == 1,
                     interval=0, what="the grace timer armed")
    assert calls == ["begin_stop", "hand_over"] and drainer.state.stopping
    await clock.advance(GRACE)  # the grace ends: withdraw
    await wait_until(lambda: clock.sleepers == 1 and "wait_synced" in calls, interval=0,
                     what="settling")
    assert "stop_accepting" not in calls
    await clock.advance(WITHDRAW_SETTLE)
    await asyncio.wait_for(stopping, 5)
    timer.cancel()
    assert calls[2:] == ["wait_synced", "stop_accepting", "routes_changed", "wait_idle",
                         f"wait_owned_zero {TIMEOUT:g}", "stop_exabgp"]
    assert drainer.state.phase is Phase.DRAINED and drainer.state.timed_out is not idle
