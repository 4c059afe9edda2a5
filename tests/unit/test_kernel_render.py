"""The kernel engine's nft text: table, diffs and drain phases (pure)."""

from __future__ import annotations

import ipaddress

import pytest

from anycast_lb.kernel import render
from anycast_lb.maglev import build_table

VIP = ipaddress.IPv4Address("192.0.2.10")
A, B, C = (ipaddress.IPv4Address(f"198.51.100.{i}") for i in (1, 2, 3))
MA, MB, MC = (render.backend_mark(x) for x in (A, B, C))


def _svc(index: int = 0, protocol: str = "tcp", size: int = 7) -> render.KernelService:
    return render.KernelService(index, VIP, 80 + index, protocol, size,
                                render.derive_seed(VIP, 80 + index, protocol, size), 300, 1024)


def _settings(*services: render.KernelService) -> render.KernelSettings:
    return render.KernelSettings("anycast_lb_fwd", "lan0", services or (_svc(),))


def test_seed_is_a_function_of_the_shared_service_config() -> None:
    seed = render.derive_seed(VIP, 80, "tcp", 65537)
    assert seed == render.derive_seed(ipaddress.IPv4Address("192.0.2.10"), 80, "tcp", 65537)
    assert 0 <= seed < 2**32
    others = {render.derive_seed(VIP, 81, "tcp", 65537), render.derive_seed(VIP, 80, "udp", 65537),
              render.derive_seed(VIP, 80, "tcp", 65521),
              render.derive_seed(ipaddress.IPv4Address("192.0.2.11"), 80, "tcp", 65537)}
    assert seed not in others and len(others) == 4


def test_marks_follow_the_maglev_table_whatever_the_config_order() -> None:
    size = 65537
    forward = render.marks(build_table([str(x) for x in (A, B, C)], size=size), [A, B, C])
    backward = render.marks(build_table([str(x) for x in (C, B, A)], size=size), [C, B, A])
    assert forward == backward
    assert set(forward) == {MA, MB, MC}


@pytest.mark.parametrize(("protocol", "expected"), [
    ("tcp", [
        "\t\tip daddr 192.0.2.10 tcp dport 80 jump s0",
        "\t\tmeta mark set ip saddr . tcp sport . ip daddr . tcp dport map @s0_flow goto s0_fwd",
        "\t\ttcp flags & (syn | ack) == syn meta mark set meta mark map @s0_cur goto s0_fwd",
        "\t\tmeta mark set meta mark map @s0_prev goto s0_fwd",
        "\t\tupdate @s0_flow { ip saddr . tcp sport . ip daddr . tcp dport : meta mark }",
    ]),
    ("udp", [
        "\t\tip daddr 192.0.2.10 udp dport 80 jump s0",
        "\t\tmeta mark set ip saddr . udp sport . ip daddr . udp dport map @s0_flow goto s0_fwd",
        "\t\tmeta mark set meta mark map @s0_cur goto s0_fwd",
        "\t\tupdate @s0_flow { ip saddr . udp sport . ip daddr . udp dport : meta mark }",
    ]),
])
def test_table_rules(protocol: str, expected: list[str]) -> None:
    svc = _svc(protocol=protocol)
    text = render.render_table(_settings(svc), {})
    lines = text.splitlines()
    for line in expected:
        assert line in lines
    assert lines[:3] == ["table netdev anycast_lb_fwd {}", "delete table netdev anycast_lb_fwd",
                         "table netdev anycast_lb_fwd {"]
    assert '\t\ttype filter hook ingress device "lan0" priority filter; policy accept;' in lines
    assert (f"\t\tmeta mark set jhash {svc.tuple} mod 7 seed {svc.seed:#010x}") in lines
    assert '\t\tfwd ip to meta mark map @s0_addr device "lan0"' in lines
    assert "\t\tcounter name meta mark map @s0_ctr" in lines
    assert "\tmap s0_ctr { type mark : counter; }" in lines
    assert ("\tmap s0_flow { type ipv4_addr . inet_service . ipv4_addr . inet_service : mark; "
            "size 1024; flags dynamic,timeout; timeout 300s; }") in lines
    if protocol == "udp":
        assert "s0_prev goto" not in text  # no SYN in UDP: every miss uses the current table
        assert "delete @s0_flow" not in text
    else:
        # A SYN forgets an earlier connection's entry first (a reused 5-tuple).
        forget = lines.index("\t\ttcp flags & (syn | ack) == syn delete @s0_flow "
                             "{ ip saddr . tcp sport . ip daddr . tcp dport : meta mark }")
        assert forget < lines.index(expected[1])
    assert "flush" not in text and "typeof" not in text


