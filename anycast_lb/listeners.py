"""Closing an ``asyncio.Server`` without leaking a half-made connection.

CPython 3.11 to 3.13 (gh-109564, open): the standard event loop accepts a
connection in the listening socket's reader callback and builds its
transport in a task one loop turn later. ``Server.close()`` in between makes
that task's transport fail ``Server._attach`` (an assertion, swallowed
unless the loop runs in debug mode) after it took the socket: the accepted
connection is neither served nor closed, its client hangs, and the garbage
collector later finds an ``unclosed transport`` (a ResourceWarning, an error
under ``-W error``). uvloop's server has no such turn.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events


async def close_server(server: asyncio.AbstractServer) -> None:
    """Stop accepting on ``server``, let the connections it already accepted
    get their transports, then close it (one loop turn).

    Connections accepted before the close reach the protocol factory's
    ``connection_made`` as usual: the owner closes them as it closes any
    other. Closes ``server`` even if cancelled during that turn (then
    raises CancelledError).
    """
    if isinstance(server, asyncio.base_events.Server) and server.is_serving():
        loop = asyncio.get_running_loop()
        for sock in server.sockets:
            # Cancels the accept callback even if this turn already polled it.
            loop.remove_reader(sock.fileno())
        try:
            # The accept tasks made before now take their first step
            # (transport made and attached) ahead of this task's next one.
            await asyncio.sleep(0)
        finally:
            server.close()  # even if cancelled meanwhile
    else:
        server.close()
