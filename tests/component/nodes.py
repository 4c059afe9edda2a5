"""Running a whole node inside a test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from anycast_lb.node import Node


@contextlib.asynccontextmanager
async def node_running(node: Node) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``node`` for the block; enter once it has started (raising what
    it raised if it ended first), cancel it on exit. Yields its task."""
    started = asyncio.Event()
    task = asyncio.create_task(node.run(started))
    started_wait = asyncio.create_task(started.wait())
    done, _ = await asyncio.wait({task, started_wait}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started_wait.cancel()
        task.result()
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
