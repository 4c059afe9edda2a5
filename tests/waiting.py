"""Wait on a condition with a deadline (never sleep for readiness)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, interval: float = 0.01,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` (a function, or a coroutine function) every
    ``interval`` s until true; AssertionError naming ``what`` after
    ``timeout`` s. The one waiting helper of the tests: never sleep for
    readiness. ``interval=0`` yields one event loop turn between polls: for
    tests on a FakeClock that wait for a task to act while time stands still."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
