"""Two ownership parts (:class:`OwnershipPart`, what a node runs for its
``via: l2`` VIPs) on one real etcd move a real neighbour entry (root,
scratch namespaces).

Three namespaces of this test's own: the two nodes' interfaces
(``albt-l2w-a``, ``albt-l2w-b``) and an observer (``albt-l2w-c``) whose
bridge joins their veth peers. The parts run in this process; their address
changes and raw sockets are made inside the node namespaces (setns on the
calling thread, undone at once). The observer resolves the VIP (answered by
the owner's kernel); then the owner's ownership task is killed (cancelled,
its lease left to expire) and the observer's entry must move to the other
node's MAC, b's first announcement going out within ``lease_ttl`` + 0.5 s
(etcd's lease expiry check) + 0.1 s (the move itself), with no moment where
both nodes hold the VIP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from anycast_lb.config import ConsensusConfig, ElectionConfig, ServiceConfig
from anycast_lb.election.etcd import IPAddress, L2VipActions
from anycast_lb.election.fence import KernelFence
from anycast_lb.election.l2 import L2Announcer, VipAddresses
from anycast_lb.election.part import OwnershipPart
from anycast_lb.errors import L2Error
from anycast_lb.lab.netns import entered
from tests.component import l2segment
from tests.component.etcd import EtcdMember
from tests.component.l2segment import in_ns
from tests.waiting import wait_until

NS_A, NS_B, NS_C = "albt-l2w-a", "albt-l2w-b", "albt-l2w-c"
VIP = ipaddress.ip_address("198.51.100.100")
TTL = 1.0
LESSOR_CHECK = 0.5
"""s between etcd's checks for expired leases (its lessor loop): a lease is
revoked up to this long after its TTL ran out."""
MOVE = 0.1
"""s the standby may take from seeing the owner key deleted to its first
announcement (watch event, campaign write committed with fsync, address add,
frame)."""

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and ip (network namespaces)",
)


@pytest.fixture
def segment() -> Iterator[dict[str, str]]:
    with l2segment.segment(NS_A, NS_B, NS_C) as macs:
        yield macs


class NsAnnouncer(L2Announcer):
    """An announcer whose raw socket is opened inside namespace ``ns``."""

    def __init__(self, ns: str, interface: str) -> None:
        super().__init__(interface)
        self.ns = ns
        self.sent_at: list[float] = []
        """Monotonic s of each announcement sent."""

    def announce(self, vip: IPAddress) -> None:
        super().announce(vip)
        self.sent_at.append(time.monotonic())

    def open(self) -> None:
        with entered(self.ns):
            super().open()


class NsAddresses(VipAddresses):
    """VIP add/remove through a netlink socket opened inside ``ns`` (in the
    worker thread that runs the call; the thread is switched back after)."""

    def __init__(self, ns: str, interface: str) -> None:
        super().__init__(interface)
        self.ns = ns

    def _call(self, command: str, vip: IPAddress) -> bool:
        with entered(self.ns):
            return super()._call(command, vip)


class NsFence(KernelFence):
    """The kernel fence's nftables commands run inside ``ns``."""

    def __init__(self, ns: str) -> None:
        super().__init__()
        self.ns = ns

    def run(self, script: str) -> None:
        with entered(self.ns):
            super().run(script)


class NsActions(L2VipActions):
    def __init__(self, ns: str, interface: str) -> None:
        self.ns = ns
        self.addresses = NsAddresses(ns, interface)
        self.quiet_addresses = NsAddresses(ns, "lo")
        self.announcer = NsAnnouncer(ns, interface)
        self.fence = NsFence(ns)

    def prepare(self, vips: Sequence[IPAddress] = ()) -> None:
        with entered(self.ns):  # the interface's sysctls are the namespace's
            super().prepare(vips)


def part(name: str, priority: int, dev: str, ns: str, etcd: EtcdMember,
         cluster: str) -> OwnershipPart:
    consensus = ConsensusConfig.model_validate({"endpoints": [etcd.client_url],
                                                "cluster": cluster, "lease_ttl": TTL,
                                                "request_timeout": 0.1})
    election = ElectionConfig.model_validate({"priority": priority, "interface": dev,
                                              "safety_margin": 0.25})
    service = ServiceConfig.model_validate({
        "name": "web", "vip": str(VIP), "port": 80,
        "announce": {"mode": "active_passive", "via": "l2"},
        "backends": [{"address": "203.0.113.130", "port": 8080}]})
    return OwnershipPart(consensus, election, name, [service], on_change=lambda: None,
                         l2=NsActions(ns, dev))


