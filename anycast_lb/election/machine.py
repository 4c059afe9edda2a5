"""Ownership of one VIP by election, with fencing (pure: no I/O, no clock).

One :class:`ElectionMachine` per VIP and node. The etcd side
(:mod:`anycast_lb.election.etcd`) feeds it what it observes, each input with
``now`` (monotonic seconds), and carries out the :class:`Action` values it
returns, in order:

==================  ======================================================
input               meaning
==================  ======================================================
``set_qualifies``   the node can serve the VIP now (not draining,
                    ``min_healthy`` backends up, listener up) or not
``lease_granted``   a new lease (id, TTL granted by etcd, time the grant
                    request was sent)
``keepalive_ok``    a keepalive etcd acknowledged, with the time it was
                    *sent* (the lease was renewed at or after that time)
``lease_lost``      etcd no longer knows the lease: every key under it
                    is gone
``observe``         the owner key (or its absence) and the candidate keys
                    as of one etcd revision
``campaign_result`` the create-if-absent of the owner key won (its create
                    revision, the term) or did not (None)
``tick``            time passed (call it at :meth:`next_wakeup`)
==================  ======================================================

Rules (docs/l2.md):

- **Fencing.** An owner holds the VIP only while its lease is provably
  alive: ``now < last_keepalive_sent + ttl - safety_margin``. etcd counts the
  TTL from when its leader *received* the keepalive, never earlier than
  when it was sent, so the owner drops the VIP at least ``safety_margin`` s
  before etcd can delete its key and let anyone else win. A fenced owner
  whose keepalive later succeeds still holds its key (the lease never
  expired, nobody else could win) and takes the VIP again.
- **Terms** are the owner key's create revision: etcd revisions only grow,
  so a later owner always has a higher term. Observations older than the
  highest term seen are ignored.
- **Candidacy.** A node advertises a candidate key while it qualifies and
  has a lease; it campaigns for a vacant VIP only when no qualifying
  candidate ranks above it (priority, then name), or once the VIP has been
  vacant for ``lease_ttl`` s (a higher candidate that never campaigns does
  not block the VIP for long).
- **Planned moves are make-before-break.** An owner that stops qualifying,
  or sees a qualifying candidate of higher priority with ``preempt`` set,
  resigns: it deletes its owner key but keeps the VIP until the successor's
  key says it has announced, for at most ``handover_timeout`` s and never
  past its fencing deadline; then it drops the VIP.
- **Announcements**: one with every take, then at ``announce_burst`` offsets
  after it, then every ``announce_interval`` s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Role(str, Enum):
    STANDBY = "standby"
    """Another node owns the VIP, or this node does not qualify."""
    CANDIDATE = "candidate"
    """The VIP is vacant and this node qualifies: it campaigns or defers."""
    OWNER = "owner"
    """This node holds the owner key (and the VIP while its lease is alive)."""
    RESIGNED = "resigned"
    """Deleted its owner key; holds the VIP until the successor announced."""


@dataclass(frozen=True)
class Candidate:
    node: str
    priority: int
    preempt: bool


@dataclass(frozen=True)
class OwnerRecord:
    """The owner key of a VIP as observed in etcd."""

    node: str
    term: int
    """The key's create revision (fencing token)."""
    lease: int
    """The etcd lease the key is attached to."""
    announced: bool
    """The owner has added the VIP and sent its first announcement."""


@dataclass(frozen=True)
class ElectionSettings:
    node: str
    lease_ttl: float
    """s, as asked; the machine fences on the TTL etcd granted."""
    safety_margin: float
    """s before etcd could expire the lease at which an owner drops the VIP."""
    priority: int = 100
    preempt: bool = False
    handover_timeout: float = 1.0
    """s a resigning owner keeps the VIP waiting for its successor."""
    announce_burst: tuple[float, ...] = (0.1, 0.3, 0.7, 1.5)
    """s after a take at which the announcement is sent again."""
    announce_interval: float = 10.0
    """s between periodic announcements after the burst."""
    resign_retry: float = 0.5
    """s between attempts to delete an owner key this node gave up."""
    campaign_retry: float = 0.2
    """s after a campaign that did not win before the next one."""


@dataclass(frozen=True)
class Campaign:
    """Create the owner key if absent, under this node's lease."""


@dataclass(frozen=True)
class Take:
    """Add the VIP, announce it, then mark the owner key announced."""

    term: int


@dataclass(frozen=True)
class Announce:
    """Send the gratuitous ARP / unsolicited NA again."""

    term: int


@dataclass(frozen=True)
class Resign:
    """Delete this node's owner key of ``term`` (if still there)."""

    term: int


@dataclass(frozen=True)
class Drop:
    """Remove the VIP (stop answering for it)."""

    term: int
    reason: str
    """``fenced``, ``resigned``, ``superseded``, ``key_lost`` or ``lease_lost``."""


@dataclass(frozen=True)
class Advertise:
    """Put (``on``) or delete this node's candidate key."""

    on: bool


