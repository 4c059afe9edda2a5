"""Steering ruleset rendering (golden text), policy routing plans, counters."""

from __future__ import annotations

from anycast_lb.cluster import nft, routing
from anycast_lb.cluster.ownership import MapPlan

K1 = ("203.0.113.99", 40001, "198.51.100.10", 80)
K2 = ("203.0.113.98", 40002, "198.51.100.10", 443)
S = nft.NftSettings(
    table="anycast_lb", interface="lan0",
    services=(("198.51.100.10", 80), ("198.51.100.10", 443)),
    peers=("203.0.113.2", "203.0.113.3"), fwmark_base=0x1B0000, dead_timeout=30,
)

GOLDEN_TABLE = """\
table ip anycast_lb {}
delete table ip anycast_lb
table ip anycast_lb {
	counter steered {}
	counter second_chance {}
	counter dead_owner {}
	counter received {}
	counter refused {}
	set services { type ipv4_addr . inet_service; elements = { 198.51.100.10 . 80, 198.51.100.10 . 443 }; }
	map owner { type ipv4_addr . inet_service . ipv4_addr . inet_service : mark; }
	set dead { type ipv4_addr . inet_service . ipv4_addr . inet_service; flags timeout; timeout 30s; }
	chain prerouting {
		type filter hook prerouting priority raw; policy accept;
		ip daddr . tcp dport @services jump steer
	}
	chain steer {
		tcp flags & syn == syn return
		iifname "lan0" goto receive
		meta mark set ip saddr . tcp sport . ip daddr . tcp dport map @owner counter name "steered" return
		socket wildcard 1 goto orphan
		socket transparent 0 return
		goto orphan
	}
	chain orphan {
		ip saddr . tcp sport . ip daddr . tcp dport @dead counter name "dead_owner" return
		counter name "second_chance" dup to 203.0.113.2 device "lan0" dup to 203.0.113.3 device "lan0" drop
	}
	chain receive {
		socket wildcard 1 counter name "refused" drop
		socket transparent 0 counter name "received" accept
		counter name "refused" drop
	}
}
add element ip anycast_lb owner { 203.0.113.99 . 40001 . 198.51.100.10 . 80 : 0x1b0001 }
"""


def test_full_table_golden() -> None:
    assert nft.render_table(S, (0, 1), {K1: 1}) == GOLDEN_TABLE


def test_no_live_peer_means_no_second_chance_and_no_empty_element_line() -> None:
    text = nft.render_table(S, (), {})
    assert "dup to" not in text and "second_chance\" " not in text
    assert "add element" not in text


def test_update_rewrites_the_orphan_chain_and_moves_a_flow_in_one_script() -> None:
    plan = MapPlan(delete=(K1,), add=((K1, 0), (K2, 1)), dead=(K2,))
    assert nft.render_update(S, (1,), plan) == (
        "flush chain ip anycast_lb orphan\n"
        'add rule ip anycast_lb orphan ip saddr . tcp sport . ip daddr . tcp dport @dead '
        'counter name "dead_owner" return\n'
        'add rule ip anycast_lb orphan counter name "second_chance" '
        'dup to 203.0.113.3 device "lan0" drop\n'
        "delete element ip anycast_lb owner { 203.0.113.99 . 40001 . 198.51.100.10 . 80 }\n"
        "add element ip anycast_lb owner { 203.0.113.99 . 40001 . 198.51.100.10 . 80 : 0x1b0000, "
        "203.0.113.98 . 40002 . 198.51.100.10 . 443 : 0x1b0001 }\n"
        "add element ip anycast_lb dead { 203.0.113.98 . 40002 . 198.51.100.10 . 443 }\n"
    )
    assert nft.render_update(S, None, MapPlan()) == ""


