"""The cluster facade: flow ownership sync plus steering, for one node.

::

    forwarder --on_flow(opened, key)--> deque --publish--> deltas to peers
                     (any thread)              (every publish_delay s; a flow
                                               once publish_min_age s old)
    peers --heartbeats, deltas, snapshots--> Membership (pure)
    apply (when work arrives, at most every apply_interval s): expire peers,
        Steering.plan (pure), ``nft -f`` transactions, abort our stale sockets

``Cluster.run`` owns its tasks; cancel it (or call :meth:`Cluster.stop`) to
leave: a last heartbeat says "leaving", then the nftables table, the rules
and routes it added go away.

Flow survival runs in one of three modes, shown in /status:
``active``; ``off`` (``cluster.flow_survival: false``: heartbeats only, for
membership); ``unavailable`` (no root, no nft, or the table could not be
installed: logged once as ``cluster.flow_survival_unavailable``). A node
not ``active`` tells its peers so in every heartbeat and is never sent a
steered packet: its listener would answer them with RST.

Every datagram is signed with the key of ``cluster.key_file``
(:mod:`.keys`), checked by the endpoint (:mod:`.sync`) against the MAC and
a replay window (:mod:`.replay`); the key file is read again within
``keys.RELOAD_INTERVAL_S`` of a change (rotation without restart).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import math
import secrets
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from anycast_lb import log
from anycast_lb.clock import Clock, SystemClock
from anycast_lb.cluster import wire
from anycast_lb.cluster.kernel import KernelDataPath
from anycast_lb.cluster.keys import RELOAD_INTERVAL_S, KeyFile
from anycast_lb.cluster.nft import COUNTERS, NftSettings
from anycast_lb.cluster.ownership import (
    Delta,
    Effects,
    LocalFlows,
    MapPlan,
    Membership,
    Steering,
)
from anycast_lb.cluster.routing import RoutingSettings
from anycast_lb.cluster.sync import REJECT_REASONS, SyncEndpoint
from anycast_lb.config import ClusterConfig, ServiceConfig, Transport
from anycast_lb.errors import ClusterError
from anycast_lb.flows import FlowKey

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
"""Histogram buckets of the sync lag, seconds."""
_LAG_WINDOW = 4096  # samples kept for the p99
_COUNTER_PERIOD = 1.0  # s between reads of the nftables counters
_IDLE_WAKE = 1.0  # s: the apply loop wakes at least this often
_RETRY = 0.5  # s between attempts to rewrite the table after a failed transaction


class DataPath(Protocol):
    """The steering data path (the kernel, or a fake in tests)."""

    def unavailable(self) -> str | None:
        """Why it cannot run here, or None."""
        ...

    async def install(self, live: Sequence[int], owner: Mapping[FlowKey, int]) -> None:
        """Set up, or replace the whole table with ``owner``. Raises ClusterError."""
        ...

    async def update(self, live: Sequence[int] | None, plan: MapPlan) -> None:
        """One atomic change. Raises ClusterError (nothing changed then)."""
        ...

    async def counters(self) -> dict[str, int]: ...

    async def remove(self) -> None:
        """Undo everything; never raises."""
        ...


def kernel_data_path(config: ClusterConfig, services: Sequence[ServiceConfig]) -> KernelDataPath:
    peers = tuple(str(address) for address, _ in config.remote_peers)
    tcp = tuple(sorted({(str(s.vip), s.port) for s in services
                        if s.protocol is Transport.TCP and s.vip.version == 4}))
    return KernelDataPath(
        NftSettings(config.nft_table, config.interface, tcp, peers, config.fwmark_base,
                    math.ceil(config.dead_flow_timeout)),
        RoutingSettings(config.interface, peers, config.fwmark_base, config.route_table_base,
                        config.rule_priority),
    )


class Cluster:
    """One node's part of the cluster. Build it, hand :meth:`on_flow` to the
    forwarders, ``await run()``.

    ``abort`` resets our client connections for the given flows (thread-safe;
    returns how many it found). ``sock`` is an already bound UDP socket for
    the sync endpoint (tests); else it binds ``config.address:config.port``.
    ``datapath`` replaces the kernel data path (tests, benchmarks).
    Raises ClusterError when ``config.key_file`` is missing, open to group
    or others, or holds no valid key (:mod:`.keys`).
    """

    def __init__(
        self,
        config: ClusterConfig,
        services: Sequence[ServiceConfig],
        *,
        name: str = "",
        clock: Clock | None = None,
        abort: Callable[[Iterable[FlowKey]], int] | None = None,
        datapath: DataPath | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.clock = clock or SystemClock()
        self._abort = abort
        self.peers = [(str(a), p) for a, p in config.remote_peers]
        self.datapath: DataPath | None = None
        if config.flow_survival:
            self.datapath = datapath or kernel_data_path(config, services)
        self.mode = "off" if not config.flow_survival else "starting"
        self.reason = "" if config.flow_survival else "cluster.flow_survival is false"
        self.key_file = KeyFile(config.key_file)
        keys = self.key_file.load()
        self._key_error = ""
        # Epochs grow with the wall clock at start, so peers take a restarted
        # node's new epoch and refuse replays of an old one (replay.py).
        self.epoch = (max(int(self.clock.wall() * 1000), 0) << 16 | secrets.randbits(16)) % (1 << 63) + 1
        self.seq = 0
        self.local = LocalFlows()
        self.membership = Membership(len(self.peers), config.peer_expiry,
                                     max(2 * config.heartbeat_interval, 0.2))
        self.steering = Steering(self.membership, self.local)
        self.endpoint = SyncEndpoint(
            self.peers, self._on_message, local=(str(config.address), config.port), keys=keys,
            bind=None if sock is not None else (str(config.address), config.port), sock=sock)
        # Flow events from the forwarders' threads: (opened, key, since_ms).
        self._events: collections.deque[tuple[bool, FlowKey, int]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._wake_pending = False
        self._owned_zero = asyncio.Event()
        self._owned_zero.set()
        self._snapshot_wanted = asyncio.Event()
        self._requesters: set[int] = set()
        self._snapshot_id = 0
        self._effects = Effects()
        self._dirty = asyncio.Event()
        self._live: tuple[int, ...] = ()
        self._needs_install = False
        self._failing = False
        self._stop = asyncio.Event()
        self._alive_seen = [False] * len(self.peers)
        # Figures for /status and /metrics.
        self.counters: dict[str, int] = {}
        self.lag_samples: collections.deque[float] = collections.deque(maxlen=_LAG_WINDOW)
        self.lag_buckets = [0] * len(LAG_BUCKETS)
        self.lag_count = 0
        self.lag_sum = 0.0
        self.aborted = 0
        self.gaps = 0
        self.snapshots_sent = 0
        self.nft_failures = 0
        self.deltas_sent = 0

    # ------------------------------------------------------------ the hook

    def on_flow(self, opened: bool, key: FlowKey) -> None:
        """Forwarder hook: a client connection opened or closed. Thread-safe
        and cheap: one append, and a wake-up of the publisher at most once
        per batch."""
        self._events.append((opened, key, int(self.clock.wall() * 1000)))
        if not self._wake_pending and self._loop is not None:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                pass  # the loop closed: the node is stopping

    def _drain_events(self) -> None:
        self._wake_pending = False  # before draining: a later append wakes us again
        events = self._events
        local = self.local
        while events:
            opened, key, since = events.popleft()
            if not wire.is_ipv4_key(key):
                continue
            if opened:
                local.opened(key, since)
            else:
                local.closed(key)
        if len(local):
            self._owned_zero.clear()
        else:
            self._owned_zero.set()

    @property
    def publishing(self) -> bool:
        return self.mode == "active"

    # ------------------------------------------------------------ sending

    def _now_ms(self) -> int:
        return int(self.clock.wall() * 1000)

    def _flush(self) -> None:
        """Publish the changes gathered since the last flush (deltas, in seq order)."""
        self._drain_events()
        added, removed, touched = self.local.take_delta(
            self._now_ms(), round(self.config.publish_min_age * 1000))
        if touched:
            self._effects.touched |= touched
            self._dirty.set()
        if not self.publishing or not (added or removed):
            return
        now_ms = self._now_ms()
        for adds, removes in wire.split_changes(added, removed, self.config.max_datagram):
            self.seq += 1
            self.endpoint.send_all([wire.encode_delta(self.epoch, self.seq, now_ms, adds, removes)])
            self.deltas_sent += 1

    def _heartbeat(self, leaving: bool = False) -> None:
        self.endpoint.send_all([wire.encode_heartbeat(
            self.epoch, self.seq, self._now_ms(), receiver=self.publishing and not leaving,
            leaving=leaving, owned=len(self.local), name=self.name)])

    def _send_snapshot(self, to: Iterable[int]) -> None:
        self._flush()
        self._snapshot_id = (self._snapshot_id + 1) & 0xFFFFFFFF
        datagrams = wire.encode_snapshot(self.epoch, self.seq, self._now_ms(), self._snapshot_id,
                                         self.local.published(), self.config.max_datagram)
        for index in to:
            for data in datagrams:
                self.endpoint.send(index, data)
        self.snapshots_sent += 1

    # ------------------------------------------------------------ receiving

    def _on_message(self, index: int, message: wire.Message) -> None:
        now = self.clock.monotonic()
        head = message.header
        if isinstance(message, wire.Heartbeat):
            effects = self.membership.on_heartbeat(
                index, now, head.epoch, head.seq, receiver=message.receiver,
                leaving=message.leaving, name=message.name, owned=message.owned)
        elif isinstance(message, wire.DeltaMessage):
            effects = self.membership.on_delta(
                index, now, head.epoch, Delta(head.seq, message.added, message.removed))
        elif isinstance(message, wire.SnapshotPart):
            effects = self.membership.on_snapshot_part(
                index, now, head.epoch, head.seq, message.snapshot_id, message.part,
                message.parts, message.flows)
        else:
            if self.publishing:
                self._requesters.add(index)
                self._snapshot_wanted.set()
            return
        if effects.want_snapshot and self.publishing:
            self.endpoint.send(index, wire.encode_snapshot_request(self.epoch, self._now_ms()))
        if effects.gap:
            self.gaps += 1
        if not self.publishing:
            effects.added.clear()
        self._effects.merge(effects)
        if effects.touched or effects.dead or effects.liveness_changed:
            self._dirty.set()
        self._log_membership()

    def _log_membership(self) -> None:
        for peer in self.membership.peers:
            if peer.alive != self._alive_seen[peer.index]:
                self._alive_seen[peer.index] = peer.alive
                address, port = self.peers[peer.index]
                log.event("cluster.peer_up" if peer.alive else "cluster.peer_down",
                          peer=f"{address}:{port}", name=peer.name, receiver=peer.receiver,
                          flows=len(peer.flows))

    # ------------------------------------------------------------ loops

    async def _wait(self, event: asyncio.Event, timeout: float) -> None:
        """Until ``event`` is set or ``timeout`` s (the injected clock) pass."""
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(self.clock.sleep(timeout))
        try:
            await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()

    async def _publish_loop(self) -> None:
        """Flush after each wake-up (a flow opened or closed), and when the
        oldest flow too young to publish comes of age."""
        while True:
            due = self.local.next_due_ms
            if due is None:
                await self._wake.wait()
            else:
                await self._wait(self._wake, max(due - self._now_ms(), 0) / 1000)
            self._wake.clear()
            if self.config.publish_delay > 0:
                await self.clock.sleep(self.config.publish_delay)
            self._flush()

    async def _heartbeat_loop(self) -> None:
        next_reload = self.clock.monotonic() + RELOAD_INTERVAL_S
        while True:
            self._heartbeat()
            await self.clock.sleep(self.config.heartbeat_interval)
            if self.clock.monotonic() >= next_reload:
                next_reload = self.clock.monotonic() + RELOAD_INTERVAL_S
                self.reload_keys()

    def reload_keys(self) -> bool:
        """Read the key file again if it changed; True if new keys are in
        use. A bad file is logged (once per distinct error) and the keys in
        use are kept."""
        try:
            keys = self.key_file.reload()
        except ClusterError as exc:
            if str(exc) != self._key_error:
                self._key_error = str(exc)
                log.warning("cluster.key_file_refused", error=str(exc), kept="the keys in use")
            return False
        self._key_error = ""
        if keys is None:
            return False
        self.endpoint.keys = keys
        log.event("cluster.keys_loaded", signing_key_id=keys.signing_id,
                  accepted_key_ids=",".join(str(k) for k in keys.ids))
        return True

    async def _snapshot_loop(self) -> None:
        next_all = self.clock.monotonic() + self.config.snapshot_interval
        while True:
            await self._wait(self._snapshot_wanted, max(next_all - self.clock.monotonic(), 0.0))
            self._snapshot_wanted.clear()
            if not self.publishing:
                self._requesters.clear()
                next_all = self.clock.monotonic() + self.config.snapshot_interval
                continue
            if self.clock.monotonic() >= next_all:
                self._requesters.clear()
                self._send_snapshot(range(len(self.peers)))
                next_all = self.clock.monotonic() + self.config.snapshot_interval
            elif self._requesters:
                to, self._requesters = self._requesters, set()
                self._send_snapshot(sorted(to))
                # A burst of requests costs one snapshot per heartbeat interval at most.
                await self.clock.sleep(self.config.heartbeat_interval)

    async def _apply_loop(self) -> None:
        """Apply as soon as there is work, at most once per ``apply_interval``
        s (a batch), and wake for the next peer expiry even when all is quiet."""
        interval = self.config.apply_interval
        last = self.clock.monotonic() - interval
        next_counters = 0.0
        while True:
            now = self.clock.monotonic()
            expiry = self.membership.next_expiry()
            timeout = _IDLE_WAKE if expiry is None else min(expiry - now + 0.001, _IDLE_WAKE)
            await self._wait(self._dirty, max(timeout, 0.0))
            wait = last + interval - self.clock.monotonic()
            if wait > 0:
                await self.clock.sleep(wait)
            self._dirty.clear()
            last = self.clock.monotonic()
            await self.apply_once()
            if self.mode == "active" and last >= next_counters and self.datapath is not None:
                next_counters = last + _COUNTER_PERIOD
                try:
                    self.counters = await self.datapath.counters()
                except ClusterError as exc:
                    log.debug("cluster.counters_failed", error=str(exc))

    async def apply_once(self) -> None:
        """One tick: expire peers, then bring the steering map up to date."""
        self._effects.merge(self.membership.expire(self.clock.monotonic()))
        self._log_membership()
        effects, self._effects = self._effects, Effects()
        if self.mode != "active" or self.datapath is None:
            return
        live = self.membership.steerable()
        live_arg = live if live != self._live else None
        if self._needs_install:
            desired = self.steering.desired()
            try:
                await self.datapath.install(live, desired)
            except ClusterError as exc:
                await self._failed(exc)
                return
            self._failing = False
            self.steering.replace(desired)
            self._live = live
            self._needs_install = False
            self._record_lag(effects.added)
            return
        plan = self.steering.plan(effects.touched, effects.dead)
        if plan.stale_local and self._abort is not None:
            found = self._abort(plan.stale_local)
            self.aborted += found
            log.event("cluster.stale_flows_aborted", flows=len(plan.stale_local), found=found)
        # Two transactions: what protects flows first (adds, owner moves, the
        # dead set, the chain), then removals of closed flows. A transaction
        # that deletes elements takes about 16 ms against 3 ms without
        # (nft 1.0.6, kernel 6.18, any map size); removals are not urgent.
        moved = {key for key, _ in plan.add}
        urgent = MapPlan(tuple(k for k in plan.delete if k in moved), plan.add, plan.dead)
        later = MapPlan(tuple(k for k in plan.delete if k not in moved))
        for part, chain in ((urgent, live_arg), (later, None)):
            if part.empty and chain is None:
                continue
            try:
                await self.datapath.update(chain, part)
            except ClusterError as exc:
                await self._failed(exc)
                return
            self.steering.commit(part)
            if part is urgent:
                self._live = live
                self._record_lag(effects.added)

    async def _failed(self, exc: ClusterError) -> None:
        """A transaction failed (nothing changed): rewrite the whole table
        from the desired map next, retrying every ``_RETRY`` s."""
        self.nft_failures += 1
        if not self._failing:
            log.warning("cluster.nft_failed", error=str(exc))
        self._failing = True
        self._needs_install = True
        await self.clock.sleep(_RETRY)
        self._dirty.set()

    def _record_lag(self, since: Iterable[int]) -> None:
        # A flow is published once publish_min_age s old (the same on every
        # node): the lag counts from then, not from its accept.
        now_ms = self._now_ms() - round(self.config.publish_min_age * 1000)
        for value in since:
            lag = max(now_ms - value, 0) / 1000.0
            self.lag_samples.append(lag)
            self.lag_count += 1
            self.lag_sum += lag
            i = bisect.bisect_left(LAG_BUCKETS, lag)
            if i < len(LAG_BUCKETS):
                self.lag_buckets[i] += 1

    # ------------------------------------------------------------ run

    async def _start_datapath(self) -> None:
        assert self.datapath is not None
        reason = self.datapath.unavailable()
        if reason is None:
            try:
                await self.datapath.install((), {})
            except ClusterError as exc:
                reason = str(exc)
                await self.datapath.remove()
        if reason is not None:
            self.mode, self.reason = "unavailable", reason
            log.warning("cluster.flow_survival_unavailable", reason=reason)
        else:
            self.mode = "active"

    async def run(self, started: asyncio.Event | None = None) -> None:
        """Bind, install steering, run until :meth:`stop` or cancellation.
        Raises ClusterError when the sync endpoint cannot bind."""
        self._loop = asyncio.get_running_loop()
        address = await self.endpoint.start()
        try:
            if self.datapath is not None:
                await self._start_datapath()
            log.event("cluster.started", address=f"{address[0]}:{address[1]}",
                      peers=len(self.peers), flow_survival=self.mode, epoch=self.epoch,
                      signing_key_id=self.endpoint.keys.signing_id)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._publish_loop())
                tg.create_task(self._heartbeat_loop())
                tg.create_task(self._snapshot_loop())
                tg.create_task(self._apply_loop())
                if started is not None:
                    started.set()
                await self._stop.wait()
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            self._drain_events()
            self._heartbeat(leaving=True)
            self.mode = "stopped" if self.mode == "active" else self.mode
            if self.datapath is not None:
                await self.datapath.remove()
            self.endpoint.close()
            log.event("cluster.stopped", flows_owned=len(self.local))

    def stop(self) -> None:
        """Leave the cluster: ``run`` returns after its teardown."""
        self._stop.set()

    async def wait_owned_zero(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until this node owns no flow; True if so
        (planned drain: the node keeps serving steered packets until then)."""
        self._drain_events()
        try:
            async with asyncio.timeout(timeout):
                await self._owned_zero.wait()
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------ reporting

    def lag_p99(self) -> float | None:
        """p99 of the last sync lags, s: from a peer accepting a flow to
        this node's map holding it (or, without steering, receiving it)."""
        if not self.lag_samples:
            return None
        ordered = sorted(self.lag_samples)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def status(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        p99 = self.lag_p99()
        peers = []
        for peer in self.membership.peers:
            address, port = self.peers[peer.index]
            peers.append({
                "address": address,
                "port": port,
                "name": peer.name,
                "alive": peer.alive,
                "steering_receiver": peer.receiver,
                "in_sync": peer.in_sync,
                "flows": len(peer.flows),
                "reported_flows": peer.reported_owned,
                "last_heard_ms_ago": None if peer.last_heard is None
                else round((now - peer.last_heard) * 1000, 1),
                "gaps": peer.gaps,
                "snapshots": peer.snapshots,
                "fwmark": self.config.fwmark_base + peer.index,
                "key_id": self.endpoint.peer_key_ids[peer.index],
            })
        return {
            "flow_survival": self.mode,
            "reason": self.reason or None,
            "address": f"{self.endpoint.address[0]}:{self.endpoint.address[1]}"
            if self.endpoint.address else f"{self.config.address}:{self.config.port}",
            "interface": self.config.interface,
            "epoch": self.epoch,
            "seq": self.seq,
            "live_peers": sum(1 for p in self.membership.peers if p.alive),
            "steering_peers": len(self.membership.steerable()),
            "flows_owned": len(self.local),
            "steering_map_size": len(self.steering.shadow),
            "sync_lag_p99_ms": None if p99 is None else round(p99 * 1000, 1),
            "packets": {name: self.counters.get(name, 0) for name in COUNTERS},
            "stale_flows_aborted": self.aborted,
            "sync": {
                "datagrams_received": self.endpoint.received,
                "datagrams_sent": self.endpoint.sent,
                "send_errors": self.endpoint.send_errors,
                "rejected": dict(self.endpoint.rejected),
                "signing_key_id": self.endpoint.keys.signing_id,
                "accepted_key_ids": list(self.endpoint.keys.ids),
                "key_file_error": self._key_error or None,
            },
            "peers": peers,
        }

    def metric_families(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        """Prometheus families (``anycast_lb_cluster_*``), read at scrape time."""
        mode = GaugeMetricFamily("anycast_lb_cluster_flow_survival",
                                 "1 while flow survival steering is active")
        mode.add_metric([], 1.0 if self.mode == "active" else 0.0)
        live = GaugeMetricFamily("anycast_lb_cluster_live_peers", "Peers heard within peer_expiry")
        live.add_metric([], float(sum(1 for p in self.membership.peers if p.alive)))
        up = GaugeMetricFamily("anycast_lb_cluster_peer_up", "1 while the peer is live",
                               labels=["peer"])
        flows = GaugeMetricFamily("anycast_lb_cluster_peer_flows",
                                  "Flows the peer published", labels=["peer"])
        for peer in self.membership.peers:
            label = f"{self.peers[peer.index][0]}:{self.peers[peer.index][1]}"
            up.add_metric([label], 1.0 if peer.alive else 0.0)
            flows.add_metric([label], float(len(peer.flows)))
        owned = GaugeMetricFamily("anycast_lb_cluster_flows_owned", "Flows this node owns")
        owned.add_metric([], float(len(self.local)))
        size = GaugeMetricFamily("anycast_lb_cluster_steering_map_size",
                                 "Flows in the kernel steering map (peers' flows)")
        size.add_metric([], float(len(self.steering.shadow)))
        packets = CounterMetricFamily("anycast_lb_cluster_steered_packets",
                                      "Packets by steering verdict", labels=["verdict"])
        for name in COUNTERS:
            packets.add_metric([name], float(self.counters.get(name, 0)))
        lag = HistogramMetricFamily("anycast_lb_cluster_sync_lag_seconds",
                                    "From a peer accepting a flow to this node's map holding it")
        cumulative, buckets = 0, []
        for bound, count in zip(LAG_BUCKETS, self.lag_buckets, strict=True):
            cumulative += count
            buckets.append((repr(bound), float(cumulative)))
        buckets.append(("+Inf", float(self.lag_count)))
        lag.add_metric([], buckets, self.lag_sum)
        p99 = GaugeMetricFamily("anycast_lb_cluster_sync_lag_p99_seconds",
                                f"p99 of the last {_LAG_WINDOW} sync lags")
        p99.add_metric([], self.lag_p99() or 0.0)
        gaps = CounterMetricFamily("anycast_lb_cluster_sync_gaps", "Deltas that followed a lost one")
        gaps.add_metric([], float(self.gaps))
        failures = CounterMetricFamily("anycast_lb_cluster_nft_failures",
                                       "Failed steering map transactions")
        failures.add_metric([], float(self.nft_failures))
        aborted = CounterMetricFamily("anycast_lb_cluster_stale_flows_aborted",
                                      "Own connections reset because a peer claims them since")
        aborted.add_metric([], float(self.aborted))
        received = CounterMetricFamily("anycast_lb_cluster_sync_datagrams_received",
                                       "Sync datagrams accepted (authenticated, not replayed)")
        received.add_metric([], float(self.endpoint.received))
        rejected = CounterMetricFamily("anycast_lb_cluster_sync_datagrams_rejected",
                                       "Sync datagrams dropped, by reason", labels=["reason"])
        for reason in REJECT_REASONS:
            rejected.add_metric([reason], float(self.endpoint.rejected[reason]))
        key_errors = GaugeMetricFamily("anycast_lb_cluster_key_file_error",
                                       "1 while a changed key file is refused (old keys in use)")
        key_errors.add_metric([], 1.0 if self._key_error else 0.0)
        sent = CounterMetricFamily("anycast_lb_cluster_sync_datagrams_sent",
                                   "Sync datagrams sent to peers")
        sent.add_metric([], float(self.endpoint.sent))
        send_errors = CounterMetricFamily("anycast_lb_cluster_sync_send_errors",
                                          "Sync datagrams the kernel refused to send")
        send_errors.add_metric([], float(self.endpoint.send_errors))
        published = CounterMetricFamily("anycast_lb_cluster_sync_published",
                                        "Flow-table messages published, by kind", labels=["kind"])
        published.add_metric(["delta"], float(self.deltas_sent))
        published.add_metric(["snapshot"], float(self.snapshots_sent))
        yield from (mode, live, up, flows, owned, size, packets, lag, p99, gaps, failures, aborted,
                    received, rejected, key_errors, sent, send_errors, published)


class _Stopped(Exception):
    """Raised inside the task group to end every loop on stop()."""
