"""Failover scenarios: a paced client stream, one injected fault, figures.

Each scenario (see ``SCENARIOS``) runs the traffic client in the client
namespace, waits ``PRE_S`` into the stream, injects its fault on one node
(the victim, ``lb1`` unless told), polls the router's kernel FIB every 5 ms
(netlink, :mod:`anycast_lb.lab.fib`) for next hop changes, lets the stream
finish, undoes the fault, waits until every node is back in the FIB, and
writes to the output directory:

- ``result.json``: figures from :func:`anycast_lb.lab.results.analyse`
  (``scenario``, ``event_at``, ``fib_converged_ms``, ``all_new_ok_after_ms``,
  ``new_connections_failed``, ``established_broken``, ``established_total``,
  ``ecmp_spread``, ``target``, ``checks``, ``pass``...) plus
  ``recovered_ms`` and scenario extras (drain: when the GRACEFUL_SHUTDOWN
  community was seen in the router's BGP table and when the path left it);
- ``traffic.json``: the client's raw records;
- ``timeline.png``: successes/failures per 10 ms window, event marked.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from anycast_lb.errors import LabError
from anycast_lb.lab import builder, frr, netns, nodes, results
from anycast_lb.lab import topology as T
from anycast_lb.lab.builder import Lab
from anycast_lb.lab.fib import FibReader
from anycast_lb.lab.results import Target
from anycast_lb.lab.topology import Node

PRE_S = 1.5
POLL_S = 0.005
RATE = 300.0
LONG = 30
FAULT_TABLE = "alb_fault"


@dataclass
class Run:
    """What a fault function gets: the lab, the victim, and a place for extras."""

    lab: Lab
    victim: Node
    extras: dict[str, Any] = field(default_factory=dict)
    handles: dict[str, Any] = field(default_factory=dict)
    """Processes and state a scenario keeps between its steps (not written)."""
    t0: float = 0.0
    event: float = 0.0


# --- helpers ---------------------------------------------------------------

def node_proc(lab: Lab, node: Node) -> Any:
    role = "exabgp" if lab.mode == "static" else "anycast-lb"
    proc = lab.state.find(role, node.name)
    if proc is None or not proc.same_process() or not netns.pid_alive(proc.pid):
        raise LabError(f"{role} of {node.name} is not running")
    return proc


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            out += [int(p) for p in text.split()]
    except OSError:
        pass
    return out


def exabgp_pid(lab: Lab, node: Node) -> int | None:
    """PID of the node's ExaBGP: the node's own report (/status
    bgp.exabgp_pid) when it is a child of the node, else the node's child
    whose command line runs exabgp. Static mode: from the state file."""
    if lab.mode == "static":
        proc = lab.state.find("exabgp", node.name)
        return proc.pid if proc and proc.same_process() else None
    parent = node_proc(lab, node).pid
    kids = children(parent)
    try:
        status, body = nodes.api_request(node.ns, "GET", "/status", timeout=1.0)
        pid = (body.get("bgp") or {}).get("exabgp_pid") if isinstance(body, dict) else None
        if status == 200 and isinstance(pid, int) and pid in kids:
            return pid
    except LabError:
        pass
    for kid in kids:
        try:
            cmdline = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"exabgp" in part for part in cmdline[:3]):
            return kid
    return None


def nft(ns: str, ruleset: str) -> None:
    netns.run(["nft", "-f", "-"], ns=ns, input=ruleset)


def cut_interface(ns: str, ifname: str) -> None:
    """Drop every packet in and out of ``ifname`` in namespace ``ns`` (the
    fault table; :func:`nft_clear` heals it)."""
    nft(ns, f"""
