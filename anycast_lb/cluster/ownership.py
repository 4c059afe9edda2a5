"""Who owns which flow: the pure state of flow survival (no I/O, no clock reads).

- :class:`LocalFlows`: the flows this node owns, and what changed since the
  last published delta.
- :class:`PeerFlows` / :class:`Membership`: what each peer has told us
  (incarnation ``epoch``, delta ``seq``, its flows), liveness and expiry.
- :class:`Steering`: from the peers' claims and our own flows to the
  steering map (flow -> peer index), diffed against a shadow copy of the
  kernel map (listing a 110k-element map back takes seconds, and deleting
  a missing element aborts the whole nft transaction).

Rules for a peer's messages (each returns :class:`Effects`):

- A delta whose seq follows the last one is applied. A seq at or below the
  last is a duplicate and ignored. A seq further on leaves a gap: the delta
  is applied all the same (a later delta never contradicts a lost one for
  the keys it names) and the peer stays out of sync until a snapshot.
- A new epoch means the peer restarted: every flow of its old incarnation is
  gone (into the dead set, for a fast RST). Its state is complete from the
  start only if the first thing we hear is seq 0 (heartbeat) or 1 (delta).
- A snapshot at seq S replaces the peer's flows; the recent deltas after S
  are applied again. It brings the peer back in sync only if those deltas
  leave no gap.
- A peer not heard for ``expiry`` seconds is dead: its flows go to the dead
  set. If it is heard again with the same epoch, its flows return.
- Two claims on one 4-tuple (a stale socket): the
  newest claim (largest ``since_ms``) wins. If a live peer's claim is newer
  than our own flow, our socket is stale and is reported for abort.

Times: ``now`` is monotonic seconds; ``since_ms`` is the owner's wall clock
in ms when it accepted the flow.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from anycast_lb.flows import FlowKey

# How many applied deltas a peer keeps, to apply again on top of a snapshot
# that was taken before them.
RECENT_DELTAS = 512


@dataclass(frozen=True, slots=True)
class Delta:
    """Changes a peer published under one seq: flows added (with since_ms) and removed."""

    seq: int
    added: Mapping[FlowKey, int]
    removed: tuple[FlowKey, ...] = ()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every flow a peer owned right after its delta ``seq``."""

    seq: int
    flows: Mapping[FlowKey, int]


@dataclass(slots=True)
class Effects:
    """What a message or an expiry changed, for the steering map."""

    touched: set[FlowKey] = field(default_factory=set)
    """Keys whose claims changed: their steering entry must be recomputed."""
    dead: list[FlowKey] = field(default_factory=list)
    """Flows of a dead peer or a gone incarnation: send them to the local stack (RST)."""
    want_snapshot: bool = False
    """Ask this peer for a snapshot now."""
    liveness_changed: bool = False
    """The set of live steering peers changed: rewrite the chain."""
    gap: bool = False
    """A delta arrived after a missing seq."""
    added: list[int] = field(default_factory=list)
    """``since_ms`` of each flow a delta added (for the sync lag)."""

    def merge(self, other: Effects) -> None:
        self.touched |= other.touched
        self.dead += other.dead
        self.want_snapshot = self.want_snapshot or other.want_snapshot
        self.liveness_changed = self.liveness_changed or other.liveness_changed
        self.gap = self.gap or other.gap
        self.added += other.added


