"""The relay's byte pump copies short exchanges and splices bulk transfers
(HAProxy's splice-auto): a direction switches to splice after a read that
fills the buffer; a short read with the peer's FIN ends it at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from anycast_lb.config import ForwardingConfig
from anycast_lb.forward.relay import HAVE_SPLICE, RelayForwarder, RelayLoop
from anycast_lb.pool import Pool
from tests.component.test_tcp_forwarder import service_for

DEADLINE = 10.0
BULK = 4 * 1024 * 1024
"""Bytes of a bulk answer: far beyond one read of the pump (64 KiB)."""

pytestmark = pytest.mark.skipif(not HAVE_SPLICE, reason="the platform has no splice")


class AnswerBackend:
    """Reads one line, answers ``size`` bytes and closes at once (the
    answer and the FIN leave together)."""

    def __init__(self, size: int) -> None:
        self.answer = bytes(i % 251 for i in range(size))
        self.server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readline()
            writer.write(self.answer)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def loop() -> AsyncIterator[RelayLoop]:
    relay = RelayLoop(ForwardingConfig(splice=True))
    relay.start()
    yield relay
    relay.stop()


async def exchange(loop: RelayLoop, size: int) -> tuple[bytes, bytes, Pool]:
    """One connection through a relay forwarder to an ``AnswerBackend`` of
    ``size`` bytes: (the answer expected, the bytes received, the pool)."""
    backend = AnswerBackend(size)
    address = await backend.start()
    pool = Pool(service_for([address]))
    pool.set_up(pool.backends[0].key, True)
    fwd = RelayForwarder(pool.service, pool, loop, bind_host="127.0.0.1", bind_port=0)
    try:
        reader, writer = await asyncio.open_connection(*await fwd.start())
        writer.write(b"GET / HTTP/1.0\r\n")
        async with asyncio.timeout(DEADLINE):
            received = await reader.read()
        writer.close()
        assert await fwd.wait_idle(DEADLINE)
    finally:
        fwd.stop_accepting()
        fwd.abort_all()
        await backend.close()
    return backend.answer, received, pool


async def test_short_answer_is_copied_whole_without_a_pipe(loop: RelayLoop) -> None:
    answer, received, pool = await exchange(loop, 22)
    assert received == answer
    assert pool.backends[0].bytes_out == len(answer)
    assert pool.backends[0].active_connections == 0
    assert loop.pipes_open == 0


async def test_bulk_answer_switches_to_splice_and_arrives_whole(loop: RelayLoop) -> None:
    answer, received, pool = await exchange(loop, BULK)
    assert received == answer
    assert pool.backends[0].bytes_out == BULK
    assert loop.pipes_open >= 1
