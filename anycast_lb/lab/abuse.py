"""Abuse scenarios: floods and forged sync under the paced client stream.

Each runs like a failover scenario (:func:`anycast_lb.lab.scenarios.run_scenario`:
the paced stream of new TCP connections plus 30 long-lived ones, the
router's FIB polled every 5 ms, ``result.json`` and ``timeline.png``), but
the "fault" is an attack on every node at once, and nothing may give:

==================  ========================================================
``udp-flood``       one client address (``FLOOD_ADDRESS``, beside the
                    legitimate client) sends one datagram from each of
                    ``UDP_FACTOR`` x cap x nodes source ports to the VIP's
                    UDP service in ``UDP_FLOOD_S`` s
``tcp-flood``       the same address opens ``TCP_FACTOR`` x cap x nodes idle
                    connections to VIP:80 in ``TCP_OPEN_S`` s and holds them
                    ``TCP_HOLD_S`` s
``sync-forgery``    a host on the node LAN (a backend namespace) sends forged,
                    unauthenticated sync datagrams to every node, in the
                    name of every other node (:mod:`anycast_lb.lab.forger`)
==================  ========================================================

The floods first restart the nodes with an open-file limit of ``NOFILE``
(soft and hard, as under a service manager granting 1,024; kept in the
state file, so later restarts keep it). "cap" is the node's flow cap for
the protocol read from ``/metrics`` when the build exports one, else its
open-file limit (which no cap can exceed, so the flood is at least as
large as asked). After each run the nodes are restarted (a clean slate:
idle UDP flows would hold descriptors for 30 s, forged claims for longer).

Targets (``checks`` in result.json): the FIB keeps every next hop (0
withdraws), no ``health.transition`` away from up in any node's log (and a
failed-check counter, where the build has one, unchanged), >= 99 % of new
connections succeed, each node's busiest second of log <= ``LOG_PEAK_MAX``
lines; sync-forgery also: no forged flow ever in a node's steering map or
dead set, no ``cluster.peer_down``, every peer alive in every /status
sample, and a rejected-datagram counter rising on every node where the
build has one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from anycast_lb.errors import LabError
from anycast_lb.lab import abuse_results as R
from anycast_lb.lab import builder, netns, nodes
from anycast_lb.lab import topology as T
from anycast_lb.lab.builder import Lab
from anycast_lb.lab.results import Target
from anycast_lb.lab.scenarios import Run, Scenario

NOFILE = 1024
UDP_FACTOR = 10
TCP_FACTOR = 2
UDP_FLOOD_S = 6.0
TCP_OPEN_S = 4.0
TCP_HOLD_S = 3.0
FORGE_S = 4.0
FORGE_INTERVAL_S = 0.2
FORGED_PORTS = (1024, 1523)
"""Client ports of the forged flows: below the lab's ephemeral range
(10000-65000), so the legitimate client never uses them."""
MIN_NEW_SUCCESS = 0.99
LOG_PEAK_MAX = 50
SAMPLE_S = 0.25
UDP_SERVICES = ("echo-udp",)
TCP_SERVICES = ("echo", "web")


# --- node limits and restarts ------------------------------------------------

def node_nofile(pid: int) -> int | None:
    """Soft open-file limit of PID (``/proc/PID/limits``), None if unknown."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        pass
    return None


def restart_nodes(lab: Lab, nofile: int | None) -> None:
    """Stop every node (and its ExaBGP), wait until the router has no next
    hop, start them again with open-file limit ``nofile`` (None: the
    lab's own), and wait until every node is back in the FIB (60 s).
    Raises LabError at a deadline."""
    lab.state.topology["nofile"] = nofile
    lab.state.save()
    procs, kids = [], []
    for node in lab.topo.nodes:
        proc = lab.state.find("anycast-lb", node.name)
        if proc is None:
            continue
        bfdd = lab.state.find("bfdd", node.name)
        keep = {proc.pid} | ({bfdd.pid} if bfdd else set())
        kids += [(p, netns.proc_start(p)) for p in netns.pids_in(node.ns) if p not in keep]
        procs.append(proc)
    netns.terminate_all([(p.pid, p.start) for p in procs], grace=2.0)
    netns.terminate_all(kids, grace=2.0)
    for proc in procs:
        lab.state.processes.remove(proc)
    lab.state.save()
    with lab.fib() as fib:
        fib.wait(lab.vip_prefix(), lambda hops: not hops, 10.0)
    for node in lab.topo.nodes:
        builder.start_node(lab, node)
    builder.wait_complete(lab, 60.0)


