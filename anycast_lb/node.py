"""One anycast-lb node: the only module that knows every part.

It wires the forwarders (one per service), the health monitor, the HTTP API
and, when the config has a ``bgp`` section, the BGP speaker (ExaBGP child
plus this project's announcer), all inside one ``asyncio.TaskGroup``.

Route decisions are made by the pure policy (:mod:`anycast_lb.bgp.policy`)
from a snapshot of the node: drain phase, and per service whether its
forwarder listens and ``min_healthy`` backends are up. The node recomputes
that snapshot whenever health, drain state or damping changes and hands the
result to the speaker.

Drain (``POST /drain``, ``anycast-lb drain``, SIGTERM): announce with the
GRACEFUL_SHUTDOWN community 65535:0 (RFC 8326) for ``drain.announce_grace``
seconds, withdraw, keep serving established connections for up to
``drain.timeout`` seconds (UDP flows count as finished once idle for
:data:`~anycast_lb.forward.udp.DRAIN_IDLE` s); on SIGTERM, then stop
ExaBGP, last (it is never restarted once the stop has begun), then stop.

What ``/status``, ``/readyz`` and ``/metrics`` say about BGP is what ExaBGP
confirmed within :data:`~anycast_lb.bgp.liveness.CONFIRM_DEADLINE` s; past
that, peers are ``unknown``, routes ``unconfirmed`` and the node not ready.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from prometheus_client.core import Metric

from anycast_lb import api, log
from anycast_lb.bgp.damping import FlapDamper
from anycast_lb.bgp.liveness import CONFIRM_DEADLINE, UNCONFIRMED
from anycast_lb.bgp.policy import (
    DrainPhase,
    NodeView,
    Prefix,
    Route,
    ServiceView,
    announcement_state,
    desired_routes,
    prefix_up,
)
from anycast_lb.clock import Clock, SystemClock
from anycast_lb.cluster import Cluster
from anycast_lb.config import Engine, NodeConfig, format_host_port
from anycast_lb.config import Protocol as Transport
from anycast_lb.errors import AnycastLBError, BindError
from anycast_lb.forward import (
    FlowHook,
    FlowKey,
    Forwarder,
    RelayForwarder,
    RelayLoop,
    TcpForwarder,
    UdpForwarder,
    forwarder_for,
)
from anycast_lb.forward.relay import HAVE_EPOLL
from anycast_lb.forward.workers import BackendCounters, WorkerGroup, start_workers
from anycast_lb.health.monitor import HealthMonitor
from anycast_lb.health.probes import ProbeResult
from anycast_lb.limits import Budget, Slots, open_descriptors, plan, soft_nofile
from anycast_lb.metrics import NodeMetrics, Shedding
from anycast_lb.pool import Backend, Pool

if TYPE_CHECKING:
    from anycast_lb.bgp.speaker import BgpSpeaker


# Seconds between the withdraw and closing the listeners on SIGTERM, so SYNs
# already in flight towards this node while routers converge still succeed.
_WITHDRAW_SETTLE = 1.0


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


class Node:
    """A running node. Build it, then ``await run()``; stop it with
    ``request_stop()`` (graceful) or by cancelling ``run``.

    ``bind_overrides`` maps a service name to the (host, port) its forwarder
    binds instead of the VIP:port (tests bind 127.0.0.1 port 0);
    ``api_listen`` overrides ``api.listen`` the same way. ``budget`` is
    the descriptor budget (the CLI plans it after raising the limit); by
    default it is planned for the current soft limit, raising ConfigError
    when the config's caps cannot fit it.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        clock: Clock | None = None,
        run_dir: Path | None = None,
        bind_overrides: Mapping[str, tuple[str, int]] | None = None,
        api_listen: tuple[str, int] | None = None,
        check_jitter: bool = True,
        budget: Budget | None = None,
    ) -> None:
        self.config = config
        self.budget = budget if budget is not None else plan(soft_nofile(), config)
        forwarding = config.forwarding
        self._tcp_slots = Slots(self.budget.tcp_connections,
                                self.budget.tcp_connections_per_source or None,
                                prefix_v4=forwarding.tcp_source_prefix_v4,
                                prefix_v6=forwarding.tcp_source_prefix_v6)
        """The asyncio engine's connection caps (the relay loop holds its own)."""
        self.clock = clock or SystemClock()
        self.pools = {s.name: Pool(s) for s in config.services}
        self.forwarders: dict[str, Forwarder] = {}
        self.relay: RelayLoop | None = None
        """The relay engine's loop (``forwarding.engine: relay``, Linux), shared
        by every TCP service."""
        self.flow_hook: FlowHook | None = None
        """Told of every TCP flow accepted and closed (flow survival)."""
        self.workers: WorkerGroup | None = None
        """Relay worker processes (``forwarding.workers`` > 1)."""
        self.wildcard_listeners = False
        """Bind TCP listeners to the wildcard address (flow survival)."""
        self._bind_overrides = dict(bind_overrides or {})
        self._api_listen = api_listen
        self.api_address: tuple[str, int] | None = None
        self.service_addresses: dict[str, tuple[str, int]] = {}
        self.drain_phase = DrainPhase.NONE
        self._drain_task: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._changed = asyncio.Event()
        self.cluster: Cluster | None = None
        if config.cluster is not None:
            self.cluster = Cluster(config.cluster, config.services, name=config.node.name,
                                   clock=self.clock, abort=self._abort_flows)
            if config.cluster.flow_survival:
                self.flow_hook = self.cluster.on_flow
                self.wildcard_listeners = True
        self.speaker: BgpSpeaker | None = None
        self.damper: FlapDamper | None = None
        self.metrics = NodeMetrics(self.pools, lambda: self.draining, self._metric_families,
                                   counters=self._backend_counters, shedding=self._shedding)
        self._monitor = HealthMonitor(
            config.services,
            self.pools,
            self.clock,
            on_change=self._on_backend_change,
            on_check=self._on_check,
            max_jitter=1.0 if check_jitter else 0.0,
        )
        self._service_healthy: dict[str, bool] = {s.name: False for s in config.services}
        if config.bgp is not None:
            from anycast_lb.bgp.speaker import BgpSpeaker  # only nodes that announce need it

            self._run_dir = run_dir or Path(tempfile.mkdtemp(prefix=f"anycast-lb-{config.node.name}-"))
            self.speaker = BgpSpeaker(config.bgp, config.node.name, self._run_dir, self.clock,
                                      log_file=self._run_dir / "exabgp.log")
            self.damper = FlapDamper(config.bgp.damping)
        self.routes: dict[Prefix, Route] = {}

    # ------------------------------------------------------------------ state

    @property
    def draining(self) -> bool:
        return self.drain_phase is not DrainPhase.NONE

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "node is draining"
        if self.speaker is not None:
            fresh = self.speaker.freshness()
            if not fresh.confirmed:
                return False, (f"BGP state unconfirmed: no answer from ExaBGP for "
                               f"{fresh.age:.1f} s (deadline {CONFIRM_DEADLINE:g} s)")
        healthy = [s.name for s in self.view().services if s.listening and s.healthy]
        if not healthy:
            return False, "no service has min_healthy backends up and a listening forwarder"
        return True, f"serving: {', '.join(healthy)}"

    def view(self) -> NodeView:
        """The node snapshot the route policy decides on."""
        return NodeView(
            drain=self.drain_phase,
            services=tuple(
                ServiceView(
                    name=s.name,
                    prefix=s.prefix,
                    healthy=self.pools[s.name].healthy,
                    listening=(f := self.forwarders.get(s.name)) is not None and f.listening,
                )
                for s in self.config.services
            ),
        )

    def _metric_families(self) -> Iterator[Metric]:
        if self.cluster is not None:
            yield from self.cluster.metric_families()
        if self.speaker is not None:
            yield from self.speaker.metric_families()

    def _on_check(self, service: str, backend: Backend, result: ProbeResult) -> None:
        self.metrics.observe_check(service, backend.key, result.latency_s)

    def _on_backend_change(self, service: str, backend: Backend, up: bool) -> None:
        if self.workers is not None:
            self.workers.backend_changed(service, backend.key, up)
        healthy = self.pools[service].healthy
        if healthy != self._service_healthy[service]:
            self._service_healthy[service] = healthy
            log.event("service.healthy" if healthy else "service.unhealthy", service=service,
                      up_backends=self.pools[service].up_count)
        self._changed.set()

    def _backend_counters(self, service: str, backend: Backend) -> BackendCounters:
        """The backend's counters in this process plus the relay workers'."""
        if self.workers is None:
            return BackendCounters.of(backend)
        return self.workers.counters(service, backend)

    def _refused(self, service: str) -> tuple[dict[str, int], int, int]:
        """``service``'s refusals by reason, accept pauses and UDP evictions,
        in this process and the relay workers."""
        forwarder = self.forwarders.get(service)
        refused: dict[str, int] = {}
        pauses = evicted = 0
        if isinstance(forwarder, (RelayForwarder, TcpForwarder, UdpForwarder)):
            refused = forwarder.refused()
            pauses = forwarder.refusals.accept_pauses
        if isinstance(forwarder, UdpForwarder):
            evicted = forwarder.evicted
        if self.workers is not None:
            more, more_pauses = self.workers.refused(service)
            refused = {k: refused.get(k, 0) + more.get(k, 0) for k in refused.keys() | more.keys()}
            pauses += more_pauses
        return refused, pauses, evicted

    def _shedding(self) -> Shedding:
        budget = self.budget
        refused: dict[str, dict[str, int]] = {}
        pauses: dict[str, int] = {}
        evicted: dict[str, int] = {}
        for s in self.config.services:
            refused[s.name], pauses[s.name], evicted_n = self._refused(s.name)
            if s.protocol is Transport.UDP:
                evicted[s.name] = evicted_n
        return Shedding(limit=budget.limit, reserve=budget.reserve.total,
                        open_descriptors=open_descriptors(),
                        tcp_connection_cap=budget.tcp_connections,
                        tcp_connections_per_source_cap=budget.tcp_connections_per_source,
                        udp_flow_cap=budget.udp_flows,
                        udp_flows_per_source_cap=budget.udp_flows_per_source,
                        refused=refused, evicted=evicted, accept_pauses=pauses)

    def _data_path(self) -> list[Forwarder]:
        """Every forwarder, and the relay workers as one."""
        return [*self.forwarders.values(), *([self.workers] if self.workers is not None else [])]

    def _abort_flows(self, keys: Iterable[FlowKey]) -> int:
        """Reset our client connections for ``keys``: a live peer accepted
        those 4-tuples after us, so our sockets are stale (FLOW-SURVIVAL
        trap 1). Thread-safe; how many were found."""
        wanted = list(keys)
        return sum(f.abort_flows(wanted) for f in self.forwarders.values()
                   if isinstance(f, RelayForwarder))

    # ------------------------------------------------------------------ drain

    async def drain(self, reason: str) -> None:
        """Start a drain; returns once it has begun (idempotent)."""
        if self.draining:
            return
        log.event("node.drain", reason=reason)
        if self.speaker is not None and self._tg is not None:
            self._drain_task = self._tg.create_task(self._drain_to_withdraw())
            self.drain_phase = DrainPhase.GRACEFUL
        else:
            self.drain_phase = DrainPhase.WITHDRAWN
        self._changed.set()

    async def _drain_to_withdraw(self) -> None:
        await self.clock.sleep(self.config.drain.announce_grace)
        if self.drain_phase is DrainPhase.GRACEFUL:
            self.drain_phase = DrainPhase.WITHDRAWN
            log.event("node.drain_withdraw")
            self._changed.set()

    async def undrain(self) -> bool:
        """End a drain. False (and nothing changes) while the node stops."""
        if self._stopping:
            return False
        if not self.draining:
            return True
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None
        self.drain_phase = DrainPhase.NONE
        log.event("node.undrain")
        self._changed.set()
        return True

    def request_stop(self) -> None:
        """Graceful stop (SIGTERM): drain, withdraw, let connections finish
        for up to ``drain.timeout`` s, then make ``run`` return."""
        self._stop.set()

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        bgp_status = self.speaker.status() if self.speaker is not None else None
        intent: dict[Prefix, str] = {}
        acked: Mapping[str, str] = {}
        if bgp_status is not None and self.config.bgp is not None and self.damper is not None:
            intent = announcement_state(self.view(), self.config.bgp, self.damper.suppressed(now))
            acked = cast(Mapping[str, str], bgp_status["routes"])
        services = []
        for s in self.config.services:
            pool = self.pools[s.name]
            forwarder = self.forwarders.get(s.name)
            entry: dict[str, Any] = {
                "name": s.name,
                "vip": str(s.vip),
                "port": s.port,
                "protocol": s.protocol.value,
                "balance": s.balance.value,
                "listen": format_host_port(*self.service_addresses[s.name])
                if s.name in self.service_addresses else None,
                "listening": forwarder is not None and forwarder.listening,
                "healthy": pool.healthy,
                "min_healthy": s.min_healthy,
                "up_backends": pool.up_count,
                "active_connections": (forwarder.active if forwarder is not None else 0)
                + (self.workers.service_active(s.name) if self.workers is not None else 0),
                "backends": [
                    {
                        "address": str(b.config.address),
                        "port": b.config.port,
                        "weight": b.config.weight,
                        "state": "up" if b.up else "down",
                        "last_check": _iso(b.last_check),
                        "last_latency_ms": None if b.last_latency_ms is None
                        else round(b.last_latency_ms, 3),
                        "last_detail": b.last_detail,
                        **self._backend_counters(s.name, b)._asdict(),
                    }
                    for b in pool.backends
                ],
                "refused": self._refused(s.name)[0],
            }
            if self.config.bgp is not None and bgp_status is not None:
                entry["prefix"] = str(s.prefix)
                # The policy's intent once ExaBGP acked it; "pending" until it
                # did, "unconfirmed" while ExaBGP does not answer.
                reported = acked.get(str(s.prefix))
                entry["announcement"] = (
                    reported if reported in ("pending", UNCONFIRMED)
                    else intent.get(s.prefix, "withdrawn")
                )
                if self.damper is not None:
                    entry["damping"] = self.damper.status(s.prefix, now)
            services.append(entry)
        return {
            "node": {
                "name": self.config.node.name,
                "draining": self.draining,
                "drain_phase": self.drain_phase.value,
                "pid": os.getpid(),
            },
            "services": services,
            "bgp": bgp_status,
            "cluster": self.cluster.status() if self.cluster is not None else None,
            "workers": self.workers.status() if self.workers is not None else None,
            "limits": {**self.budget.as_dict(), "open_descriptors": open_descriptors()},
        }

    def metrics_exposition(self) -> bytes:
        return self.metrics.exposition()

    # ------------------------------------------------------------------ run

    def _start_relay(self) -> None:
        forwarding = self.config.forwarding
        if forwarding.engine is not Engine.RELAY:
            return
        if not any(s.protocol is Transport.TCP for s in self.config.services):
            return
        if not HAVE_EPOLL:
            log.warning("forward.engine_unavailable", engine="relay", reason="no epoll",
                        using="asyncio")
            return
        self.relay = RelayLoop(
            forwarding, max_connections=self.budget.tcp_connections,
            max_connections_per_source=self.budget.tcp_connections_per_source or None,
            max_pipes=self.budget.pipes or None)
        self.relay.start()

    async def _start_forwarders(self) -> None:
        self._start_relay()
        reuse_port = self.relay is not None and self.config.forwarding.workers > 1
        for s in self.config.services:
            host, port = self._bind_overrides.get(s.name, (str(s.vip), s.port))
            forwarder = forwarder_for(
                s, self.pools[s.name], bind_host=host, bind_port=port, relay=self.relay,
                wildcard=self.wildcard_listeners and self.relay is not None,
                on_flow=self.flow_hook if self.relay is not None else None,
                reuse_port=reuse_port, slots=self._tcp_slots,
                max_flows=self.budget.udp_flows.get(s.name),
                max_flows_per_source=self.budget.udp_flows_per_source.get(s.name),
            )
            self.service_addresses[s.name] = await forwarder.start()
            self.forwarders[s.name] = forwarder
            log.event("forwarder.listening", service=s.name, protocol=s.protocol.value,
                      address=format_host_port(*self.service_addresses[s.name]))
        self.workers = await start_workers(self.config, self.pools, self.service_addresses,
                                           relay=self.relay is not None,
                                           max_tcp_connections=self.budget.tcp_connections,
                                           max_tcp_connections_per_source=(
                                               self.budget.tcp_connections_per_source or None),
                                           max_pipes=self.budget.pipes or None)

    async def _start_api(self) -> web.AppRunner:
        if self._api_listen is not None:
            host, port = self._api_listen
        else:
            address, port = self.config.api.host_port
            host = str(address)
        app = api.make_app(self, self.config.api.admin_token_file)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, str(host), int(port), reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise BindError(f"API cannot listen on {format_host_port(str(host), int(port))}: "
                            f"{exc.strerror or exc}") from exc
        bound = runner.addresses[0]
        self.api_address = (str(bound[0]), int(bound[1]))
        log.event("api.listening", address=format_host_port(*self.api_address))
        return runner

    async def _route_loop(self) -> None:
        """Recompute the desired routes on every change; one writer to the speaker."""
        assert self.speaker is not None and self.config.bgp is not None and self.damper is not None
        while True:
            self._changed.clear()
            now = self.clock.monotonic()
            view = self.view()
            for prefix, up in prefix_up(view).items():
                self.damper.observe(prefix, up, now)
            routes = desired_routes(view, self.config.bgp, self.damper.suppressed(now))
            if routes != self.routes:
                for prefix in self.routes.keys() - routes.keys():
                    log.event("route.withdraw", prefix=str(prefix))
                for prefix, route in routes.items():
                    if self.routes.get(prefix) != route:
                        log.event("route.announce", prefix=str(prefix), med=route.med,
                                  communities=",".join(route.communities))
                self.routes = routes
            self.speaker.set_routes(routes)
            wake = self.damper.next_change(now)
            timeout = None if wake is None else max(wake - now, 0.01)
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
            except TimeoutError:
                pass

    async def run(self, started: asyncio.Event | None = None) -> None:
        """Run until ``request_stop`` completes a graceful stop, or until
        cancelled. Raises BindError if a forwarder or the API cannot bind, and
        the first AnycastLBError of any part that fails (e.g. AnnouncerError
        when ExaBGP cannot be started), unwrapped from the task group."""
        runner: web.AppRunner | None = None
        try:
            await self._start_forwarders()
            runner = await self._start_api()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                if self.cluster is not None:
                    # Steering is up before any route is announced.
                    cluster_started = asyncio.Event()
                    tg.create_task(self.cluster.run(cluster_started))
                    await cluster_started.wait()
                monitor_started = asyncio.Event()
                tg.create_task(self._monitor.run(monitor_started))
                await monitor_started.wait()
                if self.speaker is not None:
                    speaker_started = asyncio.Event()
                    tg.create_task(self.speaker.run(speaker_started))
                    await speaker_started.wait()
                    tg.create_task(self._route_loop())
                if started is not None:
                    started.set()
                log.event("node.started", name=self.config.node.name,
                          services=len(self.config.services), bgp=self.speaker is not None)
                await self._stop.wait()
                await self._graceful_stop()
                raise _Stopped
        except* _Stopped:
            pass
        except* AnycastLBError as group:
            raise _first_leaf(group) from None
        finally:
            self._tg = None
            for forwarder in self._data_path():
                forwarder.stop_accepting()
                forwarder.abort_all()
            if self.workers is not None:
                await self.workers.close()
            if self.relay is not None:
                self.relay.stop()
            if runner is not None:
                await runner.cleanup()
            log.event("node.stopped", name=self.config.node.name)

    async def _graceful_stop(self) -> None:
        self._stopping = True
        log.event("node.stopping", drain_timeout=self.config.drain.timeout)
        if self.speaker is not None:
            self.speaker.begin_stop()  # an ExaBGP that exits now stays down
            if not self.draining:
                await self.drain("shutdown")
            if self._drain_task is not None:
                await self._drain_task
            try:
                async with asyncio.timeout(_WITHDRAW_SETTLE):
                    await self.speaker.wait_synced()
            except TimeoutError:
                log.warning("route.withdraw_unacked")
            await self.clock.sleep(_WITHDRAW_SETTLE)
        else:
            self.drain_phase = DrainPhase.WITHDRAWN
        for forwarder in self._data_path():
            forwarder.stop_accepting()
        self._changed.set()
        waited = self.clock.monotonic()
        results = await asyncio.gather(
            *(f.wait_idle(self.config.drain.timeout) for f in self._data_path())
        )
        if not all(results):
            log.warning("node.drain_timeout", open_connections=sum(f.active for f in self._data_path()))
        if self.cluster is not None:
            # Planned drain (FLOW-SURVIVAL trap 5): peers steer this node's
            # flows here until it owns none; only then does steering go.
            left = self.config.drain.timeout - (self.clock.monotonic() - waited)
            if not await self.cluster.wait_owned_zero(max(left, 0.0)):
                log.warning("node.drain_timeout", owned_flows=len(self.cluster.local))
        if self.speaker is not None:
            # Last: the routes are withdrawn, so closing the sessions changes
            # nothing the routers still use.
            await self.speaker.stop_exabgp()


def _first_leaf(group: BaseExceptionGroup[AnycastLBError]) -> AnycastLBError:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, AnycastLBError)
    return error


class _Stopped(Exception):
    """Raised inside the task group to cancel every child after a graceful stop."""
