"""Config distribution with history: push, show, history, diff, rollback.

Each push writes ``config/revisions/<N+1>`` and moves ``config/current`` to
``N+1`` in one etcd transaction that holds only if ``config/current`` has
not changed since it was read (compare on its mod revision): of two
concurrent pushes based on the same revision, one wins and the other gets
:class:`ConsensusConflict`. History is append-only; a rollback is a new
revision with an old document.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

import yaml

from anycast_lb.clock import Clock, SystemClock
from anycast_lb.consensus import document
from anycast_lb.consensus.keys import Layout
from anycast_lb.consensus.store import ModRevisionIs, Put, Store
from anycast_lb.errors import ConfigError, ConsensusConflict, ConsensusDataError


@dataclass(frozen=True)
class Revision:
    number: int
    based_on: int
    """The revision current when it was pushed (0 for the first)."""
    time: float
    """Wall clock, s since the epoch, of the pushing host."""
    author: str
    message: str
    shared: document.Shared
    etcd_revision: int
    """etcd's revision of the write (0 until read back)."""


def encode(rev: Revision) -> bytes:
    return json.dumps({
        "revision": rev.number, "based_on": rev.based_on, "time": rev.time,
        "author": rev.author, "message": rev.message, "config": rev.shared.to_data(),
    }, sort_keys=True, separators=(",", ":")).encode()


def decode(value: bytes, etcd_revision: int, source: str) -> Revision:
    """Raises ConsensusDataError for a document that is not a revision."""
    try:
        data = json.loads(value)
        return Revision(
            number=int(data["revision"]), based_on=int(data["based_on"]),
            time=float(data["time"]), author=str(data["author"]),
            message=str(data["message"]),
            shared=document.from_data(data["config"], source),
            etcd_revision=etcd_revision)
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise ConsensusDataError(f"{source}: not a config revision: {exc}") from exc


def render(shared: document.Shared) -> str:
    """The document as YAML, for show and diff (stable key order)."""
    return yaml.safe_dump(shared.to_data(), sort_keys=True, default_flow_style=False)


class ConfigHistory:
    """The cluster's config revisions, through the adapter only."""

    def __init__(self, store: Store, layout: Layout, clock: Clock | None = None) -> None:
        self._store = store
        self._layout = layout
        self._clock = clock or SystemClock()

    async def head(self) -> tuple[int, int]:
        """(current config revision, mod revision of ``config/current``);
        (0, 0) before the first push. Linearizable."""
        _, kv = await self._store.get(self._layout.current)
        if kv is None:
            return 0, 0
        try:
            return int(json.loads(kv.value)["revision"]), kv.mod_revision
        except (ValueError, KeyError, TypeError) as exc:
            raise ConsensusDataError(f"{kv.key}: {exc}") from exc

    async def get(self, number: int, *, linearizable: bool = True) -> Revision:
        """Raises ConsensusDataError when revision ``number`` does not exist."""
        key = self._layout.revision(number)
        _, kv = await self._store.get(key, linearizable=linearizable)
        if kv is None:
            raise ConsensusDataError(f"config revision {number} does not exist")
        return decode(kv.value, kv.mod_revision, key)

    async def current(self) -> Revision | None:
        number, _ = await self.head()
        return await self.get(number) if number else None

    async def push(
        self, shared: document.Shared, *, author: str, message: str,
        based_on: int | None = None,
    ) -> Revision:
        """Write ``shared`` as the next revision. ``based_on``: the revision
        the pusher started from; refused (ConsensusConflict) if another is
        current by now. Without it, the revision current at the read."""
        number, mod = await self.head()
        if based_on is not None and based_on != number:
            raise ConsensusConflict(
                f"push based on revision {based_on}, but revision {number} is current: "
                "review `anycast-lb cluster diff` and push again")
        rev = Revision(number + 1, number, self._clock.wall(), author, message, shared, 0)
        key = self._layout.revision(rev.number)
        ok, etcd_rev = await self._store.transact(
            [ModRevisionIs(self._layout.current, mod), ModRevisionIs(key, 0)],
            [Put(key, encode(rev)),
             Put(self._layout.current, json.dumps({"revision": rev.number}).encode())])
        if not ok:
            latest, _ = await self.head()
            raise ConsensusConflict(
                f"another push made revision {latest} current while this one was based "
                f"on {number}: nothing written; review `anycast-lb cluster diff` and push again")
        return Revision(rev.number, rev.based_on, rev.time, rev.author, rev.message, shared, etcd_rev)

    async def history(self) -> list[Revision]:
        """Every revision, oldest first."""
        snap = await self._store.get_prefix(self._layout.revisions)
        return sorted((decode(i.value, i.mod_revision, i.key) for i in snap.items),
                      key=lambda r: r.number)

    async def rollback(self, number: int, *, author: str, message: str = "") -> Revision:
        """Push revision ``number``'s document again as a new revision."""
        old = await self.get(number)
        note = f"rollback to {number}" + (f": {message}" if message else "")
        return await self.push(old.shared, author=author, message=note)

    async def diff(self, a: int, b: int | None = None) -> str:
        """Unified diff of revision ``a`` against ``b`` (default: current)."""
        if b is None:
            b, _ = await self.head()
        old, new = await self.get(a), await self.get(b)
        return "".join(difflib.unified_diff(
            render(old.shared).splitlines(keepends=True),
            render(new.shared).splitlines(keepends=True),
            fromfile=f"revision {a}", tofile=f"revision {b}"))
