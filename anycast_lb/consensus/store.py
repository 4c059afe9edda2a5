"""The one adapter over the etcd v3 client (``etcd3aio``, asyncio, gRPC).

Everything else in anycast-lb talks to :class:`Store` and sees only plain
data (:class:`KeyValue`, :class:`Snapshot`, :class:`WatchBatch`) and the
``ConsensusError`` tree of :mod:`anycast_lb.errors`; swapping the client
library touches this module only.

Rules this module keeps:

- Every call is bounded by ``request_timeout`` (s), whatever the library
  does inside (its own retries included). A call that runs out raises
  :class:`ConsensusUnavailable`: on a member without quorum, linearizable
  reads, writes and lease calls hang until their deadline, serializable
  reads still answer from the member's last state.
- Writes and transactions are sent once (no library retry): a retried
  compare-and-swap whose first attempt did commit would report a conflict
  with itself.
- A watch carries the ``hasleader`` gRPC metadata (etcd's
  ``WithRequireLeader``), so a member that loses its leader ends the stream
  instead of staying silent; the watch then re-watches from the last
  revision seen + 1 and yields no event twice. A compacted start revision
  raises :class:`ConsensusCompacted`.
- The gRPC channel's reconnect back-off is capped at 1 s (gRPC's default
  grows to 120 s), so a node notices within about a second that etcd is
  back. While the channel is down a call fails at once (UNAVAILABLE), not at
  its deadline.
- Lease TTLs are whole seconds in etcd's API: a TTL in seconds is rounded up,
  and etcd may raise it to its own minimum (1.5 x election timeout, so 2 s
  with the defaults); :attr:`Lease.ttl` is what etcd granted.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

# gRPC's fork support (pthread_atfork handlers) lets a child forked while
# gRPC threads are busy crash before exec (SIGSEGV): the node forks nft, ip
# and ExaBGP beside a live etcd client, and the asyncio subprocess it lost
# took the node down. Nothing here forks to keep using gRPC in the child,
# so the handlers are turned off before gRPC is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
import grpc.aio
from etcd3aio import (
    EtcdConnectionError,
    EtcdError,
    EtcdTransientError,
    prefix_range_end,
)
from etcd3aio import _protobuf as pb
from etcd3aio.connections import ConnectionManager
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService

from anycast_lb.clock import Clock, SystemClock
from anycast_lb.consensus.keys import client_target
from anycast_lb.errors import (
    ConsensusCompacted,
    ConsensusConflict,
    ConsensusError,
    ConsensusUnavailable,
    LeaseLost,
)

T = TypeVar("T")

# etcd's rpctypes.MetadataRequireLeaderKey / MetadataHasLeader.
_REQUIRE_LEADER = (("hasleader", "true"),)


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    """etcd revision of the last write to this key."""
    create_revision: int
    lease: int
    """Lease id the key is attached to, 0 for none."""


@dataclass(frozen=True)
class Snapshot:
    """Keys under a prefix as of one etcd revision (``revision``)."""

    revision: int
    items: tuple[KeyValue, ...]


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int
    """Seconds, as granted by etcd (possibly above what was asked)."""


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes
    """Empty for a delete."""
    mod_revision: int
    create_revision: int = 0
    """0 for a delete."""
    lease: int = 0


@dataclass(frozen=True)
class WatchBatch:
    """The events of one watch response, all with revision <= ``revision``."""

    revision: int
    events: tuple[WatchEvent, ...]


@dataclass(frozen=True)
class ModRevisionIs:
    """Compare: ``key``'s mod revision equals ``revision`` (0: key absent)."""

    key: str
    revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


Compare = ModRevisionIs
Op = Put | Delete


def _kv(raw: object) -> KeyValue:
    return KeyValue(
        key=bytes(raw.key).decode(),  # type: ignore[attr-defined]
        value=bytes(raw.value),  # type: ignore[attr-defined]
        mod_revision=int(raw.mod_revision),  # type: ignore[attr-defined]
        create_revision=int(raw.create_revision),  # type: ignore[attr-defined]
        lease=int(raw.lease),  # type: ignore[attr-defined]
    )


