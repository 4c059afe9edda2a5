"""Gratuitous ARP and unsolicited NA frames, byte for byte against the RFC layouts."""

from __future__ import annotations

import ipaddress

import pytest

from anycast_lb.election.l2 import (
    announcement,
    gratuitous_arp,
    icmpv6_checksum,
    mac_bytes,
    unsolicited_na,
)

MAC = bytes.fromhex("020000000001")


def test_gratuitous_arp_is_the_rfc5227_announcement() -> None:
    frame = gratuitous_arp(MAC, ipaddress.IPv4Address("192.0.2.10"))
    expected = bytes.fromhex(
        "ffffffffffff"      # Ethernet destination: broadcast
        "020000000001"      # Ethernet source: the announcer
        "0806"              # EtherType ARP
        "0001"              # RFC 826 hardware type: Ethernet
        "0800"              # protocol type: IPv4
        "06" "04"           # hardware / protocol address lengths
        "0001"              # op: request (RFC 5227 section 3 announcement)
        "020000000001"      # sender hardware address
        "c000020a"          # sender protocol address: the VIP
        "000000000000"      # target hardware address: zero
        "c000020a"          # target protocol address: the VIP again
    )
    assert frame == expected and len(frame) == 42


def test_unsolicited_na_is_the_rfc4861_advertisement_with_override() -> None:
    vip = ipaddress.IPv6Address("2001:db8::10")
    frame = unsolicited_na(MAC, vip)
    expected = bytes.fromhex(
        "333300000001"      # Ethernet destination: all-nodes multicast (RFC 2464 section 7)
        "020000000001"      # Ethernet source
        "86dd"              # EtherType IPv6
        "60000000"          # version 6, traffic class 0, flow label 0
        "0020"              # payload length 32
        "3a"                # next header ICMPv6
        "ff"                # hop limit 255 (RFC 4861 section 7.1.2)
        "20010db8000000000000000000000010"   # source: the VIP
        "ff020000000000000000000000000001"   # destination: ff02::1
        "88"                # type 136 Neighbor Advertisement
        "00"                # code 0
        "f90c"              # checksum
        "20000000"          # R=0 S=0 O=1, reserved
        "20010db8000000000000000000000010"   # target address: the VIP
        "02" "01"           # option Target Link-Layer Address, length 1 (8 bytes)
        "020000000001"      # the announcer's MAC
    )
    assert frame == expected and len(frame) == 86


@pytest.mark.parametrize("vip", ["2001:db8::10", "2001:db8:12::100", "fe80::1", "2001:db8::ffff:ffff"])
def test_the_na_checksum_verifies_over_the_pseudo_header(vip: str) -> None:
    # RFC 1071: summing the message with its checksum in place gives all ones.
    address = ipaddress.IPv6Address(vip)
    frame = unsolicited_na(MAC, address)
    message = frame[14 + 40:]
    pseudo = address.packed + ipaddress.IPv6Address("ff02::1").packed + \
        len(message).to_bytes(4, "big") + b"\x00\x00\x00\x3a"
    data = pseudo + message
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF
    assert icmpv6_checksum(address, ipaddress.IPv6Address("ff02::1"),
                           message[:2] + b"\x00\x00" + message[4:]) == \
        int.from_bytes(message[2:4], "big")


def test_announcement_picks_the_family_and_macs_are_checked() -> None:
    assert announcement(MAC, ipaddress.ip_address("192.0.2.1"))[12:14] == b"\x08\x06"
    assert announcement(MAC, ipaddress.ip_address("2001:db8::1"))[12:14] == b"\x86\xdd"
    assert mac_bytes("02:00:00:00:00:01") == MAC
    for bad in ("02:00:00:00:00", "0200.0000.0001", "02:00:00:00:00:zz"):
        with pytest.raises(ValueError):
            mac_bytes(bad)
    with pytest.raises(ValueError):
        gratuitous_arp(b"\x02" * 5, ipaddress.IPv4Address("192.0.2.1"))