class LocalFlows:
    """The flows this node owns (client connections it accepted).

    ``take_delta`` returns what changed since it was last called: a flow
    opened and closed in between is never published. With a minimum age, a
    flow is published only once it has lived that long: a short connection
    that ends before then is never published at all, so it costs its peers
    no steering-map change (two ``nft`` transactions each otherwise).
    """

    def __init__(self) -> None:
        self.owned: dict[FlowKey, int] = {}
        # Keys changed since they were last published, with what was published
        # then (None: nothing). A young flow waits here until it is old enough.
        self._before: dict[FlowKey, int | None] = {}
        # Keys changed since the last take_delta (for the steering plan).
        self._touched: set[FlowKey] = set()
        self.next_due_ms: int | None = None
        """Wall ms at which the oldest flow still too young to publish comes
        of age (None: none waits); set by :meth:`take_delta`."""

    def __len__(self) -> int:
        return len(self.owned)

    def opened(self, key: FlowKey, since_ms: int) -> None:
        if key not in self._before:
            self._before[key] = self.owned.get(key)
        self.owned[key] = since_ms
        self._touched.add(key)

    def closed(self, key: FlowKey) -> None:
        if key not in self.owned:
            return
        if key not in self._before:
            self._before[key] = self.owned[key]
        del self.owned[key]
        self._touched.add(key)

    def take_delta(self, now_ms: int = 0, min_age_ms: int = 0
                   ) -> tuple[dict[FlowKey, int], list[FlowKey], set[FlowKey]]:
        """(added with since_ms, removed, every key touched) since the last
        call. A flow accepted less than ``min_age_ms`` before ``now_ms``
        (wall ms) is not added yet: it stays pending and :attr:`next_due_ms`
        says when it comes of age; a pending flow that closes is never
        published. Removals of published flows are never held back."""
        added: dict[FlowKey, int] = {}
        removed: list[FlowKey] = []
        pending: dict[FlowKey, int | None] = {}
        cutoff = now_ms - min_age_ms
        due: int | None = None
        for key, before in self._before.items():
            now = self.owned.get(key)
            if now is None:
                if before is not None:
                    removed.append(key)
            elif now != before:
                if min_age_ms and now > cutoff:
                    pending[key] = before
                    if due is None or now < due:
                        due = now
                    continue
                added[key] = now
        touched, self._touched = self._touched, set()
        self._before = pending
        self.next_due_ms = None if due is None else due + min_age_ms
        return added, removed, touched

    def published(self) -> dict[FlowKey, int]:
        """The owned flows as peers know them after the last :meth:`take_delta`:
        every owned flow but those still waiting to come of age."""
        before = self._before
        if not before:
            return dict(self.owned)
        return {k: v for k, v in self.owned.items() if k not in before or before[k] is not None}