def _mapped(exc: BaseException, what: str, timeout: float) -> ConsensusError:
    """The one translation of client errors into the ConsensusError tree."""
    if isinstance(exc, TimeoutError):
        return ConsensusUnavailable(f"{what}: no answer within {timeout} s")
    if isinstance(exc, (EtcdConnectionError, EtcdTransientError)):
        return ConsensusUnavailable(f"{what}: {exc}")
    if isinstance(exc, grpc.aio.AioRpcError):
        code, detail = exc.code(), exc.details() or ""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ConsensusUnavailable(f"{what}: {code.name} {detail}".rstrip())
        if "compacted" in detail:
            return ConsensusCompacted(f"{what}: {detail}")
        if "lease not found" in detail:
            return LeaseLost(f"{what}: {detail}")
        return ConsensusError(f"{what}: {code.name} {detail}".rstrip())
    return ConsensusError(f"{what}: {exc}")


class Store:
    """An etcd v3 client bounded by ``request_timeout`` (s) per call.

    ``endpoints`` are ``http://IPV4:PORT`` client URLs, used round-robin.
    Use as ``async with Store(...) as store``. Every method raises only
    ``ConsensusError`` subclasses for etcd trouble.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        request_timeout: float,
        *,
        clock: Clock | None = None,
        watch_backoff: float = 0.1,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self._targets = [client_target(u) for u in endpoints]
        self.request_timeout = request_timeout
        self._clock = clock or SystemClock()
        self._watch_backoff = watch_backoff
        self._channel: grpc.aio.Channel | None = None
        self._kv: KVService | None = None
        self._lease: LeaseService | None = None
        self._watch: pb.WatchStub | None = None

    async def __aenter__(self) -> Store:
        self.connect()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    def connect(self) -> None:
        """Open the gRPC channel (lazy: nothing is sent until the first call)."""
        manager = ConnectionManager(self._targets)
        # gRPC's default reconnect back-off grows to 120 s: a node would stay
        # cut off for minutes after etcd came back. Cap it near the lease TTL.
        manager.grpc_options += [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._channel = manager.get_channel()
        self._kv = KVService(self._channel)
        self._lease = LeaseService(self._channel)
        self._watch = pb.WatchStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._kv = self._lease = self._watch = None

    def _services(self) -> tuple[KVService, LeaseService, pb.WatchStub]:
        if self._kv is None or self._lease is None or self._watch is None:
            raise ConsensusError("store is not connected")
        return self._kv, self._lease, self._watch

    async def _bounded(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self.request_timeout):
                return await call()
        except (TimeoutError, EtcdError, grpc.aio.AioRpcError) as exc:
            raise _mapped(exc, what, self.request_timeout) from exc

    # -- keys ---------------------------------------------------------------

    async def get(self, key: str, *, linearizable: bool = True) -> tuple[int, KeyValue | None]:
        """(etcd revision of the read, the key or None). A serializable read
        (``linearizable=False``) answers from the member's local state, even
        without quorum."""
        kv, _, _ = self._services()
        resp = await self._bounded(f"get {key}", lambda: kv.get(
            key, serializable=not linearizable, timeout=self.request_timeout))
        return int(resp.header.revision), (_kv(resp.kvs[0]) if resp.kvs else None)

    async def get_prefix(
        self, prefix: str, *, revision: int = 0, linearizable: bool = True
    ) -> Snapshot:
        """Every key under ``prefix`` at etcd ``revision`` (0: the latest),
        sorted by key. Raises ConsensusCompacted for a compacted revision."""
        kv, _, _ = self._services()
        resp = await self._bounded(f"get prefix {prefix}", lambda: kv.get(
            prefix, range_end=prefix_range_end(prefix), serializable=not linearizable,
            revision=revision, timeout=self.request_timeout))
        items = tuple(sorted((_kv(r) for r in resp.kvs), key=lambda i: i.key))
        return Snapshot(revision=revision or int(resp.header.revision), items=items)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write ``key``; returns the etcd revision of the write."""
        kv, _, _ = self._services()
        resp = await self._bounded(f"put {key}", lambda: kv.put(
            key, value, lease=lease, timeout=self.request_timeout, max_attempts=1))
        return int(resp.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); returns the etcd revision."""
        kv, _, _ = self._services()
        end = prefix_range_end(key) if prefix else None
        resp = await self._bounded(f"delete {key}", lambda: kv.delete(
            key, range_end=end, timeout=self.request_timeout, max_attempts=1))
        return int(resp.header.revision)

    async def transact(self, compares: Sequence[Compare], ops: Sequence[Op]) -> tuple[bool, int]:
        """Apply ``ops`` atomically if every compare holds: (succeeded, etcd
        revision after the transaction). Nothing is written when it fails."""
        kv, _, _ = self._services()
        cmp = [kv.txn_compare_create_revision(c.key, 0) if c.revision == 0 else
               _mod_revision_equals(c.key, c.revision) for c in compares]
        req = [kv.txn_op_put(o.key, o.value, lease=o.lease) if isinstance(o, Put)
               else kv.txn_op_delete(o.key) for o in ops]
        resp = await self._bounded("transaction", lambda: kv.txn(
            cmp, req, timeout=self.request_timeout, max_attempts=1))
        return bool(resp.succeeded), int(resp.header.revision)

    async def compare_and_put(
        self, key: str, value: bytes, *, mod_revision: int, lease: int = 0,
        also: Sequence[Op] = (),
    ) -> int:
        """Write ``key`` (and ``also``) only if its mod revision is still
        ``mod_revision`` (0: only if absent). Returns the etcd revision;
        raises ConsensusConflict when the key moved on."""
        ok, revision = await self.transact(
            [ModRevisionIs(key, mod_revision)], [Put(key, value, lease), *also])
        if not ok:
            raise ConsensusConflict(f"{key} changed after revision {mod_revision}")
        return revision

    # -- leases -------------------------------------------------------------

    async def grant(self, ttl: float) -> Lease:
        """A new lease of ``ttl`` s, rounded up to whole seconds."""
        _, lease, _ = self._services()
        resp = await self._bounded("lease grant", lambda: lease.grant(
            max(1, math.ceil(ttl)), timeout=self.request_timeout, max_attempts=1))
        return Lease(id=int(resp.ID), ttl=int(resp.TTL))

    async def keepalive(self, lease_id: int) -> int:
        """Refresh a lease once; returns its new TTL (s). Raises LeaseLost when
        etcd no longer knows it, ConsensusUnavailable on no answer in time."""
        _, lease, _ = self._services()

        async def once() -> int:
            call = lease.keep_alive(lease_id)
            try:
                async for resp in call:
                    return int(resp.TTL)
                raise ConsensusUnavailable(f"lease {lease_id:x} keepalive: stream ended")
            finally:
                call.cancel()

        ttl = await self._bounded(f"lease {lease_id:x} keepalive", once)
        if ttl <= 0:
            raise LeaseLost(f"lease {lease_id:x} expired")
        return ttl

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease: every key under it is deleted at once."""
        _, lease, _ = self._services()
        await self._bounded(f"lease {lease_id:x} revoke", lambda: lease.revoke(
            lease_id, timeout=self.request_timeout, max_attempts=1))

    # -- watch --------------------------------------------------------------

    async def watch_prefix(
        self, prefix: str, start_revision: int,
        on_reconnect: Callable[[ConsensusError], None] | None = None,
    ) -> AsyncIterator[WatchBatch]:
        """Every change under ``prefix`` from etcd ``start_revision`` on, in
        order, each once. Lost streams (member down, no leader) are re-watched
        from the last revision seen + 1 after ``watch_backoff`` s (doubling up
        to 2 s); ``on_reconnect`` hears each loss. Raises ConsensusCompacted
        when the revision to resume from was compacted (re-read, then watch
        again). Runs until the caller stops iterating."""
        _, _, stub = self._services()
        next_revision = start_revision
        backoff = self._watch_backoff
        end = prefix_range_end(prefix)
        while True:
            try:
                async for batch in self._watch_once(stub, prefix, end, next_revision):
                    backoff = self._watch_backoff
                    if batch.events:
                        next_revision = batch.events[-1].mod_revision + 1
                        yield batch
            except ConsensusUnavailable as exc:
                if on_reconnect is not None:
                    on_reconnect(exc)
                await self._clock.sleep(backoff)
                backoff = min(2.0, backoff * 2)

    async def _watch_once(
        self, stub: pb.WatchStub, prefix: str, end: bytes, start_revision: int
    ) -> AsyncIterator[WatchBatch]:
        async def requests() -> AsyncIterator[object]:
            yield pb.WatchRequest(create_request=pb.WatchCreateRequest(
                key=prefix.encode(), range_end=end, start_revision=start_revision))
            await asyncio.Event().wait()  # keep the request side open

        call = stub.Watch(requests(), metadata=_REQUIRE_LEADER)
        try:
            stream = aiter(call)
            try:
                async with asyncio.timeout(self.request_timeout):
                    created = await anext(stream)
            except (TimeoutError, StopAsyncIteration, grpc.aio.AioRpcError) as exc:
                raise _mapped(exc, f"watch {prefix}", self.request_timeout) from exc
            self._check_canceled(created, prefix)
            while True:
                try:
                    resp = await anext(stream)
                except StopAsyncIteration as exc:
                    raise ConsensusUnavailable(f"watch {prefix}: stream ended") from exc
                except grpc.aio.AioRpcError as exc:
                    raise _mapped(exc, f"watch {prefix}", self.request_timeout) from exc
                self._check_canceled(resp, prefix)
                events = tuple(
                    WatchEvent(
                        kind="delete" if int(e.type) == 1 else "put",
                        key=bytes(e.kv.key).decode(),
                        value=bytes(e.kv.value),
                        mod_revision=int(e.kv.mod_revision),
                        create_revision=int(e.kv.create_revision),
                        lease=int(e.kv.lease),
                    )
                    for e in resp.events
                )
                yield WatchBatch(revision=int(resp.header.revision), events=events)
        finally:
            call.cancel()

    @staticmethod
    def _check_canceled(resp: object, prefix: str) -> None:
        compact = int(resp.compact_revision)  # type: ignore[attr-defined]
        if compact > 0:
            raise ConsensusCompacted(
                f"watch {prefix}: revisions up to {compact} were compacted")
        if resp.canceled:  # type: ignore[attr-defined]
            reason = str(resp.cancel_reason)  # type: ignore[attr-defined]
            raise ConsensusUnavailable(f"watch {prefix}: canceled by etcd: {reason}")


