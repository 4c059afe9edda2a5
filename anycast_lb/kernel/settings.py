"""From the node config to what :mod:`.render` draws. Pure: no I/O.

Every value here is a function of the shared config only, so every node
given the same services draws the same hash (seed, table size) and, given
the same up backends, the same Maglev table.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence

from anycast_lb.config import BackendConfig, Engine, NodeConfig, ServiceConfig
from anycast_lb.kernel import render
from anycast_lb.maglev import build_table


def kernel_settings(cfg: NodeConfig) -> render.KernelSettings:
    """The table of a node with ``forwarding.engine: kernel``: one service
    entry per configured service, in config order. Raises ValueError for
    another engine (the config validator refuses the rest)."""
    kernel = cfg.forwarding.kernel
    if cfg.forwarding.engine is not Engine.KERNEL or kernel is None:
        raise ValueError("forwarding.engine is not kernel")
    services = []
    for index, service in enumerate(cfg.services):
        vip = ipaddress.IPv4Address(service.vip)
        protocol = service.protocol.value
        size = service.maglev_table_size
        services.append(render.KernelService(
            index, vip, service.port, protocol, size,
            render.derive_seed(vip, service.port, protocol, size),
            kernel.flow_timeout, kernel.flow_map_size,
        ))
    return render.KernelSettings(kernel.table, kernel.interface, tuple(services),
                                 kernel.ingress or "")


def up_backends(service: ServiceConfig, up: Collection[str]) -> list[BackendConfig]:
    """The service's backends whose key (``addr:port``) is in ``up``, config order."""
    return [b for b in service.backends if b.key in up]


def table_marks(backends: Sequence[BackendConfig], size: int) -> tuple[int, ...]:
    """The Maglev table of ``backends`` (names ``addr:port`` and weights, as
    ``anycast_lb.pool`` builds it) as one backend mark per slot; empty
    when ``backends`` is."""
    addrs = [ipaddress.IPv4Address(b.address) for b in backends]
    table = build_table([b.key for b in backends], [b.weight for b in backends], size)
    return render.marks(table, addrs)


def addresses(backends: Sequence[BackendConfig]) -> list[ipaddress.IPv4Address]:
    """The backends' IPv4 addresses (the validator refused any other)."""
    return [ipaddress.IPv4Address(b.address) for b in backends]
