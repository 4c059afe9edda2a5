"""The TCP forwarders of both engines (asyncio ``TcpForwarder``, relay
``RelayForwarder``) against real backends on 127.0.0.1 (port 0 everywhere)."""

from __future__ import annotations

import asyncio
import gc
import random
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, cast

import pytest

from anycast_lb.applier import retune
from anycast_lb.config import ForwardingConfig, ServiceConfig
from anycast_lb.errors import BindError
from anycast_lb.forward import FlowKey
from anycast_lb.forward.connection import Rules
from anycast_lb.forward.proxy_protocol import IncompleteHeader, parse_v2_header
from anycast_lb.forward.relay import RelayForwarder, RelayLoop
from anycast_lb.forward.tcp import HIGH_WATER, TcpForwarder
from anycast_lb.limits import Slots
from anycast_lb.listeners import close_server
from anycast_lb.pool import Pool
from tests.waiting import wait_until

DEADLINE = 5.0


class LineBackend:
    """A real server answering each line with ``name:line`` and, once the
    client half-closes, one last ``name:eof`` line before closing.

    With ``proxy=True`` it first reads a PROXY v2 header and answers
    ``name:client=HOST:PORT local=HOST:PORT`` before echoing lines.
    """

    def __init__(self, name: str, proxy: bool = False) -> None:
        self.name = name
        self.proxy = proxy
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.address: tuple[str, int] = ("", 0)

    async def start(self, host: str = "127.0.0.1") -> tuple[str, int]:
        self.server = await asyncio.start_server(self._accepted, host, 0)
        sockname = self.server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self.address

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                  ) -> Coroutine[Any, Any, None] | None:
        # Registered at once, not when the handler task first runs: close()
        # must close a connection whose task has not started yet.
        if self.server is None or not self.server.is_serving():
            writer.close()  # accepted just before close()
            return None
        self.writers.add(writer)
        return self._handle(reader, writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tag = self.name.encode()
        try:
            if self.proxy:
                data = b""
                while True:
                    try:
                        header = parse_v2_header(data)
                        break
                    except IncompleteHeader:
                        chunk = await reader.read(1)
                        if not chunk:
                            return
                        data += chunk
                writer.write(tag + f":client={header.client} local={header.local}\n".encode())
            while line := await reader.readline():
                writer.write(tag + b":" + line)
            writer.write(tag + b":eof\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.writers.discard(writer)

    async def close(self) -> None:
        assert self.server is not None
        await close_server(self.server)
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()


def service_for(addresses: list[tuple[str, int]], **extra: Any) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "name": "web",
            "vip": "127.0.0.1",
            "port": 80,
            "protocol": "tcp",
            "backends": [{"address": host, "port": port} for host, port in addresses],
            **extra,
        }
    )


