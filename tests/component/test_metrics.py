"""A live node's /metrics: ``promtool check metrics`` finds nothing to say,
and the BGP, VIP, build and process families carry what the node did; the
node's stderr in ``--log-format json`` is one JSON object per line.

The node is ``anycast-lb run`` with a ``bgp`` section, the real ExaBGP and
the small BGP peer of tests/component/bgp_peer.py (see test_signals.py)."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from anycast_lb import __version__
from anycast_lb.metrics import exabgp_version
from tests.component.test_signals import VIP_PREFIX, BgpNode, bgp_node
from tests.waiting import wait_until

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool_check_metrics(exposition: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on ``exposition`` (its stdin): exit 0 and no
    output when the format and every lint rule pass."""
    return subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, text=True,
                          capture_output=True, timeout=30, check=False)


def samples(exposition: str) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(found: dict[str, list[Sample]], name: str, **labels: str) -> float:
    [sample] = [s for s in found.get(name, []) if all(s.labels.get(k) == v
                                                      for k, v in labels.items())]
    return float(sample.value)


async def _metrics(node: BgpNode) -> str:
    status, body = await node.get("/metrics")
    assert status == 200
    assert isinstance(body, str)
    return body


async def test_live_bgp_node_metrics_pass_promtool_and_say_what_happened(tmp_path: Path) -> None:
    async with bgp_node(tmp_path, "--log-format", "json") as node:
        peer = node.peer.host

        async def settled() -> bool:
            found = samples(await _metrics(node))
            return (value(found, "anycast_lb_bgp_peer_state", peer=peer, state="up") == 1
                    and value(found, "anycast_lb_vip_state", service="web",
                              state="announced") == 1
                    and value(found, "anycast_lb_bgp_announce_ack_seconds_count") >= 1
                    and value(found, "anycast_lb_bgp_peer_updates_sent_total", peer=peer) >= 1)

        await wait_until(settled, timeout=10, interval=0.05, what="peer up and VIP announced")
        exposition = await _metrics(node)
        log_text = node.text()

    checked = promtool_check_metrics(exposition)
    assert checked.returncode == 0 and not checked.stdout.strip() \
        and not checked.stderr.strip(), (checked.stdout, checked.stderr)

    assert not undocumented(exposition)
    found = samples(exposition)
    assert value(found, "anycast_lb_build_info", version=__version__,
                 python=platform.python_version(), exabgp=exabgp_version()) == 1
    assert exabgp_version() != ""
    assert value(found, "anycast_lb_bgp_peer_up", peer=peer) == 1
    for state in ("down", "connected", "unknown"):
        assert value(found, "anycast_lb_bgp_peer_state", peer=peer, state=state) == 0
    assert value(found, "anycast_lb_bgp_peer_uptime_seconds", peer=peer) > 0
    assert value(found, "anycast_lb_bgp_exabgp_running") == 1
    assert value(found, "anycast_lb_bgp_announcer_connected") == 1
    assert value(found, "anycast_lb_bgp_exabgp_restarts_total") == 0
    assert value(found, "anycast_lb_bgp_route_announced", prefix=VIP_PREFIX) == 1
    for state in ("draining", "damped", "withdrawn", "pending", "unconfirmed"):
        assert value(found, "anycast_lb_vip_state", service="web", prefix=VIP_PREFIX,
                     state=state) == 0
    assert value(found, "anycast_lb_vip_damping_penalty", service="web") == 0
    assert value(found, "anycast_lb_vip_last_change_timestamp_seconds", service="web") > 1.7e9
    # The first route set is acked within ExaBGP's per-line timeout.
    assert value(found, "anycast_lb_bgp_announce_ack_seconds_bucket", le="5.0") >= 1
    assert value(found, "process_resident_memory_bytes") > 0
    assert value(found, "process_open_fds") > 0
    assert value(found, "python_info", version=platform.python_version()) == 1

    lines = [line for line in log_text.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    events = {r["event"]: r for r in records}
    assert {"node.started", "bgp.peer", "route.announce", "api.listening"} <= events.keys()
    assert all(list(r)[:3] == ["ts", "level", "event"] for r in records)
    assert events["bgp.peer"]["state"] == "up" and events["bgp.peer"]["level"] == "info"
    assert events["node.started"]["bgp"] is True
    assert events["node.started"]["services"] == 1


def test_every_family_a_live_node_serves_is_documented() -> None:
    """docs/metrics.md names every family of the exposition dumped by the
    test above's kind of node (checked on an in-process node's full
    registry here: pools, shedding, API, build, process)."""
    from anycast_lb.config import parse_config
    from anycast_lb.node import Node

    node = Node(parse_config({
        "node": {"name": "doc"},
        "services": [{"name": "web", "vip": "127.0.0.1", "port": 1,
                      "backends": [{"address": "127.0.0.1", "port": 2}]}],
    }))
    exposition = node.metrics_exposition().decode()
    assert "anycast_lb_build_info 1.0" not in exposition  # it has labels
    assert "process_open_fds" in exposition
    assert not undocumented(exposition)


def undocumented(exposition: str) -> set[str]:
    """Families of ``exposition`` that docs/metrics.md does not name."""
    doc = (Path(__file__).resolve().parents[2] / "docs/metrics.md").read_text()
    names = {f.name for f in text_string_to_metric_families(exposition)}
    return {n for n in names if f"`{n}" not in doc and not n.endswith("_created")}
