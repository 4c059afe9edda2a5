"""TCP forwarder: a terminating proxy from a VIP:port to a service's backends.

The connection rules (connect retry over the pool's candidates, redispatch
with replay before the backend's first byte, half-close, reset or FIN, idle
timeout, counters) live in the pure ``connection.Connection`` machine, shared
with the relay engine; this module only moves bytes, turns transport
callbacks into the machine's events and carries out its actions.

Per client connection two asyncio ``Protocol`` objects move bytes: the
client side (``_Relay``, which owns the connection's machine) and the
backend side (``_Upstream``, one per connect attempt). No task lives for a
connection's lifetime; one short task per attempt runs the connect only,
because ``loop.create_connection`` is a coroutine. The client is not read
until the machine says ``StartPump`` (uvloop may slip one read through: it
is fed to the machine as ``ClientData`` and sent on connect).

Redispatch: a backend killed between two health checks still completes
handshakes from its listen backlog, then resets them when the process dies.
Until the backend's first byte the machine keeps a copy of what the client
sent (at most ``connection.REPLAY_LIMIT`` bytes); if the backend resets the connection
(``connection.RESET_ERRNOS``) before answering, the relay connects to the next candidate
and replays the copy, so the client never notices.

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

Per source: past its source's share of the cap (``slots``' per-source
count, ``forwarding.max_tcp_connections_per_source``) a new connection is
reset the same way, counted as ``source_cap``. The slot and the source's
count are taken at accept and given back once, when the connection's
transports are all closed (``_unregister``).

Idle timeout: one periodic sweep per forwarder (every idle_timeout/8 s, only
while connections exist) feeds each relaying connection ``IdleSweep(traffic)``;
a read in either direction sets ``traffic``, so the data path pays one
attribute store per read. A connection is reset after idle_timeout to
idle_timeout * 9/8 s without a byte either way.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable
from typing import cast

from anycast_lb import log
from anycast_lb.config import ServiceConfig, format_host_port
from anycast_lb.errors import BindError, ConnectionStateError
from anycast_lb.flows import FlowKey
from anycast_lb.forward.connection import (
    ABORT,
    BACKEND_CLOSED,
    BACKEND_EOF,
    BACKEND_ERROR,
    BACKEND_FIRST_BYTE,
    BACKEND_RESET,
    CLIENT_CLOSED,
    CLIENT_EOF,
    CLIENT_RESET,
    CONNECT_TIMEOUT,
    CONNECTED,
    RESET_ERRNOS,
    SWEEPS_PER_IDLE_TIMEOUT,
    Accepted,
    Action,
    ClientData,
    Close,
    ConnectFailed,
    Connection,
    ConnectTo,
    CountConnected,
    CountFailure,
    CountReject,
    CountReleased,
    Event,
    IdleSweep,
    Phase,
    Reject,
    Replay,
    Rules,
    SendProxyHeader,
    ShutdownWrite,
    Side,
    StartPump,
    StopPump,
)
from anycast_lb.forward.proxy_protocol import v2_header
from anycast_lb.limits import Refusals, Slots
from anycast_lb.pool import Backend, Pool

HIGH_WATER = 64 * 1024
"""Bytes buffered for a peer before the other side stops reading."""
LOW_WATER = 16 * 1024
"""Bytes below which the paused side reads again."""
BACKLOG = 4096
"""listen(2) backlog (the kernel caps it at net.core.somaxconn)."""
_SWEPT_BUSY = IdleSweep(traffic=True)
_SWEPT_QUIET = IdleSweep(traffic=False)
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

    ``slots`` caps the connections of every forwarder sharing it, in all
    and per source (None: no cap).

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
        self.rules = Rules.of(service)
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
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self._pause(exc)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            self._backoff = ACCEPT_BACKOFF_MIN_S
            refusal = self.slots.admit(peer[0])
            if refusal is not None:
                _reset(conn)
                self.refuse(refusal)
                continue
            relay = _Relay(self)
            # The slot is released with this address (_unregister), even if
            # the transport never learns its peer name.
            relay.peer = (str(peer[0]), int(peer[1]))
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
        # A callback, not only _adopt's except: a task cancelled before its
        # first step (loop teardown, stop right after an accept) never runs
        # its body, and would leak the accepted socket and its slot.
        task.add_done_callback(lambda done: self._adopt_done(done, relay, conn))

    def _adopt_done(self, task: asyncio.Task[None], relay: _Relay, conn: socket.socket) -> None:
        """Close ``conn`` and give back ``relay``'s slot when ``task`` was
        cancelled before ``_adopt`` ran. Never twice: if the body ran, either
        a transport took the socket (``relay.client`` set, the slot goes back
        with ``_unregister``) or its except branch closed it (fileno -1) and
        gave the slot back itself."""
        if task.cancelled() and relay.client is None and conn.fileno() != -1:
            conn.close()
            self.slots.release(relay.peer[0])

    async def _adopt(self, relay: _Relay, conn: socket.socket) -> None:
        """Wrap an accepted socket in a transport; ``relay`` holds a slot,
        given back when it finishes (or here, if it never started)."""
        try:
            conn.setblocking(False)
            await asyncio.get_running_loop().connect_accepted_socket(lambda: relay, sock=conn)
        except BaseException as exc:
            if relay.client is None:  # connection_made never ran: the slot is ours
                conn.close()
                self.slots.release(relay.peer[0])
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
            relay.shutdown()

    def abort_flows(self, keys: Iterable[FlowKey]) -> int:
        """Flow survival needs the relay engine (``forwarder_for`` refuses a
        flow hook here), so this engine publishes no flow keys: 0."""
        return 0

    def abort_backend(self, backend: Backend) -> int:
        """Reset the connections relayed to ``backend`` (a backend removed by
        live apply, past ``drain.timeout``); how many there were."""
        doomed = [r for r in self._relays if r.backend is backend]
        for relay in doomed:
            relay.shutdown()
        return len(doomed)

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
        """``relay`` has finished (once per relay, from ``_maybe_finish``):
        its slot and its source's count are given back."""
        self._relays.discard(relay)
        self.slots.release(relay.peer[0])
        if self._paused:
            self._resume()  # a connection's descriptors were freed
        if not self._relays:
            self._idle.set()

    def _spawn(self, relay: _Relay, backend: Backend, timeout: float) -> asyncio.Task[None]:
        proto = _Upstream(relay, backend)
        relay.proto = proto
        task = asyncio.get_running_loop().create_task(relay.attempt(proto, timeout))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A callback, not a finally: a task cancelled before its first step
        # never runs its body.
        task.add_done_callback(relay.connect_done)
        return task

    def _sweep(self) -> None:
        for relay in list(self._relays):
            if relay.machine.phase is not Phase.RELAYING:
                continue  # connecting: bounded by connect_timeout per attempt
            traffic, relay.traffic = relay.traffic, False
            relay.feed(_SWEPT_BUSY if traffic else _SWEPT_QUIET)
            if relay.machine.closed:
                log.debug("forward.idle_timeout", service=self.service.name,
                          client=relay.client_name)
        self._sweep_handle = None
        if self._relays:
            self._sweep_handle = asyncio.get_running_loop().call_later(
                self._sweep_interval, self._sweep
            )


