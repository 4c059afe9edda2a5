"""Read a namespace's kernel FIB over netlink: the next hops of one prefix.

Scenarios poll the router's FIB every few milliseconds to time convergence;
spawning ``ip route`` that often would cost more than the thing measured, so
this holds one NETLINK_ROUTE socket created inside the router namespace
(:func:`anycast_lb.lab.netns.netlink_socket`) and dumps the IPv4 main table,
which in the lab holds about a dozen routes (well under a millisecond).

Message layouts: ``linux/netlink.h`` (nlmsghdr), ``linux/rtnetlink.h``
(rtmsg, rtattr, rtnexthop).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

from anycast_lb.errors import LabError
from anycast_lb.lab import netns

_NLMSG_HDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")
_RTNEXTHOP = struct.Struct("=HBBi")
_RTM_NEWROUTE, _RTM_GETROUTE = 24, 26
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_RTA_DST, _RTA_GATEWAY, _RTA_MULTIPATH, _RTA_TABLE = 1, 5, 9, 15
_RTNH_F_DEAD, _RTNH_F_LINKDOWN = 0x1, 0x10
_RT_TABLE_MAIN = 254


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            break
        out[kind & 0x3FFF] = data[offset + _RTATTR.size: offset + length]
        offset += _align(length)
    return out


def parse_route(msg: bytes) -> tuple[str, list[str]] | None:
    """(prefix, usable next hops) from one RTM_NEWROUTE payload (after the
    nlmsghdr); None for routes outside the main table. Next hops flagged
    dead or linkdown are left out: the kernel does not use them."""
    family, dst_len, _, _, table, _, _, _, _ = _RTMSG.unpack_from(msg, 0)
    if family != socket.AF_INET:
        return None
    attrs = _attrs(msg, _RTMSG.size, len(msg))
    table_id = struct.unpack("=I", attrs[_RTA_TABLE])[0] if _RTA_TABLE in attrs else table
    if table_id != _RT_TABLE_MAIN:
        return None
    dst = socket.inet_ntoa(attrs[_RTA_DST]) if _RTA_DST in attrs else "0.0.0.0"
    prefix = str(ipaddress.ip_network(f"{dst}/{dst_len}", strict=False))
    hops: list[str] = []
    if _RTA_GATEWAY in attrs:
        hops.append(socket.inet_ntoa(attrs[_RTA_GATEWAY]))
    if _RTA_MULTIPATH in attrs:
        blob = attrs[_RTA_MULTIPATH]
        offset = 0
        while offset + _RTNEXTHOP.size <= len(blob):
            length, flags, _, _ = _RTNEXTHOP.unpack_from(blob, offset)
            if length < _RTNEXTHOP.size:
                break
            sub = _attrs(blob, offset + _RTNEXTHOP.size, offset + length)
            if _RTA_GATEWAY in sub and not flags & (_RTNH_F_DEAD | _RTNH_F_LINKDOWN):
                hops.append(socket.inet_ntoa(sub[_RTA_GATEWAY]))
            offset += _align(length)
    return prefix, sorted(hops)


class FibReader:
    """Next hops of one prefix in a namespace's kernel FIB."""

    def __init__(self, ns: str) -> None:
        self._sock = netns.netlink_socket(ns)
        self._sock.settimeout(1.0)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> FibReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def routes(self) -> dict[str, list[str]]:
        """Prefix -> usable next hops, for the IPv4 main table.

        Raises LabError on a netlink error or timeout."""
        self._seq += 1
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        header = _NLMSG_HDR.pack(_NLMSG_HDR.size + len(body), _RTM_GETROUTE,
                                 _NLM_F_REQUEST | _NLM_F_DUMP, self._seq, 0)
        out: dict[str, list[str]] = {}
        try:
            self._sock.send(header + body)
            while True:
                data = self._sock.recv(1 << 16)
                offset = 0
                while offset + _NLMSG_HDR.size <= len(data):
                    length, kind, _, seq, _ = _NLMSG_HDR.unpack_from(data, offset)
                    if length < _NLMSG_HDR.size:
                        raise LabError("netlink: malformed message")
                    if seq == self._seq:
                        if kind == _NLMSG_DONE:
                            return out
                        if kind == _NLMSG_ERROR:
                            code = struct.unpack_from("=i", data, offset + _NLMSG_HDR.size)[0]
                            if code:
                                raise LabError(f"netlink route dump: errno {-code}")
                        if kind == _RTM_NEWROUTE:
                            parsed = parse_route(data[offset + _NLMSG_HDR.size: offset + length])
                            if parsed:
                                out[parsed[0]] = parsed[1]
                    offset += _align(length)
        except OSError as exc:
            raise LabError(f"netlink route dump: {exc}") from exc

    def nexthops(self, prefix: str) -> list[str]:
        """Usable next hops for ``prefix`` (e.g. ``198.51.100.10/32``), sorted."""
        return self.routes().get(prefix, [])

    def wait(self, prefix: str, predicate: object, timeout: float,
             interval: float = 0.005) -> tuple[float, list[str]]:
        """Poll until ``predicate(nexthops)`` holds; return (monotonic time, hops).

        Raises LabError after ``timeout`` seconds."""
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        while True:
            hops = self.nexthops(prefix)
            now = time.monotonic()
            if predicate(hops):
                return now, hops
            if now >= deadline:
                raise LabError(f"FIB of {prefix}: condition not met within {timeout:.1f} s "
                               f"(next hops now {hops})")
            time.sleep(interval)
