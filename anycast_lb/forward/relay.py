"""The relay engine: TCP forwarding on a dedicated epoll loop in its own thread.

asyncio's per-connection machinery (transports, protocols, futures, a task
for the connect phase) costs more CPU per short connection than the bytes
do. This engine moves bytes with plain non-blocking sockets on one epoll
loop (``reactor.Reactor``), beside the node's asyncio control plane, and
with zero-copy ``os.splice`` through a pipe for bulk transfers where the
platform has it (Linux): the bytes never enter user space (``pump``; a
direction copies until a read fills the buffer). One ``RelayLoop``
serves every TCP service of a node; each service gets a ``RelayForwarder``
facade with the surface of ``anycast_lb.forward.Forwarder``.

Layout: ``reactor`` (the epoll loop, timers, the pipe pool), ``pump`` (the
byte pump of one connection), this module (listeners, the forwarder, and
``_Conn``, which drives one ``connection.Connection`` machine per client
connection). The rules of a connection (connect retry over the candidates,
redispatch with replay before the backend's first byte, half-close order,
reset versus FIN, idle timeout, counters) are the machine's, shared with
``tcp.TcpForwarder``; ``_Conn`` feeds it the state changes its sockets
report (connected, failures, the first byte, EOFs, resets, idle sweeps,
abort) through its ``on_`` methods and carries out its actions (the
common results matched by identity at their call sites, the rest action by
action in ``_Conn.run``). Bytes do not go through the machine:
only while it keeps a replay copy (until the backend's first byte, at most
``REPLAY_LIMIT`` bytes) are client reads fed to it, through user space;
after that the client direction may switch to splice.

Life of a connection::

    accept -> pool.candidates(...) -> non-blocking connect to the first,
        each candidate within service.connect_timeout s, a refusal or timeout
        moves to the next (backend.connect_failures)
    connected -> [PROXY v2 header] -> relaying both ways
    EOF from one side -> shutdown(SHUT_WR) on the other once its bytes are
        written (half-close); both directions done -> both sockets closed
    reset or error on either side -> both sides reset (SO_LINGER 0)

Timeouts: ``connect_timeout`` per candidate (swept every CONNECT_SWEEP_S);
an idle sweep per service every idle_timeout/8 s aborts connections without
a byte either way for idle_timeout to idle_timeout * 9/8 s.

Threading: the loop thread owns every socket and every ``_Conn``. Other
threads talk to it only through ``RelayLoop.call_soon``. Counters are plain
ints written by the loop thread and read by the control plane (the GIL
makes each read whole).

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
import os
import socket
import struct
import time
from collections.abc import Iterable

from anycast_lb import log
from anycast_lb.config import ForwardingConfig, ServiceConfig, format_host_port
from anycast_lb.errors import BindError, ConnectionStateError
from anycast_lb.flows import FlowHook, FlowKey
from anycast_lb.forward.connection import (
    ABORT,
    BACKEND_ERROR,
    BACKEND_RESET,
    CLIENT_RESET,
    CONNECT_TIMEOUT,
    DO_CONNECT,
    DO_FINISH,
    DO_NOTHING,
    DO_SHUT_BACKEND,
    DO_SHUT_CLIENT,
    DO_START,
    DO_STOP_REPLAY,
    DO_STOP_REPLAY_SHUT_CLIENT,
    RESET_ERRNOS,
    SWEEPS_PER_IDLE_TIMEOUT,
    Action,
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
    StopReplay,
)
from anycast_lb.forward.proxy_protocol import v2_header
from anycast_lb.forward.pump import Direction, Pump, pair
from anycast_lb.forward.reactor import ERR as _ERR
from anycast_lb.forward.reactor import HAVE_EPOLL as HAVE_EPOLL
from anycast_lb.forward.reactor import HAVE_SPLICE as HAVE_SPLICE
from anycast_lb.forward.reactor import IN as _IN
from anycast_lb.forward.reactor import OUT as _OUT
from anycast_lb.forward.reactor import RDHUP as _RDHUP
from anycast_lb.forward.reactor import Reactor, Timer
from anycast_lb.forward.tcp import (
    ACCEPT_BACKOFF_MAX_S,
    ACCEPT_BACKOFF_MIN_S,
    BACKLOG,
    OUT_OF_RESOURCES,
)
from anycast_lb.limits import Refusals, Slots
from anycast_lb.pool import Backend, Pool

START_TIMEOUT = 10.0
"""Seconds ``RelayForwarder.start()`` waits for the loop thread to bind."""
ACCEPT_BATCH = 64
"""Connections accepted per listener wake-up before other sockets get a turn."""
_ACCEPT_BATCH = (None,) * ACCEPT_BATCH
"""``for _ in _ACCEPT_BATCH``: no ``range`` object built per wake-up."""
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

_LINGER_RESET = struct.pack("ii", 1, 0)
_IPPROTO_TCP, _TCP_NODELAY = int(socket.IPPROTO_TCP), int(socket.TCP_NODELAY)
_EINPROGRESS = errno.EINPROGRESS
_SHUT_WR = int(socket.SHUT_WR)
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
_SWEPT_BUSY = IdleSweep(traffic=True)
_SWEPT_QUIET = IdleSweep(traffic=False)
_IN_HUP = _IN | _RDHUP
"""A reading socket's interest: EPOLLRDHUP tells that the peer's FIN is
queued too (see the socket events)."""
_IN_ERR = _IN | _ERR
_RDHUP_ERR = _RDHUP | _ERR
"""What the pump needs of a socket event to know the end without a read
returning 0 (``Pump.pump``'s ``ended``)."""
_IN_OUT = _IN | _OUT
# Enum members as module constants: reading one through its class costs
# about 70 ns on CPython 3.11, several times per connection.
_CLIENT, _BACKEND = Side.CLIENT, Side.BACKEND
_CONNECTING, _RELAYING, _CLOSED = Phase.CONNECTING, Phase.RELAYING, Phase.CLOSED
Sock = _socket.socket
"""Connection sockets are the C ``_socket.socket`` objects: the
``socket.socket`` subclass adds Python-level wrappers (an enum conversion
at accept, ``close``) that cost about 5 % of the relay's time on short
connections (py-spy).

An accepted socket's descriptor stays in blocking mode (Python's accept
cannot ask for SOCK_NONBLOCK, and an ioctl per connection costs a system
call): its object is made with SOCK_NONBLOCK in its type, which gives it a
timeout of 0 (no poll in CPython's calls) without touching the descriptor,
and the pump passes MSG_DONTWAIT to every recv and send and sets
non-blocking mode before it splices (``pump.Socket``). Nothing else reads
or writes a client socket: shutdown, setsockopt and close do not wait (no
SO_LINGER timeout is ever set, only SO_LINGER 0)."""


class RelayLoop(Reactor):
    """The reactor (``reactor.Reactor``: one epoll loop in a daemon thread)
    with what a node's relay services share on it: the connection slots,
    the wildcard listeners, the paused listeners and the shed log.

    ``start()`` starts the thread; ``stop()`` resets every connection, closes
    every socket and joins it. Raises OSError (no epoll) from the
    constructor on platforms without epoll; use the asyncio engine there.
    """

    def __init__(self, settings: ForwardingConfig | None = None, *,
                 max_connections: int | None = None,
                 max_connections_per_source: int | None = None,
                 max_pipes: int | None = None) -> None:
        settings = settings or ForwardingConfig()
        super().__init__(settings.buffer_size, settings.splice, max_pipes)
        self.slots = Slots(max_connections, max_connections_per_source,
                           prefix_v4=settings.tcp_source_prefix_v4,
                           prefix_v6=settings.tcp_source_prefix_v6)
        """Proxied connections of every service on this loop, against the
        cap and each source's share (None: not capped)."""
        self.paused: list[_Listener] = []
        """Listeners paused by an accept error, resumed when a connection closes."""
        self.shed_log = log.RateLimitedLog(1.0, time.monotonic)
        self.listeners: dict[tuple[str, int], _Listener] = {}
        """Wildcard listeners by bound (address, port), shared by services."""

    def resume_listeners(self) -> None:
        """Descriptors were freed: let paused listeners accept again."""
        paused, self.paused = self.paused, []
        for listener in paused:
            listener.resume()


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
        self.family = int(sock.family)
        """As an int: ``socket.family`` converts to the enum on every read."""
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
        family = self.family
        loop = self.loop
        for _ in _ACCEPT_BATCH:
            try:
                fd, peer = accept()
                sock = Sock(family, _STREAM_NONBLOCK, 0, fd)
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
            local = self.local  # shared by the listener's connections
            if fwd is None:
                try:
                    bound = sock.getsockname()
                except OSError:
                    loop.doom(sock)
                    continue
                fwd = self.services.get(bound[0])
                if fwd is None or not fwd.accepting:
                    _linger_reset(sock)
                    loop.doom(sock)
                    continue
                local = (bound[0], bound[1])
            if len(peer) != 2:
                peer = (peer[0], peer[1])  # IPv6: without flow info and scope id
            fwd.accept(loop, sock, fd, peer, local)

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

    def halt(self) -> None:
        """The loop is stopping (``reactor.Owner``)."""
        if not self.closed:
            self.close()


class _Conn(Pump):
    """One proxied connection, owned by the loop thread: carries out the
    actions of its ``Connection`` machine; ``Pump`` moves the bytes.

    ``up`` / ``down`` are None while connecting (and reconnecting after a
    redispatch); ``cmask`` / ``bmask`` are the client's and backend's epoll
    interest. After each socket event (and when the pump starts) a socket
    wants EPOLLIN|EPOLLRDHUP while the direction it feeds has neither ended
    nor bytes pending, and EPOLLOUT while the direction it receives has
    bytes pending; epoll is told only of a change. The rule is written out
    where it runs (no helper call: three times per short connection).
    """

    __slots__ = (
        "fwd", "machine", "client", "cfd", "peer", "local", "bsock", "bfd", "cmask", "bmask",
        "creg", "closed",
    )

    def __init__(self, loop: Reactor, fwd: RelayForwarder, client: Sock, cfd: int,
                 peer: tuple[str, int], local: tuple[str, int]) -> None:
        # Pump.__init__, inline (one call less per connection).
        self.loop = loop
        self.up: Direction | None = None
        self.down: Direction | None = None
        self.traffic = False
        self.fwd = fwd
        self.machine: Connection[Backend] = Connection(fwd.rules)
        self.client = client
        self.cfd = cfd
        self.peer = peer
        self.local = local
        self.bsock: Sock | None = None
        """The current attempt's or connection's backend socket."""
        self.bfd = -1
        self.cmask = 0
        self.bmask = 0
        self.creg = False
        """The client socket is registered with the loop."""
        self.closed = False
        """The machine closed and the forwarder was told."""

    @property
    def client_name(self) -> str:
        return format_host_port(*self.peer)

    def flow_key(self) -> FlowKey:
        """The connection's 5-tuple as flow survival keys it (TCP implied):
        built when the forwarder has a flow hook, at accept and at close,
        rather than kept in every connection."""
        peer, local = self.peer, self.local
        return (peer[0], peer[1], local[0], local[1])

    @property
    def backend(self) -> Backend | None:
        return self.machine.backend

    # -- the machine ---------------------------------------------------------

    def feed(self, event: Event[Backend]) -> None:
        """Feed ``event`` to the machine and carry out its actions (the data
        path calls the machine's ``on_`` methods and ``run`` instead)."""
        if self.closed:
            return
        machine = self.machine
        backend = machine.backend  # the event's backend, for the counters
        try:
            actions = machine.handle(event)
        except ConnectionStateError as exc:
            self._bug(exc)
            return
        self.run(actions, backend)

    def _bug(self, exc: ConnectionStateError) -> None:
        """The machine refused an event (an engine bug): a bug must not leave
        a half-open connection."""
        log.error("forward.connection_state", service=self.fwd.name, error=str(exc))
        self._teardown()

    def run(self, actions: tuple[Action, ...], backend: Backend | None) -> None:
        """Carry out the machine's ``actions``; ``backend``: the machine's
        before the event, for the counters.

        The machine's common results (``connection.DO_*``) are matched by
        identity, the most frequent first, and carried out without a loop;
        any other goes action by action. Only ``ConnectTo`` and
        ``StartPump`` can feed a nested event (a failed connect or write);
        the machine puts them last, so no action is left to go stale.
        """
        if actions is DO_NOTHING or self.closed:
            return
        if actions is DO_STOP_REPLAY:
            self._stop_replay()
        elif actions is DO_SHUT_CLIENT:
            self._shutdown(self.down)
        elif actions is DO_FINISH:
            assert backend is not None
            backend.active_connections -= 1
            self._finish()
        elif actions is DO_START:
            assert backend is not None
            backend.active_connections += 1
            backend.connections_total += 1
            self._start_pump()
        elif actions is DO_CONNECT:
            self._connect()
        elif actions is DO_STOP_REPLAY_SHUT_CLIENT:
            self._stop_replay()
            self._shutdown(self.down)
        elif actions is DO_SHUT_BACKEND:
            self._shutdown(self.up)
        else:
            self._run_each(actions, backend)

    def _run_each(self, actions: tuple[Action, ...], backend: Backend | None) -> None:
        """Carry out ``actions`` one by one (the less common results)."""
        for action in actions:
            kind = type(action)
            if kind is Close:
                if action.side is _CLIENT:  # type: ignore[union-attr]
                    # Exactly once on every path to CLOSED (the machine's promise).
                    self.closed = True
                    self._close_client(action.reset)  # type: ignore[union-attr]
                    self.fwd.closed(self)
                else:
                    self._close_backend(action.reset)  # type: ignore[union-attr]
            elif kind is ConnectTo:
                self._connect()
            elif kind is CountConnected:
                assert backend is not None
                backend.active_connections += 1
                backend.connections_total += 1
            elif kind is StartPump:
                self._start_pump()
            elif kind is StopReplay:
                self._stop_replay()
            elif kind is ShutdownWrite:
                self._shutdown(self.up if action.side is _BACKEND else self.down)  # type: ignore[union-attr]
            elif kind is CountReleased:
                assert backend is not None
                backend.active_connections -= 1
            elif kind is CountFailure:
                assert backend is not None
                backend.connect_failures += 1
            elif kind is SendProxyHeader:
                assert self.up is not None
                self.queue(self.up, v2_header(self.peer, self.local, "tcp"))
            elif kind is Replay:
                current = self.machine.backend
                assert isinstance(action, Replay) and self.up is not None and current is not None
                self.queue(self.up, action.data)
                current.bytes_in += len(action.data)
            elif kind is StopPump:
                if self.creg and self.cmask:
                    self.cmask = 0
                    self.loop.modify(self.cfd, 0)
            elif kind is CountReject:
                assert isinstance(action, CountReject)
                self._count_reject(action.reason)

    def _stop_replay(self) -> None:
        """``StopReplay``: no more client reads through the machine."""
        up, down = self.up, self.down
        if up is not None:
            up.tap = False
        if down is not None:
            down.tap = False

    @staticmethod
    def _shutdown(d: Direction | None) -> None:
        """``ShutdownWrite``: FIN towards d's destination once its bytes are written."""
        if d is not None:
            d.eof = d.fin = True
            if not d.pending:
                d.shut = True  # _shut, inline
                try:
                    d.dst.shutdown(_SHUT_WR)
                except OSError:
                    pass  # already gone: the other direction reports it

    def _finish(self) -> None:
        """``Close`` of both sides with FIN while relaying (``DO_FINISH``)."""
        self.closed = True
        loop = self.loop
        up, down = self.up, self.down
        if up is not None and down is not None:  # Pump.drop, inline
            up.live = down.live = False
            if up.pipe is not None or down.pipe is not None:
                self.drop()
            self.up = self.down = None
        sock = self.bsock
        if sock is not None:
            # loop.retire of both sockets, inline.
            handlers = loop.handlers
            handlers.pop(self.cfd, None)
            handlers.pop(self.bfd, None)
            doomed = loop.doomed
            doomed.append(self.client)
            doomed.append(sock)
            self.bsock, self.bfd, self.bmask = None, -1, 0
        else:
            loop.retire(self.cfd, self.client)
        self.fwd.closed(self)

    def _count_reject(self, reason: Reject) -> None:
        fwd = self.fwd
        if reason is Reject.NO_BACKEND:
            fwd.rejected_no_backend += 1
            log.debug("forward.no_backend", service=fwd.name, client=self.client_name)
        else:
            fwd.rejected_connect_failed += 1
            log.debug("forward.all_backends_failed", service=fwd.name, client=self.client_name)

    def abort(self) -> None:
        """Reset both sides now (abort_all, a stale flow)."""
        self.feed(ABORT)

    def halt(self) -> None:
        """The loop is stopping (``reactor.Owner``): reset both sides."""
        self.feed(ABORT)

    # -- connect phase ------------------------------------------------------

    def _connect(self) -> None:
        """``ConnectTo``: a non-blocking connect to the machine's backend
        within its connect_timeout; EPOLLOUT (or an error) ends it."""
        fwd = self.fwd
        backend = self.machine.backend
        assert backend is not None
        cached = fwd.sockaddrs.get(backend)
        family, address = cached if cached is not None else fwd.sockaddr(backend)
        try:
            sock = Sock(family, _STREAM_NONBLOCK)
        except OSError as exc:
            # Out of descriptors: no other candidate would fare better, and
            # the client must not wait for an idle sweep.
            fwd.refuse("descriptors", exc.strerror or repr(exc))
            self.feed(ABORT)
            return
        sock.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
        err = sock.connect_ex(address)
        if err != _EINPROGRESS and err != 0:
            self.loop.doom(sock)
            log.debug("forward.connect_failed", service=fwd.name, backend=backend.key,
                      error=os.strerror(err))
            self.feed(ConnectFailed(os.strerror(err)))
            return
        self.bsock = sock
        self.bfd = bfd = sock.fileno()
        self.bmask = _OUT
        loop = self.loop
        loop.handlers[bfd] = self.backend_event  # loop.register, inline
        loop.watch(bfd, _OUT)
        fwd.connecting[self] = loop.now + self.machine.rules.connect_timeout

    def timed_out(self) -> None:
        """The connect sweep found the attempt past its deadline."""
        if self.up is None and not self.closed:
            self._attempt_failed("timeout", timeout=True)

    def _attempt_failed(self, reason: str, timeout: bool = False) -> None:
        """The attempt failed: drop its socket, tell the machine."""
        backend = self.machine.backend
        assert backend is not None
        log.debug("forward.connect_failed", service=self.fwd.name, backend=backend.key,
                  error=reason)
        self._close_backend(reset=False)
        self.feed(CONNECT_TIMEOUT if timeout else ConnectFailed(reason))

    def _connected(self) -> None:
        machine, bsock = self.machine, self.bsock
        backend = machine.backend
        assert backend is not None and bsock is not None
        del self.fwd.connecting[self]
        # Both directions copy through user space at first (the client's
        # bytes must, while the machine keeps them for a redispatch): for a
        # short answer recv and send cost the kernel less than splice into
        # and out of a pipe. The pump switches a direction to splice after a
        # read that fills the buffer.
        replaying = machine.replaying
        self.up, self.down = pair(self.client, bsock, replaying)
        self.counters = backend
        actions = machine.on_connected()
        if actions is DO_START:
            backend.active_connections += 1
            backend.connections_total += 1
            self._start_pump()
        else:
            self.run(actions, backend)

    def _start_pump(self) -> None:
        """``StartPump``: write what was queued (PROXY header, replay), then
        read the client (unless it ended: ``up.eof``)."""
        up = self.up
        assert up is not None
        if up.pending:
            self.flush(up)
            if not up.live:
                return  # reset (closed, or redispatched to the next candidate)
        loop = self.loop
        if not self.creg:
            self.creg = True
            self.cmask = cmask = _IN_HUP if not up.eof and not up.pending else 0
            loop.handlers[self.cfd] = self.client_event  # loop.register, inline
            loop.watch(self.cfd, cmask)
        if not up.pending and not up.eof:
            # Clients usually speak first and their bytes are waiting by
            # now: read them without another trip through epoll.
            self.pump(up)
            if not up.live:
                return
        # The epoll interest (see the class docstring); up is live, so self.down is its pair.
        down = self.down
        assert down is not None
        cmask = (_IN_HUP if not up.eof and not up.pending else 0) | (_OUT if down.pending else 0)
        bmask = (_IN_HUP if not down.eof and not down.pending else 0) | (_OUT if up.pending else 0)
        if cmask != self.cmask:
            self.cmask = cmask
            loop.modify(self.cfd, cmask)
        if bmask != self.bmask:
            self.bmask = bmask
            loop.modify(self.bfd, bmask)

    # -- socket events --------------------------------------------------------
    # The two handlers are written out (no shared helper call): each runs
    # two or three times per short connection. ``writes`` is the direction
    # whose destination the socket is, ``reads`` the one it is the source
    # of. EPOLLRDHUP with EPOLLIN: the peer's FIN is queued behind its
    # bytes, so the pump reads on to the end instead of waking up again.

    def client_event(self, ev: int) -> None:
        writes, reads = self.down, self.up
        try:
            if writes is None or reads is None:
                if ev & _ERR:
                    # Reconnecting (not reading the client): it went away meanwhile.
                    self.feed(CLIENT_RESET)
                return
            if ev & _OUT or (ev & _ERR and writes.pending):
                self.flush(writes)
                if not writes.live:
                    return  # reset, or redispatched: the old directions are gone
            if ev & _IN_ERR and not reads.eof and not reads.pending:
                self.pump(reads, ev & _RDHUP_ERR)
                if not reads.live:
                    return
            if ev & _ERR and not ev & _IN_OUT:
                # An error or hang-up with nothing left to read or write (level-
                # triggered epoll would report it forever): the socket is dead.
                self.feed(CLIENT_RESET)
                return
            # The epoll interest (see the class docstring): writes and reads are live.
            cmask = ((_IN_HUP if not reads.eof and not reads.pending else 0)
                     | (_OUT if writes.pending else 0))
            bmask = ((_IN_HUP if not writes.eof and not writes.pending else 0)
                     | (_OUT if reads.pending else 0))
            if cmask != self.cmask:
                self.cmask = cmask
                self.loop.modify(self.cfd, cmask)
            if bmask != self.bmask:
                self.bmask = bmask
                self.loop.modify(self.bfd, bmask)
        except ConnectionStateError as exc:
            self._bug(exc)

    def backend_event(self, ev: int) -> None:
        writes, reads = self.up, self.down
        try:
            if writes is None or reads is None:
                # Connecting: EPOLLOUT (or an error) ends the attempt. Linux
                # reports a failed connect as EPOLLERR (with EPOLLOUT); SO_ERROR
                # is read only then.
                if ev & _ERR:
                    sock = self.bsock
                    assert sock is not None
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    self._attempt_failed(os.strerror(err) if err else "hang-up")
                else:
                    self._connected()
                return
            if ev & _OUT or (ev & _ERR and writes.pending):
                self.flush(writes)
                if not writes.live:
                    return
            if ev & _IN_ERR and not reads.eof and not reads.pending:
                self.pump(reads, ev & _RDHUP_ERR)
                if not reads.live:
                    return
            if ev & _ERR and not ev & _IN_OUT:
                self.feed(BACKEND_ERROR)
                return
            # The epoll interest (see the class docstring): writes and reads are live.
            cmask = ((_IN_HUP if not writes.eof and not writes.pending else 0)
                     | (_OUT if reads.pending else 0))
            bmask = ((_IN_HUP if not reads.eof and not reads.pending else 0)
                     | (_OUT if writes.pending else 0))
            if cmask != self.cmask:
                self.cmask = cmask
                self.loop.modify(self.cfd, cmask)
            if bmask != self.bmask:
                self.bmask = bmask
                self.loop.modify(self.bfd, bmask)
        except ConnectionStateError as exc:
            self._bug(exc)

    # -- pump hooks ----------------------------------------------------------

    def tapped(self, d: Direction, data: bytes | None) -> None:
        machine = self.machine
        if d.upstream:
            assert data is not None  # the client direction copies while tapped
            actions = machine.on_client_data(data)  # kept for a redispatch
            if actions is not DO_NOTHING:
                self.run(actions, machine.backend)
            return
        actions = machine.on_backend_first_byte()
        if actions is DO_STOP_REPLAY:
            # StopReplay, inline: the client's bytes are no longer kept.
            d.tap = False
            up = self.up
            if up is not None:
                up.tap = False
        else:
            d.tap = False
            self.run(actions, machine.backend)

    def drained(self, d: Direction) -> None:
        if d.shut:
            return
        if d.fin:
            _shut(d)  # ordered (ShutdownWrite) while bytes were pending
            return
        d.fin = True
        machine = self.machine
        backend = machine.backend
        if d.upstream:
            actions = machine.on_client_eof()
            if actions is DO_FINISH:
                assert backend is not None
                backend.active_connections -= 1
                self._finish()
                return
        else:
            actions = machine.on_backend_eof()
            if actions is DO_SHUT_CLIENT:
                # ShutdownWrite(CLIENT), inline: d's bytes are all written.
                d.shut = True
                try:
                    d.dst.shutdown(_SHUT_WR)
                except OSError:
                    pass  # already gone: the other direction reports it
                return
        self.run(actions, backend)

    def failed(self, d: Direction, exc: OSError, writing: bool) -> None:
        reset = exc.errno in RESET_ERRNOS
        if not reset:
            log.debug("forward.socket_error", service=self.fwd.name, client=self.client_name,
                      error=exc.strerror or repr(exc))
        if d.upstream != writing:
            self.feed(CLIENT_RESET)
        elif not reset:
            self.feed(BACKEND_ERROR)
        else:
            backend = self.machine.backend
            self.feed(BACKEND_RESET)
            if self.machine.phase is _CONNECTING and backend is not None:
                log.debug("forward.redispatch", service=self.fwd.name, backend=backend.key,
                          client=self.client_name)

    # -- teardown -----------------------------------------------------------

    def _close_client(self, reset: bool) -> None:
        if self.up is not None:
            self.drop()  # release the pipes
        if reset:
            _linger_reset(self.client)
        self.loop.retire(self.cfd, self.client)

    def _close_backend(self, reset: bool) -> None:
        """End the current attempt or connection (``Close(BACKEND)``, a failed attempt)."""
        self.fwd.connecting.pop(self, None)
        if self.up is not None:
            self.drop()
        sock, bfd = self.bsock, self.bfd
        if sock is not None:
            self.bsock, self.bfd, self.bmask = None, -1, 0
            if reset:
                _linger_reset(sock)
            self.loop.retire(bfd, sock)

    def _teardown(self) -> None:
        """Reset both sides without the machine (it refused an event: a bug)."""
        self._close_backend(reset=True)
        self._close_client(reset=True)
        if not self.closed:
            self.closed = True
            self.fwd.closed(self)


def _shut(d: Direction) -> None:
    """Send the FIN of direction ``d`` (shutdown(SHUT_WR) on its destination)."""
    d.shut = True
    try:
        d.dst.shutdown(_SHUT_WR)
    except OSError:
        pass  # already gone: the other direction reports it


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
        self.rules = Rules.of(service)
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
        self._sweep_timer: Timer | None = None
        self.connecting: dict[_Conn, float] = {}
        """Connections waiting for their backend, and the monotonic deadline
        (s) of the attempt: swept every CONNECT_SWEEP_S (no timer per
        connection)."""
        self._connect_sweep: Timer | None = None
        self.sockaddrs: dict[Backend, tuple[socket.AddressFamily, tuple[str, int]]] = {}
        """``sockaddr``'s cache, by backend (read inline per connect)."""
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
            conn.abort()

    def abort_flows(self, keys: Iterable[FlowKey]) -> int:
        """Reset the client connections with these flow keys (flows known to
        be gone: a live peer owns the 4-tuple). Thread-safe; returns how many
        of them this service holds right now."""
        keys = list(keys)
        found = sum(1 for k in keys if k in self._by_flow)
        if found:
            self.loop.call_soon(lambda: self._abort_flows(keys))
        return found

    def abort_backend(self, backend: Backend) -> int:
        """Reset the connections relayed to ``backend`` (removed by live
        apply, past ``drain.timeout``). Thread-safe; how many it holds now."""
        found = sum(1 for c in list(self._conns) if c.backend is backend)
        if found:
            self.loop.call_soon(lambda: self._abort_backend(backend))
        return found

    def _abort_backend(self, backend: Backend) -> None:
        for conn in list(self._conns):
            if conn.backend is backend:
                conn.abort()

    def _abort_flows(self, keys: list[FlowKey]) -> None:
        for key in keys:
            conn = self._by_flow.get(key)
            if conn is not None:
                log.debug("forward.stale_flow_reset", service=self.name, client=conn.client_name)
                conn.abort()

    # -- loop thread ---------------------------------------------------------

    def accept(self, loop: RelayLoop, sock: Sock, fd: int, peer: tuple[str, int],
               local: tuple[str, int]) -> None:
        """Loop thread: take an accepted connection. ``peer`` is the client's
        (address, port); ``local`` its local (address, port): the VIP, or the
        overridden bind address in tests (one tuple shared by a listener's
        connections); backend choice always hashes the service's VIP.
        ``sock`` is in blocking mode (see ``Sock``)."""
        if not self.accepting:
            _linger_reset(sock)
            loop.doom(sock)
            return
        slots = loop.slots
        if slots.sources is None and (slots.cap is None or slots.used < slots.cap):
            slots.used += 1  # Slots.admit's common case (no per-source cap), inline
            refusal = None
        else:
            refusal = slots.admit(peer[0])
        if refusal is not None:
            # At a cap: reset now. Never registered with epoll, so closing
            # at once cannot confuse this batch's events (see doom).
            _linger_reset(sock)
            sock.close()
            self.refuse(refusal)
            return
        self.accepted += 1
        conn = _Conn(loop, self, sock, fd, peer, local)
        candidates = self.pool.candidates(conn.peer, self.vip)
        if not candidates:
            conn.run(conn.machine.on_accepted(candidates), None)  # no_backend: reset at once
            return
        if not self._conns:
            self._became_busy()
        self._conns.add(conn)
        if self.on_flow is not None:
            key = conn.flow_key()
            self._by_flow[key] = conn
            self.on_flow(True, key)
        actions = conn.machine.on_accepted(candidates)
        if actions is DO_CONNECT:
            conn._connect()
        else:
            conn.run(actions, None)

    def closed(self, conn: _Conn) -> None:
        """Loop thread: ``conn`` has closed (called once per connection
        admitted, from ``_Conn.close``): its slot and its source's count
        are given back."""
        loop = self.loop
        slots = loop.slots
        if slots.sources is None:
            slots.used -= 1  # Slots.release without a per-source cap, inline
        else:
            slots.release(conn.peer[0])
        if loop.paused:
            loop.resume_listeners()
        self._conns.discard(conn)
        if self.on_flow is not None:
            key = conn.flow_key()
            if self._by_flow.get(key) is conn:
                del self._by_flow[key]
                self.on_flow(False, key)
        if not self._conns:
            self._became_idle()

    def sockaddr(self, backend: Backend) -> tuple[socket.AddressFamily, tuple[str, int]]:
        """The backend's address family and connect() address, cached."""
        cached = self.sockaddrs.get(backend)
        if cached is None:
            host, port = backend.sockaddr
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            cached = self.sockaddrs[backend] = (family, (host, port))
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
                conn.timed_out()
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
        for conn in list(self._conns):
            if conn.machine.phase is not _RELAYING:
                continue  # connecting: bounded by connect_timeout per candidate
            traffic, conn.traffic = conn.traffic, False
            conn.feed(_SWEPT_BUSY if traffic else _SWEPT_QUIET)
            if conn.closed:
                log.debug("forward.idle_timeout", service=self.name, client=conn.client_name)
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
