"""The relay engine's reactor: one ``select.epoll`` loop in its own thread.

It knows descriptors, handlers, timers and pipes, and nothing of TCP
proxying (``relay`` builds the forwarder on it, ``pump`` moves the bytes).

- Descriptors: ``register(fd, mask, handler)`` calls ``handler(events)``
  on the loop thread for each readiness report (level-triggered);
  ``forget(fd)`` drops the handler and the caller closes the fd. The
  handler is a method of the fd's owner (``Owner``): ``stop()`` calls every
  owner's ``halt()`` once, so it releases all its descriptors (a
  connection resets, a listener closes), whatever kind of object it is.
- Deferred closes: ``doom(sock)`` (or an append to ``doomed``) closes a socket after the current batch
  of events, so its fd number cannot be reused by a socket accepted later
  in the same batch (which would then receive the stale events).
- Timers: ``call_later(delay, fn)`` on the loop's clock (``now``, the
  monotonic time of the current batch, s).
- Pipes for ``os.splice``: ``acquire_pipe`` / ``release_pipe``, at most
  ``max_pipes`` in existence and ``PIPE_POOL`` kept empty for reuse.

Threading: the loop thread owns every descriptor registered with it. Other
threads talk to it only through ``call_soon`` (a deque and an eventfd, both
under one lock with the eventfd's close, so no caller can wake a closed, or
reused, descriptor number). ``stop()`` closes the epoll and eventfd
descriptors in the calling thread, after the loop thread has returned.

A handler, call or timer that raises is logged (``forward.relay_error`` with
the innermost file:line) and the loop goes on: a bug in one connection must
not stop every other.
"""

from __future__ import annotations

import gc
import heapq
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from anycast_lb import log
from anycast_lb.forward.tcp import OUT_OF_RESOURCES

HAVE_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_MOVE")
HAVE_EPOLL = hasattr(select, "epoll")

IN = select.EPOLLIN if HAVE_EPOLL else 1
OUT = select.EPOLLOUT if HAVE_EPOLL else 4
ERR = (select.EPOLLERR | select.EPOLLHUP) if HAVE_EPOLL else 24
RDHUP = select.EPOLLRDHUP if HAVE_EPOLL else 0x2000
"""The peer shut down its writing side (its FIN arrived)."""
PIPE_POOL = 256
"""Empty pipes kept for reuse (2 fds each)."""
_F_SETPIPE_SZ = 1031


GC_THRESHOLD0 = 20_000
"""CPython's generation-0 collection threshold in a node process (CPython's
default is 700). Each connection the relay engine proxies makes and frees
objects the cycle collector tracks (the connection, its machine, its two
directions, tuples, bound methods), and much of what a young-generation
collection scans is alive anyway (the open connections). Measured: about
1 % less relay CPU per short connection (docs/performance.md, "A larger
young-generation threshold"). Older generations keep their thresholds."""