def closed_port() -> socket.socket:
    """A socket bound to a port but not listening: connecting to it is refused.
    Keep it open for the test so no one else takes the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


AnyForwarder = TcpForwarder | RelayForwarder


class Rig:
    """A forwarder of one engine in front of the given backends, all marked up."""

    def __init__(self, engine: str, forwarding: ForwardingConfig | None = None) -> None:
        self.engine = engine
        self.relay: RelayLoop | None = None
        if engine != "asyncio":
            self.relay = RelayLoop(forwarding or ForwardingConfig(splice=engine == "relay"))
            self.relay.start()
        self.forwarders: list[AnyForwarder] = []
        self.backends: list[LineBackend] = []

    def make(self, pool: Pool, bind_host: str | None = "127.0.0.1", bind_port: int | None = 0,
             **kwargs: Any) -> AnyForwarder:
        fwd: AnyForwarder
        if self.relay is None:
            fwd = TcpForwarder(pool.service, pool, bind_host=bind_host, bind_port=bind_port)
        else:
            fwd = RelayForwarder(pool.service, pool, self.relay, bind_host=bind_host,
                                 bind_port=bind_port, **kwargs)
        self.forwarders.append(fwd)
        return fwd

    async def backend(self, name: str, proxy: bool = False) -> tuple[str, int]:
        backend = LineBackend(name, proxy)
        self.backends.append(backend)
        return await backend.start()

    async def forwarder(
        self, addresses: list[tuple[str, int]], up: bool = True, **extra: Any
    ) -> tuple[AnyForwarder, Pool, tuple[str, int]]:
        pool = Pool(service_for(addresses, **extra))
        if up:
            for backend in pool.backends:
                pool.set_up(backend.key, True)
        fwd = self.make(pool)
        return fwd, pool, await fwd.start()

    async def close(self) -> None:
        try:
            for fwd in self.forwarders:
                fwd.stop_accepting()
                fwd.abort_all()
                assert await fwd.wait_idle(DEADLINE)
            for backend in self.backends:
                await backend.close()
        finally:
            if self.relay is not None:
                self.relay.stop()


ENGINES = ("asyncio", "relay", "relay-copy")
"""relay-copy: the relay engine with ``splice: false`` (the portable path)."""


@pytest.fixture(params=ENGINES)
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    rig = Rig(request.param)
    yield rig
    await rig.close()


@pytest.fixture
def logged_errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The events logged at error level during the test (still logged)."""
    from anycast_lb import log

    errors: list[str] = []
    real_error = log.error

    def record(event: str, /, **fields: object) -> None:
        errors.append(event)
        real_error(event, **fields)

    monkeypatch.setattr(log, "error", record)
    return errors


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(DEADLINE):
        return await reader.read()


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True when the connection ends (EOF or reset) within the deadline."""
    try:
        async with asyncio.timeout(DEADLINE):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


async def refused_or_closed(address: tuple[str, int]) -> bool:
    """Connect, then True when the forwarder ends the connection. The relay
    engine resets so fast that the reset can beat asyncio's own check that
    the connect completed: that counts too."""
    try:
        reader, writer = await asyncio.open_connection(*address)
    except ConnectionResetError:
        return True
    try:
        return await closed_by_peer(reader)
    finally:
        writer.close()


async def test_traffic_flows_both_ways_and_is_counted(rig: Rig) -> None:
    b1 = await rig.backend("b1")
    fwd, pool, address = await rig.forwarder([b1])
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"hello\n")
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"b1:hello\n"
    writer.write(b"again\n")
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"b1:again\n"
    backend = pool.backends[0]
    assert fwd.active == 1
    assert backend.active_connections == 1
    assert backend.connections_total == 1
    writer.write_eof()
    assert await read_to_eof(reader) == b"b1:eof\n"
    writer.close()
    assert await fwd.wait_idle(DEADLINE)
    assert backend.active_connections == 0
    assert backend.bytes_in == len(b"hello\nagain\n")
    assert backend.bytes_out == len(b"b1:hello\nb1:again\nb1:eof\n")
    assert fwd.accepted == 1 and fwd.rejected == 0


async def test_half_close_lets_the_backend_keep_sending(rig: Rig) -> None:
    b1 = await rig.backend("b1")
    _, _, address = await rig.forwarder([b1])
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"one\ntwo\n")
    writer.write_eof()  # client -> backend direction finished
    # The backend sees EOF only through the forwarder's write_eof, and still
    # answers afterwards; the client then sees the backend's close.
    assert await read_to_eof(reader) == b"b1:one\nb1:two\nb1:eof\n"
    writer.close()


async def test_backend_half_close_keeps_client_direction_open(rig: Rig) -> None:
    """The backend sends EOF first; the client can still send to it."""
    received = bytearray()
    got_all = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner\n")
        writer.write_eof()
        received.extend(await reader.read())
        got_all.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        fwd, _, address = await rig.forwarder([server.sockets[0].getsockname()[:2]])
        reader, writer = await asyncio.open_connection(*address)
        assert await read_to_eof(reader) == b"banner\n"
        writer.write(b"late data")
        writer.write_eof()
        await asyncio.wait_for(got_all.wait(), DEADLINE)
        assert bytes(received) == b"late data"
        assert await fwd.wait_idle(DEADLINE)
        writer.close()
    finally:
        server.close()


class FloodingBackend(asyncio.Protocol):
    """Writes ``total`` bytes as fast as its transport's flow control allows."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.written = 0
        self.paused = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self._pump()

    def _pump(self) -> None:
        assert self.transport is not None
        chunk = b"x" * 65536
        while self.written < self.total and not self.paused.is_set():
            self.transport.write(chunk)
            self.written += len(chunk)
        if self.written >= self.total:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused.set()

    def resume_writing(self) -> None:
        self.paused.clear()
        self._pump()


