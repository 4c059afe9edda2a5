"""What runs in a node namespace: the node's config, and how it is started.

Two modes:

- ``node`` (default): a real ``anycast-lb run --config node.yaml``, which
  supervises its own ExaBGP child announcing the VIP ``next-hop self``.
- ``static``: a plain ExaBGP announcing the VIP unconditionally, to test the
  topology without the node (no health gating, no forwarder).

The generated node config is a plain dict (written as YAML) and is validated
with :func:`anycast_lb.config.parse_config` before use.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from anycast_lb.cluster.keys import new_key_line, write_key_file
from anycast_lb.config import parse_config, parse_host_port
from anycast_lb.errors import ConfigError, LabError
from anycast_lb.lab import topology as T
from anycast_lb.lab.netns import entered
from anycast_lb.lab.topology import Node, Topology


@dataclass(frozen=True)
class HealthSettings:
    """Health checking in the lab.

    ``interval`` equals ``fast_interval`` on purpose: fall counting starts
    with the first miss, which comes one *stable* interval after the fault
    at worst; with interval 1 s the health-fail target (fall x fast_interval
    + 150 ms) could not hold. Probes are HTTP to the backends' /healthz.
    """

    interval: float = 0.1
    fast_interval: float = 0.1
    timeout: float = 0.1
    rise: int = 2
    fall: int = 3

    def detect_bound_s(self) -> float:
        """Worst case from a fault until the fall-th miss (s)."""
        return self.interval + (self.fall - 1) * self.fast_interval


HEALTH = HealthSettings()
DRAIN_GRACE_S = 1.0
DRAIN_TIMEOUT_S = 5.0
HEARTBEAT_INTERVAL_S = 0.1
PEER_EXPIRY_S = 0.4
"""Flow survival (docs/cluster.md): peer heartbeats every 100 ms, a peer
silent for 400 ms is dead (300-500 ms keeps false expiries away)."""


def node_dir(run_dir: Path, node: Node) -> Path:
    return run_dir / "nodes" / node.name


def node_config(topo: Topology, node: Node, token_file: Path) -> dict[str, Any]:
    """The ``node.yaml`` of one lab node (see anycast_lb/config.py); its
    cluster sync key file sits beside ``token_file``."""
    health = {"kind": "http", "port": T.BACKEND_HTTP_PORT, "path": "/healthz",
              "interval": HEALTH.interval, "fast_interval": HEALTH.fast_interval,
              "timeout": HEALTH.timeout, "rise": HEALTH.rise, "fall": HEALTH.fall}

    def backends(port: int) -> list[dict[str, Any]]:
        return [{"address": str(b.address), "port": port} for b in topo.backends]

    config: dict[str, Any] = {
        "node": {"name": node.name},
        "api": {"listen": T.API_LISTEN, "admin_token_file": str(token_file)},
        "drain": {"timeout": DRAIN_TIMEOUT_S, "announce_grace": DRAIN_GRACE_S},
        "services": [
            {"name": "echo", "vip": str(topo.vip), "port": topo.service_port, "protocol": "tcp",
             "backends": backends(T.BACKEND_ECHO_PORT), "health": health},
            {"name": "web", "vip": str(topo.vip), "port": T.WEB_PORT, "protocol": "tcp",
             "backends": backends(T.BACKEND_HTTP_PORT), "health": health},
            {"name": "echo-udp", "vip": str(topo.vip), "port": T.UDP_PORT, "protocol": "udp",
             "backends": backends(T.BACKEND_ECHO_PORT), "health": health},
        ],
        "bgp": {
            "local_as": T.NODE_AS,
            "router_id": str(node.address),
            "local_address": str(node.address),
            "hold_time": 3,
            "peers": [{"address": str(node.router_address), "peer_as": T.ROUTER_AS}],
            "announce": {"med": 100, "communities": [T.NODE_COMMUNITY]},
            # Scenarios withdraw the same node again and again within
            # seconds; origin damping would (rightly) hold it down and make
            # every later scenario wait minutes for recovery.
            "damping": {"enabled": False},
            "exabgp": str(Path(sys.executable).with_name("exabgp")),
        },
    }
    if topo.flow_survival:
        config["cluster"] = cluster_section(topo, node, token_file.with_name(CLUSTER_KEY))
    if topo.kernel:
        # Client packets arrive on the uplink, leave on the LAN leg for the
        # backend (direct server return). M = 4099 (>= 100 x 8 backends):
        # three nodes filling 3 x 2 x 65537 map elements at once on a
        # 2-core machine take seconds.
        config["forwarding"] = {"engine": "kernel", "kernel": {
            "interface": node.lan_if, "ingress": node.uplink_if}}
        for service in config["services"]:
            service["maglev_table_size"] = KERNEL_TABLE_SIZE
    if topo.consensus:
        config["consensus"] = consensus_section(topo)
    if topo.l2:
        config["services"] += l2_services(topo, health)
        config["election"] = l2_election_section(node)
    return config


KERNEL_TABLE_SIZE = 4099
"""Maglev table size of the kernel engine's lab services (a prime)."""


