"""A relay worker's counter reports run on its injected clock: the test
advances a FakeClock instead of waiting through real seconds. The worker's
relay loop is real (an epoll descriptor); no socket is bound."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from anycast_lb.clock import FakeClock
from anycast_lb.config import ForwardingConfig
from anycast_lb.forward.workers import COUNTERS_INTERVAL_S, WorkerSpec, _Worker
from tests.waiting import wait_until


def _worker(clock: FakeClock, send: Any) -> _Worker:
    spec = WorkerSpec(index=1, forwarding=ForwardingConfig(), services=[], binds={})
    return _Worker(spec, asyncio.StreamReader(), clock=clock, send=send)


async def test_counters_are_reported_every_interval_of_the_clock() -> None:
    clock = FakeClock()
    sent: list[Mapping[str, Any]] = []
    worker = _worker(clock, sent.append)
    task = asyncio.create_task(worker._report())
    try:
        await wait_until(lambda: clock.sleepers == 1, interval=0, what="the report timer")
        await clock.advance(COUNTERS_INTERVAL_S * 0.99)
        assert sent == []
        await clock.advance(COUNTERS_INTERVAL_S * 0.01)
        await wait_until(lambda: len(sent) == 1, interval=0, what="the first report")
        assert sent[0] == {"op": "counters", "services": {}}
        await clock.advance(COUNTERS_INTERVAL_S * 2)
        await wait_until(lambda: len(sent) == 3, interval=0, what="two more reports")
        assert not worker.done.done()
    finally:
        task.cancel()
        worker.relay.stop()


async def test_a_gone_node_ends_the_worker() -> None:
    clock = FakeClock()

    def broken(message: Mapping[str, Any]) -> None:
        raise BrokenPipeError

    worker = _worker(clock, broken)
    task = asyncio.create_task(worker._report())
    try:
        await wait_until(lambda: clock.sleepers == 1, interval=0, what="the report timer")
        await clock.advance(COUNTERS_INTERVAL_S)
        assert await asyncio.wait_for(worker.done, 5) is False
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        worker.relay.stop()