async def test_slow_client_pauses_the_backend_not_memory(rig: Rig) -> None:
    total = 64 * 1024 * 1024
    loop = asyncio.get_running_loop()
    flooders: list[FloodingBackend] = []

    def factory() -> FloodingBackend:
        flooders.append(FloodingBackend(total))
        return flooders[-1]

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        fwd, pool, address = await rig.forwarder([server.sockets[0].getsockname()[:2]])
        reader, writer = await asyncio.open_connection(*address, limit=2**16)
        # The client reads nothing: kernel buffers fill, the forwarder's
        # client-side buffer passes its high-water mark, it stops reading from
        # the backend, and the backend's own writes block.
        await wait_until(lambda: bool(flooders) and flooders[0].paused.is_set())
        if isinstance(fwd, TcpForwarder):
            (relay,) = fwd._relays
            assert relay.client is not None and relay.upstream is not None
            await wait_until(lambda: not relay.upstream.is_reading())  # type: ignore[union-attr]
            assert relay.client.get_write_buffer_size() <= HIGH_WATER + 256 * 1024
        else:
            (conn,) = fwd._conns
            # The backend is no longer read; what is held is one read.
            await wait_until(lambda: conn.down is not None and conn.down.pending > 0
                             and not conn.bmask & select.EPOLLIN)
            assert conn.down is not None and conn.down.pending <= fwd.loop.buffer_size
        assert flooders[0].written < total // 2
        # Nothing is lost: the client now reads everything.
        received = 0
        async with asyncio.timeout(30):
            while chunk := await reader.read(1 << 20):
                received += len(chunk)
        assert received == total
        assert pool.backends[0].bytes_out == total
        writer.close()
    finally:
        server.close()


