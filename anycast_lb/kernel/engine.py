"""The kernel engine of one node: decisions (:mod:`.decide`) applied to the
kernel (:mod:`.apply`). The seam the node's data plane drives
(:class:`~anycast_lb.dataplane.DataPlane`).

One writer: every change goes through this object, one transaction at a
time (an ``asyncio.Lock``), so the shadow copy of the maps always matches
the kernel. The node never awaits the kernel from a health callback: it
calls :meth:`KernelEngine.poke`, and :meth:`KernelEngine.run` (one task)
reads what the service should hold (its pool: config, up backends, admin
drains), reconciles the tables and applies the diff. Pokes that arrive
while a transaction runs coalesce into the next one.

The task also promotes drains that reached ``drain.timeout`` s, retries a
refused transaction after :data:`RETRY_S` s, and reads the per-backend nft
counters every :data:`COUNTER_INTERVAL_S` s (``/status`` and ``/metrics``
show that copy, so serving them never waits for ``nft``).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Collection, Iterator
from typing import TypedDict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from anycast_lb import log
from anycast_lb.clock import Clock, SystemClock, wait_event
from anycast_lb.cluster.kernel import run
from anycast_lb.config import NodeConfig, ServiceConfig
from anycast_lb.errors import KernelEngineError
from anycast_lb.kernel import apply, render
from anycast_lb.kernel.decide import ServiceTables
from anycast_lb.kernel.settings import kernel_settings

COUNTER_INTERVAL_S = 1.0
"""Seconds between two reads of the per-backend nft counters."""
RETRY_S = 1.0
"""Seconds before a refused transaction is tried again."""
IDLE_POLL_S = 0.5
"""Seconds between two counter reads while waiting for the node to go idle."""
APPLIED_POLL_S = 0.01
"""Seconds between two looks while waiting for a change to reach the kernel."""
APPLIED_TIMEOUT_S = 5.0
"""Seconds a runtime backend change waits for the kernel to hold it."""

Desired = Callable[[str], tuple[ServiceConfig, Collection[str], Collection[str]]]
"""Service name -> (its config, up backend keys, admin-drained backend keys)."""


class BackendCounters(TypedDict):
    packets: int
    bytes: int


class ServiceStatus(TypedDict):
    seed: str
    """The jhash seed, ``0x`` and 8 hex digits."""
    table_size: int
    generation: int
    digest: str
    draining: list[str]
    drained: list[str]
    backends: dict[str, BackendCounters]
    """Per backend address: packets and bytes this node forwarded to it."""


class KernelEngine:
    """The node's ``netdev`` table and each service's tables.

    ``promote_after``: seconds a drained backend keeps the flows other
    nodes move here (the previous table) before the promotion; default
    ``drain.timeout``, the same on every node given the same config."""

    def __init__(self, cfg: NodeConfig, runner: apply.NftRunner = run, *,
                 clock: Clock | None = None, promote_after: float | None = None) -> None:
        self.settings = kernel_settings(cfg)
        self._names = [s.name for s in cfg.services]
        self._index = {name: i for i, name in enumerate(self._names)}
        self._tables = [ServiceTables(s) for s in cfg.services]
        self._backends = [[ipaddress.IPv4Address(b.address) for b in s.backends]
                          for s in cfg.services]
        self._runner = runner
        self._nft = apply.NftForwarder(self.settings, runner)
        self._lock = asyncio.Lock()
        self._clock = clock or SystemClock()
        self.promote_after = cfg.drain.timeout if promote_after is None else promote_after
        self._dirty: set[int] = set(range(len(self._names)))
        self._wake: asyncio.Event | None = None
        self._counters: dict[tuple[int, ipaddress.IPv4Address], tuple[int, int]] = {}
        self.installed = False
        """The table is in the kernel (between :meth:`start` and :meth:`stop`)."""
        self._serving: set[int] = set()
        """Services whose current table, as the kernel holds it, names a backend."""
        self._on_applied: Callable[[str], None] | None = None
        self._applying: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Check the kernel and the backends, then load the table with no
        backend up (health brings them in). Raises KernelEngineError."""
        iface = self.settings.interface
        devices = sorted({iface, self.settings.hook_device})
        await asyncio.gather(
            *(apply.check_support(device, self._runner) for device in devices),
            apply.check_on_link(iface, [a for group in self._backends for a in group],
                                self._runner))
        async with self._lock:
            await self._nft.install({i: t.tables for i, t in enumerate(self._tables)})
        self.installed = True
        log.event("kernel.table_loaded", table=self.settings.table,
                  interface=self.settings.interface, ingress=self.settings.hook_device,
                  services=len(self._names))

    async def stop(self) -> None:
        """Delete the table (never raises)."""
        async with self._lock:
            await self._nft.remove()
        self._serving.clear()
        if self.installed:
            log.event("kernel.table_removed", table=self.settings.table)
        self.installed = False

    # ------------------------------------------------------------------ the writer

    def poke(self, service: str) -> None:
        """``service``'s pool changed (health, drain, weights): reconcile
        it on the next turn of :meth:`run`. Unknown names are ignored."""
        index = self._index.get(service)
        if index is None:
            return
        self._dirty.add(index)
        if self._wake is not None:
            self._wake.set()

    def serving(self, service: str) -> bool:
        """The kernel forwards ``service``'s new flows: its current table, as
        applied, names a backend. The node announces a VIP only then (a
        route must not draw packets to a table still being filled)."""
        index = self._index.get(service)
        return self.installed and index is not None and index in self._serving

    def pending(self, service: str) -> bool:
        """A change of ``service``'s tables is waiting or being applied."""
        index = self._index.get(service)
        return index is not None and (index in self._dirty or index == self._applying)

    async def wait_applied(self, service: str, timeout: float) -> bool:
        """Wait up to ``timeout`` s until no change of ``service``'s tables
        is pending (the kernel holds what its pool called for when this
        was called, or later); True if none is."""
        deadline = self._clock.monotonic() + timeout
        while self.pending(service):
            if self._clock.monotonic() >= deadline:
                return False
            await self._clock.sleep(APPLIED_POLL_S)
        return True

    async def run(self, desired: Desired, started: asyncio.Event | None = None,
                  on_applied: Callable[[str], None] | None = None) -> None:
        """Apply every poke, promotion and retry, read the counters; until
        cancelled. Sets ``started`` after the first turn (every service
        reconciled once); calls ``on_applied(name)`` after each reconcile
        of a service the kernel took. Never raises for a refused
        transaction: logs ``kernel.apply_failed`` and retries."""
        self._on_applied = on_applied
        self._wake = asyncio.Event()
        next_counters = self._clock.monotonic()
        retry_at: float | None = None
        while True:
            now = self._clock.monotonic()
            for i, tables in enumerate(self._tables):
                due = tables.next_promotion(self.promote_after)
                if due is not None and due <= now:
                    self._dirty.add(i)
            if retry_at is not None and retry_at <= now:
                retry_at = None
            dirty, self._dirty = (self._dirty, set()) if retry_at is None else (set(), self._dirty)
            self._wake.clear()
            for index in sorted(dirty):
                if not await self._reconcile(index, desired, now):
                    self._dirty.add(index)
                    retry_at = now + RETRY_S
            if now >= next_counters:
                await self._read_counters()
                next_counters = now + COUNTER_INTERVAL_S
            if started is not None:
                started.set()
                started = None
            wake_at = [next_counters] + [t for t in (
                tables.next_promotion(self.promote_after) for tables in self._tables)
                if t is not None]
            if retry_at is not None:
                wake_at.append(retry_at)
            if self._dirty and retry_at is None:
                continue
            await self._wait(min(wake_at) - self._clock.monotonic())

    async def _wait(self, seconds: float) -> None:
        assert self._wake is not None
        if seconds > 0:
            await wait_event(self._clock, self._wake, seconds)

    async def _reconcile(self, index: int, desired: Desired, now: float) -> bool:
        """One service to what its pool says; False when the kernel refused."""
        name = self._names[index]
        service, up, drained = desired(name)
        tables = self._tables[index]
        was = (tables.draining, tables.drained)
        new = tables.reconcile(service, up, drained, now, self.promote_after)
        self._applying = index
        try:
            async with self._lock:
                await self._apply(index, new)
        except KernelEngineError as exc:
            log.warning("kernel.apply_failed", service=name, generation=tables.generation,
                        error=str(exc), retry_s=RETRY_S)
            return False
        finally:
            self._applying = None
        if self._nft.tables(index).current:
            self._serving.add(index)
        else:
            self._serving.discard(index)
        if self._on_applied is not None:
            self._on_applied(name)
        for key in sorted(tables.draining - was[0]):
            log.event("kernel.drain_started", service=name, backend=key,
                      promote_after_s=self.promote_after)
        for key in sorted(tables.drained - was[1]):
            log.event("kernel.drain_promoted", service=name, backend=key)
        for key in sorted((was[0] | was[1]) - tables.draining - tables.drained):
            log.event("kernel.drain_ended", service=name, backend=key)
        return True

    async def _apply(self, index: int, tables: render.Tables) -> None:
        lines = await self._nft.update(index, tables)
        if lines:
            log.event("kernel.tables_applied", service=self._names[index],
                      generation=self._tables[index].generation, lines=lines,
                      ms=round(self._nft.last_apply_s * 1000, 1))

    async def _read_counters(self) -> None:
        try:
            self._counters = await self._nft.counters()
        except KernelEngineError as exc:
            log.warning("kernel.counters_failed", error=str(exc))

    # ------------------------------------------------------------------ direct steps

    async def set_up(self, index: int, up: Collection[str]) -> None:
        """Service ``index``'s up backends (keys ``addr:port``) changed.
        Raises KernelEngineError (the kernel then holds the previous maps)."""
        async with self._lock:
            await self._apply(index, self._tables[index].set_up(up))

    async def drain(self, index: int, key: str) -> None:
        async with self._lock:
            await self._apply(index, self._tables[index].drain(key))

    async def end_drain(self, index: int, key: str) -> None:
        async with self._lock:
            await self._apply(index, self._tables[index].end_drain(key))

    async def undrain(self, index: int, key: str) -> None:
        async with self._lock:
            await self._apply(index, self._tables[index].undrain(key))

    # ------------------------------------------------------------------ state

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until this node forwards nothing: the
        packet counters stand still over :data:`IDLE_POLL_S` s (after a
        withdraw, once the routers send the VIPs' packets elsewhere). True
        if they did."""
        deadline = self._clock.monotonic() + timeout
        await self._read_counters()
        before = self._packets()
        while self._clock.monotonic() < deadline:
            await self._clock.sleep(min(IDLE_POLL_S, max(0.0, deadline - self._clock.monotonic())))
            await self._read_counters()
            now = self._packets()
            if now == before:
                return True
            before = now
        return False

    def _packets(self) -> int:
        return sum(p for p, _ in self._counters.values())

    def snapshot(self) -> dict[str, ServiceStatus]:
        """Per service name: seed, table size, generation, digest, the
        draining and drained backends and the per-backend counters as last
        read (at most :data:`COUNTER_INTERVAL_S` s old while :meth:`run` runs)."""
        out: dict[str, ServiceStatus] = {}
        for svc, tables, name in zip(self.settings.services, self._tables, self._names,
                                     strict=True):
            out[name] = ServiceStatus(
                seed=f"{svc.seed:#010x}", table_size=svc.size, generation=tables.generation,
                digest=tables.digest(), draining=sorted(tables.draining),
                drained=sorted(tables.drained),
                backends={str(addr): BackendCounters(packets=p, bytes=b)
                          for (i, addr), (p, b) in sorted(self._counters.items())
                          if i == svc.index},
            )
        return out

    def metric_families(self) -> Iterator[Metric]:
        """The engine's ``/metrics`` families (docs/metrics.md, "Kernel engine")."""
        packets = CounterMetricFamily(
            "anycast_lb_kernel_backend_packets",
            "Packets this node forwarded to the backend (nft counter, client to backend)",
            labels=["service", "backend"])
        nbytes = CounterMetricFamily(
            "anycast_lb_kernel_backend_bytes",
            "Bytes this node forwarded to the backend (nft counter, client to backend)",
            labels=["service", "backend"])
        generation = GaugeMetricFamily(
            "anycast_lb_kernel_table_generation",
            "Generation of the service's tables (bumped at each change)", labels=["service"])
        draining = GaugeMetricFamily(
            "anycast_lb_kernel_draining_backends",
            "Backends draining (new flows avoid them; moved flows keep them)",
            labels=["service"])
        for name, status in self.snapshot().items():
            generation.add_metric([name], status["generation"])
            draining.add_metric([name], len(status["draining"]))
            for backend, counters in status["backends"].items():
                packets.add_metric([name, backend], counters["packets"])
                nbytes.add_metric([name, backend], counters["bytes"])
        transactions = CounterMetricFamily(
            "anycast_lb_kernel_transactions", "nft transactions the kernel engine applied")
        transactions.add_metric([], self._nft.transactions)
        refused = CounterMetricFamily(
            "anycast_lb_kernel_transaction_failures",
            "nft transactions the kernel refused (a refused diff is retried)")
        refused.add_metric([], self._nft.refused)
        yield from (packets, nbytes, generation, draining, transactions, refused)

    async def status(self) -> dict[str, ServiceStatus]:
        """:meth:`snapshot` with the counters read now. Raises KernelEngineError."""
        self._counters = await self._nft.counters()
        return self.snapshot()
