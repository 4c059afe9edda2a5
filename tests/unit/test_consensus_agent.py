"""Pure parts of the consensus agent and the drain-slot gate of the drainer,
on a fake clock; the table digest of a pool."""

from __future__ import annotations

import asyncio

import pytest

from anycast_lb.clock import FakeClock
from anycast_lb.config import ServiceConfig
from anycast_lb.consensus.agent import FAILED_READS, ConsensusAgent, isolated, view_changes
from anycast_lb.consensus.keys import Layout
from anycast_lb.consensus.members import ClusterView, MemberInfo
from anycast_lb.drain import DrainMachine, Phase, Undrain
from anycast_lb.drainer import Drainer
from anycast_lb.pool import Pool


@pytest.mark.parametrize(("silent", "failed", "ttl", "expected"), [
    (0.0, 0, 2.0, False),
    (1.9, 0, 2.0, False),
    (2.0, 0, 2.0, True),          # the lease may be gone: isolated
    (0.1, FAILED_READS - 1, 2.0, False),
    (0.1, FAILED_READS, 2.0, True),
    (float("inf"), 0, 2.0, True),  # never granted
])
def test_isolation_rule(silent: float, failed: int, ttl: float, expected: bool) -> None:
    assert isolated(silent, failed, ttl) is expected


def member(name: str) -> MemberInfo:
    return MemberInfo(name=name, api="127.0.0.1:1", lan="", version="0", started=0.0)


def test_view_changes_names_joins_leaves_votes_and_config() -> None:
    layout = Layout("c")
    before = ClusterView(layout, revision=5, members={"a": member("a"), "b": member("b")},
                         votes={("web", "x:1", "a"): True, ("web", "x:1", "b"): True},
                         config_revision=1)
    after = ClusterView(layout, revision=9, members={"a": member("a"), "c": member("c")},
                        votes={("web", "x:1", "a"): False, ("web", "x:1", "c"): True},
                        config_revision=2)
    assert view_changes(before, after) == {
        "joined": ["c"], "left": ["b"],
        "votes": ["web/x:1/a=down", "web/x:1/b=gone", "web/x:1/c=up"],
        "config": ["1->2"],
    }
    assert view_changes(after, after) == {}


class FakeSlots:
    """A complete in-memory DrainSlots: one slot, held by ``holder``."""

    def __init__(self) -> None:
        self.holder: str | None = None
        self.freed = asyncio.Event()
        self.released = 0

    async def acquire(self) -> None:
        while not await self.try_acquire():
            self.freed.clear()
            await self.freed.wait()

    async def try_acquire(self) -> bool:
        if self.holder in (None, "me"):
            self.holder = "me"
            return True
        return False

    async def release(self) -> None:
        self.holder = None
        self.released += 1

    def free(self) -> None:
        self.holder = None
        self.freed.set()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_queued_drain_waits_for_the_slot_and_gives_it_back_when_undone() -> None:
    clock, slots = FakeClock(), FakeSlots()
    slots.holder = "other"
    drainer = Drainer(DrainMachine(0.0, announces=False), clock, slots=slots)
    runner = asyncio.create_task(drainer.run())
    try:
        assert await drainer.request_drain("api", wait=False) is False
        assert not drainer.waiting_for_slot and not drainer.state.draining
        assert await drainer.request_drain("api") is False
        await settle()
        assert drainer.waiting_for_slot and not drainer.state.draining
        slots.free()
        await settle()
        assert drainer.state.draining and drainer.holds_slot and slots.holder == "me"
        assert drainer.submit(Undrain()).accepted
        await settle()
        assert slots.released == 1 and not drainer.holds_slot
    finally:
        runner.cancel()


async def test_a_completed_drain_frees_its_slot() -> None:
    clock, slots = FakeClock(), FakeSlots()
    idle = asyncio.Event()

    async def wait_idle(timeout: float) -> bool:
        await idle.wait()
        return True

    drainer = Drainer(DrainMachine(0.0, announces=False), clock, slots=slots,
                      wait_idle=wait_idle, drain_timeout=30.0)
    runner = asyncio.create_task(drainer.run())
    try:
        assert await drainer.request_drain("api") is True
        await settle()
        assert drainer.state.phase is Phase.WITHDRAWN and slots.holder == "me"
        idle.set()
        await settle()
        assert drainer.state.phase is Phase.DRAINED and slots.released == 1
    finally:
        runner.cancel()