def ensure_nofile(lab: Lab, nofile: int) -> bool:
    """Restart the nodes unless each already runs with ``nofile``; True if
    they were restarted."""
    current = []
    for node in lab.topo.nodes:
        proc = lab.state.find("anycast-lb", node.name)
        current.append(node_nofile(proc.pid) if proc and proc.same_process() else None)
    if all(c == nofile for c in current) and lab.state.topology.get("nofile") == nofile:
        return False
    restart_nodes(lab, nofile)
    return True


# --- evidence -----------------------------------------------------------------

def _log_path(lab: Lab, name: str) -> Path:
    return nodes.node_dir(lab.run_dir, lab.topo.node(name)) / "anycast-lb.log"


def log_offsets(lab: Lab) -> dict[str, int]:
    out = {}
    for node in lab.topo.nodes:
        try:
            out[node.name] = _log_path(lab, node.name).stat().st_size
        except OSError:
            out[node.name] = 0
    return out


def log_lines(lab: Lab, offsets: dict[str, int]) -> dict[str, list[str]]:
    """Each node's log lines written since ``offsets`` (bounded: 64 MB)."""
    out = {}
    for name, offset in offsets.items():
        try:
            with open(_log_path(lab, name), "rb") as f:
                f.seek(offset)
                data = f.read(64 << 20)
        except OSError:
            data = b""
        out[name] = data.decode("utf-8", "replace").splitlines()
    return out


def scrape(lab: Lab) -> dict[str, R.Samples | None]:
    """Each node's /metrics (None when its API does not answer in 2 s)."""
    out: dict[str, R.Samples | None] = {}
    for node in lab.topo.nodes:
        try:
            status, body = nodes.api_request(node.ns, "GET", "/metrics", timeout=2.0)
            out[node.name] = R.parse_metrics(body) if status == 200 and isinstance(body, str) \
                else None
        except LabError:
            out[node.name] = None
    return out


def _counter_deltas(before: dict[str, R.Samples | None], after: dict[str, R.Samples | None],
                    name: Any, where: dict[str, Any] | None = None) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for n, samples in after.items():
        was = R.metric_sum(before.get(n) or {}, name, where)
        out[n] = None if samples is None else R.delta(was, R.metric_sum(samples, name, where))
    return out


def _tool(ns: str, module: str, args: list[str]) -> subprocess.Popen[str]:
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", module, "--ns", ns, *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish_tool(run: Run, key: str, limit_s: float) -> None:
    """Wait for the attack tool (killed, by its PID, past ``limit_s``); its
    JSON goes to ``run.extras[key]``."""
    proc: subprocess.Popen[str] | None = run.handles.get("tool")
    if proc is None:
        return
    try:
        _, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        err = f"killed after {limit_s:.0f} s; " + err
    out: Path = run.handles["tool_out"]
    try:
        run.extras[key] = json.loads(out.read_text())
    except (OSError, ValueError):
        run.extras[key] = {"error": f"exit {proc.returncode}: {err.strip()[-500:]}"}


# --- the common steps -----------------------------------------------------------

def _baseline(run: Run) -> None:
    run.handles["offsets"] = log_offsets(run.lab)
    run.handles["metrics_before"] = scrape(run.lab)
    run.handles["t_start"] = time.monotonic()


def _evidence(run: Run) -> None:
    """After the stream: logs since the baseline, /metrics again."""
    lab = run.lab
    window = time.monotonic() - run.handles["t_start"]
    logs = log_lines(lab, run.handles["offsets"])
    run.extras["log_window_s"] = round(window, 1)
    run.extras["node_logs"] = {n: R.log_summary(lines, window) for n, lines in logs.items()}
    after = scrape(lab)
    before = run.handles["metrics_before"]
    run.extras["metrics_reachable_after"] = {n: s is not None for n, s in after.items()}
    run.extras["flows_refused"] = _counter_deltas(before, after, R.REFUSED_NAME)
    run.extras["health_check_failures_metric"] = _counter_deltas(before, after,
                                                                 R.HEALTH_FAILED_NAME)
    run.extras["rejected_sync_datagrams"] = _counter_deltas(before, after,
                                                            R.REJECTED_SYNC_NAME)


