"""PROXY protocol version 2 headers (HAProxy's ``proxy-protocol.txt``, section 2.2).

Pure functions, no I/O. A terminating proxy hides the client's address from
the backend; the forwarder sends this binary header as the first bytes of
each backend connection so the backend learns the real client and the VIP
the client reached. Layout (all integers network byte order)::

    12 bytes  signature  \\r\\n\\r\\n\\x00\\r\\nQUIT\\n
     1 byte   version (high nibble, 2) | command (low nibble, 0 LOCAL, 1 PROXY)
     1 byte   family (high nibble, 1 AF_INET, 2 AF_INET6)
              | transport (low nibble, 1 STREAM, 2 DGRAM)
     2 bytes  length of what follows (addresses + TLVs), bytes
    AF_INET:  src addr (4), dst addr (4), src port (2), dst port (2)   = 12
    AF_INET6: src addr (16), dst addr (16), src port (2), dst port (2) = 36

The source is the client, the destination the address the client connected
to (the VIP). TLVs after the addresses are skipped by the parser.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Literal

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12-byte v2 signature (section 2.2)."""

_VERSION_2 = 0x20
_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
_FIXED = struct.Struct("!12sBBH")
_V4 = struct.Struct("!4s4sHH")
_V6 = struct.Struct("!16s16sHH")
_UNIX_ADDRESS_LEN = 216

_PTON = socket.inet_pton
_INET = socket.AF_INET
_HEADER_V4 = struct.Struct("!12sBBH4s4sHH")
"""The fixed part and an IPv4 address block, packed in one call."""

Transport = Literal["tcp", "udp"]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ProxyHeaderError(ValueError):
    """Not a valid v2 header (parsing), or arguments no header can carry
    (building). The module raises no other error."""


class IncompleteHeader(ProxyHeaderError):
    """``data`` holds the start of a valid header but not all of it yet:
    read more bytes and parse again."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed v2 header.

    ``client`` and ``local`` are (address, port); both are None for the LOCAL
    command (health checks from the proxy itself) and for families this
    parser does not report (AF_UNSPEC, AF_UNIX). ``length`` is the whole
    header's size in bytes: the payload starts at ``data[length:]``.
    """

    client: tuple[str, int] | None
    local: tuple[str, int] | None
    protocol: Transport | None
    length: int


def _same_family(a: Address, b: Address) -> tuple[Address, Address]:
    """Both addresses in one family: an IPv4-mapped IPv6 address (a dual-stack
    socket) is unmapped, and if the families still differ the IPv4 one is
    mapped into IPv6 (``::ffff:a.b.c.d``), since the header has one family."""
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    if a.version == b.version:
        return a, b
    if isinstance(a, ipaddress.IPv4Address):
        a = ipaddress.IPv6Address(f"::ffff:{a}")
    if isinstance(b, ipaddress.IPv4Address):
        b = ipaddress.IPv6Address(f"::ffff:{b}")
    return a, b