Action = Campaign | Take | Announce | Resign | Drop | Advertise


@dataclass(frozen=True)
class VipState:
    role: Role
    owner: str | None
    """The owner as last observed (this node while it owns)."""
    term: int | None
    since: float | None
    """Monotonic s: when this node took the VIP, or when the owner was first seen."""
    has_vip: bool
    fence_deadline: float | None


@dataclass
class ElectionMachine:
    settings: ElectionSettings
    role: Role = Role.STANDBY
    qualifies: bool = False
    lease_id: int | None = None
    lease_ttl: float | None = None
    lease_ok_at: float | None = None
    owner: OwnerRecord | None = None
    candidates: tuple[Candidate, ...] = ()
    highest_term: int = 0
    term: int | None = None
    has_vip: bool = False
    since: float | None = None
    _seen_revision: int = 0
    _campaigning: bool = False
    _campaign_failed_at: float | None = None
    _advertised: bool = False
    _released_at: float | None = None
    _resigned_term: int | None = None
    _resign_sent_at: float | None = None
    _vacant_since: float | None = None
    _next_announce: float | None = None
    _burst: list[float] = field(default_factory=list)

    # -- inputs -------------------------------------------------------------

    def set_qualifies(self, qualifies: bool, now: float) -> list[Action]:
        self.qualifies = qualifies
        return self._reconcile(now)

    def lease_granted(self, lease_id: int, ttl: float, sent_at: float, now: float) -> list[Action]:
        self.lease_id, self.lease_ttl, self.lease_ok_at = lease_id, ttl, sent_at
        return self._reconcile(now)

    def keepalive_ok(self, sent_at: float, now: float) -> list[Action]:
        if self.lease_id is not None and (self.lease_ok_at is None or sent_at > self.lease_ok_at):
            self.lease_ok_at = sent_at
        return self._reconcile(now)

    def advertise_failed(self, on: bool, now: float) -> list[Action]:
        """The ``Advertise(on)`` sent last did not reach etcd: send it again
        (a candidate key that never got written would hide this node from
        the election: no preemption, no priority order)."""
        if self._advertised == on:
            self._advertised = not on
        return self._reconcile(now)

    def lease_lost(self, now: float) -> list[Action]:
        self.lease_id = self.lease_ttl = self.lease_ok_at = None
        self._advertised = False  # etcd deleted the candidate key with the lease
        return self._reconcile(now)

    def observe(
        self, owner: OwnerRecord | None, candidates: tuple[Candidate, ...], revision: int,
        now: float,
    ) -> list[Action]:
        """The owner key and candidate keys as of etcd ``revision``; an
        observation older than one already applied, or naming a term below
        the highest seen, is ignored."""
        if revision < self._seen_revision or (owner is not None and owner.term < self.highest_term):
            return self._reconcile(now)
        self._seen_revision = revision
        self.candidates = candidates
        if owner is None:
            if self.owner is not None or self._vacant_since is None:
                self._vacant_since = now
        else:
            self._vacant_since = None
            self.highest_term = owner.term
            if self.owner is None or self.owner.term != owner.term:
                if not self._is_mine(owner):
                    self.since = now
        self.owner = owner
        return self._reconcile(now)

    def campaign_result(self, term: int | None, now: float) -> list[Action]:
        self._campaigning = False
        self._campaign_failed_at = now if term is None else None
        if term is not None and term >= self.highest_term:
            self.highest_term = term
            self._seen_revision = max(self._seen_revision, term)
            if self.lease_id is not None:
                self.owner = OwnerRecord(self.settings.node, term, self.lease_id, False)
                self._vacant_since = None
        return self._reconcile(now)

    def tick(self, now: float) -> list[Action]:
        return self._reconcile(now)

    # -- queries ------------------------------------------------------------

    def fence_deadline(self) -> float | None:
        """Monotonic s at which an owner must have dropped the VIP."""
        if self.lease_ok_at is None or self.lease_ttl is None:
            return None
        return self.lease_ok_at + self.lease_ttl - self.settings.safety_margin

    def alive(self, now: float) -> bool:
        deadline = self.fence_deadline()
        return deadline is not None and now < deadline

    def next_wakeup(self, now: float) -> float | None:
        """Monotonic s after ``now`` at which :meth:`tick` must run next
        (None: nothing is due until the next input)."""
        times: list[float] = []
        deadline = self.fence_deadline()
        if deadline is not None and self.has_vip:
            times.append(deadline)
        if self.has_vip and self.role is Role.OWNER and self._next_announce is not None:
            times.append(self._next_announce)
        if self.role is Role.RESIGNED and self._released_at is not None:
            times.append(self._released_at + self.settings.handover_timeout)
        if self.role is Role.CANDIDATE and self._vacant_since is not None:
            times.append(self._vacant_since + (self.lease_ttl or self.settings.lease_ttl))
        if self.role is Role.CANDIDATE and self._campaign_failed_at is not None:
            times.append(self._campaign_failed_at + self.settings.campaign_retry)
        if self._resign_sent_at is not None and self.owner is not None and self._is_mine(self.owner):
            times.append(self._resign_sent_at + self.settings.resign_retry)
        later = [t for t in times if t > now]
        return min(later) if later else None

    def state(self) -> VipState:
        owner = self.owner.node if self.owner is not None else None
        return VipState(self.role, owner, self.owner.term if self.owner else None,
                        self.since, self.has_vip, self.fence_deadline())

    # -- the rules ----------------------------------------------------------

    def _is_mine(self, owner: OwnerRecord) -> bool:
        return self.lease_id is not None and owner.lease == self.lease_id \
            and owner.node == self.settings.node

    def _preempted(self) -> bool:
        me = self.settings
        return any(c.node != me.node and c.preempt and c.priority > me.priority
                   for c in self.candidates)

    def _outranked(self) -> bool:
        me = self.settings
        return any(c.node != me.node and (c.priority > me.priority or
                                          (c.priority == me.priority and c.node < me.node))
                   for c in self.candidates)

    def _drop(self, reason: str, out: list[Action]) -> None:
        if self.has_vip:
            out.append(Drop(self.term or 0, reason))
            self.has_vip = False
            self._next_announce = None

    def _take(self, now: float, out: list[Action]) -> None:
        assert self.term is not None and self.term >= self.highest_term
        out.append(Take(self.term))
        self.has_vip = True
        self.since = now
        self._burst = [now + offset for offset in self.settings.announce_burst]
        self._next_announce = self._burst.pop(0) if self._burst else now + self.settings.announce_interval

    def _reconcile(self, now: float) -> list[Action]:
        out: list[Action] = []
        alive = self.alive(now)
        owner = self.owner
        mine = owner is not None and self._is_mine(owner)

        want_advertised = self.qualifies and self.lease_id is not None
        if want_advertised != self._advertised:
            out.append(Advertise(want_advertised))
            self._advertised = want_advertised

        if self.role is Role.OWNER:
            if self.lease_id is None:
                self._drop("lease_lost", out)
                self.role = Role.STANDBY
            elif not alive:
                self._drop("fenced", out)  # stays owner: a late keepalive takes it again
            elif owner is None or not mine or owner.term != self.term:
                self._drop("superseded" if owner is not None else "key_lost", out)
                self.role = Role.STANDBY
            elif not self.qualifies or self._preempted():
                out.append(Resign(self.term))
                self._resigned_term, self._resign_sent_at = self.term, now
                self._released_at = now
                self.role = Role.RESIGNED if self.has_vip else Role.STANDBY
            elif not self.has_vip:
                self._take(now, out)
            elif self._next_announce is not None and now >= self._next_announce:
                out.append(Announce(self.term))
                self._next_announce = (self._burst.pop(0) if self._burst
                                       else now + self.settings.announce_interval)

        if self.role is Role.RESIGNED or (self.role is not Role.OWNER and mine):
            self._retry_resign(now, out)

        if self.role is Role.RESIGNED:
            successor = (owner is not None and not mine and owner.announced
                         and self.term is not None and owner.term > self.term)
            assert self._released_at is not None
            if successor:
                self._drop("resigned", out)
            elif not alive:
                self._drop("fenced", out)
            elif now >= self._released_at + self.settings.handover_timeout:
                self._drop("resigned", out)
            if not self.has_vip:
                self.role = Role.STANDBY

        if self.role in (Role.STANDBY, Role.CANDIDATE):
            if mine and owner is not None and owner.term == self._resigned_term:
                pass  # our resign has not reached etcd yet (sent again above)
            elif mine and owner is not None and alive and self.qualifies \
                    and owner.term >= self.highest_term:
                # Our campaign won (its answer may have been lost on the way).
                # A record of ours below the highest term seen is stale: a
                # later campaign of ours won while this node had no lease.
                self.role, self.term = Role.OWNER, owner.term
                self._take(now, out)
            elif owner is None and self.qualifies:
                self.role = Role.CANDIDATE
                vacant_for = now - self._vacant_since if self._vacant_since is not None else 0.0
                patience = self.lease_ttl or self.settings.lease_ttl
                rested = self._campaign_failed_at is None or \
                    now >= self._campaign_failed_at + self.settings.campaign_retry
                observed = self._seen_revision > 0  # candidates known
                if alive and observed and not self._campaigning and rested and \
                        (not self._outranked() or vacant_for >= patience):
                    out.append(Campaign())
                    self._campaigning = True
            else:
                self.role = Role.STANDBY
        return out

    def _retry_resign(self, now: float, out: list[Action]) -> None:
        """Delete again an owner key this node gave up that etcd still shows."""
        owner = self.owner
        if owner is None or not self._is_mine(owner) or owner.term != self._resigned_term:
            return
        if self._resign_sent_at is None or now >= self._resign_sent_at + self.settings.resign_retry:
            out.append(Resign(owner.term))
            self._resign_sent_at = now
