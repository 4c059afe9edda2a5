"""Sync datagrams: round trips, exact sizes, splitting, and malformed input.

Each datagram is sealed (MAC) from A to B and decoded as B would.
"""

from __future__ import annotations

import struct

import pytest

from anycast_lb.cluster import wire
from anycast_lb.cluster.keys import KeyRing, key_id
from anycast_lb.errors import ClusterWireError

VIP = "198.51.100.10"
KEY = bytes(range(32))
RING = KeyRing(KEY, (KEY,))
A = ("203.0.113.1", 7946)
B = ("203.0.113.2", 7946)


def sealed(data: bytes, counter: int = 1) -> bytes:
    return wire.seal(data, counter, KEY, key_id(KEY), A, B)


def decode(data: bytes) -> wire.Message:
    return wire.decode(sealed(data), RING, A, B)


def key(n: int) -> tuple[str, int, str, int]:
    return (f"203.0.113.{n % 250}", 1024 + n, VIP, 443)


def test_heartbeat_round_trip() -> None:
    data = wire.encode_heartbeat(7, 42, 1_700_000_000_123, receiver=True, leaving=False,
                                 owned=9, name="lb2")
    assert len(data) == wire.HEADER.size + 5 + 3
    msg = decode(data)
    assert isinstance(msg, wire.Heartbeat)
    assert msg.header == wire.Header(wire.Kind.HEARTBEAT, wire.FLAG_RECEIVER, 7, 42,
                                     1_700_000_000_123, 1, key_id(KEY))
    assert (msg.owned, msg.name, msg.receiver, msg.leaving) == (9, "lb2", True, False)
    leaving = decode(wire.encode_heartbeat(7, 42, 0, receiver=False, leaving=True,
                                                owned=0, name=""))
    assert isinstance(leaving, wire.Heartbeat) and leaving.leaving and not leaving.receiver


def test_delta_round_trip_and_size() -> None:
    added = [(key(1), 1_700_000_000_001), (key(2), 5)]
    removed = [key(3)]
    data = wire.encode_delta(3, 8, 99, added, removed)
    assert len(data) == wire.HEADER.size + 4 + 2 * wire.ADD_SIZE + wire.REMOVE_SIZE
    msg = decode(data)
    assert isinstance(msg, wire.DeltaMessage)
    assert (msg.header.epoch, msg.header.seq, msg.header.wall_ms) == (3, 8, 99)
    assert msg.added == dict(added) and msg.removed == (key(3),)


def test_split_changes_fits_the_datagram_and_keeps_everything() -> None:
    added = {key(i): i for i in range(200)}
    removed = [key(i) for i in range(300, 450)]
    chunks = wire.split_changes(added, removed, 1400)
    assert len(chunks) > 1
    got_added: dict[tuple[str, int, str, int], int] = {}
    got_removed: list[tuple[str, int, str, int]] = []
    for seq, (adds, removes) in enumerate(chunks, 1):
        data = wire.encode_delta(1, seq, 0, adds, removes)
        assert len(sealed(data)) <= 1400
        msg = decode(data)
        assert isinstance(msg, wire.DeltaMessage)
        got_added.update(msg.added)
        got_removed += msg.removed
    assert got_added == added and got_removed == removed
    assert wire.split_changes({}, [], 1400) == []


def test_snapshot_parts_round_trip() -> None:
    flows = {key(i): 1000 + i for i in range(150)}
    parts = wire.encode_snapshot(5, 77, 1, 9, flows, 1400)
    assert len(parts) == 3 and all(len(sealed(p)) <= 1400 for p in parts)
    merged: dict[tuple[str, int, str, int], int] = {}
    for i, data in enumerate(parts):
        msg = decode(data)
        assert isinstance(msg, wire.SnapshotPart)
        assert (msg.snapshot_id, msg.part, msg.parts, msg.header.seq) == (9, i, 3, 77)
        merged.update(msg.flows)
    assert merged == flows
    (empty,) = wire.encode_snapshot(5, 0, 1, 10, {}, 1400)
    msg = decode(empty)
    assert isinstance(msg, wire.SnapshotPart) and msg.parts == 1 and msg.flows == {}


def test_snapshot_request_round_trip() -> None:
    msg = decode(wire.encode_snapshot_request(5, 123))
    assert isinstance(msg, wire.SnapshotRequest) and msg.header.epoch == 5


def test_ipv4_only_keys() -> None:
    assert wire.is_ipv4_key(key(1))
    assert not wire.is_ipv4_key(("2001:db8::1", 1, "2001:db8::10", 80))


GOOD = wire.encode_delta(1, 1, 0, [(key(1), 1)], [])


@pytest.mark.parametrize("data", [
    b"",
    GOOD[:20],                                      # shorter than the header
    b"XXXX" + GOOD[4:],                             # bad magic
    GOOD[:4] + b"\x01" + GOOD[5:],                  # unknown version (1: unsigned)
    GOOD[:5] + b"\x09" + GOOD[6:],                  # unknown kind
    GOOD[:-1],                                      # truncated flow
    GOOD + b"\x00",                                 # trailing bytes
    wire.encode_delta(1, 1, 0, [(key(1), 1)], [key(1)]),  # adds and removes one flow
    wire.encode_snapshot(1, 1, 0, 1, {}, 1400)[0][:-6] + struct.pack("!HHH", 2, 2, 0),
    wire.encode_heartbeat(1, 1, 0, receiver=True, leaving=False, owned=0, name="x")[:-1],
])
def test_malformed_datagrams_raise(data: bytes) -> None:
    with pytest.raises(ClusterWireError):
        decode(data)