def _mod_revision_equals(key: str, revision: int) -> object:
    return pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.MOD,
                      key=key.encode(), mod_revision=revision)


class LeaseKeeper:
    """Keeps one lease alive: a keepalive every ``ttl / 3`` s, each bounded
    by the store's request timeout.

    ``last_ok`` is the clock's monotonic time of the last keepalive etcd
    acknowledged (or of the grant): a node that sees ``now - last_ok`` pass
    its threshold is isolated (fail-static). :meth:`run` returns never; it
    raises LeaseLost once etcd says the lease is gone (keys under it are
    deleted then: grant a new lease and write them again).
    """

    def __init__(self, store: Store, ttl: float, clock: Clock | None = None) -> None:
        self._store = store
        self._ttl = ttl
        self._clock = clock or SystemClock()
        self.lease: Lease | None = None
        self.last_ok: float | None = None
        self.failures = 0
        """Keepalives that got no answer in time since the last success."""

    async def grant(self) -> Lease:
        self.lease = await self._store.grant(self._ttl)
        self.last_ok = self._clock.monotonic()
        self.failures = 0
        return self.lease

    async def run(self) -> None:
        if self.lease is None:
            raise LeaseLost("no lease granted")
        lease_id = self.lease.id
        while True:
            await self._clock.sleep(self.lease.ttl / 3)
            try:
                await self._store.keepalive(lease_id)
            except ConsensusUnavailable:
                self.failures += 1
                continue
            self.last_ok = self._clock.monotonic()
            self.failures = 0

    def silent_for(self) -> float:
        """Seconds since the last acknowledged keepalive (inf before a grant)."""
        if self.last_ok is None:
            return math.inf
        return self._clock.monotonic() - self.last_ok