def test_ingress_on_another_interface() -> None:
    """``forwarding.kernel.ingress``: the hook on the uplink, ``fwd`` out of the LAN leg."""
    settings = render.KernelSettings("anycast_lb_fwd", "lan0", (_svc(),), ingress="up0")
    lines = render.render_table(settings, {}).splitlines()
    assert '\t\ttype filter hook ingress device "up0" priority filter; policy accept;' in lines
    assert '\t\tfwd ip to meta mark map @s0_addr device "lan0"' in lines


def test_table_loads_the_maps() -> None:
    tables = render.steady((MA, MB, MA, MC, MB, MC, MA), [A, B, C])
    text = render.render_table(_settings(), {0: tables})
    assert ("add element netdev anycast_lb_fwd s0_addr { 0xc6336401 : 198.51.100.1, "
            "0xc6336402 : 198.51.100.2, 0xc6336403 : 198.51.100.3 }") in text
    cur = ("s0_cur { 0 : 0xc6336401, 1 : 0xc6336402, 2 : 0xc6336401, 3 : 0xc6336403, "
           "4 : 0xc6336402, 5 : 0xc6336403, 6 : 0xc6336401 }")
    assert f"add element netdev anycast_lb_fwd {cur}" in text
    assert "add element netdev anycast_lb_fwd s0_prev { 0 : 0xc6336401," in text


def test_large_loads_are_chunked() -> None:
    size = 65537
    tables = render.steady([MA] * size, [A])
    lines = render.render_table(_settings(_svc(size=size)), {0: tables}).splitlines()
    cur = [line for line in lines if line.startswith("add element netdev anycast_lb_fwd s0_cur")]
    assert len(cur) == (size + 1999) // 2000
    assert sum(line.count(" : ") for line in cur) == size


def test_two_services_get_their_own_chains_and_maps() -> None:
    text = render.render_table(_settings(_svc(0), _svc(1, "udp")), {})
    assert "ip daddr 192.0.2.10 tcp dport 80 jump s0" in text
    assert "ip daddr 192.0.2.10 udp dport 81 jump s1" in text
    assert "\tchain s1_fwd {" in text and "\tmap s1_cur { type mark : mark; }" in text


OLD = render.steady((MA, MB, MC, MA, MB, MC, MA), [A, B, C])


@pytest.mark.parametrize(("new", "expected"), [
    # Nothing changed: nothing sent.
    (OLD, []),
    # A health change: one backend gone from both tables, its address last.
    (render.steady((MA, MB, MB, MA, MB, MA, MA), [A, B]), [
        "delete element netdev anycast_lb_fwd s0_cur { 2, 5 }",
        "add element netdev anycast_lb_fwd s0_cur { 2 : 0xc6336402, 5 : 0xc6336401 }",
        "delete element netdev anycast_lb_fwd s0_prev { 2, 5 }",
        "add element netdev anycast_lb_fwd s0_prev { 2 : 0xc6336402, 5 : 0xc6336401 }",
        "delete element netdev anycast_lb_fwd s0_addr { 0xc6336403 }",
        "delete element netdev anycast_lb_fwd s0_ctr { 0xc6336403 }",
        "delete counter netdev anycast_lb_fwd s0_bc6336403",
    ]),
    # A drain starts: only the current table changes; the address stays.
    (render.start_drain(OLD, (MA, MB, MB, MA, MB, MA, MA)), [
        "delete element netdev anycast_lb_fwd s0_cur { 2, 5 }",
        "add element netdev anycast_lb_fwd s0_cur { 2 : 0xc6336402, 5 : 0xc6336401 }",
    ]),
    # A backend joins: its address first, then the slots naming it.
    (render.steady((MA, MB, MC, MA, MB, MC, MA), [A, B, C, ipaddress.IPv4Address("198.51.100.4")]),
     ["add counter netdev anycast_lb_fwd s0_bc6336404",
      "add element netdev anycast_lb_fwd s0_addr { 0xc6336404 : 198.51.100.4 }",
      'add element netdev anycast_lb_fwd s0_ctr { 0xc6336404 : "s0_bc6336404" }']),
    # The last backend fails: every slot goes, the address map empties.
    (render.steady((), []), [
        "delete element netdev anycast_lb_fwd s0_cur { 0, 1, 2, 3, 4, 5, 6 }",
        "delete element netdev anycast_lb_fwd s0_prev { 0, 1, 2, 3, 4, 5, 6 }",
        "delete element netdev anycast_lb_fwd s0_addr { 0xc6336401, 0xc6336402, 0xc6336403 }",
        "delete element netdev anycast_lb_fwd s0_ctr { 0xc6336401, 0xc6336402, 0xc6336403 }",
        "delete counter netdev anycast_lb_fwd s0_bc6336401",
        "delete counter netdev anycast_lb_fwd s0_bc6336402",
        "delete counter netdev anycast_lb_fwd s0_bc6336403",
    ]),
])
def test_diff_sends_changed_elements_only(new: render.Tables, expected: list[str]) -> None:
    assert render.render_diff(_settings(), _svc(), OLD, new).splitlines() == expected


