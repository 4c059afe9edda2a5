"""Small real backend servers for component tests, on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import socket
import struct

from anycast_lb.listeners import close_server


class TcpNameEcho:
    """Sends ``NAME\\n`` on connect, then echoes. ``stop()`` closes the
    listener and every connection, like a crashed backend: those it
    answered with a FIN, the others (accepted, not answered yet: for a
    process, still in its listen backlog) with a reset.

    Its port is held from the first ``start`` until ``stop(release=True)``
    by a second socket bound to it with SO_REUSEPORT that never listens:
    while stopped, connects are refused, and ``start`` again listens on the
    same port (no one else can have taken it meanwhile)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self._hold: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._answered: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.connections = 0

    async def start(self) -> int:
        if self._hold is None:
            self._hold = socket.socket()
            self._hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._hold.bind(("127.0.0.1", 0))
            self.port = self._hold.getsockname()[1]
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", self.port,
                                                  reuse_address=True, reuse_port=True)
        return self.port

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The connection is ours from here, not from the handler's first
        # step: stop() must close one whose handler has not run yet, and a
        # handler cancelled before its first step (loop teardown) never
        # reaches its finally; Python 3.11's start_server then leaves the
        # transport open (3.12 closes it), to warn when collected.
        if self._server is None or not self._server.is_serving():
            _reset(writer)  # accepted just before stop()
            return
        self._writers.add(writer)
        handler = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        handler.add_done_callback(lambda _: self._ended(writer))

    def _ended(self, writer: asyncio.StreamWriter) -> None:
        self._writers.discard(writer)
        self._answered.discard(writer)
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(self.name.encode() + b"\n")
            self._answered.add(writer)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def stop(self, release: bool = True) -> None:
        """Close the listener and every connection; ``release=False`` keeps
        the port for a later ``start``."""
        assert self._server is not None
        await close_server(self._server)
        for writer in list(self._writers):
            if writer in self._answered:
                writer.transport.abort()
            else:
                _reset(writer)
        await self._server.wait_closed()
        if release and self._hold is not None:
            self._hold.close()
            self._hold = None


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s connection with a reset (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already reset by the peer
    writer.transport.abort()


class UdpNameEcho(asyncio.DatagramProtocol):
    """Replies to each datagram with ``NAME:`` + the datagram."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        self.port = transport.get_extra_info("sockname")[1]
        return self.port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(self.name.encode() + b":" + data, addr)

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def tcp_request(port: int, payload: bytes = b"ping\n", timeout: float = 2.0) -> tuple[str, bytes]:
    """Connect, read the backend's name line, send ``payload``, read it back."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            name = (await reader.readline()).decode().strip()
            writer.write(payload)
            echoed = await reader.readexactly(len(payload))
            return name, echoed
        finally:
            writer.close()


async def udp_request(port: int, payload: bytes, timeout: float = 2.0) -> tuple[bytes, tuple[str, int]]:
    """Send one datagram; return the reply and the address it came from."""
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[tuple[bytes, tuple[str, int]]] = loop.create_future()

    class _Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not reply.done():
                reply.set_result((data, addr))

    transport, _ = await loop.create_datagram_endpoint(_Client, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(payload)
        async with asyncio.timeout(timeout):
            return await reply
    finally:
        transport.close()
