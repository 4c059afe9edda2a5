"""A TCP forwarder in a process whose descriptors the test can exhaust.

``python -m tests.component.nofile_child ENGINE BACKEND_PORT``: lowers its
soft RLIMIT_NOFILE to LIMIT, starts a forwarder (``relay`` or ``asyncio``
engine, no cap) on 127.0.0.1 port 0 towards 127.0.0.1:BACKEND_PORT, prints
``{"port": N}`` and then obeys one command per stdin line, answering one
JSON line each:

- ``fill``: open /dev/null until EMFILE; ``{"held": n}``
- ``fill-but-one``: the same, then close one (the next socket() gets it)
- ``free``: close what fill opened
- ``report``: ``{"active", "accepted", "refused", "pauses"}``

Logs go to stderr (the test counts them). Ends at stdin's EOF.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import sys

from anycast_lb import log
from anycast_lb.config import ForwardingConfig, ServiceConfig
from anycast_lb.forward.relay import RelayForwarder, RelayLoop
from anycast_lb.forward.tcp import TcpForwarder
from anycast_lb.pool import Pool

LIMIT = 128


def _reply(message: dict[str, object]) -> None:
    os.write(1, json.dumps(message).encode() + b"\n")


def _fill() -> list[int]:
    held = []
    while True:
        try:
            held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            if exc.errno != errno.EMFILE:
                raise
            return held


async def main(engine: str, backend_port: int) -> None:
    log.setup("info")
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    service = ServiceConfig.model_validate({
        "name": "web", "vip": "127.0.0.1", "port": 80, "protocol": "tcp",
        "backends": [{"address": "127.0.0.1", "port": backend_port}]})
    pool = Pool(service)
    pool.set_up(pool.backends[0].key, True)
    relay = None
    fwd: TcpForwarder | RelayForwarder
    if engine == "relay":
        relay = RelayLoop(ForwardingConfig())
        relay.start()
        fwd = RelayForwarder(service, pool, relay, "127.0.0.1", 0)
    else:
        fwd = TcpForwarder(service, pool, "127.0.0.1", 0)
    _, port = await fwd.start()
    _reply({"port": port})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    held: list[int] = []
    while line := (await reader.readline()).strip():
        if line in (b"fill", b"fill-but-one"):
            held += _fill()
            if line == b"fill-but-one":
                os.close(held.pop())
            _reply({"held": len(held)})
        elif line == b"free":
            for fd in held:
                os.close(fd)
            held.clear()
            _reply({})
        elif line == b"report":
            _reply({"active": fwd.active, "accepted": fwd.accepted, "refused": fwd.refused(),
                    "pauses": fwd.refusals.accept_pauses})
    fwd.stop_accepting()
    fwd.abort_all()
    await fwd.wait_idle(2.0)
    if relay is not None:
        relay.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