class _Relay(asyncio.Protocol):
    """Client side of one proxied connection: moves bytes, turns transport
    callbacks into ``connection`` events and carries out the machine's
    actions. The rules live in ``self.machine``."""

    __slots__ = (
        "fwd", "machine", "client", "upstream", "proto", "connecting", "open_transports",
        "finished", "traffic", "peer", "local",
    )

    def __init__(self, fwd: TcpForwarder) -> None:
        self.fwd = fwd
        self.machine: Connection[Backend] = Connection(fwd.rules)
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        """The live backend transport (None while connecting, after a close)."""
        self.proto: _Upstream | None = None
        """The current backend attempt or connection."""
        self.connecting: asyncio.Task[None] | None = None
        self.open_transports = 0
        self.finished = False
        self.traffic = False
        """A byte or EOF moved since the last idle sweep."""
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)

    @property
    def client_name(self) -> str:
        return format_host_port(*self.peer) if self.peer[0] else "?"

    @property
    def backend(self) -> Backend | None:
        return self.machine.backend

    # -- the machine ---------------------------------------------------------

    def feed(self, event: Event[Backend]) -> None:
        """Feed ``event`` to the machine and carry out its actions."""
        backend = self.machine.backend  # the event's backend, for the counters
        try:
            actions = self.machine.handle(event)
        except ConnectionStateError as exc:  # a bug must not leave a half-open connection
            log.error("forward.connection_state", service=self.fwd.service.name, error=str(exc))
            self._abort_transports()
            return
        for action in actions:
            self._do(action, backend)

    def _do(self, action: Action, backend: Backend | None) -> None:
        """Carry out ``action``; ``backend``: the machine's before the event."""
        fwd = self.fwd
        kind = type(action)
        if kind is Close:
            assert isinstance(action, Close)
            if action.side is Side.CLIENT:
                _close(self.client, action.reset)
            else:
                self._close_backend(action.reset)
        elif kind is ShutdownWrite:
            assert isinstance(action, ShutdownWrite)
            transport = self.client if action.side is Side.CLIENT else self.upstream
            if transport is not None and not transport.is_closing():
                transport.write_eof()
        elif kind is StartPump:
            assert isinstance(action, StartPump)
            if action.read_client and self.client is not None:
                self.client.resume_reading()
        elif kind is StopPump:
            if self.client is not None:
                self.client.pause_reading()
        elif kind is SendProxyHeader:
            assert self.upstream is not None
            self.upstream.write(v2_header(self.peer, self.local, "tcp"))
        elif kind is Replay:
            assert isinstance(action, Replay) and self.upstream is not None
            self.upstream.write(action.data)
            current = self.machine.backend
            assert current is not None
            current.bytes_in += len(action.data)
        elif kind is ConnectTo:
            current = self.machine.backend
            assert current is not None
            self.connecting = fwd._spawn(self, current, self.machine.rules.connect_timeout)
        elif kind is CountConnected:
            assert backend is not None
            backend.active_connections += 1
            backend.connections_total += 1
        elif kind is CountReleased:
            assert backend is not None
            backend.active_connections -= 1
        elif kind is CountFailure:
            assert backend is not None
            backend.connect_failures += 1
        elif kind is CountReject:
            assert isinstance(action, CountReject)
            if action.reason is Reject.NO_BACKEND:
                fwd.rejected_no_backend += 1
                log.debug("forward.no_backend", service=fwd.service.name,
                          client=self.client_name)
            else:
                fwd.rejected_connect_failed += 1
                log.debug("forward.all_backends_failed", service=fwd.service.name,
                          client=self.client_name)
        # StopReplay: nothing to do, bytes are copied by the transports anyway.

    def _close_backend(self, reset: bool) -> None:
        """End the current backend attempt or connection."""
        proto, self.proto = self.proto, None
        if proto is not None:
            proto.live = False
        task = self.connecting
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        _close(self.upstream, reset)
        self.upstream = None

    def shutdown(self) -> None:
        """Reset both sides now (abort_all, idle timeout)."""
        if self.machine.phase is Phase.NEW:
            self._abort_transports()
        else:
            self.feed(ABORT)

    def _abort_transports(self) -> None:
        task = self.connecting
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        for transport in (self.client, self.upstream):
            if transport is not None:
                transport.abort()

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
        # Read nothing until the backend is connected (StartPump).
        transport.pause_reading()
        self.feed(Accepted(fwd.pool.candidates(self.peer, fwd._vip)))

    def data_received(self, data: bytes) -> None:
        machine = self.machine
        upstream = self.upstream
        if upstream is None:
            if machine.phase is Phase.CONNECTING:
                # uvloop starts reading after ``connection_made`` returns,
                # ignoring the pause made inside it, so one read (at most
                # 256 KiB) can slip through: the machine keeps it for the
                # connect; pausing again bounds it to that read.
                self.feed(ClientData(data))
                if self.client is not None:
                    self.client.pause_reading()
            return
        self.traffic = True
        if not upstream.is_closing():
            upstream.write(data)
            backend = machine.backend
            assert backend is not None
            backend.bytes_in += len(data)
        # else: the backend side is going (its connection_lost is queued):
        # the copy may still turn into a redispatch.
        if machine.replaying:
            self.feed(ClientData(data))

    def eof_received(self) -> bool:
        self.traffic = True
        if self.machine.phase in _LIVE:
            self.feed(CLIENT_EOF)
        return True  # keep the client transport open: the other direction may still run

    def pause_writing(self) -> None:
        # The client reads slower than the backend sends.
        machine = self.machine
        if self.upstream is not None and not machine.backend_eof and not machine.closed:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        machine = self.machine
        if self.upstream is not None and not machine.backend_eof and not machine.closed:
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open_transports -= 1
        if self.machine.phase in _LIVE:
            self.feed(CLIENT_CLOSED if exc is None else CLIENT_RESET)
        self._maybe_finish()

    # -- connect phase ------------------------------------------------------

    async def attempt(self, proto: _Upstream, timeout: float) -> None:
        """One connect attempt (``ConnectTo``): ``_Upstream.connection_made``
        reports success, this task a failure. Runs as the connection's only
        task until then."""
        fwd = self.fwd
        backend = proto.backend
        host, port = backend.sockaddr
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().create_connection(lambda: proto, host, port)
        except (OSError, TimeoutError) as exc:
            if proto.made or not proto.live:
                return  # connected just as the timeout hit (connection_lost cleans up)
            proto.live = False
            if isinstance(exc, OSError) and exc.errno in NO_DESCRIPTOR:
                # No socket for any backend: not the backend's fault, and the
                # client must not wait for an idle sweep.
                fwd.refuse("descriptors", _describe(exc))
                self.shutdown()
                return
            log.debug("forward.connect_failed", service=fwd.service.name, backend=backend.key,
                      error=_describe(exc))
            self.feed(CONNECT_TIMEOUT if isinstance(exc, TimeoutError)
                      else ConnectFailed(_describe(exc)))
        except Exception as exc:  # a bug must not leave a half-open connection
            log.error("forward.connect_error", service=fwd.service.name, error=_describe(exc))
            self.shutdown()

    def connect_done(self, task: asyncio.Task[None]) -> None:
        if self.connecting is task:
            self.connecting = None
        self._maybe_finish()

    # -- backend transport callbacks (via _Upstream) -------------------------

    def upstream_made(self, proto: _Upstream, transport: asyncio.Transport) -> bool:
        """Take the backend transport; False if it was aborted at once."""
        self.open_transports += 1
        if not proto.live:
            transport.abort()  # the connection closed while this attempt ran
            return False
        self.upstream = transport
        _tune(transport, keepalive=False)
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        self.feed(CONNECTED)
        return True

    def upstream_data(self, data: bytes) -> None:
        client, machine = self.client, self.machine
        if machine.replaying:
            self.feed(BACKEND_FIRST_BYTE)
        if client is None or client.is_closing():
            return
        client.write(data)
        backend = machine.backend
        assert backend is not None
        backend.bytes_out += len(data)
        self.traffic = True

    def upstream_eof(self) -> None:
        self.traffic = True
        self.feed(BACKEND_EOF)

    def upstream_pause_writing(self) -> None:
        # The backend reads slower than the client sends.
        machine = self.machine
        if self.client is not None and not machine.client_eof and not machine.closed:
            self.client.pause_reading()

    def upstream_resume_writing(self) -> None:
        machine = self.machine
        if self.client is not None and not machine.client_eof and not machine.closed:
            self.client.resume_reading()

    def upstream_lost(self, proto: _Upstream, exc: Exception | None) -> None:
        self.open_transports -= 1
        if proto.live:
            proto.live = False
            backend = proto.backend
            if exc is None:
                self.feed(BACKEND_CLOSED)
            elif isinstance(exc, OSError) and exc.errno in RESET_ERRNOS:
                self.feed(BACKEND_RESET)
                if self.machine.phase is Phase.CONNECTING:
                    log.debug("forward.redispatch", service=self.fwd.service.name,
                              backend=backend.key, client=self.client_name)
            else:
                self.feed(BACKEND_ERROR)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.open_transports == 0 and self.connecting is None and not self.finished:
            self.finished = True
            self.fwd._unregister(self)


