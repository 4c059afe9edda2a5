"""Sync datagrams between nodes (UDP on the node LAN): pure encode and decode.

Every datagram is a 40-byte header, a body by kind, then a 32-byte tag,
network byte order::

    magic "ALBC" (4) | version 2 (1) | kind (1) | flags (1) | key id (1)
    epoch (8):   the sender's incarnation (grows with its wall clock at start)
    seq (8):     heartbeat: last delta seq sent; delta: its seq;
                 snapshot: the delta seq it reflects; request: 0
    wall_ms (8): the sender's wall clock when it sent the datagram
    counter (8): one more for every datagram the sender sealed in this
                 epoch (the replay window's sequence, :mod:`.replay`)
    body
    tag (32):    HMAC-SHA256 (RFC 2104) under the key named by key id, of
                 sender IPv4 (4), sender port (2), receiver IPv4 (4),
                 receiver port (2), then every byte before the tag

Bodies:

=================  ==========================================================
HEARTBEAT (1)      owned flows (4), name length (1), name (UTF-8)
DELTA (2)          adds (2), removes (2), adds x FLOW, removes x KEY
SNAPSHOT (3)       snapshot id (4), part (2), parts (2), flows (2), flows x FLOW
SNAPSHOT_REQ (4)   (empty) the receiver asks the sender for a snapshot now
=================  ==========================================================

KEY is client address (4), client port (2), VIP (4), VIP port (2): IPv4
only (12 bytes); FLOW is KEY then since_ms (8), the owner's wall clock when it
accepted the flow. Flags: bit 0 the sender runs its steering receiver, bit 1
the sender is leaving (a clean stop).

The ``encode_*`` functions return an unsealed datagram (key id, counter
and tag unset); :func:`seal` signs it for one receiver, so a datagram
captured on its way to one peer fails the MAC at another, and one replayed
under another sender's source address fails it too. :func:`decode`
verifies before it parses; it raises
:class:`~anycast_lb.errors.ClusterAuthError` for a bad MAC or an unknown
key and :class:`~anycast_lb.errors.ClusterWireError` (its base) for
anything malformed. Replays are the receiver's business (:mod:`.replay`).
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from anycast_lb.errors import ClusterAuthError, ClusterWireError
from anycast_lb.flows import FlowKey

if TYPE_CHECKING:
    from anycast_lb.cluster.keys import KeyRing

MAGIC = b"ALBC"
VERSION = 2
HEADER = struct.Struct("!4sBBBBQQQQ")
TAG_SIZE = 32
"""HMAC-SHA256 tag at the end of every datagram, bytes."""
OVERHEAD = HEADER.size + TAG_SIZE
_KEY_ID_AT = 7
_COUNTER_AT = 32
_ENDPOINT = struct.Struct("!4sH")
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
    counter: int = 0
    key_id: int = 0


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
    return HEADER.pack(MAGIC, VERSION, kind, flags, 0, epoch, seq, wall_ms, 0)


Endpoint = tuple[str, int]
"""A node's sync endpoint: (IPv4 address, UDP port) on the node LAN."""


def _endpoint(address: Endpoint) -> bytes:
    try:
        return _ENDPOINT.pack(socket.inet_aton(address[0]), address[1])
    except (OSError, struct.error) as exc:
        raise ClusterWireError(f"not an IPv4 sync endpoint: {address!r}") from exc


def tag(key: bytes, sender: Endpoint, receiver: Endpoint, signed: bytes) -> bytes:
    """HMAC-SHA256 of ``signed`` (a datagram without its tag) from
    ``sender`` to ``receiver``: :data:`TAG_SIZE` bytes."""
    mac = hmac.new(key, _endpoint(sender) + _endpoint(receiver), hashlib.sha256)
    mac.update(signed)
    return mac.digest()


def seal(datagram: bytes, counter: int, key: bytes, key_id: int, sender: Endpoint,
         receiver: Endpoint) -> bytes:
    """An ``encode_*`` datagram with its key id, counter and tag set, for
    ``receiver``. ``counter`` must grow with every datagram of an epoch."""
    if len(datagram) < HEADER.size or not 0 <= counter < 1 << 64 or not 0 <= key_id < 256:
        raise ClusterWireError("seal: not an unsealed datagram, or counter or key id out of range")
    head = bytearray(datagram)
    head[_KEY_ID_AT] = key_id
    struct.pack_into("!Q", head, _COUNTER_AT, counter)
    signed = bytes(head)
    return signed + tag(key, sender, receiver, signed)


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
    room = max_datagram - OVERHEAD - _DELTA.size
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
    per = max(1, (max_datagram - OVERHEAD - _SNAPSHOT.size) // ADD_SIZE)
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


def decode(data: bytes, keys: KeyRing, sender: Endpoint, receiver: Endpoint) -> Message:
    """Verify and parse one datagram from ``sender`` to ``receiver``.

    Raises ClusterAuthError when no accepted key has the datagram's key id
    or the tag does not match (compared in constant time), and
    ClusterWireError naming what is wrong when it is malformed."""
    if len(data) < OVERHEAD:
        raise ClusterWireError(f"datagram of {len(data)} bytes is shorter than header and tag")
    magic, version, kind, flags, kid, epoch, seq, wall_ms, counter = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ClusterWireError("not a sync datagram (bad magic)")
    if version != VERSION:
        raise ClusterWireError(f"unsupported sync version {version}")
    signed, given = data[:-TAG_SIZE], data[-TAG_SIZE:]
    candidates = keys.candidates(kid)
    if not candidates:
        raise ClusterAuthError(f"signed with an unknown key (id {kid})")
    if not any(hmac.compare_digest(tag(key, sender, receiver, signed), given)
               for key in candidates):
        raise ClusterAuthError(f"bad MAC (key id {kid})")
    try:
        header = Header(Kind(kind), flags, epoch, seq, wall_ms, counter, kid)
    except ValueError:
        raise ClusterWireError(f"unknown message kind {kind}") from None
    return _body(header, signed)


def _body(header: Header, data: bytes) -> Message:
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
