"""FRR in lab namespaces: render configs from ``labs/frr`` and run the daemons.

Daemons drop to user ``frr`` (FRR refuses root as the vty group), every path is
private per namespace (``-f``, ``-i``, ``-z``, ``--vty_socket``, ``-P 0``,
``--bfdctl``) because all namespaces share one
filesystem, and output goes to a log file. Daemons run in the foreground (no
``-d``) so the PID the lab records is the daemon's own.

``anycast_lb/lab/templates`` is a link to ``labs/frr`` so the templates ship
inside the package.
"""

from __future__ import annotations

import json
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anycast_lb.errors import LabError
from anycast_lb.lab import netns
from anycast_lb.lab.state import LabState
from anycast_lb.lab.topology import NODE_AS, ROUTER_AS, Node, Topology

TEMPLATES = Path(__file__).resolve().parent / "templates"
FRR_BIN = Path("/usr/lib/frr")
BFD_INTERVAL_MS = 100
BFD_MULTIPLIER = 3
_WELL_KNOWN = {"graceful-shutdown": "65535:0", "accept-own": "65535:1",
               "blackhole": "65535:666", "no-export": "65535:65281",
               "no-advertise": "65535:65282", "local-AS": "65535:65283",
               "no-peer": "65535:65284"}


def render(template: str, **values: Any) -> str:
    """Fill ``labs/frr/TEMPLATE`` (``${name}`` placeholders).

    Raises LabError when the template is missing or a value is not given."""
    try:
        text = (TEMPLATES / template).read_text()
        return string.Template(text).substitute(**{k: str(v) for k, v in values.items()})
    except (OSError, KeyError, ValueError) as exc:
        raise LabError(f"cannot render FRR template {template}: {exc!r}") from exc


def router_configs(topo: Topology) -> dict[str, str]:
    """File name -> text of the router's zebra, bgpd (and bfdd) configs."""
    lines = []
    for node in topo.nodes:
        lines.append(f" neighbor {node.address} peer-group NODES")
        lines.append(f" neighbor {node.address} description {node.name}")
        if topo.bfd:
            lines.append(f" neighbor {node.address} bfd")
            lines.append(f" neighbor {node.address} bfd profile lab")
    common = {"hostname": topo.router_ns}
    configs = {
        "zebra.conf": render("router-zebra.conf", **common),
        "bgpd.conf": render("router-bgpd.conf", **common, router_as=ROUTER_AS,
                            router_id=topo.router_client_address, node_as=NODE_AS,
                            neighbors="\n".join(lines), maximum_paths=16),
    }
    if topo.bfd:
        configs["bfdd.conf"] = render("router-bfdd.conf", **common,
                                      bfd_interval_ms=BFD_INTERVAL_MS,
                                      bfd_multiplier=BFD_MULTIPLIER)
    return configs


def node_bfdd_config(node: Node) -> str:
    return render("node-bfdd.conf", hostname=node.ns, peer=node.router_address,
                  local_address=node.address, bfd_interval_ms=BFD_INTERVAL_MS,
                  bfd_multiplier=BFD_MULTIPLIER)


@dataclass(frozen=True)
class FrrPaths:
    """Private FRR paths of one namespace."""

    dir: Path

    @property
    def zserv(self) -> Path:
        return self.dir / "zserv.api"

    @property
    def bfdctl(self) -> Path:
        return self.dir / "bfdd.sock"

    def pidfile(self, daemon: str) -> Path:
        return self.dir / f"{daemon}.pid"

    def conf(self, daemon: str) -> Path:
        return self.dir / f"{daemon}.conf"

    def log(self, daemon: str) -> Path:
        return self.dir / f"{daemon}.log"


def paths_for(run_dir: Path, ns: str) -> FrrPaths:
    return FrrPaths(run_dir / "frr" / ns)


def _prepare(paths: FrrPaths, configs: dict[str, str]) -> None:
    paths.dir.mkdir(parents=True, exist_ok=True)
    for name, text in configs.items():
        (paths.dir / name).write_text(text)
    (paths.dir / "vtysh.conf").write_text((TEMPLATES / "vtysh.conf").read_text())
    # The daemons drop to user frr and must write their sockets and pid files
    # here.
    shutil.chown(paths.dir, "frr", "frr")
    for child in paths.dir.iterdir():
        shutil.chown(child, "frr", "frr")


def _daemon_argv(daemon: str, paths: FrrPaths) -> list[str]:
    argv = [str(FRR_BIN / daemon), "-f", str(paths.conf(daemon)),
            "-i", str(paths.pidfile(daemon)), "-z", str(paths.zserv),
            "--vty_socket", str(paths.dir), "-P", "0", "-u", "frr", "-g", "frr",
            "--log", "stdout"]
    if daemon == "bfdd":
        argv += ["--bfdctl", str(paths.bfdctl)]
    return argv