def test_large_updates_are_cut_into_statements_of_1000_elements() -> None:
    keys = [("203.0.113.5", 1024 + i, "198.51.100.10", 80) for i in range(2500)]
    text = nft.render_update(S, None, MapPlan(add=tuple((k, 0) for k in keys)))
    lines = text.splitlines()
    assert len(lines) == 3 and [line.count(" : ") for line in lines] == [1000, 1000, 500]


def test_delete_script_never_fails_on_a_missing_table() -> None:
    assert nft.render_delete(S) == "table ip anycast_lb {}\ndelete table ip anycast_lb\n"


def test_parse_counters() -> None:
    doc = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"counter": {"family": "ip", "name": "steered", "table": "anycast_lb", "packets": 7,
                     "bytes": 420}},
        {"counter": {"family": "ip", "name": "other", "table": "anycast_lb", "packets": 1}},
    ]}
    assert nft.parse_counters(doc) == {"steered": 7}


R = routing.RoutingSettings("lan0", ("203.0.113.2", "203.0.113.3"), 0x1B0000, 4200, 100)
FRESH = [{"priority": 0, "src": "all", "table": "local"},
         {"priority": 32766, "src": "all", "table": "main"},
         {"priority": 32767, "src": "all", "table": "default"}]
INSTALLED = [{"priority": 100, "src": "all", "fwmark": "0x1b0000", "table": "4200"},
             {"priority": 101, "src": "all", "fwmark": "0x1b0001", "table": "4201"},
             {"priority": 164, "src": "all", "table": "local"},
             *FRESH[1:]]


def test_routing_setup_on_a_fresh_namespace() -> None:
    assert routing.setup_commands(R, FRESH) == [
        ["ip", "route", "replace", "default", "via", "203.0.113.2", "dev", "lan0", "onlink",
         "table", "4200"],
        ["ip", "route", "replace", "default", "via", "203.0.113.3", "dev", "lan0", "onlink",
         "table", "4201"],
        ["ip", "rule", "add", "pref", "100", "fwmark", "0x1b0000", "lookup", "4200"],
        ["ip", "rule", "add", "pref", "101", "fwmark", "0x1b0001", "lookup", "4201"],
        # The local rule moves: added below the fwmark rules before it leaves 0.
        ["ip", "rule", "add", "pref", "164", "lookup", "local"],
        ["ip", "rule", "del", "pref", "0", "lookup", "local"],
    ]


def test_routing_setup_after_a_crash_adds_no_rule_twice() -> None:
    assert [c for c in routing.setup_commands(R, INSTALLED) if c[1] == "rule"] == []


def test_routing_teardown_restores_local_first_and_removes_only_its_own() -> None:
    foreign = {"priority": 101, "src": "203.0.113.0/24", "fwmark": "0x1b0001", "table": "4201"}
    assert routing.teardown_commands(R, [*INSTALLED[:1], foreign, *INSTALLED[2:]]) == [
        ["ip", "rule", "add", "pref", "0", "lookup", "local"],
        ["ip", "rule", "del", "pref", "164", "lookup", "local"],
        ["ip", "rule", "del", "pref", "100", "fwmark", "0x1b0000", "lookup", "4200"],
        ["ip", "route", "flush", "table", "4200"],
        ["ip", "route", "flush", "table", "4201"],
    ]
    assert routing.teardown_commands(R, FRESH) == [
        ["ip", "route", "flush", "table", "4200"], ["ip", "route", "flush", "table", "4201"]]


def test_sysctls_set_forwarding_and_loosen_strict_rp_filter_only() -> None:
    keys = routing.sysctl_keys("lan0")
    assert routing.sysctl_changes("lan0", dict.fromkeys(keys, 0)) == {"net/ipv4/ip_forward": 1}
    strict_all = {keys[0]: 1, keys[1]: 1, keys[2]: 0}
    assert routing.sysctl_changes("lan0", strict_all) == {"net/ipv4/conf/lan0/rp_filter": 2}
    loose = {keys[0]: 1, keys[1]: 1, keys[2]: 2}
    assert routing.sysctl_changes("lan0", loose) == {}
