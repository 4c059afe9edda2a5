"""The node's consensus part: membership, agreed backend health, pushed
config and drain slots on etcd, and fail-static when etcd is gone.

Run by the node in its ``TaskGroup`` when the config has a ``consensus:``
section (:meth:`ConsensusAgent.run`); a standalone node has none.

While **synced**, the agent

- keeps the node's member key and its health votes under its lease
  (:class:`~anycast_lb.consensus.members.MemberWriter`,
  :class:`~anycast_lb.consensus.members.VoteWriter`); the health monitor's
  transitions become votes (:meth:`local_changed`) and never touch the pools;
- reads members, votes and drain slots at one etcd revision, follows the
  cluster prefix with a watch, and after every batch sets each pool's up set
  to the agreed set (:func:`~anycast_lb.consensus.agree.agree`), so every
  node builds the same Maglev table from the same revision;
- applies a new config revision (``config/current``): fetched, merged with
  the node's own file (:func:`~anycast_lb.consensus.document.merge`) and
  handed to the node's ``apply`` callable; a revision that fails validation
  is refused whole and the node keeps what it runs.

It is **isolated** (:func:`isolated`) when the lease has not been renewed
for ``lease_ttl`` s or two linearizable reads in a row failed. Then it
freezes: the pools keep the last agreed set, votes are only remembered, and
the node announces on its own health of the frozen table's backends
(:meth:`announce_healthy`): it never withdraws because etcd is unreachable.
It retries every ``lease_ttl / 3`` s; when etcd answers again it grants a
new lease, registers, rewrites its votes, re-reads the state at one
revision, logs what changed meanwhile (``consensus.resynced``) and watches
again.

Log events: ``consensus.synced``, ``consensus.isolated`` (reason),
``consensus.resynced`` (changes), ``consensus.agreed`` (service, up, down,
revision), ``config.applied``, ``config.refused``, ``config.restart_needed``,
``consensus.watch_compacted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from anycast_lb import __version__, log
from anycast_lb.clock import Clock, SystemClock, wait_event
from anycast_lb.config import ConsensusConfig, NodeConfig
from anycast_lb.consensus import document
from anycast_lb.consensus.agree import contested, disagreement
from anycast_lb.consensus.history import ConfigHistory
from anycast_lb.consensus.keys import Layout
from anycast_lb.consensus.members import (
    ClusterView,
    MemberInfo,
    MemberWriter,
    VoteWriter,
    read_view,
    release_drain_slot,
    take_drain_slot,
)
from anycast_lb.consensus.semaphore import Held
from anycast_lb.consensus.store import LeaseKeeper, Store
from anycast_lb.errors import (
    ConfigError,
    ConsensusCompacted,
    ConsensusDataError,
    ConsensusError,
    ConsensusUnavailable,
)
from anycast_lb.pool import Backend, Pool

ApplyConfig = Callable[[NodeConfig], Awaitable[bool]]
"""The node's way to run a merged config: True once it runs it, False when
it could not apply it live (a restart is needed). Raises ConfigError to
refuse it."""
OnPoolChange = Callable[[str, Backend, bool], None]
"""``(service, backend, up)`` after the agreed set moved a backend."""

FAILED_READS = 2
"""Linearizable reads failing in a row that make a node isolated."""
PREPARE_CONTESTED = 2
"""Tables prepared per service at each view, one per agreed-up backend some
member votes down (many contested backends at once are an outage of their
own, where the builds on agreement are the lesser cost)."""
PREPARE_ALL_UP_TO = 8
"""When a service's agreed set changes and holds at most this many
backends, the table for each single failure is prepared too (the table
cache holds ``pool.TABLE_CACHE`` tables, about 0.5 MB each at 65537 slots)."""


class State(str, Enum):
    STARTING = "starting"
    """Not yet synced once since the node started."""
    SYNCED = "synced"
    ISOLATED = "isolated"


def isolated(silent_for: float, failed_reads: int, lease_ttl: float) -> bool:
    """The fail-static rule (pure): a node is cut off from a quorum when
    its lease has gone ``lease_ttl`` s (or more) without an acknowledged
    keepalive, so etcd may already have dropped its votes, or when
    :data:`FAILED_READS` linearizable reads in a row failed. A silent watch
    proves nothing and is not an input."""
    return silent_for >= lease_ttl or failed_reads >= FAILED_READS


def view_changes(before: ClusterView, after: ClusterView) -> dict[str, list[str]]:
    """What changed between two views, for the resync log (pure): members
    joined and left, votes changed, config revision."""
    changes: dict[str, list[str]] = {}
    joined = sorted(after.members.keys() - before.members.keys())
    left = sorted(before.members.keys() - after.members.keys())
    if joined:
        changes["joined"] = joined
    if left:
        changes["left"] = left
    words = {True: "up", False: "down", None: "gone"}
    votes = sorted(f"{s}/{b}/{n}={words[after.votes.get((s, b, n))]}"
                   for (s, b, n) in before.votes.keys() | after.votes.keys()
                   if before.votes.get((s, b, n)) != after.votes.get((s, b, n)))
    if votes:
        changes["votes"] = votes
    if before.config_revision != after.config_revision:
        changes["config"] = [f"{before.config_revision}->{after.config_revision}"]
    return changes


@dataclass(frozen=True)
class ServiceTable:
    """The agreed set a service's table was built from."""

    up: frozenset[str]
    revision: int
    """The etcd revision of the view it was computed from."""


