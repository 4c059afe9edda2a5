"""Two Cluster sync endpoints on 127.0.0.1 exchanging real datagrams.

The kernel data path is replaced by a recording fake that holds the map as
the kernel would, and fails a transaction that deletes a missing element
(nft 1.0.6 aborts it), so a shadow-copy mistake fails these tests.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from anycast_lb.cluster import Cluster
from anycast_lb.cluster.ownership import MapPlan
from anycast_lb.config import ClusterConfig, ServiceConfig
from anycast_lb.errors import ClusterError
from tests.waiting import wait_until

SERVICE = ServiceConfig.model_validate({
    "name": "web", "vip": "198.51.100.10", "port": 80,
    "backends": [{"address": "127.0.0.1", "port": 9}]})
KEY = ("203.0.113.7", 40001, "198.51.100.10", 80)


class FakeKernel:
    """The kernel's map, live set and dead set, applied like nft would."""

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason
        self.owner: dict[tuple[str, int, str, int], int] = {}
        self.dead: set[tuple[str, int, str, int]] = set()
        self.live: tuple[int, ...] = ()
        self.installs = 0
        self.updates = 0
        self.removed = False

    def unavailable(self) -> str | None:
        return self.reason

    async def install(self, live: Sequence[int], owner: Mapping[Any, int]) -> None:
        self.installs += 1
        self.live, self.owner, self.dead = tuple(live), dict(owner), set()

    async def update(self, live: Sequence[int] | None, plan: MapPlan) -> None:
        if any(k not in self.owner for k in plan.delete):
            raise ClusterError("delete of a missing element")
        self.updates += 1
        if live is not None:
            self.live = tuple(live)
        for k in plan.delete:
            del self.owner[k]
        for k, i in plan.add:
            if k in self.owner:
                raise ClusterError("add of an element with another value")
            self.owner[k] = i
        self.dead |= set(plan.dead)

    async def counters(self) -> dict[str, int]:
        return {"steered": 3}

    async def remove(self) -> None:
        self.removed = True


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _config(port: int, peer_ports: Iterable[int], **extra: Any) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "address": "127.0.0.1", "port": port, "interface": "lo",
        "peers": [f"127.0.0.1:{p}" for p in (port, *peer_ports)],
        "heartbeat_interval": 0.05, "peer_expiry": 0.25, "apply_interval": 0.02,
        "publish_delay": 0.005, "snapshot_interval": 30.0, **extra,
    })


@asynccontextmanager
async def pair(**extra: Any) -> AsyncIterator[tuple[Cluster, Cluster, FakeKernel, FakeKernel,
                                                    list[list[Any]]]]:
    """Clusters a and b, each the other's only peer (index 0), running."""
    sa, sb = _socket(), _socket()
    pa, pb = sa.getsockname()[1], sb.getsockname()[1]
    ka, kb = FakeKernel(), FakeKernel()
    aborted: list[list[Any]] = []

    def abort(keys: Iterable[Any]) -> int:
        aborted.append(list(keys))
        return len(aborted[-1])

    a = Cluster(_config(pa, [pb], **extra), [SERVICE], name="a", datapath=ka, sock=sa)
    b = Cluster(_config(pb, [pa], **extra), [SERVICE], name="b", datapath=kb, sock=sb,
                abort=abort)
    tasks = []
    for c in (a, b):
        started = asyncio.Event()
        tasks.append(asyncio.create_task(c.run(started)))
        await started.wait()
    try:
        yield a, b, ka, kb, aborted
    finally:
        for c in (a, b):
            c.stop()
        await asyncio.gather(*tasks)


async def test_deltas_reach_the_peer_map_and_removals_leave_it() -> None:
    async with pair() as (a, b, _, kb, _):
        await wait_until(lambda: kb.live == (0,), what="b steers to a")
        # The relay calls the hook from its own thread.
        await asyncio.to_thread(a.on_flow, True, KEY)
        await wait_until(lambda: kb.owner.get(KEY) == 0, what="b's map holds a's flow")
        assert a.status()["flows_owned"] == 1 and b.status()["steering_map_size"] == 1
        lag = b.lag_p99()
        assert lag is not None and 0 <= lag < 1.0
        a.on_flow(False, KEY)
        await wait_until(lambda: KEY not in kb.owner, what="the closed flow leaves b's map")
        assert await a.wait_owned_zero(1.0)
        peer = b.status()["peers"][0]
        assert peer["alive"] and peer["in_sync"] and peer["name"] == "a"
        assert b.status()["packets"]["steered"] == 3