L2_LEASE_TTL_S = 1.0
L2_REQUEST_TIMEOUT_S = 0.2
L2_SAFETY_MARGIN_S = 0.25


def l2_priority(node: Node) -> int:
    """lb1 200, lb2 150, lb3 100...: lb1 owns the elected VIPs when it can."""
    return max(0, 250 - 50 * node.index)


def l2_election_section(node: Node) -> dict[str, Any]:
    """The node's ``election:`` section in the L2 lab (docs/l2.md)."""
    return {"priority": l2_priority(node), "preempt": True,
            "safety_margin": L2_SAFETY_MARGIN_S, "interface": node.lan_if}


def l2_services(topo: Topology, health: dict[str, Any]) -> list[dict[str, Any]]:
    """TCP echo (port 80) and UDP echo (port 9000) on each elected VIP, ``via: l2``."""
    announce = {"mode": "active_passive", "via": "l2"}
    out: list[dict[str, Any]] = []
    for suffix, vip in (("", T.L2_VIP), ("6", T.L2_VIP6)):
        out += [
            {"name": f"l2-echo{suffix}", "vip": str(vip), "port": T.SERVICE_PORT,
             "protocol": "tcp", "announce": announce, "health": health,
             "backends": [{"address": str(b.address), "port": T.BACKEND_ECHO_PORT}
                          for b in topo.backends]},
            {"name": f"l2-udp{suffix}", "vip": str(vip), "port": T.UDP_PORT,
             "protocol": "udp", "announce": announce, "health": health,
             "backends": [{"address": str(b.address), "port": T.BACKEND_ECHO_PORT}
                          for b in topo.backends]},
        ]
    return out


CONSENSUS_LEASE_TTL_S = 2.0
CONSENSUS_REQUEST_TIMEOUT_S = 0.5


def consensus_section(topo: Topology) -> dict[str, Any]:
    """The node's ``consensus:`` section: the lab's etcd members on the
    management segment, cluster ``lab`` (L2 lab: ``lease_ttl`` 1 s)."""
    return {"endpoints": topo.etcd_urls(), "cluster": T.CONSENSUS_CLUSTER,
            "lease_ttl": L2_LEASE_TTL_S if topo.l2 else CONSENSUS_LEASE_TTL_S,
            "request_timeout": L2_REQUEST_TIMEOUT_S if topo.l2
            else CONSENSUS_REQUEST_TIMEOUT_S}


CLUSTER_KEY = "cluster.key"
"""Name of the sync key file: one per lab run, copied into each node's directory."""


def cluster_section(topo: Topology, node: Node, key_file: Path) -> dict[str, Any]:
    """The node's ``cluster:`` section (flow survival over the node LAN):
    every node's backend-LAN address is in ``peers`` (the node skips its own)."""
    return {
        "key_file": str(key_file),
        "flow_survival": True,
        "address": str(node.lan_address),
        "interface": node.lan_if,
        "peers": [str(n.lan_address) for n in topo.nodes],
        "heartbeat_interval": HEARTBEAT_INTERVAL_S,
        "peer_expiry": PEER_EXPIRY_S,
    }


