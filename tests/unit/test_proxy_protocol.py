"""PROXY protocol v2 header: known byte strings from the layout of
HAProxy's proxy-protocol.txt, section 2.2, and the parser's errors."""

from __future__ import annotations

import ipaddress

import pytest

from anycast_lb.forward.proxy_protocol import (
    SIGNATURE,
    IncompleteHeader,
    ProxyHeader,
    ProxyHeaderError,
    parse_v2_header,
    v2_header,
)

SIG = "0d0a0d0a000d0a515549540a"

# 192.0.2.1:56324 -> 198.51.100.10:443, PROXY, AF_INET/STREAM, 12 address bytes.
V4_TCP = bytes.fromhex(SIG + "21" + "11" + "000c" + "c0000201" + "c633640a" + "dc04" + "01bb")
# [2001:db8::1]:1234 -> [2001:db8::2]:53, PROXY, AF_INET6/DGRAM, 36 address bytes.
V6_UDP = bytes.fromhex(
    SIG + "21" + "22" + "0024"
    + "20010db8000000000000000000000001"
    + "20010db8000000000000000000000002"
    + "04d2" + "0035"
)


def test_signature_is_the_spec_bytes() -> None:
    assert SIGNATURE == b"\r\n\r\n\x00\r\nQUIT\n"
    assert len(SIGNATURE) == 12


def test_ipv4_tcp_header_bytes() -> None:
    assert v2_header(("192.0.2.1", 56324), ("198.51.100.10", 443), "tcp") == V4_TCP
    assert len(V4_TCP) == 28


def test_ipv6_udp_header_bytes() -> None:
    assert v2_header(("2001:db8::1", 1234), ("2001:db8::2", 53), "udp") == V6_UDP
    assert len(V6_UDP) == 52


@pytest.mark.parametrize(
    ("client", "local", "protocol"),
    [
        (("10.0.0.1", 1), ("10.0.0.2", 65535), "tcp"),
        (("0.0.0.0", 0), ("255.255.255.255", 80), "udp"),
        (("::1", 40000), ("fe80::1", 8443), "tcp"),
        (("2001:db8::1", 5353), ("2001:db8::ffff", 53), "udp"),
    ],
)
def test_parse_round_trip_with_payload(
    client: tuple[str, int], local: tuple[str, int], protocol: str
) -> None:
    header = v2_header(client, local, protocol)  # type: ignore[arg-type]
    parsed = parse_v2_header(header + b"GET / HTTP/1.1\r\n")
    assert parsed == ProxyHeader(client, local, protocol, len(header))  # type: ignore[arg-type]


def test_parse_known_bytes() -> None:
    assert parse_v2_header(V4_TCP) == ProxyHeader(
        ("192.0.2.1", 56324), ("198.51.100.10", 443), "tcp", 28
    )
    assert parse_v2_header(V6_UDP) == ProxyHeader(
        ("2001:db8::1", 1234), ("2001:db8::2", 53), "udp", 52
    )


def test_ipv4_mapped_client_on_ipv4_vip_is_unmapped() -> None:
    assert v2_header(("::ffff:192.0.2.1", 56324), ("198.51.100.10", 443), "tcp") == V4_TCP


def test_mixed_families_map_ipv4_into_ipv6() -> None:
    header = v2_header(("192.0.2.1", 1000), ("2001:db8::2", 53), "udp")
    assert header[13] == 0x22  # AF_INET6 / DGRAM
    client = parse_v2_header(header).client
    assert client is not None and client[1] == 1000
    # Compared as addresses: Python 3.13 prints an IPv4-mapped address as
    # ::ffff:192.0.2.1, earlier versions as ::ffff:c000:201.
    assert ipaddress.ip_address(client[0]) == ipaddress.IPv6Address("::ffff:192.0.2.1")


def test_tlvs_after_addresses_are_skipped() -> None:
    tlv = bytes.fromhex("04" + "0004" + "deadbeef")  # PP2_TYPE_NOOP, 4 bytes
    data = bytearray(V4_TCP)
    data[14:16] = (12 + len(tlv)).to_bytes(2, "big")
    parsed = parse_v2_header(bytes(data) + tlv + b"payload")
    assert parsed.length == 28 + len(tlv)
    assert parsed.client == ("192.0.2.1", 56324)


def test_local_command_has_no_addresses() -> None:
    local = bytes.fromhex(SIG + "20" + "00" + "0000")
    assert parse_v2_header(local) == ProxyHeader(None, None, None, 16)


@pytest.mark.parametrize("cut", [0, 1, 11, 12, 15, 16, 27])
def test_truncated_header_is_incomplete(cut: int) -> None:
    with pytest.raises(IncompleteHeader):
        parse_v2_header(V4_TCP[:cut])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PROXY TCP4 192.0.2.1 198.51.100.10 56324 443\r\n", "signature"),
        (b"GET", "signature"),
        (V4_TCP[:12] + b"\x11" + V4_TCP[13:], "version"),
        (V4_TCP[:12] + b"\x22" + V4_TCP[13:], "command"),
        (V4_TCP[:13] + b"\x41" + V4_TCP[14:], "family"),
        (V4_TCP[:13] + b"\x13" + V4_TCP[14:], "transport"),
        (bytes.fromhex(SIG + "21" + "21" + "000c") + bytes(12), "too short"),
    ],
)
def test_malformed_header_raises(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_v2_header(data)
    assert not isinstance(info.value, IncompleteHeader)


@pytest.mark.parametrize(
    ("client", "local", "protocol"),
    [
        (("not-an-ip", 1), ("10.0.0.2", 2), "tcp"),
        (("10.0.0.1", 70000), ("10.0.0.2", 2), "tcp"),
        (("10.0.0.1", 1), ("10.0.0.2", 2), "sctp"),
    ],
)
def test_builder_rejects_bad_input(
    client: tuple[str, int], local: tuple[str, int], protocol: str
) -> None:
    with pytest.raises(ValueError):
        v2_header(client, local, protocol)  # type: ignore[arg-type]


def _general_v4(client: tuple[str, int], local: tuple[str, int]) -> bytes:
    """The IPv4 header built from ipaddress objects (the general path's way)."""
    src, dst = ipaddress.IPv4Address(client[0]), ipaddress.IPv4Address(local[0])
    body = src.packed + dst.packed + client[1].to_bytes(2, "big") + local[1].to_bytes(2, "big")
    return SIGNATURE + bytes([0x21, 0x11]) + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize("address", ["0.0.0.0", "255.255.255.255", "192.0.2.1", "10.20.30.40", "127.0.0.1"])
def test_ipv4_fast_path_gives_the_general_bytes(address: str) -> None:
    for client, local in (((address, 0), ("198.51.100.10", 443)), (("203.0.113.7", 65535), (address, 80))):
        assert v2_header(client, local, "tcp") == _general_v4(client, local)


@pytest.mark.parametrize("address", ["01.2.3.4", "1.2.3", "1.2.3.4\x00", "256.1.1.1", "1.2.3.4 ", ""])
def test_ipv4_spellings_that_ip_address_refuses_are_refused(address: str) -> None:
    with pytest.raises(ProxyHeaderError):
        v2_header((address, 1), ("198.51.100.10", 443), "tcp")


def test_ipv4_port_out_of_range_is_refused() -> None:
    with pytest.raises(ProxyHeaderError, match="port out of range"):
        v2_header(("192.0.2.1", -1), ("198.51.100.10", 443), "tcp")
