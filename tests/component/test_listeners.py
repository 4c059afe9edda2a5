"""``close_server`` against a real listener on 127.0.0.1: whichever loop
turn after a connect the close comes at, the connection is handed to the
protocol (which closes it) and no transport is left for the garbage
collector to find unclosed (CPython gh-109564)."""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings

import pytest

from anycast_lb.listeners import close_server
from tests.component.test_backend_helpers import closed_by_peer


@pytest.mark.parametrize("turns", range(6))
async def test_close_server_leaves_no_half_made_connection(turns: int) -> None:
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _, writer: accepted.append(writer), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # The connect completes in the kernel at once; the loop accepts it and
    # builds its transport over the next turns.
    client = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        client.setblocking(False)
        for _ in range(turns):
            await asyncio.sleep(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            await close_server(server)
            await asyncio.sleep(0)  # connection_made of a connection accepted before the close
            for writer in accepted:
                writer.close()
            assert await closed_by_peer(client, timeout=2), f"still open (turn {turns})"
            gc.collect()
        assert [str(w.message) for w in caught] == []
    finally:
        client.close()