def _clean_slate(run: Run) -> None:
    restart_nodes(run.lab, run.lab.state.topology.get("nofile"))


def _common_checks(run: Run, result: dict[str, Any]) -> None:
    routes = R.route_counts(result["fib_changes"])
    result["withdraws"] = routes["withdraws"]
    result["route_count_timeline"] = routes["timeline"]
    logs: dict[str, dict[str, Any]] = result.get("node_logs", {})
    checks = result["checks"]
    checks["evidence_gathered"] = bool(logs)
    checks["no_withdraw"] = routes["withdraws"] == 0 and all(
        s["route_withdraws"] == 0 for s in logs.values())
    metric_failures = [v for v in result.get("health_check_failures_metric", {}).values() if v]
    checks["no_failed_health_checks"] = not metric_failures and all(
        s["health_failures"] == 0 and s["service_unhealthy"] == 0 for s in logs.values())
    checks["log_volume"] = all(s["peak_lines_per_s"] <= LOG_PEAK_MAX for s in logs.values())
    result["log_lines_per_s"] = {n: {"average": s["lines_per_s"], "peak": s["peak_lines_per_s"]}
                                 for n, s in logs.items()}


def _target(text: str) -> Any:
    return lambda lab: Target(fib_unchanged=True, min_new_success=MIN_NEW_SUCCESS,
                              text=f"0 withdraws, 0 failed health checks, >= "
                                   f"{MIN_NEW_SUCCESS:.0%} new ok, log peak <= "
                                   f"{LOG_PEAK_MAX}/s{text}")


# --- floods -----------------------------------------------------------------------

def _cap(run: Run, protocol: str) -> tuple[int, str]:
    """The smallest flow cap the nodes export for ``protocol``, else their
    open-file limit; with where it came from."""
    services = UDP_SERVICES if protocol == "udp" else TCP_SERVICES
    caps = [R.metric_min(s, R.UDP_CAP_NAME, {"service": services}) if protocol == "udp"
            else R.metric_min(s, R.TCP_CAP_NAME)
            for s in run.handles["metrics_before"].values() if s is not None]
    known = [int(c) for c in caps if c]
    if known:
        return min(known), "metrics"
    limits = []
    for node in run.lab.topo.nodes:
        proc = run.lab.state.find("anycast-lb", node.name)
        limit = node_nofile(proc.pid) if proc else None
        if limit:
            limits.append(limit)
    if not limits:
        raise LabError("cannot tell the nodes' flow cap (no metric, no open-file limit)")
    return max(limits), "open-file limit"


def _flood_setup(protocol: str) -> Any:
    def setup(run: Run) -> None:
        run.extras["nodes_restarted_for_nofile"] = ensure_nofile(run.lab, NOFILE)
        run.extras["node_nofile"] = NOFILE
        _baseline(run)
        cap, source = _cap(run, protocol)
        factor = UDP_FACTOR if protocol == "udp" else TCP_FACTOR
        count = factor * cap * len(run.lab.topo.nodes)
        run.extras["flood_cap"] = {"per_node": cap, "from": source, "factor": factor,
                                   "count": count}
    return setup


def _udp_inject(run: Run) -> None:
    lab = run.lab
    out = Path(lab.run_dir) / "flood.json"
    out.unlink(missing_ok=True)
    count = min(run.extras["flood_cap"]["count"], 65536 - 1024)
    run.handles["tool_out"] = out
    run.handles["tool"] = _tool(lab.topo.client_ns, "anycast_lb.lab.flood", [
        "--source", str(T.FLOOD_ADDRESS), "--vip", str(lab.topo.vip), "--out", str(out),
        "udp", "--port", str(T.UDP_PORT), "--count", str(count),
        "--rate", f"{count / UDP_FLOOD_S:.1f}"])


def _tcp_inject(run: Run) -> None:
    lab = run.lab
    out = Path(lab.run_dir) / "flood.json"
    out.unlink(missing_ok=True)
    count = min(run.extras["flood_cap"]["count"], 50_000)
    run.handles["tool_out"] = out
    run.handles["tool"] = _tool(lab.topo.client_ns, "anycast_lb.lab.flood", [
        "--source", str(T.FLOOD_ADDRESS), "--vip", str(lab.topo.vip), "--out", str(out),
        "tcp", "--port", str(T.SERVICE_PORT), "--count", str(count),
        "--rate", f"{count / TCP_OPEN_S:.1f}", "--hold", str(TCP_HOLD_S)])


