"""Bring the lab up and down (the only module that knows every part).

``up`` refuses to start unless root, no lab is already recorded, and no lab
prefix overlaps the root namespace. Every namespace and process is written
to the state file the moment it exists, so ``down`` can undo a crash at any
point. ``down`` stops the recorded processes by PID (checked against their
start time), then any process still inside a lab namespace (found by
namespace identity, ``ip netns pids``), then deletes the namespaces.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from anycast_lb.errors import LabError
from anycast_lb.kernel import backend as dsr
from anycast_lb.lab import etcd, frr, netns, nodes, state
from anycast_lb.lab import topology as T
from anycast_lb.lab.fib import FibReader
from anycast_lb.lab.state import LabState
from anycast_lb.lab.topology import Node, Topology

ROUTER_SYSCTLS: dict[str, str | int] = {
    # Forward, hash on L4 (else every flow goes to one
    # node), no reverse-path filter, and skip next hops whose link is down.
    # Policy 3 with the 5-tuple fields (src/dst address, protocol, src/dst
    # port = 0x37), not policy 1: policy 1 reuses a hash the packet already
    # carries, and over veth that is the client socket's own txhash, which
    # Linux re-rolls at every TCP retransmission timeout (net.core.txrehash).
    # Each retransmission of a flow then took a random node, as no router
    # hashing headers would (measured: the silent victim's clients got RSTs
    # from lb2/lb3 ~440 ms after the death, 2.3 s before the FIB changed).
    "net.ipv4.ip_forward": 1,
    "net.ipv4.fib_multipath_hash_policy": 3,
    "net.ipv4.fib_multipath_hash_fields": "0x37",
    "net.ipv4.conf.all.rp_filter": 0,
    "net.ipv4.conf.default.rp_filter": 0,
    "net.ipv4.conf.all.ignore_routes_with_linkdown": 1,
    "net.ipv4.conf.default.ignore_routes_with_linkdown": 1,
}
NODE_SYSCTLS: dict[str, str | int] = {
    "net.ipv4.conf.all.rp_filter": 0,
    "net.ipv4.conf.default.rp_filter": 0,
    "net.ipv4.ip_local_port_range": "10000 65000",
    "net.ipv4.tcp_tw_reuse": 1,
}
FLOW_SURVIVAL_SYSCTLS: dict[str, str | int] = {
    # Flow survival: a node forwards packets it steers to the flow's owner
    # (fwmark routes via the owner's LAN address), and the owner must accept
    # them although their source (the client) is not reached over the LAN:
    # rp_filter 0 on the LAN interface (strict rp_filter drops them all; "all" is 0 above as well).
    "net.ipv4.ip_forward": 1,
}
CLIENT_SYSCTLS: dict[str, str | int] = {
    "net.ipv4.ip_local_port_range": "10000 65000",
    "net.ipv4.tcp_tw_reuse": 1,
}
MODES = ("node", "static")
ENGINES = ("relay", "kernel")


@dataclass
class Lab:
    topo: Topology
    state: LabState
    run_dir: Path
    mode: str

    @property
    def router_frr(self) -> frr.FrrPaths:
        return frr.paths_for(self.run_dir, self.topo.router_ns)

    def vip_prefix(self) -> str:
        return f"{self.topo.vip}/32"

    def fib(self) -> FibReader:
        return FibReader(self.topo.router_ns)


def load() -> Lab:
    """The running lab, from the state file. Raises LabError when none."""
    st = state.load()
    if st is None:
        raise LabError("no lab is up (no state file at "
                       f"{state.STATE_FILE}); start one with `anycast-lb lab up`")
    t = st.topology
    topo = T.plan(int(t.get("nodes", 3)), int(t.get("backends", 3)), bool(t.get("bfd")),
                  bool(t.get("flow_survival")), bool(t.get("consensus")),
                  t.get("engine") == "kernel", bool(t.get("l2")))
    return Lab(topo, st, state.RUN_DIR, str(t.get("mode", "node")))


def _link(lab: Lab) -> None:
    topo = lab.topo
    r = topo.router_ns
    netns.sysctls(r, ROUTER_SYSCTLS)
    netns.veth(topo.client_ns, "up0", r, "client")
    netns.addr(topo.client_ns, "up0", f"{topo.client_address}/{topo.links_prefixlen}")
    netns.addr(r, "client", f"{topo.router_client_address}/{topo.links_prefixlen}")
    netns.run(["ip", "route", "add", "default", "via", str(topo.router_client_address)],
              ns=topo.client_ns)
    netns.sysctls(topo.client_ns, CLIENT_SYSCTLS)
    # The flood scenarios' source (the attacker), beside the legitimate client.
    netns.addr(topo.client_ns, "up0", f"{T.FLOOD_ADDRESS}/32")
    netns.run(["ip", "route", "add", str(T.FLOOD_PREFIX), "via", str(topo.client_address)],
              ns=r)
    netns.run(["ip", "link", "add", "br0", "type", "bridge"], ns=topo.lan_ns)
    netns.run(["ip", "link", "set", "br0", "up"], ns=topo.lan_ns)
    for node in topo.nodes:
        netns.sysctls(node.ns, NODE_SYSCTLS)
        netns.veth(node.ns, node.uplink_if, r, node.router_if)
        netns.addr(node.ns, node.uplink_if, f"{node.address}/{topo.links_prefixlen}")
        netns.addr(r, node.router_if, f"{node.router_address}/{topo.links_prefixlen}")
        netns.run(["ip", "route", "add", "default", "via", str(node.router_address)],
                  ns=node.ns)
        netns.addr(node.ns, "lo", f"{topo.vip}/32")
        netns.veth(node.ns, node.lan_if, topo.lan_ns, node.bridge_port)
        netns.run(["ip", "link", "set", node.bridge_port, "master", "br0"], ns=topo.lan_ns)
        netns.addr(node.ns, node.lan_if, f"{node.lan_address}/{topo.lan_prefixlen}")
        if topo.flow_survival:
            netns.sysctls(node.ns, {**FLOW_SURVIVAL_SYSCTLS,
                                    f"net.ipv4.conf.{node.lan_if}.rp_filter": 0})
    for be in topo.backends:
        netns.veth(be.ns, be.lan_if, topo.lan_ns, be.bridge_port)
        netns.run(["ip", "link", "set", be.bridge_port, "master", "br0"], ns=topo.lan_ns)
        netns.addr(be.ns, be.lan_if, f"{be.address}/{topo.lan_prefixlen}")
    if topo.kernel:
        _direct_return(topo)
    if topo.consensus:
        etcd.link(lab.state, topo)
    if topo.l2:
        _link_l2(topo)


L2_NODE_SYSCTLS: dict[str, str | int] = {
    # A standby's listeners bind the elected VIPs it does not hold (the owner
    # adds the address on lan0 when it wins, docs/l2.md).
    "net.ipv4.ip_nonlocal_bind": 1,
    "net.ipv6.ip_nonlocal_bind": 1,
}


def _link_l2(topo: Topology) -> None:
    """The L2 lab: the ARP client and the prober on the backend LAN's bridge,
    IPv6 on that LAN, and the node sysctls ``via: l2`` needs."""
    plen6 = T.L2_PREFIX6.prefixlen
    for node in topo.nodes:
        netns.sysctls(node.ns, L2_NODE_SYSCTLS)
        netns.run(["ip", "addr", "add", f"{T.l2_node_address6(node)}/{plen6}", "dev",
                   node.lan_if, "nodad"], ns=node.ns)
    for ns, port, v4, v6 in ((topo.arp_ns, "p-arp", T.L2_CLIENT, T.L2_CLIENT6),
                             (topo.probe_ns, "p-probe", T.L2_PROBE, T.L2_PROBE6)):
        netns.veth(ns, "lan0", topo.lan_ns, port)
        netns.run(["ip", "link", "set", port, "master", "br0"], ns=topo.lan_ns)
        netns.addr(ns, "lan0", f"{v4}/{topo.lan_prefixlen}")
        netns.run(["ip", "addr", "add", f"{v6}/{plen6}", "dev", "lan0", "nodad"], ns=ns)
        netns.sysctls(ns, CLIENT_SYSCTLS)


def _direct_return(topo: Topology) -> None:
    """The kernel engine's direct server return: the router's leg on the
    LAN is the backends' gateway (replies go to the client without a node),
    and each backend gets the set-up ``anycast-lb backend-setup --apply``
    does (:mod:`anycast_lb.kernel.backend`: the VIP on ``lo``,
    ``arp_ignore=1``, ``arp_announce=2``)."""
    r = topo.router_ns
    netns.veth(r, topo.router_lan_if, topo.lan_ns, topo.router_bridge_port)
    netns.run(["ip", "link", "set", topo.router_bridge_port, "master", "br0"], ns=topo.lan_ns)
    netns.addr(r, topo.router_lan_if, f"{topo.router_lan_address}/{topo.lan_prefixlen}")
    for be in topo.backends:
        netns.run(dsr.vip_argv(topo.vip), ns=be.ns)
        netns.sysctls(be.ns, {key.replace("/", "."): value for key, value in dsr.SYSCTLS})
        netns.run(["ip", "route", "add", "default", "via", str(topo.router_lan_address)],
                  ns=be.ns)


def start_backend(lab: Lab, index: int) -> None:
    be = lab.topo.backends[index - 1]
    log = lab.run_dir / "logs" / f"server-{be.name}.log"
    proc = netns.spawn(be.ns, [sys.executable, "-m", "anycast_lb.lab.servers", "--ns", be.ns,
                               "--name", be.name, "--http", str(T.BACKEND_HTTP_PORT),
                               "--tcp", str(T.BACKEND_ECHO_PORT),
                               "--udp", str(T.BACKEND_ECHO_PORT)], log)
    lab.state.add_process("server", be.ns, proc.pid, log, node=be.name)


def _listening(ns: str, port: int) -> bool:
    out = netns.run(["ss", "-Hltn", f"sport = :{port}"], ns=ns, check=False)
    return bool(out.strip())


def start_node(lab: Lab, node: Node) -> None:
    """Start what runs in a node namespace (per ``lab.mode``)."""
    directory = nodes.node_dir(lab.run_dir, node)
    directory.mkdir(parents=True, exist_ok=True)
    if lab.topo.bfd and lab.state.find("bfdd", node.name) is None:
        frr.start_node_bfdd(lab.state, node, lab.run_dir)
    if lab.mode == "static":
        conf = directory / "exabgp.conf"
        conf.write_text(nodes.static_exabgp_config(lab.topo, node))
        log = directory / "exabgp.log"
        proc = netns.spawn(node.ns, nodes.static_argv(conf), log, env=nodes.EXABGP_ENV)
        lab.state.add_process("exabgp", node.ns, proc.pid, log, node=node.name)
        targets = ",".join(f"{b.address}:{T.BACKEND_ECHO_PORT}" for b in lab.topo.backends)
        log = directory / "relay.log"
        proc = netns.spawn(node.ns, [sys.executable, "-m", "anycast_lb.lab.servers",
                                     "--ns", node.ns, "--name", node.name, "--relay",
                                     f"{lab.topo.vip}:{T.SERVICE_PORT}={targets}"], log)
        lab.state.add_process("relay", node.ns, proc.pid, log, node=node.name)
        return
    conf = nodes.write_node_config(lab.topo, node, lab.run_dir)
    log = directory / "anycast-lb.log"
    nofile = lab.state.topology.get("nofile")
    proc = netns.spawn(node.ns, nodes.node_argv(conf, int(nofile) if nofile else None), log)
    lab.state.add_process("anycast-lb", node.ns, proc.pid, log, node=node.name)


def up(n_nodes: int = 3, n_backends: int = 3, bfd: bool = False, mode: str = "node",
       timeout: float = 30.0, flow_survival: bool = False, consensus: bool = False,
       engine: str = "relay", l2: bool = False) -> Lab:
    """Build the lab and wait until the router has one next hop per node.

    ``engine``: the nodes' ``forwarding.engine``, ``relay`` or ``kernel``
    (direct server return: see :mod:`anycast_lb.lab.topology`).

    ``consensus``: also a 3-member etcd cluster on the management segment
    (:mod:`anycast_lb.lab.etcd`), ready (every member answering, a leader)
    before the nodes start; each node config gets a ``consensus:`` section.
    ``l2`` (implies ``consensus``): the ARP client and prober on the backend
    LAN and ``via: l2`` services on every node (:mod:`anycast_lb.lab.l2`);
    also waits until the highest-priority node owns both elected VIPs.

    Raises LabError (UnsafeLab for safety refusals); on failure the caller
    should run :func:`down` (the CLI does)."""
    if mode not in MODES:
        raise LabError(f"mode must be one of {', '.join(MODES)}")
    consensus = consensus or l2
    if flow_survival and mode != "node":
        raise LabError("flow survival needs the real node (--mode node)")
    if consensus and mode != "node":
        raise LabError("consensus needs the real node (--mode node)")
    if engine not in ENGINES:
        raise LabError(f"engine must be one of {', '.join(ENGINES)}")
    if engine == "kernel" and (mode != "node" or flow_survival):
        raise LabError("--engine kernel needs the real node (--mode node) and no flow "
                       "survival (every node hashes a flow to the same backend)")
    if consensus and shutil.which("etcd") is None:
        raise LabError("consensus: etcd is not installed (scripts/install.sh installs "
                       "Debian's etcd-server and etcd-client)")
    netns.require_root()
    if state.load() is not None or netns.lab_namespaces():
        raise LabError("a lab is already up (or left over): run `anycast-lb lab down` first")
    netns.check_root_namespace()
    topo = T.plan(n_nodes, n_backends, bfd, flow_survival, consensus, engine == "kernel", l2)
    if flow_survival:
        nodes.check_cluster_support(topo)  # before anything is built
    run_dir = state.RUN_DIR
    if run_dir.exists():
        shutil.rmtree(run_dir)
    st = LabState(topology={"nodes": n_nodes, "backends": n_backends, "bfd": bfd,
                            "mode": mode, "vip": str(topo.vip),
                            "flow_survival": flow_survival, "consensus": consensus,
                            "engine": engine, "l2": l2})
    st.save()
    lab = Lab(topo, st, run_dir, mode)
    for name in topo.namespaces:
        st.add_namespace(name)
        netns.create(name)
    _link(lab)
    for be in topo.backends:
        start_backend(lab, be.index)
    frr.start_router(st, topo, run_dir)
    if topo.consensus:
        etcd.start_all(st, topo, run_dir)
    for node in topo.nodes:
        start_node(lab, node)
    for be in topo.backends:
        netns.wait_for(lambda ns=be.ns: _listening(ns, T.BACKEND_ECHO_PORT), 10.0,
                       f"backend server in {be.ns}")
    wait_complete(lab, timeout)
    if topo.l2:
        from anycast_lb.lab import l2 as l2lab

        l2lab.wait_owner(lab, topo.nodes[0], timeout)
    return lab


def node_running(lab: Lab, node: Node) -> bool:
    """True while the node's ``anycast-lb`` process (as recorded) is alive."""
    proc = lab.state.find("anycast-lb", node.name)
    return proc is not None and proc.same_process() and netns.pid_alive(proc.pid)