async def test_stop_waits_for_a_slot_at_most_slot_timeout() -> None:
    clock, slots = FakeClock(), FakeSlots()
    slots.holder = "other"
    drainer = Drainer(DrainMachine(0.0, announces=False), clock, slots=slots)
    stop = asyncio.create_task(drainer.stop(slot_timeout=10.0))
    await settle()
    await clock.advance(9.9)
    assert not stop.done()
    await clock.advance(0.1)
    outcome = await stop
    assert outcome.after.stopping and outcome.after.draining  # drained without a slot
    assert slots.holder == "other"


async def test_stop_takes_a_free_slot_at_once() -> None:
    clock, slots = FakeClock(), FakeSlots()
    drainer = Drainer(DrainMachine(0.0, announces=False), clock, slots=slots)
    outcome = await drainer.stop(slot_timeout=10.0)
    assert outcome.after.stopping and drainer.holds_slot


def service(*ports: int) -> ServiceConfig:
    return ServiceConfig.model_validate({
        "name": "web", "vip": "127.0.0.1", "port": 80, "maglev_table_size": 251,
        "backends": [{"address": "10.0.0.1", "port": p} for p in ports]})


def test_digest_is_equal_for_equal_up_sets_whatever_the_path() -> None:
    a = Pool(service(1, 2, 3), run_build=lambda job: job())
    b = Pool(service(1, 2, 3), run_build=lambda job: job())
    a.set_up("10.0.0.1:1", True)
    a.set_up("10.0.0.1:2", True)
    a.set_up("10.0.0.1:3", True)
    a.set_up("10.0.0.1:3", False)
    changed = b.set_up_set({"10.0.0.1:1", "10.0.0.1:2"})
    assert sorted(x.key for x in changed) == ["10.0.0.1:1", "10.0.0.1:2"]
    assert b.set_up_set({"10.0.0.1:1", "10.0.0.1:2", "nope:1"}) == []
    assert a.table_digest() == b.table_digest() is not None
    assert len(a.table_digest() or "") == 12
    b.set_up_set({"10.0.0.1:1"})
    assert b.up_count == 1 and b.table_digest() != a.table_digest()


def _agent_with_pool() -> tuple[ConsensusAgent, Pool]:
    from anycast_lb.config import parse_config

    node = parse_config({
        "node": {"name": "a"},
        "consensus": {"endpoints": ["http://127.0.0.1:2379"], "cluster": "c"},
        "services": [{"name": "web", "vip": "127.0.0.10", "port": 80, "min_healthy": 1,
                      "backends": [{"address": "10.0.0.1", "port": 80},
                                   {"address": "10.0.0.2", "port": 80}]}]})
    pool = Pool(node.services[0], run_build=lambda job: job())
    assert node.consensus is not None
    agent = ConsensusAgent(node.consensus, node, running=lambda: node,
                           pools=lambda: {"web": pool}, on_pool_change=lambda *_: None,
                           clock=FakeClock())
    return agent, pool


@pytest.mark.parametrize(("agreed", "local", "announce"), [
    ({"10.0.0.1:80", "10.0.0.2:80"}, {"10.0.0.1:80": True, "10.0.0.2:80": True}, True),
    # one backend out of reach here: the agreed set keeps it, the node serves on the other
    ({"10.0.0.1:80", "10.0.0.2:80"}, {"10.0.0.1:80": False, "10.0.0.2:80": True}, True),
    # none in reach here: the node could serve no flow, it withdraws alone
    ({"10.0.0.1:80", "10.0.0.2:80"}, {"10.0.0.1:80": False, "10.0.0.2:80": False}, False),
    # up here but agreed down: not in the table, not a reason to announce
    ({"10.0.0.2:80"}, {"10.0.0.1:80": True, "10.0.0.2:80": False}, False),
])
@pytest.mark.parametrize("state", ["synced", "isolated"])
def test_announce_needs_agreed_backends_this_node_reaches(
        agreed: set[str], local: dict[str, bool], announce: bool, state: str) -> None:
    from anycast_lb.consensus.agent import State

    agent, pool = _agent_with_pool()
    for key, up in local.items():
        agent.local_health[("web", key)] = up
    agent.view = ClusterView(Layout("c"), revision=3)
    agent.state = State(state)
    pool.set_up_set(agreed)
    assert agent.announce_healthy("web") is announce


def test_announce_before_the_first_sync_follows_the_pool() -> None:
    agent, pool = _agent_with_pool()
    pool.set_up_set({"10.0.0.1:80"})
    assert agent.view is None and agent.announce_healthy("web")
