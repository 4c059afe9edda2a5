"""VIP ownership elections on etcd: runs one :class:`ElectionMachine` per VIP
over the :class:`~anycast_lb.consensus.store.Store` adapter.

Keys, under ``/anycast-lb/<cluster>/owners/<vip>/`` (docs/l2.md)::

    owner                {"node", "priority", "announced", "since"}   owner's lease
    candidates/<node>    {"node", "priority", "preempt"}     candidate's lease

- A node has one lease for all its VIPs (granted here, TTL ``lease_ttl``),
  renewed every ``lease_ttl / 4`` s. The machine fences on the time each
  keepalive was *sent*.
- Campaign: one transaction that creates ``owner`` only if absent (create
  revision 0); the revision it commits at is the key's create revision, the
  **term**.
- Take: ``on_take`` (add the VIP, announce), then ``announced: true`` (and
  ``since``, wall-clock s of the take) written only if the key's mod revision is still the term (the key untouched).
- Resign: delete ``owner`` only if its mod revision is the one last seen
  (with this node's candidate key when it no longer qualifies, in one
  transaction).
- Observe: the whole ``owners/`` prefix once, then a watch from the next
  revision; a compacted watch reads again.

:class:`VipOwnership` is what a node runs: ``run()`` until cancelled, with
``set_qualifies`` fed from its health and drain state and three callbacks
that move the VIP (``L2VipActions`` for ``via: l2``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from anycast_lb import log
from anycast_lb.clock import Clock, SystemClock, wait_event
from anycast_lb.consensus.keys import Layout, json_object
from anycast_lb.consensus.store import Delete, ModRevisionIs, Put, Store
from anycast_lb.election.fence import KernelFence
from anycast_lb.election.l2 import L2Announcer, VipAddresses
from anycast_lb.election.machine import (
    Action,
    Advertise,
    Announce,
    Campaign,
    Candidate,
    Drop,
    ElectionMachine,
    ElectionSettings,
    OwnerRecord,
    Resign,
    Role,
    Take,
    VipState,
)
from anycast_lb.errors import ConsensusCompacted, ConsensusError, L2Error, LeaseLost

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
TakeCallback = Callable[[IPAddress, int], Awaitable[None]]
DropCallback = Callable[[IPAddress, int, str], Awaitable[None]]


def owner_key(layout: Layout, vip: IPAddress) -> str:
    return f"{layout.owners}{vip}/owner"


def candidate_key(layout: Layout, vip: IPAddress, node: str) -> str:
    return f"{layout.owners}{vip}/candidates/{node}"


@dataclass
class _Key:
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


ADVERTISE_RETRY = 1.0
"""s before a candidate advertisement that failed is sent again."""


class L2VipActions:
    """The callbacks for ``via: l2`` on one interface: take adds the VIP and
    announces it, announce sends again, quiet (a resign: make before break)
    moves the VIP to ``lo``, drop removes it.

    Quiet is what keeps a planned move free of a split brain: on ``lo`` the
    old owner still accepts the VIP's packets from neighbours whose entry
    has not moved yet, but answers no ARP request (the interface has
    ``arp_ignore`` 1, see :meth:`prepare`) and no Neighbor Solicitation
    (Linux answers NS only for addresses on the receiving interface), so
    from the successor's first announcement on only one MAC answers."""

    def __init__(self, interface: str) -> None:
        self.addresses = VipAddresses(interface)
        self.quiet_addresses = VipAddresses("lo")
        self.announcer = L2Announcer(interface)
        self.fence = KernelFence()

    def prepare(self, vips: Sequence[IPAddress] = ()) -> None:
        """Open the raw socket and set the interface's ``arp_ignore`` to 1
        (answer ARP only for addresses on the interface itself, so a VIP on
        ``lo`` is not answered) and ``arp_announce`` to 2 (ARP requests the
        node sends carry the interface's own address, never a VIP), and
        sets up the kernel fence for ``vips`` (:mod:`anycast_lb.election.fence`:
        the kernel answers for none of them until :meth:`KernelFence.hold`).
        Raises L2Error when the interface is missing, the sysctls cannot
        be written or nftables refuses (root or ``CAP_NET_ADMIN``)."""
        self.announcer.open()
        self.fence.setup(vips)
        base = Path("/proc/sys/net/ipv4/conf") / self.announcer.interface
        for name, value in (("arp_ignore", "1"), ("arp_announce", "2")):
            path = base / name
            try:
                if path.read_text().strip() != value:
                    path.write_text(value + "\n")
            except OSError as exc:
                raise L2Error(f"{path}: {exc} (via: l2 needs {name}={value} on "
                              f"{self.announcer.interface})") from exc

    async def clear(self, vip: IPAddress) -> None:
        """Remove ``vip`` from the interface and ``lo`` (start-up, drop)."""
        await self.addresses.remove(vip)
        await self.quiet_addresses.remove(vip)

    async def take(self, vip: IPAddress, term: int) -> None:
        await self.addresses.add(vip)
        self.announcer.announce(vip)
        await self.quiet_addresses.remove(vip)

    async def announce(self, vip: IPAddress, term: int) -> None:
        self.announcer.announce(vip)

    async def quiet(self, vip: IPAddress, term: int) -> None:
        await self.quiet_addresses.add(vip)
        await self.addresses.remove(vip)

    async def drop(self, vip: IPAddress, term: int, reason: str) -> None:
        await self.clear(vip)