class PeerFlows:
    """What one peer has told us. Mutated only through :class:`Membership`."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.epoch: int | None = None
        self.seq = 0
        self.flows: dict[FlowKey, int] = {}
        self.in_sync = False
        self.alive = False
        self.receiver = False
        """The peer runs its steering receiver (it may be sent packets)."""
        self.name = ""
        self.reported_owned = 0
        self.last_heard: float | None = None
        self.last_request: float | None = None
        self.gaps = 0
        self.snapshots = 0
        self.recent: deque[Delta] = deque(maxlen=RECENT_DELTAS)
        # The snapshot being received: (epoch, snapshot id, seq, parts) and
        # the parts so far. A part of another snapshot starts over.
        self.assembly: tuple[int, int, int, int] | None = None
        self.parts: dict[int, Mapping[FlowKey, int]] = {}

    @property
    def steerable(self) -> bool:
        return self.alive and self.receiver

    def _apply(self, delta: Delta, touched: set[FlowKey]) -> None:
        for key in delta.removed:
            if self.flows.pop(key, None) is not None:
                touched.add(key)
        for key, since in delta.added.items():
            if self.flows.get(key) != since:
                self.flows[key] = since
                touched.add(key)


class Membership:
    """Every peer's state, by index in the sorted peer list.

    ``expiry`` s without a message makes a peer dead; a snapshot request to
    one peer goes out at most every ``request_interval`` s.
    """

    def __init__(self, peers: int, expiry: float, request_interval: float) -> None:
        self.peers = [PeerFlows(i) for i in range(peers)]
        self.expiry = expiry
        self.request_interval = request_interval

    def steerable(self) -> tuple[int, ...]:
        """Indexes of live peers running their steering receiver."""
        return tuple(p.index for p in self.peers if p.steerable)

    # ------------------------------------------------------------ messages

    def _heard(self, peer: PeerFlows, now: float, epoch: int, effects: Effects) -> None:
        peer.last_heard = now
        if peer.epoch != epoch:
            if peer.epoch is not None and peer.alive:
                effects.dead += peer.flows
            effects.touched |= peer.flows.keys()
            peer.epoch = epoch
            peer.seq = 0
            peer.flows = {}
            peer.in_sync = False
            peer.recent.clear()
            peer.last_request = None
        if not peer.alive:
            peer.alive = True
            if peer.receiver:
                effects.liveness_changed = True
                effects.touched |= peer.flows.keys()

    def _ask(self, peer: PeerFlows, now: float, effects: Effects) -> None:
        if peer.last_request is None or now - peer.last_request >= self.request_interval:
            peer.last_request = now
            effects.want_snapshot = True

    def on_heartbeat(
        self, index: int, now: float, epoch: int, seq: int, *, receiver: bool,
        leaving: bool = False, name: str = "", owned: int = 0,
    ) -> Effects:
        """A heartbeat: the peer's epoch, its last delta seq, whether it
        runs the steering receiver, whether it is leaving (a clean stop)."""
        peer = self.peers[index]
        effects = Effects()
        fresh = peer.epoch != epoch
        self._heard(peer, now, epoch, effects)
        peer.name = name
        peer.reported_owned = owned
        if receiver != peer.receiver:
            peer.receiver = receiver
            effects.liveness_changed = True
            effects.touched |= peer.flows.keys()
        if fresh and seq == 0:
            peer.in_sync = True
        elif seq > peer.seq or not peer.in_sync:
            peer.in_sync = False  # the tail of its deltas was lost
            self._ask(peer, now, effects)
        if leaving:
            self._die(peer, effects)
        return effects

    def on_delta(self, index: int, now: float, epoch: int, delta: Delta) -> Effects:
        peer = self.peers[index]
        effects = Effects()
        fresh = peer.epoch != epoch
        self._heard(peer, now, epoch, effects)
        if delta.seq <= peer.seq:
            return effects  # a duplicate
        if delta.seq == peer.seq + 1:
            if fresh and delta.seq == 1:
                peer.in_sync = True
        else:
            peer.in_sync = False
            peer.gaps += 1
            effects.gap = True
        if not peer.in_sync:
            self._ask(peer, now, effects)
        peer._apply(delta, effects.touched)
        effects.added += delta.added.values()
        peer.seq = delta.seq
        peer.recent.append(delta)
        return effects

    def on_snapshot(self, index: int, now: float, epoch: int, snapshot: Snapshot) -> Effects:
        peer = self.peers[index]
        effects = Effects()
        self._heard(peer, now, epoch, effects)
        later = [d for d in peer.recent if d.seq > snapshot.seq]
        # In sync only if the deltas after the snapshot are all here.
        expected = range(snapshot.seq + 1, max(peer.seq, snapshot.seq) + 1)
        covered = [d.seq for d in later] == list(expected)
        if peer.in_sync and not covered:
            return effects  # older than what the recent deltas can bring forward
        old = peer.flows
        peer.flows = dict(snapshot.flows)
        for delta in later:
            peer._apply(delta, set())
        effects.touched |= {k for k, v in old.items() if peer.flows.get(k) != v}
        effects.touched |= {k for k, v in peer.flows.items() if old.get(k) != v}
        peer.seq = max(peer.seq, snapshot.seq)
        peer.in_sync = covered
        peer.snapshots += 1
        if not covered:
            self._ask(peer, now, effects)
        return effects

    def on_snapshot_part(
        self, index: int, now: float, epoch: int, seq: int, snapshot_id: int,
        part: int, parts: int, flows: Mapping[FlowKey, int],
    ) -> Effects:
        """One datagram of a snapshot split in ``parts``; the snapshot is
        applied when every part of the same ``snapshot_id`` is in. A lost
        part costs that snapshot only: the next one starts over."""
        peer = self.peers[index]
        ident = (epoch, snapshot_id, seq, parts)
        if peer.assembly != ident:
            peer.assembly = ident
            peer.parts = {}
        if 0 <= part < parts:
            peer.parts[part] = flows
        if len(peer.parts) < parts:
            effects = Effects()
            self._heard(peer, now, epoch, effects)
            return effects
        merged: dict[FlowKey, int] = {}
        for i in range(parts):
            merged.update(peer.parts[i])
        peer.assembly = None
        peer.parts = {}
        return self.on_snapshot(index, now, epoch, Snapshot(seq, merged))

    # ------------------------------------------------------------ expiry

    def _die(self, peer: PeerFlows, effects: Effects) -> None:
        if not peer.alive:
            return
        peer.alive = False
        effects.dead += peer.flows
        effects.touched |= peer.flows.keys()
        if peer.receiver:
            effects.liveness_changed = True

    def expire(self, now: float) -> Effects:
        """Mark dead every peer not heard for more than ``expiry`` s."""
        effects = Effects()
        for peer in self.peers:
            if peer.alive and peer.last_heard is not None and now - peer.last_heard > self.expiry:
                self._die(peer, effects)
        return effects

    def next_expiry(self) -> float | None:
        """Monotonic time at which the next live peer expires, if any."""
        times = [p.last_heard + self.expiry for p in self.peers
                 if p.alive and p.last_heard is not None]
        return min(times) if times else None


@dataclass(frozen=True, slots=True)
class MapPlan:
    """One batch of changes to the kernel's steering map."""

    delete: tuple[FlowKey, ...] = ()
    add: tuple[tuple[FlowKey, int], ...] = ()
    """(flow, peer index): also used for a flow that changes owner (after its delete)."""
    dead: tuple[FlowKey, ...] = ()
    """Flows to add to the dead set (added with a timeout, never deleted)."""
    stale_local: tuple[FlowKey, ...] = ()
    """Our own flows a live peer claims more recently: abort our sockets."""

    @property
    def empty(self) -> bool:
        return not (self.delete or self.add or self.dead)