@asynccontextmanager
async def running(*parts: OwnershipPart) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(p.run()) for p in parts]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def neighbour() -> str | None:
    entries = json.loads(in_ns(NS_C, "ip", "-j", "neigh", "show", str(VIP), "dev", "br0"))
    return entries[0].get("lladdr") if entries else None


def holds_address(ns: str, dev: str) -> bool:
    addresses: list[dict[str, Any]] = json.loads(in_ns(ns, "ip", "-j", "addr", "show", dev))
    return any(a.get("local") == str(VIP) for link in addresses for a in link["addr_info"])


def poke() -> None:
    """One UDP datagram from the observer to the VIP: the kernel resolves it."""
    in_ns(NS_C, sys.executable, "-c", "import socket; socket.socket(socket.AF_INET, "
          f"socket.SOCK_DGRAM).sendto(b'x', ('{VIP}', 9))")


async def test_killing_the_owner_moves_the_neighbour_entry_within_the_lease(
        segment: dict[str, str], etcd_member: EtcdMember, etcd_cluster: str) -> None:
    mac_a, mac_b = segment[NS_A], segment[NS_B]
    a = part("a", 200, "l2a", NS_A, etcd_member, etcd_cluster)
    b = part("b", 100, "l2b", NS_B, etcd_member, etcd_cluster)
    async with running(a, b) as (task_a, _):
        a.qualify({VIP: True})
        await wait_until(lambda: a.owns(VIP), timeout=10, what="a owns the VIP")
        b.qualify({VIP: True})
        await wait_until(lambda: b.states()[VIP].owner == "a", timeout=10, what="b sees a")
        await wait_until(lambda: asyncio.to_thread(holds_address, NS_A, "l2a"), timeout=5,
                         what="the VIP on a's interface")
        assert not await asyncio.to_thread(holds_address, NS_B, "l2b")
        await asyncio.to_thread(poke)

        async def at(mac: str) -> bool:
            return await asyncio.to_thread(neighbour) == mac
        await wait_until(lambda: at(mac_a), timeout=5, interval=0.02, what="the entry at a")

        both: list[float] = []

        async def watch() -> None:
            while True:
                if a.owns(VIP) and b.owns(VIP):
                    both.append(time.monotonic())
                await asyncio.sleep(0.001)
        watcher = asyncio.create_task(watch())
        announcer = b.l2.announcer if b.l2 is not None else None
        assert isinstance(announcer, NsAnnouncer)
        killed = time.monotonic()
        task_a.cancel()  # its lease is left to expire: nothing tells etcd
        await asyncio.gather(task_a, return_exceptions=True)
        await wait_until(lambda: at(mac_b), timeout=5, interval=0.01, what="the entry at b")
        moved = announcer.sent_at[0] - killed
        print(f"\nowner killed -> first announcement by the other: {moved * 1000:.0f} ms")
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        # The lease outlives the kill by up to TTL (the last keepalive may
        # have just been acknowledged), etcd revokes it within LESSOR_CHECK
        # of expiry, then the standby moves the VIP.
        assert moved <= TTL + LESSOR_CHECK + MOVE, f"b announced {moved:.3f} s after the kill"
        assert both == []
        assert b.owns(VIP) and b.states()[VIP].term > a.states()[VIP].term  # type: ignore[operator]
        assert await asyncio.to_thread(holds_address, NS_B, "l2b")
        assert not await asyncio.to_thread(holds_address, NS_A, "l2a")


class RefusingFence(NsFence):
    """A kernel fence whose element writes nftables refuses (the table itself
    is set up)."""

    def hold(self, vip: IPAddress, until: float, now: float | None = None) -> bool:
        raise L2Error(f"nft refused the element for {vip}")


async def test_a_refused_fence_write_is_counted_and_exported(
        segment: dict[str, str], etcd_member: EtcdMember, etcd_cluster: str) -> None:
    a = part("a", 200, "l2a", NS_A, etcd_member, etcd_cluster)
    assert a.l2 is not None
    a.l2.fence = RefusingFence(NS_A)
    async with running(a):
        a.qualify({VIP: True})
        await wait_until(lambda: a.fence_failures >= 1, timeout=10,
                         what="the refused hold counted")
    exported = {m.name: m.samples[0].value for m in a.metric_families()
                if m.name == "anycast_lb_vip_fence_failures"}
    assert exported == {"anycast_lb_vip_fence_failures": float(a.fence_failures)}
