"""Running a whole node inside a test, or finding where a child node bound."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass

from anycast_lb.config import format_host_port
from anycast_lb.node import Node
from tests.waiting import wait_until


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


_LISTENING = re.compile(r" event=(api|forwarder)\.listening (?:.*?service=(\S+) )?.*?address=(\S+)")


@dataclass(frozen=True)
class BoundAddresses:
    """Where an ``anycast-lb run --ephemeral-ports`` child bound, from its log."""

    api: tuple[str, int]
    services: dict[str, tuple[str, int]]

    @property
    def api_url(self) -> str:
        host, port = self.api
        return f"http://{format_host_port(host, port)}"


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def listening(log_text: str) -> dict[str, tuple[str, int]]:
    """``api`` and each service name -> the address logged as bound, from
    ``kv`` or ``json`` log lines (``--log-format``)."""
    found: dict[str, tuple[str, int]] = {}
    for kind, service, address in _LISTENING.findall(log_text):
        found["api" if kind == "api" else service] = _split(address)
    for line in log_text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if record.get("event") == "api.listening":
            found["api"] = _split(record["address"])
        elif record.get("event") == "forwarder.listening":
            found[record["service"]] = _split(record["address"])
    return found


async def wait_bound(read_log: Callable[[], str], services: Collection[str], *,
                     alive: Callable[[], bool] = lambda: True,
                     timeout: float = 20.0) -> BoundAddresses:
    """Wait (deadline ``timeout`` s) until the child's log, as ``read_log()``
    returns it, names the API's and every one of ``services``' bound address.
    Fails at once if ``alive()`` turns false (the child exited)."""
    found: dict[str, tuple[str, int]] = {}

    def complete() -> bool:
        text = read_log()
        assert alive(), f"the node exited before binding: {text[-2000:]}"
        found.update(listening(text))
        return "api" in found and all(s in found for s in services)

    await wait_until(complete, timeout=timeout, interval=0.02, what="the node's bound addresses")
    return BoundAddresses(found["api"], {s: found[s] for s in services})
