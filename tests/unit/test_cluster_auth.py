"""Sync authentication: the MAC, the key file, and the replay window."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from anycast_lb.cluster import wire
from anycast_lb.cluster.keys import MIN_KEY_BYTES, KeyFile, KeyRing, key_id, parse_keys
from anycast_lb.cluster.replay import WINDOW, ReplayWindow, Verdict
from anycast_lb.errors import ClusterAuthError, ClusterError

OLD = bytes(range(32))
NEW = bytes(range(100, 132))
A = ("203.0.113.1", 7946)
B = ("203.0.113.2", 7946)
C = ("203.0.113.3", 7946)
DATA = wire.encode_heartbeat(7, 3, 1000, receiver=True, leaving=False, owned=1, name="a")


def seal(key: bytes, sender: tuple[str, int] = A, receiver: tuple[str, int] = B,
         counter: int = 1) -> bytes:
    return wire.seal(DATA, counter, key, key_id(key), sender, receiver)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


# -- the MAC ------------------------------------------------------------------

ONLY_OLD = KeyRing(OLD, (OLD,))
ROTATING = KeyRing(NEW, (NEW, OLD))  # signs with the new key, still accepts the old


@pytest.mark.parametrize(("name", "data", "ring", "receiver", "error"), [
    ("good", seal(OLD), ONLY_OLD, B, None),
    ("previous key during rotation", seal(OLD), ROTATING, B, None),
    ("new key at a rotating node", seal(NEW), ROTATING, B, None),
    ("new key at a node that does not know it yet", seal(NEW), ONLY_OLD, B, "unknown key"),
    ("a flipped body bit", flip(seal(OLD), 45), ONLY_OLD, B, "bad MAC"),
    ("a flipped epoch bit (epoch under the MAC)", flip(seal(OLD), 15), ONLY_OLD, B, "bad MAC"),
    ("a flipped counter bit", flip(seal(OLD), 39), ONLY_OLD, B, "bad MAC"),
    ("a flipped tag bit", flip(seal(OLD), -1), ONLY_OLD, B, "bad MAC"),
    ("sealed for another receiver", seal(OLD, receiver=C), ONLY_OLD, B, "bad MAC"),
    ("another sender's datagram under A's address", seal(OLD, sender=C), ONLY_OLD, B,
     "bad MAC"),
    ("a wrong key whose id is forged to match",
     wire.seal(DATA, 1, NEW, key_id(OLD), A, B), ONLY_OLD, B, "bad MAC"),
])
def test_mac(name: str, data: bytes, ring: KeyRing, receiver: tuple[str, int],
             error: str | None) -> None:
    if error is None:
        message = wire.decode(data, ring, A, receiver)
        assert isinstance(message, wire.Heartbeat) and message.header.counter == 1
    else:
        with pytest.raises(ClusterAuthError, match=error):
            wire.decode(data, ring, A, receiver)


def test_sealed_datagram_is_the_unsealed_one_plus_id_counter_and_tag() -> None:
    data = seal(OLD, counter=2**64 - 1)
    assert len(data) == len(DATA) + wire.TAG_SIZE
    assert data[7] == key_id(OLD) and data[32:40] == b"\xff" * 8
    with pytest.raises(ClusterError):
        wire.seal(DATA, 2**64, OLD, key_id(OLD), A, B)


# -- the key file -------------------------------------------------------------

def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_parse_keys() -> None:
    assert parse_keys(f"{b64(OLD)}\n") == KeyRing(OLD, (OLD,))
    ring = parse_keys(f"# rotation\n{b64(NEW)}\n\n  {b64(OLD)}  \n")
    assert ring == KeyRing(NEW, (NEW, OLD)) and ring.candidates(key_id(OLD)) == (OLD,)


@pytest.mark.parametrize(("text", "error"), [
    ("", "no key"),
    ("# only a comment\n", "no key"),
    ("not base64!\n", "line 1 is not base64"),
    ("kéy\n", "line 1 is not base64"),
    (b64(b"x" * (MIN_KEY_BYTES - 1)), "15 bytes, at least 16"),
    (f"{b64(OLD)}\n{b64(NEW)}\n{b64(b'y' * 32)}\n", "3 keys, at most 2"),
    (f"{b64(OLD)}\n{b64(OLD)}\n", "the same key twice"),
])
def test_bad_key_text(text: str, error: str) -> None:
    with pytest.raises(ClusterError, match=error):
        parse_keys(text)


def test_key_file_permissions_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    path.write_text(b64(OLD) + "\n")
    for mode in (0o644, 0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(ClusterError, match="lets group or others in; chmod 600"):
            KeyFile(path).load()
    path.chmod(0o600)
    keys = KeyFile(path)
    assert keys.load() == ONLY_OLD
    assert keys.reload() is None  # unchanged
    path.write_text(f"{b64(NEW)}\n{b64(OLD)}\n")
    assert keys.reload() == ROTATING
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(ClusterError, match="not ASCII"):
        keys.reload()
    with pytest.raises(ClusterError, match="No such file"):
        KeyFile(tmp_path / "missing").load()
    tmp_path.chmod(0o700)
    with pytest.raises(ClusterError, match="not a regular file"):
        KeyFile(tmp_path).load()


# -- the replay window --------------------------------------------------------

E1, E2 = 1000, 2000  # E2: the peer restarted (epochs grow with its wall clock)

ACCEPT, NEW_EPOCH, REPLAY, OLD_EPOCH = (Verdict.ACCEPT, Verdict.NEW_EPOCH, Verdict.REPLAY,
                                        Verdict.OLD_EPOCH)


@pytest.mark.parametrize(("name", "steps"), [
    ("in order", [(E1, 1, NEW_EPOCH), (E1, 2, ACCEPT), (E1, 3, ACCEPT)]),
    ("a duplicate", [(E1, 1, NEW_EPOCH), (E1, 2, ACCEPT), (E1, 2, REPLAY), (E1, 1, REPLAY)]),
    ("reordering inside the window", [(E1, 5, NEW_EPOCH), (E1, 3, ACCEPT), (E1, 4, ACCEPT),
                                      (E1, 3, REPLAY), (E1, 6, ACCEPT), (E1, 4, REPLAY)]),
    ("gaps are fine (datagrams for other peers)", [(E1, 1, NEW_EPOCH), (E1, 10, ACCEPT),
                                                   (E1, 500, ACCEPT), (E1, 499, ACCEPT)]),
    ("at the window's low edge", [(E1, WINDOW + 10, NEW_EPOCH), (E1, 11, ACCEPT),
                                  (E1, 10, REPLAY), (E1, 11, REPLAY)]),
    ("slid far past the window", [(E1, 1, NEW_EPOCH), (E1, 3 * WINDOW, ACCEPT),
                                  (E1, 2, REPLAY), (E1, 2 * WINDOW + 1, ACCEPT),
                                  (E1, 2 * WINDOW + 1, REPLAY)]),
    ("a restarted peer starts over", [(E1, 900, NEW_EPOCH), (E2, 1, NEW_EPOCH), (E2, 2, ACCEPT)]),
    ("the old epoch replayed after a restart", [(E1, 900, NEW_EPOCH), (E2, 1, NEW_EPOCH),
                                                (E1, 901, OLD_EPOCH), (E1, 1, OLD_EPOCH),
                                                (E2, 2, ACCEPT)]),
    ("an old epoch first, then the current one", [(E1, 5, NEW_EPOCH), (E2, 1, NEW_EPOCH),
                                                  (E1, 6, OLD_EPOCH)]),
])
def test_replay_window(name: str, steps: list[tuple[int, int, Verdict]]) -> None:
    window = ReplayWindow()
    got = [window.accept(epoch, counter) for epoch, counter, _ in steps]
    assert got == [verdict for _, _, verdict in steps]


def test_check_does_not_move_the_window() -> None:
    window = ReplayWindow()
    window.accept(E1, 1)
    assert window.check(E1, 2) is ACCEPT and window.check(E1, 2) is ACCEPT
    assert window.accept(E1, 2) is ACCEPT and window.check(E1, 2) is REPLAY
    assert window.seen < 1 << WINDOW


def test_window_bitmap_stays_bounded_and_exact() -> None:
    window = ReplayWindow()
    accepted = set()
    for counter in (*range(1, 5000, 3), *range(4000, 5000, 2)):
        if window.accept(E1, counter).accepted:
            accepted.add(counter)
    assert window.seen.bit_length() <= WINDOW
    for counter in range(4999 - WINDOW + 1, 5000):
        expected = REPLAY if counter in accepted else ACCEPT
        assert window.check(E1, counter) is expected, counter


def test_forged_datagram_cost() -> None:
    """What docs/cluster.md quotes: the cost of refusing one forged
    1,400-byte datagram (a bad tag). Prints us per datagram (-s to see);
    bounded loose so only a pathological slowdown fails."""
    import time

    flows = {(f"203.0.113.{i % 250}", 1024 + i, "198.51.100.10", 443): i for i in range(200)}
    part = wire.encode_snapshot(1, 1, 1, 1, flows, 1400)[0]
    good = wire.seal(part, 1, OLD, key_id(OLD), A, B)
    assert len(good) <= 1400
    forged = flip(good, -1)
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        with pytest.raises(ClusterAuthError):
            wire.decode(forged, ONLY_OLD, A, B)
    per = (time.perf_counter() - started) / rounds
    print(f"forged datagram refused in {per * 1e6:.1f} us")
    assert per < 0.005
