"""TCP forwarder: a terminating proxy from a VIP:port to a service's backends.

Per client connection two asyncio ``Protocol`` objects move bytes: the
client side (``_Relay``, which also holds the connection's state) and the
backend side (``_Upstream``). No task lives for a connection's lifetime;
one short task per connection runs the connect phase only, because
``loop.create_connection`` is a coroutine. Life of a connection::

    accepted --pause client reading--> connecting: try pool.candidates(...)
        in order, each within service.connect_timeout s; a failure counts
        backend.connect_failures and moves to the next candidate
    connected --[PROXY v2 header]--resume client reading--> relaying
    relaying: bytes both ways; EOF from one side -> write_eof on the other
        (half-close); both EOFs, a close or an error -> both sides closed

Redispatch: a backend killed between two health checks still completes
handshakes from its listen backlog, then resets them when the process dies.
Until the backend's first byte the relay keeps a copy of what it sent
(at most ``REPLAY_LIMIT`` bytes); if the backend resets the connection
before answering, the relay connects to the next candidate and replays the
copy, so the client never notices. After the first byte from the backend,
or past the limit, a reset closes the client as usual. (The same rule as
HAProxy's ``retry-on conn-failure empty-response`` with ``option redispatch``,
restricted to resets: a backend that closes cleanly is taken at its word.)

Backpressure: each transport's write buffer has a high-water mark of
``HIGH_WATER`` bytes; above it the *other* side stops reading until the
buffer drains below ``LOW_WATER`` bytes, so a slow reader holds at most about
``HIGH_WATER`` + one read (256 KiB) of user-space memory per direction, and
the rest of the backlog stays in the kernel's socket buffers and in the
sender's TCP window.

Accepting: the forwarder owns its listening socket and accepts in batches
from a reader callback, then hands each socket to
``loop.connect_accepted_socket``. Past the process's connection cap
(``slots``, shared by every service of the engine, from the descriptor
budget: docs/limits.md) a new connection is reset at once (SO_LINGER 0) and
counted as ``cap``. When accept() fails for want of descriptors or memory
(``OUT_OF_RESOURCES``) the listener is paused (its reader removed, so the
loop does not spin on a connection it cannot take) until one of its
connections closes or a timer of ACCEPT_BACKOFF_MIN_S to ACCEPT_BACKOFF_MAX_S
(doubling) fires; log lines are rate-limited (one per second per event, with
a ``suppressed`` count). A backend socket that cannot be opened (EMFILE,
ENFILE) resets the client at once, counted as ``descriptors``.

Idle timeout: one periodic sweep per forwarder (every idle_timeout/8 s, only
while connections exist) counts sweeps without traffic per connection; a read
in either direction resets the count, so the data path pays one attribute
store per read. A connection is aborted after idle_timeout to
idle_timeout * 9/8 s without a byte either way.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import socket
import struct
from typing import cast

from anycast_lb import log
from anycast_lb.config import ServiceConfig, format_host_port
from anycast_lb.errors import BindError
from anycast_lb.forward.proxy_protocol import v2_header
from anycast_lb.limits import Refusals, Slots
from anycast_lb.pool import Backend, Pool

HIGH_WATER = 64 * 1024
"""Bytes buffered for a peer before the other side stops reading."""
LOW_WATER = 16 * 1024
"""Bytes below which the paused side reads again."""
REPLAY_LIMIT = 64 * 1024
"""Bytes kept for a replay until the backend's first byte (see Redispatch)."""
BACKLOG = 4096
"""listen(2) backlog (the kernel caps it at net.core.somaxconn)."""
SWEEPS_PER_IDLE_TIMEOUT = 8
ACCEPT_BATCH = 64
"""Connections accepted per readiness callback."""
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""accept() errors that pause a listener (accept(2)): the connection waits
in the backlog until descriptors or memory are free again."""
NO_DESCRIPTOR = frozenset({errno.EMFILE, errno.ENFILE})
ACCEPT_BACKOFF_MIN_S = 0.05
ACCEPT_BACKOFF_MAX_S = 1.0
"""A paused listener is polled again after this back-off (s), doubling
from the minimum while accept() keeps failing, unless a connection closes first."""
_LINGER_RESET = struct.pack("ii", 1, 0)


class TcpForwarder:
    """Accepts TCP connections on the service's VIP:port and relays each to a
    backend of ``pool``.

    ``bind_host`` / ``bind_port`` override the address bound (tests bind
    127.0.0.1 port 0); backend choice still hashes the service's VIP and port
    so every node picks the same backend for a flow.

    ``slots`` caps the connections of every forwarder sharing it (None:
    no cap).

    Counters (plain ints, read at scrape time): ``accepted``,
    ``rejected_no_backend`` (no backend up: the client is reset at once),
    ``rejected_connect_failed`` (every candidate failed to connect) and
    ``refusals`` (shed load; ``refused()`` has every reason); per backend
    the pool's ``Backend`` counters.
    """

    def __init__(
        self,
        service: ServiceConfig,
        pool: Pool,
        bind_host: str | None = None,
        bind_port: int | None = None,
        *,
        slots: Slots | None = None,
    ) -> None:
        self.service = service
        self.pool = pool
        self._bind = (
            bind_host if bind_host is not None else str(service.vip),
            bind_port if bind_port is not None else service.port,
        )
        self._vip = (str(service.vip), service.port)
        self._sock: socket.socket | None = None
        self._accepting = False
        self._paused = False
        self._backoff = ACCEPT_BACKOFF_MIN_S
        self.slots = slots if slots is not None else Slots(None)
        self._relays: set[_Relay] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sweep_interval = service.effective_idle_timeout / SWEEPS_PER_IDLE_TIMEOUT
        self._sweep_handle: asyncio.TimerHandle | None = None
        self.accepted = 0
        self.rejected_no_backend = 0
        self.rejected_connect_failed = 0
        self.refusals = Refusals()
        self._shed_log = log.RateLimitedLog(1.0)

    @property
    def listening(self) -> bool:
        """True between a successful ``start`` and ``stop_accepting``."""
        return self._accepting

    def refused(self) -> dict[str, int]:
        """Connections refused so far, by reason (``limits.REFUSAL_REASONS``)."""
        return self.refusals.by_reason(no_backend=self.rejected_no_backend,
                                       connect_failed=self.rejected_connect_failed)

    def refuse(self, reason: str, detail: str = "") -> None:
        """Count a refused connection and log it, rate-limited."""
        self.refusals.count(reason)
        self._shed_log("forward.refused", key=reason, service=self.service.name,
                       protocol="tcp", reason=reason, **({"error": detail} if detail else {}))

    @property
    def active(self) -> int:
        """Client connections accepted and not yet fully closed."""
        return len(self._relays)

    @property
    def rejected(self) -> int:
        """Client connections closed without reaching a backend."""
        return self.rejected_no_backend + self.rejected_connect_failed

    async def start(self) -> tuple[str, int]:
        """Bind and listen (SO_REUSEADDR; IPv6 sockets are IPv6-only).

        Returns the bound (address, port), useful with port 0. Raises
        BindError naming the address when the OS refuses (address in use,
        address not local, permission), and RuntimeError if already started.
        """
        if self._sock is not None:
            raise RuntimeError("forwarder already started")
        host, port = self._bind
        loop = asyncio.get_running_loop()
        try:
            sock = _listening_socket(host, port)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise BindError(
                f"service {self.service.name}: cannot bind tcp "
                f"{format_host_port(host, port)}: {reason}"
            ) from exc
        self._sock = sock
        self._accepting = True
        loop.add_reader(sock.fileno(), self._on_accept)
        bound = sock.getsockname()
        address = (str(bound[0]), int(bound[1]))
        log.event("forward.listen", service=self.service.name, protocol="tcp",
                  address=format_host_port(*address))
        return address

    def stop_accepting(self) -> None:
        """Close the listening socket; established connections continue."""
        sock = self._sock
        if sock is None or not self._accepting:
            return
        self._accepting = False
        if not self._paused:
            asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()
        log.event("forward.stop_accepting", service=self.service.name, protocol="tcp",
                  active=self.active)

    # -- accepting -----------------------------------------------------------

    def _on_accept(self) -> None:
        sock = self._sock
        assert sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self._pause(exc)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            self._backoff = ACCEPT_BACKOFF_MIN_S
            if not self.slots.take():
                _reset(conn)
                self.refuse("cap")
                continue
            relay = _Relay(self)
            self._spawn_adopt(relay, conn)

    def _pause(self, exc: OSError) -> None:
        """Stop reading the listener until a connection closes or the
        back-off timer fires (the waiting connection stays in the backlog)."""
        if self._paused or self._sock is None:
            return
        self._paused = True
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())
        loop.call_later(self._backoff, self._resume)
        self.refusals.accept_pauses += 1
        self._shed_log("forward.accept_paused", key="", service=self.service.name,
                       error=exc.strerror or repr(exc), backoff_ms=round(self._backoff * 1000))
        self._backoff = min(self._backoff * 2, ACCEPT_BACKOFF_MAX_S)

    def _resume(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._accepting and self._sock is not None:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._on_accept)

    def _spawn_adopt(self, relay: _Relay, conn: socket.socket) -> None:
        task = asyncio.get_running_loop().create_task(self._adopt(relay, conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt(self, relay: _Relay, conn: socket.socket) -> None:
        """Wrap an accepted socket in a transport; ``relay`` holds a slot,
        given back when it finishes (or here, if it never started)."""
        try:
            conn.setblocking(False)
            await asyncio.get_running_loop().connect_accepted_socket(lambda: relay, sock=conn)
        except BaseException as exc:
            if relay.client is None:  # connection_made never ran: the slot is ours
                conn.close()
                self.slots.give()
            if not isinstance(exc, Exception):
                raise
            log.debug("forward.accept_failed", service=self.service.name, error=_describe(exc))

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every connection to end.

        Returns True if none remains, False on timeout.
        """
        if not self._relays:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def abort_all(self) -> None:
        """Reset every connection (both sides) and cancel pending connects."""
        for relay in list(self._relays):
            relay.shutdown(abort=True)

    # -- used by _Relay ------------------------------------------------------

    def _register(self, relay: _Relay) -> None:
        self._relays.add(relay)
        self.accepted += 1
        self._idle.clear()
        if self._sweep_handle is None:
            self._sweep_handle = asyncio.get_running_loop().call_later(
                self._sweep_interval, self._sweep
            )

    def _unregister(self, relay: _Relay) -> None:
        self._relays.discard(relay)
        self.slots.give()
        if self._paused:
            self._resume()  # a connection's descriptors were freed
        if not self._relays:
            self._idle.set()

    def _spawn(self, relay: _Relay, candidates: list[Backend]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(relay.connect(candidates))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A callback, not a finally: a task cancelled before its first step
        # never runs its body.
        task.add_done_callback(relay.connect_done)
        return task

    def _sweep(self) -> None:
        limit = SWEEPS_PER_IDLE_TIMEOUT
        for relay in list(self._relays):
            if relay.upstream is None:
                continue  # connecting: bounded by connect_timeout per candidate
            relay.idle_sweeps += 1
            if relay.idle_sweeps > limit:
                log.debug("forward.idle_timeout", service=self.service.name,
                          client=relay.client_name)
                relay.shutdown(abort=True)
        self._sweep_handle = None
        if self._relays:
            self._sweep_handle = asyncio.get_running_loop().call_later(
                self._sweep_interval, self._sweep
            )


class _Relay(asyncio.Protocol):
    """Client side of one proxied connection, and the connection's state."""

    __slots__ = (
        "fwd", "client", "upstream", "backend", "connecting", "client_eof",
        "backend_eof", "closing", "open_transports", "finished", "idle_sweeps",
        "peer", "local", "held", "replay", "remaining",
    )

    def __init__(self, fwd: TcpForwarder) -> None:
        self.fwd = fwd
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.backend: Backend | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.client_eof = False
        self.backend_eof = False
        self.closing = False
        self.open_transports = 0
        self.finished = False
        self.idle_sweeps = 0
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.held: list[bytes] = []
        self.replay: list[bytes] | None = []
        """Bytes sent to the backend before its first byte; None once it
        answered or the copy passed REPLAY_LIMIT."""
        self.remaining: list[Backend] = []
        """Candidates not tried yet, for a redispatch."""

    @property
    def client_name(self) -> str:
        return format_host_port(*self.peer) if self.peer[0] else "?"

    # -- client transport callbacks -----------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        self.client = transport
        self.open_transports = 1
        fwd = self.fwd
        fwd._register(self)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if peer is None or local is None:  # reset before we got to it
            transport.abort()
            return
        self.peer = (str(peer[0]), int(peer[1]))
        self.local = (str(local[0]), int(local[1]))
        _tune(transport, keepalive=True)
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        candidates = fwd.pool.candidates(self.peer, fwd._vip)
        if not candidates:
            fwd.rejected_no_backend += 1
            log.debug("forward.no_backend", service=fwd.service.name, client=self.client_name)
            transport.abort()
            return
        transport.pause_reading()
        self.connecting = fwd._spawn(self, candidates)

    def data_received(self, data: bytes) -> None:
        upstream, backend = self.upstream, self.backend
        if upstream is None or backend is None:
            self._hold(data)
            return
        if upstream.is_closing():
            # The backend side is going (its connection_lost is queued):
            # keep the bytes in case that turns into a redispatch.
            if self.replay is not None:
                self._keep(data)
            return
        upstream.write(data)
        backend.bytes_in += len(data)
        self.idle_sweeps = 0
        if self.replay is not None:
            self._keep(data)

    def _keep(self, data: bytes) -> None:
        assert self.replay is not None
        self.replay.append(data)
        if sum(map(len, self.replay)) > REPLAY_LIMIT:
            self.replay = None

    def _hold(self, data: bytes) -> None:
        """Keep bytes that arrive before the backend is connected. uvloop
        starts reading after ``connection_made`` returns, ignoring the pause
        made inside it, so one read can slip through; pausing again now
        bounds what is held to that read (at most 256 KiB)."""
        if self.closing or self.client is None:
            return
        self.held.append(data)
        self.client.pause_reading()

    def eof_received(self) -> bool:
        self.client_eof = True
        upstream = self.upstream
        if upstream is not None and not upstream.is_closing():
            upstream.write_eof()
        if self.backend_eof:
            self.shutdown(abort=False)
        return True  # keep the client transport open: the other direction may still run

    def pause_writing(self) -> None:
        # The client reads slower than the backend sends.
        if self.upstream is not None and not self.backend_eof and not self.closing:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.backend_eof and not self.closing:
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open_transports -= 1
        if not self.closing:
            self.shutdown(abort=exc is not None)
        self._maybe_finish()

    # -- connect phase ------------------------------------------------------

    async def connect(self, candidates: list[Backend]) -> None:
        """Try ``candidates`` in order; ``_Upstream.connection_made`` takes over
        on success. Runs as the connection's only task."""
        fwd = self.fwd
        loop = asyncio.get_running_loop()
        timeout = fwd.service.connect_timeout
        try:
            for i, backend in enumerate(candidates):
                if self.closing:
                    return
                host, port = backend.sockaddr
                self.remaining = candidates[i + 1:]
                try:
                    async with asyncio.timeout(timeout):
                        await loop.create_connection(
                            functools.partial(_Upstream, self, backend), host, port
                        )
                    return
                except (OSError, TimeoutError) as exc:
                    if self.upstream is not None:
                        return  # connected just as the timeout hit; connection_lost cleans up
                    if isinstance(exc, OSError) and exc.errno in NO_DESCRIPTOR:
                        # No socket for any backend: not the backend's fault,
                        # and the client must not wait for an idle sweep.
                        fwd.refuse("descriptors", _describe(exc))
                        self.shutdown(abort=True)
                        return
                    backend.connect_failures += 1
                    log.debug("forward.connect_failed", service=fwd.service.name,
                              backend=backend.key, error=_describe(exc))
            fwd.rejected_connect_failed += 1
            log.debug("forward.all_backends_failed", service=fwd.service.name,
                      client=self.client_name, tried=len(candidates))
            self.shutdown(abort=True)
        except Exception as exc:  # a bug must not leave a half-open connection
            log.error("forward.connect_error", service=fwd.service.name, error=_describe(exc))
            self.shutdown(abort=True)

    def connect_done(self, task: asyncio.Task[None]) -> None:
        self.connecting = None
        self._maybe_finish()

    def upstream_made(self, transport: asyncio.Transport, backend: Backend) -> None:
        self.upstream = transport
        self.backend = backend
        self.open_transports += 1
        backend.active_connections += 1
        backend.connections_total += 1
        if self.closing:
            transport.abort()
            return
        _tune(transport, keepalive=False)
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        if self.fwd.service.proxy_protocol:
            transport.write(v2_header(self.peer, self.local, "tcp"))
        if self.held:
            data = b"".join(self.held)
            self.held.clear()
            transport.write(data)
            backend.bytes_in += len(data)
            if self.replay is not None:
                self._keep(data)
        if self.client_eof:
            transport.write_eof()
        elif self.client is not None:
            self.client.resume_reading()

    # -- backend transport callbacks (via _Upstream) -------------------------

    def upstream_data(self, data: bytes) -> None:
        self.replay = None
        client, backend = self.client, self.backend
        if client is None or backend is None or client.is_closing():
            return
        client.write(data)
        backend.bytes_out += len(data)
        self.idle_sweeps = 0

    def upstream_eof(self) -> None:
        self.replay = None
        self.backend_eof = True
        client = self.client
        if client is not None and not client.is_closing():
            client.write_eof()
        if self.client_eof:
            self.shutdown(abort=False)

    def upstream_pause_writing(self) -> None:
        # The backend reads slower than the client sends.
        if self.client is not None and not self.client_eof and not self.closing:
            self.client.pause_reading()

    def upstream_resume_writing(self) -> None:
        if self.client is not None and not self.client_eof and not self.closing:
            self.client.resume_reading()

    def upstream_lost(self, backend: Backend, exc: Exception | None) -> None:
        self.open_transports -= 1
        backend.active_connections -= 1
        if exc is not None and self._redispatch(backend):
            return
        if not self.closing:
            self.shutdown(abort=exc is not None)
        self._maybe_finish()

    def _redispatch(self, backend: Backend) -> bool:
        """After ``backend`` reset the connection: connect to the next
        candidate and replay, if nothing came back yet. True if it did."""
        client = self.client
        if (self.replay is None or not self.remaining or self.closing or self.backend_eof
                or client is None or client.is_closing()):
            return False
        backend.connect_failures += 1
        log.debug("forward.redispatch", service=self.fwd.service.name, backend=backend.key,
                  client=self.client_name)
        self.held = self.replay
        self.replay = []
        self.upstream = None
        self.backend = None
        client.pause_reading()
        self.connecting = self.fwd._spawn(self, self.remaining)
        return True

    # -- teardown -----------------------------------------------------------

    def shutdown(self, abort: bool) -> None:
        """Close both sides: ``close`` flushes what is buffered, ``abort``
        discards it and resets. Safe to call again (e.g. abort after close,
        when a peer stopped reading)."""
        self.closing = True
        task = self.connecting
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        for transport in (self.client, self.upstream):
            if transport is not None:
                if abort:
                    transport.abort()
                elif not transport.is_closing():
                    transport.close()

    def _maybe_finish(self) -> None:
        if self.open_transports == 0 and self.connecting is None and not self.finished:
            self.finished = True
            self.fwd._unregister(self)


class _Upstream(asyncio.Protocol):
    """Backend side of one proxied connection: forwards every event to its relay."""

    __slots__ = ("relay", "backend", "lost")

    def __init__(self, relay: _Relay, backend: Backend) -> None:
        self.relay = relay
        self.backend = backend
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        closing = self.relay.closing
        self.relay.upstream_made(cast(asyncio.Transport, transport), self.backend)
        if closing:
            # The client went while this connect completed: upstream_made
            # aborted it at once. uvloop may then never call connection_lost
            # (the connect task was cancelled meanwhile), so account for it
            # here; a later call is ignored.
            self.connection_lost(None)

    def data_received(self, data: bytes) -> None:
        self.relay.upstream_data(data)

    def eof_received(self) -> bool:
        self.relay.upstream_eof()
        return True

    def pause_writing(self) -> None:
        self.relay.upstream_pause_writing()

    def resume_writing(self) -> None:
        self.relay.upstream_resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.relay.upstream_lost(self.backend, exc)


def _listening_socket(host: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket on ``host`` (an IP literal):
    SO_REUSEADDR, IPv6-only for IPv6. Raises OSError, or ValueError if
    ``host`` is not an IP address."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (SO_LINGER 0), not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


def _tune(transport: asyncio.Transport, keepalive: bool) -> None:
    """TCP_NODELAY (a relay must not add Nagle delay on top of the client's),
    and SO_KEEPALIVE on client sockets so dead clients are eventually noticed."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass  # the peer already reset; the transport reports it


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return repr(exc)