def tune_gc() -> None:
    """Raise the generation-0 threshold of this process to ``GC_THRESHOLD0``
    (``gc.set_threshold``); the older generations' thresholds are kept.
    Called once by ``anycast-lb run`` and by each relay worker process
    before their loops start."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, older, oldest)


class Owner(Protocol):
    """Who holds descriptors registered with the reactor."""

    def halt(self) -> None:
        """The reactor is stopping: release every descriptor now (a
        connection resets both sides, a listener closes). Called on the loop
        thread, at most once per owner per stop; must tolerate being closed
        already."""
        ...


class Timer:
    """A call due at ``when`` (the reactor's monotonic clock, s)."""

    __slots__ = ("when", "fn")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when


class Reactor:
    """One epoll loop in a daemon thread (see the module docstring).

    ``buffer_size``: bytes per pipe (F_SETPIPE_SZ) and per read of the byte
    pump; ``splice``: use ``os.splice`` through pipes (False, or a platform
    without it: copy through user space); ``max_pipes``: pipes in existence
    at most (None: no cap). Raises OSError from the constructor on platforms
    without epoll.
    """

    def __init__(self, buffer_size: int = 65536, splice: bool = True,
                 max_pipes: int | None = None) -> None:
        self.buffer_size = buffer_size
        self.splice = splice and HAVE_SPLICE
        self.max_pipes = max_pipes
        self.pipes_open = 0
        """Pipes in existence (pooled or in use); at most ``max_pipes``."""
        self._epoll = select.epoll()
        self.modify: Callable[[int, int], None] = self._epoll.modify
        """``modify(fd, mask)``: change ``fd``'s interest (the epoll object's
        own method: no Python frame, it runs twice per connection)."""
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._handlers: dict[int, Callable[[int], None]] = {self._wake: self._drain_wake}
        self._epoll.register(self._wake, IN)
        self.handlers = self._handlers
        """``register``'s two steps, for the relay's connections to do inline
        (twice per connection): ``handlers[fd] = handler`` then ``watch(fd,
        mask)`` (the epoll object's own ``register``); ``stop()`` finds the
        owners from this dict as from ``register``'s."""
        self.watch: Callable[[int, int], None] = self._epoll.register
        self._calls: deque[Callable[[], None]] = deque()
        self._timers: list[Timer] = []
        self.pipes: list[tuple[int, int]] = []
        """Empty pipes for reuse (at most ``PIPE_POOL``); the byte pump takes
        from and returns to it directly, ``acquire_pipe`` when it is empty."""
        self._doomed: list[_Closable] = []
        self.doomed = self._doomed
        """``doom``'s list (one list for the loop's life), for a closing
        connection to append both its sockets inline."""
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
        """Stop the loop thread (every owner halts: connections reset,
        sockets closed), join it, then close the epoll and eventfd
        descriptors.

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

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Call ``fn`` on the loop thread after ``delay`` s."""
        timer = Timer(self.now + delay, fn)
        heapq.heappush(self._timers, timer)
        return timer

    def register(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        """Watch ``fd`` for ``mask`` (EPOLLIN, EPOLLOUT, EPOLLRDHUP).
        ``handler`` is a bound method of the fd's ``Owner``, which halts it
        on stop (one dict per fd: this runs twice per connection)."""
        self._handlers[fd] = handler
        self._epoll.register(fd, mask)

    def forget(self, fd: int) -> None:
        """Drop ``fd``'s handler; the caller closes the fd (which removes it
        from the epoll set)."""
        self._handlers.pop(fd, None)

    def retire(self, fd: int, sock: _Closable) -> None:
        """``forget(fd)`` and ``doom(sock)`` in one call (a closing connection)."""
        self._handlers.pop(fd, None)
        self._doomed.append(sock)

    def doom(self, sock: _Closable) -> None:
        """Close ``sock`` after this batch of events: closing it now would
        free its fd number for a socket accepted later in the same batch,
        which would then receive the stale events meant for this one."""
        self._doomed.append(sock)

    def acquire_pipe(self) -> tuple[int, int] | None:
        """A pipe (read fd, write fd) from the pool or a new one; None at
        ``max_pipes`` or when the process is out of descriptors (the caller
        copies instead). Raises OSError for any other failure of pipe2."""
        if self.pipes:
            return self.pipes.pop()
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
        if empty and len(self.pipes) < PIPE_POOL:
            self.pipes.append(pipe)
            return
        os.close(pipe[0])
        os.close(pipe[1])
        self.pipes_open -= 1

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
                        log.error("forward.relay_error", error=repr(exc), where=where(exc))
            while calls:
                fn = calls.popleft()
                try:
                    fn()
                except Exception as exc:
                    log.error("forward.relay_error", error=repr(exc), where=where(exc))
            while timers and timers[0].when <= now:
                timer = heapq.heappop(timers)
                try:
                    timer.fn()
                except Exception as exc:
                    log.error("forward.relay_error", error=repr(exc), where=where(exc))
            if self._doomed:
                self._close_doomed()
        # The thread that calls stop() closes the descriptors once this
        # thread has returned.

    def _close_doomed(self) -> None:
        doomed = self._doomed  # emptied in place: ``doomed`` is the same list
        for sock in doomed:
            sock.close()
        doomed.clear()

    def _drain_wake(self, ev: int) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass

    def _halt(self) -> None:
        # Each owner once, in registration order; halting forgets its fds.
        halts: dict[int, Callable[[], None]] = {}
        for handler in self._handlers.values():
            owner = getattr(handler, "__self__", None)
            halt = getattr(owner, "halt", None)
            if owner is not self and halt is not None:
                halts.setdefault(id(owner), halt)
        for halt in halts.values():
            try:
                halt()
            except Exception as exc:
                log.error("forward.relay_error", error=repr(exc), where=where(exc))
        self._running = False

    def _close_fds(self) -> None:
        """Close what the loop held; only with the loop thread stopped."""
        with self._wake_lock:
            if self._closed:
                return
            self._closed = True
            self._calls.clear()
            os.close(self._wake)
        for r, w in self.pipes:
            os.close(r)
            os.close(w)
        self.pipes.clear()
        self._close_doomed()
        self._epoll.close()


class _Closable(Protocol):
    def close(self) -> None: ...


def where(exc: BaseException) -> str:
    """file:line of the innermost frame of ``exc``, for a bug report."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
