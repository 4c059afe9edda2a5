"""The relay engine's byte pump: bytes from one socket to the other, no rules.

A proxied connection has two ``Direction``s: client to backend (``up``) and
backend to client (``down``). ``Pump.pump(d)`` reads ``d.src`` and writes
``d.dst``; ``Pump.flush(d)`` writes what is pending. A direction with
``copy`` set (or no pipe to spare) reads through user space, at most
``COPY_READ`` bytes at a time: for a short exchange ``recv`` and ``send``
cost the kernel less than a splice into a pipe and out of it. After a read
that fills the buffer (a bulk transfer) it switches to zero-copy
``os.splice`` through a pipe from the reactor's pool, if the reactor
splices and the owner does not tap it (HAProxy's splice-auto).

The end of the source: a read returning 0, or (copying) a short read when
epoll reported EPOLLRDHUP without an error: the peer's FIN was queued
behind the bytes just read, so no read is spent on it.

Backpressure: a direction holds at most one read (``buffer_size`` bytes, one
pipe or one user buffer); while it cannot all be written the owner stops
reading the source (its epoll interest drops EPOLLIN and waits EPOLLOUT on
the destination). The rest of a backlog stays in the kernel's socket
buffers and the sender's TCP window. An idle direction holds no pipe.

The connection's rules live elsewhere (``connection.Connection``, driven by
``relay._Conn``): the pump calls its owner's hooks only on state changes,
and per chunk only while a direction is ``tap``ped:

- ``tapped(d, data)``: a read on a tapped direction (``data``: the bytes in
  copy mode, None when spliced), before they are written.
- ``drained(d)``: ``d.eof`` is set and every byte is written.
- ``failed(d, exc, writing)``: an OSError reading ``d.src`` (``writing``
  False) or writing ``d.dst``.

After a hook the pump leaves a direction whose ``live`` turned False (the
connection closed, or dropped its directions to reconnect) at once.
"""

from __future__ import annotations

import os
import socket
from typing import Protocol

from anycast_lb.forward.reactor import HAVE_SPLICE, PIPE_POOL, RDHUP, Reactor

BURST = 8
"""Reads per direction per wake-up while each fills the buffer."""
_BURST = (None,) * BURST
"""``for _ in _BURST``: a tuple's iterator, not a ``range`` object built per
call (about 50 ns less each, three times per short connection)."""
COPY_READ = 65536
"""Largest read through user space (bytes): bigger recv() buffers go to
mmap and back on every call."""
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if HAVE_SPLICE else 0
_DONTWAIT = socket.MSG_DONTWAIT
"""Every recv and send of the pump: an accepted socket may be in blocking
mode (see ``Socket``)."""


class Counters(Protocol):
    """Byte counters of a backend (``pool.Backend``)."""

    bytes_in: int
    bytes_out: int


class Socket(Protocol):
    """What the pump needs of a connected socket.

    Its descriptor may be in blocking mode (an accepted socket: making it
    non-blocking costs a system call per connection): the pump passes
    MSG_DONTWAIT to every recv and send, and sets non-blocking mode, which
    splice needs, before a direction's first splice.
    """

    def recv(self, size: int, flags: int, /) -> bytes: ...
    def send(self, data: bytes | memoryview, flags: int, /) -> int: ...
    def fileno(self) -> int: ...
    def shutdown(self, how: int, /) -> None: ...
    def setblocking(self, flag: bool, /) -> None: ...


class Direction:
    """One direction of a connection: bytes from ``src`` to ``dst``.

    ``upstream``: client to backend (bytes count in the pump's
    ``counters.bytes_in``), else backend to client (``bytes_out``).
    """

    __slots__ = (
        "src", "dst", "sfd", "dfd", "pipe", "pending", "buf", "eof", "fin", "shut", "copy",
        "tap", "live", "upstream",
    )

    sfd: int
    """src.fileno() and dst.fileno(): set when the direction starts to
    splice (only splice reads them)."""
    dfd: int

    def __init__(self, src: Socket, dst: Socket, upstream: bool, tap: bool) -> None:
        self.src = src
        self.dst = dst
        self.upstream = upstream
        self.pipe: tuple[int, int] | None = None
        self.pending = 0
        """Bytes read from src (or queued) and not yet written to dst."""
        self.buf: memoryview | None = None
        """Copy mode: the unwritten bytes."""
        self.eof = False
        """No more reads: src ended, or the owner ended this direction."""
        self.fin = False
        """The owner knows of the end: it shuts dst once pending is written."""
        self.shut = False
        """dst was shut down for writing (FIN sent)."""
        self.copy = True
        """Read through user space (else splice: ``Pump.pump`` switches)."""
        self.tap = tap
        """Call the owner's ``tapped`` on every read."""
        self.live = True
        """False once the owner dropped this direction."""


