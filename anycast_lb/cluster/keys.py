"""The cluster sync key file: HMAC-SHA256 keys shared by every node.

The file holds one or two lines, each a key in base64 (RFC 4648, section 4)
of at least :data:`MIN_KEY_BYTES` bytes once decoded. The first line is the
key this node signs with; every line is a key it accepts. Blank lines and
lines starting with ``#`` are skipped. Make one with::

    umask 077; head -c 32 /dev/urandom | base64 > /etc/anycast-lb/cluster.key

The file must not be readable or writable by group or others (mode 0600 or
0400): a node refuses to start otherwise.

Rotation, node by node, with no datagram refused at any step (each step on
every node before the next step starts; the node re-reads the file within
:data:`RELOAD_INTERVAL_S` of a change, no restart needed):

1. append the new key as the second line (sign old, accept both);
2. swap the lines (sign new, accept both);
3. delete the old line.

:func:`parse_keys` is pure; :class:`KeyFile` reads the file (stat and read
only). Both raise :class:`~anycast_lb.errors.ClusterError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from anycast_lb.errors import ClusterError

MIN_KEY_BYTES = 16
"""Shortest key accepted, bytes (after base64 decoding); 32 recommended."""
MAX_KEYS = 2
"""The signing key and at most one more accepted key (rotation)."""
RELOAD_INTERVAL_S = 1.0
"""Seconds between two checks of the key file for a change."""
_MAX_FILE_BYTES = 4096


def key_id(key: bytes) -> int:
    """A one-byte id of ``key`` sent in every datagram, so a receiver picks
    the right key at once and logs which key a peer uses; it reveals 8 bits
    of a hash of the key, nothing of the key."""
    return hashlib.sha256(b"anycast-lb cluster key id\x00" + key).digest()[0]


@dataclass(frozen=True, slots=True)
class KeyRing:
    """``signing`` signs what this node sends; ``accepted`` (signing first)
    verifies what it receives."""

    signing: bytes
    accepted: tuple[bytes, ...]
    ids: tuple[int, ...] = field(init=False, compare=False)
    """:func:`key_id` of each accepted key, in order."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(key_id(k) for k in self.accepted))

    @property
    def signing_id(self) -> int:
        if self.accepted and self.accepted[0] == self.signing:
            return self.ids[0]
        return key_id(self.signing)

    def candidates(self, kid: int) -> tuple[bytes, ...]:
        """Accepted keys whose id is ``kid`` (usually one, none when unknown)."""
        return tuple(k for k, i in zip(self.accepted, self.ids, strict=True) if i == kid)


def parse_keys(text: str, source: str = "cluster.key_file") -> KeyRing:
    """The keys in a key file's text. Raises ClusterError naming ``source``
    and the line at fault."""
    keys: list[bytes] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = base64.b64decode(line.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error):
            raise ClusterError(f"{source}: line {number} is not base64 "
                               f"(make a key with: head -c 32 /dev/urandom | base64)") from None
        if len(key) < MIN_KEY_BYTES:
            raise ClusterError(f"{source}: line {number} holds a key of {len(key)} bytes, "
                               f"at least {MIN_KEY_BYTES} are needed (32 recommended)")
        keys.append(key)
    if not keys:
        raise ClusterError(f"{source}: no key (make one with: head -c 32 /dev/urandom | base64)")
    if len(keys) > MAX_KEYS:
        raise ClusterError(f"{source}: {len(keys)} keys, at most {MAX_KEYS} "
                           f"(the signing key, then the one being rotated)")
    if len(set(keys)) != len(keys):
        raise ClusterError(f"{source}: the same key twice")
    return KeyRing(keys[0], tuple(keys))


def new_key_line(size: int = 32) -> str:
    """A fresh random key as a key file line (base64 of ``size`` bytes)."""
    return base64.b64encode(secrets.token_bytes(size)).decode("ascii")


def write_key_file(path: Path, lines: list[str]) -> None:
    """Write ``lines`` (base64 keys, signing key first) to ``path`` with mode
    0600 from the first byte on. Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, "".join(f"{line}\n" for line in lines).encode("ascii"))
    finally:
        os.close(fd)


class KeyFile:
    """The key file at ``path``: :meth:`load` reads it, :meth:`reload`
    reads it again only if it changed (size, mtime, inode)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None

    def _stat(self) -> os.stat_result:
        try:
            return os.stat(self.path)
        except OSError as exc:
            raise ClusterError(f"cluster.key_file {self.path}: {exc.strerror or exc}") from exc

    def load(self) -> KeyRing:
        """Read and check the file. Raises ClusterError when it is missing,
        unreadable, not a regular file, open to group or others, or holds
        no valid key."""
        info = self._stat()
        if not stat.S_ISREG(info.st_mode):
            raise ClusterError(f"cluster.key_file {self.path}: not a regular file")
        if info.st_mode & 0o077:
            raise ClusterError(f"cluster.key_file {self.path}: mode "
                               f"{stat.S_IMODE(info.st_mode):04o} lets group or others in; "
                               f"chmod 600 it")
        if info.st_size > _MAX_FILE_BYTES:
            raise ClusterError(f"cluster.key_file {self.path}: {info.st_size} bytes, "
                               f"more than a key file holds ({_MAX_FILE_BYTES})")
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ClusterError(f"cluster.key_file {self.path}: {exc.strerror or exc}") from exc
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ClusterError(f"cluster.key_file {self.path}: not ASCII base64 text") from None
        ring = parse_keys(text, f"cluster.key_file {self.path}")
        self._seen = (info.st_size, info.st_mtime_ns, info.st_ino)
        return ring

    def reload(self) -> KeyRing | None:
        """The new keys if the file changed since the last load, else None.
        Raises ClusterError as :meth:`load` (the caller keeps its old keys)."""
        info = self._stat()
        if (info.st_size, info.st_mtime_ns, info.st_ino) == self._seen:
            return None
        return self.load()
