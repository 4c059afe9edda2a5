"""The node's data path as one part: a forwarder per service, the relay
engine's loop (shared by the TCP services) and the relay worker processes;
or, with ``forwarding.engine: kernel``, the kernel engine's nftables table
(:class:`~anycast_lb.kernel.engine.KernelEngine`), which forwards every
service's packets and binds no listener.

It starts them in order (relay loop, forwarders, workers; or the kernel
table), answers for them as a whole (counters summed over the node process
and the workers, graceful-stop surface :class:`~anycast_lb.forward.DataPath`)
and closes them (the kernel table is deleted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from anycast_lb import log
from anycast_lb.clock import Clock
from anycast_lb.config import Engine, NodeConfig, ServiceConfig, Transport, format_host_port
from anycast_lb.flows import FlowHook, FlowKey
from anycast_lb.forward import (
    DataPath,
    Forwarder,
    RelayForwarder,
    RelayLoop,
    TcpForwarder,
    UdpForwarder,
    forwarder_for,
)
from anycast_lb.forward.relay import HAVE_EPOLL
from anycast_lb.forward.workers import BackendCounters, WorkerGroup, start_workers
from anycast_lb.limits import Budget, Slots, open_descriptors
from anycast_lb.metrics import Shedding, Traffic
from anycast_lb.pool import Backend, Pool

if TYPE_CHECKING:
    from anycast_lb.kernel.engine import KernelEngine


class DataPlane:
    """Every forwarder of one node.

    ``bind_overrides`` maps a service name to the (host, port) its forwarder
    binds instead of the VIP:port (tests bind 127.0.0.1 port 0).
    ``ephemeral_ports``: every other service, including one added live,
    binds port 0 of its VIP (``anycast-lb run --ephemeral-ports``).
    ``flow_hook`` (flow survival) is told of every TCP flow accepted and
    closed, and makes TCP listeners bind the wildcard address; both need the
    relay engine.
    """

    def __init__(self, config: NodeConfig, pools: Mapping[str, Pool], budget: Budget, *,
                 bind_overrides: Mapping[str, tuple[str, int]] | None = None,
                 ephemeral_ports: bool = False,
                 flow_hook: FlowHook | None = None, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock
        self.pools = pools
        self.budget = budget
        self.flow_hook = flow_hook
        self._bind_overrides = dict(bind_overrides or {})
        self._ephemeral_ports = ephemeral_ports
        forwarding = config.forwarding
        self._tcp_slots = Slots(budget.tcp_connections,
                                budget.tcp_connections_per_source or None,
                                prefix_v4=forwarding.tcp_source_prefix_v4,
                                prefix_v6=forwarding.tcp_source_prefix_v6)
        """The asyncio engine's connection caps (the relay loop holds its own)."""
        """The asyncio engine's connection cap (the relay loop holds its own)."""
        self.forwarders: dict[str, Forwarder] = {}
        self.relay: RelayLoop | None = None
        """The relay engine's loop (``forwarding.engine: relay``, Linux)."""
        self.workers: WorkerGroup | None = None
        """Relay worker processes (``forwarding.workers`` > 1)."""
        self.addresses: dict[str, tuple[str, int]] = {}
        """Service name -> the bound (address, port)."""
        self._retiring: set[Forwarder] = set()
        """Forwarders of services removed live, until their connections end."""
        self.kernel: KernelEngine | None = None
        """The kernel engine (``forwarding.engine: kernel``), once started;
        the node runs its :meth:`~KernelEngine.run` task."""
        self._kernel_ready: set[str] = set()

    # ------------------------------------------------------------------ start

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

    def _forwarder(self, s: ServiceConfig, pool: Pool, budget: Budget) -> Forwarder:
        host, port = self._bind_overrides.get(
            s.name, (str(s.vip), 0 if self._ephemeral_ports else s.port))
        return forwarder_for(
            s, pool, bind_host=host, bind_port=port, relay=self.relay,
            wildcard=self.flow_hook is not None and self.relay is not None,
            on_flow=self.flow_hook if self.relay is not None else None,
            reuse_port=self.relay is not None and self.config.forwarding.workers > 1,
            slots=self._tcp_slots,
            max_flows=budget.udp_flows.get(s.name),
            max_flows_per_source=budget.udp_flows_per_source.get(s.name),
        )

    async def start(self) -> None:
        """Start the relay loop, bind every forwarder, start the workers; or
        load the kernel engine's table. Raises BindError, KernelEngineError
        (call :meth:`close` afterwards either way)."""
        if self.config.forwarding.engine is Engine.KERNEL:
            await self._start_kernel()
            return
        self._start_relay()
        for s in self.config.services:
            forwarder = self._forwarder(s, self.pools[s.name], self.budget)
            self.addresses[s.name] = await forwarder.start()
            self.forwarders[s.name] = forwarder
            log.event("forwarder.listening", service=s.name, protocol=s.protocol.value,
                      address=format_host_port(*self.addresses[s.name]))
        self.workers = await start_workers(self.config, self.pools, self.addresses,
                                           relay=self.relay is not None,
                                           max_tcp_connections=self.budget.tcp_connections,
                                           max_tcp_connections_per_source=(
                                               self.budget.tcp_connections_per_source or None),
                                           max_pipes=self.budget.pipes or None,
                                           clock=self.clock)

    async def _start_kernel(self) -> None:
        from anycast_lb.kernel.engine import KernelEngine  # nft is only needed here

        self.kernel = KernelEngine(self.config, clock=self.clock)
        await self.kernel.start()
        for s in self.config.services:
            self.addresses[s.name] = (str(s.vip), s.port)
            log.event("forwarder.listening", service=s.name, protocol=s.protocol.value,
                      address=format_host_port(*self.addresses[s.name]), engine="kernel")

    def desired(self, service: str) -> tuple[ServiceConfig, Collection[str], Collection[str]]:
        """What the kernel engine's tables of ``service`` are to hold (its
        pool: config, up backend keys, admin-drained keys). With consensus
        the pool's up set is the agreed one."""
        pool = self.pools[service]
        return (pool.service, [b.key for b in pool.backends if b.up],
                [b.key for b in pool.backends if b.config.drain])

    def _kernel_listening(self, service: str) -> bool:
        """The kernel forwards ``service`` (its current table names a
        backend). The first time, also: every backend had its first health
        verdict and the kernel holds the tables they call for, so a node
        that starts announces the same table as its peers (flows ECMP moves
        to it keep their backend). Latched per service afterwards, so a
        change being applied never withdraws the VIP."""
        assert self.kernel is not None
        if service not in self._kernel_ready:
            pool = self.pools.get(service)
            if (pool is None or self.kernel.pending(service)
                    or any(b.last_check is None for b in pool.backends)):
                return False
            if self.kernel.serving(service):
                self._kernel_ready.add(service)
        return self.kernel.serving(service)

    async def settled(self, service: str) -> bool:
        """Wait until the kernel engine holds what ``service``'s pool calls
        for (at most ``APPLIED_TIMEOUT_S`` s; True at once without it)."""
        if self.kernel is None:
            return True
        from anycast_lb.kernel.engine import APPLIED_TIMEOUT_S

        return await self.kernel.wait_applied(service, APPLIED_TIMEOUT_S)

    def pool_changed(self, service: str) -> None:
        """``service``'s pool changed (health, drain, weights, backends):
        the kernel engine reconciles its tables (a diff, one transaction)."""
        if self.kernel is not None:
            self.kernel.poke(service)

    # ------------------------------------------------------------------ live apply

    async def open(self, config: NodeConfig, service: ServiceConfig, pool: Pool,
                   budget: Budget) -> tuple[Forwarder, tuple[str, int]]:
        """Bind a forwarder for ``service``, added live (``config`` is the
        config it belongs to; ``budget`` gives its UDP flow caps); it takes
        connections at once but is not part of the data plane until
        :meth:`install`. Raises BindError."""
        if self.relay is None and service.protocol is Transport.TCP:
            self.config = config  # the relay engine starts with its first TCP service
            self._start_relay()
        forwarder = self._forwarder(service, pool, budget)
        return forwarder, await forwarder.start()

    def install(self, name: str, forwarder: Forwarder, address: tuple[str, int]) -> None:
        """Make an :meth:`open`-ed forwarder the one of service ``name``."""
        self.forwarders[name] = forwarder
        self.addresses[name] = address
        log.event("forwarder.listening", service=name, address=format_host_port(*address))

    def retire(self, name: str) -> Forwarder | None:
        """Take service ``name``'s forwarder out of the data plane (removed
        live); it is still stopped, waited for and closed with the others
        until :meth:`retired`."""
        forwarder = self.forwarders.pop(name, None)
        self.addresses.pop(name, None)
        if forwarder is not None:
            self._retiring.add(forwarder)
        return forwarder

    @property
    def retiring(self) -> int:
        """Forwarders of removed services still waiting for their connections."""
        return len(self._retiring)

    def retired(self, forwarder: Forwarder) -> None:
        """``forwarder``'s connections have ended: forget it."""
        self._retiring.discard(forwarder)

    # ------------------------------------------------------------------ state

    def listening(self, service: str) -> bool:
        if self.kernel is not None:
            return self._kernel_listening(service)
        forwarder = self.forwarders.get(service)
        return forwarder is not None and forwarder.listening

    def parts(self) -> list[DataPath]:
        """Every forwarder, and the relay workers as one."""
        return [*self.forwarders.values(), *self._retiring,
                *([self.workers] if self.workers is not None else [])]

    @property
    def active(self) -> int:
        return sum(p.active for p in self.parts())

    def service_active(self, service: str) -> int:
        """``service``'s connections or flows, node process and workers."""
        forwarder = self.forwarders.get(service)
        return ((forwarder.active if forwarder is not None else 0)
                + (self.workers.service_active(service) if self.workers is not None else 0))

    def backend_counters(self, service: str, backend: Backend) -> BackendCounters:
        """The backend's counters in this process plus the relay workers'."""
        if self.workers is None:
            return BackendCounters.of(backend)
        return self.workers.counters(service, backend)

    def refused(self, service: str) -> tuple[dict[str, int], int, int]:
        """``service``'s refusals by reason, accept pauses and UDP evictions,
        in this process and the relay workers."""
        forwarder = self.forwarders.get(service)
        refused: dict[str, int] = {}
        pauses = evicted = 0
        if forwarder is not None:
            refused = forwarder.refused()
            pauses = forwarder.refusals.accept_pauses
            evicted = forwarder.refusals.evicted
        if self.workers is not None:
            more, more_pauses = self.workers.refused(service)
            refused = {k: refused.get(k, 0) + more.get(k, 0) for k in refused.keys() | more.keys()}
            pauses += more_pauses
        return refused, pauses, evicted

    def shedding(self) -> Shedding:
        """The descriptor budget and shedding counters for /metrics."""
        budget = self.budget
        refused: dict[str, dict[str, int]] = {}
        pauses: dict[str, int] = {}
        evicted: dict[str, int] = {}
        for s in self.config.services:
            refused[s.name], pauses[s.name], evicted_n = self.refused(s.name)
            if s.protocol is Transport.UDP:
                evicted[s.name] = evicted_n
        return Shedding(limit=budget.limit, reserve=budget.reserve.total,
                        open_descriptors=open_descriptors(),
                        tcp_connection_cap=budget.tcp_connections,
                        tcp_connections_per_source_cap=budget.tcp_connections_per_source,
                        udp_flow_cap=budget.udp_flows,
                        udp_flows_per_source_cap=budget.udp_flows_per_source,
                        refused=refused, evicted=evicted, accept_pauses=pauses)

    def traffic(self) -> Traffic:
        """Per-service traffic counters for /metrics: TCP connections
        accepted (node process and relay workers), UDP flows started and
        datagrams dropped (UDP runs in the node process only)."""
        accepted: dict[str, int] = {}
        udp_flows: dict[str, int] = {}
        udp_dropped: dict[str, int] = {}
        for s in self.config.services:
            forwarder = self.forwarders.get(s.name)
            if isinstance(forwarder, UdpForwarder):
                udp_flows[s.name] = forwarder.flows_total
                udp_dropped[s.name] = forwarder.dropped
            elif s.protocol is Transport.TCP:
                n = forwarder.accepted if isinstance(forwarder, TcpForwarder | RelayForwarder) else 0
                if self.workers is not None:
                    n += self.workers.accepted(s.name)
                accepted[s.name] = n
        return Traffic(accepted=accepted, udp_flows=udp_flows, udp_dropped=udp_dropped)

    def metric_families(self) -> Iterator[Metric]:
        """The kernel engine's families (none with the relay or asyncio engine)."""
        if self.kernel is not None:
            yield from self.kernel.metric_families()

    # ------------------------------------------------------------------ control

    def abort_flows(self, keys: Iterable[FlowKey]) -> int:
        """Reset our client connections for ``keys``: a live peer accepted
        those 4-tuples after us, so our sockets are stale: a stale socket
        would claim a later flow reusing that 4-tuple. Thread-safe; how many were found."""
        wanted = list(keys)
        return sum(f.abort_flows(wanted) for f in self.parts())

    def stop_accepting(self) -> None:
        for part in self.parts():
            part.stop_accepting()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every part to go idle; True if all did."""
        waits = [p.wait_idle(timeout) for p in self.parts()]
        if self.kernel is not None:
            waits.append(self.kernel.wait_idle(timeout))
        results = await asyncio.gather(*waits)
        return all(results)

    async def close(self) -> None:
        """Reset whatever is left, reap the workers, stop the relay loop."""
        for part in self.parts():
            part.stop_accepting()
            part.abort_all()
        if self.workers is not None:
            await self.workers.close()
        if self.relay is not None:
            self.relay.stop()
        if self.kernel is not None:
            await self.kernel.stop()
