"""Drain requests around the VIP elections, over a real Drainer on a fake clock."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from anycast_lb.clock import FakeClock
from anycast_lb.drain import DrainMachine
from anycast_lb.drainctl import DrainControl
from anycast_lb.drainer import Drainer, HandOverFirst
from anycast_lb.election.machine import ElectionSettings
from anycast_lb.nodestate import IPAddress

VIP = ipaddress.ip_address("198.51.100.10")


class Cluster:
    """The VIP elections and the drain slots, recording into ``calls``."""

    def __init__(self, free: bool) -> None:
        self.calls: list[str] = []
        self.free = free
        self.settings = ElectionSettings(node="lb1", lease_ttl=2.0, safety_margin=0.25,
                                         handover_timeout=1.5)
        self.slot_holders = ("lb2",)

    async def hand_over(self, serving: Mapping[IPAddress, bool], timeout: float) -> bool:
        self.calls.append(f"hand_over {timeout:g}")
        return True

    def rejoin(self, serving: Mapping[IPAddress, bool]) -> None:
        self.calls.append(f"rejoin {serving[VIP]}")

    async def acquire(self) -> None:
        self.calls.append("acquire")

    async def try_acquire(self) -> bool:
        return self.free

    async def release(self) -> None:
        self.calls.append("release")


def control(cluster: Cluster | None) -> tuple[DrainControl, Drainer]:
    holder: list[DrainControl] = []
    slots = HandOverFirst(cluster, lambda: holder[0].hand_over()) if cluster else None
    drainer = Drainer(DrainMachine(1.0, announces=True), FakeClock(), slots=slots)
    drains = DrainControl(drainer, lambda: {VIP: not drainer.state.draining}, owners=cluster,
                          consensus=cluster)
    holder.append(drains)
    return drains, drainer


async def test_standalone_drain_and_undrain() -> None:
    drains, drainer = control(None)
    answer = await drains.drain("api")
    assert (answer.draining, answer.waiting, answer.holders) == (True, False, ())
    assert drainer.state.draining
    assert drains.undrain() and not drainer.state.draining


async def test_the_vips_go_once_a_slot_is_taken_and_come_back_at_undrain() -> None:
    cluster = Cluster(free=True)
    drains, _ = control(cluster)
    answer = await drains.drain("api")
    assert answer.draining and answer.holders == ()
    assert cluster.calls == ["hand_over 3.5"]  # handover_timeout + lease_ttl
    assert drains.undrain()
    assert cluster.calls[1:] == ["rejoin True"]


async def test_a_refused_drain_keeps_the_vips_and_names_the_holders() -> None:
    cluster = Cluster(free=False)
    drains, drainer = control(cluster)
    answer = await drains.drain("api", wait=False)
    assert (answer.draining, answer.waiting, answer.holders) == (False, False, ("lb2",))
    assert cluster.calls == ["rejoin True"] and not drainer.state.draining
