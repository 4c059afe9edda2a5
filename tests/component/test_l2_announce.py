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


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def in_ns(ns: str, *argv: str) -> str:
    return sh("ip", "netns", "exec", ns, *argv)


def delete_namespaces() -> None:
    for ns in (NS_A, NS_B, NS_C):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def segment() -> Iterator[dict[str, str]]:
    delete_namespaces()
    try:
        for ns in (NS_A, NS_B, NS_C):
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(NS_C, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(NS_C, "ip", "addr", "add", "198.51.100.3/24", "dev", "br0")
        in_ns(NS_C, "ip", "addr", "add", "2001:db8:12::3/64", "dev", "br0", "nodad")
        in_ns(NS_C, "ip", "link", "set", "br0", "up")
        macs = {}
        for ns, dev, n in ((NS_A, "l2a", 1), (NS_B, "l2b", 2)):
            in_ns(ns, "ip", "link", "add", dev, "type", "veth", "peer", "name", f"{dev}p",
                  "netns", NS_C)
            in_ns(ns, "ip", "addr", "add", f"198.51.100.{n}/24", "dev", dev)
            in_ns(ns, "ip", "addr", "add", f"2001:db8:12::{n}/64", "dev", dev, "nodad")
            in_ns(ns, "ip", "link", "set", dev, "up")
            in_ns(NS_C, "ip", "link", "set", f"{dev}p", "master", "br0", "up")
            macs[ns] = json.loads(in_ns(ns, "ip", "-j", "link", "show", dev))[0]["address"]
        yield macs
    finally:
        delete_namespaces()


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
