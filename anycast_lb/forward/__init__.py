"""The data path: one forwarder per service, from its VIP:port to its pool.

- ``relay.RelayForwarder``: the TCP terminating proxy of the ``relay``
  engine (the default on Linux): a dedicated epoll loop in its own thread
  (``relay.RelayLoop``, one per node) moving bytes with ``os.splice``.
- ``tcp.TcpForwarder``: the same proxy on asyncio Protocols (the
  ``asyncio`` engine, portable). Both have connect retry over the pool's
  candidates, redispatch, half-close, backpressure, idle timeout and an
  optional PROXY protocol v2 header.
- ``udp.UdpForwarder``: a flow table keyed by the client's address, with
  idle expiry and an LRU bound.
- ``proxy_protocol``: the pure PROXY v2 header builder and parser.

Both forwarders have the surface of ``Forwarder``; ``forwarder_for`` picks
the one a service needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from anycast_lb.config import ServiceConfig, Transport
from anycast_lb.flows import FlowHook, FlowKey
from anycast_lb.forward.relay import RelayForwarder, RelayLoop
from anycast_lb.forward.tcp import TcpForwarder
from anycast_lb.forward.udp import UdpForwarder
from anycast_lb.limits import Refusals, Slots
from anycast_lb.pool import Backend, Pool

__all__ = [
    "DataPath", "Forwarder", "RelayForwarder", "RelayLoop", "TcpForwarder", "UdpForwarder", "forwarder_for",
]


class DataPath(Protocol):
    """What a graceful stop needs of a forwarder, or of the relay workers as one."""

    @property
    def active(self) -> int:
        """Connections (TCP) or flows (UDP) in progress."""
        ...

    def stop_accepting(self) -> None:
        """Take no new connections or flows; existing ones continue."""
        ...

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for ``active`` to reach 0; True if it did."""
        ...

    def abort_all(self) -> None:
        """End every connection or flow now."""
        ...

    def abort_flows(self, keys: Iterable[FlowKey]) -> int:
        """Reset the client connections with these flow keys (a live peer
        owns the 4-tuples: our sockets are stale). Thread-safe; how many of
        them this forwarder holds (0 where no flow keys are published)."""
        ...


class Forwarder(DataPath, Protocol):
    """What the node (start, drain, announce gating, shedding counters)
    needs of one service's forwarder."""

    refusals: Refusals
    """Shed-load counters (refusals by reason, accept pauses, UDP evictions)."""

    @property
    def listening(self) -> bool:
        """Bound and taking new connections or flows (gates the announcement)."""
        ...

    async def start(self) -> tuple[str, int]:
        """Bind; returns the bound (address, port). Raises BindError."""
        ...

    def refused(self) -> dict[str, int]:
        """New connections or flows refused so far, by reason
        (``limits.REFUSAL_REASONS``)."""
        ...

    def abort_backend(self, backend: Backend) -> int:
        """Reset the connections or flows relayed to ``backend`` (a backend
        removed by live apply); how many there were."""
        ...


def forwarder_for(
    service: ServiceConfig,
    pool: Pool,
    bind_host: str | None = None,
    bind_port: int | None = None,
    *,
    relay: RelayLoop | None = None,
    wildcard: bool = False,
    on_flow: FlowHook | None = None,
    reuse_port: bool = False,
    slots: Slots | None = None,
    max_flows: int | None = None,
    max_flows_per_source: int | None = None,
) -> Forwarder:
    """The forwarder for ``service.protocol`` (not started).

    TCP services run on ``relay`` when given (the relay engine, whose loop
    holds the connection cap), else on the asyncio engine, capped by
    ``slots`` (shared by the node's TCP services). ``wildcard`` and
    ``on_flow`` (flow survival) need the relay engine; ValueError otherwise.
    ``reuse_port`` (relay only: worker processes share the listener's
    address) sets SO_REUSEPORT. ``max_flows`` and ``max_flows_per_source``
    (UDP) come from the descriptor budget (:mod:`anycast_lb.limits`).
    """
    if service.protocol is Transport.UDP:
        return UdpForwarder(service, pool, bind_host, bind_port, max_flows=max_flows,
                            max_flows_per_source=max_flows_per_source)
    if relay is not None:
        return RelayForwarder(service, pool, relay, bind_host, bind_port,
                              wildcard=wildcard, on_flow=on_flow, reuse_port=reuse_port)
    if wildcard or on_flow is not None:
        raise ValueError("wildcard listeners and flow hooks need the relay engine")
    return TcpForwarder(service, pool, bind_host, bind_port, slots=slots)