class Steering:
    """The steering map's desired content and the shadow of the kernel's copy."""

    def __init__(self, membership: Membership, local: LocalFlows) -> None:
        self.membership = membership
        self.local = local
        self.shadow: dict[FlowKey, int] = {}

    def owner(self, key: FlowKey) -> tuple[int | None, bool]:
        """(index of the live peer packets of ``key`` go to, or None; whether
        our own flow with that key is stale)."""
        best: tuple[int, int] | None = None  # (since_ms, -index): newest, then lowest index
        for peer in self.membership.peers:
            since = peer.flows.get(key) if peer.steerable else None
            if since is not None and (best is None or (since, -peer.index) > best):
                best = (since, -peer.index)
        if best is None:
            return None, False
        mine = self.local.owned.get(key)
        if mine is not None and mine >= best[0]:
            return None, False
        return -best[1], mine is not None

    def plan(self, touched: Iterable[FlowKey], dead: Iterable[FlowKey] = ()) -> MapPlan:
        """The changes that bring the map in line for ``touched`` keys.

        Deletes only keys the shadow holds; a key whose owner changes is
        deleted and added again. Call :meth:`commit` once the kernel took it.
        """
        delete: list[FlowKey] = []
        add: list[tuple[FlowKey, int]] = []
        stale: list[FlowKey] = []
        for key in touched:
            want, is_stale = self.owner(key)
            have = self.shadow.get(key)
            if is_stale:
                stale.append(key)
            if want == have:
                continue
            if have is not None:
                delete.append(key)
            if want is not None:
                add.append((key, want))
        return MapPlan(tuple(delete), tuple(add), tuple(dict.fromkeys(dead)), tuple(stale))

    def commit(self, plan: MapPlan) -> None:
        for key in plan.delete:
            del self.shadow[key]
        for key, index in plan.add:
            self.shadow[key] = index

    def desired(self) -> dict[FlowKey, int]:
        """The whole map, for a full rewrite after a failed transaction."""
        keys: set[FlowKey] = set()
        for peer in self.membership.peers:
            if peer.steerable:
                keys |= peer.flows.keys()
        out: dict[FlowKey, int] = {}
        for key in keys:
            index, _ = self.owner(key)
            if index is not None:
                out[key] = index
        return out

    def replace(self, desired: Mapping[FlowKey, int]) -> None:
        """The kernel now holds exactly ``desired``."""
        self.shadow = dict(desired)
