"""A service's backend pool: runtime state of each backend and the choice of
backend for a new flow (Maglev, round robin or least connections).

Health checks call ``set_up`` (on the asyncio loop); forwarders call
``candidates`` for each new flow, from the loop or from a relay thread, and
try the backends it returns in order (the first is the choice; the rest are
the fallbacks used when connecting to the choice fails), and keep the
per-backend counters. Only backends in state up and not drained
(``BackendConfig.drain``, set at runtime by ``anycast-lb backend drain``) are
ever returned: a backend starts down until its health check has risen. A
drained backend is out of the selection exactly as a down one (Maglev: out of
the table, so only its flows move), but the connections it has keep running.

Threads, with the GIL as the only lock on the read side: everything
``candidates`` reads is one ``_Selection`` (the up backends, their order, the
Maglev table for them), reached through one attribute, ``Pool._selection``.
A selection is never changed once published, except for its table holder,
which goes once from "no table" to a complete table by one attribute
assignment. ``set_up`` publishes a new selection by one attribute
assignment, so a reader on any thread sees the old state or the new one,
never a mix.

Maglev tables are built off the caller's thread (``Pool.run_build``, a
daemon thread by default): a health transition never waits for a build, and
no flow does either. Until the new table lands, ``candidates`` answers from
the previous table where it still can (the rule is in its docstring);
Maglev's consistency across nodes is back once the table lands. Builds are
coalesced: transitions during a build cause one more build, for the latest
up set only. Tables are cached per backend set (``_TABLES``).

Apart from that builder glue (a thread, a GIL-yield timer, one log line per
build), the pool holds no sockets and reads no clock.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import socket
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from anycast_lb import log, maglev
from anycast_lb.config import BackendConfig, Balance, HashKey, ServiceConfig

BuildJob = Callable[[], None]
BuildRunner = Callable[[BuildJob], None]
"""Runs a table build somewhere other than the caller's thread: called with
the job, returns at once. The default starts a daemon thread; tests pass a
runner that keeps the job until they run it."""


def run_in_thread(job: BuildJob) -> None:
    """The default ``BuildRunner``: one short-lived daemon thread per burst
    of builds (it exits when no build is wanted)."""
    threading.Thread(target=job, name="maglev-build", daemon=True).start()


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
    _key: str = field(init=False, repr=False)
    _host: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Computed once: ``BackendConfig.key`` formats the address (~5 us),
        # and a transition of a 1000-backend pool reads every key. The key
        # never changes (``Pool.update`` gives a backend a config of the
        # same key only), so neither does the address.
        self._key = self.config.key
        self._host = str(self.config.address)

    @property
    def host(self) -> str:
        """The address as text (``str(config.address)``, formatted once)."""
        return self._host

    @property
    def key(self) -> str:
        return self._key

    @property
    def drained(self) -> bool:
        """Admin drain (``config.drain``): no new flows, established ones kept."""
        return self.config.drain

    @property
    def sockaddr(self) -> tuple[str, int]:
        return self._host, self.config.port


class _Table:
    """The Maglev table for one up set, filled at most once.

    ``table`` is None until the build lands, then a complete array of
    indexes into ``backends``; ``ready`` is set at the same time.
    """

    __slots__ = ("backends", "table", "ready", "digest", "ready_at")

    def __init__(self, backends: tuple[Backend, ...], table: array[int] | None = None) -> None:
        self.backends = backends
        self.table = table
        self.ready = threading.Event()
        self.digest: str | None = None
        self.ready_at: float | None = None
        """Wall clock s since the epoch when the table was in place."""
        if table is not None:
            self.ready_at = time.time()
            self.ready.set()

    def fill(self, table: array[int]) -> None:
        self.ready_at = time.time()
        self.table = table  # one assignment: readers see None or all of it
        self.ready.set()


@dataclass(frozen=True, eq=False)
class _Selection:
    """Everything ``candidates`` reads, published as one object."""

    up: tuple[Backend, ...]
    """Up backends in configuration order."""
    position: dict[str, int]
    """Backend key -> index in ``up``."""
    by_name: tuple[int, ...]
    """Indexes into ``up`` in name order: the rotation used while no table
    is ready, the same on every node whatever the configuration order."""
    table: _Table
    """The Maglev table for ``up`` (maybe not built yet)."""
    fallback: _Table | None
    """The newest table that was ready when this selection was published."""
    generation: int


def _selection(up: tuple[Backend, ...], table: _Table, fallback: _Table | None, generation: int) -> _Selection:
    return _Selection(
        up=up,
        position={b.key: i for i, b in enumerate(up)},
        by_name=tuple(sorted(range(len(up)), key=lambda i: up[i].key)),
        table=table,
        fallback=fallback,
        generation=generation,
    )


@dataclass(eq=False)
class Pool:
    """Backends of one service and the selection among those up."""

    service: ServiceConfig
    run_build: BuildRunner = field(default=run_in_thread, repr=False)
    backends: list[Backend] = field(init=False)
    _selection: _Selection = field(init=False, repr=False)
    _rr: itertools.count[int] = field(init=False, default_factory=itertools.count)
    _write_lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _build_wanted: bool = field(init=False, default=False)
    _build_running: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.backends = [Backend(b) for b in self.service.backends]
        self._by_key = {b.key: b for b in self.backends}
        # Read once: an Enum member's ``.value`` or class attribute costs
        # about 70 ns each on CPython 3.11, and flow_key runs per flow.
        self._proto = self.service.protocol.value
        self._by_source = self.service.hash_key is HashKey.SOURCE_IP
        self._balance = self.service.balance
        """Read once (a pydantic model's attribute goes through its
        ``__getattr__`` hook); ``update`` sets it again."""
        self._key_end: tuple[tuple[str, int] | None, str] = (None, "")
        """The last ``local`` that ``flow_key`` saw (by identity: an engine
        passes its service's one tuple) and the key's end it formats to."""
        self._selection = _selection((), _Table((), array("l")), None, 0)

    def get(self, key: str) -> Backend:
        """The backend named ``addr:port``. Raises KeyError."""
        return self._by_key[key]

    @property
    def up_count(self) -> int:
        """Backends eligible for new flows: up and not drained."""
        return len(self._selection.up)

    @property
    def healthy(self) -> bool:
        """At least ``min_healthy`` backends are eligible (up, not drained)."""
        return len(self._selection.up) >= self.service.min_healthy

    @property
    def generation(self) -> int:
        """Bumped each time the set of up backends changes."""
        return self._selection.generation

    @property
    def table_ready(self) -> bool:
        """The Maglev table for the current up set is in place (always true
        for round robin and least connections, which use none)."""
        return self._selection.table.table is not None

    def wait_table(self, timeout: float) -> bool:
        """Block up to ``timeout`` s until ``table_ready``; returns it. For
        tests and benchmarks: the data path never waits for a table."""
        deadline = time.monotonic() + timeout
        while True:
            selection = self._selection
            if not selection.table.ready.wait(max(0.0, deadline - time.monotonic())):
                return False
            if self._selection is selection:
                return True

    def table_digest(self) -> str | None:
        """A short hash (12 hex digits) of the current selection: the up
        backends' names and weights in table order and the Maglev table
        itself (for round robin and least connections, the up set only).
        Two nodes with equal digests send every flow hash to the same
        backend. None while the table for the current up set is being built.
        Computed once per table (sha256 of ~0.5 MB at 65537 slots, ~1 ms)."""
        table = self._selection.table
        if table.digest is not None:
            return table.digest
        built = table.table
        if built is None:
            return None
        h = hashlib.sha256()
        for b in table.backends:
            h.update(f"{b.key}*{b.config.weight};".encode())
        h.update(self.service.balance.value.encode())
        h.update(built.tobytes())
        table.digest = h.hexdigest()[:12]
        return table.digest

    def table_since(self) -> float | None:
        """Wall clock s since the epoch when the current selection's table
        was in place (published with a cached or trivial table, or filled by
        its build); None while it is being built. The moment
        :meth:`table_digest` became true of the pool."""
        return self._selection.table.ready_at

    def prepare(self, keys: Collection[str]) -> bool:
        """Build, in the background and into the table cache, the Maglev
        table the pool would need if exactly ``keys`` were its up backends,
        so a later :meth:`set_up_set` of that set publishes a ready table at
        once instead of answering from the fallback while it builds (tens of
        ms at 65537 slots, hundreds on a loaded machine). With consensus the
        agent prepares the set without a backend as soon as one member votes
        it down, before a majority does. Returns True when a build started;
        nothing is published and no state changes."""
        if self.service.balance is not Balance.MAGLEV:
            return False
        wanted = frozenset(keys)
        up = tuple(b for b in self.backends if b.key in wanted and not b.config.drain)
        if len(up) < 2:
            return False
        key = _table_key(up, self.service.maglev_table_size)
        if _TABLES.peek(key) or not _PREPARING.claim(key):
            return False

        def job() -> None:
            try:
                _cached_table(*key, pause=_GilYield())
            except Exception as exc:  # a bug; the set's own build retries
                log.error("maglev.build_failed", service=self.service.name, error=repr(exc))
            finally:
                _PREPARING.release(key)
        try:
            self.run_build(job)
        except Exception as exc:
            _PREPARING.release(key)
            log.error("maglev.build_failed", service=self.service.name, error=repr(exc))
            return False
        return True

    def set_up_set(self, keys: Collection[str]) -> list[Backend]:
        """Make exactly ``keys`` the up backends, published as one selection
        (no intermediate up set is ever visible: with consensus the agreed
        set replaces the local health view whole). Returns the backends
        whose state changed; keys not in the pool are ignored. Builds follow
        the rule of :meth:`set_up`."""
        wanted = frozenset(keys)
        changed = [b for b in self.backends if b.up != (b.key in wanted)]
        if not changed:
            return []
        with self._write_lock:
            for b in changed:
                b.up = not b.up
            old = self._selection
            now_up = _eligible(self.backends)
            table = _Table(now_up, self._known_table(now_up))
            fallback = old.table if old.table.table is not None else old.fallback
            self._selection = _selection(now_up, table, fallback, old.generation + 1)
        if table.table is None:
            self._request_build()
        return changed

    def set_up(self, key: str, up: bool) -> bool:
        """Mark a backend up or down. Returns True if anything changed.
        Raises KeyError.

        Never builds a Maglev table of more than one backend on the calling
        thread: a cached table for the new up set is used at once, otherwise
        a build starts through ``run_build`` and ``candidates`` answers from
        the previous table meanwhile.
        """
        backend = self._by_key[key]
        if backend.up == up:
            return False
        with self._write_lock:
            backend.up = up
            old = self._selection
            now_up = _eligible(self.backends)
            table = _Table(now_up, self._known_table(now_up))
            fallback = old.table if old.table.table is not None else old.fallback
            self._selection = _selection(now_up, table, fallback, old.generation + 1)
        if table.table is None:
            self._request_build()
        return True

    def update(self, service: ServiceConfig) -> tuple[list[Backend], list[Backend]]:
        """Take ``service`` (same name) as the pool's new configuration, live:
        backends new to the pool are added down (health checks raise them),
        backends gone from it are removed, and every other backend keeps its
        state and counters and takes its new weight and admin drain. A new selection (and,
        for Maglev, a new table, built as in ``set_up``) is published by one
        assignment, so ``candidates`` never returns a removed backend after
        this returns; connections already on it keep their ``Backend``.

        Returns ``(added, removed)``. Raises ValueError for another service's
        config.
        """
        if service.name != self.service.name:
            raise ValueError(f"pool of {self.service.name!r} cannot take {service.name!r}")
        with self._write_lock:
            kept: list[Backend] = []
            added: list[Backend] = []
            wanted = {b.key for b in service.backends}
            for config in service.backends:
                backend = self._by_key.get(config.key)
                if backend is None:
                    backend = Backend(config)
                    added.append(backend)
                else:
                    backend.config = config  # same key: new weight
                kept.append(backend)
            removed = [b for b in self.backends if b.key not in wanted]
            self.service = service
            self._proto = service.protocol.value
            self._balance = service.balance
            self._by_source = service.hash_key is HashKey.SOURCE_IP
            self.backends = kept
            self._by_key = {b.key: b for b in kept}
            old = self._selection
            now_up = _eligible(kept)
            table = _Table(now_up, self._known_table(now_up))
            # A removed backend is not in the new up set, so the fallback
            # rule of ``candidates`` never picks it from the old table.
            fallback = old.table if old.table.table is not None else old.fallback
            self._selection = _selection(now_up, table, fallback, old.generation + 1)
        if table.table is None:
            self._request_build()
        return added, removed

    def _known_table(self, up: tuple[Backend, ...]) -> array[int] | None:
        """A table for ``up`` that costs nothing now: none needed, trivial, or cached."""
        if self.service.balance is not Balance.MAGLEV or not up:
            return array("l")
        names, weights, size = _table_key(up, self.service.maglev_table_size)
        if len(up) == 1:
            return maglev.build_table(names, weights, size)  # one C-level fill, ~0.1 ms
        return _TABLES.get((names, weights, size))

    def _request_build(self) -> None:
        with self._write_lock:
            self._build_wanted = True
            if self._build_running:
                return
            self._build_running = True
        try:
            self.run_build(self._build_latest)
        except Exception as exc:  # e.g. no thread to be had: the next transition retries
            with self._write_lock:
                self._build_running = False
            log.error("maglev.build_failed", service=self.service.name, error=repr(exc))

    def _build_latest(self) -> None:
        """Build the table of the newest selection until none is wanted."""
        while True:
            with self._write_lock:
                if not self._build_wanted:
                    self._build_running = False
                    return
                self._build_wanted = False
            target = self._selection.table
            if target.table is not None:
                continue
            started = time.perf_counter()
            try:
                names, weights, size = _table_key(target.backends, self.service.maglev_table_size)
                table = _cached_table(names, weights, size, pause=_GilYield())
            except Exception as exc:  # a bug; keep serving from the fallback
                log.error("maglev.build_failed", service=self.service.name, error=repr(exc))
                continue
            target.fill(table)
            log.debug("maglev.built", service=self.service.name, backends=len(target.backends),
                      build_ms=round((time.perf_counter() - started) * 1000, 1))

    def flow_key(self, client: tuple[str, int], local: tuple[str, int]) -> bytes:
        """The bytes Maglev hashes: the 5-tuple, or the client address only
        (``hash_key: source_ip``)."""
        if self._by_source:
            try:
                # An IPv4 address's 4 bytes without an ipaddress object
                # (inet_pton takes the dotted quad ip_address does, no other).
                return _pton(_INET, client[0])
            except (OSError, ValueError, TypeError):
                return ipaddress.ip_address(client[0]).packed
        end = self._key_end
        if end[0] is not local:
            # One tuple, so a thread reading it sees a matching pair.
            end = self._key_end = (local, f"|{local[0]}|{local[1]}")
        return f"{self._proto}|{client[0]}|{client[1]}{end[1]}".encode()

    def candidates(self, client: tuple[str, int], local: tuple[str, int]) -> list[Backend]:
        """Up backends to try for a new flow, best first; empty when none is up.

        ``client`` and ``local`` are (address, port) of the flow's two ends
        (local is the VIP side). Safe to call from any thread.

        Maglev choice, with ``h`` the flow hash: the backend in slot ``h %
        size`` of the table for the current up set. While that table is
        being built: the backend the previous table gives, if it is still
        up; otherwise the ``h % n``-th of the ``n`` up backends in name
        order. So during a rebuild flows of backends still up keep their
        backend, flows of a backend gone down spread over the others, and
        all nodes agree; Maglev consistency is back when the table lands.
        The fallbacks after the choice are the other up backends in a fixed
        rotation (configuration order).
        """
        selection = self._selection  # the only read of pool state below
        up = selection.up
        if not up:
            return []
        balance = self._balance
        if balance is _MAGLEV:
            if self._by_source:
                key = self.flow_key(client, local)
            else:
                # flow_key's 5-tuple, inline (one call less per new flow).
                end = self._key_end
                if end[0] is not local:
                    end = self._key_end = (local, f"|{local[0]}|{local[1]}")
                key = f"{self._proto}|{client[0]}|{client[1]}{end[1]}".encode()
            key_hash = maglev.flow_hash(key)
            table = selection.table.table
            # _maglev_choice's common case (the table is built), inline.
            first = table[key_hash % len(table)] if table is not None else _maglev_choice(selection, key_hash)
        elif balance is Balance.ROUND_ROBIN:
            first = next(self._rr) % len(up)
        else:
            return sorted(up, key=lambda b: b.active_connections / b.config.weight)
        # The choice, then the others in a fixed rotation: deterministic, so
        # every node retries the same way.
        return [*up[first:], *up[:first]]


_pton = socket.inet_pton
_INET = socket.AF_INET
_MAGLEV = Balance.MAGLEV
"""Read once: an Enum member read through its class costs about 70 ns on
CPython 3.11."""


def _eligible(backends: list[Backend]) -> tuple[Backend, ...]:
    """Backends new flows may go to, in configuration order: up and not drained."""
    return tuple(b for b in backends if b.up and not b.config.drain)


def _maglev_choice(selection: _Selection, key_hash: int) -> int:
    """Index into ``selection.up`` of the flow's backend (rule in ``Pool.candidates``)."""
    table = selection.table.table
    if table is not None:
        return table[key_hash % len(table)]
    previous = selection.fallback
    if previous is not None and previous.table:
        old = previous.backends[previous.table[key_hash % len(previous.table)]]
        index = selection.position.get(old.key)
        if index is not None:
            return index
    return selection.by_name[key_hash % len(selection.up)]


def _table_key(up: tuple[Backend, ...], size: int) -> tuple[tuple[str, ...], tuple[int, ...], int]:
    return tuple(b.key for b in up), tuple(b.config.weight for b in up), size


class _TableCache:
    """Maglev tables by (names, weights, size), least recently used out.

    Services that share backends (a TCP and a UDP service on the same hosts)
    and a backend that flaps back to a previous set reuse a table instead of
    rebuilding it (tens of ms at 65537 slots; a table is read-only once
    built). Thread-safe; about 0.5 MB per 65537-slot table.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._tables: OrderedDict[tuple[tuple[str, ...], tuple[int, ...], int], array[int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[tuple[str, ...], tuple[int, ...], int]) -> array[int] | None:
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
            return table

    def peek(self, key: tuple[tuple[str, ...], tuple[int, ...], int]) -> bool:
        """Whether ``key`` is cached (its place in the LRU order unchanged)."""
        with self._lock:
            return key in self._tables

    def put(self, key: tuple[tuple[str, ...], tuple[int, ...], int], table: array[int]) -> None:
        with self._lock:
            self._tables[key] = table
            self._tables.move_to_end(key)
            while len(self._tables) > self._capacity:
                self._tables.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()


TABLE_CACHE = 24
"""Maglev tables kept (about 0.5 MB each at 65537 slots): the current ones,
the previous ones a flap returns to, and those prepared ahead for single
failures (:meth:`Pool.prepare`)."""
_TABLES = _TableCache(capacity=TABLE_CACHE)


class _Claims:
    """Table keys being prepared (:meth:`Pool.prepare`): one build each."""

    def __init__(self) -> None:
        self._keys: set[tuple[tuple[str, ...], tuple[int, ...], int]] = set()
        self._lock = threading.Lock()

    def claim(self, key: tuple[tuple[str, ...], tuple[int, ...], int]) -> bool:
        with self._lock:
            if key in self._keys:
                return False
            self._keys.add(key)
            return True

    def release(self, key: tuple[tuple[str, ...], tuple[int, ...], int]) -> None:
        with self._lock:
            self._keys.discard(key)


_PREPARING = _Claims()


def _cached_table(
    names: tuple[str, ...], weights: tuple[int, ...], size: int, pause: Callable[[], None] | None = None
) -> array[int]:
    """The Maglev table for a backend set, from ``_TABLES`` or built (and kept)."""
    key = (names, weights, size)
    table = _TABLES.get(key)
    if table is None:
        table = maglev.build_table(names, weights, size, pause=pause)
        _TABLES.put(key, table)
    return table


class _GilYield:
    """``maglev.build_table``'s pause for a background build: after
    ``HOLD_S`` of build work, sleep briefly so a thread waiting for the GIL
    (the event loop, the relay thread) takes it now instead of after the
    interpreter's switch interval (``sys.getswitchinterval()``, 5 ms). A real
    sleep rather than ``time.sleep(0)``, which returns at once and may take
    the GIL back before the waiting thread has woken up. The builder also
    holds the GIL for short spans only, so it is rarely descheduled by the
    OS while holding it (on a busy machine that stalls every other thread)."""

    HOLD_S = 0.0005
    SLEEP_S = 1e-6  # a real sleep: ~50 us with Linux timer slack

    def __init__(self) -> None:
        self._since = time.perf_counter()

    def __call__(self) -> None:
        now = time.perf_counter()
        if now - self._since >= self.HOLD_S:
            time.sleep(self.SLEEP_S)
            self._since = time.perf_counter()
