"""L2 scenarios (``lab up --l2``): the elected VIP moves by gratuitous ARP /
unsolicited NA, measured at a client on the same segment.

Each scenario starts the measuring client (:mod:`anycast_lb.lab.l2probe`)
in the ARP client namespace for ``PRE_S`` + the scenario's ``post_s``: a UDP
stream every 1 ms, ``FLOWS`` long-lived TCP flows, a capture of every ARP
reply, gratuitous ARP and NA for the VIP, and a prober asking who has the
VIP every ``PROBE_MS``. ``PRE_S`` after the first UDP reply it injects the
fault on the owner (lb1, the highest priority), waits for the client, undoes
the fault and waits until lb1 owns both VIPs again. It writes
``result.json`` (figures, targets, ``checks``, ``pass``), ``traffic.json``
(the client's raw record) and ``timeline.png``.

Figures (:func:`analyse`):

- ``udp_lost``: datagrams sent after the first reply and at least
  ``TAIL_S`` before the end that got no reply;
- ``resumed_ms``: from the fault to the send time of the first answered
  datagram after the fault's first loss from which ``RESUMED_STREAK`` in a
  row (100 ms) were answered (0 when none was lost after the fault; None
  when traffic never resumed); ``outage_ms``: from that first loss to then;
- ``split_brain_ms``: probe rounds answered by two or more MACs, times the
  probe interval (what "two nodes answered for the VIP" means, seen
  directly); ``passive_overlap_ms``: from the new owner's first
  announcement to the old owner's last frame for the VIP, when the old one
  came later (0 otherwise);
- TCP: flows broken, and the longest time from the fault until a broken
  flow was connected again. A VIP move breaks the proxied TCP flows of the
  old owner (the new owner has no socket for them): no target is set on them.

======================  ======================================================
``l2-owner-kill``       SIGKILL of the owner's anycast-lb (IPv4 VIP)
``l2-owner-hang``       SIGSTOP of the owner's anycast-lb; SIGCONT afterwards
``l2-owner-isolated``   the owner cut from etcd only (nft drop on ``mgmt0``),
                        still on the LAN
``l2-drain``            ``POST /drain`` to the owner (planned move)
``l2-preempt``          the owner is stopped first (lb2 takes over); then it
                        starts again and preempts (planned move)
``l2-owner-kill-v6``    ``l2-owner-kill`` on the IPv6 VIP
``l2-drain-v6``         ``l2-drain`` on the IPv6 VIP
======================  ======================================================

Targets: an unplanned move resumes within ``lease_ttl`` + 0.5 s; a planned
move loses no datagram; the split-brain window is 0 everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anycast_lb.errors import LabError
from anycast_lb.lab import builder, netns, nodes, scenarios
from anycast_lb.lab import topology as T
from anycast_lb.lab.builder import Lab
from anycast_lb.lab.scenarios import Run, nft_clear
from anycast_lb.lab.topology import Node

PRE_S = 1.0
FLOWS = 10
PROBE_MS = 10.0
TAIL_S = 0.3
READY_TIMEOUT_S = 10.0
OWNER_TIMEOUT_S = 30.0
RESUMED_STREAK = 100
"""Datagrams in a row answered (100 ms) for traffic to count as resumed."""
RESUME_SLACK_S = 0.5
"""Unplanned target: resumed within ``lease_ttl`` + this (docs/l2.md)."""


@dataclass(frozen=True)
class L2Scenario:
    name: str
    description: str
    version: int
    planned: bool
    inject: Callable[[Run], None]
    recover: Callable[[Run], None]
    post_s: float
    setup: Callable[[Run], None] | None = None
    expect_owner: str = "lb2"
    """Who owns the VIP at the end of the measurement."""
    in_demo: bool = True


# --- the lab ----------------------------------------------------------------

def vips(lab: Lab) -> list[str]:
    del lab
    return [str(T.L2_VIP), str(T.L2_VIP6)]


def owners(lab: Lab) -> dict[str, dict[str, Any]]:
    """Per node name: its ``/status`` ``vips`` entries by VIP ({} when the
    node does not answer)."""
    out: dict[str, dict[str, Any]] = {}
    for node in lab.topo.nodes:
        try:
            status, body = nodes.api_request(node.ns, "GET", "/status", timeout=1.0)
        except LabError:
            out[node.name] = {}
            continue
        entries = body.get("vips") if status == 200 and isinstance(body, dict) else None
        out[node.name] = {str(e.get("vip")): e for e in entries or [] if isinstance(e, dict)}
    return out


def holders(lab: Lab, vip: str) -> list[str]:
    """Nodes whose ``/status`` says they hold ``vip`` now."""
    return [name for name, entries in owners(lab).items()
            if entries.get(vip, {}).get("has_vip")]


def wait_owner(lab: Lab, node: Node, timeout: float = OWNER_TIMEOUT_S) -> None:
    """Wait until ``node`` alone holds both elected VIPs and its key says
    announced (every node's ``/status``). Raises LabError at the deadline."""
    def done() -> bool:
        seen = owners(lab)
        for vip in vips(lab):
            mine = seen.get(node.name, {}).get(vip, {})
            if not mine.get("has_vip") or mine.get("owner") != node.name:
                return False
            if any(e.get(vip, {}).get("has_vip") for n, e in seen.items() if n != node.name):
                return False
        return True
    netns.wait_for(done, timeout, f"{node.name} to own {', '.join(vips(lab))}", interval=0.1)


def macs(lab: Lab) -> dict[str, str]:
    """MAC of each node's LAN interface -> node name."""
    out = {}
    for node in lab.topo.nodes:
        text = netns.run(["ip", "-j", "link", "show", node.lan_if], ns=node.ns)
        out[str(json.loads(text)[0]["address"])] = node.name
    return out


def _node_pid(run: Run) -> int:
    return int(scenarios.node_proc(run.lab, run.victim).pid)


# --- faults -----------------------------------------------------------------

def _kill(run: Run) -> None:
    run.extras["node_pid"] = _node_pid(run)
    run.extras["exabgp_pid"] = scenarios.exabgp_pid(run.lab, run.victim)
    run.event = time.monotonic()
    os.kill(run.extras["node_pid"], signal.SIGKILL)


def _restart(run: Run) -> None:
    scenarios.restart_node(run)


def _hang(run: Run) -> None:
    run.extras["node_pid"] = _node_pid(run)
    run.event = time.monotonic()
    os.kill(run.extras["node_pid"], signal.SIGSTOP)


def _cont(run: Run) -> None:
    os.kill(run.extras["node_pid"], signal.SIGCONT)


def _isolate(run: Run) -> None:
    ifname = run.lab.topo.mgmt_if
    run.event = time.monotonic()
    scenarios.cut_interface(run.victim.ns, ifname)


def _heal(run: Run) -> None:
    nft_clear(run.victim.ns)


def _post(run: Run, path: str) -> None:
    status, body = nodes.api_request(run.victim.ns, "POST", path, token=T.ADMIN_TOKEN)
    if status != 200:
        raise LabError(f"POST {path} on {run.victim.name}: {status} {body}")


def _drain(run: Run) -> None:
    run.event = time.monotonic()
    _post(run, "/drain")


def _undrain(run: Run) -> None:
    _post(run, "/undrain")


def _stop_owner(run: Run) -> None:
    """Preempt set-up: stop lb1 (SIGTERM: its drain hands the VIPs over)."""
    builder.stop_node(run.lab, run.victim)
    wait_owner(run.lab, run.lab.topo.node("lb2"))


def _start_owner(run: Run) -> None:
    run.event = time.monotonic()
    builder.start_node(run.lab, run.victim)


def _nothing(run: Run) -> None:
    del run


def _scenarios() -> dict[str, L2Scenario]:
    base = [
        L2Scenario("l2-owner-kill", "SIGKILL of the owner's anycast-lb", 4, False,
                   _kill, _restart, 4.0),
        L2Scenario("l2-owner-hang", "SIGSTOP of the owner's anycast-lb (SIGCONT after)", 4,
                   False, _hang, _cont, 4.0, in_demo=False),
        L2Scenario("l2-owner-isolated", "owner cut from etcd only (nft drop on mgmt0), "
                   "still on the LAN", 4, False, _isolate, _heal, 4.0, in_demo=False),
        L2Scenario("l2-drain", "POST /drain to the owner (planned move)", 4, True,
                   _drain, _undrain, 3.0),
        L2Scenario("l2-preempt", "the higher-priority node starts again and preempts "
                   "(planned move)", 4, True, _start_owner, _nothing, 15.0,
                   setup=_stop_owner, expect_owner="lb1", in_demo=False),
        L2Scenario("l2-owner-kill-v6", "SIGKILL of the owner's anycast-lb, IPv6 VIP", 6,
                   False, _kill, _restart, 4.0, in_demo=False),
        L2Scenario("l2-drain-v6", "POST /drain to the owner, IPv6 VIP (planned move)", 6,
                   True, _drain, _undrain, 3.0, in_demo=False),
    ]
    return {s.name: s for s in base}


L2_SCENARIOS = _scenarios()


# --- analysis ---------------------------------------------------------------

def target_text(s: L2Scenario, lease_ttl: float) -> str:
    if s.planned:
        return "0 datagrams lost, split-brain window 0 ms"
    return (f"traffic resumed within lease_ttl + {RESUME_SLACK_S:g} s "
            f"({(lease_ttl + RESUME_SLACK_S) * 1000:.0f} ms), split-brain window 0 ms")


def analyse(traffic: dict[str, Any], event: float, mac_names: dict[str, str],
            s: L2Scenario, lease_ttl: float) -> dict[str, Any]:
    """Figures and checks from the client's record (module docstring).
    Times in ``traffic`` and ``event`` are monotonic s; figures in ms."""
    udp = traffic["udp"]
    sent: list[float | None] = udp["sent"]
    recv: list[float | None] = udp["recv"]
    first = next((i for i, r in enumerate(recv) if r is not None), None)
    last_time = float(traffic["end"]) - TAIL_S
    counted = [i for i, t in enumerate(sent) if t is not None and t <= last_time
               and first is not None and i >= first]
    lost = [i for i in counted if recv[i] is None]
    lost_before = [i for i in lost if (sent[i] or 0.0) < event]
    resumed_ms: float | None = 0.0
    outage_ms = 0.0
    after_fault = [i for i in lost if (sent[i] or 0.0) >= event]
    if after_fault:
        # Resumed: the first answered datagram after the fault's first loss
        # from which RESUMED_STREAK in a row were answered.
        streak, start = 0, None
        for i in counted:
            if i <= after_fault[0]:
                continue
            if recv[i] is None:
                streak, start = 0, None
                continue
            start = i if start is None else start
            streak += 1
            if streak >= RESUMED_STREAK:
                break
        if start is None or streak < RESUMED_STREAK:
            resumed_ms = None  # not within the measurement
        else:
            resumed_ms = ((sent[start] or 0.0) - event) * 1000
            outage_ms = ((sent[start] or 0.0) - (sent[after_fault[0]] or 0.0)) * 1000

    def name(mac: str) -> str:
        return mac_names.get(mac, mac)

    # Split brain seen by the prober: MACs answering each probe round.
    probes: list[float] = traffic["probe"]["sent"]
    answers = sorted(traffic["probe"]["answers"])
    interval_ms = float(traffic["probe"]["interval_ms"])
    rounds: list[set[str]] = [set() for _ in probes]
    j = 0
    for k, t0 in enumerate(probes):
        t1 = probes[k + 1] if k + 1 < len(probes) else t0 + interval_ms / 1000
        while j < len(answers) and answers[j][0] < t0:
            j += 1
        m = j
        while m < len(answers) and answers[m][0] < t1:
            rounds[k].add(name(answers[m][1]))
            m += 1
    split_rounds = [k for k, r in enumerate(rounds) if len(r) >= 2]
    split_brain_ms = len(split_rounds) * interval_ms
    split_spans = _spans([(probes[k] - event) * 1000 for k in split_rounds], interval_ms)
    answering: list[list[Any]] = []
    for k, r in enumerate(rounds):
        key = sorted(r)
        if not answering or answering[-1][1] != key:
            answering.append([round((probes[k] - event) * 1000, 1), key])

    capture = sorted(c for c in traffic["capture"] if c[2] != "client-asks")
    asks = [[round((t - event) * 1000, 1), name(mac)] for t, mac, kind in traffic["capture"]
            if kind == "client-asks"]
    frames = [[round((t - event) * 1000, 1), name(mac), kind] for t, mac, kind in capture]
    before = [f for f in frames if f[0] < 0]
    # The owner before the fault: the one MAC answering the prober just
    # before it (else the last announcement before it).
    answered_before = [a for a in answering if a[0] < 0 and len(a[1]) == 1]
    old = (answered_before[-1][1][0] if answered_before
           else before[-1][1] if before else None)
    new_frames = [f for f in frames if f[0] >= 0 and f[1] != old]
    new = new_frames[0][1] if new_frames else None
    overlap_ms = 0.0
    if old is not None and new_frames:
        later_old = [f[0] for f in frames if f[1] == old and f[0] > new_frames[0][0]]
        if later_old:
            overlap_ms = max(later_old) - new_frames[0][0]
    first_announce_ms = new_frames[0][0] if new_frames else None

    flows = traffic["tcp"]
    broken = [f for f in flows if f["broken"]]
    reconnect_ms = [max(0.0, (f["reconnected"][-1] - event) * 1000) for f in broken
                    if f["reconnected"]]

    unplanned_bound_ms = (lease_ttl + RESUME_SLACK_S) * 1000
    checks: dict[str, bool] = {"split_brain_zero": split_brain_ms == 0 and overlap_ms == 0,
                               "moved_to_expected": new == s.expect_owner}
    if s.planned:
        checks["zero_lost"] = len(lost) == 0
    else:
        checks["resumed_within_bound"] = resumed_ms is not None \
            and resumed_ms <= unplanned_bound_ms
    return {
        "scenario": s.name,
        "description": s.description,
        "ip_version": s.version,
        "planned": s.planned,
        "vip": traffic["vip"],
        "udp_sent": len(counted),
        "udp_lost": len(lost),
        "udp_lost_before_event": len(lost_before),
        "resumed_ms": None if resumed_ms is None else round(resumed_ms, 1),
        "outage_ms": round(outage_ms, 1),
        "split_brain_ms": split_brain_ms,
        "split_brain_spans_ms": split_spans,
        "passive_overlap_ms": round(overlap_ms, 1),
        "old_owner": old,
        "new_owner": new,
        "first_announcement_ms": first_announce_ms,
        "announcements": frames,
        "client_asked": asks,
        "lost_from_ms": (round(((sent[lost[0]] or 0.0) - event) * 1000, 1)
                         if lost else None),
        "probe_answering": answering,
        "probe_rounds": len(probes),
        "tcp_flows": len(flows),
        "tcp_broken": len(broken),
        "tcp_reconnected_max_ms": round(max(reconnect_ms), 1) if reconnect_ms else None,
        "udp_errors": len(udp["errors"]),
        "target": target_text(s, lease_ttl),
        "unplanned_bound_ms": None if s.planned else unplanned_bound_ms,
        "checks": checks,
        "pass": all(checks.values()),
    }


def _spans(starts_ms: list[float], width_ms: float) -> list[list[float]]:
    """Merge probe rounds (start times, ms) into [from, to] spans."""
    out: list[list[float]] = []
    for t in starts_ms:
        if out and t <= out[-1][1] + width_ms * 0.5:
            out[-1][1] = round(t + width_ms, 1)
        else:
            out.append([round(t, 1), round(t + width_ms, 1)])
    return out


# --- running ----------------------------------------------------------------

def run_l2_scenario(lab: Lab, name: str, out_dir: Path, victim: str = "lb1") -> dict[str, Any]:
    """Run one L2 scenario; write result.json, traffic.json, timeline.png
    under ``out_dir``; return the result. Raises LabError when the lab is
    not an L2 lab or the client does not start."""
    if not lab.topo.l2:
        raise LabError(f"{name} needs the L2 lab: `anycast-lb lab up --l2`")
    s = L2_SCENARIOS[name]
    node = lab.topo.node(victim)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(lab, node)
    wait_owner(lab, node)
    if s.setup is not None:
        s.setup(run)
    vip = T.L2_VIP if s.version == 4 else T.L2_VIP6
    probe_address = T.L2_PROBE if s.version == 4 else T.L2_PROBE6
    ready = out_dir / "ready"
    raw = out_dir / "traffic.json"
    for path in (ready, raw):
        path.unlink(missing_ok=True)
    duration = PRE_S + s.post_s + 0.5
    proc = netns.spawn(lab.topo.arp_ns, [
        sys.executable, "-m", "anycast_lb.lab.l2probe", "--vip", str(vip),
        "--udp-port", str(T.UDP_PORT), "--tcp-port", str(T.SERVICE_PORT),
        "--flows", str(FLOWS), "--duration", f"{duration:g}", "--probe-ms", f"{PROBE_MS:g}",
        "--probe-ns", lab.topo.probe_ns, "--probe-address", str(probe_address),
        "--ready", str(ready), "--out", str(raw)], out_dir / "client.log")
    recovered = False
    try:
        netns.wait_for(ready.exists, READY_TIMEOUT_S, "the L2 client's first UDP reply",
                       interval=0.02)
        started = float(ready.read_text())
        time.sleep(max(0.0, started + PRE_S - time.monotonic()))
        s.inject(run)
        event = run.event or time.monotonic()
        netns.wait_for(lambda: not netns.pid_alive(proc.pid), duration + 10.0,
                       "the L2 client to finish", interval=0.05)
        s.recover(run)
        recovered = True
        traffic = json.loads(raw.read_text())
    finally:
        if not recovered:
            try:
                s.recover(run)
            except (LabError, OSError):
                pass
        if netns.pid_alive(proc.pid):
            netns.terminate(proc.pid, netns.proc_start(proc.pid))
    lease_ttl = nodes.L2_LEASE_TTL_S
    result = analyse(traffic, event, macs(lab), s, lease_ttl)
    try:
        wait_owner(lab, node)
        result["recovered"] = True
    except LabError:
        result["recovered"] = False
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(out_dir / "timeline.png", traffic, event, result, macs(lab))
    except ImportError:
        pass
    return result


# --- reporting --------------------------------------------------------------

SUMMARY_HEADER = ["scenario", "lost", "resumed", "split brain", "moved", "tcp broken",
                  "verdict"]


def summary_row(r: dict[str, Any]) -> list[str]:
    return [r["scenario"], f"{r['udp_lost']}/{r['udp_sent']}",
            "never" if r["resumed_ms"] is None else f"{r['resumed_ms']:.0f} ms",
            f"{r['split_brain_ms']:.0f} ms (passive {r['passive_overlap_ms']:.0f})",
            f"{r['old_owner']}->{r['new_owner']}",
            f"{r['tcp_broken']}/{r['tcp_flows']}",
            "PASS" if r["pass"] else "FAIL"]


def plot(path: Path, traffic: dict[str, Any], event: float, result: dict[str, Any],
         mac_names: dict[str, str]) -> None:
    """UDP datagrams answered and lost per 10 ms (by send time), and below,
    per node, its announcements and its answers to the prober; x in ms from
    the fault."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.01
    ok: dict[int, int] = {}
    bad: dict[int, int] = {}
    end = float(traffic["end"]) - TAIL_S
    for t, r in zip(traffic["udp"]["sent"], traffic["udp"]["recv"]):
        if t is None or t > end:
            continue
        b = int((t - event) // width)
        (ok if r is not None else bad)[b] = (ok if r is not None else bad).get(b, 0) + 1
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 5.5), dpi=100, sharex=True,
                                  gridspec_kw={"height_ratios": [2, 1]})
    xs = sorted(set(ok) | set(bad))
    ax.bar([x * width * 1000 for x in xs], [ok.get(x, 0) for x in xs], width=width * 1000,
           align="edge", color="#2b8a3e", label="UDP answered")
    ax.bar([x * width * 1000 for x in xs], [bad.get(x, 0) for x in xs], width=width * 1000,
           align="edge", bottom=[ok.get(x, 0) for x in xs], color="#e03131",
           label="UDP lost")
    ax.axvline(0, color="black", linestyle="--", linewidth=1)
    ax.set_ylabel("datagrams / 10 ms")
    resumed = "never" if result["resumed_ms"] is None else f"{result['resumed_ms']:.0f} ms"
    ax.set_title(f"{result['scenario']}: {result['udp_lost']} lost, resumed "
                 f"{resumed}, split brain {result['split_brain_ms']:.0f} ms, "
                 f"{result['old_owner']} -> {result['new_owner']}")
    ax.legend(loc="lower left", fontsize=8)
    names = sorted(set(mac_names.values()))
    rows = {n: i for i, n in enumerate(names)}
    for t, mac, _kind in traffic["probe"]["answers"]:
        n = mac_names.get(mac, mac)
        if n in rows:
            ax2.plot([(t - event) * 1000], [rows[n]], "|", color="#1971c2", markersize=8)
    for t, mac, kind in traffic["capture"]:
        n = mac_names.get(mac, mac)
        if kind == "client-asks":
            continue
        if n in rows:
            ax2.plot([(t - event) * 1000], [rows[n] + 0.3], "v", color="#e8590c", markersize=6)
    ax2.plot([], [], "|", color="#1971c2", label="answers the prober")
    ax2.plot([], [], "v", color="#e8590c", label="ARP/NA seen at the client")
    for span in result["split_brain_spans_ms"]:
        ax2.axvspan(span[0], span[1], color="#e03131", alpha=0.3)
    ax2.axvline(0, color="black", linestyle="--", linewidth=1)
    ax2.set_yticks(range(len(names)), names)
    ax2.set_ylim(-0.5, len(names) - 0.2)
    ax2.set_xlabel("ms from the fault")
    ax2.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