def test_diff_from_empty_adds_every_slot() -> None:
    lines = render.render_diff(_settings(), _svc(), render.Tables(), OLD).splitlines()
    assert lines[:3] == [f"add counter netdev anycast_lb_fwd s0_bc633640{i}" for i in (1, 2, 3)]
    assert lines[3].startswith("add element netdev anycast_lb_fwd s0_addr {")
    assert lines[4] == ('add element netdev anycast_lb_fwd s0_ctr { 0xc6336401 : "s0_bc6336401", '
                        '0xc6336402 : "s0_bc6336402", 0xc6336403 : "s0_bc6336403" }')
    assert lines[5].startswith("add element netdev anycast_lb_fwd s0_cur { 0 : 0xc6336401,")
    assert not any(line.startswith("delete") for line in lines)


def test_drain_phases() -> None:
    drained = (MA, MB, MB, MA, MB, MA, MA)
    draining = render.start_drain(OLD, drained)
    assert draining.draining
    assert draining.current == drained and draining.previous == OLD.previous
    assert MC in draining.backends  # flows moved here still reach it
    done = render.promote(draining, [A, B])
    assert not done.draining
    assert done.previous == drained and MC not in done.backends
    assert render.render_diff(_settings(), _svc(), draining, done).splitlines() == [
        "delete element netdev anycast_lb_fwd s0_prev { 2, 5 }",
        "add element netdev anycast_lb_fwd s0_prev { 2 : 0xc6336402, 5 : 0xc6336401 }",
        "delete element netdev anycast_lb_fwd s0_addr { 0xc6336403 }",
        "delete element netdev anycast_lb_fwd s0_ctr { 0xc6336403 }",
        "delete counter netdev anycast_lb_fwd s0_bc6336403",
    ]
    # Promotion keeping the address set (the drained backend may come back).
    assert render.promote(draining).backends == OLD.backends


def test_delete_and_probe() -> None:
    assert render.render_delete(_settings()) == (
        "table netdev anycast_lb_fwd {}\ndelete table netdev anycast_lb_fwd\n")
    probe = render.render_probe("anycast_lb_probe", "eth0")
    assert 'type filter hook ingress device "eth0"' in probe
    assert "seed 0x1" in probe and "flags dynamic,timeout" in probe and "fwd ip to" in probe


def test_parse_counters() -> None:
    doc = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"counter": {"family": "netdev", "name": "s0_bc6336401", "table": "anycast_lb_fwd",
                     "packets": 12, "bytes": 3400}},
        {"counter": {"name": "s1_bc6336402", "packets": 1, "bytes": 60}},
        {"counter": {"name": "s7_bc6336402", "packets": 1, "bytes": 60}},  # no such service
        {"counter": {"name": "other", "packets": 5, "bytes": 5}},
        {"counter": {"name": "s0_bzzzzzzzz", "packets": 5, "bytes": 5}},
    ]}
    s = _settings(_svc(0), _svc(1, "udp"))
    assert render.parse_counters(doc, s) == {(0, A): (12, 3400), (1, B): (1, 60)}
    assert render.parse_counters({"nftables": "junk"}, s) == {}
