"""The relay engine: TCP forwarding on a dedicated epoll loop in its own thread.

asyncio's per-connection machinery (transports, protocols, futures, a task
for the connect phase) costs more CPU per short connection than the bytes
do. This engine moves bytes with plain non-blocking sockets on one
``select.epoll`` loop, beside the node's asyncio control plane, and with
zero-copy ``os.splice`` through a pipe where the platform has it (Linux):
the bytes never enter user space. One ``RelayLoop`` serves every TCP service
of a node; each service gets a ``RelayForwarder`` facade with the surface of
``anycast_lb.forward.Forwarder``.

Life of a connection (the same rules as ``tcp.TcpForwarder``)::

    accept -> pool.candidates(...) -> non-blocking connect to the first,
        each candidate within service.connect_timeout s, a refusal or timeout
        moves to the next (backend.connect_failures)
    connected -> [PROXY v2 header] -> relaying both ways
    EOF from one side -> shutdown(SHUT_WR) on the other once its bytes are
        written (half-close); both directions done -> both sockets closed
    reset or error on either side -> both sides reset (SO_LINGER 0)

Redispatch: until the backend's first byte, client bytes are copied through
user space and kept (at most ``REPLAY_LIMIT`` bytes); if the backend resets
the connection before answering, the relay connects to the next candidate
and replays them. After that first byte the client direction switches to
splice.

Backpressure: each direction moves at most ``buffer_size`` bytes at a time;
while they cannot all be written, the relay stops reading the source (its
epoll interest drops EPOLLIN and waits EPOLLOUT on the destination). Per
direction at most one pipe (or one user buffer) of ``buffer_size`` bytes is
held; the rest of a backlog stays in the kernel's socket buffers and the
sender's TCP window. An idle connection holds no pipe: pipes come from a
small pool and return to it once empty.

Timeouts: ``connect_timeout`` per candidate; an idle sweep per service every
idle_timeout/8 s aborts connections without a byte either way for
idle_timeout to idle_timeout * 9/8 s.

Threading: the loop thread owns every socket and every ``_Conn``. Other
threads talk to it only through ``RelayLoop.call_soon`` (a deque and an
eventfd). Counters are plain ints written by the loop thread and read by
the control plane (the GIL makes each read whole).

Load shedding (docs/limits.md): the loop's ``slots`` cap the proxied
connections of the process over all its services (``max_connections``,
from the descriptor budget). Past the cap a new connection is accepted and
reset at once (SO_LINGER 0) and counted, rather than left in the listen
backlog: the client learns at once instead of after its own timeout, no
stale handshake is served late, and each refusal is counted. A backend
socket that cannot be opened (EMFILE, ENFILE) resets the client at once,
counted as ``descriptors``. Splice pipes are capped too (``max_pipes``);
without one a direction copies through user space.

Per source: each client source (address or prefix:
``max_connections_per_source``, ``tcp_source_prefix_v4/v6``) may hold a
share of the cap; past it a new connection is reset the same way, counted
as ``source_cap``. The slot and the source's count are taken in
``RelayForwarder.accept`` and given back once, in
``RelayForwarder.closed`` (from ``_Conn.close``).

Accept back-off: when accept() fails for want of descriptors or memory
(EMFILE, ENFILE, ENOBUFS, ENOMEM) the listener is paused (its epoll
interest cleared, so the level-triggered loop does not spin) until a
connection of this loop closes or a timer of ACCEPT_BACKOFF_MIN_S to
ACCEPT_BACKOFF_MAX_S (doubling) fires; log lines are rate-limited to one
per second per event with a ``suppressed`` count.

Flow hooks (flow survival): ``on_flow(True, key)`` when a client connection
is accepted, ``on_flow(False, key)`` when it is closed, called on the loop
thread; ``key`` is (client address, client port, VIP, VIP port).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import heapq
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from anycast_lb import log
from anycast_lb.config import ForwardingConfig, ServiceConfig, format_host_port
from anycast_lb.errors import BindError
from anycast_lb.flows import FlowHook, FlowKey
from anycast_lb.forward.proxy_protocol import v2_header
from anycast_lb.forward.tcp import (
    ACCEPT_BACKOFF_MAX_S,
    ACCEPT_BACKOFF_MIN_S,
    BACKLOG,
    OUT_OF_RESOURCES,
    REPLAY_LIMIT,
    SWEEPS_PER_IDLE_TIMEOUT,
)
from anycast_lb.limits import Refusals, Slots
from anycast_lb.pool import Backend, Pool


START_TIMEOUT = 10.0
"""Seconds ``RelayForwarder.start()`` waits for the loop thread to bind."""
ACCEPT_BATCH = 64
"""Connections accepted per listener wake-up before other sockets get a turn."""
PIPE_POOL = 256
"""Empty pipes kept for reuse (2 fds each)."""
BURST = 8
"""Reads per direction per wake-up while each fills the buffer."""
COPY_READ = 65536
"""Largest read through user space (bytes): bigger recv() buffers go to
mmap and back on every call."""
CONNECT_SWEEP_S = 0.02
"""Resolution of connect timeouts (s): an attempt fails 0-20 ms after its
connect_timeout."""
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 30_000
"""TCP_USER_TIMEOUT on client sockets: unacknowledged data for this long
resets the connection (a client that vanished; flow survival's stale-socket
trap)."""

HAVE_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_MOVE")
HAVE_EPOLL = hasattr(select, "epoll")

_IN = select.EPOLLIN if HAVE_EPOLL else 1
_OUT = select.EPOLLOUT if HAVE_EPOLL else 4
_ERR = (select.EPOLLERR | select.EPOLLHUP) if HAVE_EPOLL else 24
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if HAVE_SPLICE else 0
_F_SETPIPE_SZ = 1031
_LINGER_RESET = struct.pack("ii", 1, 0)
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
Sock = _socket.socket
"""Connection sockets are the C ``_socket.socket`` objects: the
``socket.socket`` subclass adds Python-level wrappers (an enum conversion
at accept, ``close``) that cost about 5 % of the relay's time on short
connections (py-spy)."""
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})


class _Timer:
    __slots__ = ("when", "fn")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn

    def __lt__(self, other: _Timer) -> bool:
        return self.when < other.when


class RelayLoop:
    """One epoll loop in a daemon thread, shared by a node's relay services.

    ``start()`` starts the thread; ``stop()`` resets every connection, closes
    every socket and joins it. Raises OSError (no epoll) from the
    constructor on platforms without epoll; use the asyncio engine there.
    """

    def __init__(self, settings: ForwardingConfig | None = None, *,
                 max_connections: int | None = None,
                 max_connections_per_source: int | None = None,
                 max_pipes: int | None = None) -> None:
        settings = settings or ForwardingConfig()
        self.buffer_size = settings.buffer_size
        self.splice = settings.splice and HAVE_SPLICE
        self.slots = Slots(max_connections, max_connections_per_source,
                           prefix_v4=settings.tcp_source_prefix_v4,
                           prefix_v6=settings.tcp_source_prefix_v6)
        """Proxied connections of every service on this loop, against the
        cap and each source's share (None: not capped)."""
        self.max_pipes = max_pipes
        self.pipes_open = 0
        """Pipes in existence (pooled or in use); at most ``max_pipes``."""
        self.paused: list[_Listener] = []
        """Listeners paused by an accept error, resumed when a connection closes."""
        self.shed_log = log.RateLimitedLog(1.0, time.monotonic)
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._handlers: dict[int, Callable[[int], None]] = {self._wake: self._drain_wake}
        self._epoll.register(self._wake, _IN)
        self._calls: deque[Callable[[], None]] = deque()
        self._timers: list[_Timer] = []
        self._pipes: list[tuple[int, int]] = []
        self._doomed: list[Sock] = []
        self.listeners: dict[tuple[str, int], _Listener] = {}
        """Wildcard listeners by bound (address, port), shared by services."""
        self._thread: threading.Thread | None = None
        self._running = False
        self._closed = False
        # One lock covers "closed?", enqueue, wake-up and the close of the
        # eventfd: without it a caller could queue, lose the CPU, and write
        # to an eventfd number that the loop thread closed (and the kernel
        # reused) meanwhile.
        self._wake_lock = threading.Lock()
        self.now = time.monotonic()

    # -- any thread ----------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread. Raises RuntimeError if already started."""
        if self._thread is not None:
            raise RuntimeError("relay loop already started")
        self._running = True
        self._thread = threading.Thread(target=self._run, name="anycast-lb-relay", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """True once ``stop()`` has closed the loop's descriptors."""
        return self._closed

    def call_soon(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the loop thread, soon. Safe from any thread.

        Returns False, and drops ``fn``, once the loop is closed.
        """
        with self._wake_lock:
            if self._closed:
                return False
            self._calls.append(fn)
            try:
                os.eventfd_write(self._wake, 1)
            except BlockingIOError:
                pass  # the counter is saturated: a wake-up is pending anyway
            return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop thread (resetting every connection, closing every
        socket), join it, then close the epoll and eventfd descriptors.

        The descriptors are closed here, by the caller, only after the loop
        thread has returned, so no thread can poll or wake a closed (and
        perhaps reused) descriptor number. If the thread does not stop
        within ``timeout`` s (a handler stuck in a system call) they are left
        open: a leak at shutdown beats a write into another file. Idempotent.
        """
        thread = self._thread
        if thread is not None:
            self.call_soon(self._halt)
            thread.join(timeout)
            if thread.is_alive():
                log.error("forward.relay_stop_timeout", timeout=timeout)
                return
            self._thread = None
        self._close_fds()

    # -- loop thread ---------------------------------------------------------

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Timer:
        timer = _Timer(self.now + delay, fn)
        heapq.heappush(self._timers, timer)
        return timer

    def register(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self._handlers[fd] = handler
        self._epoll.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self._epoll.modify(fd, mask)

    def forget(self, fd: int) -> None:
        """Drop ``fd``'s handler; the caller closes the fd (which removes it
        from the epoll set)."""
        self._handlers.pop(fd, None)

    def acquire_pipe(self) -> tuple[int, int] | None:
        """A pipe from the pool or a new one; None at ``max_pipes`` or when
        the process is out of descriptors (the caller copies instead)."""
        if self._pipes:
            return self._pipes.pop()
        if self.max_pipes is not None and self.pipes_open >= self.max_pipes:
            return None
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                return None
            raise
        self.pipes_open += 1
        if self.buffer_size != 65536:
            import fcntl

            try:
                fcntl.fcntl(w, _F_SETPIPE_SZ, self.buffer_size)
            except OSError:
                pass  # above fs.pipe-max-size: the default size still works
        return r, w

    def release_pipe(self, pipe: tuple[int, int], empty: bool) -> None:
        """Return a pipe; one holding bytes (a connection reset mid-copy) is
        closed, never reused, so no byte crosses to another connection."""
        if empty and len(self._pipes) < PIPE_POOL:
            self._pipes.append(pipe)
            return
        os.close(pipe[0])
        os.close(pipe[1])
        self.pipes_open -= 1

    def resume_listeners(self) -> None:
        """Descriptors were freed: let paused listeners accept again."""
        paused, self.paused = self.paused, []
        for listener in paused:
            listener.resume()

    def _run(self) -> None:
        poll = self._epoll.poll
        handlers = self._handlers
        timers = self._timers
        calls = self._calls
        while self._running:
            if calls:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0].when - time.monotonic())
            else:
                timeout = 1.0
            try:
                events = poll(timeout)
            except InterruptedError:
                continue
            self.now = now = time.monotonic()
            for fd, ev in events:
                handler = handlers.get(fd)
                if handler is not None:
                    try:
                        handler(ev)
                    except Exception as exc:  # a bug must not stop every connection
                        log.error("forward.relay_error", error=repr(exc), where=_where(exc))
            while calls:
                fn = calls.popleft()
                try:
                    fn()
                except Exception as exc:
                    log.error("forward.relay_error", error=repr(exc), where=_where(exc))
            while timers and timers[0].when <= now:
                timer = heapq.heappop(timers)
                try:
                    timer.fn()
                except Exception as exc:
                    log.error("forward.relay_error", error=repr(exc), where=_where(exc))
            if self._doomed:
                self._close_doomed()
        # The thread that calls stop() closes the descriptors once this
        # thread has returned.

    def doom(self, sock: Sock) -> None:
        """Close ``sock`` after this batch of events: closing it now would
        free its fd number for a socket accepted later in the same batch,
        which would then receive the stale events meant for this one."""
        self._doomed.append(sock)

    def _close_doomed(self) -> None:
        doomed, self._doomed = self._doomed, []
        for sock in doomed:
            sock.close()

    def _drain_wake(self, ev: int) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass

    def _halt(self) -> None:
        for handler in list(self._handlers.values()):
            owner = getattr(handler, "__self__", None)
            if isinstance(owner, _Conn):
                owner.close(reset=True)
            elif isinstance(owner, _Listener):
                owner.close()
        self._running = False

    def _close_fds(self) -> None:
        """Close what the loop held; only with the loop thread stopped."""
        with self._wake_lock:
            if self._closed:
                return
            self._closed = True
            self._calls.clear()
            os.close(self._wake)
        for r, w in self._pipes:
            os.close(r)
            os.close(w)
        self._pipes.clear()
        self._close_doomed()
        self._epoll.close()


class _Listener:
    """A listening socket and the services it dispatches to by local address.

    Bound to one VIP:port, it serves one service. Bound to the wildcard
    address (flow survival), it serves every service on that port and
    dispatches by the accepted connection's local address; a connection to
    a local address that is no configured VIP is reset.
    """

    def __init__(self, loop: RelayLoop, sock: socket.socket, wildcard: bool) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.wildcard = wildcard
        self.services: dict[str, RelayForwarder] = {}
        self.only: RelayForwarder | None = None
        bound = sock.getsockname()
        self.local = (str(bound[0]), int(bound[1]))
        self.is_paused = False
        self.closed = False
        self.backoff = ACCEPT_BACKOFF_MIN_S

    def add(self, fwd: RelayForwarder) -> None:
        self.services[fwd.vip[0]] = fwd
        self.only = None if self.wildcard else fwd

    def on_event(self, ev: int) -> None:
        # The C accept under socket.accept (stable since Python 3.3): it
        # returns the fd, and Sock() wraps it without the enum conversions.
        accept = self.sock._accept  # type: ignore[attr-defined]
        family = int(self.sock.family)
        loop = self.loop
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = accept()
                sock = Sock(family, socket.SOCK_STREAM, 0, fd)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    return  # shut down by stop_accepting; closed on the loop thread next
                if exc.errno in OUT_OF_RESOURCES:
                    self.pause(exc)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            self.backoff = ACCEPT_BACKOFF_MIN_S
            fwd = self.only
            local = self.local
            if fwd is None:
                try:
                    local = sock.getsockname()
                except OSError:
                    loop.doom(sock)
                    continue
                fwd = self.services.get(local[0])
                if fwd is None or not fwd.accepting:
                    _linger_reset(sock)
                    loop.doom(sock)
                    continue
            fwd.accept(loop, sock, peer, local)

    def pause(self, exc: OSError) -> None:
        """Stop polling the listener (level-triggered epoll would report the
        waiting connection again at once) until a connection of the loop
        closes or the back-off timer fires."""
        if self.is_paused or self.closed:
            return
        self.is_paused = True
        loop = self.loop
        loop.modify(self.fd, 0)
        loop.paused.append(self)
        loop.call_later(self.backoff, self.resume)
        names = ",".join(sorted(f.name for f in self.services.values()))
        for fwd in self.services.values():
            fwd.refusals.accept_pauses += 1
        loop.shed_log("forward.accept_paused", key=names, service=names,
                      error=exc.strerror or repr(exc), backoff_ms=round(self.backoff * 1000))
        self.backoff = min(self.backoff * 2, ACCEPT_BACKOFF_MAX_S)

    def resume(self) -> None:
        if not self.is_paused or self.closed:
            return
        self.is_paused = False
        self.loop.modify(self.fd, _IN)

    def close(self) -> None:
        self.closed = True
        self.loop.forget(self.fd)
        self.loop.doom(self.sock)


class _Dir:
    """One direction of a connection: bytes from ``src`` to ``dst``."""

    __slots__ = ("src", "dst", "sfd", "dfd", "pipe", "pending", "buf", "eof", "shut", "copy")

    def __init__(self, src: Sock, dst: Sock, copy: bool) -> None:
        self.src = src
        self.dst = dst
        self.sfd = src.fileno()
        self.dfd = dst.fileno()
        self.pipe: tuple[int, int] | None = None
        self.pending = 0
        """Bytes read from src and not yet written to dst."""
        self.buf: memoryview | None = None
        """Copy mode: the unwritten bytes."""
        self.eof = False
        self.shut = False
        self.copy = copy


class _Conn:
    """One proxied connection, owned by the loop thread."""

    __slots__ = (
        "loop", "fwd", "client", "cfd", "peer", "local", "key", "backend", "bsock", "bfd",
        "candidates", "up", "down", "replay", "replay_len", "answered", "closed",
        "cmask", "bmask", "idle", "pre", "creg",
    )

    def __init__(self, loop: RelayLoop, fwd: RelayForwarder, client: Sock,
                 peer: tuple[str, int], local: tuple[str, int]) -> None:
        self.loop = loop
        self.fwd = fwd
        self.client = client
        self.cfd = client.fileno()
        self.peer = peer
        self.local = local
        self.key: FlowKey = (peer[0], peer[1], local[0], local[1])
        self.backend: Backend | None = None
        self.bsock: Sock | None = None
        self.bfd = -1
        self.candidates: list[Backend] = []
        self.up: _Dir | None = None
        """Client to backend."""
        self.down: _Dir | None = None
        """Backend to client."""
        self.replay: list[bytes] | None = []
        self.replay_len = 0
        self.answered = False
        self.closed = False
        self.cmask = 0
        self.bmask = 0
        self.creg = False
        self.idle = 0
        self.pre = b""
        """Bytes to send the backend before the client's (PROXY header, replay)."""

    # -- connect phase ------------------------------------------------------

    def connect_next(self) -> None:
        fwd = self.fwd
        while self.candidates:
            backend = self.candidates.pop(0)
            family, address = fwd.sockaddr(backend)
            try:
                sock = Sock(family, _STREAM_NONBLOCK)
            except OSError as exc:
                # Out of descriptors: no other candidate would fare better,
                # and the client must not wait for an idle sweep.
                fwd.refuse("descriptors", exc.strerror or repr(exc))
                self.close(reset=True)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(address)
            if err not in (0, errno.EINPROGRESS):
                self.loop.doom(sock)
                backend.connect_failures += 1
                log.debug("forward.connect_failed", service=fwd.name, backend=backend.key,
                          error=os.strerror(err))
                continue
            self.bsock = sock
            self.bfd = sock.fileno()
            self.backend = backend
            self.bmask = _OUT
            self.loop.register(self.bfd, _OUT, self.backend_event)
            fwd.connecting[self] = self.loop.now + fwd.connect_timeout
            return
        fwd.rejected_connect_failed += 1
        log.debug("forward.all_backends_failed", service=fwd.name, client=self.client_name)
        self.close(reset=True)

    def connect_timeout(self) -> None:
        if self.up is not None or self.closed:
            return
        self._connect_failed("timeout")

    def _connect_failed(self, reason: str) -> None:
        backend, sock = self.backend, self.bsock
        assert backend is not None and sock is not None
        backend.connect_failures += 1
        log.debug("forward.connect_failed", service=self.fwd.name, backend=backend.key,
                  error=reason)
        self.loop.forget(self.bfd)
        self.loop.doom(sock)
        self.bsock, self.bfd, self.backend = None, -1, None
        self.fwd.connecting.pop(self, None)
        self.connect_next()

    def connected(self) -> None:
        backend, bsock = self.backend, self.bsock
        assert backend is not None and bsock is not None
        del self.fwd.connecting[self]
        backend.active_connections += 1
        backend.connections_total += 1
        splice = self.loop.splice
        # Client bytes go through user space until the backend answers (a
        # copy is kept for a redispatch); the backend's always splice.
        self.up = _Dir(self.client, bsock, copy=True)
        self.down = _Dir(bsock, self.client, copy=not splice)
        if self.fwd.proxy_protocol and not self.pre:
            self.pre = v2_header(self.peer, self.local, "tcp")  # first attempt
        up = self.up
        if self.pre:
            up.buf = memoryview(self.pre)
            up.pending = len(self.pre)
            self.pre = b""
            self.flush(up)
            if self.closed or self.up is not up:
                return  # reset (closed, or redispatched to the next candidate)
        if not self.creg:
            self.creg = True
            self.cmask = _IN
            self.loop.register(self.cfd, _IN, self.client_event)
        if not up.pending:
            # Clients usually speak first and their bytes are waiting by
            # now: read them without another trip through epoll.
            self.pump(up)
            if self.closed or self.up is not up:
                return
        self.update()

    # -- events -------------------------------------------------------------

    def client_event(self, ev: int) -> None:
        if self.up is not None and self.down is not None:
            self._serve(ev, writes=self.down, reads=self.up)

    def backend_event(self, ev: int) -> None:
        if self.up is None or self.down is None:
            # Connecting: EPOLLOUT (or an error) ends the attempt.
            # Linux reports a failed connect as EPOLLERR (with EPOLLOUT);
            # SO_ERROR is read only then.
            sock = self.bsock
            assert sock is not None
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if ev & _ERR else 0
            if err or ev & _ERR:
                self._connect_failed(os.strerror(err) if err else "hang-up")
            else:
                self.connected()
            return
        self._serve(ev, writes=self.up, reads=self.down)

    def _serve(self, ev: int, writes: _Dir, reads: _Dir) -> None:
        """One socket's epoll event: ``writes`` is the direction whose
        destination the socket is, ``reads`` the one it is the source of."""
        up = self.up
        if ev & _OUT or (ev & _ERR and writes.pending):
            self.flush(writes)
            if self.closed or self.up is not up:
                return  # reset, or redispatched: the old directions are gone
        if ev & (_IN | _ERR) and not reads.eof and not reads.pending:
            self.pump(reads)
            if self.closed or self.up is not up:
                return
        if ev & _ERR and not ev & (_IN | _OUT):
            # An error or hang-up with nothing left to read or write (level-
            # triggered epoll would report it forever): the socket is dead;
            # reset the other.
            self.close(reset=True)
        else:
            self.update()

    # -- moving bytes -------------------------------------------------------

    def pump(self, d: _Dir) -> None:
        """Read from d.src and write to d.dst, while reads fill the buffer
        and writes complete, at most ``BURST`` reads: a bulk transfer moves
        up to BURST * buffer_size bytes per wake-up instead of one read."""
        size = self.loop.buffer_size
        for _ in range(BURST):
            copy = d.copy
            if not copy and d.pipe is None:
                d.pipe = self.loop.acquire_pipe()
                copy = d.pipe is None  # no pipe to spare: copy this read
            try:
                if copy:
                    data = d.src.recv(min(size, COPY_READ))
                    n = len(data)
                    if n:
                        d.buf = memoryview(data)
                        if d is self.up and self.replay is not None:
                            self.replay.append(data)
                            self.replay_len += n
                            if self.replay_len > REPLAY_LIMIT:
                                # Past the limit there is no redispatch: no
                                # reason to keep copying (a client that
                                # uploads while the backend stays silent).
                                self.replay = None
                                d.copy = not self.loop.splice
                else:
                    assert d.pipe is not None
                    n = os.splice(d.sfd, d.pipe[1], size, None, None, _SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                if d.pipe is not None and not d.pending:
                    self.loop.release_pipe(d.pipe, True)
                    d.pipe = None
                return
            except OSError as exc:
                self.fail(d, exc)
                return
            self.idle = 0
            if n == 0:
                d.eof = True
                if d.pipe is not None:
                    self.loop.release_pipe(d.pipe, True)
                    d.pipe = None
                self.finish_dir(d)
                return
            d.pending = n
            backend = self.backend
            assert backend is not None
            if d is self.up:
                backend.bytes_in += n
            else:
                backend.bytes_out += n
                if not self.answered:
                    self.answered = True
                    self.replay = None
                    if self.loop.splice:
                        self.up.copy = False  # type: ignore[union-attr]
            self.flush(d)
            if (d.pending or self.closed or (d is not self.up and d is not self.down)
                    or n < (size if not copy else min(size, COPY_READ))):
                return

    def flush(self, d: _Dir) -> None:
        try:
            while d.pending:
                if d.buf is not None:
                    n = d.dst.send(d.buf)
                    d.buf = d.buf[n:] if n < len(d.buf) else None
                else:
                    assert d.pipe is not None
                    n = os.splice(d.pipe[0], d.dfd, d.pending, None, None, _SPLICE_FLAGS)
                d.pending -= n
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(d, exc, writing=True)
            return
        if d.pipe is not None:
            self.loop.release_pipe(d.pipe, True)
            d.pipe = None
        if d.eof:
            self.finish_dir(d)

    def finish_dir(self, d: _Dir) -> None:
        """Source said EOF and everything is written: half-close the other side."""
        if d.shut or d.pending:
            return
        d.shut = True
        other = self.down if d is self.up else self.up
        if other is not None and other.shut:
            # Both directions done: close() sends the FIN; a shutdown first
            # would be one more system call per connection.
            self.close(reset=False)
            return
        try:
            d.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone: the other direction reports it
        if d is self.down and not self.answered:
            self.answered = True
            self.replay = None
        up, down = self.up, self.down
        if up is not None and down is not None and up.shut and down.shut:
            self.close(reset=False)

    def fail(self, d: _Dir, exc: OSError, writing: bool = False) -> None:
        """A socket error: redispatch (backend reset before answering) or reset both."""
        backend_side = (d is self.up) == writing
        if (backend_side and exc.errno in _RESET_ERRNOS and self.replay is not None
                and not self.answered and self.candidates and not self.closed):
            self.redispatch()
            return
        if exc.errno not in _RESET_ERRNOS:
            log.debug("forward.socket_error", service=self.fwd.name, client=self.client_name,
                      error=exc.strerror or repr(exc))
        self.close(reset=True)

    def redispatch(self) -> None:
        backend, bsock = self.backend, self.bsock
        assert backend is not None and bsock is not None and self.replay is not None
        backend.connect_failures += 1
        backend.active_connections -= 1
        log.debug("forward.redispatch", service=self.fwd.name, backend=backend.key,
                  client=self.client_name)
        for d in (self.up, self.down):
            if d is not None and d.pipe is not None:
                self.loop.release_pipe(d.pipe, d.pending == 0)
                d.pipe = None
        # The copy holds every client byte read so far, sent or not. It stays
        # the copy: the next backend may reset before answering too.
        replay = b"".join(self.replay)
        self.replay = [replay] if replay else []
        header = v2_header(self.peer, self.local, "tcp") if self.fwd.proxy_protocol else b""
        self.pre = header + replay
        self.loop.forget(self.bfd)
        self.loop.doom(bsock)
        self.bsock, self.bfd, self.backend = None, -1, None
        self.up = self.down = None
        # Stop reading the client until the next backend is connected.
        if self.creg and self.cmask:
            self.cmask = 0
            self.loop.modify(self.cfd, 0)
        self.connect_next()

    def update(self) -> None:
        """Set each socket's epoll interest from the directions' state."""
        up, down = self.up, self.down
        if up is None or down is None:
            return
        cmask = (_IN if not up.eof and not up.pending else 0) | (_OUT if down.pending else 0)
        bmask = (_IN if not down.eof and not down.pending else 0) | (_OUT if up.pending else 0)
        if cmask != self.cmask:
            self.cmask = cmask
            self.loop.modify(self.cfd, cmask)
        if bmask != self.bmask:
            self.bmask = bmask
            self.loop.modify(self.bfd, bmask)

    # -- teardown -----------------------------------------------------------

    @property
    def client_name(self) -> str:
        return format_host_port(*self.peer)

    def close(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.loop
        if self.up is None:
            self.fwd.connecting.pop(self, None)
        for d in (self.up, self.down):
            if d is not None and d.pipe is not None:
                loop.release_pipe(d.pipe, d.pending == 0)
                d.pipe = None
        loop.forget(self.cfd)
        if reset:
            _linger_reset(self.client)
        loop.doom(self.client)
        if self.bsock is not None:
            loop.forget(self.bfd)
            if reset:
                _linger_reset(self.bsock)
            loop.doom(self.bsock)
            if self.up is not None and self.backend is not None:
                self.backend.active_connections -= 1
        self.fwd.closed(self)


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame of ``exc``, for a bug report."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"


def _linger_reset(sock: Sock) -> None:
    """Make the coming close send a reset (SO_LINGER 0), not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


class RelayForwarder:
    """A TCP service on a ``RelayLoop``: the ``Forwarder`` surface.

    ``bind_host`` / ``bind_port`` override the address bound (tests bind
    127.0.0.1 port 0); backend choice still hashes the service's VIP and
    port. ``wildcard=True`` binds the wildcard address of the VIP's family
    on the service port (shared with the other services on that port) and
    dispatches by local address: the flow-survival ownership test needs
    accepted sockets bound to the VIP and the listener to the wildcard
    (docs/cluster.md). ``on_flow`` is called on the loop thread (see the
    module docstring). ``reuse_port`` sets SO_REUSEPORT so that worker
    processes can each listen on the same address.

    Counters: ``accepted``, ``rejected_no_backend``, ``rejected_connect_failed``,
    ``refusals`` (shed load: ``refused()`` has every reason); per backend
    the pool's ``Backend`` counters.
    """

    def __init__(
        self,
        service: ServiceConfig,
        pool: Pool,
        loop: RelayLoop,
        bind_host: str | None = None,
        bind_port: int | None = None,
        *,
        wildcard: bool = False,
        on_flow: FlowHook | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.service = service
        self.reuse_port = reuse_port
        self.pool = pool
        self.loop = loop
        self.name = service.name
        self.connect_timeout = service.connect_timeout
        self.proxy_protocol = service.proxy_protocol
        self.wildcard = wildcard
        self.on_flow = on_flow
        self.vip = (str(service.vip), service.port)
        if wildcard:
            host = "::" if service.vip.version == 6 else "0.0.0.0"
        else:
            host = bind_host if bind_host is not None else self.vip[0]
        self._bind = (host, bind_port if bind_port is not None else service.port)
        self._listener: _Listener | None = None
        self.accepting = False
        self._conns: set[_Conn] = set()
        self._by_flow: dict[FlowKey, _Conn] = {}
        self._idle_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._sweep_interval = service.effective_idle_timeout / SWEEPS_PER_IDLE_TIMEOUT
        self._sweep_timer: _Timer | None = None
        self.connecting: dict[_Conn, float] = {}
        """Connections waiting for their backend, and the monotonic deadline
        (s) of the attempt: swept every CONNECT_SWEEP_S (no timer per
        connection)."""
        self._connect_sweep: _Timer | None = None
        self._sockaddrs: dict[int, tuple[socket.AddressFamily, tuple[str, int]]] = {}
        self.accepted = 0
        self.rejected_no_backend = 0
        self.rejected_connect_failed = 0
        self.refusals = Refusals()

    @property
    def listening(self) -> bool:
        return self.accepting

    def refused(self) -> dict[str, int]:
        """Connections refused so far, by reason (``limits.REFUSAL_REASONS``)."""
        return self.refusals.by_reason(no_backend=self.rejected_no_backend,
                                       connect_failed=self.rejected_connect_failed)

    def refuse(self, reason: str, detail: str = "") -> None:
        """Loop thread: count a refused connection and log it, rate-limited."""
        self.refusals.count(reason)
        self.loop.shed_log("forward.refused", key=f"{self.name}/{reason}", service=self.name,
                           protocol="tcp", reason=reason, **({"error": detail} if detail else {}))

    @property
    def active(self) -> int:
        return len(self._conns)

    @property
    def rejected(self) -> int:
        return self.rejected_no_backend + self.rejected_connect_failed

    async def start(self) -> tuple[str, int]:
        """Bind and listen; returns the bound (address, port).

        Listening sockets carry SO_KEEPALIVE (idle 10 s, interval 5 s, 3
        probes), TCP_USER_TIMEOUT 30 s and TCP_NODELAY, which accepted
        sockets inherit (Linux copies them at accept). Raises BindError
        naming the address, RuntimeError if already started or if the relay
        loop is closed, TimeoutError if the loop thread does not bind within
        ``START_TIMEOUT`` s.
        """
        if self._listener is not None or self.accepting:
            raise RuntimeError("forwarder already started")
        self._aloop = asyncio.get_running_loop()
        result: asyncio.Future[tuple[str, int]] = self._aloop.create_future()
        aloop = self._aloop

        def bind() -> None:
            try:
                address = self._open()
            except BaseException as exc:
                aloop.call_soon_threadsafe(_settle, result, None, exc)
            else:
                aloop.call_soon_threadsafe(_settle, result, address, None)

        if not self.loop.call_soon(bind):
            raise RuntimeError(f"service {self.name}: the relay loop is closed")
        async with asyncio.timeout(START_TIMEOUT):
            address = await result
        log.event("forward.listen", service=self.name, protocol="tcp", engine="relay",
                  address=format_host_port(*address))
        return address

    def _open(self) -> tuple[str, int]:
        """Loop thread: bind (or join the shared wildcard listener)."""
        loop = self.loop
        host, port = self._bind
        if self.wildcard and port != 0:
            shared = loop.listeners.get((host, port))
            if shared is not None:
                shared.add(self)
                self._listener = shared
                self.accepting = True
                return host, port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                # Worker processes each bind the same address; the kernel
                # spreads new connections over their listeners.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _tune_listener(sock)
            sock.bind((host, port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise BindError(
                f"service {self.name}: cannot bind tcp "
                f"{format_host_port(host, port)}: {exc.strerror or exc}"
            ) from exc
        listener = _Listener(loop, sock, self.wildcard)
        listener.add(self)
        loop.register(listener.fd, _IN, listener.on_event)
        self._listener = listener
        if self.wildcard:
            loop.listeners[(host, sock.getsockname()[1])] = listener
        self.accepting = True
        bound = sock.getsockname()
        return str(bound[0]), int(bound[1])

    def stop_accepting(self) -> None:
        """Take no new connections; established ones continue."""
        if not self.accepting:
            return
        self.accepting = False
        log.event("forward.stop_accepting", service=self.name, protocol="tcp", active=self.active)
        listener = self._listener
        if listener is not None and set(listener.services.values()) == {self}:
            # Refuse new connections now, not when the loop thread gets to
            # it: shutdown(SHUT_RD) on a listening socket stops it listening
            # (Linux); the loop thread closes it.
            try:
                listener.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        self.loop.call_soon(self._close_listener)

    def _close_listener(self) -> None:
        listener = self._listener
        if listener is None:
            return
        self._listener = None
        listener.services.pop(self.vip[0], None)
        if not listener.services:
            if listener.wildcard:
                shared = self.loop.listeners
                for k, v in list(shared.items()):
                    if v is listener:
                        del shared[k]
            listener.close()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every connection to end; True if none remains."""
        if not self._conns:
            return True
        aloop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = aloop.create_future()
        self._idle_waiters.append((aloop, fut))
        self.loop.call_soon(self._check_idle)  # it may have emptied just now
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            return False
        return True

    def _check_idle(self) -> None:
        if not self._conns:
            self._became_idle()

    def abort_all(self) -> None:
        """Reset every connection of this service."""
        self.loop.call_soon(self._abort_all)

    def _abort_all(self) -> None:
        for conn in list(self._conns):
            conn.close(reset=True)

    def abort_flows(self, keys: Iterable[FlowKey]) -> int:
        """Reset the client connections with these flow keys (flows known to
        be gone: a live peer owns the 4-tuple). Thread-safe; returns how many
        of them this service holds right now."""
        keys = list(keys)
        found = sum(1 for k in keys if k in self._by_flow)
        if found:
            self.loop.call_soon(lambda: self._abort_flows(keys))
        return found

    def _abort_flows(self, keys: list[FlowKey]) -> None:
        for key in keys:
            conn = self._by_flow.get(key)
            if conn is not None:
                log.debug("forward.stale_flow_reset", service=self.name, client=conn.client_name)
                conn.close(reset=True)

    # -- loop thread ---------------------------------------------------------

    def accept(self, loop: RelayLoop, sock: Sock, peer: tuple[str, int],
               local: tuple[str, int]) -> None:
        """Loop thread: take an accepted connection. ``local`` is its local
        (address, port): the VIP, or the overridden bind address in tests;
        backend choice always hashes the service's VIP."""
        sock.setblocking(False)
        if not self.accepting:
            _linger_reset(sock)
            loop.doom(sock)
            return
        refusal = loop.slots.admit(peer[0])
        if refusal is not None:
            # At a cap: reset now. Never registered with epoll, so closing
            # at once cannot confuse this batch's events (see doom).
            _linger_reset(sock)
            sock.close()
            self.refuse(refusal)
            return
        self.accepted += 1
        conn = _Conn(loop, self, sock, (peer[0], peer[1]), (local[0], local[1]))
        candidates = self.pool.candidates(conn.peer, self.vip)
        if not candidates:
            loop.slots.release(peer[0])
            self.rejected_no_backend += 1
            log.debug("forward.no_backend", service=self.name, client=conn.client_name)
            _linger_reset(sock)
            loop.doom(sock)
            return
        if not self._conns:
            self._became_busy()
        self._conns.add(conn)
        if self.on_flow is not None:
            self._by_flow[conn.key] = conn
            self.on_flow(True, conn.key)
        conn.candidates = candidates
        conn.connect_next()

    def closed(self, conn: _Conn) -> None:
        """Loop thread: ``conn`` has closed (called once per connection
        admitted, from ``_Conn.close``): its slot and its source's count
        are given back."""
        loop = self.loop
        loop.slots.release(conn.peer[0])
        if loop.paused:
            loop.resume_listeners()
        self._conns.discard(conn)
        if self.on_flow is not None and self._by_flow.get(conn.key) is conn:
            del self._by_flow[conn.key]
            self.on_flow(False, conn.key)
        if not self._conns:
            self._became_idle()

    def sockaddr(self, backend: Backend) -> tuple[socket.AddressFamily, tuple[str, int]]:
        """The backend's address family and connect() address, cached."""
        cached = self._sockaddrs.get(id(backend))
        if cached is None:
            host, port = backend.sockaddr
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            cached = self._sockaddrs[id(backend)] = (family, (host, port))
        return cached

    def _became_busy(self) -> None:
        if self._sweep_timer is None:
            self._sweep_timer = self.loop.call_later(self._sweep_interval, self._sweep)
        if self._connect_sweep is None:
            self._connect_sweep = self.loop.call_later(CONNECT_SWEEP_S, self._sweep_connects)

    def _sweep_connects(self) -> None:
        self._connect_sweep = None
        now = self.loop.now
        for conn, deadline in list(self.connecting.items()):
            if deadline <= now:
                conn.connect_timeout()
        if self._conns:
            self._connect_sweep = self.loop.call_later(CONNECT_SWEEP_S, self._sweep_connects)

    def _became_idle(self) -> None:
        # Only wake the control plane when someone waits: short connections
        # make this transition once each.
        waiters = self._idle_waiters
        while waiters:
            aloop, fut = waiters.pop()
            if not aloop.is_closed():
                aloop.call_soon_threadsafe(_resolve, fut)

    def _sweep(self) -> None:
        self._sweep_timer = None
        limit = SWEEPS_PER_IDLE_TIMEOUT
        for conn in list(self._conns):
            if conn.up is None:
                continue  # connecting: bounded by connect_timeout per candidate
            conn.idle += 1
            if conn.idle > limit:
                log.debug("forward.idle_timeout", service=self.name, client=conn.client_name)
                conn.close(reset=True)
        if self._conns:
            self._sweep_timer = self.loop.call_later(self._sweep_interval, self._sweep)


def _settle(fut: asyncio.Future[tuple[str, int]], value: tuple[str, int] | None,
            exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        assert value is not None
        fut.set_result(value)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _tune_listener(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
