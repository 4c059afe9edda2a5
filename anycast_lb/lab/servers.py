"""Small real backend servers for the lab, run inside a backend namespace.

::

    python -m anycast_lb.lab.servers --ns alb-be1 --name be1 \\
        --http 8080 --tcp 9000 --udp 9000

- HTTP (``--http``): ``GET /`` answers ``NAME PEER\\n``, ``GET /healthz``
  answers ``ok\\n``; any other path 404. HTTP/1.0 style, one request per
  connection.
- TCP echo (``--tcp``): first sends ``NAME PEER\\n``, then echoes every line.
- UDP echo (``--udp``): answers each datagram with ``NAME PEER `` + payload.

- relay (``--relay VIP:PORT=ADDR:PORT,ADDR:PORT``): a minimal round-robin TCP
  relay, used only by the lab's ``static`` mode (plain ExaBGP, no node) to
  carry traffic while testing the topology itself.

PEER is the source address of the connection the backend received: the
forwarding node's address on the backend LAN, which is how the lab's client
learns which node carried a flow. Refuses to run outside ``--ns``, except
as a demo backend bound to a loopback address (``--bind 127.0.0.11``), which
only loopback clients can reach.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys
from typing import cast

from anycast_lb.errors import UnsafeLab
from anycast_lb.lab.netns import require_namespace


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if peer else "?"


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


def http_handler(name: str):  # type: ignore[no-untyped-def]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = request.split(b" ", 2)
            path = parts[1].decode("ascii", "replace") if len(parts) > 1 else ""
            if path == "/":
                status, body = "200 OK", f"{name} {_peer(writer)}\n"
            elif path == "/healthz":
                status, body = "200 OK", "ok\n"
            else:
                status, body = "404 Not Found", "not found\n"
            data = body.encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
                         f"Content-Length: {len(data)}\r\nX-Backend: {name}\r\n"
                         f"Connection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            await _close(writer)
    return handle


def echo_handler(name: str):  # type: ignore[no-untyped-def]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(f"{name} {_peer(writer)}\n".encode())
            await writer.drain()
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except OSError:
            pass
        finally:
            await _close(writer)
    return handle


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        await _close(writer)


def relay_handler(targets: list[tuple[str, int]]):  # type: ignore[no-untyped-def]
    counter = iter(range(1 << 62))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = targets[next(counter) % len(targets)]
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), 1.0)
        except (TimeoutError, OSError):
            await _close(writer)
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    return handle


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport does not subclass asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(f"{self.name} {addr[0]} ".encode() + data, addr)


async def serve(name: str, http: int | None, tcp: int | None, udp: int | None,
                relay: str | None = None, bind: str = "0.0.0.0") -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers: list[asyncio.base_events.Server] = []
    if http:
        servers.append(await asyncio.start_server(http_handler(name), bind, http,
                                                  backlog=1024, reuse_address=True))
    if tcp:
        servers.append(await asyncio.start_server(echo_handler(name), bind, tcp,
                                                  backlog=1024, reuse_address=True))
    if relay:
        listen, _, targets = relay.partition("=")
        host, port = _hostport(listen)
        servers.append(await asyncio.start_server(
            relay_handler([_hostport(t) for t in targets.split(",")]), host, port,
            backlog=1024, reuse_address=True))
    transport = None
    if udp:
        transport, _ = await loop.create_datagram_endpoint(lambda: UdpEcho(name),
                                                           local_addr=(bind, udp))
    print(f"listening name={name} http={http} tcp={tcp} udp={udp}", file=sys.stderr,
          flush=True)
    await stop.wait()
    for server in servers:
        server.close()
    if transport is not None:
        transport.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anycast_lb.lab.servers")
    parser.add_argument("--ns", help="lab namespace this must run in (required unless "
                        "--bind is a loopback address)")
    parser.add_argument("--bind", default="0.0.0.0",
                        help="address to listen on (default 0.0.0.0, inside --ns)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--http", type=int)
    parser.add_argument("--tcp", type=int)
    parser.add_argument("--udp", type=int)
    parser.add_argument("--relay", help="LISTEN=TARGET[,TARGET]: round-robin TCP relay")
    args = parser.parse_args(argv)
    try:
        loopback = ipaddress.ip_address(args.bind).is_loopback
    except ValueError:
        parser.error(f"--bind {args.bind!r} is not an IP address")
    if args.relay and args.ns is None:
        parser.error("--relay needs --ns")  # a relay sends traffic: lab namespaces only
    if args.ns is not None or not loopback:
        try:
            require_namespace(args.ns or "")
        except UnsafeLab as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    coro = serve(args.name, args.http, args.tcp, args.udp, args.relay, args.bind)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
