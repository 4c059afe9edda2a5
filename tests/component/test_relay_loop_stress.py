"""The relay loop's start and stop under load: no descriptor is woken or
polled after it is closed, whatever thread asks for work meanwhile."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from anycast_lb.config import ForwardingConfig
from anycast_lb.forward.relay import RelayForwarder, RelayLoop
from anycast_lb.pool import Pool
from tests.component.test_tcp_forwarder import LineBackend, service_for

CYCLES = 200
CLIENTS = 4


async def _client(address: tuple[str, int], lines: int) -> None:
    """Send lines through the forwarder until the relay resets or closes us."""
    try:
        async with asyncio.timeout(5.0):
            reader, writer = await asyncio.open_connection(*address)
            try:
                for i in range(lines):
                    writer.write(b"x%d\n" % i)
                    if not await reader.readline():
                        return
            finally:
                writer.close()
    except (ConnectionError, OSError):
        pass  # the loop stopped under us: that is the point of the test


async def test_start_and_stop_under_load_200_times(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    backend = LineBackend("be")
    address = await backend.start()
    pool = Pool(service_for([address]))
    for b in pool.backends:
        pool.set_up(b.key, True)
    stopped_with_traffic = 0
    try:
        for cycle in range(CYCLES):
            loop = RelayLoop(ForwardingConfig(splice=cycle % 2 == 0))
            loop.start()
            fwd = RelayForwarder(pool.service, pool, loop, bind_host="127.0.0.1", bind_port=0)
            bound = await fwd.start()
            clients = [asyncio.create_task(_client(bound, 50)) for _ in range(CLIENTS)]
            await asyncio.sleep(0)  # let the clients connect (no readiness is awaited here)
            stopping = threading.Event()

            def hammer() -> None:
                # Another thread asking the loop for work while it stops:
                # the window in which a queued call could wake a closed fd.
                while not stopping.is_set():
                    fwd.abort_flows([])
                    fwd.loop.call_soon(lambda: None)
                for _ in range(100):
                    fwd.loop.call_soon(lambda: None)

            thread = threading.Thread(target=hammer)
            thread.start()
            if fwd.active:
                stopped_with_traffic += 1
            try:
                await asyncio.to_thread(loop.stop)
            finally:
                stopping.set()
                thread.join(5.0)
            assert not thread.is_alive()
            assert loop.closed
            assert not loop.call_soon(lambda: None)
            with pytest.raises(RuntimeError, match="closed"):
                await RelayForwarder(pool.service, pool, loop, bind_host="127.0.0.1",
                                     bind_port=0).start()
            await asyncio.gather(*clients)
    finally:
        await backend.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert stopped_with_traffic > 0, "no cycle stopped with a connection open"