def _flood_recover(run: Run) -> None:
    try:
        _finish_tool(run, "flood", 30.0)
        _evidence(run)
    finally:
        _clean_slate(run)


def _flood_finish(run: Run, result: dict[str, Any]) -> None:
    _common_checks(run, result)
    result["plot_note"] = plot_note(result)


def plot_note(result: dict[str, Any]) -> str:
    """The figures the plot's title adds for an abuse scenario."""
    peak = max((v["peak"] for v in result.get("log_lines_per_s", {}).values()), default=0)
    note = f"withdraws {result.get('withdraws', '-')}, busiest log second {peak} lines"
    forged = result.get("forged_flows_seen")
    if forged is not None:
        note += f", forged flows in steering maps {sum(forged.values())}"
    return note


# --- sync forgery ----------------------------------------------------------------

class SteeringSampler(threading.Thread):
    """Every SAMPLE_S: each node's steering map and dead set (forged flows
    found) and /status (all peers alive?)."""

    def __init__(self, lab: Lab, limit_s: float) -> None:
        super().__init__(daemon=True, name="steering-sampler")
        self.lab, self.limit_s = lab, limit_s
        self.stop = threading.Event()
        self.forged: dict[str, set[int]] = {n.name: set() for n in lab.topo.nodes}
        self.samples = 0
        self.peers_down_samples: dict[str, int] = {n.name: 0 for n in lab.topo.nodes}
        self.unreachable: dict[str, int] = {n.name: 0 for n in lab.topo.nodes}

    def run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        vip = str(self.lab.topo.vip)
        client = str(self.lab.topo.client_address)
        while not self.stop.is_set() and time.monotonic() < deadline:
            for node in self.lab.topo.nodes:
                text = ""
                for what in (["map", "ip", "anycast_lb", "owner"],
                             ["set", "ip", "anycast_lb", "dead"]):
                    text += netns.run(["nft", "-nn", "list", *what], ns=node.ns, check=False)
                self.forged[node.name] |= R.forged_keys(text, client, FORGED_PORTS, vip)
                try:
                    status, body = nodes.api_request(node.ns, "GET", "/status", timeout=1.0)
                    alive = R.peers_all_alive(body) if isinstance(body, dict) else None
                    if status != 200 or alive is None:
                        self.unreachable[node.name] += 1
                    elif not alive:
                        self.peers_down_samples[node.name] += 1
                except LabError:
                    self.unreachable[node.name] += 1
            self.samples += 1
            self.stop.wait(SAMPLE_S)


def _forgery_setup(run: Run) -> None:
    if not run.lab.topo.flow_survival:
        raise LabError("sync-forgery needs a lab with flow survival "
                       "(`anycast-lb lab up --flow-survival`)")
    builder.wait_complete(run.lab, 20.0)
    _baseline(run)


def _forgery_plan(lab: Lab) -> dict[str, Any]:
    """What a host sniffing the node LAN knows: every node's address, sync
    port, epoch and delta seq (here read from each node's /status)."""
    info = {}
    for node in lab.topo.nodes:
        status, body = nodes.api_request(node.ns, "GET", "/status", timeout=2.0)
        cluster = body.get("cluster") if status == 200 and isinstance(body, dict) else None
        if not isinstance(cluster, dict):
            raise LabError(f"{node.name}: no cluster section in /status")
        address, port = str(cluster["address"]).rsplit(":", 1)
        info[node.name] = {"name": node.name, "address": address, "port": int(port),
                           "epoch": int(cluster["epoch"]), "seq": int(cluster["seq"])}
    return {
        "targets": [{**info[n], "peers": [info[p] for p in info if p != n]} for n in info],
        "client": str(lab.topo.client_address), "ports": list(FORGED_PORTS),
        "vip": str(lab.topo.vip), "vip_port": T.SERVICE_PORT,
        "duration": FORGE_S, "interval": FORGE_INTERVAL_S,
    }


