"""Flow scenarios: long-lived flows through one routing event, counted.

Where the failover scenarios (:mod:`anycast_lb.lab.scenarios`) measure new
connections, these measure *established* ones: the flow client
(:mod:`anycast_lb.lab.flows`) keeps 300 flows open, each echoing a line
every 100 ms, while one event hits the victim (``lb1`` unless told):

=====================  =====================================================
``flows-drain``        ``POST /drain``: GRACEFUL_SHUTDOWN, then withdraw;
                       the victim keeps serving its flows
``flows-join``         the victim's node is stopped before the flows open,
                       then started: it joins the ECMP set, flows reshuffle
``flows-churn-join``   a join while flows keep opening: the victim, drained
                       and withdrawn beforehand (still running), is
                       undrained while flows open at 100 per s (from 2 s
                       before the undrain until 1 s after the FIB holds the
                       victim again, and at least 300 in all)
``flows-node-kill``    SIGKILL of the victim's anycast-lb (ExaBGP goes too)
``flows-node-silent``  the victim goes silent on every link at once (nft
                       drops everything but loopback in its namespace); the
                       router notices by hold time, or by BFD with ``--bfd``
``flows-backend-drain`` backend ``be1`` is drained on every node (``POST
                       /backends/echo/ADDR:PORT/drain``), then the victim
                       drains (its flows move to the other nodes); 60 new
                       flows opened after the move must avoid ``be1``
=====================  =====================================================

With the kernel engine (``lab up --engine kernel``) every node hashes a
flow to the same backend and the backend answers the client directly, so
every scenario's target is 0 broken flows, node-kill included: the router
moves the dead node's flows to a live node, which sends them to the same
backend. The backend then sees the client's address (not a node's): the
per-node split of flows is not known, only the split per backend.

Why churn-join undrains instead of starting a process: a starting node
joins when its BGP session comes up, 1-6 s after the start here (ExaBGP's
connect timing, and CPU), so flows opening at a fixed rate could not be
made to straddle the join without opening hundreds more; an announce after
``POST /undrain`` reaches the FIB in about 60 ms. A fresh node joining
(which must learn its peers' flows first) is ``flows-join``.

The run: wait for a complete FIB, prepare (join: stop the victim), start the
flow client and the FIB poller, wait ``PRE_S``, inject, wait until the FIB
holds the expected next hops, observe ``OBSERVE_S`` more (at least
``min_observe_s`` from the event), stop the client, undo the event and wait
for a complete FIB again. Figures and verdict:
:func:`anycast_lb.lab.flow_results.analyse`; the target depends on whether
the lab runs with flow survival (``lab up --flow-survival``): with it, 0
broken flows for drain and joins, and for a dead node 0 collateral and a
RST within 1 s for its own clients, none hanging (for a silent death that
needs ``--bfd``: without it the router keeps sending the dead node's flows
to it for the hold time, so the bound is 7 s and hangs are expected);
without it (plain anycast) the run only
has to be valid (>= 300 flows established, the FIB changed), and its
figures are the baseline. Writes ``result.json``, ``flows.json`` (the
client's records) and ``timeline.png`` to the output directory.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anycast_lb.errors import LabError
from anycast_lb.lab import builder, flow_results, frr, netns, nodes, scenarios
from anycast_lb.lab import topology as T
from anycast_lb.lab.builder import Lab
from anycast_lb.lab.fib import FibReader
from anycast_lb.lab.flow_results import FlowTarget
from anycast_lb.lab.topology import Node

FLOWS = 300
PRE_S = 1.0
"""Seconds the flows run before the event."""
OBSERVE_S = 1.5
"""Seconds watched after the FIB reached the expected next hops."""
CHURN_RATE = 100.0
"""Flows opened per second in ``flows-churn-join``."""
CHURN_MAX = 600
CHURN_LEAD_S = 2.0
"""Seconds of opening before the join starts (churn)."""
CHURN_AFTER_S = 1.0
"""Seconds of opening after the FIB holds the joined node (churn); opening
also goes on until ``FLOWS`` flows were due."""
FIB_TIMEOUT_S = 15.0
DEAD_OWNER_RESET_MS = 1000.0
SILENT_NO_BFD_RESET_MS = 7000.0
SILENT_TABLE = "alb_silent"


@dataclass
class FlowRun:
    lab: Lab
    victim: Node
    extras: dict[str, Any] = field(default_factory=dict)
    event: float = 0.0
    """When injection began (monotonic s)."""


def _nothing(run: FlowRun) -> None:
    return None


def _drain(run: FlowRun) -> None:
    status, body = nodes.api_request(run.victim.ns, "POST", "/drain", token=T.ADMIN_TOKEN)
    if status != 200:
        raise LabError(f"POST /drain on {run.victim.name}: {status} {body}")


def _undrain(run: FlowRun) -> None:
    status, body = nodes.api_request(run.victim.ns, "POST", "/undrain", token=T.ADMIN_TOKEN)
    if status != 200:
        raise LabError(f"POST /undrain on {run.victim.name}: {status} {body}")


def _drain_withdrawn(run: FlowRun) -> None:
    """Drain the victim and wait until the router no longer has its path."""
    _drain(run)
    lab = run.lab
    netns.wait_for(lambda: all(p["peer"] != str(run.victim.address) for p in frr.bgp_paths(
        lab.topo.router_ns, lab.router_frr, lab.vip_prefix())),
        nodes.DRAIN_GRACE_S + 5.0, f"{run.victim.name}'s path to be withdrawn",
        interval=0.05)
    with lab.fib() as fib:
        fib.wait(lab.vip_prefix(), lambda hops: str(run.victim.address) not in hops, 2.0)


def _stop_victim(run: FlowRun) -> None:
    started = time.monotonic()
    builder.stop_node(run.lab, run.victim)
    run.extras["victim_stop_s"] = round(time.monotonic() - started, 2)


def _start_victim(run: FlowRun) -> None:
    builder.start_node(run.lab, run.victim)


def _ensure_victim(run: FlowRun) -> None:
    if not builder.node_running(run.lab, run.victim):
        builder.start_node(run.lab, run.victim)


def _kill_prepare(run: FlowRun) -> None:
    run.extras["node_pid"] = scenarios.node_proc(run.lab, run.victim).pid
    run.extras["exabgp_pid"] = scenarios.exabgp_pid(run.lab, run.victim)


def _kill(run: FlowRun) -> None:
    os.kill(run.extras["node_pid"], signal.SIGKILL)


def _restart(run: FlowRun) -> None:
    scenarios.restart_node(scenarios.Run(run.lab, run.victim, run.extras))


def _silent(run: FlowRun) -> None:
    # Before anything else sees the packet (flow steering sits at -300) and
    # for what the node sends or forwards; loopback stays, so the node's own
    # processes (ExaBGP's API, the HTTP API) keep talking to each other.
    scenarios.nft(run.victim.ns, f"""
