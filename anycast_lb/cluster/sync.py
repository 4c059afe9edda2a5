"""The sync endpoint: one UDP socket on the node LAN (asyncio datagram protocol).

It moves datagrams and guards the door: it seals what it sends (one MAC per
receiver, :func:`wire.seal`) and hands each datagram that passes every check
to ``on_message(index, message)`` on the event loop. Checks, in order, each
failure dropped and counted under its reason (never fatal):

- ``unknown_peer``: the source address and port are no configured peer's
  LAN address and sync port;
- ``malformed``: too short, bad magic or version, bad body;
- ``bad_mac``: an unknown key id or a tag that does not verify;
- ``replay``: a counter already seen or below the peer's window, or an
  epoch older than the peer's newest (:mod:`.replay`).

The first rejection per (reason, sender) is logged as
``cluster.datagram_rejected``; later ones are only counted.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from typing import Any

from anycast_lb import log
from anycast_lb.cluster import wire
from anycast_lb.cluster.keys import KeyRing
from anycast_lb.cluster.replay import ReplayWindow, Verdict
from anycast_lb.errors import ClusterAuthError, ClusterError, ClusterWireError

REJECT_REASONS = ("unknown_peer", "malformed", "bad_mac", "replay")
_MAX_WARNED = 100


class SyncEndpoint(asyncio.DatagramProtocol):
    """Bind ``bind`` (host, port), or use the already bound ``sock``.

    ``local`` is this node's sync endpoint as its peers list it (the MAC
    names sender and receiver); ``keys`` sign and verify; ``epoch`` is this
    node's incarnation (the counter restarts with it).
    """

    def __init__(
        self,
        peers: Sequence[tuple[str, int]],
        on_message: Callable[[int, wire.Message], None],
        *,
        local: tuple[str, int],
        keys: KeyRing,
        bind: tuple[str, int] | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        if (bind is None) == (sock is None):
            raise ValueError("give exactly one of bind and sock")
        self.peers = list(peers)
        self.local = local
        self.keys = keys
        self._index = {peer: i for i, peer in enumerate(self.peers)}
        self._windows = [ReplayWindow() for _ in self.peers]
        self._on_message = on_message
        self._bind = bind
        self._sock = sock
        self._transport: asyncio.DatagramTransport | None = None
        self.address: tuple[str, int] | None = None
        self.counter = 0
        self.received = 0
        self.sent = 0
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        self.send_errors = 0
        self.peer_key_ids: list[int | None] = [None] * len(self.peers)
        self._warned: set[tuple[str, str]] = set()

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
        sender = (str(addr[0]), int(addr[1]))
        index = self._index.get(sender)
        if index is None:
            self._reject("unknown_peer", sender)
            return
        try:
            message = wire.decode(data, self.keys, sender, self.local)
        except ClusterAuthError as exc:
            self._reject("bad_mac", sender, str(exc))
            return
        except ClusterWireError as exc:
            self._reject("malformed", sender, str(exc))
            return
        head = message.header
        verdict = self._windows[index].accept(head.epoch, head.counter)
        if not verdict.accepted:
            self._reject("replay", sender, "epoch older than the peer's newest"
                         if verdict is Verdict.OLD_EPOCH else "counter seen or too old")
            return
        self.peer_key_ids[index] = head.key_id
        self.received += 1
        self._on_message(index, message)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that is down: expected, counted.
        self.send_errors += 1

    def _reject(self, reason: str, sender: tuple[str, int], error: str = "") -> None:
        self.rejected[reason] += 1
        key = (reason, f"{sender[0]}:{sender[1]}")
        if key not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add(key)
            log.warning("cluster.datagram_rejected", reason=reason, sender=key[1], error=error)

    def send(self, index: int, data: bytes) -> None:
        """Seal ``data`` (an unsealed ``wire.encode_*`` datagram) for peer
        ``index`` and send it; a failure is counted, never raised."""
        if self._transport is None or self._transport.is_closing():
            return
        peer = self.peers[index]
        self.counter += 1
        sealed = wire.seal(data, self.counter, self.keys.signing, self.keys.signing_id,
                           self.local, peer)
        try:
            self._transport.sendto(sealed, peer)
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
