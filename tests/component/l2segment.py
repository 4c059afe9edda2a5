"""A scratch L2 segment for the L2 announcement and election tests: hosts A
and B, each with a veth into a bridge in namespace C (``br0``, the
neighbour whose table the tests read). Addresses from 198.51.100.0/24 and,
with ``ipv6``, 2001:db8:12::/64 (RFC 5737, RFC 3849): A .1, B .2, C .3."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def in_ns(ns: str, *argv: str) -> str:
    return sh("ip", "netns", "exec", ns, *argv)


def delete_namespaces(*names: str) -> None:
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@contextmanager
def segment(ns_a: str, ns_b: str, ns_c: str, ipv6: bool = False) -> Iterator[dict[str, str]]:
    """Build the segment (after removing any left-over namespaces of these
    names), yield each host namespace's MAC (``{ns_a: mac, ns_b: mac}``;
    A's device is ``l2a``, B's ``l2b``), and delete the namespaces by name."""
    delete_namespaces(ns_a, ns_b, ns_c)
    try:
        for ns in (ns_a, ns_b, ns_c):
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(ns_c, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(ns_c, "ip", "addr", "add", "198.51.100.3/24", "dev", "br0")
        if ipv6:
            in_ns(ns_c, "ip", "addr", "add", "2001:db8:12::3/64", "dev", "br0", "nodad")
        in_ns(ns_c, "ip", "link", "set", "br0", "up")
        macs = {}
        for ns, dev, n in ((ns_a, "l2a", 1), (ns_b, "l2b", 2)):
            in_ns(ns, "ip", "link", "add", dev, "type", "veth", "peer", "name", f"{dev}p",
                  "netns", ns_c)
            in_ns(ns, "ip", "addr", "add", f"198.51.100.{n}/24", "dev", dev)
            if ipv6:
                in_ns(ns, "ip", "addr", "add", f"2001:db8:12::{n}/64", "dev", dev, "nodad")
            in_ns(ns, "ip", "link", "set", dev, "up")
            in_ns(ns_c, "ip", "link", "set", f"{dev}p", "master", "br0", "up")
            macs[ns] = json.loads(in_ns(ns, "ip", "-j", "link", "show", dev))[0]["address"]
        yield macs
    finally:
        delete_namespaces(ns_a, ns_b, ns_c)