async def test_a_clean_stop_says_leaving_and_its_flows_go_to_the_dead_set() -> None:
    async with pair() as (a, b, ka, kb, _):
        a.on_flow(True, KEY)
        await wait_until(lambda: KEY in kb.owner, what="b's map holds a's flow")
        started = time.monotonic()
        a.stop()
        await wait_until(lambda: kb.live == (), what="b stops steering to a")
        # The leaving heartbeat beats expiry (0.25 s).
        assert time.monotonic() - started < 0.2
        assert KEY not in kb.owner and KEY in kb.dead
        await wait_until(lambda: ka.removed, what="a removed its data path")


async def test_a_silent_peer_expires() -> None:
    async with pair() as (a, b, _, kb, _):
        a.on_flow(True, KEY)
        await wait_until(lambda: KEY in kb.owner, what="b's map holds a's flow")
        silent = time.monotonic()
        a.endpoint.close()  # a's datagrams stop: no leaving message
        await wait_until(lambda: not b.status()["peers"][0]["alive"], timeout=2.0,
                         what="a expires at b")
        took = time.monotonic() - silent
        assert 0.2 <= took < 0.6, took  # peer_expiry 0.25 s plus at most one tick
        assert KEY in kb.dead and KEY not in kb.owner and b.status()["live_peers"] == 0


async def test_lost_deltas_are_repaired_by_a_requested_snapshot() -> None:
    async with pair() as (a, b, _, kb, _):
        await wait_until(lambda: kb.live == (0,), what="b steers to a")
        real_send = a.endpoint.send
        dropped: list[bytes] = []

        def lossy(index: int, data: bytes) -> None:
            if data[5] == 2 and not dropped:  # the first delta is lost
                dropped.append(data)
                return
            real_send(index, data)

        a.endpoint.send = lossy  # type: ignore[method-assign]
        a.on_flow(True, KEY)
        await wait_until(lambda: bool(dropped), what="a delta dropped")
        # The next heartbeat shows seq 1 > 0: b asks for a snapshot and heals.
        await wait_until(lambda: kb.owner.get(KEY) == 0, what="the snapshot brings the flow")
        assert b.status()["peers"][0]["snapshots"] >= 1 and b.status()["peers"][0]["in_sync"]


async def test_a_newer_claim_by_a_peer_aborts_our_stale_socket() -> None:
    async with pair() as (a, b, _, kb, aborted):
        await wait_until(lambda: kb.live == (0,), what="b steers to a")
        b.on_flow(True, KEY)  # b's old connection for this 4-tuple
        await wait_until(lambda: b.status()["flows_owned"] == 1, what="b owns it")
        await asyncio.sleep(0.002)  # a's accept is strictly later (ms timestamps)
        a.on_flow(True, KEY)
        await wait_until(lambda: bool(aborted), what="b aborts its stale socket")
        assert aborted[0] == [KEY]
        await wait_until(lambda: kb.owner.get(KEY) == 0, what="b steers the 4-tuple to a")


async def test_without_its_data_path_a_node_runs_and_is_never_steered_to() -> None:
    sa, sb = _socket(), _socket()
    pa, pb = sa.getsockname()[1], sb.getsockname()[1]
    kb = FakeKernel()
    a = Cluster(_config(pa, [pb]), [SERVICE], datapath=FakeKernel("nft not found in PATH"),
                sock=sa)
    b = Cluster(_config(pb, [pa]), [SERVICE], datapath=kb, sock=sb)
    tasks = [asyncio.create_task(c.run()) for c in (a, b)]
    try:
        await wait_until(lambda: b.status()["live_peers"] == 1, what="b hears a")
        status = a.status()
        assert status["flow_survival"] == "unavailable"
        assert status["reason"] == "nft not found in PATH"
        a.on_flow(True, KEY)
        await asyncio.sleep(0.1)  # let a publish if it (wrongly) would
        assert KEY not in kb.owner and kb.live == ()
        assert not b.status()["peers"][0]["steering_receiver"]
    finally:
        for c in (a, b):
            c.stop()
        await asyncio.gather(*tasks)


async def test_metrics_families_name_the_figures() -> None:
    async with pair() as (a, b, _, kb, _):
        a.on_flow(True, KEY)
        await wait_until(lambda: KEY in kb.owner, what="b's map holds a's flow")
        names = {f.name: f for f in b.metric_families()}
        assert names["anycast_lb_cluster_live_peers"].samples[0].value == 1.0
        assert names["anycast_lb_cluster_steering_map_size"].samples[0].value == 1.0
        assert names["anycast_lb_cluster_sync_lag_seconds"].samples
        assert {"anycast_lb_cluster_flows_owned", "anycast_lb_cluster_sync_lag_p99_seconds",
                "anycast_lb_cluster_steered_packets"} <= names.keys()