async def test_slow_backend_pauses_the_client(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    sinks: list[asyncio.Transport] = []

    class Sink(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            stream = cast(asyncio.Transport, transport)
            stream.pause_reading()  # never reads
            # uvloop starts reading after connection_made returns, whatever
            # was paused inside it: pause again once it has.
            asyncio.get_running_loop().call_soon(stream.pause_reading)
            sinks.append(stream)

    server = await loop.create_server(Sink, "127.0.0.1", 0)
    try:
        fwd, _pool, address = await rig.forwarder([server.sockets[0].getsockname()[:2]])
        flooder = FloodingBackend(256 * 1024 * 1024)  # plays the client here
        await loop.create_connection(lambda: flooder, *address)
        await wait_until(lambda: fwd.active == 1)
        if isinstance(fwd, TcpForwarder):
            (relay,) = fwd._relays
            # Connected, and then the backend's buffer passed its mark: the
            # forwarder stopped reading the client, whose own writes block.
            await wait_until(
                lambda: relay.upstream is not None
                and relay.upstream.get_write_buffer_size() > 0
                and not relay.client.is_reading()  # type: ignore[union-attr]
                and flooder.paused.is_set()
                and len(sinks) == 1
            )
            assert relay.client is not None and relay.upstream is not None
            assert relay.upstream.get_write_buffer_size() <= HIGH_WATER + 256 * 1024
        else:
            (conn,) = fwd._conns
            # The kernel completes the handshake and takes bytes before the
            # sink's server accepts: wait for the sink too, so it is closed.
            await wait_until(lambda: conn.up is not None and conn.up.pending > 0
                             and not conn.cmask & select.EPOLLIN and flooder.paused.is_set()
                             and len(sinks) == 1)
            assert conn.up is not None and conn.up.pending <= fwd.loop.buffer_size
        assert flooder.written < 128 * 1024 * 1024
        assert flooder.transport is not None
        flooder.transport.abort()
    finally:
        server.close()
        for transport in sinks:
            transport.abort()


async def test_refused_candidate_is_skipped(rig: Rig) -> None:
    dead = closed_port()
    try:
        live = await rig.backend("live")
        dead_address = dead.getsockname()
        # Round robin makes the first connection try the first backend first.
        _fwd, pool, address = await rig.forwarder([dead_address, live], balance="round_robin")
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"hi\n")
        assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"live:hi\n"
        assert pool.backends[0].connect_failures == 1
        assert pool.backends[1].connect_failures == 0
        assert pool.backends[0].connections_total == 0
        assert pool.backends[1].connections_total == 1
        writer.close()
    finally:
        dead.close()


def stalled_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback listener whose accept queue is full: further SYNs are
    dropped, so a connect to it times out (and traffic stays on loopback)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers: list[socket.socket] = []
    for _ in range(8):
        filler = socket.socket()
        filler.settimeout(0.2)
        fillers.append(filler)
        try:
            filler.connect(listener.getsockname())
        except TimeoutError:
            return listener, fillers
    pytest.fail("could not fill the listen backlog")


async def test_connect_timeout_moves_to_the_next_candidate(rig: Rig) -> None:
    live = await rig.backend("live")
    stalled, fillers = stalled_listener()
    try:
        _fwd, pool, address = await rig.forwarder(
            [stalled.getsockname(), live], balance="round_robin", connect_timeout=0.2
        )
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"hi\n")
        assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"live:hi\n"
        assert time.monotonic() - started >= 0.19  # it did wait for the timeout
        assert pool.backends[0].connect_failures == 1
        writer.close()
    finally:
        for sock in (*fillers, stalled):
            sock.close()


async def test_backend_reset_before_answering_is_redispatched(rig: Rig) -> None:
    # A backend whose process died with connections in its listen backlog:
    # the handshake completed, then the kernel resets them.
    dying = socket.socket()
    dying.bind(("127.0.0.1", 0))
    dying.listen(16)
    live = await rig.backend("live")
    # least_conn with equal counts keeps configuration order: dying first.
    fwd, pool, address = await rig.forwarder([dying.getsockname(), live], balance="least_conn")
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"first\n")
    await wait_until(lambda: pool.backends[0].connections_total == 1)
    await wait_until(lambda: fwd.active == 1)
    dying.close()  # resets the queued, never accepted connection
    writer.write(b"second\n")
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"live:first\n"
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"live:second\n"
    assert pool.backends[0].connect_failures == 1
    assert pool.backends[1].connections_total == 1
    writer.close()


async def test_backend_reset_after_answering_closes_the_client(rig: Rig) -> None:
    answered = asyncio.Event()

    async def answer_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"once\n")
        await writer.drain()
        answered.set()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    server = await asyncio.start_server(answer_then_reset, "127.0.0.1", 0)
    live = await rig.backend("live")
    _fwd, pool, address = await rig.forwarder(
        [server.sockets[0].getsockname()[:2], live], balance="least_conn")
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"x\n")
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"once\n"
    assert await closed_by_peer(reader)  # no replay once the backend answered
    assert pool.backends[1].connections_total == 0
    writer.close()
    server.close()
    await server.wait_closed()


