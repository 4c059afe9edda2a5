"""One anycast-lb node: the composition root, the only module that knows
every part. It constructs the parts, connects their callbacks and runs them
in one ``asyncio.TaskGroup``; the logic lives in the parts:

- :class:`~anycast_lb.dataplane.DataPlane`: a forwarder per service, the
  relay engine's loop and worker processes, or the kernel engine's
  nftables table (``forwarding.engine: kernel``, whose writer task runs
  here: pool changes reach it as diffs);
- :class:`~anycast_lb.health.monitor.HealthMonitor`: backend health; what
  follows a backend or pool change (workers, kernel tables, consensus
  votes, service health log, routes decided again) is
  :class:`~anycast_lb.poolevents.PoolEvents`;
- :class:`~anycast_lb.nodestate.NodeState`: the route policy's view of the
  node, the VIPs it could own, its readiness (``/readyz``);
- :class:`~anycast_lb.drainer.Drainer`: the one writer of the drain state
  (the pure :class:`~anycast_lb.drain.DrainMachine`); drain requests, the
  elected VIPs handed over first: :class:`~anycast_lb.drainctl.DrainControl`;
- :class:`~anycast_lb.bgp.controller.RouteController`: the one writer of
  routes (policy, flap damping), sending them to the BGP speaker (ExaBGP
  child plus this project's announcer) when the config has a ``bgp``
  section;
- :class:`~anycast_lb.cluster.Cluster`: flow survival (``cluster`` section);
- :class:`~anycast_lb.consensus.agent.ConsensusAgent` (``consensus``
  section): membership, agreed backend health (the pools' up sets), pushed
  config and the drain slots on etcd;
- :class:`~anycast_lb.election.part.OwnershipPart` (``consensus`` section
  and ``active_passive`` services): one owner per VIP, elected on etcd and
  fenced; ``via: l2`` VIPs move by ARP/NA, ``via: bgp`` ones through the
  route policy (docs/l2.md);
- :class:`~anycast_lb.applier.LiveApplier`: live apply (SIGHUP, ``POST
  /reload``, pushed configs) and the config in effect;
  :class:`~anycast_lb.backendctl.BackendControl`: runtime drain, undrain
  and weight of one backend;
- :class:`~anycast_lb.nodestatus.NodeStatus`: ``/status`` (the models of
  :mod:`anycast_lb.status`); :class:`~anycast_lb.metrics.NodeMetrics`:
  ``/metrics``, the parts' families chained in order;
- :class:`~anycast_lb.loopback.LoopbackVips`: ``manage_address`` VIPs on
  ``lo``, added before the listeners bind and removed after they close;
- :class:`~anycast_lb.stopping.GracefulStop`: the SIGTERM sequence (hand
  the VIPs over, GRACEFUL_SHUTDOWN 65535:0 per RFC 8326, withdraw, let
  connections finish for up to ``drain.timeout`` s, stop ExaBGP last);
- the HTTP API (:mod:`anycast_lb.api`), calling the thin methods of
  :class:`Node`.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anycast_lb import api, log, runtime
from anycast_lb.applier import LiveApplier
from anycast_lb.backendctl import BackendControl
from anycast_lb.bgp.controller import RouteController
from anycast_lb.bgp.policy import NodeView
from anycast_lb.clock import Clock, SystemClock
from anycast_lb.cluster import Cluster
from anycast_lb.config import NodeConfig, format_host_port
from anycast_lb.dataplane import DataPlane
from anycast_lb.drain import DrainMachine, Outcome
from anycast_lb.drainctl import DrainControl
from anycast_lb.drainer import Drainer, HandOverFirst
from anycast_lb.errors import AnycastLBError, first_leaf
from anycast_lb.forward import Forwarder
from anycast_lb.forward.workers import WorkerGroup
from anycast_lb.health.monitor import HealthMonitor
from anycast_lb.limits import Budget, plan, soft_nofile
from anycast_lb.liveapply import ApplyResult
from anycast_lb.loopback import IPAddress, LoopbackVips
from anycast_lb.metrics import NodeMetrics, chain_families
from anycast_lb.nodestate import NodeState
from anycast_lb.nodestatus import NodeStatus
from anycast_lb.pool import Pool
from anycast_lb.poolevents import PoolEvents
from anycast_lb.status import Status
from anycast_lb.stopping import GracefulStop

if TYPE_CHECKING:
    from anycast_lb.bgp.speaker import BgpSpeaker
    from anycast_lb.consensus.agent import ApplyConfig, ConsensusAgent
    from anycast_lb.election.part import OwnershipPart


class Node:
    """A running node. Build it, then ``await run()``; stop it with
    ``request_stop()`` (graceful) or by cancelling ``run``.

    ``bind_overrides`` maps a service name to the (host, port) its forwarder
    binds instead of the VIP:port (tests bind 127.0.0.1 port 0);
    ``ephemeral_ports``: every other service, including one added live,
    binds port 0 of its VIP; ``api_listen`` overrides ``api.listen`` the
    same way; ``cluster_sock`` is an already bound UDP socket for the
    cluster's sync endpoint (tests bind port 0 and name the port read back
    in the peers' configs).
    ``config_path`` is the file :meth:`reload` re-reads (SIGHUP, ``POST
    /reload``). ``budget`` is
    the descriptor budget (the CLI plans it after raising the limit); by
    default it is planned for the current soft limit, raising ConfigError
    when the config's caps cannot fit it. ``apply`` runs a config pushed
    through consensus (default: log that it waits for a restart).
    """

    def __init__(self, config: NodeConfig, *, clock: Clock | None = None,
                 run_dir: Path | None = None,
                 bind_overrides: Mapping[str, tuple[str, int]] | None = None,
                 api_listen: tuple[str, int] | None = None, ephemeral_ports: bool = False,
                 cluster_sock: socket.socket | None = None, check_jitter: bool = True,
                 budget: Budget | None = None, apply: ApplyConfig | None = None,
                 config_path: Path | None = None) -> None:
        # Parts built further down are reached through lambdas: they are
        # called only once the node runs.
        self.budget = budget if budget is not None else plan(soft_nofile(), config)
        self.clock = clock or SystemClock()
        self._tasks: asyncio.TaskGroup | None = None
        self.pools = {s.name: Pool(s) for s in config.services}
        self.data = DataPlane(config, self.pools, self.budget, bind_overrides=bind_overrides,
                              ephemeral_ports=ephemeral_ports,
                              clock=self.clock)
        self.cluster: Cluster | None = None
        if config.cluster is not None:
            self.cluster = Cluster(config.cluster, config.services, name=config.node.name,
                                   clock=self.clock, abort=self.data.abort_flows,
                                   sock=cluster_sock)
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
        self.consensus: ConsensusAgent | None = None
        if config.consensus is not None:
            from anycast_lb.consensus.agent import ConsensusAgent

            self.consensus = ConsensusAgent(
                config.consensus, config, running=lambda: self.config, pools=lambda: self.pools,
                on_pool_change=lambda *change: self.events.backend_changed(*change),
                apply=apply or (lambda new: self.applier.apply_pushed(new)),
                api=lambda: format_host_port(*self.api_address) if self.api_address else "",
                clock=self.clock)
        self.owners: OwnershipPart | None = None
        """VIP ownership elections (``consensus`` and ``active_passive``)."""
        if config.consensus is not None:
            from anycast_lb.election.part import OwnershipPart, elected_vips

            if elected_vips(config.services):
                self.owners = OwnershipPart(config.consensus, config.election,
                                            config.node.name, config.services,
                                            on_change=self._routes_changed, clock=self.clock)
        self.drainer = Drainer(DrainMachine(config.drain.announce_grace,
                                            announces=self.speaker is not None),
                               self.clock, on_change=self._on_drain_change,
                               slots=(HandOverFirst(self.consensus, lambda: self.drains.hand_over())
                                      if self.owners is not None and self.consensus is not None
                                      else self.consensus),
                               wait_idle=self.data.wait_idle,
                               drain_timeout=config.drain.timeout)
        """The only writer of the drain state."""
        self.state = NodeState(lambda: self.config, self.drainer, self.data, self.pools,
                               consensus=self.consensus, owners=self.owners, speaker=self.speaker)
        """The node's view for the route policy, the VIPs it could own, its readiness."""
        self.drains = DrainControl(self.drainer, self.serving, owners=self.owners,
                                   consensus=self.consensus)
        """Drain and undrain requests, the elected VIPs handed over first."""
        self.events = PoolEvents(self.pools, self.data, routes_changed=self._routes_changed,
                                 observe=lambda *check: self.metrics.observe_check(*check),
                                 consensus=self.consensus)
        """What follows a change of backends or pools."""
        self._monitor = HealthMonitor(
            config.services,
            self.pools,
            self.clock,
            on_change=(self.events.local_health if self.consensus is not None
                       else self.events.backend_changed),
            on_check=self.events.checked,
            max_jitter=1.0 if check_jitter else 0.0,
            update_pools=self.consensus is None,
        )
        self.stopping = GracefulStop(config.drain, self.drainer, self.data, self.clock,
                                     speaker=self.speaker, cluster=self.cluster,
                                     hand_over=lambda: self.drains.hand_over(),
                                     routes_changed=self._routes_changed)
        self.applier = LiveApplier(config, self.budget, self.clock, pools=self.pools,
                                   data=self.data, checks=self._monitor, hooks=self.events,
                                   running=self._running, spawn=self._spawn,
                                   announce=self.routes, speaker=self.speaker,
                                   cluster=self.cluster is not None, config_path=config_path)
        """Live apply (SIGHUP, ``POST /reload``, pushed configs); holds the config in effect."""
        self.backends = BackendControl(
            config.node.name, self.applier, self.data, self.clock, consensus=self.consensus,
            request_timeout=config.consensus.request_timeout if config.consensus else 0.0)
        """Runtime drain, undrain and weight of single backends."""
        self.report = NodeStatus(self.applier, self.pools, self.data, self.drainer, self.budget,
                                 speaker=self.speaker, routes=self.routes, cluster=self.cluster,
                                 consensus=self.consensus, owners=self.owners)
        """``GET /status``."""
        families = chain_families(
            self.consensus.metric_families if self.consensus is not None else None,
            self.owners.metric_families if self.owners is not None else None,
            self.applier.record.metric_families,
            self.cluster.metric_families if self.cluster is not None else None,
            self.data.metric_families,
            self.speaker.metric_families if self.speaker is not None else None,
            self.report.vip_families)
        self.metrics = NodeMetrics(self.pools, lambda: self.draining, families,
                                   counters=self.data.backend_counters,
                                   shedding=self.data.shedding, traffic=self.data.traffic)
        self._api_listen = api_listen
        self.api_address: tuple[str, int] | None = None
        self._stop = asyncio.Event()
        self.loopback = LoopbackVips(config.managed_vips)

    # ------------------------------------------------------------------ parts

    @property
    def forwarders(self) -> dict[str, Forwarder]:
        return self.data.forwarders

    @property
    def workers(self) -> WorkerGroup | None:
        return self.data.workers

    @property
    def vips_added(self) -> list[IPAddress]:
        """VIPs this node put on ``lo`` at start (``manage_address``)."""
        return self.loopback.added

    @property
    def service_addresses(self) -> dict[str, tuple[str, int]]:
        return self.data.addresses

    # ------------------------------------------------------------------ state

    @property
    def config(self) -> NodeConfig:
        """The config in effect (live apply changes it)."""
        return self.applier.config

    @property
    def generation(self) -> int:
        """The config generation in effect (``liveapply.ApplyResult``)."""
        return self.applier.record.generation

    @property
    def digest(self) -> str:
        return self.applier.record.digest

    def _running(self) -> bool:
        return self._tasks is not None and not self.drainer.state.stopping

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._tasks is not None
        self._tasks.create_task(coro)

    @property
    def draining(self) -> bool:
        return self.state.draining

    def readiness(self) -> tuple[bool, str]:
        return self.state.readiness()

    def view(self) -> NodeView:
        """The node snapshot the route policy decides on."""
        return self.state.view()

    def serving(self) -> dict[IPAddress, bool]:
        return self.state.serving()

    def _on_drain_change(self, outcome: Outcome) -> None:
        if outcome.routes_changed:
            self._routes_changed()

    def _routes_changed(self) -> None:
        if self.owners is not None:
            self.owners.qualify(self.serving())
        if self.routes is not None:
            self.routes.poke()

    # ------------------------------------------------------------------ drain

    async def drain(self, reason: str, wait: bool = True) -> api.DrainAnswer:
        """:meth:`DrainControl.drain <anycast_lb.drainctl.DrainControl.drain>`."""
        return await self.drains.drain(reason, wait)

    async def undrain(self) -> bool:
        """End a drain. False (and nothing changes) while the node stops."""
        return self.drains.undrain()

    def request_stop(self) -> None:
        """Graceful stop (SIGTERM): drain, withdraw, let connections finish
        for up to ``drain.timeout`` s, then make ``run`` return."""
        self._stop.set()

    # ------------------------------------------------------------------ live apply, runtime control

    async def reload(self) -> ApplyResult:
        """:meth:`LiveApplier.reload <anycast_lb.applier.LiveApplier.reload>`."""
        return await self.applier.reload()

    async def apply_config(self, new: NodeConfig, *, source: str = "") -> ApplyResult:
        """:meth:`LiveApplier.apply_config <anycast_lb.applier.LiveApplier.apply_config>`."""
        return await self.applier.apply_config(new, source=source)

    async def change_backend(self, change: runtime.Change) -> runtime.BackendAnswer:
        """:meth:`BackendControl.change <anycast_lb.backendctl.BackendControl.change>`."""
        return await self.backends.change(change)

    def runtime_overrides(self, service: str) -> frozenset[str]:
        return self.applier.runtime_overrides(service)

    # ------------------------------------------------------------------ status

    def status_model(self) -> Status:
        """``GET /status`` (:mod:`anycast_lb.status`)."""
        return self.report.model()

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
            await self.loopback.add()
            await self.data.start()
            runner = await self._start_api()
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                if self.data.kernel is not None:
                    # Health and drains reach the kernel table through this one writer.
                    kernel_started = asyncio.Event()
                    tg.create_task(self.data.kernel.run(self.data.desired, kernel_started,
                                                        lambda _: self._routes_changed()))
                    await kernel_started.wait()
                if self.cluster is not None:
                    # Steering is up before any route is announced.
                    cluster_started = asyncio.Event()
                    tg.create_task(self.cluster.run(cluster_started))
                    await cluster_started.wait()
                monitor_started = asyncio.Event()
                tg.create_task(self._monitor.run(monitor_started))
                await monitor_started.wait()
                if self.consensus is not None:
                    # Never waits for etcd: a node serves without it (fail-static).
                    tg.create_task(self.consensus.run())
                if self.owners is not None:
                    self.owners.qualify(self.serving())
                    tg.create_task(self.owners.run())
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
                await self.stopping.run()
                raise _Stopped
        except* _Stopped:
            pass
        except* AnycastLBError as group:
            raise first_leaf(group) from None
        finally:
            self._tasks = None
            await self.data.close()
            if runner is not None:
                await runner.cleanup()
            await self.loopback.remove()
            log.event("node.stopped", name=self.config.node.name)


class _Stopped(Exception):
    """Raised inside the task group to cancel every child after a graceful stop."""
