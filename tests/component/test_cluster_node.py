"""Two whole nodes with a ``cluster`` section on 127.0.0.1: membership shows
in /status and /metrics, and a stopping node leaves the cluster at once.

``flow_survival: false`` here: the steering data path would change this
namespace's nftables, rules and sysctls (benchmarks/cluster_steering.py
proves it in scratch namespaces instead)."""

from __future__ import annotations

import asyncio
import base64
import socket
from pathlib import Path
from typing import Any

import aiohttp

from anycast_lb.config import parse_config
from anycast_lb.node import Node
from anycast_lb.status import Status
from tests.waiting import wait_until


def bound_udp_socket() -> socket.socket:
    """A UDP socket on 127.0.0.1, port 0: a node's sync endpoint, held from
    before the configs that name its port are written."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    path.write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
    path.chmod(0o600)
    return path


def config(name: str, port: int, peer: int, key: Path) -> dict[str, Any]:
    return {
        "node": {"name": name},
        "api": {"listen": "127.0.0.1:0"},
        "drain": {"timeout": 1, "announce_grace": 0.1},
        "services": [{"name": "web", "vip": "127.0.0.1", "port": 1,
                      "backends": [{"address": "127.0.0.1", "port": 9}],
                      "health": {"kind": "none", "interval": 0.2, "timeout": 0.1}}],
        "cluster": {"flow_survival": False, "address": "127.0.0.1", "port": port,
                    "interface": "lo", "peers": [f"127.0.0.1:{port}", f"127.0.0.1:{peer}"],
                    "heartbeat_interval": 0.05, "peer_expiry": 0.3, "key_file": str(key)},
    }


async def get(node: Node, path: str) -> Any:
    assert node.api_address is not None
    url = f"http://127.0.0.1:{node.api_address[1]}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await (response.text() if path == "/metrics" else response.json())


async def test_nodes_see_each_other_and_a_stopping_node_leaves(tmp_path: Path) -> None:
    sa, sb = bound_udp_socket(), bound_udp_socket()
    pa, pb = sa.getsockname()[1], sb.getsockname()[1]
    key = key_file(tmp_path)
    a = Node(parse_config(config("lb1", pa, pb, key)), bind_overrides={"web": ("127.0.0.1", 0)},
             cluster_sock=sa, check_jitter=False)
    b = Node(parse_config(config("lb2", pb, pa, key)), bind_overrides={"web": ("127.0.0.1", 0)},
             cluster_sock=sb, check_jitter=False)
    tasks = []
    for node in (a, b):
        started = asyncio.Event()
        tasks.append(asyncio.create_task(node.run(started)))
        await started.wait()
    try:
        await wait_until(lambda: a.cluster is not None and a.cluster.status()["live_peers"] == 1,
                         what="lb1 hears lb2")
        status = await get(a, "/status")
        assert Status.model_validate(status).cluster is not None
        cluster = status["cluster"]
        assert cluster["flow_survival"] == "off"
        assert cluster["reason"] == "cluster.flow_survival is false"
        (peer,) = cluster["peers"]
        assert (peer["name"], peer["alive"], peer["steering_receiver"]) == ("lb2", True, False)
        metrics = await get(a, "/metrics")
        assert "anycast_lb_cluster_live_peers 1.0" in metrics
        sent = next(line for line in metrics.splitlines()
                    if line.startswith("anycast_lb_cluster_sync_datagrams_sent_total "))
        assert float(sent.split()[1]) > 0  # lb2 heard lb1's heartbeats
        assert 'anycast_lb_cluster_sync_published_total{kind="snapshot"}' in metrics
        assert "anycast_lb_cluster_flow_survival 0.0" in metrics
        assert cluster["sync"]["rejected"] == {"unknown_peer": 0, "malformed": 0, "bad_mac": 0,
                                               "replay": 0}
        assert 'anycast_lb_cluster_sync_datagrams_rejected_total{reason="bad_mac"} 0.0' in metrics
        b.request_stop()
        await tasks[1]
        # lb2's leaving heartbeat: dead well before the 0.3 s expiry runs out.
        await wait_until(lambda: a.status()["cluster"]["live_peers"] == 0, timeout=0.25,
                         what="lb1 sees lb2 leave")
    finally:
        a.request_stop()
        b.request_stop()
        await asyncio.gather(*tasks)
