"""UdpForwarder against real UDP backends on 127.0.0.1 (port 0 everywhere)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from anycast_lb.config import ServiceConfig
from anycast_lb.errors import BindError
from anycast_lb.forward.udp import UdpForwarder
from anycast_lb.pool import Pool
from tests.waiting import wait_until

DEADLINE = 5.0


class EchoBackend(asyncio.DatagramProtocol):
    """Answers each datagram with ``name:data``; ``name:twice:...`` gets two answers."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.transport: asyncio.DatagramTransport | None = None
        self.senders: list[tuple[str, int]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.senders.append(addr)
        if data.startswith(b"stream:"):
            self._stream(int(data[7:]), addr)
            return
        replies = 2 if data.startswith(b"twice:") else 1
        for _ in range(replies):
            self.transport.sendto(self.name + b":" + data, addr)


    def _stream(self, left: int, addr: tuple[str, int]) -> None:
        """One reply now and one every 0.05 s until ``left`` are sent."""
        assert self.transport is not None
        self.transport.sendto(self.name + b":%d" % left, addr)
        if left > 1:
            asyncio.get_running_loop().call_later(0.05, self._stream, left - 1, addr)


class Client(asyncio.DatagramProtocol):
    """An unconnected client socket, so replies from any source are seen
    together with their source address."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.replies.put_nowait((data, addr))

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, to)

    async def reply(self) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.replies.get(), DEADLINE)

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        name = self.transport.get_extra_info("sockname")
        return (name[0], name[1])


class Rig:
    def __init__(self) -> None:
        self.transports: list[asyncio.BaseTransport] = []
        self.forwarders: list[UdpForwarder] = []

    async def backend(self, name: str) -> tuple[tuple[str, int], EchoBackend]:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: EchoBackend(name), local_addr=("127.0.0.1", 0)
        )
        self.transports.append(transport)
        sockname = transport.get_extra_info("sockname")
        return (sockname[0], sockname[1]), protocol

    async def client(self, host: str = "127.0.0.1") -> Client:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            Client, local_addr=(host, 0)
        )
        self.transports.append(transport)
        return protocol

    async def forwarder(
        self, addresses: list[tuple[str, int]], up: bool = True, **extra: Any
    ) -> tuple[UdpForwarder, Pool, tuple[str, int]]:
        service = ServiceConfig.model_validate(
            {
                "name": "dns",
                "vip": "127.0.0.1",
                "port": 53,
                "protocol": "udp",
                "backends": [{"address": h, "port": p} for h, p in addresses],
                **extra,
            }
        )
        pool = Pool(service)
        if up:
            for backend in pool.backends:
                pool.set_up(backend.key, True)
        fwd = UdpForwarder(service, pool, bind_host="127.0.0.1", bind_port=0)
        self.forwarders.append(fwd)
        return fwd, pool, await fwd.start()

    async def close(self) -> None:
        for fwd in self.forwarders:
            fwd.stop_accepting()
            fwd.abort_all()
            assert await fwd.wait_idle(DEADLINE)
        for transport in self.transports:
            transport.close()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    rig = Rig()
    yield rig
    await rig.close()


async def test_datagrams_flow_both_ways_from_the_bound_address(rig: Rig) -> None:
    b1, echo = await rig.backend("b1")
    fwd, pool, address = await rig.forwarder([b1])
    client = await rig.client()
    client.send(b"hello", address)
    assert await client.reply() == (b"b1:hello", address)
    client.send(b"twice:x", address)
    assert await client.reply() == (b"b1:twice:x", address)
    assert await client.reply() == (b"b1:twice:x", address)
    backend = pool.backends[0]
    assert fwd.active == 1 and backend.active_connections == 1
    assert backend.packets_in == 2 and backend.bytes_in == len(b"hello") + len(b"twice:x")
    assert backend.packets_out == 3
    assert backend.bytes_out == len(b"b1:hello") + 2 * len(b"b1:twice:x")
    # One flow, one backend-side socket: the backend saw a single source.
    assert len(set(echo.senders)) == 1
    assert echo.senders[0] != client.address


async def test_each_client_is_its_own_flow(rig: Rig) -> None:
    b1, _ = await rig.backend("b1")
    b2, _ = await rig.backend("b2")
    fwd, pool, address = await rig.forwarder([b1, b2], balance="round_robin")
    first, second = await rig.client(), await rig.client()
    first.send(b"a", address)
    assert (await first.reply())[0] == b"b1:a"
    second.send(b"b", address)
    assert (await second.reply())[0] == b"b2:b"
    # Later datagrams stick to the flow's backend.
    first.send(b"c", address)
    assert (await first.reply())[0] == b"b1:c"
    assert fwd.active == 2 and fwd.flows_total == 2
    assert [b.active_connections for b in pool.backends] == [1, 1]


async def test_idle_flows_expire(rig: Rig) -> None:
    b1, _ = await rig.backend("b1")
    fwd, pool, address = await rig.forwarder([b1], idle_timeout=0.2)
    client = await rig.client()
    client.send(b"x", address)
    await client.reply()
    silent_since = time.monotonic()
    assert fwd.active == 1
    assert await fwd.wait_idle(DEADLINE)
    assert time.monotonic() - silent_since >= 0.2 - 0.01
    assert pool.backends[0].active_connections == 0
    # A new datagram opens a new flow.
    client.send(b"y", address)
    assert (await client.reply())[0] == b"b1:y"
    assert fwd.flows_total == 2


async def test_backend_traffic_alone_keeps_a_flow_alive(rig: Rig) -> None:
    b1, _ = await rig.backend("b1")
    fwd, _, address = await rig.forwarder([b1], idle_timeout=0.2)
    client = await rig.client()
    client.send(b"stream:8", address)  # 8 replies over 0.35 s, nothing more from the client
    for left in range(8, 0, -1):
        assert await client.reply() == (b"b1:%d" % left, address)
    assert fwd.active == 1 and fwd.flows_total == 1


async def test_full_table_replaces_only_a_quiet_flow(rig: Rig) -> None:
    b1, _ = await rig.backend("b1")
    # idle_timeout 8 s: a sweep each 1 s, far from the flows' own expiry.
    fwd, pool, address = await rig.forwarder([b1], max_flows=2, idle_timeout=8)
    c1, c2, c3 = [await rig.client(f"127.0.0.{i}") for i in (1, 2, 3)]
    for client in (c1, c2):
        client.send(b"1", address)
        await client.reply()
    c3.send(b"1", address)  # both flows are active: c3's datagram is dropped
    await wait_until(lambda: fwd.refused()["cap"] == 1, what="a refusal at the cap")
    assert fwd.active == 2 and fwd.evicted == 0 and fwd.flows_total == 2
    fwd._sweep()  # one sweep interval passes with no datagram: both flows are quiet
    c1.send(b"2", address)  # c1 is active again, c2 stays quiet
    await c1.reply()
    c3.send(b"2", address)  # replaces c2, the least recently used quiet flow
    assert await c3.reply() == (b"b1:2", address)
    assert fwd.active == 2 and fwd.evicted == 1 and fwd.flows_total == 3
    assert pool.backends[0].active_connections == 2
    c1.send(b"3", address)  # still in the table
    await c1.reply()
    assert fwd.flows_total == 3
    c2.send(b"2", address)  # its flow was replaced, and c1 and c3 are active
    await wait_until(lambda: fwd.refused()["cap"] == 2, what="a second refusal")
    assert fwd.flows_total == 3 and fwd.refused()["source_cap"] == 0


async def test_one_source_cannot_take_the_table(rig: Rig) -> None:
    b1, _ = await rig.backend("b1")
    fwd, _, address = await rig.forwarder([b1], max_flows=10, max_flows_per_source=2)
    greedy = [await rig.client("127.0.0.2") for _ in range(3)]
    for client in greedy[:2]:
        client.send(b"x", address)
        await client.reply()
    greedy[2].send(b"x", address)
    await wait_until(lambda: fwd.refused()["source_cap"] == 1, what="a per-source refusal")
    other = await rig.client("127.0.0.3")
    other.send(b"y", address)
    assert await other.reply() == (b"b1:y", address)
    assert fwd.active == 3 and fwd.refused()["cap"] == 0
    fwd.abort_all()  # the source's flows end: its share is free again
    greedy[2].send(b"z", address)
    assert await greedy[2].reply() == (b"b1:z", address)


async def test_prefix_groups_sources(rig: Rig) -> None:
    b1, _ = await rig.backend("b1")
    fwd, _, address = await rig.forwarder([b1], max_flows=10, max_flows_per_source=1,
                                          source_prefix_v4=24)
    first, neighbour = await rig.client("127.0.0.2"), await rig.client("127.0.0.3")
    first.send(b"x", address)
    await first.reply()
    neighbour.send(b"x", address)  # the same /24
    await wait_until(lambda: fwd.refused()["source_cap"] == 1, what="a per-prefix refusal")
    assert fwd.active == 1


async def test_flow_moves_when_its_backend_goes_down(rig: Rig) -> None:
    b1, _ = await rig.backend("b1")
    b2, _ = await rig.backend("b2")
    fwd, pool, address = await rig.forwarder([b1, b2])
    client = await rig.client()
    client.send(b"x", address)
    data, _ = await client.reply()
    chosen = pool.backends[0] if data == b"b1:x" else pool.backends[1]
    other = "b2" if chosen is pool.backends[0] else "b1"
    pool.set_up(chosen.key, False)
    client.send(b"y", address)
    assert (await client.reply())[0] == f"{other}:y".encode()
    assert chosen.active_connections == 0
    assert fwd.active == 1 and fwd.flows_total == 2


async def test_no_backend_up_drops_the_datagram(rig: Rig) -> None:
    b1, echo = await rig.backend("b1")
    fwd, pool, address = await rig.forwarder([b1], up=False)
    client = await rig.client()
    client.send(b"x", address)
    await wait_until(lambda: fwd.rejected != 0, timeout=DEADLINE,
                     what="the datagram to reach the forwarder")
    assert fwd.active == 0 and echo.senders == []
    pool.set_up(pool.backends[0].key, True)
    client.send(b"y", address)
    assert (await client.reply())[0] == b"b1:y"


async def test_stop_accepting_keeps_existing_flows(rig: Rig) -> None:
    b1, _echo = await rig.backend("b1")
    fwd, _, address = await rig.forwarder([b1])
    old, new = await rig.client(), await rig.client()
    old.send(b"1", address)
    await old.reply()
    assert fwd.listening
    fwd.stop_accepting()
    assert not fwd.listening
    new.send(b"1", address)
    old.send(b"2", address)  # sent after new's datagram, answered: new's was dropped
    assert await old.reply() == (b"b1:2", address)
    assert fwd.dropped == 1 and fwd.active == 1
    assert new.replies.empty()
    assert not await fwd.wait_idle(0.05)
    fwd.abort_all()
    assert await fwd.wait_idle(DEADLINE)
    assert fwd.active == 0
    # The listening socket closes with the last flow: the port becomes free
    # (the transport closes its socket on the next loop iteration).
    def port_free() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(address)  # a probe of the closed listener, not a port to reuse
            except OSError:
                return False
            return True

    await wait_until(port_free, timeout=DEADLINE, what="the listening socket to close")


async def test_bind_error_names_the_address(rig: Rig) -> None:
    b1, _ = await rig.backend("b1")
    _fwd, pool, address = await rig.forwarder([b1])
    second = UdpForwarder(pool.service, pool, bind_host=address[0], bind_port=address[1])
    with pytest.raises(BindError, match=f"127.0.0.1:{address[1]}") as info:
        await second.start()
    assert isinstance(info.value.__cause__, OSError)
    assert not second.listening