def check_cluster_support(topo: Topology) -> None:
    """Raise LabError when this build's node config has no ``cluster:``
    section (flow survival), naming what the config rejected."""
    node = topo.nodes[0]
    try:
        parse_config(node_config(topo, node, Path("/nonexistent/admin-token")),
                     f"lab config of {node.name}")
    except ConfigError as exc:
        raise LabError(f"flow survival: this build's node config rejects the lab's "
                       f"cluster section: {exc}") from exc


def write_node_config(topo: Topology, node: Node, run_dir: Path) -> Path:
    """Write token and node.yaml under the node's run directory; return the
    config path. Raises ConfigError when the node's models reject it."""
    directory = node_dir(run_dir, node)
    directory.mkdir(parents=True, exist_ok=True)
    token = directory / "admin-token"
    token.write_text(T.ADMIN_TOKEN + "\n")
    token.chmod(0o600)
    if topo.flow_survival:
        # Every node of one lab run shares one fresh key (mode 0600: the
        # node refuses a key file open to group or others).
        shared = run_dir / CLUSTER_KEY
        if not shared.exists():
            write_key_file(shared, [new_key_line()])
        write_key_file(directory / CLUSTER_KEY, shared.read_text().split())
    data = node_config(topo, node, token)
    parse_config(data, f"lab config of {node.name}")
    path = directory / "node.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


NODE_EXTRA_ARGS: list[str] = []
"""Extra ``anycast-lb run`` arguments for every lab node (e.g. ``--no-uvloop``
to compare event loops)."""


def node_argv(config: Path, nofile: int | None = None) -> list[str]:
    """``anycast-lb run`` with its run directory (announcer socket...) kept
    under the lab's own directory, so teardown leaves nothing in /tmp.

    ``nofile``: run the node with this open-file limit, soft and hard
    (``prlimit``, which execs the node: the PID stays the node's), as a
    host whose service manager grants 1,024 descriptors does; None keeps
    the lab's own limit."""
    limit = ["prlimit", f"--nofile={nofile}:{nofile}", "--"] if nofile else []
    return [*limit, sys.executable, "-m", "anycast_lb", "run", "--config", str(config),
            "--run-dir", str(config.parent / "run"), *NODE_EXTRA_ARGS]


def static_exabgp_config(topo: Topology, node: Node) -> str:
    """ExaBGP config announcing the VIP unconditionally (``static`` mode)."""
    return f"""\
neighbor {node.router_address} {{
    router-id {node.address};
    local-address {node.address};
    local-as {T.NODE_AS};
    peer-as {T.ROUTER_AS};
    hold-time 3;
    family {{
        ipv4 unicast;
    }}
    announce {{
        ipv4 {{
            unicast {topo.vip}/32 next-hop self med 100 community [{T.NODE_COMMUNITY}];
        }}
    }}
}}
"""


EXABGP_ENV = {
    # Stay root (else ExaBGP runs its API process as nobody, which cannot
    # open root-owned files), and no CLI pipes: several nodes' would collide.
    "exabgp_daemon_drop": "false",
    "exabgp_api_cli": "false",
    "exabgp_log_destination": "stdout",
    "exabgp_daemon_daemonize": "false",
}


def static_argv(config: Path) -> list[str]:
    return [str(Path(sys.executable).with_name("exabgp")), "server", str(config)]


def api_request(ns: str, method: str, path: str, token: str | None = None,
                timeout: float = 2.0) -> tuple[int, Any]:
    """Call a node's HTTP API from this process, over a socket created inside
    the node's namespace (the API listens on that namespace's 127.0.0.1).

    Returns (status, parsed JSON body or text). Raises LabError when the
    API cannot be reached."""
    host, port = parse_host_port(T.API_LISTEN)
    with entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((str(host), port))
        conn = http.client.HTTPConnection(str(host), port, timeout=timeout)
        conn.sock = sock
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        conn.close()
    except OSError as exc:
        sock.close()
        raise LabError(f"node API in {ns} ({T.API_LISTEN}): {exc}") from exc
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body