async def restart_needed(config: NodeConfig) -> bool:
    """The default ``apply``: a node without a live-apply path logs that the
    pushed revision waits for a restart and keeps running what it runs."""
    log.warning("config.restart_needed", services=len(config.services))
    return False


class ConsensusAgent:
    """The consensus part of one node (module docstring).

    ``local`` is the node's own file (the node-local part of every merged
    config); ``running`` returns the config the node runs now and ``pools``
    its pools (both may change when a config is applied). ``api`` and
    ``lan`` are written in the member key.
    """

    def __init__(
        self,
        settings: ConsensusConfig,
        local: NodeConfig,
        *,
        running: Callable[[], NodeConfig],
        pools: Callable[[], Mapping[str, Pool]],
        on_pool_change: OnPoolChange,
        apply: ApplyConfig = restart_needed,
        api: Callable[[], str] = lambda: "",
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.name = local.node.name
        self.layout = Layout(settings.cluster)
        self._local = local
        self._running = running
        self._pools = pools
        self._on_pool_change = on_pool_change
        self._apply = apply
        self._api = api
        self._clock = clock or SystemClock()
        self._started_wall = self._clock.wall()
        self.state = State.STARTING
        self.state_since = self._clock.monotonic()
        self.state_since_wall = self._started_wall
        self.state_reason = ""
        self.view: ClusterView | None = None
        self.tables: dict[str, ServiceTable] = {}
        self.local_health: dict[tuple[str, str], bool] = {}
        """This node's own verdict per (service, backend); absent: none yet."""
        self.config_revision = 0
        """The config revision last applied (or refused) here; 0: the node's file."""
        self.pushes_applied = 0
        self.pushes_refused = 0
        self.slot: int | None = None
        self.slot_holders: tuple[str, ...] = ()
        self.lease_id: int | None = None
        self._store: Store | None = None
        self._keeper: LeaseKeeper | None = None
        self._votes: VoteWriter | None = None
        self._votes_dirty = asyncio.Event()
        self._config_dirty = asyncio.Event()
        self._slots_moved = asyncio.Event()
        self._synced = asyncio.Event()
        self._watch_mark: tuple[tuple[str, str, str], bool, float] | None = None
        self._vote_since: float | None = None
        """Monotonic s of the oldest local transition not yet written."""
        self.watch_lag = 0.0
        """s from this node's last vote write to its arrival through the watch."""
        self._failed_reads = 0

    # ------------------------------------------------------------ node facing

    @property
    def isolated(self) -> bool:
        return self.state is State.ISOLATED

    def local_changed(self, service: str, backend: Backend, up: bool) -> None:
        """The health monitor's transition (its ``on_change``): a vote."""
        self.local_health[(service, backend.key)] = up
        if self._vote_since is None:
            self._vote_since = self._clock.monotonic()
        self._votes_dirty.set()
        if self.view is None:
            # Never synced (etcd unreachable since start): nothing agreed to
            # freeze, so the node serves on its own health, as standalone.
            pool = self._pools().get(service)
            if pool is not None and pool.set_up(backend.key, up):
                self._on_pool_change(service, backend, up)

    def announce_healthy(self, service: str) -> bool:
        """Whether the service may be announced: ``min_healthy`` of the
        table's backends (the agreed set, frozen while isolated) are up in
        this node's own checks too. A node that cannot reach enough of them
        itself could serve no flow, so it withdraws while the others keep
        the backends (the agreed set does not move for one node's view);
        losing etcd alone never withdraws a VIP. Never synced: the pools
        hold the node's own health, as standalone."""
        pool = self._pools()[service]
        if self.view is None:
            return pool.healthy
        mine = sum(1 for b in pool.backends
                   if b.up and self.local_health.get((service, b.key), False))
        return mine >= pool.service.min_healthy

    def disagreement(self) -> dict[str, frozenset[str]]:
        """Per service, backends whose local verdict differs from the agreed one."""
        pools = self._pools()
        agreed = {s: frozenset(b.key for b in p.backends if b.up) for s, p in pools.items()}
        local = {s: [b.key for b in p.backends if self.local_health.get((s, b.key), False)]
                 for s, p in pools.items()}
        return disagreement(agreed, local)

    async def wait_synced(self) -> None:
        await self._synced.wait()

    # ------------------------------------------------------------ drain slots

    async def acquire(self) -> None:
        """Wait until this node holds a drain slot (DrainSlots protocol)."""
        while True:
            self._slots_moved.clear()
            try:
                if await self.try_acquire():
                    return
            except ConsensusError as exc:
                log.debug("drain.slot_retry", error=str(exc))
            await wait_event(self._clock, self._slots_moved, self.settings.lease_ttl / 3)

    async def try_acquire(self) -> bool:
        store, lease = self._store, self.lease_id
        if store is None or lease is None or self.isolated:
            raise ConsensusUnavailable("etcd unreachable: no drain slot can be taken")
        result = await take_drain_slot(store, self.layout, self.name,
                                       self._running().drain.max_concurrent, lease,
                                       self._clock.wall())
        if isinstance(result, Held):
            self.slot, self.slot_holders = result.slot, (self.name,)
            return True
        self.slot_holders = result.holders
        return False

    async def release(self) -> None:
        slot, self.slot = self.slot, None
        if slot is None or self._store is None:
            return
        try:
            await release_drain_slot(self._store, self.layout, slot)
        except ConsensusError as exc:
            log.warning("drain.slot_release_failed", slot=slot, error=str(exc))

    # ------------------------------------------------------------ run

    async def run(self, started: asyncio.Event | None = None) -> None:
        """Stay in sync with etcd until cancelled, isolated whenever it is
        unreachable. ``started`` is set at once: the node never waits for
        etcd to serve."""
        if started is not None:
            started.set()
        retry = self.settings.lease_ttl / 3
        async with Store(self.settings.endpoints, self.settings.request_timeout,
                         clock=self._clock) as store:
            self._store = store
            try:
                while True:
                    try:
                        await self._session(store)
                    except* ConsensusError as group:
                        self._isolate(str(group.exceptions[0]))
                    await self._clock.sleep(retry)
            finally:
                await self._leave(store)
                self._store = None

    async def _leave(self, store: Store) -> None:
        """On stop: revoke the lease so members see this node leave at once."""
        lease, self.lease_id = self.lease_id, None
        if lease is None:
            return
        with contextlib.suppress(ConsensusError):
            await asyncio.shield(store.revoke(lease))

    async def _session(self, store: Store) -> None:
        """One connected stretch: register, read, watch; raises
        ConsensusError when etcd is lost."""
        keeper = LeaseKeeper(store, self.settings.lease_ttl, self._clock)
        lease = await keeper.grant()
        self._keeper, self.lease_id, self._failed_reads = keeper, lease.id, 0
        info = MemberInfo(name=self.name, api=self._api(), lan=self._lan(), version=__version__,
                          started=self._started_wall)
        await MemberWriter(store, self.layout, info).register(lease.id)
        votes = VoteWriter(store, self.layout, self.name)
        votes.wanted.update(self.local_health)
        await votes.rewrite(lease.id)
        self._votes = votes
        view = await read_view(store, self.layout)
        self._adopt(view)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(keeper.run())
            tg.create_task(self._watch(store))
            tg.create_task(self._write_votes(votes, lease.id))
            tg.create_task(self._check_quorum(store, keeper))
            tg.create_task(self._follow_config(store))

    def _lan(self) -> str:
        cluster = self._local.cluster
        return f"{cluster.address}:{cluster.port}" if cluster is not None else ""

    def _set_state(self, state: State, reason: str = "") -> None:
        if state is not self.state:
            self.state, self.state_since, self.state_reason = state, self._clock.monotonic(), reason
            self.state_since_wall = self._clock.wall()

    def _isolate(self, reason: str) -> None:
        if self.state is not State.ISOLATED:
            log.warning("consensus.isolated", reason=reason,
                        revision=self.view.revision if self.view else 0)
        self._set_state(State.ISOLATED, reason)
        self._keeper = None

    def _adopt(self, view: ClusterView) -> None:
        """A fresh view read at one revision: log what changed, apply it."""
        before = self.view
        self.view = view
        if before is not None and self.state is State.ISOLATED:
            log.event("consensus.resynced", revision=view.revision,
                      isolated_s=round(self._clock.monotonic() - self.state_since, 3),
                      **{k: ",".join(v) for k, v in view_changes(before, view).items()})
        else:
            log.event("consensus.synced", revision=view.revision, members=len(view.members))
        self._set_state(State.SYNCED)
        self._recompute()
        self._slots_moved.set()
        self._config_dirty.set()
        self._synced.set()

    def _recompute(self) -> None:
        """Set every pool's up set to the agreed set of the current view."""
        view = self.view
        if view is None:
            return
        pools = self._pools()
        agreed = view.agreed({s: [b.key for b in p.backends] for s, p in pools.items()})
        # Tables the next agreement may need, built before a majority forms
        # (off the event loop), so it publishes a ready table at once: first
        # those without a backend some member already votes down.
        for service, backends in contested(agreed, view.members.keys(), view.votes).items():
            for key in sorted(backends)[:PREPARE_CONTESTED]:
                pools[service].prepare(agreed[service] - {key})
        for service, up in agreed.items():
            changed = pools[service].set_up_set(up)
            previous = self.tables.get(service)
            self.tables[service] = ServiceTable(up, view.revision)
            if (changed or previous is None) and len(up) <= PREPARE_ALL_UP_TO:
                # A new agreed set: each single failure's table, ahead of
                # time (a build takes ~50 ms of CPU, seconds on a starved
                # machine; the contested head start alone is 100-300 ms).
                for key in sorted(up):
                    pools[service].prepare(up - {key})
            if changed:
                log.event("consensus.agreed", service=service, revision=view.revision,
                          up=",".join(sorted(b.key for b in changed if b.up)),
                          down=",".join(sorted(b.key for b in changed if not b.up)),
                          first=previous is None)
            for backend in changed:
                self._on_pool_change(service, backend, backend.up)

    async def _watch(self, store: Store) -> None:
        while True:
            view = self.view
            assert view is not None
            try:
                async for batch in store.watch_prefix(self.layout.base, view.revision + 1):
                    slots, config = dict(view.slots), view.config_revision
                    view.apply(batch)
                    self._recompute()
                    self._mark_watch()
                    if view.slots != slots:
                        self._slots_moved.set()
                    if view.config_revision != config:
                        self._config_dirty.set()
            except ConsensusCompacted as exc:
                log.warning("consensus.watch_compacted", error=str(exc))
                self._adopt(await read_view(store, self.layout))

    def _mark_watch(self) -> None:
        mark, view = self._watch_mark, self.view
        if mark is not None and view is not None and view.votes.get(mark[0]) is mark[1]:
            self.watch_lag = self._clock.monotonic() - mark[2]
            self._watch_mark = None

    def current_watch_lag(self) -> float:
        """s: the last measured lag, or how long the pending vote has waited."""
        mark = self._watch_mark
        if mark is None:
            return self.watch_lag
        return max(self.watch_lag, self._clock.monotonic() - mark[2])

    async def _write_votes(self, votes: VoteWriter, lease_id: int) -> None:
        while True:
            await self._votes_dirty.wait()
            # The monitor reports a backend's services one after the other
            # within one loop pass: let them all land, then write them in
            # one transaction (one revision, one agreed-set change).
            await asyncio.sleep(0)
            self._votes_dirty.clear()
            since, self._vote_since = self._vote_since, None
            written = await votes.vote_many(dict(self.local_health), lease_id)
            if written:
                now = self._clock.monotonic()
                service, backend, up = written[-1]
                self._watch_mark = ((service, backend, self.name), up, now)
                # One line per health transition written: the first stage of
                # an agreement (transition -> vote committed), for tracing.
                log.event("consensus.voted", revision=votes.revision, votes=len(written),
                          up=",".join(sorted({b for _, b, u in written if u})),
                          down=",".join(sorted({b for _, b, u in written if not u})),
                          commit_ms=round((now - since) * 1000, 1) if since is not None else None)

    async def _check_quorum(self, store: Store, keeper: LeaseKeeper) -> None:
        """Every ``lease_ttl / 3`` s: a linearizable read, then the rule."""
        while True:
            await self._clock.sleep(self.settings.lease_ttl / 3)
            try:
                await store.get(self.layout.current)
                self._failed_reads = 0
            except ConsensusUnavailable:
                self._failed_reads += 1
            silent = keeper.silent_for()
            if isolated(silent, self._failed_reads, self.settings.lease_ttl):
                raise ConsensusUnavailable(
                    f"lease silent for {silent:.1f} s, {self._failed_reads} failed reads")

    async def _follow_config(self, store: Store) -> None:
        history = ConfigHistory(store, self.layout, self._clock)
        while True:
            await self._config_dirty.wait()
            self._config_dirty.clear()
            view = self.view
            if view is None or view.config_revision in (0, self.config_revision):
                continue
            number = view.config_revision
            try:
                revision = await history.get(number)
            except ConsensusDataError as exc:
                self.config_revision = number
                self.pushes_refused += 1
                log.error("config.refused", revision=number, problems=str(exc))
                continue
            try:
                merged = document.merge(self._local, revision.shared,
                                        f"config revision {number}")
            except ConfigError as exc:
                self.config_revision = number
                self.pushes_refused += 1
                log.error("config.refused", revision=number, problems="; ".join(exc.problems))
                continue
            self.config_revision = number
            if merged == self._running():
                log.event("config.applied", revision=number, changed=False)
                continue
            try:
                applied = await self._apply(merged)
            except ConfigError as exc:
                self.pushes_refused += 1
                log.error("config.refused", revision=number, problems="; ".join(exc.problems))
                continue
            if applied:
                self.pushes_applied += 1
                log.event("config.applied", revision=number, changed=True)
                self._recompute()

    async def push_edit(self, edit: Callable[[document.Shared], document.Shared], *,
                        author: str, message: str) -> int:
        """Push ``edit`` of the current shared config as the next revision,
        compare-and-swap on the revision read (runtime control: ``anycast-lb
        backend ...`` on any node). Before any push the document is this
        node's file's shared part. Returns the new revision number. Raises
        ConsensusUnavailable while this node has no etcd session,
        ConsensusConflict when another push won the race, and what ``edit``
        raises."""
        store = self._store
        if store is None:
            raise ConsensusUnavailable("no etcd session: runtime changes need etcd "
                                       "with a consensus section")
        history = ConfigHistory(store, self.layout, self._clock)
        current = await history.current()
        if current is not None:
            shared = current.shared
        else:
            shared = document.Shared(tuple(self._local.services),
                                     self._local.bgp.announce if self._local.bgp else None)
        pushed = await history.push(edit(shared), author=author, message=message,
                                    based_on=current.number if current is not None else 0)
        return pushed.number

    # ------------------------------------------------------------ reporting

    def status(self) -> dict[str, object]:
        """The ``consensus`` object of ``/status`` (:class:`anycast_lb.status.ConsensusStatus`)."""
        view = self.view
        members = sorted(view.members.values(), key=lambda m: m.name) if view else []
        keeper = self._keeper
        silent = keeper.silent_for() if keeper is not None else None
        return {
            "cluster": self.settings.cluster,
            "state": self.state.value,
            "since": self.state_since_wall,
            "since_s": round(self._clock.monotonic() - self.state_since, 3),
            "reason": self.state_reason,
            "revision": view.revision if view else 0,
            "config_revision": self.config_revision,
            "lease_silent_s": None if silent is None or math.isinf(silent) else round(silent, 3),
            "watch_lag_s": round(self.current_watch_lag(), 4),
            "members": [{"name": m.name, "api": m.api, "lan": m.lan, "version": m.version,
                         "started": m.started} for m in members],
            "pushes_applied": self.pushes_applied,
            "pushes_refused": self.pushes_refused,
            "drain_slot": self.slot,
            "drain_slot_holders": sorted(view.slots.values()) if view else [],
            "disagreement": {s: sorted(b) for s, b in sorted(self.disagreement().items())},
        }

    def table_revision(self, service: str) -> int | None:
        table = self.tables.get(service)
        return table.revision if table is not None else None

    def metric_families(self) -> Iterator[Metric]:
        view = self.view
        state = GaugeMetricFamily("anycast_lb_consensus_state",
                                  "1 for the node's consensus state", labels=["state"])
        for s in State:
            state.add_metric([s.value], 1.0 if s is self.state else 0.0)
        yield state
        since = GaugeMetricFamily("anycast_lb_consensus_state_seconds",
                                  "Seconds the node has been in its consensus state")
        since.add_metric([], self._clock.monotonic() - self.state_since)
        yield since
        rev = GaugeMetricFamily("anycast_lb_consensus_revision",
                                "etcd revision of the cluster view applied")
        rev.add_metric([], float(view.revision if view else 0))
        yield rev
        lag = GaugeMetricFamily("anycast_lb_consensus_watch_lag_seconds",
                                "Seconds from this node's last vote write to its arrival "
                                "through the watch (growing while it has not arrived)")
        lag.add_metric([], self.current_watch_lag())
        yield lag
        members = GaugeMetricFamily("anycast_lb_consensus_members", "Live members in the view")
        members.add_metric([], float(len(view.members) if view else 0))
        yield members
        disagree = GaugeMetricFamily(
            "anycast_lb_consensus_backend_disagreement",
            "1 while this node's own health of the backend differs from the agreed one",
            labels=["service", "backend"])
        diff = self.disagreement()
        for service, pool in self._pools().items():
            for b in pool.backends:
                disagree.add_metric([service, b.key], 1.0 if b.key in diff.get(service, ()) else 0.0)
        yield disagree
        config = GaugeMetricFamily("anycast_lb_consensus_config_revision",
                                   "Config revision last applied or refused (0: the node's file)")
        config.add_metric([], float(self.config_revision))
        yield config
        pushes = CounterMetricFamily("anycast_lb_consensus_pushes",
                                     "Pushed config revisions by result", labels=["result"])
        pushes.add_metric(["applied"], float(self.pushes_applied))
        pushes.add_metric(["refused"], float(self.pushes_refused))
        yield pushes
        holders = GaugeMetricFamily("anycast_lb_consensus_drain_slot_holder",
                                    "1 per node holding a drain slot", labels=["node"])
        for node in sorted(set(view.slots.values())) if view else ():
            holders.add_metric([node], 1.0)
        yield holders
