"""The L2 lab's pure parts: the figures from a client record, and the
frames the measuring client parses and sends."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from anycast_lb.election.l2 import gratuitous_arp, icmpv6_checksum, unsolicited_na
from anycast_lb.lab.l2 import L2_SCENARIOS, analyse
from anycast_lb.lab.l2probe import (
    arp_request,
    neighbor_solicitation,
    parse_answer,
    parse_question,
)

A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
NAMES = {A: "lb1", B: "lb2"}
V4 = ipaddress.IPv4Address("198.51.100.140")
V6 = ipaddress.IPv6Address("2001:db8:100::10")


def record(lost: tuple[float, float] | None, both_at: float | None = None,
           move_at: float = 1.4) -> dict[str, Any]:
    """3 s of client record: a datagram every 1 ms (lost within ``lost``),
    a probe every 10 ms answered by lb1 before ``move_at`` and lb2 after
    (and by both in the round at ``both_at``)."""
    sent = [i / 1000 for i in range(3000)]
    recv: list[float | None] = [
        None if lost and lost[0] <= t < lost[1] else t + 0.0005 for t in sent]
    probes = [k / 100 for k in range(300)]
    answers = [[t + 0.001, A if t < move_at else B, "reply"] for t in probes]
    if both_at is not None:
        answers.append([both_at + 0.002, A, "reply"])
    return {"vip": str(V4), "start": 0.0, "end": 3.0,
            "udp": {"interval_ms": 1.0, "sent": sent, "recv": recv, "errors": []},
            "tcp": [{"flow": 0, "connected_at": 0.1, "broken": [[1.01, "ConnectionResetError"]],
                     "reconnected": [1.6], "lines": 20}],
            "capture": [[0.5, A, "garp"], [move_at + 0.005, B, "garp"]],
            "probe": {"interval_ms": 10.0, "sent": probes, "answers": answers}}


def test_an_unplanned_move_resumes_after_the_last_lost_datagram() -> None:
    r = analyse(record(lost=(1.0, 1.4)), 1.0, NAMES, L2_SCENARIOS["l2-owner-kill"], 1.0)
    assert r["udp_lost"] == 400 and r["udp_lost_before_event"] == 0
    assert r["resumed_ms"] == 400.0 and r["outage_ms"] == 400.0
    assert (r["old_owner"], r["new_owner"]) == ("lb1", "lb2")
    assert r["split_brain_ms"] == 0 and r["passive_overlap_ms"] == 0
    assert r["tcp_broken"] == 1 and r["tcp_reconnected_max_ms"] == 600.0
    assert r["checks"] == {"split_brain_zero": True, "moved_to_expected": True,
                           "resumed_within_bound": True}
    assert r["pass"]
    late = analyse(record(lost=(1.0, 1.6)), 1.0, NAMES, L2_SCENARIOS["l2-owner-kill"], 1.0)
    assert late["resumed_ms"] == 600.0 and late["checks"]["resumed_within_bound"]
    never = analyse(record(lost=(1.0, 3.0)), 1.0, NAMES, L2_SCENARIOS["l2-owner-kill"], 1.0)
    assert never["resumed_ms"] is None and not never["pass"]


def test_a_later_blip_counts_as_lost_but_not_against_the_resume_time() -> None:
    rec = record(lost=(1.0, 1.4))
    recv = rec["udp"]["recv"]
    for i in range(1900, 1930):
        recv[i] = None
    r = analyse(rec, 1.0, NAMES, L2_SCENARIOS["l2-owner-kill"], 1.0)
    assert r["udp_lost"] == 430 and r["resumed_ms"] == 400.0


def test_two_macs_answering_one_probe_round_is_a_split_brain() -> None:
    r = analyse(record(lost=None, both_at=2.0), 1.0, NAMES, L2_SCENARIOS["l2-drain"], 1.0)
    assert r["udp_lost"] == 0 and r["checks"]["zero_lost"]
    assert r["split_brain_ms"] == 10.0
    assert r["split_brain_spans_ms"] == [[1000.0, 1010.0]]
    assert not r["checks"]["split_brain_zero"] and not r["pass"]


def test_a_planned_move_that_loses_a_datagram_fails() -> None:
    r = analyse(record(lost=(1.2, 1.201)), 1.0, NAMES, L2_SCENARIOS["l2-drain"], 1.0)
    assert r["udp_lost"] == 1 and not r["checks"]["zero_lost"]


def test_the_client_parses_the_nodes_announcements() -> None:
    mac = bytes.fromhex("02000000000b")
    assert parse_answer(gratuitous_arp(mac, V4), V4) == (B, "garp")
    assert parse_answer(unsolicited_na(mac, V6), V6) == (B, "na-o")
    assert parse_answer(gratuitous_arp(mac, V4), ipaddress.IPv4Address("198.51.100.141")) is None
    reply = bytearray(gratuitous_arp(mac, V4))
    reply[20:22] = struct.pack("!H", 2)
    assert parse_answer(bytes(reply), V4) == (B, "reply")


def test_probes_ask_for_the_vip_with_valid_frames() -> None:
    mac = bytes.fromhex("02000000000c")
    sender = ipaddress.IPv4Address("198.51.100.191")
    frame = arp_request(mac, sender, V4)
    assert frame[:6] == b"\xff" * 6 and frame[38:42] == V4.packed
    assert parse_question(frame, V4) == "ff:ff:ff:ff:ff:ff"
    assert parse_answer(frame, V4) is None  # a question, not an answer
    sender6 = ipaddress.IPv6Address("2001:db8:100::bf")
    ns = neighbor_solicitation(mac, sender6, V6)
    # Solicited-node multicast ff02::1:ff00:10 (RFC 4291 2.7.1), its MAC 33:33:ff:00:00:10.
    group = ipaddress.IPv6Address("ff02::1:ff00:10")
    assert ns[:6] == bytes.fromhex("3333ff000010") and ns[38:54] == group.packed
    assert ns[21] == 255 and ns[54] == 135 and ns[62:78] == V6.packed
    assert icmpv6_checksum(sender6, group, ns[54:]) == 0  # checksum verifies
    assert parse_question(ns, V6) == "33:33:ff:00:00:10"


def test_the_l2_plan_adds_a_client_and_a_prober_on_the_backend_lan() -> None:
    from anycast_lb.lab import topology as T

    topo = T.plan(3, 3, l2=True)
    assert topo.consensus and len(topo.etcd) == 3  # l2 implies consensus
    assert topo.namespaces[-2:] == [topo.arp_ns, topo.probe_ns]
    addresses = T.all_addresses(topo)
    assert len(set(addresses)) == len(addresses)
    assert all(T.in_lab_prefixes(a) for a in addresses)
    lan = ipaddress.ip_network("198.51.100.128/25")
    assert all(a in lan for a in (T.L2_VIP, T.L2_CLIENT, T.L2_PROBE))
    six = [T.l2_node_address6(n) for n in topo.nodes] + [T.L2_VIP6, T.L2_CLIENT6, T.L2_PROBE6]
    assert len(set(six)) == len(six) and all(a in T.L2_PREFIX6 for a in six)
    assert T.plan(3, 3, consensus=True).namespaces == [
        n for n in topo.namespaces if n not in (topo.arp_ns, topo.probe_ns)]


def test_l2_node_configs_elect_the_vips_by_priority_an_ipv6_one_beside_ipv4_bgp() -> None:
    from pathlib import Path

    from anycast_lb.config import AnnounceVia, parse_config
    from anycast_lb.lab import nodes
    from anycast_lb.lab import topology as T

    topo = T.plan(3, 3, l2=True)
    priorities = []
    for node in topo.nodes:
        config = parse_config(nodes.node_config(topo, node, Path("/x/admin-token")), "test")
        l2 = [s for s in config.services if s.announce.via is AnnounceVia.L2]
        assert {str(s.vip) for s in l2} == {str(T.L2_VIP), str(T.L2_VIP6)} and len(l2) == 4
        assert config.election.interface == node.lan_if and config.election.preempt
        assert config.consensus is not None and config.consensus.lease_ttl == 1.0
        priorities.append(config.election.priority)
    assert priorities == sorted(priorities, reverse=True) and len(set(priorities)) == 3