_new = object.__new__


def pair(client: Socket, backend: Socket, tap: bool) -> tuple[Direction, Direction]:
    """``(Direction(client, backend, True, tap), Direction(backend, client,
    False, tap))``, built in one call: a class call runs
    ``__init__`` through the type's slot (an argument tuple, a frame each),
    which costs about 50 ns more per object, and this runs per connection.
    Sets every field ``Direction.__init__`` sets, to the same values."""
    up: Direction = _new(Direction)
    up.src = client
    up.dst = backend
    up.upstream = True
    up.pipe = up.buf = None
    up.pending = 0
    up.eof = up.fin = up.shut = False
    up.copy = up.live = True
    up.tap = tap
    down: Direction = _new(Direction)
    down.src = backend
    down.dst = client
    down.upstream = False
    down.pipe = down.buf = None
    down.pending = 0
    down.eof = down.fin = down.shut = False
    down.copy = down.live = True
    down.tap = tap
    return up, down


class Pump:
    """Moves one connection's bytes on ``loop`` (see the module docstring).

    Subclasses set ``up``, ``down`` and ``counters`` (before the first
    ``pump``) and supply the hooks.
    """

    __slots__ = ("loop", "up", "down", "traffic", "counters")

    counters: Counters
    """The backend's byte counters, for both directions (one field here,
    not one per direction: an idle connection's memory)."""

    def __init__(self, loop: Reactor) -> None:
        self.loop = loop
        self.up: Direction | None = None
        """Client to backend (None while connecting)."""
        self.down: Direction | None = None
        """Backend to client (None while connecting)."""
        self.traffic = False
        """A byte or EOF was read either way (the owner clears it)."""

    # -- hooks ---------------------------------------------------------------

    def tapped(self, d: Direction, data: bytes | None) -> None:
        raise NotImplementedError

    def drained(self, d: Direction) -> None:
        raise NotImplementedError

    def failed(self, d: Direction, exc: OSError, writing: bool) -> None:
        raise NotImplementedError

    # -- moving bytes --------------------------------------------------------

    def pump(self, d: Direction, ended: int = 0) -> None:
        """Read from d.src and write to d.dst, while reads fill the buffer
        and writes complete, at most ``BURST`` reads: a bulk transfer moves
        up to BURST * buffer_size bytes per wake-up instead of one read.
        ``ended``: the event's EPOLLRDHUP, EPOLLERR and EPOLLHUP bits. With
        EPOLLRDHUP the source's FIN is queued: a short copied read (with
        neither error bit) ends the direction at once; otherwise a short
        read is followed by another, which finds the end (or the error)
        without waiting for the next wake-up.

        A spliced read is written out here (the common case, without a
        ``flush`` call), and the pipe is kept from one read to the next and
        given back when the direction goes idle."""
        loop = self.loop
        size = loop.buffer_size
        copy_size = size if size < COPY_READ else COPY_READ
        if d.copy:
            # Copying (every short exchange), without the pipe's bookkeeping.
            for _ in _BURST:
                try:
                    chunk = d.src.recv(copy_size, _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    return  # drained the source for now
                except OSError as exc:
                    self.failed(d, exc, False)
                    return
                self.traffic = True
                n = len(chunk)
                if n == 0:
                    d.eof = True
                    self.drained(d)
                    return
                d.pending = n
                if d.upstream:
                    self.counters.bytes_in += n
                else:
                    self.counters.bytes_out += n
                if d.tap:
                    self.tapped(d, chunk)
                    if not d.live:
                        return
                # Written here too; the rest, if any, by flush on EPOLLOUT.
                try:
                    sent = d.dst.send(chunk, _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    d.buf = memoryview(chunk)
                    return
                except OSError as exc:
                    d.buf = memoryview(chunk)
                    self.failed(d, exc, True)
                    return
                if sent < n:
                    d.buf = memoryview(chunk)[sent:]
                    d.pending = n - sent
                    return
                d.pending = 0
                if n < copy_size:
                    if ended == RDHUP:
                        # A short read took every byte queued (tcp_recvmsg
                        # returns early only on an empty queue), and the
                        # peer's FIN is queued behind them: this is the end,
                        # known without a read that returns 0 (HAProxy's
                        # raw_sock_to_buf does the same). The exception, as
                        # there: a read also stops at a TCP urgent mark, so
                        # bytes after urgent data that came with the FIN
                        # are not relayed (and the close resets that peer);
                        # the urgent byte itself is never relayed anyway.
                        d.eof = True
                        self.drained(d)
                        return
                    if not ended & RDHUP:
                        return
                elif loop.splice and not d.tap:
                    # A read filled the buffer: a bulk transfer, which
                    # splices from now on (HAProxy's splice-auto), on
                    # non-blocking descriptors (splice has no MSG_DONTWAIT).
                    d.copy = False
                    src, dst = d.src, d.dst
                    src.setblocking(False)
                    dst.setblocking(False)
                    d.sfd, d.dfd = src.fileno(), dst.fileno()
                    break
            else:
                return
        pool = loop.pipes
        pipe = d.pipe
        for _ in _BURST:
            copy = d.copy
            if not copy and pipe is None:
                pipe = d.pipe = pool.pop() if pool else loop.acquire_pipe()
                copy = pipe is None  # no pipe to spare: copy this read
            data = None
            try:
                if copy:
                    data = d.src.recv(copy_size, _DONTWAIT)
                    n = len(data)
                else:
                    assert pipe is not None
                    n = os.splice(d.sfd, pipe[1], size, None, None, _SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                break  # drained the source for now
            except OSError as exc:
                self.failed(d, exc, False)
                return
            self.traffic = True
            if n == 0:
                d.eof = True
                if pipe is not None:
                    d.pipe = None
                    if len(pool) < PIPE_POOL:
                        pool.append(pipe)
                    else:
                        loop.release_pipe(pipe, True)
                self.drained(d)
                return
            d.pending = n
            if d.upstream:
                self.counters.bytes_in += n
            else:
                self.counters.bytes_out += n
            if d.tap:
                self.tapped(d, data)
                if not d.live:
                    return
            if data is not None:
                # Copied: written here too; the rest, if any, by flush on EPOLLOUT.
                try:
                    sent = d.dst.send(data, _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    d.buf = memoryview(data)
                    return
                except OSError as exc:
                    d.buf = memoryview(data)
                    self.failed(d, exc, True)
                    return
                if sent < n:
                    d.buf = memoryview(data)[sent:]
                    d.pending = n - sent
                    return
                d.pending = 0
                if n < copy_size and not ended & RDHUP:
                    return
                continue
            assert pipe is not None  # spliced
            try:
                while d.pending:
                    d.pending -= os.splice(pipe[0], d.dfd, d.pending, None, None, _SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return  # the rest when dst is writable (EPOLLOUT)
            except OSError as exc:
                self.failed(d, exc, True)
                return
            if n < size and not ended & RDHUP:
                break
        if pipe is not None and not d.pending and d.pipe is pipe:
            # Idle: the pipe (empty) goes back to the pool.
            d.pipe = None
            if len(pool) < PIPE_POOL:
                pool.append(pipe)
            else:
                loop.release_pipe(pipe, True)

    def flush(self, d: Direction) -> None:
        """Write d's pending bytes; calls ``drained`` once they are all
        written after the source's end."""
        try:
            while d.pending:
                buf = d.buf
                if buf is not None:
                    n = d.dst.send(buf, _DONTWAIT)
                    d.buf = buf[n:] if n < len(buf) else None
                else:
                    assert d.pipe is not None
                    n = os.splice(d.pipe[0], d.dfd, d.pending, None, None, _SPLICE_FLAGS)
                d.pending -= n
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.failed(d, exc, True)
            return
        if d.pipe is not None:
            self.loop.release_pipe(d.pipe, True)
            d.pipe = None
        if d.eof:
            self.drained(d)

    def queue(self, d: Direction, data: bytes) -> None:
        """Add ``data`` to d's pending bytes (a PROXY header, a replay),
        written by the next ``flush``; only while d holds no pipe bytes."""
        assert d.pipe is None
        d.buf = memoryview(data if d.buf is None else bytes(d.buf) + data)
        d.pending += len(data)

    def drop(self) -> None:
        """Drop both directions (closing, or reconnecting): pipes go back to
        the pool, or are closed if they hold bytes."""
        loop = self.loop
        for d in (self.up, self.down):
            if d is not None:
                d.live = False
                if d.pipe is not None:
                    loop.release_pipe(d.pipe, d.pending == 0)
                    d.pipe = None
        self.up = self.down = None
