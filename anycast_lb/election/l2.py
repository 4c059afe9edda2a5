"""L2 VIP announcements: gratuitous ARP (IPv4) and unsolicited Neighbor
Advertisements (IPv6), and the VIP address itself, from the running process.

The frame builders are pure (bytes in, bytes out). :class:`L2Announcer`
sends them on one interface through an ``AF_PACKET`` raw socket (root or
``CAP_NET_RAW``); :class:`VipAddresses` adds and removes the VIP through
rtnetlink (pyroute2; root or ``CAP_NET_ADMIN``). No tool is spawned: a spawned
``arping`` per move costs packets (docs/l2.md).

Neither the kernel's address add nor anything else announces a moved VIP:
Linux sends no gratuitous ARP when an IPv4 address is added, and IPv6 sends
its unsolicited NA only after DAD, never with ``nodad``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
from typing import Any

from anycast_lb.errors import L2Error

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
"""RFC 2464 section 7: 33:33 then the low 32 bits of ff02::1."""
ICMPV6 = 58
ND_NEIGHBOR_ADVERT = 136
NA_FLAG_OVERRIDE = 0x20
"""RFC 4861 section 4.4: R (0x80), S (0x40), O (0x20) in the first flags byte."""
ND_OPT_TARGET_LLADDR = 2

IFA_F_NODAD = 0x02
"""linux/if_addr.h: add an IPv6 address without duplicate address detection
(make-before-break: both nodes hold the VIP for a moment)."""


def mac_bytes(text: str) -> bytes:
    """``02:00:00:00:00:01`` -> 6 bytes; ValueError for any other shape."""
    parts = text.split(":")
    try:
        if len(parts) == 6 and all(len(p) == 2 for p in parts):
            return bytes.fromhex("".join(parts))
    except ValueError:
        pass
    raise ValueError(f"{text!r} is not a MAC address")


def _mac(mac: bytes) -> bytes:
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    return mac


def gratuitous_arp(mac: bytes, vip: ipaddress.IPv4Address) -> bytes:
    """An Ethernet frame (42 bytes) carrying the ARP Announcement of RFC 5227
    section 3: an ARP request (op 1) with sender and target protocol address
    both the VIP, target hardware address zero, to the broadcast address.
    Layout: RFC 826 (htype 1, ptype 0x0800, hlen 6, plen 4)."""
    mac = _mac(mac)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1,
                      mac, vip.packed, b"\x00" * 6, vip.packed)
    return BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp


def icmpv6_checksum(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address,
                    message: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``message`` (its checksum field
    zero) and the IPv6 pseudo-header of RFC 8200 section 8.1: source,
    destination, 32-bit upper-layer length, 3 zero bytes, next header 58."""
    data = src.packed + dst.packed + struct.pack("!I3xB", len(message), ICMPV6) + message
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def unsolicited_na(mac: bytes, vip: ipaddress.IPv6Address) -> bytes:
    """An Ethernet frame (86 bytes) carrying the unsolicited Neighbor
    Advertisement of RFC 4861 section 7.2.6: from the VIP to all-nodes
    ``ff02::1``, hop limit 255, Solicited flag clear, Override flag set,
    target the VIP, with a Target Link-Layer Address option (type 2, length
    1 = 8 bytes) carrying ``mac``. Message layout: RFC 4861 section 4.4."""
    mac = _mac(mac)
    option = struct.pack("!BB6s", ND_OPT_TARGET_LLADDR, 1, mac)
    body = struct.pack("!BBHB3x16s", ND_NEIGHBOR_ADVERT, 0, 0, NA_FLAG_OVERRIDE, vip.packed) + option
    checksum = icmpv6_checksum(vip, ALL_NODES, body)
    body = body[:2] + struct.pack("!H", checksum) + body[4:]
    ipv6 = struct.pack("!IHBB16s16s", 6 << 28, len(body), ICMPV6, 255, vip.packed, ALL_NODES.packed)
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + ipv6 + body


def announcement(mac: bytes, vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The frame that moves a neighbour's entry for ``vip`` to ``mac``."""
    if isinstance(vip, ipaddress.IPv4Address):
        return gratuitous_arp(mac, vip)
    return unsolicited_na(mac, vip)


class L2Announcer:
    """Sends announcements on one interface through an ``AF_PACKET`` socket.

    :meth:`open` raises :class:`L2Error` when the interface does not exist or
    the process lacks ``CAP_NET_RAW``. :attr:`mac` is the interface's own
    address, read from the bound socket.
    """

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self._sock: socket.socket | None = None
        self.mac = b""
        self.sent = 0
        """Frames sent (counter)."""

    def open(self) -> None:
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError as exc:
            raise L2Error(f"raw socket for L2 announcements: {exc}") from exc
        try:
            sock.bind((self.interface, 0))
            self.mac = bytes(sock.getsockname()[4])[:6]
        except OSError as exc:
            sock.close()
            raise L2Error(f"interface {self.interface!r}: {exc}") from exc
        sock.setblocking(False)
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def announce(self, vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        """Send one announcement of ``vip`` at this interface's MAC. A full
        transmit queue drops it (the next one of the schedule follows)."""
        if self._sock is None:
            self.open()
        assert self._sock is not None
        try:
            self._sock.send(announcement(self.mac, vip))
            self.sent += 1
        except BlockingIOError:
            pass
        except OSError as exc:
            raise L2Error(f"announce {vip} on {self.interface}: {exc}") from exc


class VipAddresses:
    """Adds and removes VIPs (``/32``, ``/128`` with ``nodad``) on one
    interface through rtnetlink (``lo`` too: ``manage_address``). Both are
    idempotent and return whether they changed anything (False: the address
    was already there, or already gone); other failures raise
    :class:`L2Error`. Calls run in a thread (netlink is blocking)."""

    def __init__(self, interface: str) -> None:
        self.interface = interface

    def _call(self, command: str, vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        from pyroute2 import IPRoute  # imported at use: Linux only
        from pyroute2.netlink.exceptions import NetlinkError

        # pyroute2 runs its own event loop in this thread. A standard one:
        # under the node's uvloop policy a new loop would be uvloop's, which
        # cannot open a netlink (AF_NETLINK) socket.
        loop = asyncio.SelectorEventLoop()
        try:
            with IPRoute(use_event_loop=loop) as ipr:
                links = ipr.link_lookup(ifname=self.interface)
                if not links:
                    raise L2Error(f"interface {self.interface!r} not found")
                args: dict[str, Any] = {"index": links[0], "address": str(vip),
                                        "prefixlen": vip.max_prefixlen}
                if vip.version == 6:
                    args["flags"] = IFA_F_NODAD
                try:
                    ipr.addr(command, **args)
                except NetlinkError as exc:
                    if (command, exc.code) in (("add", errno.EEXIST),
                                               ("del", errno.EADDRNOTAVAIL)):
                        return False
                    raise L2Error(f"{command} {vip} on {self.interface}: {exc}") from exc
            return True
        finally:
            # One turn so the closed transport's callbacks run, then close.
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def add(self, vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return await asyncio.to_thread(self._call, "add", vip)

    async def remove(self, vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return await asyncio.to_thread(self._call, "del", vip)