def v2_header(client: tuple[str, int], local: tuple[str, int], protocol: Transport) -> bytes:
    """The v2 PROXY-command header for one connection or flow.

    ``client`` is the client's (address, port), ``local`` the (address, port)
    it connected to (the VIP). 28 bytes for IPv4, 52 bytes for IPv6; no TLVs.
    Raises ProxyHeaderError (a ValueError) if an address is not an IP address, a port is outside
    0-65535, or ``protocol`` is neither "tcp" nor "udp".
    """
    if protocol == "tcp":
        transport = _STREAM
    elif protocol == "udp":
        transport = _DGRAM
    else:
        raise ProxyHeaderError(f"protocol must be 'tcp' or 'udp', not {protocol!r}")
    src_port, dst_port = client[1], local[1]
    try:
        # Both ends IPv4, the common case, without ipaddress objects (two
        # ip_address() calls cost the relay about 45,000 instructions per
        # connection, half again its whole cost without the header):
        # inet_pton takes the dotted quad that ip_address does and nothing
        # else (no leading zeros, no fewer parts); any other form goes the
        # general way below.
        src4, dst4 = _PTON(_INET, client[0]), _PTON(_INET, local[0])
    except (OSError, ValueError, TypeError):
        pass  # not IPv4 (OSError), a NUL inside (ValueError), not a str
    else:
        if not (0 <= src_port <= 65535 and 0 <= dst_port <= 65535):
            raise ProxyHeaderError(f"port out of range 0-65535: {src_port}, {dst_port}")
        return _HEADER_V4.pack(SIGNATURE, _VERSION_2 | _CMD_PROXY, _AF_INET << 4 | transport,
                               _V4.size, src4, dst4, src_port, dst_port)
    try:
        src, dst = _same_family(ipaddress.ip_address(client[0]), ipaddress.ip_address(local[0]))
    except ValueError as exc:
        raise ProxyHeaderError(str(exc)) from None
    if not (0 <= src_port <= 65535 and 0 <= dst_port <= 65535):
        raise ProxyHeaderError(f"port out of range 0-65535: {src_port}, {dst_port}")
    if src.version == 4:
        family, body = _AF_INET, _V4.pack(src.packed, dst.packed, src_port, dst_port)
    else:
        family, body = _AF_INET6, _V6.pack(src.packed, dst.packed, src_port, dst_port)
    return _FIXED.pack(SIGNATURE, _VERSION_2 | _CMD_PROXY, family << 4 | transport, len(body)) + body


def parse_v2_header(data: bytes) -> ProxyHeader:
    """Parse the v2 header at the start of ``data`` (trailing bytes are payload).

    Raises IncompleteHeader when ``data`` is a valid but truncated prefix
    of a header, and ProxyHeaderError (both ValueErrors) when it is not a v2 header:
    wrong signature or version, unknown command, family or transport, or an
    address block shorter than its family needs.
    """
    fixed = _FIXED.size
    if len(data) < fixed:
        if not SIGNATURE.startswith(bytes(data[: len(SIGNATURE)])):
            raise ProxyHeaderError("not a PROXY protocol v2 signature")
        raise IncompleteHeader(f"need {fixed} bytes, have {len(data)}")
    signature, ver_cmd, fam, length = _FIXED.unpack_from(data)
    if signature != SIGNATURE:
        raise ProxyHeaderError("not a PROXY protocol v2 signature")
    if ver_cmd & 0xF0 != _VERSION_2:
        raise ProxyHeaderError(f"unsupported version {ver_cmd >> 4} (expected 2)")
    command = ver_cmd & 0x0F
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyHeaderError(f"unknown command {command:#x}")
    family, transport = fam >> 4, fam & 0x0F
    if family not in (_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX):
        raise ProxyHeaderError(f"unknown address family {family:#x}")
    if transport not in (0, _STREAM, _DGRAM):
        raise ProxyHeaderError(f"unknown transport {transport:#x}")
    total = fixed + length
    if len(data) < total:
        raise IncompleteHeader(f"need {total} bytes, have {len(data)}")
    needed = {_AF_INET: _V4.size, _AF_INET6: _V6.size, _AF_UNIX: _UNIX_ADDRESS_LEN}.get(family, 0)
    if length < needed:
        raise ProxyHeaderError(f"address block of {length} bytes is too short for family {family:#x}")
    if command == _CMD_LOCAL or family in (_AF_UNSPEC, _AF_UNIX):
        return ProxyHeader(None, None, None, total)
    protocol: Transport | None = None
    if transport == _STREAM:
        protocol = "tcp"
    elif transport == _DGRAM:
        protocol = "udp"
    if family == _AF_INET:
        src, dst, sport, dport = _V4.unpack_from(data, fixed)
        src_ip: Address = ipaddress.IPv4Address(src)
        dst_ip: Address = ipaddress.IPv4Address(dst)
    else:
        src, dst, sport, dport = _V6.unpack_from(data, fixed)
        src_ip, dst_ip = ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst)
    return ProxyHeader((str(src_ip), sport), (str(dst_ip), dport), protocol, total)
