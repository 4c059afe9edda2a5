"""A service's backend pool: runtime state of each backend and the choice of
backend for a new flow (Maglev, round robin or least connections).

The pool holds no sockets and reads no clock. Health checks call
``set_up``; forwarders call ``candidates`` for each new flow and try the
backends it returns in order (the first is the choice; the rest are the
fallbacks used when connecting to the choice fails), and keep the
per-backend counters. Only backends in state up are ever returned: a backend
starts down until its health check has risen.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
from array import array
from dataclasses import dataclass, field

from anycast_lb import maglev
from anycast_lb.config import Balance, BackendConfig, HashKey, ServiceConfig


@dataclass(eq=False)
class Backend:
    """One backend of a pool, with its live state and counters.

    Counters are plain ints updated on the data path and exported to
    Prometheus at scrape time (no metrics call per packet).
    """

    config: BackendConfig
    up: bool = False
    last_check: float | None = None
    """Wall-clock seconds of the last completed check."""
    last_latency_ms: float | None = None
    last_detail: str = ""
    active_connections: int = 0
    connections_total: int = 0
    connect_failures: int = 0
    bytes_in: int = 0
    """Bytes from clients towards this backend."""
    bytes_out: int = 0
    """Bytes from this backend towards clients."""
    packets_in: int = 0
    packets_out: int = 0

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def sockaddr(self) -> tuple[str, int]:
        return str(self.config.address), self.config.port


@dataclass(eq=False)
class Pool:
    """Backends of one service and the selection among those up."""

    service: ServiceConfig
    backends: list[Backend] = field(init=False)
    _up: list[Backend] = field(init=False, default_factory=list)
    _table: array[int] | None = field(init=False, default=None)
    _rr: itertools.count[int] = field(init=False, default_factory=itertools.count)
    generation: int = field(init=False, default=0)
    """Bumped each time the set of up backends changes."""

    def __post_init__(self) -> None:
        self.backends = [Backend(b) for b in self.service.backends]
        self._by_key = {b.key: b for b in self.backends}

    def get(self, key: str) -> Backend:
        """The backend named ``addr:port``. Raises KeyError."""
        return self._by_key[key]

    @property
    def up_count(self) -> int:
        return len(self._up)

    @property
    def healthy(self) -> bool:
        """At least ``min_healthy`` backends are up."""
        return len(self._up) >= self.service.min_healthy

    def set_up(self, key: str, up: bool) -> bool:
        """Mark a backend up or down; rebuilds the Maglev table when the up
        set changes. Returns True if anything changed. Raises KeyError."""
        backend = self._by_key[key]
        if backend.up == up:
            return False
        backend.up = up
        self._up = [b for b in self.backends if b.up]
        # Built at the next new flow, not here: a health transition (and the
        # withdraw it may cause) must not wait for a table build.
        self._table = None
        self.generation += 1
        return True

    def _maglev_table(self) -> array[int]:
        if self._table is None:
            self._table = _cached_table(
                tuple(b.key for b in self._up),
                tuple(b.config.weight for b in self._up),
                self.service.maglev_table_size,
            )
        return self._table

    def flow_key(self, client: tuple[str, int], local: tuple[str, int]) -> bytes:
        """The bytes Maglev hashes: the 5-tuple, or the client address only
        (``hash_key: source_ip``)."""
        proto = self.service.protocol.value
        if self.service.hash_key is HashKey.SOURCE_IP:
            return ipaddress.ip_address(client[0]).packed
        return f"{proto}|{client[0]}|{client[1]}|{local[0]}|{local[1]}".encode()

    def candidates(self, client: tuple[str, int], local: tuple[str, int]) -> list[Backend]:
        """Up backends to try for a new flow, best first; empty when none is up.

        ``client`` and ``local`` are (address, port) of the flow's two ends
        (local is the VIP side).
        """
        up = self._up
        if not up:
            return []
        balance = self.service.balance
        if balance is Balance.MAGLEV:
            first = maglev.lookup(self._maglev_table(), maglev.flow_hash(self.flow_key(client, local)))
        elif balance is Balance.ROUND_ROBIN:
            first = next(self._rr) % len(up)
        else:
            return sorted(up, key=lambda b: b.active_connections / b.config.weight)
        # The choice, then the others in a fixed rotation: deterministic, so
        # every node retries the same way.
        return up[first:] + up[:first]


@functools.lru_cache(maxsize=8)
def _cached_table(names: tuple[str, ...], weights: tuple[int, ...], size: int) -> array[int]:
    """Maglev tables by backend set: services that share backends (a TCP and
    a UDP service on the same hosts) and a backend that flaps back to a
    previous set reuse a table instead of rebuilding it (about 25 ms for a
    few backends at 65537 slots; the table is read-only once built)."""
    return maglev.build_table(names, weights, size)