async def test_no_backend_up_closes_the_client(rig: Rig) -> None:
    b1 = await rig.backend("b1")
    fwd, pool, address = await rig.forwarder([b1], up=False)
    assert await refused_or_closed(address)
    assert fwd.rejected_no_backend == 1
    assert pool.backends[0].connections_total == 0
    assert await fwd.wait_idle(DEADLINE)


async def test_every_candidate_failing_closes_the_client(rig: Rig) -> None:
    dead = closed_port()
    try:
        fwd, pool, address = await rig.forwarder([dead.getsockname()])
        assert await refused_or_closed(address)
        assert fwd.rejected_connect_failed == 1
        assert pool.backends[0].connect_failures == 1
        assert await fwd.wait_idle(DEADLINE)
    finally:
        dead.close()


async def test_proxy_protocol_header_carries_the_client(rig: Rig) -> None:
    b1 = await rig.backend("b1", proxy=True)
    _, _, address = await rig.forwarder([b1], proxy_protocol=True)
    reader, writer = await asyncio.open_connection(*address)
    # Sent before the forwarder has connected to the backend: the header must
    # still come first.
    writer.write(b"ping\n")
    client = writer.get_extra_info("sockname")
    first = await asyncio.wait_for(reader.readline(), DEADLINE)
    assert first == f"b1:client={(client[0], client[1])} local={address}\n".encode()
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"b1:ping\n"
    writer.close()


async def test_a_live_retune_reaches_new_connections(rig: Rig) -> None:
    """A config apply changing ``proxy_protocol`` and ``connect_timeout``
    (``applier.retune``): connections opened after it send the header."""
    b1 = await rig.backend("b1", proxy=True)
    fwd, _, address = await rig.forwarder([b1])
    retune(fwd, fwd.service.model_copy(update={"proxy_protocol": True, "connect_timeout": 0.5}))
    assert fwd.rules == Rules(0.5, True)
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"ping\n")
    client = writer.get_extra_info("sockname")
    first = await asyncio.wait_for(reader.readline(), DEADLINE)
    assert first == f"b1:client={(client[0], client[1])} local={address}\n".encode()
    writer.close()


async def test_idle_connection_is_closed(rig: Rig) -> None:
    b1 = await rig.backend("b1")
    fwd, pool, address = await rig.forwarder([b1], idle_timeout=0.2)
    reader, writer = await asyncio.open_connection(*address)
    # Traffic every 0.05 s for longer than the idle timeout keeps it open.
    for i in range(8):
        if i:
            await asyncio.sleep(0.05)  # pacing, not readiness
        writer.write(b"%d\n" % i)
        assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"b1:%d\n" % i
    silent_since = time.monotonic()
    assert await closed_by_peer(reader)
    assert time.monotonic() - silent_since >= 0.2 - 0.01
    assert await fwd.wait_idle(DEADLINE)
    assert pool.backends[0].active_connections == 0
    writer.close()


async def test_stop_accepting_keeps_established_connections(rig: Rig) -> None:
    b1 = await rig.backend("b1")
    fwd, _, address = await rig.forwarder([b1])
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"before\n")
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"b1:before\n"
    assert fwd.listening
    fwd.stop_accepting()
    assert not fwd.listening
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*address)
    writer.write(b"after\n")
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"b1:after\n"
    assert not await fwd.wait_idle(0.05)
    writer.write_eof()
    assert await read_to_eof(reader) == b"b1:eof\n"
    assert await fwd.wait_idle(DEADLINE)
    assert fwd.active == 0
    writer.close()


async def test_abort_all_closes_every_connection(rig: Rig) -> None:
    b1 = await rig.backend("b1")
    fwd, pool, address = await rig.forwarder([b1])
    streams = [await asyncio.open_connection(*address) for _ in range(3)]
    for reader, writer in streams:
        writer.write(b"x\n")
        assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"b1:x\n"
    assert fwd.active == 3
    fwd.abort_all()
    for reader, writer in streams:
        assert await closed_by_peer(reader)
        writer.close()
    assert await fwd.wait_idle(DEADLINE)
    assert pool.backends[0].active_connections == 0