table inet {SILENT_TABLE} {{
  chain pre {{
    type filter hook prerouting priority -400; policy accept;
    iifname != "lo" drop
  }}
  chain out {{
    type filter hook output priority -400; policy accept;
    oifname != "lo" drop
  }}
}}
""")


DRAINED_BACKEND = 1
"""``flows-backend-drain`` drains backend ``be1``."""
PROBE_FLOWS = 60
"""New flows opened after the move in ``flows-backend-drain``."""


def _backend_change(run: FlowRun, action: str) -> None:
    """Drain or undrain ``be<DRAINED_BACKEND>`` of the echo service on every
    running node (standalone: each node's runtime override)."""
    lab = run.lab
    be = lab.topo.backends[DRAINED_BACKEND - 1]
    path = f"/backends/echo/{be.address}:{T.BACKEND_ECHO_PORT}/{action}"
    for n in lab.topo.nodes:
        if not builder.node_running(lab, n):
            continue
        status, body = nodes.api_request(n.ns, "POST", path, token=T.ADMIN_TOKEN)
        if status != 200:
            raise LabError(f"POST {path} on {n.name}: {status} {body}")
    run.extras["drained_backend"] = be.name
    if lab.topo.kernel:
        # The answer comes once the node applied the config; the kernel
        # takes the diff a moment later: wait until every node's tables
        # hold the drain (or no longer do).
        key = f"{be.address}:{T.BACKEND_ECHO_PORT}"
        for n in lab.topo.nodes:
            if builder.node_running(lab, n):
                netns.wait_for(lambda n=n: (key in _kernel_drains(n)) == (action == "drain"),
                               10.0, f"{n.name}'s kernel tables to {action} {be.name}",
                               interval=0.05)


def _kernel_drains(node: Node) -> list[str]:
    """Backends of the echo service draining or drained in the node's kernel tables."""
    status, body = nodes.api_request(node.ns, "GET", "/status")
    if status != 200 or not isinstance(body, dict):
        raise LabError(f"GET /status on {node.name}: {status}")
    echo = next(s for s in body["services"] if s["name"] == "echo")
    kernel = echo.get("kernel") or {}
    return [*kernel.get("draining", []), *kernel.get("drained", [])]


def _backend_drain(run: FlowRun) -> None:
    _backend_change(run, "drain")
    run.extras["backend_drained_ms"] = round((time.monotonic() - run.event) * 1000, 1)
    _drain(run)


def _backend_undrain(run: FlowRun) -> None:
    _undrain(run)
    _backend_change(run, "undrain")


def _probe_new_flows(run: FlowRun, out: Path) -> None:
    """Open PROBE_FLOWS new flows for a second; record which backends took
    them (``flows-backend-drain``: none may reach the drained one)."""
    lab = run.lab
    argv = ["ip", "netns", "exec", lab.topo.client_ns, sys.executable, "-m",
            "anycast_lb.lab.flows", "--ns", lab.topo.client_ns, "--vip", str(lab.topo.vip),
            "--port", str(lab.topo.service_port), "--flows", str(PROBE_FLOWS),
            "--out", str(out), "--late", "0", "--max-duration", "1"]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    flows = json.loads(out.read_text())["flows"]
    opened = [f for f in flows if f["open_s"] is not None]
    drained = run.extras.get("drained_backend")
    run.extras["new_flows_probed"] = len(opened)
    run.extras["new_flows_by_backend"] = {b: sum(1 for f in opened if f["backend"] == b)
                                          for b in sorted({f["backend"] for f in opened})}
    run.extras["new_flows_to_drained_backend"] = sum(1 for f in opened
                                                     if f["backend"] == drained)


def _unsilence(run: FlowRun) -> None:
    netns.run(["nft", "delete", "table", "inet", SILENT_TABLE], ns=run.victim.ns, check=False)


@dataclass(frozen=True)
class FlowScenario:
    name: str
    description: str
    inject: Callable[[FlowRun], None]
    recover: Callable[[FlowRun], None]
    victim_dies: bool = False
    """The victim's flows cannot survive (node-kill, silent death)."""
    joins: bool = False
    """The event adds the victim to the ECMP set (else it leaves it)."""
    churn: bool = False
    prepare: Callable[[FlowRun], None] = _nothing
    """Before the flows open (a join stops the victim here)."""
    min_observe_s: Callable[[Lab], float] = lambda lab: 2.0
    """Seconds after the event to watch at least."""
    reset_bound_ms: Callable[[Lab], float | None] = lambda lab: None
    """With flow survival, a bound (ms) on the dead victim's clients' RST
    when the router alone makes it longer than ``DEAD_OWNER_RESET_MS``
    (then a hang is allowed); None: ``DEAD_OWNER_RESET_MS``, no hang."""
    late_s: float = 3.0
    """Seconds the client keeps listening for a RST after a hang."""
    fib_timeout_s: float = FIB_TIMEOUT_S
    """Seconds the FIB may take to reach the expected next hops after the
    event (a join starts a node process: Python, checks, ExaBGP, the BGP
    session; on a loaded 2-core machine that took 15-16 s)."""
    in_demo: bool = True
    """Part of the relay engine's ``lab demo`` without ``--scenario``."""
    probe_new_flows: bool = False
    """After the FIB change, open new flows and count those that reached
    the drained backend (``flows-backend-drain``)."""


def target(lab: Lab, sc: FlowScenario, n_flows: int) -> FlowTarget:
    """The scenario's target in this lab: flow survival's, or plain anycast's
    baseline (a valid run, figures only)."""
    churn = " (opening across the join)" if sc.churn else ""
    if lab.topo.kernel:
        # A join starts a node process: the FIB may take as long as the wait allows.
        within = max(FlowTarget.fib_within_ms, sc.fib_timeout_s * 1000)
        return FlowTarget(min_established=n_flows, max_broken=0, churn=sc.churn,
                          fib_within_ms=within,
                          text=f"0 broken of >= {n_flows} established flows{churn} (kernel "
                               "engine: every node sends a flow to the same backend)")
    if not lab.topo.flow_survival:
        return FlowTarget(min_established=n_flows, churn=sc.churn,
                          text=f"baseline (plain anycast): >= {n_flows} flows established"
                               f"{churn}, FIB changed; figures only")
    if sc.victim_dies:
        slow = sc.reset_bound_ms(lab)
        may_hang = slow is not None
        bound = DEAD_OWNER_RESET_MS if slow is None else slow
        how = (" (no BFD: the router sends to the dead node for the hold time)"
               if may_hang else ", none hangs")
        return FlowTarget(min_established=n_flows, zero_collateral=True,
                          dead_owner_reset_ms=bound, dead_owner_may_hang=may_hang,
                          text=f"0 collateral of >= {n_flows}; every dead-owner flow "
                               f"reset <= {bound:.0f} ms{how}")
    return FlowTarget(min_established=n_flows, max_broken=0, churn=sc.churn,
                      text=f"0 broken of >= {n_flows} established flows{churn}")


FLOW_SCENARIOS: dict[str, FlowScenario] = {s.name: s for s in [
    FlowScenario("flows-drain", "POST /drain on the victim under 300 long-lived flows",
                 _drain, _undrain,
                 min_observe_s=lambda lab: nodes.DRAIN_GRACE_S + OBSERVE_S),
    FlowScenario("flows-join", "the victim's node starts (joins ECMP) under 300 long-lived "
                 "flows", _start_victim, _ensure_victim, joins=True, prepare=_stop_victim,
                 fib_timeout_s=2 * FIB_TIMEOUT_S, in_demo=False),
    FlowScenario("flows-churn-join", "the drained victim is undrained (joins ECMP) while "
                 f"flows keep opening ({CHURN_RATE:.0f}/s)", _undrain, _undrain, joins=True,
                 churn=True, prepare=_drain_withdrawn, in_demo=False),
    FlowScenario("flows-node-kill", "SIGKILL of the victim's anycast-lb under 300 "
                 "long-lived flows", _kill, _restart, victim_dies=True, prepare=_kill_prepare),
    FlowScenario("flows-node-silent", "the victim drops every packet on every link "
                 "(silent death) under 300 long-lived flows", _silent, _unsilence,
                 victim_dies=True, in_demo=False,
                 # BFD 100 ms x 3 is well inside the 1 s; hold time 3 s is not.
                 # Without BFD the RST comes with the client's first TCP
                 # retransmission after the router drops the node (<= 3.3 s);
                 # they back off: 0.2, 0.6, 1.4, 3.0, 6.2 s after the send.
                 reset_bound_ms=lambda lab: None if lab.topo.bfd else SILENT_NO_BFD_RESET_MS,
                 late_s=7.0,
                 min_observe_s=lambda lab: 2.0 if lab.topo.bfd else 7.5),
    FlowScenario("flows-backend-drain", "be1 drained on every node, then the victim drains "
                 "(its flows move) under 300 long-lived flows; new flows avoid be1",
                 _backend_drain, _backend_undrain, probe_new_flows=True, in_demo=False,
                 min_observe_s=lambda lab: nodes.DRAIN_GRACE_S + OBSERVE_S),
]}

KERNEL_SCENARIOS = ("ecmp", "flows-drain", "flows-join", "flows-churn-join", "flows-node-kill",
                    "flows-backend-drain")
"""What ``lab demo --engine kernel`` runs on the kernel engine's lab."""


def _start_client(lab: Lab, out: Path, n_flows: int, churn: bool, late_s: float
                  ) -> tuple[subprocess.Popen[str], float]:
    argv = ["ip", "netns", "exec", lab.topo.client_ns, sys.executable, "-m",
            "anycast_lb.lab.flows", "--ns", lab.topo.client_ns, "--vip", str(lab.topo.vip),
            "--port", str(lab.topo.service_port), "--flows", str(n_flows), "--out", str(out),
            "--late", str(late_s), "--max-duration", "120"]
    if churn:
        argv += ["--open-rate", str(CHURN_RATE)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20.0)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("started "):
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise LabError(f"flow client did not start: {line!r} {err.strip()[-500:]}")
    return proc, float(line.split()[1])


def _node_state(lab: Lab) -> dict[str, list[str]]:
    """Each node's TCP sockets on the VIP (``ss``, any state) and, with flow
    survival, its steering map and dead set (``nft``), one line per entry."""
    out: dict[str, list[str]] = {}
    for n in lab.topo.nodes:
        lines = netns.run(["ss", "-Htan", "state", "all", f"src {lab.topo.vip}"],
                          ns=n.ns, check=False).splitlines()
        if lab.topo.flow_survival:
            for what in (["map", "ip", "anycast_lb", "owner"], ["set", "ip", "anycast_lb", "dead"]):
                text = netns.run(["nft", "list", *what], ns=n.ns, check=False)
                lines += [f"{what[0]} {what[3]}: {item.strip(' {},')}"
                          for item in text.replace("elements = {", "\n").split("\n")
                          if str(lab.topo.vip) in item and "." in item]
        out[n.name] = [" ".join(line.split()) for line in lines]
    return out


def _state_of_broken(state: dict[str, list[str]], traffic: dict[str, Any], lab: Lab,
                     victim: Node) -> dict[str, list[str]]:
    """For a post-mortem, what each node held (taken just before the client
    stopped) for the client ports of broken flows of live owners: sockets,
    steering map entries, dead set entries. A stale socket (FIN-WAIT,
    TIME-WAIT, an ESTABLISHED one whose client is gone) on a node the flow
    lands on takes its packets unless the map steers them away, and answers
    with an ACK, not a RST: the flow hangs."""
    owner = lab.topo.node_by_lan_address()
    ports = {str(f["port"]) for f in traffic["flows"] if f["failed_s"] is not None
             and f.get("port") and owner.get(f["peer"]) != victim.name}
    out: dict[str, list[str]] = {}
    for name, lines in state.items():
        hits = [line for line in lines
                if any(f":{p} " in f"{line} " or f" . {p} . " in line for p in ports)]
        if hits:
            out[name] = hits[:60]
    return out


def _expected(lab: Lab, sc: FlowScenario, victim: Node) -> list[str]:
    hops = builder.all_hops(lab)
    return hops if sc.joins else [h for h in hops if h != str(victim.address)]


def run_flow_scenario(lab: Lab, name: str, out_dir: Path, victim: str = "lb1",
                      n_flows: int = FLOWS) -> dict[str, Any]:
    """Run one flow scenario; return its result (also written to out_dir).

    Raises LabError for an unknown scenario, a lab in static mode, or a lab
    that does not reach its expected state."""
    if name not in FLOW_SCENARIOS:
        raise LabError(f"unknown flow scenario {name!r}; one of: {', '.join(FLOW_SCENARIOS)}")
    if lab.mode == "static":
        raise LabError(f"scenario {name} needs the real node (lab is in static mode)")
    sc = FLOW_SCENARIOS[name]
    node = lab.topo.node(victim)
    out_dir.mkdir(parents=True, exist_ok=True)
    builder.wait_complete(lab, 20.0)
    run = FlowRun(lab, node)
    sc.prepare(run)
    expected = _expected(lab, sc, node)
    flows_file = out_dir / "flows.json"
    watch = scenarios.FibWatch(FibReader(lab.topo.router_ns), lab.vip_prefix(), 120.0)
    watch.start()
    proc, started = _start_client(lab, flows_file,
                                  CHURN_MAX if sc.churn else n_flows, sc.churn, sc.late_s)
    fib_at: float | None = None
    state: dict[str, list[str]] = {}
    try:
        time.sleep(max(0.0, started + (CHURN_LEAD_S if sc.churn else PRE_S)
                       - time.monotonic()))  # pacing, not readiness
        run.event = time.monotonic()
        sc.inject(run)
        run.extras["inject_ms"] = round((time.monotonic() - run.event) * 1000, 1)
        with lab.fib() as fib:
            fib_at, _ = fib.wait(lab.vip_prefix(), lambda h: sorted(h) == expected,
                                 sc.fib_timeout_s)
        if sc.probe_new_flows:
            _probe_new_flows(run, out_dir / "probe.json")
        if sc.churn:
            # Pacing: flows keep opening after the join, and until n_flows were due.
            time.sleep(max(0.0, max(fib_at + CHURN_AFTER_S, started + n_flows / CHURN_RATE)
                           - time.monotonic()))
            proc.send_signal(signal.SIGUSR1)
            run.extras["churn_stopped_s"] = round(time.monotonic() - run.event, 3)
        until = max(fib_at + OBSERVE_S, run.event + sc.min_observe_s(lab))
        time.sleep(max(0.0, until - time.monotonic()))  # pacing: the observation window
        state = _node_state(lab)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)
            err = "did not stop within 30 s of SIGTERM"
        recover_start = time.monotonic()
        sc.recover(run)
        try:
            run.extras["recovered_ms"] = round(
                (builder.wait_complete(lab, 30.0) - recover_start) * 1000, 1)
        except LabError as exc:
            run.extras["recovered_ms"] = None
            run.extras["recovery_error"] = str(exc)
        watch.stop.set()
        watch.join(2.0)
    if proc.returncode != 0:
        raise LabError(f"flow client failed (exit {proc.returncode}): {err.strip()[-500:]}")
    traffic = json.loads(flows_file.read_text())
    t0 = float(traffic["t0"])
    run.extras["state_of_broken_flows"] = _state_of_broken(state, traffic, lab, node)
    changes = [(t - t0, hops) for t, hops in watch.changes if t < recover_start]
    node_of_peer = lab.topo.node_by_lan_address()
    result = flow_results.analyse(
        name, traffic, run.event - t0, changes, expected, node.name,
        sc.victim_dies and not lab.topo.kernel,  # kernel: the victim's flows live on
        node_of_peer, lab.topo.node_by_router_address(),
        target(lab, sc, n_flows))
    result["description"] = sc.description
    result["engine"] = "kernel" if lab.topo.kernel else "relay"
    result["flow_survival"] = lab.topo.flow_survival
    result["bfd"] = lab.topo.bfd
    result["fib_poll_ms"] = scenarios.POLL_S * 1000
    result.update(run.extras)
    result.update(watch.report())
    if sc.probe_new_flows:
        result["checks"]["new_flows_avoid_drained_backend"] = (
            run.extras.get("new_flows_probed", 0) >= PROBE_FLOWS // 2
            and run.extras.get("new_flows_to_drained_backend") == 0)
        result["pass"] = all(result["checks"].values())

    def draw() -> None:
        from anycast_lb.lab import plot
        plot.flows_timeline(out_dir / "timeline.png", traffic, result, node_of_peer)

    scenarios.plot_timeline(draw, result)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary_row(result: dict[str, Any]) -> list[str]:
    reset = result.get("dead_owner_reset_ms") or {}

    def fmt(v: Any) -> str:
        return "-" if v is None else str(v)
    rst = "-" if not reset or reset.get("max") is None else \
        f"{reset['median']:.0f}/{reset['max']:.0f}"
    hang = result.get("dead_owner_hang")
    gap = result.get("longest_gap_at_event_ms")
    gaps = f"{fmt(gap)}/{fmt(result.get('longest_gap_ms'))}"
    return [result["scenario"], result.get("engine", "relay"),
            "on" if result["flow_survival"] else "off",
            f"{result['established_broken']}/{result['established_total']}",
            f"{result['victim_broken']}/{result['victim_flows']}",
            str(result["collateral_broken"]), rst, fmt(hang),
            fmt(result.get("fib_converged_ms")), gaps, result["target"],
            "PASS" if result["pass"] else "FAIL"]


SUMMARY_HEADER = ["scenario", "engine", "flow survival", "established broken",
                  "victim's broken", "collateral", "dead-owner RST ms (median/max)", "hang",
                  "fib_converged_ms", "longest gap ms (event/run)", "target", "verdict"]
