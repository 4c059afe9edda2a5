"""The kernel fence's nftables script (pure text; the rules themselves run
in tests/lab/test_l2.py and tests/component/test_election_l2.py)."""

from __future__ import annotations

import ipaddress

from anycast_lb.election.fence import TABLE, _element, ruleset

V4 = ipaddress.IPv4Address("198.51.100.140")
V6 = ipaddress.IPv6Address("2001:db8:100::10")


def test_arp_requests_and_solicitations_for_elected_vips_need_a_live_element() -> None:
    text = ruleset([V6, V4])
    assert (f"arp operation request arp daddr ip {{ {V4} }} arp daddr ip != @alive4 drop"
            in text)
    # ICMPv6 bytes 8-23 of a Neighbor Solicitation are its target (RFC 4861 4.3).
    assert ("icmpv6 type nd-neighbor-solicit @th,64,128 "
            "{ 0x20010db8010000000000000000000010 } @th,64,128 != @alive6 drop") in text
    assert "flags timeout" in text


def test_the_script_replaces_earlier_tables_and_leaves_out_an_unused_family() -> None:
    text = ruleset([V4])
    assert text.index(f"delete table arp {TABLE}") < text.index("set alive4")
    assert f"delete table ip6 {TABLE}" in text and "alive6" not in text


def test_elements_name_the_set_of_their_family() -> None:
    assert _element(V4) == (f"arp {TABLE} alive4", "198.51.100.140")
    assert _element(V6) == (f"ip6 {TABLE} alive6", "0x20010db8010000000000000000000010")
