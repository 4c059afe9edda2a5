"""The kernel engine of one node: decisions (:mod:`.decide`) applied to the
kernel (:mod:`.apply`). The seam a node drives; not wired into the node yet
(docs/kernel.md, "What is not built").

One writer: every change goes through this object, one transaction at a
time (an ``asyncio.Lock``), so the shadow copy of the maps always matches
the kernel.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Collection
from typing import TypedDict

from anycast_lb import log
from anycast_lb.cluster.kernel import run
from anycast_lb.config import NodeConfig
from anycast_lb.kernel import apply, render
from anycast_lb.kernel.decide import ServiceTables
from anycast_lb.kernel.settings import kernel_settings


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
    backends: dict[str, BackendCounters]
    """Per backend address: packets and bytes this node forwarded to it."""


class KernelEngine:
    """The node's ``netdev`` table and each service's tables."""

    def __init__(self, cfg: NodeConfig, runner: apply.NftRunner = run) -> None:
        self.settings = kernel_settings(cfg)
        self._names = [s.name for s in cfg.services]
        self._tables = [ServiceTables(s) for s in cfg.services]
        self._backends = [[ipaddress.IPv4Address(b.address) for b in s.backends]
                          for s in cfg.services]
        self._runner = runner
        self._nft = apply.NftForwarder(self.settings, runner)
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Check the kernel and the backends, then load the table with no
        backend up (health brings them in). Raises KernelEngineError."""
        iface = self.settings.interface
        await apply.check_support(iface, self._runner)
        await apply.check_on_link(iface, [a for group in self._backends for a in group],
                                  self._runner)
        async with self._lock:
            await self._nft.install({i: t.tables for i, t in enumerate(self._tables)})

    async def _apply(self, index: int, tables: render.Tables) -> None:
        lines = await self._nft.update(index, tables)
        if lines:
            log.event("kernel.tables_applied", service=self._names[index],
                      generation=self._tables[index].generation, lines=lines,
                      ms=round(self._nft.last_apply_s * 1000, 1))

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

    async def status(self) -> dict[str, ServiceStatus]:
        """Per service name: seed, table size, generation, digest, the
        draining backends and per-backend counters. Raises KernelEngineError."""
        counters = await self._nft.counters()
        out: dict[str, ServiceStatus] = {}
        for svc, tables, name in zip(self.settings.services, self._tables, self._names,
                                     strict=True):
            out[name] = ServiceStatus(
                seed=f"{svc.seed:#010x}", table_size=svc.size, generation=tables.generation,
                digest=tables.digest(), draining=sorted(tables.draining),
                backends={str(addr): BackendCounters(packets=p, bytes=b)
                          for (i, addr), (p, b) in sorted(counters.items()) if i == svc.index},
            )
        return out

    async def stop(self) -> None:
        """Delete the table (never raises)."""
        async with self._lock:
            await self._nft.remove()
