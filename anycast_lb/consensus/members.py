"""A node's own keys: its member key and its health votes, under its lease.

Each node writes only its own keys; what every node reads back is one
:class:`ClusterView` taken at one etcd revision, so two nodes that read the
same revision compute the same agreed set (:func:`agree.agree`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from anycast_lb.consensus.agree import Vote, agree
from anycast_lb.consensus.keys import Layout
from anycast_lb.consensus.semaphore import Held, Take, Wait, decide
from anycast_lb.consensus.store import ModRevisionIs, Put, Snapshot, Store, WatchBatch
from anycast_lb.errors import ConsensusDataError

UP, DOWN = b"up", b"down"
TXN_OPS = 128
"""Operations per etcd transaction (etcd's ``--max-txn-ops`` default)."""


@dataclass(frozen=True)
class MemberInfo:
    name: str
    api: str
    """``host:port`` of the node's HTTP API."""
    lan: str
    """The node's LAN address (flow-survival sync), or "" without one."""
    version: str
    started: float
    """Wall clock, s since the epoch, when the node started."""

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes, source: str) -> MemberInfo:
        try:
            data: dict[str, Any] = json.loads(value)
            return cls(name=str(data["name"]), api=str(data["api"]), lan=str(data["lan"]),
                       version=str(data["version"]), started=float(data["started"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConsensusDataError(f"{source}: not a member document: {exc}") from exc


class MemberWriter:
    """Keeps this node's member key under its lease."""

    def __init__(self, store: Store, layout: Layout, info: MemberInfo) -> None:
        self._store = store
        self._layout = layout
        self.info = info

    async def register(self, lease_id: int) -> int:
        """Write the member key under ``lease_id``; returns the etcd revision.
        Call after each (re)grant of the lease."""
        return await self._store.put(self._layout.member(self.info.name), self.info.encode(),
                                     lease=lease_id)


class VoteWriter:
    """This node's health observations: one key per service and backend.

    Writes only what changed since the last write under the same lease;
    :meth:`rewrite` puts every vote again (after a new lease: the old keys
    went with the old one)."""

    def __init__(self, store: Store, layout: Layout, node: str) -> None:
        self._store = store
        self._layout = layout
        self._node = node
        self._written: dict[tuple[str, str], bool] = {}
        self.wanted: dict[tuple[str, str], bool] = {}
        """Latest observation per (service, backend), written or not."""
        self.revision = 0
        """The etcd revision of the last vote write (0: none yet)."""

    async def vote(self, service: str, backend: str, up: bool, lease_id: int) -> bool:
        """Record and write one observation; True if a write was sent.
        Raises ConsensusError (the observation stays wanted for rewrite)."""
        self.wanted[(service, backend)] = up
        if self._written.get((service, backend)) is up:
            return False
        await self._store.put(self._layout.vote(service, backend, self._node),
                              UP if up else DOWN, lease=lease_id)
        self._written[(service, backend)] = up
        return True

    async def vote_many(self, observations: Mapping[tuple[str, str], bool],
                        lease_id: int) -> list[tuple[str, str, bool]]:
        """Record observations ``{(service, backend): up}`` and write the
        changed ones in one transaction per :data:`TXN_OPS` (one Raft entry
        and one fsync instead of one per key, so a backend seen down by every
        service of a node reaches the others as one batch). Returns the
        written ``(service, backend, up)``. Raises ConsensusError (the
        observations stay wanted for rewrite)."""
        self.wanted.update(observations)
        changed = [(s, b, up) for (s, b), up in sorted(observations.items())
                   if self._written.get((s, b)) is not up]
        for start in range(0, len(changed), TXN_OPS):
            chunk = changed[start:start + TXN_OPS]
            _, self.revision = await self._store.transact([], [
                Put(self._layout.vote(s, b, self._node), UP if up else DOWN, lease_id)
                for s, b, up in chunk])
            for s, b, up in chunk:
                self._written[(s, b)] = up
        return changed

    async def forget(self, service: str, backend: str) -> None:
        """The backend left the config: delete this node's vote on it."""
        self.wanted.pop((service, backend), None)
        self._written.pop((service, backend), None)
        await self._store.delete(self._layout.vote(service, backend, self._node))

    async def rewrite(self, lease_id: int) -> None:
        """Write every wanted vote under ``lease_id`` (a new lease)."""
        self._written.clear()
        await self.vote_many(dict(self.wanted), lease_id)


@dataclass
class ClusterView:
    """Members, votes and drain slots as of etcd ``revision``; kept current
    by :meth:`apply` on watch batches of the cluster prefix."""

    layout: Layout
    revision: int = 0
    members: dict[str, MemberInfo] = field(default_factory=dict)
    votes: dict[Vote, bool] = field(default_factory=dict)
    slots: dict[int, str] = field(default_factory=dict)
    config_revision: int = 0
    """The config revision ``config/current`` names."""

    def _put(self, key: str, value: bytes) -> None:
        if (name := self.layout.member_name(key)) is not None:
            self.members[name] = MemberInfo.decode(value, key)
        elif (parts := self.layout.vote_parts(key)) is not None:
            self.votes[parts] = value == UP
        elif (slot := self.layout.slot_index(key)) is not None:
            try:
                self.slots[slot] = str(json.loads(value)["node"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConsensusDataError(f"{key}: not a drain slot: {exc}") from exc
        elif key == self.layout.current:
            try:
                self.config_revision = int(json.loads(value)["revision"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConsensusDataError(f"{key}: {exc}") from exc

    def _delete(self, key: str) -> None:
        if (name := self.layout.member_name(key)) is not None:
            self.members.pop(name, None)
        elif (parts := self.layout.vote_parts(key)) is not None:
            self.votes.pop(parts, None)
        elif (slot := self.layout.slot_index(key)) is not None:
            self.slots.pop(slot, None)

    @classmethod
    def from_snapshot(cls, layout: Layout, snaps: list[Snapshot]) -> ClusterView:
        """From snapshots of sub-prefixes all read at one etcd revision."""
        revisions = {s.revision for s in snaps}
        if len(revisions) != 1:
            raise ValueError(f"snapshots from several revisions: {sorted(revisions)}")
        view = cls(layout, revision=revisions.pop())
        for snap in snaps:
            for item in snap.items:
                view._put(item.key, item.value)
        return view

    def apply(self, batch: WatchBatch) -> None:
        """Apply one watch batch (events in revision order)."""
        for event in batch.events:
            if event.kind == "put":
                self._put(event.key, event.value)
            else:
                self._delete(event.key)
            self.revision = max(self.revision, event.mod_revision)

    def agreed(self, services: dict[str, list[str]]) -> dict[str, frozenset[str]]:
        """The agreed up set per service for the configured backends."""
        return agree(services, self.members.keys(), self.votes)


async def read_view(store: Store, layout: Layout) -> ClusterView:
    """Everything a node needs but the config documents, at one etcd
    revision (linearizable first read; the rest at its revision)."""
    rev, current = await store.get(layout.current)
    snaps = [await store.get_prefix(p, revision=rev)
             for p in (layout.members, layout.votes, layout.drain_slots)]
    view = ClusterView.from_snapshot(layout, snaps)
    if current is not None:
        view._put(current.key, current.value)
    return view


async def take_drain_slot(
    store: Store, layout: Layout, node: str, max_concurrent: int, lease_id: int, now: float,
) -> Held | Wait:
    """One attempt at a drain slot (:mod:`semaphore`): Held when this node
    holds one (now or already), Wait naming the holders otherwise. A lost
    race for a slot re-reads and decides again (at most ``max_concurrent``
    + 1 rounds). ``now``: wall clock s, stored for the operator."""
    for _ in range(max_concurrent + 1):
        snap = await store.get_prefix(layout.drain_slots)
        view = ClusterView.from_snapshot(layout, [snap])
        decision = decide(max_concurrent, view.slots, node)
        if not isinstance(decision, Take):
            return decision
        body = json.dumps({"node": node, "since": now}).encode()
        ok, _ = await store.transact([ModRevisionIs(layout.drain_slot(decision.slot), 0)],
                                     [Put(layout.drain_slot(decision.slot), body, lease_id)])
        if ok:
            return Held(decision.slot)
    return Wait(tuple(sorted(view.slots.values())))


async def release_drain_slot(store: Store, layout: Layout, slot: int) -> None:
    await store.delete(layout.drain_slot(slot))
