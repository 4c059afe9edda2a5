"""Two Cluster sync endpoints on 127.0.0.1 exchanging real datagrams.

The kernel data path is replaced by a recording fake that holds the map as
the kernel would, and fails a transaction that deletes a missing element
(nft 1.0.6 aborts it), so a shadow-copy mistake fails these tests.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from anycast_lb.cluster import Cluster, wire
from anycast_lb.cluster.keys import key_id
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


SYNC_KEY = bytes(range(32))
FORGED_KEY = bytes(range(1, 33))


def write_key(path: Path, *keys: bytes) -> Path:
    path.write_text("".join(base64.b64encode(k).decode() + "\n" for k in keys))
    path.chmod(0o600)
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write_key(tmp_path / "cluster.key", SYNC_KEY)


def _config(key_file: Path, port: int, peer_ports: Iterable[int], **extra: Any) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "address": "127.0.0.1", "port": port, "interface": "lo", "key_file": str(key_file),
        "peers": [f"127.0.0.1:{p}" for p in (port, *peer_ports)],
        "heartbeat_interval": 0.05, "peer_expiry": 0.25, "apply_interval": 0.02,
        "publish_delay": 0.005, "snapshot_interval": 30.0, **extra,
    })


@asynccontextmanager
async def pair(key_file: Path, **extra: Any) -> AsyncIterator[tuple[Cluster, Cluster, FakeKernel, FakeKernel,
                                                    list[list[Any]]]]:
    """Clusters a and b, each the other's only peer (index 0), running."""
    sa, sb = _socket(), _socket()
    pa, pb = sa.getsockname()[1], sb.getsockname()[1]
    ka, kb = FakeKernel(), FakeKernel()
    aborted: list[list[Any]] = []

    def abort(keys: Iterable[Any]) -> int:
        aborted.append(list(keys))
        return len(aborted[-1])

    a = Cluster(_config(key_file, pa, [pb], **extra), [SERVICE], name="a", datapath=ka, sock=sa)
    b = Cluster(_config(key_file, pb, [pa], **extra), [SERVICE], name="b", datapath=kb, sock=sb,
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


async def test_deltas_reach_the_peer_map_and_removals_leave_it(key_file: Path) -> None:
    async with pair(key_file) as (a, b, _, kb, _):
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


async def test_flows_are_published_once_of_age_and_short_ones_never(key_file: Path) -> None:
    async with pair(key_file, publish_min_age=0.3) as (a, b, _, kb, _):
        await wait_until(lambda: kb.live == (0,), what="b steers to a")
        a.on_flow(True, KEY)
        a.on_flow(False, KEY)  # a short connection: closed long before 0.3 s
        opened = time.monotonic()
        a.on_flow(True, KEY2)
        await wait_until(lambda: KEY2 in kb.owner, what="b's map holds a's older flow")
        assert time.monotonic() - opened >= 0.3
        assert a.deltas_sent == 1 and KEY not in kb.owner
        assert a.status()["flows_owned"] == 1
        lag = b.lag_p99()  # counted from when the flow may be published
        assert lag is not None and 0 <= lag < 0.3


async def test_a_clean_stop_says_leaving_and_its_flows_go_to_the_dead_set(key_file: Path) -> None:
    async with pair(key_file) as (a, _b, ka, kb, _):
        a.on_flow(True, KEY)
        await wait_until(lambda: KEY in kb.owner, what="b's map holds a's flow")
        started = time.monotonic()
        a.stop()
        await wait_until(lambda: kb.live == (), what="b stops steering to a")
        # The leaving heartbeat beats expiry (0.25 s).
        assert time.monotonic() - started < 0.2
        assert KEY not in kb.owner and KEY in kb.dead
        await wait_until(lambda: ka.removed, what="a removed its data path")


async def test_a_silent_peer_expires(key_file: Path) -> None:
    async with pair(key_file) as (a, b, _, kb, _):
        a.on_flow(True, KEY)
        await wait_until(lambda: KEY in kb.owner, what="b's map holds a's flow")
        silent = time.monotonic()
        a.endpoint.close()  # a's datagrams stop: no leaving message
        await wait_until(lambda: not b.status()["peers"][0]["alive"], timeout=2.0,
                         what="a expires at b")
        took = time.monotonic() - silent
        assert 0.2 <= took < 0.6, took  # peer_expiry 0.25 s plus at most one tick
        assert KEY in kb.dead and KEY not in kb.owner and b.status()["live_peers"] == 0


async def test_lost_deltas_are_repaired_by_a_requested_snapshot(key_file: Path) -> None:
    async with pair(key_file) as (a, b, _, kb, _):
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


async def test_a_newer_claim_by_a_peer_aborts_our_stale_socket(key_file: Path) -> None:
    async with pair(key_file) as (a, b, _, kb, aborted):
        await wait_until(lambda: kb.live == (0,), what="b steers to a")
        b.on_flow(True, KEY)  # b's old connection for this 4-tuple
        await wait_until(lambda: b.status()["flows_owned"] == 1, what="b owns it")
        b_ms = int(b.clock.wall() * 1000)  # a's accept must be strictly later (ms timestamps)
        await wait_until(lambda: int(a.clock.wall() * 1000) > b_ms, interval=0.001,
                         what="the next millisecond")
        a.on_flow(True, KEY)
        await wait_until(lambda: bool(aborted), what="b aborts its stale socket")
        assert aborted[0] == [KEY]
        await wait_until(lambda: kb.owner.get(KEY) == 0, what="b steers the 4-tuple to a")


async def test_without_its_data_path_a_node_runs_and_is_never_steered_to(key_file: Path) -> None:
    sa, sb = _socket(), _socket()
    pa, pb = sa.getsockname()[1], sb.getsockname()[1]
    kb = FakeKernel()
    a = Cluster(_config(key_file, pa, [pb]), [SERVICE],
                datapath=FakeKernel("nft not found in PATH"), sock=sa)
    b = Cluster(_config(key_file, pb, [pa]), [SERVICE], datapath=kb, sock=sb)
    tasks = [asyncio.create_task(c.run()) for c in (a, b)]
    try:
        await wait_until(lambda: b.status()["live_peers"] == 1, what="b hears a")
        status = a.status()
        assert status["flow_survival"] == "unavailable"
        assert status["reason"] == "nft not found in PATH"
        a.on_flow(True, KEY)
        # Two more heartbeats from a: a publish (which it must not make) would
        # have come first.
        heard = b.endpoint.received
        await wait_until(lambda: b.endpoint.received >= heard + 2, what="two more heartbeats")
        assert KEY not in kb.owner and kb.live == ()
        assert not b.status()["peers"][0]["steering_receiver"]
    finally:
        for c in (a, b):
            c.stop()
        await asyncio.gather(*tasks)


async def test_metrics_families_name_the_figures(key_file: Path) -> None:
    async with pair(key_file) as (a, b, _, kb, _):
        a.on_flow(True, KEY)
        await wait_until(lambda: KEY in kb.owner, what="b's map holds a's flow")
        names = {f.name: f for f in b.metric_families()}
        assert names["anycast_lb_cluster_live_peers"].samples[0].value == 1.0
        assert names["anycast_lb_cluster_steering_map_size"].samples[0].value == 1.0
        assert names["anycast_lb_cluster_sync_lag_seconds"].samples
        assert {"anycast_lb_cluster_flows_owned", "anycast_lb_cluster_sync_lag_p99_seconds",
                "anycast_lb_cluster_steered_packets"} <= names.keys()


# -- authentication -----------------------------------------------------------

KEY2 = ("203.0.113.8", 40002, "198.51.100.10", 80)


def _forge(data: bytes, counter: int, key: bytes, sender: Cluster,
           receiver: Cluster, *, kid: int | None = None) -> bytes:
    assert sender.endpoint.address is not None and receiver.endpoint.address is not None
    return wire.seal(data, counter, key, key_id(key) if kid is None else kid,
                     sender.endpoint.address, receiver.endpoint.address)


async def test_forged_and_replayed_datagrams_change_nothing_and_are_counted(
        key_file: Path) -> None:
    async with pair(key_file) as (a, b, _, kb, _):
        a.on_flow(True, KEY)
        await wait_until(lambda: kb.owner.get(KEY) == 0 and kb.live == (0,),
                         what="b steers a's flow to a")
        before = (dict(kb.owner), set(kb.dead), kb.live, kb.updates)
        # An injector on the LAN sends from a's address and port (as a
        # spoofed source would), and from an address that is no peer.
        assert a.endpoint._transport is not None and b.endpoint.address is not None
        inject = a.endpoint._transport.sendto
        claim = wire.encode_delta(a.epoch, a.seq + 1, 0, [(KEY2, 2**62)], [KEY])
        leave = wire.encode_heartbeat(a.epoch, a.seq, 0, receiver=False, leaving=True,
                                      owned=0, name="a")
        big = a.endpoint.counter + 1000
        stale = wire.encode_delta(a.epoch - 1, 1, 0, [(KEY2, 2**62)], [KEY])
        forged = [
            _forge(claim, big, FORGED_KEY, a, b),                         # wrong key
            _forge(leave, big + 1, FORGED_KEY, a, b, kid=key_id(SYNC_KEY)),  # wrong key, right id
            _forge(claim, big + 2, SYNC_KEY, b, b),                       # MAC names another sender
            claim,                                                       # unsealed: no key id
            _forge(claim, 1, SYNC_KEY, a, b),                             # replay: counter 1 was seen
            _forge(stale, big + 3, SYNC_KEY, a, b),                       # replay of an older epoch
            b"ALBC\x02",                                                 # malformed
        ]
        for data in forged:
            inject(data, b.endpoint.address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.bind(("127.0.0.1", 0))
            stranger.sendto(_forge(claim, big + 4, SYNC_KEY, a, b), b.endpoint.address)
        expected = {"unknown_peer": 1, "malformed": 1, "bad_mac": 4, "replay": 2}
        await wait_until(lambda: b.endpoint.rejected == expected, what="every forgery counted")
        # Heartbeats keep flowing: give a forged change time to show if it would.
        heard = b.endpoint.received
        await wait_until(lambda: b.endpoint.received >= heard + 2, what="two more heartbeats")
        await b.apply_once()
        assert (dict(kb.owner), set(kb.dead), kb.live) == before[:3]
        assert kb.updates == before[3]
        peer = b.status()["peers"][0]
        assert peer["alive"] and peer["flows"] == 1 and peer["key_id"] == key_id(SYNC_KEY)
        assert b.status()["sync"]["rejected"] == expected
        samples = {s.labels["reason"]: s.value for f in b.metric_families()
                   if f.name == "anycast_lb_cluster_sync_datagrams_rejected" for s in f.samples}
        assert samples == {k: float(v) for k, v in expected.items()}


async def test_a_restarted_peer_is_accepted_and_its_old_epoch_is_not(key_file: Path) -> None:
    async with pair(key_file) as (a, b, _, kb, _):
        a.on_flow(True, KEY)
        await wait_until(lambda: kb.owner.get(KEY) == 0, what="b holds a's flow")
        old_epoch, port = a.epoch, a.config.port
        assert b.endpoint.address is not None and a.endpoint._transport is not None
        # The restarted peer comes back on a's port: a copy of a's socket
        # holds it meanwhile (closing and binding it again could lose it).
        sock = a.endpoint._transport.get_extra_info("socket").dup()
        a.stop()
        await wait_until(lambda: kb.live == (), what="a left")
        again = Cluster(_config(key_file, port, [b.config.port]), [SERVICE], name="a2",
                        datapath=FakeKernel(), sock=sock)
        assert again.epoch > old_epoch
        task = asyncio.create_task(again.run())
        try:
            await wait_until(lambda: kb.live == (0,) and b.status()["peers"][0]["name"] == "a2",
                             what="b takes the restarted peer")
            assert again.endpoint._transport is not None
            stale = wire.encode_delta(old_epoch, 99, 0, [(KEY2, 1)], [])
            again.endpoint._transport.sendto(
                _forge(stale, 10**6, SYNC_KEY, again, b), b.endpoint.address)
            await wait_until(lambda: b.endpoint.rejected["replay"] == 1,
                             what="the old epoch is refused")
            assert b.status()["epoch"] != old_epoch
            assert KEY2 not in kb.owner and b.status()["peers"][0]["alive"]
        finally:
            again.stop()
            await task


async def test_keys_rotate_node_by_node_without_a_refused_datagram(tmp_path: Path) -> None:
    old, new = SYNC_KEY, FORGED_KEY
    file_a = write_key(tmp_path / "a.key", old)
    file_b = write_key(tmp_path / "b.key", old)
    sa, sb = _socket(), _socket()
    pa, pb = sa.getsockname()[1], sb.getsockname()[1]
    a = Cluster(_config(file_a, pa, [pb]), [SERVICE], name="a", datapath=FakeKernel(), sock=sa)
    b = Cluster(_config(file_b, pb, [pa]), [SERVICE], name="b", datapath=FakeKernel(), sock=sb)
    tasks = [asyncio.create_task(c.run()) for c in (a, b)]
    try:
        steps = [(old, new), (new, old), (new,)]  # add, swap, drop: every node, step by step
        for step in steps:
            for cluster, path in ((a, file_a), (b, file_b)):
                write_key(path, *step)
                assert cluster.reload_keys()
                heard = (a.endpoint.received, b.endpoint.received)
                await wait_until(lambda h=heard: a.endpoint.received > h[0]  # type: ignore[misc]
                                 and b.endpoint.received > h[1], what="both hear each other")
        assert a.endpoint.keys.signing == new and b.status()["peers"][0]["key_id"] == key_id(new)
        assert a.endpoint.rejected == b.endpoint.rejected == dict.fromkeys(
            ("unknown_peer", "malformed", "bad_mac", "replay"), 0)
        # A bad file is refused and the keys in use are kept.
        write_key(file_a, b"short")
        assert not a.reload_keys()
        assert a.status()["sync"]["key_file_error"] is not None
        assert a.endpoint.keys.signing == new
    finally:
        for c in (a, b):
            c.stop()
        await asyncio.gather(*tasks)


def test_a_key_file_open_to_others_is_refused(key_file: Path) -> None:
    key_file.chmod(0o644)
    sock = _socket()
    try:
        with pytest.raises(ClusterError, match="chmod 600"):
            Cluster(_config(key_file, sock.getsockname()[1], [1]), [SERVICE], sock=sock)
    finally:
        sock.close()
