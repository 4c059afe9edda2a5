"""L2 announcements seen by a real neighbour table (root, scratch namespaces).

Three namespaces of this test's own on one bridge: two announcers
(``albt-l2-a``, ``albt-l2-b``) and an observer (``albt-l2-c``) whose bridge
joins their veth peers. Documentation prefixes only (198.51.100.0/24,
2001:db8:12::/64). The observer resolves the VIP once (a real ARP / NS
exchange answered by announcer a's kernel); then b adds the VIP, which moves
nothing by itself, and announces it: the observer's entry moves to b's MAC
with no traffic from the observer; then a removes the VIP (make before break).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from tests.component import l2segment
from tests.component.l2segment import in_ns

NS_A, NS_B, NS_C = "albt-l2-a", "albt-l2-b", "albt-l2-c"
VIP4, VIP6 = "198.51.100.100", "2001:db8:12::100"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and ip (network namespaces)",
)

# Runs inside an announcer's namespace: ACTION is add, announce or remove.
SCRIPT = textwrap.dedent('''
    import asyncio, ipaddress, sys
    from anycast_lb.election.l2 import L2Announcer, VipAddresses
    action, dev, *vips = sys.argv[1:]
    async def main():
        for vip in map(ipaddress.ip_address, vips):
            if action == "add":
                await VipAddresses(dev).add(vip)
            elif action == "remove":
                await VipAddresses(dev).remove(vip)
            else:
                sender = L2Announcer(dev)
                sender.open()
                sender.announce(vip)
                sender.close()
    asyncio.run(main())
''')


@pytest.fixture
def segment() -> Iterator[dict[str, str]]:
    with l2segment.segment(NS_A, NS_B, NS_C, ipv6=True) as macs:
        yield macs


def run(ns: str, action: str, dev: str) -> None:
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT, action, dev,
                             VIP4, VIP6], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def poke(vip: str) -> None:
    """One UDP datagram from the observer to the VIP: the kernel resolves it."""
    family = "AF_INET6" if ":" in vip else "AF_INET"
    in_ns(NS_C, sys.executable, "-c",
          f"import socket; socket.socket(socket.{family}, socket.SOCK_DGRAM)"
          f".sendto(b'x', ({vip!r}, 9))")


def neighbour(vip: str) -> str | None:
    entries = json.loads(in_ns(NS_C, "ip", "-j", "neigh", "show", vip, "dev", "br0"))
    return entries[0].get("lladdr") if entries else None


def wait_neighbour(vip: str, mac: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while neighbour(vip) != mac:
        if time.monotonic() > deadline:
            raise AssertionError(f"{vip} still at {neighbour(vip)}, expected {mac}")
        time.sleep(0.02)


def test_announcements_move_a_real_neighbour_entry(segment: dict[str, str]) -> None:
    mac_a, mac_b = segment[NS_A], segment[NS_B]
    assert mac_a != mac_b
    run(NS_A, "add", "l2a")
    run(NS_A, "announce", "l2a")
    # A real resolution, answered by a's kernel: the entry the client holds.
    poke(VIP4)
    poke(VIP6)
    wait_neighbour(VIP4, mac_a)
    wait_neighbour(VIP6, mac_a)

    run(NS_B, "add", "l2b")
    # Adding the address announces nothing: the entries stay at a.
    time.sleep(0.3)  # a negative observation: give a kernel announcement time to show
    assert neighbour(VIP4) == mac_a and neighbour(VIP6) == mac_a

    run(NS_B, "announce", "l2b")  # one GARP and one NA, no traffic from the observer
    wait_neighbour(VIP4, mac_b)
    wait_neighbour(VIP6, mac_b)
    run(NS_A, "remove", "l2a")    # break only after make
    poke(VIP4)
    poke(VIP6)
    assert neighbour(VIP4) == mac_b and neighbour(VIP6) == mac_b
    # Removing twice and adding twice are no errors.
    run(NS_A, "remove", "l2a")
    run(NS_B, "add", "l2b")
