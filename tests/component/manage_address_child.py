"""Run inside a scratch network namespace by test_manage_address.py (root):
one node whose services have ``manage_address: true``, a TCP echo backend on
127.0.0.1, and a look at ``lo`` before start, while running and after stop.

argv: ``absent`` (the VIPs are not on lo before start) or ``present`` (they
are: the node must leave them), or ``bind_fails`` (a socket already holds
the IPv4 VIP's port: the node fails to start and must still take the VIPs it
added off again). Prints one JSON object on stdout.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from typing import Any

from anycast_lb.config import parse_config
from anycast_lb.errors import BindError
from anycast_lb.node import Node
from tests.component.backends import TcpNameEcho
from tests.waiting import wait_until

VIP4, VIP6, PORT = "198.51.100.10", "2001:db8:5::10", 8080


def lo_addresses() -> list[str]:
    out = subprocess.run(["ip", "-j", "addr", "show", "dev", "lo"], check=True,
                         capture_output=True, text=True, timeout=10).stdout
    return sorted(a["local"] for link in json.loads(out) for a in link.get("addr_info", []))


async def through(vip: str) -> str:
    """The backend's name line, read through the node's listener on ``vip``."""
    async with asyncio.timeout(2):
        reader, writer = await asyncio.open_connection(vip, PORT)
        try:
            return (await reader.readline()).decode().strip()
        finally:
            writer.close()


async def main(case: str) -> dict[str, Any]:
    backend = TcpNameEcho("be1")
    port = await backend.start()
    health = {"kind": "tcp", "interval": 0.2, "fast_interval": 0.05, "timeout": 0.2, "rise": 1}
    config = parse_config({
        "api": {"listen": "127.0.0.1:0"},
        "drain": {"timeout": 1, "announce_grace": 0.1},
        "services": [
            {"name": name, "vip": vip, "port": PORT, "manage_address": True, "health": health,
             "backends": [{"address": "127.0.0.1", "port": port}]}
            for name, vip in (("web4", VIP4), ("web6", VIP6))
        ],
    })
    result: dict[str, Any] = {"before": lo_addresses()}
    node = Node(config, check_jitter=False)
    if case == "bind_fails":
        with socket.socket() as holder:
            holder.bind(("0.0.0.0", PORT))
            holder.listen()
            try:
                await node.run()
            except BindError as exc:
                result["error"] = str(exc)
    else:
        started = asyncio.Event()
        task = asyncio.create_task(node.run(started))
        await asyncio.wait_for(started.wait(), 10)
        result["added"] = sorted(map(str, node.vips_added))
        result["running"] = lo_addresses()
        await wait_until(lambda: all(p.up_count == 1 and p.table_ready
                                     for p in node.pools.values()), what="pools up")
        result["answers"] = [await through(VIP4), await through(VIP6)]
        node.request_stop()  # graceful: drain, close the listeners, then lo
        await asyncio.wait_for(task, 15)
    result["after"] = lo_addresses()
    await backend.stop()
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
