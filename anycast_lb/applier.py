"""Live apply carried out: a node takes a new config without a restart, or
refuses it whole.

The pure :func:`~anycast_lb.liveapply.plan` and
:func:`~anycast_lb.liveapply.refusal` decide; :class:`LiveApplier` carries
the plan out in one step between awaits (new listeners are bound first, the
only part that can fail), then drains what was removed in the background:
a removed backend gets no new flows at once and its connections are reset
after ``drain.timeout`` s if still open; a removed service is withdrawn,
stops listening after the withdraw settles and is reset after
``drain.timeout`` s. Applies are serialized by one lock, which also covers
the node-local runtime overrides (:mod:`anycast_lb.runtime`) kept on top of
the node's file. :class:`ConfigRecord` counts what was offered (the
``config`` section of ``/status``, ``anycast_lb_config_*`` metrics).

Log events: ``config.applied`` (generation, digest, source, actions),
``config.refused`` (reason, source, generation), ``backend.removed``
(service, backend, reset), ``service.removed`` (service, drained).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from anycast_lb import liveapply, log, runtime
from anycast_lb.clock import Clock
from anycast_lb.config import BgpConfig, NodeConfig, ServiceConfig, load_config
from anycast_lb.errors import BindError, ConfigError
from anycast_lb.forward import Forwarder, RelayForwarder, TcpForwarder, UdpForwarder
from anycast_lb.forward.connection import Rules
from anycast_lb.limits import Budget, plan
from anycast_lb.liveapply import ApplyResult
from anycast_lb.pool import Backend, Pool
from anycast_lb.status import ConfigStatus, iso_utc
from anycast_lb.stopping import Synced, settle_withdraw

BACKEND_DRAIN_POLL = 0.1
"""Seconds between looks at a removed backend's connection count (a plain
int kept by the data path: there is no event to wait on)."""


class LiveData(Protocol):
    """The data plane (:class:`anycast_lb.dataplane.DataPlane`) as live apply changes it."""

    config: NodeConfig

    @property
    def forwarders(self) -> Mapping[str, Forwarder]: ...

    @property
    def workers(self) -> object | None:
        """Relay worker processes, when they run."""
        ...

    @property
    def kernel(self) -> object | None:
        """The kernel engine, when it runs."""
        ...

    async def open(self, config: NodeConfig, service: ServiceConfig, pool: Pool,
                   budget: Budget) -> tuple[Forwarder, tuple[str, int]]:
        """Bind a forwarder for a service added live. Raises BindError."""
        ...

    def install(self, name: str, forwarder: Forwarder, address: tuple[str, int]) -> None: ...

    def retire(self, name: str) -> Forwarder | None: ...

    def retired(self, forwarder: Forwarder) -> None: ...


class Checks(Protocol):
    """The health monitor (:class:`anycast_lb.health.monitor.HealthMonitor`)."""

    def update(self, services: Sequence[ServiceConfig], pools: Mapping[str, Pool]) -> None: ...


class Announce(Protocol):
    """The route controller (:class:`anycast_lb.bgp.controller.RouteController`)."""

    def set_bgp(self, bgp: BgpConfig) -> None: ...


class ServiceHooks(Protocol):
    """What the node does when live apply changes its services."""

    def service_added(self, name: str) -> None: ...

    def service_removed(self, name: str) -> None: ...

    def pool_changed(self, name: str) -> None:
        """The eligible set of service ``name`` may have changed."""
        ...


class ConfigRecord:
    """The config generation in effect and the applies offered to the node
    (``config`` section of ``/status``). Times come from ``clock.wall()``."""

    def __init__(self, config: NodeConfig, clock: Clock) -> None:
        self._clock = clock
        self.generation = 1
        """1 for the config the node started with, +1 per applied change."""
        self.digest = liveapply.digest(config)
        self.applied_at = clock.wall()
        self.applies = {"applied": 0, "refused": 0}
        self.last_refusal: tuple[float, str] | None = None
        """(wall clock s, reason) of the last refused config."""

    def result(self, applied: bool, actions: tuple[str, ...], source: str,
               reason: str = "") -> ApplyResult:
        return ApplyResult(applied=applied, generation=self.generation, digest=self.digest,
                           actions=actions, reason=reason, source=source)

    def applied(self, new: NodeConfig, actions: tuple[str, ...], source: str) -> ApplyResult:
        """Count ``new`` as applied: a new generation when its digest differs."""
        self.applies["applied"] += 1
        digest = liveapply.digest(new)
        if digest != self.digest:
            self.generation += 1
            self.digest = digest
            self.applied_at = self._clock.wall()
        log.event("config.applied", generation=self.generation, digest=self.digest,
                  source=source, actions="; ".join(actions) or "none")
        return self.result(True, actions, source)

    def refused(self, reason: str, actions: tuple[str, ...], source: str = "") -> ApplyResult:
        self.applies["refused"] += 1
        self.last_refusal = (self._clock.wall(), reason)
        log.warning("config.refused", reason=reason, source=source, generation=self.generation)
        return self.result(False, actions, source, reason)

    def status(self, source: Path | None) -> ConfigStatus:
        """``/status``'s ``config`` section; ``source`` is the node's file."""
        refusal = self.last_refusal
        return ConfigStatus(
            generation=self.generation, digest=self.digest,
            applied_at=iso_utc(self.applied_at) or "",
            source=str(source) if source is not None else None,
            applies=self.applies["applied"], refusals=self.applies["refused"],
            last_refusal=refusal[1] if refusal else None,
            last_refusal_at=iso_utc(refusal[0]) if refusal else None)

    def metric_families(self) -> Iterator[Metric]:
        """``anycast_lb_config_applies{result}`` and ``anycast_lb_config_generation``."""
        applies = CounterMetricFamily("anycast_lb_config_applies",
                                      "Configs offered to live apply, by result", labels=["result"])
        for result, count in self.applies.items():
            applies.add_metric([result], count)
        yield applies
        generation = GaugeMetricFamily("anycast_lb_config_generation",
                                       "Generation of the config in effect (1: as started)")
        generation.add_metric([], self.generation)
        yield generation


class LiveApplier:
    """Carries configs out on a running node.

    ``pools`` is the node's service name -> pool map, changed in place (the
    health monitor, metrics and ``/status`` read it). ``running`` says the
    node runs and is not stopping; ``spawn`` starts a background drain in
    the node's task group. ``config_path`` is the file :meth:`reload`
    re-reads. ``cluster``: flow survival runs (services fixed at start).
    """

    def __init__(self, config: NodeConfig, budget: Budget, clock: Clock, *,
                 pools: MutableMapping[str, Pool], data: LiveData, checks: Checks,
                 hooks: ServiceHooks, running: Callable[[], bool],
                 spawn: Callable[[Coroutine[Any, Any, None]], object],
                 announce: Announce | None = None, speaker: Synced | None = None,
                 cluster: bool = False, config_path: Path | None = None) -> None:
        self.config = config
        """The config in effect (with node-local overrides)."""
        self.config_path = config_path
        self.record = ConfigRecord(config, clock)
        self._budget, self._clock = budget, clock
        self._pools, self._data, self._checks, self._hooks = pools, data, checks, hooks
        self._running, self._spawn = running, spawn
        self._announce, self._speaker, self._cluster = announce, speaker, cluster
        self._lock = asyncio.Lock()
        self._base = config
        """The config without node-local runtime overrides (the file's)."""
        self._overrides: dict[runtime.BackendId, runtime.Override] = {}
        """Node-local ``backend drain|undrain|weight`` changes (standalone)."""

    # ------------------------------------------------------------------ entry points

    async def reload(self) -> ApplyResult:
        """Re-read ``config_path`` and :meth:`apply_config` it (SIGHUP,
        ``POST /reload``). A file that cannot be read or fails validation is
        refused (``config.refused``, counted), never raised."""
        if self.config_path is None:
            return self.record.refused("this node was not started from a file", ())
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            return self.record.refused(
                f"invalid config {exc.source}: {'; '.join(exc.problems)}", (),
                str(self.config_path))
        return await self.apply_config(new, source=str(self.config_path))

    async def apply_pushed(self, new: NodeConfig) -> bool:
        """A pushed revision, merged with this node's file, through live apply
        (the consensus agent's ``ApplyConfig``): True once in effect, False
        when it needs a restart; raises ConfigError when refused otherwise."""
        result = await self.apply_config(new, source="consensus")
        if result.applied:
            return True
        if result.reason.startswith("restart needed"):
            return False
        raise ConfigError("pushed config", [result.reason])

    async def apply_config(self, new: NodeConfig, *, source: str = "") -> ApplyResult:
        """Take ``new`` (already validated) without a restart, or refuse it whole.

        The plan (:func:`~anycast_lb.liveapply.plan`) is refused when
        :func:`~anycast_lb.liveapply.refusal` says so (node-local sections
        changed, settings fixed at start, relay workers, flow survival), when
        its caps do not fit the descriptor budget, when a new listener cannot
        bind, or when the node is not running or stopping; then nothing
        changes. Otherwise new listeners are bound, then in one step pools,
        health checks, listeners and route attributes change; removed
        backends and services drain in the background (module docstring).
        Never raises for a config it refuses; logs ``config.applied`` or
        ``config.refused``.

        Node-local runtime overrides (:mod:`anycast_lb.runtime`) of backends
        ``new`` still has are kept on top of it.
        """
        async with self._lock:
            overrides = runtime.prune(self._overrides, new)
            result = await self._apply_locked(runtime.overlay(new, overrides), source)
            if result.applied:
                self._base, self._overrides = new, overrides
            return result

    async def apply_override(self, change: runtime.Change) -> ApplyResult:
        """Make ``change`` a node-local override of the file and apply the
        result. Raises UnknownBackend when the file has no such backend."""
        async with self._lock:
            overrides = runtime.record(self._overrides, self._base, change)
            result = await self._apply_locked(runtime.overlay(self._base, overrides), "runtime")
            if result.applied:
                self._overrides = overrides
            return result

    def config_status(self) -> ConfigStatus:
        """``/status``'s ``config`` section."""
        return self.record.status(self.config_path)

    def runtime_overrides(self, service: str) -> frozenset[str]:
        """Keys of ``service``'s backends changed at runtime on this node only."""
        return frozenset(key for (name, key) in self._overrides if name == service)

    # ------------------------------------------------------------------ carrying out

    async def _apply_locked(self, new: NodeConfig, source: str) -> ApplyResult:
        """:meth:`apply_config` of ``new`` as given; the caller holds the lock."""
        old = self.config
        record = self.record
        actions = liveapply.plan(old, new)
        described = tuple(liveapply.describe(a) for a in actions)
        reason = liveapply.refusal(old, actions, workers=self._data.workers is not None,
                                   cluster=self._cluster,
                                   kernel=self._data.kernel is not None)
        if reason is None and not self._running():
            reason = "the node is not running, or is stopping"
        budget = self._budget
        if reason is None:
            try:
                budget = plan(self._budget.limit, new, source=source or "<config>")
            except ConfigError as exc:
                reason = f"descriptor budget: {'; '.join(exc.problems)}"
        if reason is not None:
            return record.refused(reason, described, source)
        if not actions:
            self.config = self._data.config = new
            return record.applied(new, (), source)
        opened: dict[str, tuple[Forwarder, tuple[str, int]]] = {}
        new_pools = {a.service.name: Pool(a.service) for a in actions
                     if isinstance(a, liveapply.AddService)}
        try:
            for a in actions:
                if isinstance(a, liveapply.AddService):
                    opened[a.service.name] = await self._data.open(
                        new, a.service, new_pools[a.service.name], budget)
        except BindError as exc:
            for forwarder, _ in opened.values():
                forwarder.stop_accepting()
                forwarder.abort_all()
            self._data.config = old
            return record.refused(str(exc), described, source)
        self._commit(new, actions, new_pools, opened)
        return record.applied(new, described, source)

    def _commit(self, new: NodeConfig, actions: list[liveapply.Action],
                new_pools: dict[str, Pool], opened: dict[str, tuple[Forwarder, tuple[str, int]]]
                ) -> None:
        """Carry out an accepted plan: no await, so no check, flow or route
        evaluation sees half of it."""
        pools, data, hooks = self._pools, self._data, self._hooks
        retiring: list[tuple[str, Forwarder]] = []
        for a in actions:
            if isinstance(a, liveapply.RemoveService):
                forwarder = data.retire(a.name)
                del pools[a.name]
                hooks.service_removed(a.name)
                if forwarder is not None:
                    retiring.append((a.name, forwarder))
        gone: list[tuple[str, Backend]] = []
        new_by_name = {s.name: s for s in new.services}
        for name, pool in pools.items():
            service = new_by_name[name]
            if pool.service != service:
                _, removed = pool.update(service)
                gone += [(name, b) for b in removed]
                retune(data.forwarders.get(name), service)
                hooks.pool_changed(name)  # an admin drain can take the last backend
        for name, pool in new_pools.items():
            pools[name] = pool
            hooks.service_added(name)
            forwarder, address = opened[name]
            data.install(name, forwarder, address)
        # Keep the configuration order of the file in /status and /metrics.
        ordered = {s.name: pools[s.name] for s in new.services}
        pools.clear()
        pools.update(ordered)
        self.config = data.config = new
        self._checks.update(new.services, pools)
        if self._announce is not None and new.bgp is not None:
            self._announce.set_bgp(new.bgp)  # also evaluates the new view: withdraws removed VIPs
        for name, backend in gone:
            self._spawn(self._drain_backend(name, backend))
        for name, forwarder in retiring:
            self._spawn(self._drain_service(name, forwarder))

    async def _drain_backend(self, service: str, backend: Backend) -> None:
        """A backend removed live: wait up to ``drain.timeout`` s for its
        connections to end, then reset what is left."""
        clock = self._clock
        deadline = clock.monotonic() + self.config.drain.timeout
        while backend.active_connections > 0 and clock.monotonic() < deadline:
            await clock.sleep(BACKEND_DRAIN_POLL)
        forwarder = self._data.forwarders.get(service)
        reset = forwarder.abort_backend(backend) if forwarder is not None else 0
        log.event("backend.removed", service=service, backend=backend.key, reset=reset)

    async def _drain_service(self, name: str, forwarder: Forwarder) -> None:
        """A service removed live, already out of the route view: let the
        withdraw settle, stop listening, wait up to ``drain.timeout`` s for
        its connections, reset what is left."""
        if self._speaker is not None:
            await settle_withdraw(self._speaker, self._clock, service=name)
        forwarder.stop_accepting()
        idle = await forwarder.wait_idle(self.config.drain.timeout)
        if not idle:
            forwarder.abort_all()
        self._data.retired(forwarder)
        log.event("service.removed", service=name, drained=idle)


def retune(forwarder: Forwarder | None, service: ServiceConfig) -> None:
    """Give a running forwarder the live settings of ``service``
    (``liveapply.LIVE_SERVICE_FIELDS``: the pool holds the others); new
    connections use them."""
    if isinstance(forwarder, TcpForwarder | RelayForwarder):
        forwarder.service = service
        forwarder.rules = Rules.of(service)
    elif isinstance(forwarder, UdpForwarder):
        forwarder.service = service