def stop_node(lab: Lab, node: Node, grace: float = 3.0, timeout: float = 10.0) -> None:
    """Stop a node (SIGTERM: drain, withdraw, exit; SIGKILL after ``grace``
    s, since a node holding connections waits up to ``drain.timeout``) and
    wait until it and its ExaBGP are gone and the router's FIB no longer has
    it. Raises LabError at the deadline (``timeout`` s)."""
    proc = lab.state.find("anycast-lb", node.name)
    if proc is None or not proc.same_process() or not netns.pid_alive(proc.pid):
        return
    # Its ExaBGP (and anything else it started), not bfdd, which stays.
    keep = {proc.pid} | _bfdd_pids(lab, node)
    kids = [(pid, netns.proc_start(pid)) for pid in netns.pids_in(node.ns) if pid not in keep]
    deadline = time.monotonic() + timeout
    left = netns.terminate_all([(proc.pid, proc.start)], grace=grace)
    if left:
        raise LabError(f"{node.name}'s anycast-lb (pid {proc.pid}) did not stop")
    lab.state.processes.remove(proc)
    lab.state.save()
    netns.wait_for(lambda: not any(netns.proc_start(p) == s and netns.pid_alive(p)
                                   for p, s in kids),
                   max(0.5, deadline - time.monotonic()), f"{node.name}'s ExaBGP to exit")
    with lab.fib() as fib:
        fib.wait(lab.vip_prefix(), lambda hops: str(node.address) not in hops,
                 max(0.5, deadline - time.monotonic()))


