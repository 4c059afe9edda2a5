"""Injected time: a ``Clock`` seam so timing logic is testable without waiting.

Pure decision code takes ``now`` (monotonic seconds) as an argument; I/O code
takes a ``Clock``. ``FakeClock`` lets a test of "fall after 3 misses at
200 ms" run in microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

_T = TypeVar("_T")


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch (for display only, never for decisions)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that moves only when a test calls ``advance``.

    ``sleep`` parks the caller until ``advance`` passes its deadline.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return 1_700_000_000.0 + self._now

    @property
    def sleepers(self) -> int:
        """Callers parked in ``sleep`` now (a test waits for a task to
        arm its timer before it advances the clock)."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(seconds, 0.0), next(self._seq), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper whose deadline passed, in order."""
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not fut.done():
                fut.set_result(None)
            # Let woken tasks run (and perhaps sleep again) before moving on.
            for _ in range(5):
                await asyncio.sleep(0)
        self._now = target


async def wait_event(clock: Clock, event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` up to ``timeout`` s of ``clock`` time (None: no
    limit); True if it was set. Unlike ``asyncio.timeout`` the deadline moves
    with the injected clock, so a FakeClock test never waits in real time."""
    if event.is_set():
        return True
    if timeout is None:
        await event.wait()
        return True
    waiter = asyncio.ensure_future(event.wait())
    sleeper = asyncio.ensure_future(clock.sleep(timeout))
    try:
        await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, sleeper):
            task.cancel()
        await asyncio.gather(waiter, sleeper, return_exceptions=True)
    return event.is_set()


async def wait_for(clock: Clock, awaitable: Awaitable[_T], timeout: float) -> _T:
    """``awaitable``'s result, or TimeoutError once ``timeout`` s of ``clock``
    time pass first (the awaitable is then cancelled). The clock-injected
    ``asyncio.wait_for``."""
    work = asyncio.ensure_future(awaitable)
    sleeper = asyncio.ensure_future(clock.sleep(timeout))
    try:
        await asyncio.wait((work, sleeper), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        sleeper.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        raise TimeoutError
    return work.result()
