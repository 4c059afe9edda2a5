"""The data path: one forwarder per service, from its VIP:port to its pool.

- ``tcp.TcpForwarder``: a terminating proxy (asyncio Protocols), with
  connect retry over the pool's candidates, half-close, backpressure,
  idle timeout and an optional PROXY protocol v2 header.
- ``udp.UdpForwarder``: a flow table keyed by the client's address, with
  idle expiry and an LRU bound.
- ``proxy_protocol``: the pure PROXY v2 header builder and parser.

Both forwarders have the surface of ``Forwarder``; ``forwarder_for`` picks
the one a service needs.
"""

from __future__ import annotations

from typing import Protocol

from anycast_lb.config import Protocol as Transport
from anycast_lb.config import ServiceConfig
from anycast_lb.forward.tcp import TcpForwarder
from anycast_lb.forward.udp import UdpForwarder
from anycast_lb.pool import Pool

__all__ = ["Forwarder", "TcpForwarder", "UdpForwarder", "forwarder_for"]


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
) -> Forwarder:
    """The forwarder for ``service.protocol`` (not started)."""
    if service.protocol is Transport.UDP:
        return UdpForwarder(service, pool, bind_host, bind_port)
    return TcpForwarder(service, pool, bind_host, bind_port)