class AdoptCancelled(TcpForwarder):
    """The asyncio engine with its next ``cancels`` adopt tasks cancelled in
    the loop turn that creates them, before their first step: what a loop
    teardown or a stop right after an accept does."""

    cancels = 1

    def _spawn_adopt(self, relay: Any, conn: socket.socket) -> None:
        before = set(self._tasks)
        super()._spawn_adopt(relay, conn)
        if self.cancels > 0:
            self.cancels -= 1
            for task in self._tasks - before:
                task.cancel()


async def test_adopt_cancelled_before_it_runs_closes_the_socket_and_frees_the_slot() -> None:
    backend = LineBackend("b1")
    pool = Pool(service_for([await backend.start()]))
    for b in pool.backends:
        pool.set_up(b.key, True)
    slots = Slots(1, 1)
    fwd = AdoptCancelled(pool.service, pool, "127.0.0.1", 0, slots=slots)
    address = await fwd.start()
    try:
        reader, writer = await asyncio.open_connection(*address)
        try:
            assert await closed_by_peer(reader)  # the accepted socket was closed
        finally:
            writer.close()
        await wait_until(lambda: slots.used == 0, DEADLINE, what="the slot given back")
        assert slots.sources is not None and len(slots.sources) == 0
        assert fwd.accepted == 0 and fwd.active == 0
        # The one slot serves the next client (a leaked slot refuses it: "cap").
        reader, writer = await asyncio.open_connection(*address)
        try:
            writer.write(b"next\n")
            assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"b1:next\n"
        finally:
            writer.close()
        assert sum(fwd.refused().values()) == 0
    finally:
        fwd.stop_accepting()
        fwd.abort_all()
        assert await fwd.wait_idle(DEADLINE)
        await backend.close()


async def test_bind_error_names_the_address(rig: Rig) -> None:
    b1 = await rig.backend("b1")
    _, pool, address = await rig.forwarder([b1])
    second = rig.make(pool, bind_host=address[0], bind_port=address[1])
    with pytest.raises(BindError, match=f"127.0.0.1:{address[1]}") as info:
        await second.start()
    assert isinstance(info.value.__cause__, OSError)
    assert not second.listening


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_vip_with_proxy_header(rig: Rig) -> None:
    b1 = await rig.backend("b1", proxy=True)
    pool = Pool(service_for([b1], vip="::1", proxy_protocol=True))
    pool.set_up(pool.backends[0].key, True)
    fwd = rig.make(pool, bind_host=None)  # binds the VIP itself
    host, port = await fwd.start()
    assert host == "::1"
    reader, writer = await asyncio.open_connection(host, port)
    client = writer.get_extra_info("sockname")
    line = await asyncio.wait_for(reader.readline(), DEADLINE)
    assert line == f"b1:client={('::1', client[1])} local={('::1', port)}\n".encode()
    writer.close()


# -- relay engine only: flow survival's listener and flow hooks --------------


@pytest.fixture
async def relay_rig() -> AsyncIterator[Rig]:
    rig = Rig("relay")
    yield rig
    await rig.close()


