"""What one service's maps should hold, from health and drains. Pure: no I/O.

The two tables are functions of three sets of backend keys (``addr:port``),
so every node given the same sets computes the same maps:

- ``current``  = Maglev(up - draining - drained): where new flows (SYN misses) go;
- ``previous`` = Maglev(up - drained): where flows moved here from another
  node (non-SYN misses) go, so a draining backend keeps them;
- addressable backends: every up backend, drained ones included, so flows
  the per-node flow maps learned keep reaching a drained backend until they
  time out (``forwarding.kernel.flow_timeout``).

A drain starts with :meth:`ServiceTables.drain` (only ``current`` changes)
and ends with :meth:`ServiceTables.end_drain` (``previous`` catches up: the
promotion). A backend that fails leaves both tables at once: it cannot
serve its flows anyway.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Collection

from anycast_lb.config import ServiceConfig
from anycast_lb.kernel import render
from anycast_lb.kernel.settings import table_marks


class ServiceTables:
    """The maps of one kernel-engine service, by generation."""

    def __init__(self, service: ServiceConfig) -> None:
        self._service = service
        self._up: frozenset[str] = frozenset()
        self._draining: frozenset[str] = frozenset()
        self._drained: frozenset[str] = frozenset()
        self.generation = 0
        """Bumped each time the tables change."""
        self.tables = render.Tables()

    @property
    def draining(self) -> frozenset[str]:
        return self._draining

    def _marks(self, keys: frozenset[str]) -> tuple[int, ...]:
        chosen = [b for b in self._service.backends if b.key in keys]
        return table_marks(chosen, self._service.maglev_table_size)

    def _recompute(self) -> render.Tables:
        keep = self._up - self._drained
        previous = self._marks(keep)
        new_keys = keep - self._draining
        current = previous if new_keys == keep else self._marks(new_keys)
        backends = {render.backend_mark(a): a for a in (
            ipaddress.IPv4Address(b.address) for b in self._service.backends if b.key in self._up)}
        tables = render.Tables(current, previous, backends)
        if tables != self.tables:
            self.tables = tables
            self.generation += 1
        return self.tables

    def set_up(self, up: Collection[str]) -> render.Tables:
        """The backends health calls up (keys); unknown keys are ignored."""
        self._up = frozenset(up) & {b.key for b in self._service.backends}
        return self._recompute()

    def drain(self, key: str) -> render.Tables:
        """Start draining ``key``: no new flows; moved and local flows stay."""
        self._draining |= {key}
        self._drained -= {key}
        return self._recompute()

    def end_drain(self, key: str) -> render.Tables:
        """The drain of ``key`` ended: the previous table drops it too (the
        promotion); flows learned on a node still reach it while it is up."""
        self._draining -= {key}
        self._drained |= {key}
        return self._recompute()

    def undrain(self, key: str) -> render.Tables:
        """``key`` takes new flows again."""
        self._draining -= {key}
        self._drained -= {key}
        return self._recompute()

    def digest(self) -> str:
        """12 hex digits of sha256 over both tables: two nodes with equal
        digests forward every 5-tuple to the same backend (given the same seed)."""
        h = hashlib.sha256()
        for table in (self.tables.current, self.tables.previous):
            h.update(len(table).to_bytes(4, "big"))
            h.update(b"".join(m.to_bytes(4, "big") for m in table))
        return h.hexdigest()[:12]