def _forgery_prepare(run: Run) -> None:
    plan = _forgery_plan(run.lab)
    path = Path(run.lab.run_dir) / "forgery-plan.json"
    path.write_text(json.dumps(plan))
    run.handles["plan"] = path
    sampler = SteeringSampler(run.lab, FORGE_S + 10.0)
    sampler.start()
    run.handles["sampler"] = sampler


def _forgery_inject(run: Run) -> None:
    lab = run.lab
    out = Path(lab.run_dir) / "forged.json"
    out.unlink(missing_ok=True)
    injector = lab.topo.backends[-1]
    run.extras["injector"] = injector.ns
    run.handles["tool_out"] = out
    run.handles["tool"] = _tool(injector.ns, "anycast_lb.lab.forger",
                                ["--plan", str(run.handles["plan"]), "--out", str(out)])


def _forgery_recover(run: Run) -> None:
    try:
        _finish_tool(run, "forgery", 30.0)
        sampler: SteeringSampler | None = run.handles.get("sampler")
        if sampler is not None:
            sampler.stop.set()
            sampler.join(5.0)
            run.extras["steering_samples"] = sampler.samples
            run.extras["forged_flows_seen"] = {n: len(p) for n, p in sampler.forged.items()}
            run.extras["samples_with_a_peer_down"] = sampler.peers_down_samples
            run.extras["status_unreachable_samples"] = sampler.unreachable
        _evidence(run)
    finally:
        _clean_slate(run)


def _forgery_finish(run: Run, result: dict[str, Any]) -> None:
    _common_checks(run, result)
    checks = result["checks"]
    checks["no_forged_claims"] = not any(result.get("forged_flows_seen", {"?": 1}).values())
    checks["no_peer_flap"] = (
        not any(result.get("samples_with_a_peer_down", {"?": 1}).values())
        and all(s["peer_down"] == 0 for s in result.get("node_logs", {}).values()))
    rejected = result.get("rejected_sync_datagrams", {})
    if any(v is not None for v in rejected.values()):
        checks["forged_rejected_counted"] = all(v is not None and v > 0
                                                for v in rejected.values())
    result["plot_note"] = plot_note(result)


ABUSE_SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("udp-flood", f"one client sends {UDP_FACTOR}x the nodes' UDP flow cap of source "
             f"ports to the VIP in {UDP_FLOOD_S:.0f} s (nodes at {NOFILE} open files)",
             _udp_inject, _flood_recover, False, _target(""),
             post_s=lambda lab: UDP_FLOOD_S + 2.5, setup=_flood_setup("udp"),
             finish=_flood_finish),
    Scenario("tcp-flood", f"one client opens {TCP_FACTOR}x the nodes' TCP cap of idle "
             f"connections to VIP:{T.SERVICE_PORT} (nodes at {NOFILE} open files)",
             _tcp_inject, _flood_recover, False, _target(""),
             post_s=lambda lab: TCP_OPEN_S + TCP_HOLD_S + 2.0, setup=_flood_setup("tcp"),
             finish=_flood_finish, in_demo=False),
    Scenario("sync-forgery", "a host on the node LAN sends forged sync datagrams (flow "
             "claims, bogus deltas and snapshots, leave and restart) to every node",
             _forgery_inject, _forgery_recover, False,
             _target("; no forged claim in any steering map, no peer flap"),
             post_s=lambda lab: FORGE_S + 2.0, setup=_forgery_setup,
             prepare=_forgery_prepare, finish=_forgery_finish, in_demo=False,
             needs_flow_survival=True),
]}


def summary_row(result: dict[str, Any]) -> list[str]:
    logs = result.get("node_logs", {})
    peak = " ".join(f"{n}={s['peak_lines_per_s']}" for n, s in logs.items())
    health = sum(s["health_failures"] + s["service_unhealthy"] for s in logs.values())
    forged = result.get("forged_flows_seen")
    return [result["scenario"], str(result.get("withdraws", "-")), str(health),
            f"{result['new_connections_total'] - result['new_connections_failed']}"
            f"/{result['new_connections_total']} ({result.get('new_success_pct', '-')} %)",
            peak, "-" if forged is None else str(sum(forged.values())),
            "PASS" if result["pass"] else "FAIL"]


SUMMARY_HEADER = ["scenario", "withdraws", "health failures", "new ok",
                  "log peak lines/s", "forged flows seen", "verdict"]