async def test_wildcard_listener_dispatches_by_vip_and_refuses_other_addresses(
    relay_rig: Rig,
) -> None:
    """Flow survival binds the wildcard address; each accepted connection
    goes to the service of its local address, and one to a local address
    that is no VIP is reset."""
    rig = relay_rig
    a, b = await rig.backend("a"), await rig.backend("b")
    forwarders = []
    # The first service binds the wildcard address on port 0; the second
    # joins that listener on the port read back (binding it anew would fail:
    # no SO_REUSEPORT), so no port is picked beforehand.
    port = 0
    for name, vip, backend in (("web-a", "127.0.0.10", a), ("web-b", "127.0.0.20", b)):
        pool = Pool(ServiceConfig.model_validate({
            "name": name, "vip": vip, "port": 80,
            "backends": [{"address": backend[0], "port": backend[1]}]}))
        pool.set_up(pool.backends[0].key, True)
        fwd = rig.make(pool, bind_host=None, bind_port=port, wildcard=True)
        host, bound = await fwd.start()
        assert host == "0.0.0.0" and bound != 0 and port in (0, bound)
        port = bound
        forwarders.append(fwd)
    for vip, tag in (("127.0.0.10", b"a"), ("127.0.0.20", b"b")):
        reader, writer = await asyncio.open_connection(vip, port)
        writer.write(b"hi\n")
        assert await asyncio.wait_for(reader.readline(), DEADLINE) == tag + b":hi\n"
        writer.close()
    assert await refused_or_closed(("127.0.0.30", port))
    assert [f.accepted for f in forwarders] == [1, 1]
    # One service stops accepting; the shared listener keeps serving the other.
    forwarders[0].stop_accepting()
    assert await refused_or_closed(("127.0.0.10", port))
    reader, writer = await asyncio.open_connection("127.0.0.20", port)
    writer.write(b"still\n")
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"b:still\n"
    writer.close()


async def test_flow_hook_sees_open_and_close_and_abort_flows_resets(relay_rig: Rig) -> None:
    rig = relay_rig
    b1 = await rig.backend("b1")
    events: list[tuple[bool, FlowKey]] = []
    pool = Pool(service_for([b1]))
    pool.set_up(pool.backends[0].key, True)
    fwd = rig.make(pool, on_flow=lambda opened, key: events.append((opened, key)))
    assert isinstance(fwd, RelayForwarder)
    address = await fwd.start()
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"x\n")
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"b1:x\n"
    client = writer.get_extra_info("sockname")
    key = (client[0], client[1], address[0], address[1])
    assert events == [(True, key)]
    assert fwd.abort_flows([("127.0.0.1", 1, address[0], address[1])]) == 0
    assert fwd.abort_flows([key]) == 1
    assert await closed_by_peer(reader)
    writer.close()
    await wait_until(lambda: events == [(True, key), (False, key)])
    assert await fwd.wait_idle(DEADLINE)


async def test_flow_hook_with_no_backend_up_resets_and_sees_no_flow(
    relay_rig: Rig, logged_errors: list[str]
) -> None:
    """A connection refused for want of a backend was never a flow: the hook
    hears nothing, the slot is given back and the data path logs no error;
    the next, with a backend up, opens and closes a flow."""
    rig = relay_rig
    b1 = await rig.backend("b1")
    events: list[tuple[bool, FlowKey]] = []
    pool = Pool(service_for([b1]))
    fwd = rig.make(pool, on_flow=lambda opened, key: events.append((opened, key)))
    assert isinstance(fwd, RelayForwarder) and rig.relay is not None
    address = await fwd.start()
    assert await refused_or_closed(address)
    assert fwd.rejected_no_backend == 1
    await wait_until(lambda: rig.relay is not None and rig.relay.slots.used == 0)
    pool.set_up(pool.backends[0].key, True)
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"x\n")
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"b1:x\n"
    writer.close()
    client = writer.get_extra_info("sockname")
    key = (client[0], client[1], address[0], address[1])
    await wait_until(lambda: events == [(True, key), (False, key)])
    assert await fwd.wait_idle(DEADLINE)
    assert logged_errors == []


async def test_accepted_sockets_inherit_keepalive_and_user_timeout(relay_rig: Rig) -> None:
    """Socket hygiene for flow survival: dead clients are noticed."""
    rig = relay_rig
    b1 = await rig.backend("b1")
    fwd, _, address = await rig.forwarder([b1])
    assert isinstance(fwd, RelayForwarder)
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"x\n")
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"b1:x\n"
    (conn,) = fwd._conns
    sock = conn.client
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    writer.close()


