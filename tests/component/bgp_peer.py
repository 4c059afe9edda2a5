"""A minimal BGP peer on 127.0.0.0/8 for component tests: it accepts ExaBGP's
session, answers OPEN and KEEPALIVE, and records every UPDATE (RFC 4271
section 4; communities RFC 1997, extended RFC 4360, large RFC 8092). It
offers IPv4 and IPv6 unicast (RFC 4760 multiprotocol capability) and reads
IPv6 routes from MP_REACH_NLRI / MP_UNREACH_NLRI."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from dataclasses import dataclass, field

from anycast_lb.listeners import close_server

MARKER = b"\xff" * 16
OPEN, UPDATE, NOTIFICATION, KEEPALIVE = 1, 2, 3, 4
NEXT_HOP, COMMUNITIES, MP_REACH, MP_UNREACH, EXTENDED, LARGE = 3, 8, 14, 15, 16, 32
AFI_IPV6, SAFI_UNICAST = 2, 1
_HOLD_TIME = 3


@dataclass(frozen=True)
class Update:
    """One UPDATE as the peer saw it (``at``: time.monotonic())."""

    at: float
    announced: tuple[str, ...]
    withdrawn: tuple[str, ...]
    communities: tuple[str, ...]
    large_communities: tuple[str, ...] = ()
    extended_communities: tuple[bytes, ...] = ()
    """Each as its 8 raw octets (type, subtype, value)."""
    next_hops: tuple[str, ...] = ()
    """NEXT_HOP, then the MP_REACH_NLRI next hop(s), as text."""


@dataclass
class BgpPeer:
    """Listens on ``host`` port 0; ``port`` once started. ``sessions`` counts
    OPENs received (a restarted ExaBGP opens a second one); ``closed_at``
    holds the time each session ended."""

    host: str = "127.0.0.2"
    asn: int = 65000
    port: int = 0
    sessions: int = 0
    updates: list[Update] = field(default_factory=list)
    closed_at: list[float] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self._server = await asyncio.start_server(self._accepted, sock=sock)
        self.port = int(sock.getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Close the listener and every session (their reads then end)."""
        if self._server is not None:
            await close_server(self._server)
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def prefix_events(self, prefix: str) -> list[tuple[str, Update]]:
        """("announce" | "withdraw", update) for ``prefix``, in order."""
        out = []
        for u in self.updates:
            if prefix in u.announced:
                out.append(("announce", u))
            if prefix in u.withdrawn:
                out.append(("withdraw", u))
        return out

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The session is ours from here, not from its task's first step:
        # stop() must close one whose task has not run yet, and a task
        # cancelled before its first step never reaches its finally.
        if self._server is None or not self._server.is_serving():
            writer.close()  # accepted just before stop()
            return
        self._writers.add(writer)
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: (self._writers.discard(writer), writer.close()))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        keepalive: asyncio.Task[None] | None = None
        try:
            while True:
                header = await reader.readexactly(19)
                if header[:16] != MARKER:
                    return
                length, kind = struct.unpack("!HB", header[16:])
                body = await reader.readexactly(length - 19)
                if kind == OPEN:
                    self.sessions += 1
                    writer.write(self._open() + _message(KEEPALIVE, b""))
                    keepalive = asyncio.create_task(self._keepalives(writer))
                elif kind == UPDATE:
                    self.updates.append(_parse_update(body))
                elif kind == NOTIFICATION:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.closed_at.append(time.monotonic())
            if keepalive is not None:
                keepalive.cancel()
            writer.close()

    def _open(self) -> bytes:
        caps = (
            bytes([1, 4]) + struct.pack("!HBB", 1, 0, 1)  # multiprotocol: ipv4 unicast
            + bytes([1, 4]) + struct.pack("!HBB", AFI_IPV6, 0, SAFI_UNICAST)  # ipv6 unicast
            + bytes([65, 4]) + struct.pack("!I", self.asn)  # four-octet AS
        )
        params = bytes([2, len(caps)]) + caps
        body = struct.pack("!BHH4sB", 4, self.asn, _HOLD_TIME,
                           ipaddress.IPv4Address(self.host).packed, len(params)) + params
        return _message(OPEN, body)

    async def _keepalives(self, writer: asyncio.StreamWriter) -> None:
        for _ in range(600):  # bounded: at most 10 min of session
            await asyncio.sleep(1.0)
            writer.write(_message(KEEPALIVE, b""))


def _message(kind: int, body: bytes) -> bytes:
    return MARKER + struct.pack("!HB", 19 + len(body), kind) + body


def _prefixes(data: bytes, width: int = 4) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(data):
        bits = data[i]
        size = (bits + 7) // 8
        raw = data[i + 1:i + 1 + size] + b"\x00" * (width - size)
        out.append(f"{ipaddress.ip_address(raw)}/{bits}")
        i += 1 + size
    return tuple(out)


def _parse_update(body: bytes) -> Update:
    wlen = struct.unpack("!H", body[:2])[0]
    withdrawn = _prefixes(body[2:2 + wlen])
    i = 2 + wlen
    alen = struct.unpack("!H", body[i:i + 2])[0]
    attrs = body[i + 2:i + 2 + alen]
    nlri = body[i + 2 + alen:]
    communities: list[str] = []
    large: list[str] = []
    extended: list[bytes] = []
    next_hops: list[str] = []
    announced, withdrawn = list(_prefixes(nlri)), list(withdrawn)
    j = 0
    while j < len(attrs):
        flags, code = attrs[j], attrs[j + 1]
        if flags & 0x10:
            size, j = struct.unpack("!H", attrs[j + 2:j + 4])[0], j + 4
        else:
            size, j = attrs[j + 2], j + 3
        value = attrs[j:j + size]
        if code == COMMUNITIES:
            for k in range(0, size, 4):
                high, low = struct.unpack("!HH", value[k:k + 4])
                communities.append(f"{high}:{low}")
        elif code == LARGE:
            for k in range(0, size, 12):
                large.append(":".join(str(n) for n in struct.unpack("!III", value[k:k + 12])))
        elif code == EXTENDED:
            extended += [value[k:k + 8] for k in range(0, size, 8)]
        elif code == NEXT_HOP:
            next_hops.append(str(ipaddress.IPv4Address(value)))
        elif code == MP_REACH and value[:3] == struct.pack("!HB", AFI_IPV6, SAFI_UNICAST):
            hop_len = value[3]  # 16, or 32 with a link-local (RFC 2545 section 3)
            for k in range(4, 4 + hop_len, 16):
                next_hops.append(str(ipaddress.IPv6Address(value[k:k + 16])))
            announced += _prefixes(value[4 + hop_len + 1:], 16)  # after the reserved octet
        elif code == MP_UNREACH and value[:3] == struct.pack("!HB", AFI_IPV6, SAFI_UNICAST):
            withdrawn += _prefixes(value[3:], 16)
        j += size
    return Update(time.monotonic(), tuple(announced), tuple(withdrawn), tuple(communities),
                  tuple(large), tuple(extended), tuple(next_hops))
