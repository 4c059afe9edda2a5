"""The sync endpoint: one UDP socket on the node LAN (asyncio datagram protocol).

It only moves datagrams: sends to peers by index, and hands each valid
datagram from a configured peer to ``on_message(index, message)`` on the
event loop. A datagram from an unknown address or a malformed one is
dropped and counted, never fatal. Peers are identified by their source
address and port, which must be a configured peer's LAN address and sync
port.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from typing import Any

from anycast_lb import log
from anycast_lb.cluster import wire
from anycast_lb.errors import ClusterError, ClusterWireError


class SyncEndpoint(asyncio.DatagramProtocol):
    """Bind ``bind`` (host, port), or use the already bound ``sock``."""

    def __init__(
        self,
        peers: Sequence[tuple[str, int]],
        on_message: Callable[[int, wire.Message], None],
        *,
        bind: tuple[str, int] | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        if (bind is None) == (sock is None):
            raise ValueError("give exactly one of bind and sock")
        self.peers = list(peers)
        self._index = {peer: i for i, peer in enumerate(self.peers)}
        self._on_message = on_message
        self._bind = bind
        self._sock = sock
        self._transport: asyncio.DatagramTransport | None = None
        self.address: tuple[str, int] | None = None
        self.received = 0
        self.sent = 0
        self.bad = 0
        self.unknown = 0
        self.send_errors = 0
        self._warned: set[str] = set()

    async def start(self) -> tuple[str, int]:
        """Bind; the bound (address, port). Raises ClusterError."""
        loop = asyncio.get_running_loop()
        try:
            if self._sock is not None:
                transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=self._sock)
            else:
                assert self._bind is not None
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: self, local_addr=self._bind, family=socket.AF_INET)
        except OSError as exc:
            raise ClusterError(f"cluster sync cannot bind {self._bind}: "
                               f"{exc.strerror or exc}") from exc
        self._transport = transport
        name = transport.get_extra_info("sockname")
        self.address = (str(name[0]), int(name[1]))
        return self.address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        index = self._index.get((addr[0], addr[1]))
        if index is None:
            self.unknown += 1
            self._warn_once("cluster.unknown_sender", f"{addr[0]}:{addr[1]}")
            return
        try:
            message = wire.decode(data)
        except ClusterWireError as exc:
            self.bad += 1
            self._warn_once("cluster.bad_datagram", f"{addr[0]}:{addr[1]}", error=str(exc))
            return
        self.received += 1
        self._on_message(index, message)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that is down: expected, counted.
        self.send_errors += 1

    def _warn_once(self, name: str, sender: str, **fields: str) -> None:
        if sender not in self._warned and len(self._warned) < 100:
            self._warned.add(sender)
            log.warning(name, sender=sender, **fields)

    def send(self, index: int, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        try:
            self._transport.sendto(data, self.peers[index])
            self.sent += 1
        except OSError:
            self.send_errors += 1

    def send_all(self, datagrams: Sequence[bytes]) -> None:
        for index in range(len(self.peers)):
            for data in datagrams:
                self.send(index, data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
