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

:meth:`ServiceTables.reconcile` is what a node drives: the service's
config, the up backends and the admin-drained ones (``BackendConfig.drain``)
at a time ``now``; a backend drained since ``promote_after`` seconds is
promoted. Every node applies the same config revision with the same
``drain.timeout``, so they promote within their apply skew of each other.
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
        self._since: dict[str, float] = {}
        """When each draining backend's drain started (s, the caller's clock)."""
        self.generation = 0
        """Bumped each time the tables change."""
        self.tables = render.Tables()

    @property
    def draining(self) -> frozenset[str]:
        return self._draining

    @property
    def drained(self) -> frozenset[str]:
        """Drained backends past their promotion (only learned flows reach them)."""
        return self._drained

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

    def reconcile(self, service: ServiceConfig, up: Collection[str], drained: Collection[str],
                  now: float, promote_after: float) -> render.Tables:
        """Take the tables to what ``service`` (its backends and weights),
        the ``up`` backends and the admin-``drained`` ones (keys) call for at
        ``now`` (s): a newly drained backend starts its drain (only the
        current table changes); one drained for ``promote_after`` s or more
        is promoted (the previous table drops it too); one no longer
        drained takes new flows again. Unknown keys are ignored."""
        self._service = service
        keys = {b.key for b in service.backends}
        admin = frozenset(drained) & keys
        self._draining &= keys
        self._drained &= keys
        for key in sorted(admin - self._draining - self._drained):
            self._draining |= {key}
            self._since[key] = now
        back = (self._draining | self._drained) - admin
        self._draining -= back
        self._drained -= back
        due = {k for k in self._draining if now - self._since.get(k, now) >= promote_after}
        self._draining -= due
        self._drained |= due
        self._since = {k: t for k, t in self._since.items() if k in self._draining}
        self._up = frozenset(up) & keys
        return self._recompute()

    def next_promotion(self, promote_after: float) -> float | None:
        """When (s, the clock :meth:`reconcile` was given) the next drain
        reaches its promotion; None while nothing drains."""
        times = [self._since[k] + promote_after for k in self._draining if k in self._since]
        return min(times, default=None)

    def digest(self) -> str:
        """12 hex digits of sha256 over both tables: two nodes with equal
        digests forward every 5-tuple to the same backend (given the same seed)."""
        h = hashlib.sha256()
        for table in (self.tables.current, self.tables.previous):
            h.update(len(table).to_bytes(4, "big"))
            h.update(b"".join(m.to_bytes(4, "big") for m in table))
        return h.hexdigest()[:12]