def _start(state: LabState, ns: str, daemon: str, paths: FrrPaths, node: str | None,
           ready: Path) -> None:
    proc = netns.spawn(ns, _daemon_argv(daemon, paths), paths.log(daemon))
    state.add_process(daemon, ns, proc.pid, paths.log(daemon), node=node)

    def up() -> bool:
        if proc.poll() is not None:
            raise LabError(f"{daemon} in {ns} exited with {proc.returncode}; "
                           f"see {paths.log(daemon)}: {_tail(paths.log(daemon))}")
        return ready.exists()

    netns.wait_for(up, 10.0, f"{daemon} in {ns} to create {ready.name}")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_router(state: LabState, topo: Topology, run_dir: Path) -> FrrPaths:
    """Start zebra, bgpd (and bfdd with --bfd) in the router namespace."""
    paths = paths_for(run_dir, topo.router_ns)
    _prepare(paths, router_configs(topo))
    _start(state, topo.router_ns, "zebra", paths, None, paths.zserv)
    if topo.bfd:
        _start(state, topo.router_ns, "bfdd", paths, None, paths.dir / "bfdd.vty")
    _start(state, topo.router_ns, "bgpd", paths, None, paths.dir / "bgpd.vty")
    return paths


def start_node_bfdd(state: LabState, node: Node, run_dir: Path) -> FrrPaths:
    """Start bfdd beside ExaBGP in a node namespace, with a static session
    to the router (ExaBGP has no BFD)."""
    paths = paths_for(run_dir, node.ns)
    _prepare(paths, {"bfdd.conf": node_bfdd_config(node)})
    _start(state, node.ns, "bfdd", paths, node.name, paths.dir / "bfdd.vty")
    return paths


def vtysh(ns: str, paths: FrrPaths, command: str, timeout: float = 5.0) -> str:
    """Run one vtysh command against the daemons of ``ns``."""
    return netns.run(["vtysh", "--vty_socket", str(paths.dir), "--config_dir",
                      str(paths.dir), "-c", command], ns=ns, timeout=timeout)


def vtysh_json(ns: str, paths: FrrPaths, command: str) -> Any:
    out = vtysh(ns, paths, command)
    try:
        return json.loads(out) if out.strip() else {}
    except ValueError as exc:
        raise LabError(f"vtysh {command!r}: not JSON: {out[:200]!r}") from exc


def route_nexthops(ns: str, paths: FrrPaths, prefix: str) -> list[str]:
    """Next hop addresses zebra has installed in the FIB for ``prefix``
    (``show ip route PREFIX json``), sorted."""
    data = vtysh_json(ns, paths, f"show ip route {prefix} json")
    hops: set[str] = set()
    for route in data.get(prefix, []) if isinstance(data, dict) else []:
        if not route.get("installed"):
            continue
        for hop in route.get("nexthops", []):
            if hop.get("fib") and hop.get("ip"):
                hops.add(hop["ip"])
    return sorted(hops)


def bgp_paths(ns: str, paths: FrrPaths, prefix: str) -> list[dict[str, Any]]:
    """The router's BGP paths for ``prefix`` (``show bgp ipv4 unicast PREFIX
    json``), each as {"peer", "communities", "med", "multipath", "best"}."""
    data = vtysh_json(ns, paths, f"show bgp ipv4 unicast {prefix} json")
    out = []
    for path in data.get("paths", []) if isinstance(data, dict) else []:
        community = path.get("community") or {}
        out.append({
            "peer": (path.get("peer") or {}).get("peerId"),
            # FRR names well-known communities (65535:0 is "graceful-shutdown");
            # report them numerically.
            "communities": [_WELL_KNOWN.get(c, c) for c in
                            str(community.get("string", "")).split()],
            "med": path.get("metric"),
            "multipath": bool(path.get("multipath")),
            "best": bool((path.get("bestpath") or {}).get("overall")),
        })
    return out


def bgp_summary(ns: str, paths: FrrPaths) -> dict[str, str]:
    """Neighbor address -> state (``Established`` or the FSM state)."""
    data = vtysh_json(ns, paths, "show bgp ipv4 unicast summary json")
    peers = data.get("peers", {}) if isinstance(data, dict) else {}
    return {addr: str(info.get("state", "?")) for addr, info in peers.items()}


def bfd_peers(ns: str, paths: FrrPaths) -> dict[str, str]:
    """BFD peer address -> status (``up``, ``down``, ``init``) from bfdd."""
    data = vtysh_json(ns, paths, "show bfd peers json")
    return {str(p.get("peer")): str(p.get("status")) for p in data} \
        if isinstance(data, list) else {}
