"""Small parts the node wires: the drain slots that hand the elected VIPs
over first, the first error of a task group, the chain of metric families."""

from __future__ import annotations

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric

from anycast_lb.drainer import HandOverFirst
from anycast_lb.errors import AnycastLBError, BindError, ConfigError, first_leaf
from anycast_lb.metrics import chain_families


class Slots:
    """A complete DrainSlots that records its calls into ``calls``."""

    def __init__(self, calls: list[str], free: bool) -> None:
        self.calls, self.free = calls, free

    async def acquire(self) -> None:
        self.calls.append("acquire")

    async def try_acquire(self) -> bool:
        self.calls.append("try_acquire")
        return self.free

    async def release(self) -> None:
        self.calls.append("release")


@pytest.mark.parametrize(("free", "expected"), [
    (True, ["try_acquire", "hand_over"]),
    (False, ["try_acquire"]),  # no slot: the VIPs stay
])
async def test_hand_over_follows_a_taken_slot_only(free: bool, expected: list[str]) -> None:
    calls: list[str] = []

    async def hand_over() -> None:
        calls.append("hand_over")

    slots = HandOverFirst(Slots(calls, free), hand_over)
    assert await slots.try_acquire() is free
    assert calls == expected


async def test_hand_over_after_acquire_and_never_on_release() -> None:
    calls: list[str] = []

    async def hand_over() -> None:
        calls.append("hand_over")

    slots = HandOverFirst(Slots(calls, True), hand_over)
    await slots.acquire()
    await slots.release()
    assert calls == ["acquire", "hand_over", "release"]


def test_first_leaf_is_the_first_error_depth_first() -> None:
    bind = BindError("web: address in use")
    inner = BaseExceptionGroup("inner", [bind, ConfigError("x", ["a: b"])])
    group: BaseExceptionGroup[AnycastLBError] = BaseExceptionGroup(
        "outer", [inner, AnycastLBError("later")])
    assert first_leaf(group) is bind


def test_chain_families_reads_each_present_source_in_order_at_each_scrape() -> None:
    scrapes = {"a": 0}

    def a() -> list[Metric]:
        scrapes["a"] += 1
        return [GaugeMetricFamily("a", "a")]

    def b() -> list[Metric]:
        return [GaugeMetricFamily("b1", "b"), GaugeMetricFamily("b2", "b")]

    families = chain_families(None, a, None, b)
    assert scrapes["a"] == 0  # nothing is read before a scrape
    assert [m.name for m in families()] == ["a", "b1", "b2"]
    assert [m.name for m in families()] == ["a", "b1", "b2"] and scrapes["a"] == 2
