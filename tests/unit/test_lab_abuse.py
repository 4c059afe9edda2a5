"""Pure parts of the abuse scenarios: evidence parsing, figures, forged packets."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

import pytest

from anycast_lb.cluster import wire
from anycast_lb.cluster.keys import KeyRing, key_id
from anycast_lb.errors import ClusterAuthError
from anycast_lb.lab import abuse_results as R
from anycast_lb.lab import forger, results, topology
from anycast_lb.lab.results import Target

METRICS = """\
# HELP anycast_lb_backend_up 1 while the backend is up
# TYPE anycast_lb_backend_up gauge
anycast_lb_backend_up{service="echo",backend="198.51.100.193:9000"} 1.0
anycast_lb_flows_refused_total{service="echo-udp",reason="cap"} 7.0
anycast_lb_flows_refused_total{service="echo",reason="cap"} 3.0
anycast_lb_flows_refused_created{service="echo",reason="cap"} 1.7e9
anycast_lb_udp_flow_cap{service="echo-udp"} 812.0
anycast_lb_tcp_connection_cap 400.0
anycast_lb_udp_flows_per_source_cap{service="echo-udp"} 50.0
anycast_lb_node_draining 0.0
"""


def test_metrics_are_read_when_present_and_none_when_absent() -> None:
    samples = R.parse_metrics(METRICS)
    assert R.metric_sum(samples, R.REFUSED_NAME) == 10.0          # _created left out
    assert R.metric_sum(samples, R.REFUSED_NAME, {"service": ["echo-udp"]}) == 7.0
    assert R.metric_min(samples, R.UDP_CAP_NAME, {"service": ["echo-udp"]}) == 812.0
    assert R.metric_min(samples, R.TCP_CAP_NAME) == 400.0
    assert R.metric_sum(samples, R.REJECTED_SYNC_NAME) is None
    assert R.metric_sum(samples, R.HEALTH_FAILED_NAME) is None
    assert R.delta(None, 5.0) == 5.0 and R.delta(2.0, 5.0) == 3.0 and R.delta(2.0, None) is None


def test_log_summary_counts_volume_and_failures() -> None:
    lines = (
        ["ts=2026-01-01T00:00:00.001Z level=error event=forward.accept_error error=EMFILE"] * 60
        + ["ts=2026-01-01T00:00:01.500Z level=info event=health.transition service=echo "
           "backend=b state=down detail=x",
           "ts=2026-01-01T00:00:01.600Z level=info event=health.transition service=echo "
           "backend=b state=up detail=y",
           "ts=2026-01-01T00:00:01.700Z level=info event=service.unhealthy service=echo",
           "ts=2026-01-01T00:00:01.800Z level=info event=route.withdraw prefix=p",
           "ts=2026-01-01T00:00:01.900Z level=info event=cluster.peer_down peer=x",
           "an ExaBGP line without a timestamp"]
    )
    s = R.log_summary(lines, 2.0)
    assert s["lines"] == 66 and s["lines_per_s"] == 33.0
    assert s["peak_lines_per_s"] == 60
    assert (s["health_failures"], s["service_unhealthy"], s["route_withdraws"],
            s["peer_down"]) == (1, 1, 1, 1)
    assert s["top_events"]["forward.accept_error"] == 60


def test_route_counts_sum_every_next_hop_lost() -> None:
    changes = [{"ms": -1500.0, "nexthops": ["lb1", "lb2", "lb3"]},
               {"ms": 1200.0, "nexthops": ["lb3"]},
               {"ms": 1300.0, "nexthops": []},
               {"ms": 9000.0, "nexthops": ["lb1"]}]
    r = R.route_counts(changes)
    assert r["withdraws"] == 3 and r["min_nexthops"] == 0
    assert r["timeline"] == [[-1500.0, 3], [1200.0, 1], [1300.0, 0], [9000.0, 1]]
    assert R.route_counts(changes[:1])["withdraws"] == 0


def test_forged_keys_found_in_nft_listing() -> None:
    text = """table ip anycast_lb {
        map owner {
                type ipv4_addr . inet_service . ipv4_addr . inet_service : mark
                elements = { 203.0.113.2 . 1024 . 198.51.100.10 . 80 : 0x001b0000,
                             203.0.113.2 . 41000 . 198.51.100.10 . 80 : 0x001b0001,
                             203.0.113.9 . 1100 . 198.51.100.10 . 80 : 0x001b0000 }
        }
}"""
    assert R.forged_keys(text, "203.0.113.2", (1024, 1523), "198.51.100.10") == {1024}
    assert R.forged_keys("", "203.0.113.2", (1024, 1523), "198.51.100.10") == set()


def test_peers_all_alive() -> None:
    assert R.peers_all_alive({"cluster": None}) is None
    assert R.peers_all_alive({"cluster": {"peers": [{"alive": True}, {"alive": True}]}})
    assert not R.peers_all_alive({"cluster": {"peers": [{"alive": True}, {"alive": False}]}})


def test_min_new_success_replaces_the_no_failure_checks() -> None:
    rows: list[list[object]] = [[1.0 + i / 1000, 2.0, 1, "198.51.100.129", "be1", ""]
                                for i in range(199)] + [[1.6, 1000.0, 0, "", "", "timeout"]]
    traffic = {"new": rows, "long": []}
    hops = ["203.0.113.6"]
    target = Target(fib_unchanged=True, min_new_success=0.99)
    r = results.analyse("udp-flood", traffic, [(0.0, hops)], 1.5, hops, hops, {}, {}, 1, target)
    assert r["new_success_pct"] == 99.5 and r["checks"] == {"new_success": True,
                                                            "fib_unchanged": True}
    rows += [[1.7, 1000.0, 0, "", "", "timeout"]] * 2
    r = results.analyse("udp-flood", {"new": rows, "long": []}, [(0.0, hops)], 1.5, hops, hops,
                        {}, {}, 1, target)
    assert r["pass"] is False


def test_forged_datagrams_decode_as_the_impersonated_peer() -> None:
    plan = {"client": "203.0.113.2", "ports": [1024, 1523], "vip": "198.51.100.10",
            "vip_port": 80}
    peer = {"name": "lb2", "epoch": 77, "seq": 5}
    src, dst = ("198.51.100.130", 7946), ("198.51.100.129", 7946)
    sealed = [wire.seal(d, i + 1, forger.FORGER_KEY, key_id(forger.FORGER_KEY), src, dst)
              for i, d in enumerate(forger.datagrams(plan, peer, 0, 1_000))]
    # Well-formed: they decode with the injector's own key ...
    own = KeyRing(forger.FORGER_KEY, (forger.FORGER_KEY,))
    messages = [wire.decode(d, own, src, dst) for d in sealed]
    # ... and with no key a node holds.
    node_keys = KeyRing(b"k" * 32, (b"k" * 32,))
    for d in sealed:
        with pytest.raises(ClusterAuthError):
            wire.decode(d, node_keys, src, dst)
    deltas = [m for m in messages if isinstance(m, wire.DeltaMessage)]
    assert sum(len(m.added) for m in deltas) == 500
    assert all(m.header.epoch == 77 and m.header.seq > 5 + forger.SEQ_AHEAD for m in deltas)
    assert all(since == 1_000 + forger.DAY_MS for m in deltas for since in m.added.values())
    beats = [m for m in messages if isinstance(m, wire.Heartbeat)]
    assert [b.leaving for b in beats] == [True, False]
    assert beats[1].header.epoch != 77
    assert isinstance(messages[-1], wire.SnapshotRequest)


def test_forged_packet_is_ipv4_udp_from_the_spoofed_source() -> None:
    pkt = forger.packet(("198.51.100.130", 7946), ("198.51.100.129", 7946), b"hello")
    version_ihl, _, total, _, _, _, proto, _, src, dst = struct.unpack_from("!BBHHHBBH4s4s", pkt)
    assert (version_ihl, total, proto) == (0x45, len(pkt), socket.IPPROTO_UDP)
    assert (socket.inet_ntoa(src), socket.inet_ntoa(dst)) == ("198.51.100.130", "198.51.100.129")
    sport, dport, length, _ = struct.unpack_from("!HHHH", pkt, 20)
    assert (sport, dport, length, pkt[28:]) == (7946, 7946, 13, b"hello")


def test_flood_source_is_a_lab_address_apart_from_every_link() -> None:
    topo = topology.plan(topology.MAX_NODES, topology.MAX_BACKENDS)
    assert topology.FLOOD_ADDRESS in topology.FLOOD_PREFIX
    assert topology.in_lab_prefixes(topology.FLOOD_ADDRESS)
    links = [ipaddress.ip_interface(f"{n.address}/30").network for n in topo.nodes]
    links.append(ipaddress.ip_interface(f"{topo.client_address}/30").network)
    assert not any(topology.FLOOD_PREFIX.overlaps(net) for net in links)


@pytest.mark.parametrize("argv", [
    ["udp", "--port", "9000", "--count", "10", "--rate", "10"],
    ["tcp", "--port", "80", "--count", "10", "--rate", "10"],
])
def test_flood_refuses_outside_its_namespace(argv: list[str]) -> None:
    from anycast_lb.lab import flood

    assert flood.main(["--ns", "alb-client", "--source", "203.0.113.65",
                       "--vip", "198.51.100.10", "--out", "/dev/null", *argv]) == 2


def test_forger_refuses_outside_its_namespace(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text('{"client": "203.0.113.2", "vip": "198.51.100.10", "targets": []}')
    assert forger.main(["--ns", "alb-be3", "--plan", str(plan), "--out", "/dev/null"]) == 2