table inet {FAULT_TABLE} {{
  chain in {{
    type filter hook input priority -300; policy accept;
    iifname "{ifname}" drop
  }}
  chain out {{
    type filter hook output priority -300; policy accept;
    oifname "{ifname}" drop
  }}
}}
""")


def nft_clear(ns: str) -> None:
    netns.run(["nft", "delete", "table", "inet", FAULT_TABLE], ns=ns, check=False)


def all_hops(lab: Lab) -> list[str]:
    return builder.all_hops(lab)


def wait_full(lab: Lab, timeout: float = 20.0) -> float:
    """Wait until every node is back (FIB, and BFD with --bfd); return when
    the FIB got there (monotonic s)."""
    return builder.wait_complete(lab, timeout)


# --- faults ----------------------------------------------------------------

def _health_fail(run: Run) -> None:
    lan = f"{run.lab.topo.nodes[0].lan_address}/{run.lab.topo.lan_prefixlen}"
    nft(run.victim.ns, f"""
table inet {FAULT_TABLE} {{
  chain out {{
    type filter hook output priority 0; policy accept;
    ip daddr {lan} tcp dport {{ {T.BACKEND_HTTP_PORT}, {T.BACKEND_ECHO_PORT} }} reject with tcp reset
    ip daddr {lan} udp dport {T.BACKEND_ECHO_PORT} reject
  }}
}}
""")


def _clear_fault(run: Run) -> None:
    nft_clear(run.victim.ns)


def _silent(run: Run) -> None:
    cut_interface(run.victim.ns, run.victim.uplink_if)


def _api_post(run: Run, path: str) -> None:
    status, body = nodes.api_request(run.victim.ns, "POST", path, token=T.ADMIN_TOKEN)
    if status != 200:
        raise LabError(f"POST {path} on {run.victim.name}: {status} {body}")


def _drain(run: Run) -> None:
    _api_post(run, "/drain")


def _undrain(run: Run) -> None:
    _api_post(run, "/undrain")


def _find_pids(run: Run) -> None:
    run.extras["node_pid"] = node_proc(run.lab, run.victim).pid
    run.extras["exabgp_pid"] = exabgp_pid(run.lab, run.victim)


def _signal_node(sig: signal.Signals) -> Callable[[Run], None]:
    def inject(run: Run) -> None:
        os.kill(run.extras["node_pid"], sig)
    return inject


def _cont_node(run: Run) -> None:
    os.kill(run.extras["node_pid"], signal.SIGCONT)


def restart_node(run: Run) -> None:
    """Start the victim's node again after a kill (an orphaned ExaBGP is
    stopped first, recorded in ``orphaned_exabgp_alive``)."""
    old = run.extras.get("exabgp_pid")
    if old and netns.pid_alive(old):
        # The node's ExaBGP outlived its parent: record it, then stop it so
        # the restarted node can take the BGP session.
        run.extras["orphaned_exabgp_alive"] = True
        netns.terminate(old, netns.proc_start(old))
    proc = run.lab.state.find("anycast-lb" if run.lab.mode != "static" else "exabgp",
                              run.victim.name)
    if proc is not None:
        run.lab.state.processes.remove(proc)
        run.lab.state.save()
    builder.start_node(run.lab, run.victim)


def _stop_exabgp(run: Run) -> None:
    pid = run.extras.get("exabgp_pid")
    if pid is None:
        raise LabError(f"no ExaBGP found for {run.victim.name}")
    os.kill(pid, signal.SIGSTOP)


def _cont_exabgp(run: Run) -> None:
    pid = run.extras.get("exabgp_pid")
    if pid and netns.pid_alive(pid):
        os.kill(pid, signal.SIGCONT)


def _link_down(run: Run) -> None:
    netns.run(["ip", "link", "set", run.victim.uplink_if, "down"], ns=run.victim.ns)


def _link_up(run: Run) -> None:
    v = run.victim
    netns.run(["ip", "link", "set", v.uplink_if, "up"], ns=v.ns)
    # A link flap deletes the node's default route: BGP comes back, but
    # replies would be blackholed until the route is restored.
    netns.run(["ip", "route", "replace", "default", "via", str(v.router_address)], ns=v.ns)


def _backend_kill(run: Run) -> None:
    proc = run.lab.state.find("server", run.lab.topo.backends[0].name)
    if proc is None or not proc.same_process():
        raise LabError("backend server be1 is not running")
    os.kill(proc.pid, signal.SIGKILL)
    run.extras["killed_backend"] = run.lab.topo.backends[0].name


def _backend_restart(run: Run) -> None:
    proc = run.lab.state.find("server", run.lab.topo.backends[0].name)
    if proc is not None:
        run.lab.state.processes.remove(proc)
        run.lab.state.save()
    builder.start_backend(run.lab, 1)


def _nothing(run: Run) -> None:
    return None


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    inject: Callable[[Run], None]
    recover: Callable[[Run], None]
    withdraws: bool
    target: Callable[[Lab], Target]
    post_s: Callable[[Lab], float] = lambda lab: 3.0
    needs_node: bool = True
    """False when static mode (plain ExaBGP, no node) can run it too."""
    prepare: Callable[[Run], None] = _nothing
    """Look-ups done before the event, so they do not count as outage."""
    setup: Callable[[Run], None] = _nothing
    """Done before the stream starts (and before the lab must be complete):
    e.g. restart the nodes with a lowered open-file limit."""
    finish: Callable[[Run, dict[str, Any]], None] | None = None
    """Adds figures and checks to the result (``pass`` is recomputed)."""
    in_demo: bool = True
    """Run by ``lab demo`` without ``--scenario``."""
    needs_flow_survival: bool = False
    """Skipped by ``lab demo`` in a lab without flow survival."""


def _health_target(lab: Lab) -> Target:
    h = nodes.HEALTH
    bound = h.fall * h.fast_interval * 1000 + 150
    return Target(fib_converged_ms=bound,
                  text=f"FIB converged <= fall x fast_interval + 150 = {bound:.0f} ms")


def _silent_target(lab: Lab) -> Target:
    bound = 500.0 if lab.topo.bfd else 3000.0 + 300
    how = "BFD 100 ms x 3" if lab.topo.bfd else "hold time 3 s + 300 ms (no BFD)"
    return Target(fib_converged_ms=bound, text=f"FIB converged <= {bound:.0f} ms ({how})")


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("ecmp", "no fault: spread of >= 3000 new connections over the nodes",
             _nothing, _nothing, False,
             lambda lab: Target(ecmp_tolerance=0.10,
                                text="each node within +-10 % of an even share, 0 failures"),
             needs_node=False),
    Scenario("health-fail", "the victim loses every backend (nft reject on its LAN side)",
             _health_fail, _clear_fault, True, _health_target),
    Scenario("drain", "POST /drain on the victim (GRACEFUL_SHUTDOWN, then withdraw)",
             _drain, _undrain, True,
             lambda lab: Target(zero_new_failures=True, text="0 failed new connections")
             if lab.topo.flow_survival else
             Target(zero_new_failures=True, forgive_ecmp_change=True,
                    text="0 failed new connections but those in handshake at the ECMP "
                         "change (plain anycast)"),
             post_s=lambda lab: nodes.DRAIN_GRACE_S + 2.5),
    Scenario("node-kill", "SIGKILL of the victim's anycast-lb process only",
             _signal_node(signal.SIGKILL), restart_node, True,
             lambda lab: Target(fib_converged_ms=300, text="FIB converged <= 300 ms"),
             prepare=_find_pids),
    Scenario("node-hang", "SIGSTOP of the victim's anycast-lb process (ExaBGP keeps running)",
             _signal_node(signal.SIGSTOP), _cont_node, True,
             lambda lab: Target(fib_converged_ms=1000, text="FIB converged <= 1000 ms"),
             prepare=_find_pids, in_demo=False),
    Scenario("bgp-hang", "SIGSTOP of the victim's ExaBGP (hold timer expires)",
             _stop_exabgp, _cont_exabgp, True,
             lambda lab: Target(fib_converged_ms=3300,
                                text="FIB converged <= hold time 3 s + 300 ms"),
             post_s=lambda lab: 5.0, needs_node=False, prepare=_find_pids, in_demo=False),
    Scenario("node-silent", "every packet on the victim's uplink dropped (silent death)",
             _silent, _clear_fault, True, _silent_target,
             post_s=lambda lab: 2.0 if lab.topo.bfd else 5.0, needs_node=False, in_demo=False),
    Scenario("link-down", "the victim's uplink set down on the node side",
             _link_down, _link_up, True,
             lambda lab: Target(fib_converged_ms=100, text="FIB converged <= 100 ms"),
             needs_node=False, in_demo=False),
    Scenario("backend-fail", "SIGKILL of backend be1's servers: no node may withdraw",
             _backend_kill, _backend_restart, False,
             lambda lab: Target(zero_new_failures=True, fib_unchanged=True,
                                lost_with_backend=lab.topo.backends[0].name,
                                text="0 failed new connections (but those be1 had "
                                     "answered), no next hop lost")),
]}


# --- the run ----------------------------------------------------------------

class NextHops(Protocol):
    """What ``FibWatch`` reads (``fib.FibReader``)."""

    def nexthops(self, prefix: str) -> list[str]:
        """Next hops of ``prefix``, sorted. Raises LabError."""
        ...

    def close(self) -> None: ...


class FibWatch(threading.Thread):
    """Polls ``reader`` (the router FIB) every POLL_S and records each change
    ``(monotonic s, next hops)``; stops when ``stop`` is set or after
    ``limit_s`` at most.

    A failed poll (LabError: a netlink error or its 1 s timeout, as on a
    loaded machine) does not end the watch: it is counted in ``errors``,
    the last one kept in ``error``, and the next poll comes POLL_S later.
    ``report()`` gives both for a result."""

    def __init__(self, reader: NextHops, prefix: str, limit_s: float) -> None:
        super().__init__(daemon=True, name="fib-watch")
        self.reader = reader
        self.prefix = prefix
        self.limit_s = limit_s
        self.changes: list[tuple[float, list[str]]] = []
        self.stop = threading.Event()
        self.error: Exception | None = None
        self.errors = 0

    def run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        last: list[str] | None = None
        try:
            while time.monotonic() < deadline:
                try:
                    hops = self.reader.nexthops(self.prefix)
                except LabError as exc:
                    self.errors += 1
                    self.error = exc
                else:
                    now = time.monotonic()
                    if hops != last:
                        self.changes.append((now, hops))
                        last = hops
                if self.stop.wait(POLL_S):
                    return
        finally:
            self.reader.close()

    def report(self) -> dict[str, Any]:
        """``fib_watch_errors`` (polls that failed) and ``fib_watch_error``
        (the last), when a poll failed; else nothing."""
        if not self.errors:
            return {}
        return {"fib_watch_errors": self.errors, "fib_watch_error": str(self.error)}


class BgpWatch(threading.Thread):
    """Polls the router's BGP table (vtysh) for the victim's path: records
    when GRACEFUL_SHUTDOWN first shows and when the path disappears.

    A failed poll is counted in ``errors`` (the last in ``error``) and the
    watch goes on, 10 ms later."""

    def __init__(self, lab: Lab, victim: Node, limit_s: float) -> None:
        super().__init__(daemon=True, name="bgp-watch")
        self.lab, self.victim, self.limit_s = lab, victim, limit_s
        self.gshut_at: float | None = None
        self.gone_at: float | None = None
        self.stop = threading.Event()
        self.error: Exception | None = None
        self.errors = 0

    def run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while time.monotonic() < deadline:
            try:
                paths = frr.bgp_paths(self.lab.topo.router_ns, self.lab.router_frr,
                                      self.lab.vip_prefix())
            except LabError as exc:
                self.errors += 1
                self.error = exc
            else:
                now = time.monotonic()
                mine = [p for p in paths if p["peer"] == str(self.victim.address)]
                if mine and T.GRACEFUL_SHUTDOWN in mine[0]["communities"] \
                        and self.gshut_at is None:
                    self.gshut_at = now
                if not mine and self.gone_at is None:
                    self.gone_at = now
                    return
            if self.stop.wait(0.01):
                return


def plot_timeline(draw: Callable[[], None], result: dict[str, Any]) -> None:
    """Call ``draw`` (a ``plot`` function with its arguments); a failure,
    of any kind, goes into ``result["plot_error"]`` (type and message), for
    the result file and the caller to show, instead of vanishing."""
    try:
        draw()
    except Exception as exc:  # a plot must not lose the run's result
        result["plot_error"] = f"{type(exc).__name__}: {exc}"


def _start_traffic(lab: Lab, out: Path, rate: float, duration: float, n_long: int
                   ) -> tuple[subprocess.Popen[str], float]:
    argv = ["ip", "netns", "exec", lab.topo.client_ns, sys.executable, "-m",
            "anycast_lb.lab.traffic", "--ns", lab.topo.client_ns, "--vip", str(lab.topo.vip),
            "--port", str(lab.topo.service_port), "--rate", str(rate), "--duration", str(duration),
            "--long", str(n_long), "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10.0)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("started "):
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise LabError(f"traffic client did not start: {line!r} {err.strip()[-500:]}")
    return proc, float(line.split()[1])


def run_scenario(lab: Lab, name: str, out_dir: Path, victim: str = "lb1",
                 rate: float | None = None, n_long: int = LONG,
                 scenario: Scenario | None = None) -> dict[str, Any]:
    """Run one scenario (``scenario``, else ``SCENARIOS[name]``); return its
    result (also written to out_dir).

    Raises LabError for an unknown scenario or a lab that is not complete."""
    if scenario is None and name not in SCENARIOS:
        raise LabError(f"unknown scenario {name!r}; one of: {', '.join(SCENARIOS)}")
    sc = scenario or SCENARIOS[name]
    if sc.needs_node and lab.mode == "static":
        raise LabError(f"scenario {name} needs the real node (lab is in static mode)")
    node = lab.topo.node(victim)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(lab, node)
    run.handles["out_dir"] = out_dir
    sc.setup(run)
    wait_full(lab, 20.0)
    if name == "ecmp":
        rate = rate or 400.0
        if lab.topo.kernel:
            n_long = 0  # the spread comes from packet counts: short connections only
        duration = max(3000 / rate + 0.5, 8.0)
    else:
        rate = rate or RATE
        duration = PRE_S + sc.post_s(lab)
    traffic_file = out_dir / "traffic.json"
    watch = FibWatch(FibReader(lab.topo.router_ns), lab.vip_prefix(), duration + 15.0)
    watch.start()
    bgp_watch = BgpWatch(lab, node, duration + 5.0) if name == "drain" else None
    packets_before = kernel_packets(lab) if lab.topo.kernel else {}
    proc, t0 = _start_traffic(lab, traffic_file, rate, duration, n_long)
    run.t0 = t0
    event_s: float | None = None
    try:
        if name != "ecmp":
            sc.prepare(run)
            time.sleep(max(0.0, t0 + PRE_S - time.monotonic()))  # pacing, not readiness
            if bgp_watch is not None:
                bgp_watch.start()
            # The event is when injection starts: conservative, since the
            # injecting command's own run time (inject_ms) counts as outage.
            run.event = time.monotonic()
            sc.inject(run)
            run.extras["inject_ms"] = round((time.monotonic() - run.event) * 1000, 1)
            event_s = run.event - t0
        try:
            _, err = proc.communicate(timeout=duration + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise LabError("traffic client did not finish in time") from None
        if proc.returncode != 0:
            raise LabError(f"traffic client failed: {err.strip()[-500:]}")
    finally:
        if proc.poll() is None:  # an injection failed: stop the stream too
            proc.kill()
            proc.communicate(timeout=5)
        recover_start = time.monotonic()
        if name != "ecmp":
            sc.recover(run)
            try:
                run.extras["recovered_ms"] = round((wait_full(lab, 30.0) - recover_start)
                                                   * 1000, 1)
            except LabError as exc:
                run.extras["recovered_ms"] = None
                run.extras["recovery_error"] = str(exc)
        watch.stop.set()
        watch.join(2.0)
        if bgp_watch is not None:
            bgp_watch.stop.set()
            bgp_watch.join(2.0)
    traffic = json.loads(traffic_file.read_text())
    changes = [(t - t0, hops) for t, hops in watch.changes]
    # Keep only the record until the fault was undone, so the recovery (all
    # next hops back) does not count as "not converged".
    changes_in_run = [c for c in changes if c[0] < recover_start - t0]
    expected = [h for h in all_hops(lab) if h != str(node.address)] if sc.withdraws \
        else all_hops(lab)
    result = results.analyse(name, traffic, changes_in_run, event_s, expected, all_hops(lab),
                             lab.topo.node_by_lan_address(), lab.topo.node_by_router_address(),
                             len(lab.topo.nodes), sc.target(lab))
    if lab.topo.kernel and name == "ecmp":
        # Direct server return: the backend sees the client, not the node;
        # each node's own nft counters tell its share (packets, of
        # connections of the same size). The nodes read their counters every
        # COUNTER_INTERVAL_S: wait out one read after the traffic ended.
        from anycast_lb.kernel.engine import COUNTER_INTERVAL_S
        time.sleep(COUNTER_INTERVAL_S + 0.3)
        after = kernel_packets(lab)
        result["ecmp_spread"] = {n: after.get(n, 0) - packets_before.get(n, 0)
                                 for n in sorted(after)}
        result["ecmp_spread_unit"] = "packets forwarded (nft counters)"
        result["ecmp_max_deviation_pct"] = round(100 * results.max_deviation(
            result["ecmp_spread"], len(lab.topo.nodes)), 1)
        result["checks"]["ecmp_even"] = (
            len(result["ecmp_spread"]) == len(lab.topo.nodes)
            and result["ecmp_max_deviation_pct"] <= 100 * 0.10)
        result["pass"] = all(result["checks"].values())
    result["engine"] = "kernel" if lab.topo.kernel else "relay"
    result["victim"] = None if name == "ecmp" else node.name
    result["description"] = sc.description
    result["mode"] = lab.mode
    result["bfd"] = lab.topo.bfd
    result["flow_survival"] = lab.topo.flow_survival
    result["rate_per_s"] = rate
    result["fib_poll_ms"] = POLL_S * 1000
    result.update(run.extras)
    if bgp_watch is not None:
        def ms(t: float | None) -> float | None:
            return None if t is None else round((t - run.event) * 1000, 1)
        result["gshut_seen_ms"] = ms(bgp_watch.gshut_at)
        result["bgp_path_gone_ms"] = ms(bgp_watch.gone_at)
        ok = (bgp_watch.gshut_at is not None and bgp_watch.gone_at is not None
              and bgp_watch.gshut_at < bgp_watch.gone_at)
        result["checks"]["gshut_before_withdraw"] = ok
        result["pass"] = all(result["checks"].values())
    if sc.finish is not None:
        sc.finish(run, result)
        result["pass"] = all(result["checks"].values())
    result.update(watch.report())
    if bgp_watch is not None and bgp_watch.errors:
        result["bgp_watch_errors"] = bgp_watch.errors
        result["bgp_watch_error"] = str(bgp_watch.error)

    def draw() -> None:
        from anycast_lb.lab import plot
        plot.timeline(out_dir / "timeline.png", traffic, result)

    plot_timeline(draw, result)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def kernel_packets(lab: Lab) -> dict[str, int]:
    """Packets each running node's kernel engine forwarded so far (every
    service and backend, ``/status``). Raises LabError."""
    out: dict[str, int] = {}
    for n in lab.topo.nodes:
        status, body = nodes.api_request(n.ns, "GET", "/status")
        if status != 200 or not isinstance(body, dict):
            raise LabError(f"GET /status on {n.name}: {status}")
        out[n.name] = sum(c["packets"] for s in body["services"] if s.get("kernel")
                          for c in s["kernel"]["backends"].values())
    return out


def summary_row(result: dict[str, Any]) -> list[str]:
    def fmt(v: Any) -> str:
        return "-" if v is None else str(v)
    return [result["scenario"], fmt(result.get("fib_converged_ms")),
            fmt(result.get("all_new_ok_after_ms")),
            f"{result['new_connections_failed']}/{result['new_connections_total']}",
            f"{result['established_broken']}/{result['established_total']}",
            " ".join(f"{k}={v}" for k, v in result["ecmp_spread"].items()),
            result["target"], "PASS" if result["pass"] else "FAIL"]


SUMMARY_HEADER = ["scenario", "fib_converged_ms", "all_new_ok_after_ms", "new failed",
                  "established broken", "spread (before event)", "target", "verdict"]