def _bfdd_pids(lab: Lab, node: Node) -> set[int]:
    proc = lab.state.find("bfdd", node.name)
    return {proc.pid} if proc is not None else set()


def all_hops(lab: Lab) -> list[str]:
    return sorted(str(n.address) for n in lab.topo.nodes)


def wait_complete(lab: Lab, timeout: float) -> float:
    """Wait until the router's FIB has one next hop per node (and, with BFD,
    every BFD session is up); return when the FIB got there (monotonic s).
    Raises LabError at the deadline."""
    deadline = time.monotonic() + timeout
    with lab.fib() as fib:
        at, _ = fib.wait(lab.vip_prefix(), lambda hops: sorted(hops) == all_hops(lab),
                         timeout)
    if lab.topo.bfd:
        want = {str(n.address) for n in lab.topo.nodes}
        netns.wait_for(
            lambda: {p for p, s in frr.bfd_peers(lab.topo.router_ns, lab.router_frr).items()
                     if s == "up"} >= want,
            max(0.5, deadline - time.monotonic()), "every BFD session up", interval=0.05)
    return at


def down() -> list[str]:
    """Remove every process and namespace the lab made. Returns what was done.

    Works without a state file too (then only namespaces named ``alb-*``
    and the processes inside them are removed)."""
    netns.require_root()
    done: list[str] = []
    st = state.load()
    if st is not None:
        procs = [p for p in st.processes if p.same_process() and netns.pid_alive(p.pid)]
        left = netns.terminate_all([(p.pid, p.start) for p in procs], grace=3.0)
        done += [f"stopped {p.role} pid {p.pid} in {p.ns}"
                 + (" (STILL ALIVE)" if p.pid in left else "") for p in procs]
    names = sorted(set((st.namespaces if st else []) + netns.lab_namespaces()))
    # Anything else still inside a lab namespace (an ExaBGP child, a process
    # started just before a crash), found by namespace identity.
    strays = [(pid, netns.proc_start(pid), name) for name in names
              for pid in netns.pids_in(name)]
    left = netns.terminate_all([(pid, start) for pid, start, _ in strays], grace=2.0)
    done += [f"stopped stray pid {pid} in {name}" + (" (STILL ALIVE)" if pid in left else "")
             for pid, _, name in strays]
    for name in names:
        if netns.exists(name):
            netns.delete(name)
            done.append(f"deleted namespace {name}")
    if (st is not None and st.topology.get("consensus")) or (etcd.DATA_DIR / "etcd").exists():
        etcd.remove_data()
        done.append(f"removed etcd data under {etcd.DATA_DIR / 'etcd'}")
    state.remove()
    return done


def leftovers() -> list[str]:
    """What a teardown failed to remove: lab namespaces and live lab PIDs."""
    out = [f"namespace {n}" for n in netns.lab_namespaces()]
    st = state.load()
    if st is not None:
        out += [f"pid {p.pid} ({p.role})" for p in st.processes
                if p.same_process() and netns.pid_alive(p.pid)]
    return out


def wait_gone(pids: list[tuple[int, int | None]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(netns.proc_start(p) == s and netns.pid_alive(p) for p, s in pids):
            return
        time.sleep(0.01)
