"""The relay registers a backend socket with epoll edge-triggered: each
readiness is reported once, so every byte the backend sends must still
reach the client when the relay did not read it all at that report: a
burst of reads that stopped with bytes left, bytes that came with the
connect (a client that could not take them: test_tcp_forwarder.py's
test_slow_client_pauses_the_backend_not_memory)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from anycast_lb.config import ForwardingConfig
from anycast_lb.forward.pump import BURST
from anycast_lb.forward.relay import RelayForwarder, RelayLoop
from anycast_lb.pool import Pool
from tests.component.test_tcp_forwarder import service_for

DEADLINE = 10.0
BUFFER = 4096
"""The relay's smallest buffer_size (bytes): a burst reads BURST * BUFFER."""


class Talker:
    """A backend that sends ``size`` bytes as soon as it accepts, in one
    write, then holds the connection open until the client closes."""

    def __init__(self, size: int) -> None:
        self.data = bytes(i % 251 for i in range(size))
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.data)
            await writer.drain()
            await reader.read()  # open until the client's end
        except ConnectionError:
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[tuple[str, int]]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            host, port = self.server.sockets[0].getsockname()[:2]
            yield host, port
        finally:
            self.server.close()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def relay_to(backend: tuple[str, int], splice: bool) -> AsyncIterator[tuple[str, int]]:
    loop = RelayLoop(ForwardingConfig(splice=splice, buffer_size=BUFFER))
    loop.start()
    pool = Pool(service_for([backend]))
    pool.set_up(pool.backends[0].key, True)
    fwd = RelayForwarder(pool.service, pool, loop, bind_host="127.0.0.1", bind_port=0)
    try:
        yield await fwd.start()
        fwd.stop_accepting()
        assert await fwd.wait_idle(DEADLINE)
    finally:
        fwd.abort_all()
        loop.stop()


async def received(address: tuple[str, int], size: int) -> bytes:
    """Connect, send nothing, read ``size`` bytes, close."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        async with asyncio.timeout(DEADLINE):
            return await reader.readexactly(size)
    finally:
        writer.close()


@pytest.mark.parametrize("splice", [False, True], ids=["copy", "splice"])
async def test_bytes_left_after_a_burst_of_reads_still_arrive(splice: bool) -> None:
    # Far more than one burst, in the relay's socket buffer at once, and
    # nothing more coming: no later edge would report the rest.
    talker = Talker(16 * BURST * BUFFER)
    async with talker.serving() as backend, relay_to(backend, splice) as address:
        assert await received(address, len(talker.data)) == talker.data


async def test_a_backend_that_speaks_first_is_heard_on_every_connection() -> None:
    # Its greeting may come with the connect's own report (a busy relay
    # thread): that report is the only one for those bytes.
    talker = Talker(200)
    async with talker.serving() as backend, relay_to(backend, splice=False) as address:
        for _ in range(5):  # bounded: 5 rounds of 40 connections at once
            got = await asyncio.gather(*(received(address, 200) for _ in range(40)))
            assert all(g == talker.data for g in got)