class _Upstream(asyncio.Protocol):
    """Backend side of one proxied connection (one attempt): forwards every
    event to its relay while it is the relay's current attempt (``live``)."""

    __slots__ = ("relay", "backend", "live", "made", "lost")

    def __init__(self, relay: _Relay, backend: Backend) -> None:
        self.relay = relay
        self.backend = backend
        self.live = True
        """The relay's current attempt or connection; False once ended."""
        self.made = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        if not self.relay.upstream_made(self, cast(asyncio.Transport, transport)):
            # The connection ended while this connect completed: upstream_made
            # aborted it at once. uvloop may then never call connection_lost
            # (the connect task was cancelled meanwhile), so account for it
            # here; a later call is ignored.
            self.connection_lost(None)

    def data_received(self, data: bytes) -> None:
        if self.live:
            self.relay.upstream_data(data)

    def eof_received(self) -> bool:
        if self.live:
            self.relay.upstream_eof()
        return True

    def pause_writing(self) -> None:
        if self.live:
            self.relay.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.live:
            self.relay.upstream_resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.relay.upstream_lost(self, exc)


_LIVE = frozenset({Phase.CONNECTING, Phase.RELAYING})


def _close(transport: asyncio.Transport | None, reset: bool) -> None:
    if transport is None:
        return
    if reset:
        transport.abort()
    elif not transport.is_closing():
        transport.close()


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

