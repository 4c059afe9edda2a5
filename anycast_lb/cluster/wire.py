"""Sync datagrams between nodes (UDP on the node LAN): pure encode and decode.

Every datagram starts with a 32-byte header, network byte order::

    magic "ALBC" (4) | version 1 (1) | kind (1) | flags (1) | 0 (1)
    epoch (8): the sender's incarnation, random at start
    seq (8):   heartbeat: last delta seq sent; delta: its seq;
               snapshot: the delta seq it reflects; request: 0
    wall_ms (8): the sender's wall clock when it sent the datagram

then a body by kind:

=================  ==========================================================
HEARTBEAT (1)      owned flows (4), name length (1), name (UTF-8)
DELTA (2)          adds (2), removes (2), adds x FLOW, removes x KEY
SNAPSHOT (3)       snapshot id (4), part (2), parts (2), flows (2), flows x FLOW
SNAPSHOT_REQ (4)   (empty) the receiver asks the sender for a snapshot now
=================  ==========================================================

KEY is client address (4), client port (2), VIP (4), VIP port (2): IPv4
only (12 bytes); FLOW is KEY then since_ms (8), the owner's wall clock when it
accepted the flow. Flags: bit 0 the sender runs its steering receiver, bit 1
the sender is leaving (a clean stop). Decoding raises
:class:`~anycast_lb.errors.ClusterWireError`; the node LAN is trusted (like
the backends on it): there is no authentication.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from anycast_lb.errors import ClusterWireError

if TYPE_CHECKING:
    from anycast_lb.forward import FlowKey

MAGIC = b"ALBC"
VERSION = 1
HEADER = struct.Struct("!4sBBBxQQQ")
_KEY = struct.Struct("!4sH4sH")
_FLOW = struct.Struct("!4sH4sHQ")
_HEARTBEAT = struct.Struct("!IB")
_DELTA = struct.Struct("!HH")
_SNAPSHOT = struct.Struct("!IHHH")
_MAX_NAME = 63

FLAG_RECEIVER = 0x01
FLAG_LEAVING = 0x02


class Kind(IntEnum):
    HEARTBEAT = 1
    DELTA = 2
    SNAPSHOT = 3
    SNAPSHOT_REQUEST = 4


@dataclass(frozen=True, slots=True)
class Header:
    kind: Kind
    flags: int
    epoch: int
    seq: int
    wall_ms: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    header: Header
    owned: int
    name: str

    @property
    def receiver(self) -> bool:
        return bool(self.header.flags & FLAG_RECEIVER)

    @property
    def leaving(self) -> bool:
        return bool(self.header.flags & FLAG_LEAVING)


@dataclass(frozen=True, slots=True)
class DeltaMessage:
    header: Header
    added: dict[FlowKey, int]
    removed: tuple[FlowKey, ...]


@dataclass(frozen=True, slots=True)
class SnapshotPart:
    header: Header
    snapshot_id: int
    part: int
    parts: int
    flows: dict[FlowKey, int]


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    header: Header


Message = Heartbeat | DeltaMessage | SnapshotPart | SnapshotRequest

ADD_SIZE = _FLOW.size
REMOVE_SIZE = _KEY.size


def is_ipv4_key(key: FlowKey) -> bool:
    """Whether a flow can be published (IPv4 only for now)."""
    return ":" not in key[0] and ":" not in key[2]


def _header(kind: Kind, flags: int, epoch: int, seq: int, wall_ms: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, flags, epoch, seq, wall_ms)


def _pack_flow(key: FlowKey, since_ms: int) -> bytes:
    return _FLOW.pack(socket.inet_aton(key[0]), key[1], socket.inet_aton(key[2]), key[3], since_ms)


def _pack_key(key: FlowKey) -> bytes:
    return _KEY.pack(socket.inet_aton(key[0]), key[1], socket.inet_aton(key[2]), key[3])


def encode_heartbeat(
    epoch: int, seq: int, wall_ms: int, *, receiver: bool, leaving: bool, owned: int, name: str,
) -> bytes:
    flags = (FLAG_RECEIVER if receiver else 0) | (FLAG_LEAVING if leaving else 0)
    raw = name.encode()[:_MAX_NAME]
    return (_header(Kind.HEARTBEAT, flags, epoch, seq, wall_ms)
            + _HEARTBEAT.pack(min(owned, 0xFFFFFFFF), len(raw)) + raw)


def encode_delta(
    epoch: int, seq: int, wall_ms: int, added: Sequence[tuple[FlowKey, int]],
    removed: Sequence[FlowKey],
) -> bytes:
    """One delta datagram; :func:`split_changes` keeps it under the size limit."""
    return b"".join((
        _header(Kind.DELTA, 0, epoch, seq, wall_ms),
        _DELTA.pack(len(added), len(removed)),
        *(_pack_flow(k, s) for k, s in added),
        *(_pack_key(k) for k in removed),
    ))


def split_changes(
    added: Mapping[FlowKey, int], removed: Sequence[FlowKey], max_datagram: int,
) -> list[tuple[list[tuple[FlowKey, int]], list[FlowKey]]]:
    """Cut changes into chunks whose delta datagram fits ``max_datagram`` bytes.

    Removals come first: a chunk never re-adds a key a later chunk removes,
    since ``added`` and ``removed`` never share a key.
    """
    room = max_datagram - HEADER.size - _DELTA.size
    chunks: list[tuple[list[tuple[FlowKey, int]], list[FlowKey]]] = []
    adds: list[tuple[FlowKey, int]] = []
    removes: list[FlowKey] = []
    used = 0
    for key in removed:
        if used + REMOVE_SIZE > room:
            chunks.append((adds, removes))
            adds, removes, used = [], [], 0
        removes.append(key)
        used += REMOVE_SIZE
    for item in added.items():
        if used + ADD_SIZE > room:
            chunks.append((adds, removes))
            adds, removes, used = [], [], 0
        adds.append(item)
        used += ADD_SIZE
    if adds or removes:
        chunks.append((adds, removes))
    return chunks


def encode_snapshot(
    epoch: int, seq: int, wall_ms: int, snapshot_id: int, flows: Mapping[FlowKey, int],
    max_datagram: int, *, receiver: bool = True,
) -> list[bytes]:
    """The datagrams of one snapshot (at least one, even when empty)."""
    per = max(1, (max_datagram - HEADER.size - _SNAPSHOT.size) // ADD_SIZE)
    items = list(flows.items())
    chunks = [items[i:i + per] for i in range(0, len(items), per)] or [[]]
    if len(chunks) > 0xFFFF:
        raise ClusterWireError(f"snapshot of {len(items)} flows needs more than 65535 datagrams")
    flags = FLAG_RECEIVER if receiver else 0
    head = _header(Kind.SNAPSHOT, flags, epoch, seq, wall_ms)
    return [
        b"".join((head, _SNAPSHOT.pack(snapshot_id, i, len(chunks), len(chunk)),
                  *(_pack_flow(k, s) for k, s in chunk)))
        for i, chunk in enumerate(chunks)
    ]


def encode_snapshot_request(epoch: int, wall_ms: int) -> bytes:
    return _header(Kind.SNAPSHOT_REQUEST, 0, epoch, 0, wall_ms)


def _flows(data: bytes, offset: int, count: int) -> dict[FlowKey, int]:
    out: dict[FlowKey, int] = {}
    ntoa = socket.inet_ntoa
    for client, cport, vip, vport, since in _FLOW.iter_unpack(data[offset:offset + count * ADD_SIZE]):
        out[(ntoa(client), cport, ntoa(vip), vport)] = since
    return out


def _keys(data: bytes, offset: int, count: int) -> tuple[FlowKey, ...]:
    ntoa = socket.inet_ntoa
    return tuple((ntoa(c), cp, ntoa(v), vp)
                 for c, cp, v, vp in _KEY.iter_unpack(data[offset:offset + count * REMOVE_SIZE]))


def decode(data: bytes) -> Message:
    """Parse one datagram. Raises ClusterWireError naming what is wrong."""
    if len(data) < HEADER.size:
        raise ClusterWireError(f"datagram of {len(data)} bytes is shorter than the header")
    magic, version, kind, flags, epoch, seq, wall_ms = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ClusterWireError("not a sync datagram (bad magic)")
    if version != VERSION:
        raise ClusterWireError(f"unsupported sync version {version}")
    try:
        header = Header(Kind(kind), flags, epoch, seq, wall_ms)
    except ValueError:
        raise ClusterWireError(f"unknown message kind {kind}") from None
    body = HEADER.size
    if header.kind is Kind.HEARTBEAT:
        _need(data, body + _HEARTBEAT.size)
        owned, length = _HEARTBEAT.unpack_from(data, body)
        _need(data, body + _HEARTBEAT.size + length, exact=True)
        name = data[body + _HEARTBEAT.size:].decode(errors="replace")
        return Heartbeat(header, owned, name)
    if header.kind is Kind.DELTA:
        _need(data, body + _DELTA.size)
        adds, removes = _DELTA.unpack_from(data, body)
        start = body + _DELTA.size
        _need(data, start + adds * ADD_SIZE + removes * REMOVE_SIZE, exact=True)
        added = _flows(data, start, adds)
        removed = _keys(data, start + adds * ADD_SIZE, removes)
        if set(removed) & added.keys():
            raise ClusterWireError("a delta both adds and removes one flow")
        return DeltaMessage(header, added, removed)
    if header.kind is Kind.SNAPSHOT:
        _need(data, body + _SNAPSHOT.size)
        snapshot_id, part, parts, count = _SNAPSHOT.unpack_from(data, body)
        start = body + _SNAPSHOT.size
        _need(data, start + count * ADD_SIZE, exact=True)
        if parts == 0 or part >= parts:
            raise ClusterWireError(f"snapshot part {part} of {parts}")
        return SnapshotPart(header, snapshot_id, part, parts, _flows(data, start, count))
    _need(data, body, exact=True)
    return SnapshotRequest(header)


def _need(data: bytes, size: int, exact: bool = False) -> None:
    if len(data) < size or (exact and len(data) != size):
        raise ClusterWireError(f"datagram of {len(data)} bytes, expected {size}")
