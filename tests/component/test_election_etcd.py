"""VIP ownership elections against a real single-member etcd (no mock).

Each node is a :class:`VipOwnership` with its own Store; its take, announce
and drop callbacks record (monotonic time, node, kind, term). The fixture's
etcd runs with a 500 ms election timeout, so it grants 1 s leases.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from anycast_lb.consensus.store import Store
from anycast_lb.election.etcd import IPAddress, VipOwnership
from anycast_lb.election.machine import ElectionSettings, Role
from anycast_lb.errors import ConsensusUnavailable
from tests.component.etcd import EtcdMember
from tests.waiting import wait_until

VIP = ipaddress.ip_address("198.51.100.100")
TTL, MARGIN = 1.0, 0.25


class IsolableStore(Store):
    """A real Store whose keepalives can be cut: the owner stays up, on the
    LAN and watching, but cannot renew its lease (etcd unreachable for it)."""

    isolated = False
    lost_deletes = 0
    """Deletes to lose (raise as a timed-out request would, unsent)."""

    async def keepalive(self, lease_id: int) -> int:
        if self.isolated:
            raise ConsensusUnavailable("isolated by the test")
        return await super().keepalive(lease_id)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        if self.lost_deletes:
            self.lost_deletes -= 1
            raise ConsensusUnavailable(f"delete {key}: no answer (lost by the test)")
        return await super().delete(key, prefix=prefix)


@dataclass
class Node:
    name: str
    store: IsolableStore
    ownership: VipOwnership
    events: list[tuple[float, str, str, int]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    keepalives_sent: list[float] = field(default_factory=list)

    def holds(self) -> bool:
        return self.ownership.machines[VIP].has_vip

    def times(self, kind: str) -> list[float]:
        return [t for t, _, k, _ in self.events if k == kind]


@asynccontextmanager
async def cluster(member: EtcdMember, name: str,
                  *specs: tuple[str, int, bool]) -> AsyncIterator[list[Node]]:
    nodes: list[Node] = []
    try:
        for node_name, priority, preempt in specs:
            store = IsolableStore([member.client_url], 0.25)
            store.connect()
            events: list[tuple[float, str, str, int]] = []

            def recorder(kind: str, n: str = node_name,
                         ev: list[tuple[float, str, str, int]] = events) -> Callable[..., object]:
                async def record(vip: IPAddress, term: int, *reason: str) -> None:
                    ev.append((time.monotonic(), n, kind, term))
                return record

            settings = ElectionSettings(node=node_name, lease_ttl=TTL, safety_margin=MARGIN,
                                        priority=priority, preempt=preempt,
                                        handover_timeout=1.0)
            own = VipOwnership(store, name, settings, [VIP], on_take=recorder("take"),  # type: ignore[arg-type]
                               on_announce=recorder("announce"),  # type: ignore[arg-type]
                               on_drop=recorder("drop"))  # type: ignore[arg-type]
            node = Node(node_name, store, own, events)
            node.task = asyncio.create_task(own.run())
            nodes.append(node)
        yield nodes
    finally:
        for node in nodes:
            assert node.task is not None
            node.task.cancel()
            await asyncio.gather(node.task, return_exceptions=True)
            await node.store.close()


def owners(nodes: list[Node]) -> list[str]:
    return [n.name for n in nodes if n.holds()]


async def a_owns_and_b_sees_it(a: Node, b: Node) -> None:
    """``a`` qualifies first and takes the VIP; then ``b`` qualifies and
    sees ``a`` as its owner."""
    a.ownership.set_qualifies(VIP, True)
    await wait_until(lambda: bool(a.times("take")), timeout=5, what="a owns")
    b.ownership.set_qualifies(VIP, True)
    await wait_until(lambda: b.ownership.states()[VIP].owner == "a", timeout=5, what="b sees a")


async def test_two_candidates_one_wins(etcd_member: EtcdMember, etcd_cluster: str) -> None:
    async with cluster(etcd_member, etcd_cluster, ("a", 100, False), ("b", 100, False)) as nodes:
        for n in nodes:
            n.ownership.set_qualifies(VIP, True)
        await wait_until(lambda: len(owners(nodes)) == 1, timeout=5, what="an owner")
        await wait_until(lambda: all(n.ownership.states()[VIP].owner is not None for n in nodes),
                         timeout=5, what="both see the owner")
        states = [n.ownership.states()[VIP] for n in nodes]
        assert states[0].owner == states[1].owner == owners(nodes)[0]
        assert states[0].term == states[1].term and states[0].term is not None
        assert sorted(s.role for s in states) == sorted([Role.OWNER, Role.STANDBY])
        # has_vip turns when the take is ordered; the callback runs just after.
        await wait_until(lambda: sum(len(n.times("take")) for n in nodes) == 1, timeout=5,
                         what="one take callback")
        assert sum(len(n.times("drop")) for n in nodes) == 0


async def test_an_isolated_owner_steps_down_before_the_other_is_elected(
    etcd_member: EtcdMember, etcd_cluster: str
) -> None:
    async with cluster(etcd_member, etcd_cluster, ("a", 200, False), ("b", 100, False)) as nodes:
        a, b = nodes
        await a_owns_and_b_sees_it(a, b)
        term_a = a.ownership.states()[VIP].term
        assert term_a is not None
        machine_a = a.ownership.machines[VIP]
        a.store.isolated = True
        last_ok = machine_a.lease_ok_at
        await wait_until(lambda: bool(b.times("take")), timeout=5, what="b takes over")
        dropped, taken = a.times("drop")[0], b.times("take")[0]
        # Fencing: a dropped first, at its deadline, ahead of any election.
        assert machine_a.lease_ok_at == last_ok or machine_a.lease_ok_at is None
        assert dropped < taken
        assert b.ownership.states()[VIP].term > term_a  # type: ignore[operator]
        assert not a.holds()
        print(f"\nfenced drop -> other take: {(taken - dropped) * 1000:.0f} ms")


async def test_a_higher_priority_node_with_preempt_takes_over_make_before_break(
    etcd_member: EtcdMember, etcd_cluster: str
) -> None:
    async with cluster(etcd_member, etcd_cluster, ("a", 100, False), ("b", 200, True)) as nodes:
        a, b = nodes
        a.ownership.set_qualifies(VIP, True)
        await wait_until(lambda: bool(a.times("take")), timeout=5, what="a owns")
        term_a = a.ownership.states()[VIP].term
        b.ownership.set_qualifies(VIP, True)   # the higher-priority node returns
        await wait_until(lambda: bool(b.times("take") and a.times("drop")), timeout=5,
                         what="b takes, a drops")
        assert b.times("take")[0] < a.times("drop")[0]  # make before break
        assert b.ownership.states()[VIP].term > term_a  # type: ignore[operator]
        await wait_until(lambda: a.ownership.states()[VIP].owner == "b", timeout=5, what="a sees b")
        assert a.ownership.states()[VIP].role is Role.STANDBY


async def test_a_draining_owner_hands_over_make_before_break(
    etcd_member: EtcdMember, etcd_cluster: str
) -> None:
    async with cluster(etcd_member, etcd_cluster, ("a", 200, False), ("b", 100, False)) as nodes:
        a, b = nodes
        await a_owns_and_b_sees_it(a, b)
        a.ownership.set_qualifies(VIP, False)  # drain
        await wait_until(lambda: bool(b.times("take") and a.times("drop")), timeout=5,
                         what="b takes, a drops")
        taken, dropped = b.times("take")[0], a.times("drop")[0]
        assert taken < dropped and dropped - taken < 0.5  # dropped on b's announcement
        print(f"\nplanned move: overlap {(dropped - taken) * 1000:.1f} ms")


async def test_a_drain_whose_candidate_delete_is_lost_still_hands_over_make_before_break(
    etcd_member: EtcdMember, etcd_cluster: str
) -> None:
    # Under load an etcd call can miss request_timeout. The draining owner's
    # candidate key, left behind, outranks the successor, which would defer
    # for lease_ttl while the owner drops the VIP after handover_timeout.
    async with cluster(etcd_member, etcd_cluster, ("a", 200, False), ("b", 100, False)) as nodes:
        a, b = nodes
        await a_owns_and_b_sees_it(a, b)
        a.store.lost_deletes = 1  # a's candidate key delete
        a.ownership.set_qualifies(VIP, False)  # drain
        await wait_until(lambda: bool(b.times("take") and a.times("drop")), timeout=5,
                         what="b takes, a drops")
        assert a.store.lost_deletes == 0
        assert b.times("take")[0] < a.times("drop")[0]  # make before break
