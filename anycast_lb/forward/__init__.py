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

from collections.abc import Callable
from typing import Protocol

from anycast_lb.config import Protocol as Transport
from anycast_lb.config import ServiceConfig

FlowKey = tuple[str, int, str, int]
"""A TCP flow as its owner publishes it: (client address, client port, VIP,
VIP port), addresses as text."""
FlowHook = Callable[[bool, FlowKey], None]
"""Called with (True, key) when a client connection is accepted and
(False, key) when it closes; the relay engine calls it on its own thread."""

from anycast_lb.forward.relay import RelayForwarder, RelayLoop  # noqa: E402
from anycast_lb.forward.tcp import TcpForwarder  # noqa: E402
from anycast_lb.forward.udp import UdpForwarder  # noqa: E402
from anycast_lb.limits import Slots  # noqa: E402
from anycast_lb.pool import Pool  # noqa: E402

__all__ = [
    "FlowHook", "FlowKey", "Forwarder", "RelayForwarder", "RelayLoop", "TcpForwarder",
    "UdpForwarder", "forwarder_for",
]


class Forwarder(Protocol):
    """What the node (start, drain, announce gating) needs of a forwarder."""

    @property
    def listening(self) -> bool:
        """Bound and taking new connections or flows (gates the announcement)."""
        ...

    @property
    def active(self) -> int:
        """Connections (TCP) or flows (UDP) in progress."""
        ...

    async def start(self) -> tuple[str, int]:
        """Bind; returns the bound (address, port). Raises BindError."""
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
