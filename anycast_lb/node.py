"""One anycast-lb node: the only module that knows every part, and wires them.

It constructs the parts, connects them and runs them in one
``asyncio.TaskGroup``; the decisions live in the parts:

- :class:`~anycast_lb.dataplane.DataPlane`: a forwarder per service, the
  relay engine's loop and worker processes;
- :class:`~anycast_lb.health.monitor.HealthMonitor`: backend health;
- :class:`~anycast_lb.drainer.Drainer`: the one writer of the drain state
  (the pure :class:`~anycast_lb.drain.DrainMachine`);
- :class:`~anycast_lb.bgp.controller.RouteController`: the one writer of
  routes (policy, flap damping), sending them to the BGP speaker (ExaBGP
  child plus this project's announcer) when the config has a ``bgp``
  section;
- :class:`~anycast_lb.cluster.Cluster`: flow survival (``cluster`` section);
- the HTTP API, whose ``/status`` is :class:`~anycast_lb.status.Status`.

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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import Metric

from anycast_lb import api, log
from anycast_lb.bgp.controller import RouteController
from anycast_lb.bgp.liveness import CONFIRM_DEADLINE
from anycast_lb.bgp.policy import NodeView, ServiceView
from anycast_lb.clock import Clock, SystemClock
from anycast_lb.cluster import Cluster
from anycast_lb.config import NodeConfig, format_host_port
from anycast_lb.dataplane import DataPlane
from anycast_lb.drain import Drain, DrainMachine, FlowsIdle, Outcome, Phase, Stop, TimedOut, Undrain
from anycast_lb.drainer import Drainer
from anycast_lb.errors import AnycastLBError, BindError
from anycast_lb.forward import Forwarder
from anycast_lb.forward.workers import WorkerGroup
from anycast_lb.health.monitor import HealthMonitor
from anycast_lb.health.probes import ProbeResult
from anycast_lb.limits import Budget, open_descriptors, plan, soft_nofile
from anycast_lb.metrics import NodeMetrics
from anycast_lb.pool import Backend, Pool
from anycast_lb.status import BgpStatus, NodeInfo, Status, service_status

if TYPE_CHECKING:
    from anycast_lb.bgp.speaker import BgpSpeaker


# Seconds between the withdraw and closing the listeners on SIGTERM, so SYNs
# already in flight towards this node while routers converge still succeed.
_WITHDRAW_SETTLE = 1.0


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
        self.clock = clock or SystemClock()
        self.pools = {s.name: Pool(s) for s in config.services}
        self.data = DataPlane(config, self.pools, self.budget, bind_overrides=bind_overrides,
                              clock=self.clock)
        self.cluster: Cluster | None = None
        if config.cluster is not None:
            self.cluster = Cluster(config.cluster, config.services, name=config.node.name,
                                   clock=self.clock, abort=self.data.abort_flows)
            if config.cluster.flow_survival:
                self.data.flow_hook = self.cluster.on_flow
        self.speaker: BgpSpeaker | None = None
        self.routes: RouteController | None = None
        """The only writer of routes (with a ``bgp`` section)."""
        if config.bgp is not None:
            from anycast_lb.bgp.speaker import BgpSpeaker  # only nodes that announce need it

            self._run_dir = run_dir or Path(tempfile.mkdtemp(prefix=f"anycast-lb-{config.node.name}-"))
            self.speaker = BgpSpeaker(config.bgp, config.node.name, self._run_dir, self.clock,
                                      log_file=self._run_dir / "exabgp.log")
            self.routes = RouteController(config.bgp, self.view, self.speaker, self.clock)
        self.drainer = Drainer(DrainMachine(config.drain.announce_grace,
                                            announces=self.speaker is not None),
                               self.clock, on_change=self._on_drain_change)
        """The only writer of the drain state."""
        self.metrics = NodeMetrics(self.pools, lambda: self.draining, self._metric_families,
                                   counters=self.data.backend_counters,
                                   shedding=self.data.shedding)
        self._monitor = HealthMonitor(
            config.services,
            self.pools,
            self.clock,
            on_change=self._on_backend_change,
            on_check=self._on_check,
            max_jitter=1.0 if check_jitter else 0.0,
        )
        self._service_healthy: dict[str, bool] = {s.name: False for s in config.services}
        self._api_listen = api_listen
        self.api_address: tuple[str, int] | None = None
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ parts

    @property
    def forwarders(self) -> dict[str, Forwarder]:
        return self.data.forwarders

    @property
    def workers(self) -> WorkerGroup | None:
        return self.data.workers

    @property
    def service_addresses(self) -> dict[str, tuple[str, int]]:
        return self.data.addresses

    # ------------------------------------------------------------------ state

    @property
    def draining(self) -> bool:
        return self.drainer.state.draining

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
            drain=self.drainer.state.phase.route_phase,
            services=tuple(
                ServiceView(name=s.name, prefix=s.prefix, healthy=self.pools[s.name].healthy,
                            listening=self.data.listening(s.name))
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
        if self.data.workers is not None:
            self.data.workers.backend_changed(service, backend.key, up)
        healthy = self.pools[service].healthy
        if healthy != self._service_healthy[service]:
            self._service_healthy[service] = healthy
            log.event("service.healthy" if healthy else "service.unhealthy", service=service,
                      up_backends=self.pools[service].up_count)
        self._routes_changed()

    def _on_drain_change(self, outcome: Outcome) -> None:
        if outcome.routes_changed:
            self._routes_changed()

    def _routes_changed(self) -> None:
        if self.routes is not None:
            self.routes.poke()

    # ------------------------------------------------------------------ drain

    async def drain(self, reason: str) -> None:
        """Start a drain (idempotent)."""
        self.drainer.submit(Drain(reason))

    async def undrain(self) -> bool:
        """End a drain. False (and nothing changes) while the node stops."""
        return self.drainer.submit(Undrain()).accepted

    def request_stop(self) -> None:
        """Graceful stop (SIGTERM): drain, withdraw, let connections finish
        for up to ``drain.timeout`` s, then make ``run`` return."""
        self._stop.set()

    # ------------------------------------------------------------------ status

    def status_model(self) -> Status:
        """``GET /status`` (:mod:`anycast_lb.status`)."""
        bgp = BgpStatus.model_validate(self.speaker.status()) if self.speaker is not None else None
        routes = self.routes
        drain = self.drainer.state
        return Status.model_validate({
            "node": NodeInfo(name=self.config.node.name, draining=drain.draining,
                             drain_phase=drain.phase.route_phase.value,
                             drain_state=drain.phase.value, stopping=drain.stopping,
                             pid=os.getpid()),
            "services": [
                service_status(s, self.pools[s.name], self.data,
                               with_bgp=bgp is not None,
                               decision=routes.decision if routes is not None else None,
                               acked=bgp.routes if bgp is not None else {},
                               damping=routes.damping_status if routes is not None else None)
                for s in self.config.services
            ],
            "bgp": bgp,
            "cluster": self.cluster.status() if self.cluster is not None else None,
            "workers": self.data.workers.status() if self.data.workers is not None else None,
            "limits": {**self.budget.as_dict(), "open_descriptors": open_descriptors()},
        })

    def status(self) -> dict[str, Any]:
        """``GET /status`` as JSON-ready data."""
        return self.status_model().model_dump(mode="json")

    def metrics_exposition(self) -> bytes:
        return self.metrics.exposition()

    # ------------------------------------------------------------------ run

    async def _start_api(self) -> api.ApiServer:
        if self._api_listen is not None:
            host, port = self._api_listen
        else:
            address, port = self.config.api.host_port
            host = str(address)
        server = api.ApiServer(self, self.config.api)
        self.api_address = await server.start(str(host), int(port))
        self.metrics.registry.register(server.stats)
        log.event("api.listening", address=format_host_port(*self.api_address))
        return server

    async def run(self, started: asyncio.Event | None = None) -> None:
        """Run until ``request_stop`` completes a graceful stop, or until
        cancelled. Raises BindError if a forwarder or the API cannot bind, and
        the first AnycastLBError of any part that fails (e.g. AnnouncerError
        when ExaBGP cannot be started), unwrapped from the task group."""
        runner: api.ApiServer | None = None
        try:
            await self.data.start()
            runner = await self._start_api()
            async with asyncio.TaskGroup() as tg:
                if self.cluster is not None:
                    # Steering is up before any route is announced.
                    cluster_started = asyncio.Event()
                    tg.create_task(self.cluster.run(cluster_started))
                    await cluster_started.wait()
                monitor_started = asyncio.Event()
                tg.create_task(self._monitor.run(monitor_started))
                await monitor_started.wait()
                tg.create_task(self.drainer.run())
                if self.speaker is not None and self.routes is not None:
                    speaker_started = asyncio.Event()
                    tg.create_task(self.speaker.run(speaker_started))
                    await speaker_started.wait()
                    tg.create_task(self.routes.run())
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
            await self.data.close()
            if runner is not None:
                await runner.cleanup()
            log.event("node.stopped", name=self.config.node.name)

    async def _graceful_stop(self) -> None:
        log.event("node.stopping", drain_timeout=self.config.drain.timeout)
        if self.speaker is not None:
            self.speaker.begin_stop()  # an ExaBGP that exits now stays down
        self.drainer.submit(Stop())
        if self.speaker is not None:
            await self.drainer.wait_past(Phase.GRACEFUL)
            try:
                async with asyncio.timeout(_WITHDRAW_SETTLE):
                    await self.speaker.wait_synced()
            except TimeoutError:
                log.warning("route.withdraw_unacked")
            await self.clock.sleep(_WITHDRAW_SETTLE)
        self.data.stop_accepting()
        self._routes_changed()
        waited = self.clock.monotonic()
        idle = await self.data.wait_idle(self.config.drain.timeout)
        self.drainer.submit(FlowsIdle() if idle else TimedOut())
        if not idle:
            log.warning("node.drain_timeout", open_connections=self.data.active)
        if self.cluster is not None:
            # Planned drain: peers steer this node's
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