class VipOwnership:
    """Elections for ``vips`` as node ``settings.node``; see the module doc.

    Callbacks run on the event loop, one at a time, in the machine's order:
    ``on_take(vip, term)``, ``on_announce(vip, term)``, ``on_drop(vip, term,
    reason)``. They must be quick (a netlink call, a frame): a drop waits
    behind them. etcd calls run in a task of their own, so a slow etcd never
    delays a drop.
    """

    def __init__(
        self,
        store: Store,
        cluster: str,
        settings: ElectionSettings,
        vips: Sequence[IPAddress],
        *,
        on_take: TakeCallback,
        on_announce: TakeCallback,
        on_drop: DropCallback,
        on_resign: TakeCallback | None = None,
        clock: Clock | None = None,
        retry: float = 0.2,
    ) -> None:
        self._store = store
        self._layout = Layout(cluster)
        self.settings = settings
        self._clock = clock or SystemClock()
        self._retry = retry
        self.machines = {vip: ElectionMachine(settings) for vip in vips}
        self._keys: dict[str, _Key] = {}
        self._on_take, self._on_announce, self._on_drop = on_take, on_announce, on_drop
        self._on_resign = on_resign
        self._retries: set[asyncio.Task[None]] = set()
        self._local: asyncio.Queue[tuple[IPAddress, Action]] = asyncio.Queue()
        self._remote: asyncio.Queue[tuple[IPAddress, Action]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._lease_id = 0
        self.started = asyncio.Event()
        """Set once the first lease is granted and the owners were read."""

    # -- what the node feeds and reads ---------------------------------------

    def set_qualifies(self, vip: IPAddress, qualifies: bool) -> None:
        """The node can (True) or cannot serve ``vip`` now."""
        self._feed([vip], lambda m, now: m.set_qualifies(qualifies, now))

    def states(self) -> dict[IPAddress, VipState]:
        return {vip: m.state() for vip, m in self.machines.items()}

    async def run(self) -> None:
        """Run until cancelled; on cancellation drops every VIP it holds."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._lease_loop())
                tasks.create_task(self._watch_loop())
                tasks.create_task(self._tick_loop())
                tasks.create_task(self._local_loop())
                tasks.create_task(self._remote_loop())
        finally:
            for vip, m in self.machines.items():
                if m.has_vip:
                    m.has_vip = False
                    await self._on_drop(vip, m.term or 0, "stopped")

    # -- plumbing ------------------------------------------------------------

    def _feed(self, vips: Iterable[IPAddress],
              step: Callable[[ElectionMachine, float], list[Action]]) -> None:
        now = self._clock.monotonic()
        for vip in vips:
            self._dispatch(vip, step(self.machines[vip], now))
        self._wake.set()

    def _dispatch(self, vip: IPAddress, actions: list[Action]) -> None:
        holding = self.machines[vip].has_vip
        for action in actions:
            # A resign while holding the VIP goes through the local queue
            # first (on_resign: L2 goes quiet), then to etcd.
            local = isinstance(action, (Take, Announce, Drop)) or (
                isinstance(action, Resign) and holding and self._on_resign is not None)
            (self._local if local else self._remote).put_nowait((vip, action))
            _log_action(vip, self.settings.node, action)

    async def _tick_loop(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock.monotonic()
            for vip, m in self.machines.items():
                self._dispatch(vip, m.tick(now))
            wakes = [w for m in self.machines.values() if (w := m.next_wakeup(now)) is not None]
            timeout = max(0.0, min(wakes) - now) if wakes else None
            await wait_event(self._clock, self._wake, timeout)

    async def _local_loop(self) -> None:
        while True:
            vip, action = await self._local.get()
            try:
                if isinstance(action, Take):
                    await self._on_take(vip, action.term)
                    self._remote.put_nowait((vip, action))  # then mark it announced
                elif isinstance(action, Announce):
                    await self._on_announce(vip, action.term)
                elif isinstance(action, Drop):
                    await self._on_drop(vip, action.term, action.reason)
                elif isinstance(action, Resign):
                    try:
                        if self._on_resign is not None:
                            await self._on_resign(vip, action.term)
                    finally:
                        self._remote.put_nowait((vip, action))
            except Exception as exc:
                log.error("vip.action_failed", vip=str(vip), action=type(action).__name__,
                          error=str(exc))

    async def _remote_loop(self) -> None:
        while True:
            vip, action = await self._remote.get()
            try:
                await self._remote_action(vip, action)
            except ConsensusError as exc:
                log.warning("vip.etcd_failed", vip=str(vip), action=type(action).__name__,
                            error=str(exc))
                if isinstance(action, Advertise):
                    retry = asyncio.create_task(self._advertise_again(vip, action.on))
                elif isinstance(action, Take):
                    retry = asyncio.create_task(self._mark_again(vip, action))
                else:
                    continue
                self._retries.add(retry)
                retry.add_done_callback(self._retries.discard)

    async def _advertise_again(self, vip: IPAddress, on: bool) -> None:
        # Not urgent (a missing candidate key costs the priority order, not
        # safety), and one log line a second per VIP while etcd is away.
        await self._clock.sleep(max(self._retry, ADVERTISE_RETRY))
        self._feed([vip], lambda m, now: m.advertise_failed(on, now))

    async def _mark_again(self, vip: IPAddress, take: Take) -> None:
        # A resigned predecessor keeps the VIP until this mark says the
        # successor announced (make before break): a lost mark would make
        # every handover to this node wait the whole handover_timeout. The
        # write is conditional on the key being untouched since the take,
        # so a mark that did land is not written twice.
        await self._clock.sleep(self._retry)
        m = self.machines[vip]
        if m.role is Role.OWNER and m.has_vip and m.term == take.term:
            self._remote.put_nowait((vip, take))

    async def _remote_action(self, vip: IPAddress, action: Action) -> None:
        s, key = self.settings, owner_key(self._layout, vip)
        if isinstance(action, Campaign):
            value = json.dumps({"node": s.node, "priority": s.priority, "announced": False,
                                "since": round(self._clock.wall(), 3)})
            try:
                ok, revision = await self._store.transact(
                    [ModRevisionIs(key, 0)], [Put(key, value.encode(), self._lease_id)])
            except ConsensusError:
                ok, revision = False, 0
            self._feed([vip], lambda m, now: m.campaign_result(revision if ok else None, now))
        elif isinstance(action, Take):
            value = json.dumps({"node": s.node, "priority": s.priority, "announced": True,
                                "since": round(self._clock.wall(), 3)})
            await self._store.transact(
                [ModRevisionIs(key, action.term)], [Put(key, value.encode(), self._lease_id)])
        elif isinstance(action, Resign):
            seen = self._keys.get(key)
            if seen is not None and seen.create_revision == action.term:
                deletes = [Delete(key)]
                if not self.machines[vip].qualifies:
                    # The candidate key goes in the same revision as the
                    # owner key. Left behind (its own delete lost, a timeout
                    # under load), it would outrank the successor, who then
                    # defers for lease_ttl while this node drops the VIP at
                    # handover_timeout: break before make.
                    deletes.append(Delete(candidate_key(self._layout, vip, s.node)))
                await self._store.transact([ModRevisionIs(key, seen.mod_revision)], deletes)
        elif isinstance(action, Advertise):
            ckey = candidate_key(self._layout, vip, s.node)
            if action.on:
                value = json.dumps({"node": s.node, "priority": s.priority, "preempt": s.preempt})
                await self._store.put(ckey, value.encode(), lease=self._lease_id)
            else:
                await self._store.delete(ckey)

    async def _lease_loop(self) -> None:
        vips = list(self.machines)
        while True:
            sent = self._clock.monotonic()
            try:
                lease = await self._store.grant(self.settings.lease_ttl)
            except ConsensusError:
                await self._clock.sleep(self._retry)
                continue
            self._lease_id = lease.id
            self._feed(vips, lambda m, now: m.lease_granted(lease.id, lease.ttl, sent, now))
            interval = lease.ttl / 4
            while True:
                await self._clock.sleep(interval)
                sent = self._clock.monotonic()
                try:
                    await self._store.keepalive(lease.id)
                except LeaseLost:
                    log.warning("vip.lease_lost", node=self.settings.node, lease=f"{lease.id:x}")
                    self._feed(vips, lambda m, now: m.lease_lost(now))
                    break
                except ConsensusError:
                    continue
                acked = sent
                self._feed(vips, lambda m, now: m.keepalive_ok(acked, now))

    async def _watch_loop(self) -> None:
        prefix = self._layout.owners
        while True:
            try:
                snap = await self._store.get_prefix(prefix)
            except ConsensusError:
                await self._clock.sleep(self._retry)
                continue
            self._keys = {kv.key: _Key(kv.value, kv.create_revision, kv.mod_revision, kv.lease)
                          for kv in snap.items}
            self._observe(self.machines, snap.revision)
            self.started.set()
            try:
                async for batch in self._store.watch_prefix(prefix, snap.revision + 1):
                    touched = set()
                    for event in batch.events:
                        if event.kind == "delete":
                            self._keys.pop(event.key, None)
                        else:
                            self._keys[event.key] = _Key(event.value, event.create_revision,
                                                         event.mod_revision, event.lease)
                        touched.add(event.key[len(prefix):].split("/", 1)[0])
                    self._observe([v for v in self.machines if str(v) in touched], batch.revision)
            except ConsensusCompacted:
                continue

    def _observe(self, vips: Iterable[IPAddress], revision: int) -> None:
        now = self._clock.monotonic()
        for vip in vips:
            owner, candidates = self._view(vip)
            self._dispatch(vip, self.machines[vip].observe(owner, candidates, revision, now))
        self._wake.set()

    def _view(self, vip: IPAddress) -> tuple[OwnerRecord | None, tuple[Candidate, ...]]:
        key = owner_key(self._layout, vip)
        owner = None
        if (raw := self._keys.get(key)) is not None:
            doc = json_object(raw.value)
            owner = OwnerRecord(str(doc.get("node", "")), raw.create_revision, raw.lease,
                                bool(doc.get("announced", False)))
        base = candidate_key(self._layout, vip, "")
        candidates = []
        for k, raw in sorted(self._keys.items()):
            if k.startswith(base):
                doc = json_object(raw.value)
                priority = doc.get("priority")
                candidates.append(Candidate(k[len(base):], priority if isinstance(priority, int)
                                            else 0, doc.get("preempt") is True))
        return owner, tuple(candidates)


def _log_action(vip: IPAddress, node: str, action: Action) -> None:
    """One log line per ownership change this node makes (event names are
    literals: docs/logging.md lists them)."""
    if isinstance(action, Take):
        log.event("vip.take", vip=str(vip), node=node, term=action.term)
    elif isinstance(action, Drop):
        log.warning("vip.drop", vip=str(vip), node=node, term=action.term, reason=action.reason)
    elif isinstance(action, Resign):
        log.event("vip.resign", vip=str(vip), node=node, term=action.term)
    elif isinstance(action, Campaign):
        log.event("vip.campaign", vip=str(vip), node=node)
