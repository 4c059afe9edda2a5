"""The test backends keep their word: ``stop()`` closes every connection,
including one accepted whose handler task has not run yet."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.component.backends import TcpNameEcho


async def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Read ``sock`` until the peer closes it (EOF or reset): True, or
    False if it is still open after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            while await loop.sock_recv(sock, 4096):
                pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


@pytest.mark.parametrize("turns", range(6))
async def test_stop_closes_a_connection_whose_handler_has_not_run(turns: int) -> None:
    # The connect completes in the kernel at once; the server accepts it and
    # starts its handler over the next few loop turns. Whichever turn stop()
    # comes at, the connection must end, as with a crashed backend (a
    # handler started after stop() would serve it, and one cancelled before
    # its first step at loop teardown would never close its transport).
    echo = TcpNameEcho("be")
    port = await echo.start()
    client = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        client.setblocking(False)
        for _ in range(turns):
            await asyncio.sleep(0)
        await echo.stop()
        assert await closed_by_peer(client, timeout=2), f"still open after stop (turn {turns})"
    finally:
        client.close()
