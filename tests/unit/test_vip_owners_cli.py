"""``anycast-lb vip owners``: the etcd keys under ``owners/`` read into one
row per VIP (pure)."""

from __future__ import annotations

import json

from anycast_lb.consensus.keys import Layout
from anycast_lb.election.cli import VipOwners, owners_from

LAYOUT = Layout("site1")


def key(vip: str, leaf: str) -> str:
    return f"{LAYOUT.owners}{vip}/{leaf}"


def doc(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_owner_term_since_and_candidates_per_vip_sorted() -> None:
    rows = owners_from([
        (key("192.0.2.101", "candidates/lb2"), doc(node="lb2", priority=100), 7),
        (key("192.0.2.100", "owner"), doc(node="lb1", announced=True, since=1795813200.5), 41),
        (key("192.0.2.100", "candidates/lb1"), doc(node="lb1"), 40),
        (key("192.0.2.100", "candidates/lb2"), doc(node="lb2"), 39),
    ], LAYOUT)
    assert rows == [
        VipOwners("192.0.2.100", "lb1", 41, 1795813200.5, True, ["lb1", "lb2"]),
        VipOwners("192.0.2.101", None, None, None, False, ["lb2"]),
    ]


def test_a_key_not_yet_announced_and_a_garbled_value() -> None:
    rows = owners_from([
        (key("2001:db8::1", "owner"), doc(node="lb3", announced=False), 12),
        (key("192.0.2.102", "owner"), b"{not json", 13),
    ], LAYOUT)
    assert rows == [
        VipOwners("192.0.2.102", None, 13, None, False, []),
        VipOwners("2001:db8::1", "lb3", 12, None, False, []),
    ]