async def test_upload_past_the_replay_limit_reaches_a_silent_backend(rig: Rig) -> None:
    """A client that sends more than REPLAY_LIMIT before the backend's first
    byte: every byte arrives, in order."""
    received = bytearray()
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.read())
        done.set()
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    try:
        _, _, address = await rig.forwarder([server.sockets[0].getsockname()[:2]])
        payload = bytes(range(256)) * 4096  # 1 MiB
        _, writer = await asyncio.open_connection(*address)
        writer.write(payload)
        writer.write_eof()
        await asyncio.wait_for(done.wait(), DEADLINE)
        assert bytes(received) == payload
        writer.close()
    finally:
        server.close()


async def test_chaos_of_resets_and_early_closes_leaves_no_error(
    rig: Rig, logged_errors: list[str]
) -> None:
    """Backends that reset, close before answering or answer; clients that
    reset, half-close or not; abort_all in the middle. Every connection ends,
    nothing is left open and the data path logs no error (a relay bug shows
    up as ``forward.relay_error``). Seeded, bounded: 400 connections."""
    errors = logged_errors
    rnd = random.Random(7)

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fate = rnd.random()
        try:
            if fate < 0.2:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if fate >= 0.3:
                line = await reader.readline()
                writer.write(b"ok:" + line)
                await writer.drain()
                if fate >= 0.65:
                    await reader.read()
        except OSError:
            pass
        finally:
            writer.close()

    servers = [await asyncio.start_server(backend, "127.0.0.1", 0) for _ in range(3)]
    try:
        fwd, _, address = await rig.forwarder([s.sockets[0].getsockname()[:2] for s in servers],
                                              connect_timeout=0.5)

        async def client(i: int) -> None:
            fate = rnd.random()
            try:
                reader, writer = await asyncio.open_connection(*address)
            except OSError:
                return
            try:
                if fate < 0.1:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                writer.write(b"hello %d\n" % i)
                async with asyncio.timeout(DEADLINE):
                    if fate >= 0.5:
                        await reader.readline()  # an answer, or EOF/reset
                    writer.write_eof()
                    await reader.read()
            except OSError:
                pass
            finally:
                writer.close()

        for batch in range(8):
            t0 = time.monotonic()
            await asyncio.gather(*(client(batch * 50 + i) for i in range(50)))
            print("batch", batch, time.monotonic() - t0)
            if batch == 4:
                fwd.abort_all()
        assert await fwd.wait_idle(DEADLINE)
        assert fwd.accepted >= 380
        assert errors == []
        # Still serving afterwards.
        live = await rig.backend("live")
        _fwd2, _, address2 = await rig.forwarder([live])
        reader, writer = await asyncio.open_connection(*address2)
        writer.write(b"after\n")
        assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"live:after\n"
        writer.close()
    finally:
        for server in servers:
            server.close()


async def test_two_backends_resetting_in_a_row_are_both_redispatched(rig: Rig) -> None:
    """The replayed bytes are kept for the next redispatch too."""
    dying = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        dying.append(sock)
    live = await rig.backend("live")
    _fwd, pool, address = await rig.forwarder(
        [dying[0].getsockname(), dying[1].getsockname(), live], balance="least_conn")
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"first\n")
    await wait_until(lambda: pool.backends[0].connections_total == 1)
    dying[0].close()  # resets the queued connection: redispatch to backend 1
    await wait_until(lambda: pool.backends[1].connections_total == 1)
    dying[1].close()  # resets again: redispatch to live, with the same replay
    assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"live:first\n"
    assert pool.backends[0].connect_failures == 1
    assert pool.backends[1].connect_failures == 1
    writer.close()


@pytest.fixture(autouse=True)
def _collect_garbage_here() -> Iterator[None]:
    """Collect each test's garbage in its own teardown, so an unclosed
    transport or socket is reported against the test that leaked it."""
    yield
    gc.collect()
