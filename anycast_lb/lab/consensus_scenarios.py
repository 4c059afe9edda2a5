"""Consensus scenarios (``lab up --consensus``): etcd faults, pushes, health
disagreement, agreed backend deaths and coordinated drains, each under the
paced client stream and 30 long-lived flows.

They run like the failover scenarios (:func:`anycast_lb.lab.scenarios.run_scenario`:
``result.json``, ``traffic.json``, ``timeline.png``, the router's FIB polled
every 5 ms), and while they run a poller per node reads its ``/status``
every ``SAMPLE_S`` (``KILL_SAMPLE_S`` for ``backend-kill-agreed``) over a kept-alive
connection. The consensus fields are read by name
(:mod:`anycast_lb.lab.consensus_results`): a build that does not show one
fails the check that needs it and names it under ``not_available``.

======================  =====================================================
``etcd-leader-kill``    SIGKILL of the etcd leader (found with ``etcdctl
                        endpoint status``); 0 failed new connections, 0
                        withdraws, table digests equal throughout
``etcd-quorum-loss``    2 of 3 members SIGKILLed for ``QUORUM_LOSS_S`` s, then
                        restarted on the same ports; 0 failed, 0 withdraws,
                        every node ``isolated`` within 5 s, back in sync
                        within 5 s of quorum returning
``etcd-partition``      the victim cut from the management segment only (nft
                        drop on its ``mgmt0``) for ``PARTITION_S`` s: it keeps
                        serving, the others keep equal digests, it resyncs
``config-push``         ``anycast-lb cluster push`` (from lb1's namespace) of a
                        pool that adds be3 and removes be1 (set-up pushed
                        be1+be2): the same new digest everywhere within 1 s
                        of the push, 0 failed, flows on be1 end cleanly
``health-disagreement`` the victim alone loses reach to be1 (nft reject): the
                        digests stay equal and unchanged, 0 failed
``backend-kill-agreed`` be1 SIGKILLed and restarted ``KILLS`` times: majority's
                        detection -> every node on one new digest, p99 <= 100 ms
``rolling-drain``       ``POST /drain`` to all three nodes within 100 ms: at
                        most one drains at a time, withdraws one by one, all
                        end drained
======================  =====================================================
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import yaml

from anycast_lb.consensus.keys import Layout
from anycast_lb.errors import LabError
from anycast_lb.lab import abuse, builder, etcd, netns, nodes
from anycast_lb.lab import consensus_results as C
from anycast_lb.lab import topology as T
from anycast_lb.lab.builder import Lab
from anycast_lb.lab.results import Target
from anycast_lb.lab.scenarios import FAULT_TABLE, Run, Scenario, cut_interface, nft, nft_clear
from anycast_lb.lab.topology import EtcdMember

SAMPLE_S = 0.02
KILL_SAMPLE_S = 0.05
"""``backend-kill-agreed`` measures from the nodes' own times (log lines and
``table_since``), so its pollers only follow the digests: every 50 ms. At
10 ms they cost the three nodes about a core of this 2-core machine
(``/status`` is about 3 ms of CPU), which slowed what they measured."""
QUORUM_LOSS_S = 10.0
PARTITION_S = 8.0
ISOLATED_WITHIN_S = 5.0
RESYNC_WITHIN_S = 5.0
PUSH_AGREED_WITHIN_S = 1.0
KILLS = 20
KILL_LOOP_S = 40.0
KILL_P99_MS = 100.0
DRAIN_SPREAD_MS = 100.0
AGREE_TIMEOUT_S = 5.0


# --- status poller -------------------------------------------------------------

class StatusPoller(threading.Thread):
    """Reads one node's ``/status`` every ``interval`` s over a kept-alive
    connection made inside the node's namespace; appends samples to
    ``timeline`` (None for no answer). Stops on ``stop`` or after ``limit_s``."""

    def __init__(self, ns: str, name: str, timeline: C.Timeline, interval: float,
                 limit_s: float, lock: threading.Lock) -> None:
        super().__init__(daemon=True, name=f"status-{name}")
        self.ns, self.node, self.timeline = ns, name, timeline
        self.interval, self.limit_s, self.lock = interval, limit_s, lock
        self.stop = threading.Event()

    def _connect(self) -> http.client.HTTPConnection:
        host, port = T.API_LISTEN.rsplit(":", 1)
        with netns.entered(self.ns):
            import socket
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(0.5)
        sock.connect((host, int(port)))
        conn = http.client.HTTPConnection(host, int(port), timeout=0.5)
        conn.sock = sock
        return conn

    def run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        conn: http.client.HTTPConnection | None = None
        while not self.stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            status: dict[str, Any] | None = None
            try:
                if conn is None:
                    conn = self._connect()
                conn.request("GET", "/status")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200:
                    parsed = json.loads(body)
                    status = parsed if isinstance(parsed, dict) else None
            except (OSError, ValueError, http.client.HTTPException, LabError):
                if conn is not None:
                    conn.close()
                conn = None
            with self.lock:
                self.timeline.samples.append(C.Sample(time.monotonic(), self.node, status))
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        if conn is not None:
            conn.close()


def _start_pollers(run: Run, interval: float = SAMPLE_S, limit_s: float = 120.0) -> None:
    tl = C.Timeline([n.name for n in run.lab.topo.nodes])
    lock = threading.Lock()
    pollers = [StatusPoller(n.ns, n.name, tl, interval, limit_s, lock)
               for n in run.lab.topo.nodes]
    for p in pollers:
        p.start()
    run.handles.update(timeline=tl, pollers=pollers, lock=lock)


def _stop_pollers(run: Run) -> C.Timeline:
    for p in run.handles.get("pollers", []):
        p.stop.set()
    for p in run.handles.get("pollers", []):
        p.join(2.0)
    tl: C.Timeline = run.handles["timeline"]
    return tl


def _latest(run: Run) -> dict[str, dict[str, Any] | None]:
    """Latest sample of every node now."""
    with run.handles["lock"]:
        samples = list(run.handles["timeline"].samples)
    out: dict[str, dict[str, Any] | None] = {}
    for s in samples:
        out[s.node] = s.status
    return out


def _wait_view(run: Run, pred: Any, timeout: float) -> float | None:
    """Wait until the latest samples of all nodes satisfy ``pred``; the
    monotonic time it held, None at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = _latest(run)
        if len(view) == len(run.lab.topo.nodes) and pred(view):
            return time.monotonic()
        time.sleep(0.005)
    return None


# --- common ------------------------------------------------------------------

def _need_consensus(run: Run) -> None:
    if not run.lab.topo.consensus:
        raise LabError("consensus scenarios need a lab with etcd: `anycast-lb lab up "
                       "--consensus` (or `lab demo --consensus`)")
    if not etcd.healthy(run.lab.topo):
        etcd.wait_ready(run.lab.topo, 20.0)
    if run.lab.state.topology.get("nofile") is not None:
        # The floods (run before these in the demo) leave the nodes at
        # 1,024 open files, where a burst of the client stream meets the
        # descriptor cap: back to the lab's own limit first.
        abuse.restart_nodes(run.lab, None)
        run.extras["nodes_restarted_for_nofile"] = True
    netns.wait_for(lambda: all(_synced(_status(n)) for n in run.lab.topo.nodes),
                   AGREE_TIMEOUT_S * 2, "every node synced with etcd")


def _status(node: T.Node) -> dict[str, Any] | None:
    try:
        code, body = nodes.api_request(node.ns, "GET", "/status", timeout=1.0)
    except LabError:
        return None
    return body if code == 200 and isinstance(body, dict) else None


def _prepare(run: Run) -> None:
    _start_pollers(run)


def _digest_checks(run: Run, result: dict[str, Any], tl: C.Timeline, name: str,
                   nodes_: list[str] | None = None, until: float | None = None) -> None:
    report = C.digest_report(tl, run.event, until or time.monotonic(), nodes_)
    result[f"digests_{name}"] = report
    if not report["available"]:
        C.not_available(result, "services[].table_digest")
    result["checks"][f"digests_equal_{name}"] = (report["available"] and report["views"] > 0
                                                 and report["unequal_views"] == 0)


def _states(tl: C.Timeline, since: float) -> dict[str, list[str]]:
    """Distinct consensus states each node went through from ``since``."""
    out: dict[str, list[str]] = {n: [] for n in tl.nodes}
    for s in tl.sorted():
        state = C.consensus_state(s.status)
        if s.t >= since and state is not None and (not out[s.node] or out[s.node][-1] != state):
            out[s.node].append(state)
    return out


def _synced(view_status: dict[str, Any] | None) -> bool:
    state = C.consensus_state(view_status)
    return state is not None and state not in C.NOT_SYNCED


def _isolation_checks(run: Run, result: dict[str, Any], tl: C.Timeline,
                      who: list[str], back_at: float | None) -> None:
    """Each of ``who`` shows isolated within ISOLATED_WITHIN_S of the event
    and is back in sync (state, and equal digests when shown) within
    RESYNC_WITHIN_S of ``back_at``."""
    result["consensus_states"] = _states(tl, run.event - 0.5)
    if not any(C.consensus_state(s.status) for s in tl.samples):
        C.not_available(result, "consensus.state")
    isolated = {n: C.ms(tl.first(n, lambda s: C.consensus_state(s) == C.ISOLATED,
                                 run.event), run.event) for n in who}
    result["isolated_after_ms"] = isolated
    result["checks"]["isolated_within_5s"] = all(
        v is not None and v <= ISOLATED_WITHIN_S * 1000 for v in isolated.values())
    if back_at is None:
        result["checks"]["resynced_within_5s"] = False
        return
    resynced = {n: C.ms(tl.first(n, _synced, back_at), back_at) for n in who}
    agreed = tl.first_view(lambda v: all(_synced(s) for s in v.values())
                           and C.all_equal_digests(v), back_at)
    result["resynced_after_quorum_ms"] = resynced
    result["all_synced_equal_digests_after_quorum_ms"] = C.ms(agreed, back_at)
    result["checks"]["resynced_within_5s"] = (
        all(v is not None and v <= RESYNC_WITHIN_S * 1000 for v in resynced.values())
        and agreed is not None and agreed - back_at <= RESYNC_WITHIN_S)


# --- etcd-leader-kill ----------------------------------------------------------

def _find_leader(run: Run) -> None:
    _prepare(run)
    member = etcd.leader(run.lab.topo)
    if member is None:
        raise LabError("no etcd leader before the event")
    run.extras["etcd_leader"] = member.name
    run.handles["leader"] = member


def _kill_leader(run: Run) -> None:
    member = run.handles["leader"]
    run.extras["etcd_killed_pid"] = etcd.kill(run.lab.state, member)
    others = [m for m in run.lab.topo.etcd if m is not member]
    run.handles["new_leader_at"] = None

    def watch() -> None:  # when the two others elect a new leader
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            new = etcd.leader(run.lab.topo, others)
            if new is not None:
                run.handles["new_leader_at"] = time.monotonic()
                run.extras["etcd_new_leader"] = new.name
                return
            time.sleep(0.05)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    run.handles["leader_watch"] = thread


def _restart_members(run: Run, members: list[EtcdMember]) -> float:
    for member in members:
        etcd.wait_gone(run.lab.state, member)
    for member in members:
        etcd.start(run.lab.state, run.lab.topo, member, run.lab.run_dir, restart=True)
    return etcd.wait_ready(run.lab.topo, 20.0)


def _recover_leader(run: Run) -> None:
    run.handles["leader_watch"].join(12.0)
    _restart_members(run, [run.handles["leader"]])


def _finish_leader(run: Run, result: dict[str, Any]) -> None:
    tl = _stop_pollers(run)
    result["etcd_new_leader_ms"] = C.ms(run.handles.get("new_leader_at"), run.event)
    _digest_checks(run, result, tl, "throughout")
    result["consensus_states"] = _states(tl, run.event)


# --- etcd-quorum-loss ----------------------------------------------------------

def _two_prepare(run: Run) -> None:
    _prepare(run)
    # The leader and one follower: no two members left to elect anyone.
    leader_ = etcd.leader(run.lab.topo) or run.lab.topo.etcd[0]
    run.handles["victims"] = [leader_] + [m for m in run.lab.topo.etcd if m is not leader_][:1]


def _kill_two(run: Run) -> None:
    victims = run.handles["victims"]
    run.extras["etcd_killed"] = [m.name for m in victims]
    for m in victims:
        etcd.kill(run.lab.state, m)

    def restart() -> None:
        time.sleep(max(0.0, run.event + QUORUM_LOSS_S - time.monotonic()))  # the outage
        run.handles["restart_at"] = time.monotonic()
        try:
            run.handles["quorum_at"] = _restart_members(run, victims)
        except LabError as exc:
            run.extras["etcd_restart_error"] = str(exc)
    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    run.handles["restart_thread"] = thread


def _recover_two(run: Run) -> None:
    run.handles["restart_thread"].join(40.0)
    if not etcd.healthy(run.lab.topo):
        stopped = [m for m in run.lab.topo.etcd if etcd.pid(run.lab.state, m) is None]
        _restart_members(run, stopped)


def _finish_two(run: Run, result: dict[str, Any]) -> None:
    tl = _stop_pollers(run)
    quorum_at = run.handles.get("quorum_at")
    result["etcd_down_s"] = None if quorum_at is None else round(quorum_at - run.event, 2)
    result["etcd_restart_to_quorum_ms"] = C.ms(quorum_at, run.handles.get("restart_at", 0.0)) \
        if quorum_at else None
    _isolation_checks(run, result, tl, tl.nodes, quorum_at)


# --- etcd-partition ------------------------------------------------------------

def _cut(run: Run) -> None:
    ifname = run.lab.topo.mgmt_if
    cut_interface(run.victim.ns, ifname)

    def heal() -> None:
        time.sleep(max(0.0, run.event + PARTITION_S - time.monotonic()))  # the outage
        nft_clear(run.victim.ns)
        run.handles["healed_at"] = time.monotonic()
    thread = threading.Thread(target=heal, daemon=True)
    thread.start()
    run.handles["heal_thread"] = thread


def _uncut(run: Run) -> None:
    run.handles["heal_thread"].join(PARTITION_S + 5)
    nft_clear(run.victim.ns)


def _finish_partition(run: Run, result: dict[str, Any]) -> None:
    tl = _stop_pollers(run)
    healed = run.handles.get("healed_at")
    others = [n for n in tl.nodes if n != run.victim.name]
    _digest_checks(run, result, tl, "among_others", others)
    states = _states(tl, run.event)
    result["others_never_isolated"] = all(C.ISOLATED not in states[n] for n in others)
    result["checks"]["others_never_isolated"] = (result["others_never_isolated"]
                                                 and any(states[n] for n in others))
    _isolation_checks(run, result, tl, [run.victim.name], healed)
    result["partition_s"] = PARTITION_S


# --- config-push ---------------------------------------------------------------

def _shared_doc(lab: Lab, keep: set[str]) -> dict[str, Any]:
    """The lab's shared config (services and announce) with only the
    backends named in ``keep`` (``be1``...)."""
    node = lab.topo.nodes[0]
    conf = nodes.node_config(lab.topo, node, nodes.node_dir(lab.run_dir, node) / "admin-token")
    allowed = {str(b.address) for b in lab.topo.backends if b.name in keep}
    services = []
    for svc in conf["services"]:
        services.append({**svc, "backends": [b for b in svc["backends"]
                                             if b["address"] in allowed]})
    return {"services": services, "announce": conf["bgp"]["announce"]}


def push(lab: Lab, keep: set[str], message: str) -> tuple[float, float, str]:
    """``anycast-lb cluster push`` from lb1's namespace of the shared config
    with backends ``keep``: (start, end monotonic s, output). Raises LabError
    when the push is refused."""
    node = lab.topo.nodes[0]
    directory = nodes.node_dir(lab.run_dir, node)
    doc = directory / f"push-{'-'.join(sorted(keep))}.yaml"
    doc.write_text(yaml.safe_dump(_shared_doc(lab, keep), sort_keys=False))
    start = time.monotonic()
    out = subprocess.run(
        ["ip", "netns", "exec", node.ns, sys.executable, "-m", "anycast_lb", "cluster",
         "--config", str(directory / "node.yaml"), "push", str(doc), "-m", message],
        capture_output=True, text=True, timeout=30, check=False)
    end = time.monotonic()
    if out.returncode != 0:
        raise LabError(f"cluster push failed ({out.returncode}): "
                       f"{(out.stdout + out.stderr).strip()[-400:]}")
    return start, end, (out.stdout + out.stderr).strip()


def _push_setup(run: Run) -> None:
    _need_consensus(run)
    _, _, out = push(run.lab, {"be1", "be2"}, "lab config-push: baseline be1+be2")
    run.extras["baseline_push"] = out


class CommitWatch(threading.Thread):
    """``etcdctl watch`` of the cluster's ``config/current`` key from lb1's
    namespace: the monotonic time each push's commit reached a watcher
    (``seen``), a few ms after etcd committed it. The push's own process
    takes seconds to start on a loaded machine, so the agreement time is
    measured from here."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(daemon=True, name="commit-watch")
        key = Layout(T.CONSENSUS_CLUSTER).current
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.topo.nodes[0].ns, "etcdctl", "--endpoints",
             ",".join(lab.topo.etcd_urls()), "watch", key],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.seen: list[float] = []

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "PUT":
                self.seen.append(time.monotonic())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5.0)


def _push_prepare(run: Run) -> None:
    _prepare(run)
    watch = CommitWatch(run.lab)
    watch.start()
    run.handles["commit_watch"] = watch
    # The baseline must be applied everywhere before the event, when the
    # nodes show digests at all.
    at = _wait_view(run, C.all_equal_digests, AGREE_TIMEOUT_S)
    run.extras["baseline_equal_before_event"] = at is not None
    view = _latest(run)
    run.handles["digest_before"] = C.digests(next(iter(view.values()), None))


def _push_inject(run: Run) -> None:
    start, end, out = push(run.lab, {"be2", "be3"}, "lab config-push: add be3, remove be1")
    run.handles["push_done"] = end
    run.extras["push_ms"] = round((end - start) * 1000, 1)
    run.extras["push_output"] = out


def _push_recover(run: Run) -> None:
    push(run.lab, {b.name for b in run.lab.topo.backends}, "lab config-push: restore")


def _push_finish(run: Run, result: dict[str, Any]) -> None:
    tl = _stop_pollers(run)
    watch: CommitWatch | None = run.handles.get("commit_watch")
    if watch is not None:
        watch.close()
        watch.join(2.0)
    before = run.handles.get("digest_before")
    done = run.handles.get("push_done", run.event)
    # The first commit seen after the event is the push's (the restoring
    # push comes after push_done).
    commit = next((t for t in (watch.seen if watch else []) if run.event <= t <= done), None)

    def new_and_equal(view: dict[str, dict[str, Any] | None]) -> bool:
        return C.all_equal_digests(view) and C.digests(next(iter(view.values()))) != before
    at = tl.first_view(new_and_equal, run.event)
    if not any(C.digests(s.status) for s in tl.samples):
        C.not_available(result, "services[].table_digest")
    result["push_commit_seen_ms"] = C.ms(commit, run.event)
    result["same_new_digest_after_commit_ms"] = C.ms(at, commit) if commit else None
    result["same_new_digest_after_push_exit_ms"] = C.ms(at, done)
    result["same_new_digest_after_push_start_ms"] = C.ms(at, run.event)
    if commit is None:
        C.not_available(result, "etcdctl watch of config/current")
    result["checks"]["same_new_digest_within_1s"] = (
        at is not None and before is not None and commit is not None
        and at - commit <= PUSH_AGREED_WITHIN_S)
    removed = run.lab.topo.backends[0].name
    traffic = json.loads((run.handles["out_dir"] / "traffic.json").read_text()) \
        if "out_dir" in run.handles else None
    on_removed = [c for c in (traffic or {}).get("long", [])
                  if c.get("established") and c.get("backend") == removed]
    result["removed_backend_flows"] = len(on_removed)
    result["removed_backend_flows_broken"] = sum(1 for c in on_removed
                                                 if c.get("broken_at") is not None)
    result["checks"]["removed_backend_flows_end_cleanly"] = (
        traffic is not None and result["removed_backend_flows_broken"] == 0)


# --- health-disagreement -------------------------------------------------------

def _lose_be1(run: Run) -> None:
    be = run.lab.topo.backends[0]
    nft(run.victim.ns, f"""
table inet {FAULT_TABLE} {{
  chain out {{
    type filter hook output priority 0; policy accept;
    ip daddr {be.address} tcp dport {{ {T.BACKEND_HTTP_PORT}, {T.BACKEND_ECHO_PORT} }} reject with tcp reset
    ip daddr {be.address} udp dport {T.BACKEND_ECHO_PORT} reject
  }}
}}
""")
    run.extras["unreachable_backend"] = be.name


def _disagree_prepare(run: Run) -> None:
    _prepare(run)
    at = _wait_view(run, C.all_equal_digests, AGREE_TIMEOUT_S)
    run.extras["digests_equal_before_event"] = at is not None
    view = _latest(run)
    run.handles["digest_before"] = C.digests(next(iter(view.values()), None))


def _disagree_finish(run: Run, result: dict[str, Any]) -> None:
    tl = _stop_pollers(run)
    _digest_checks(run, result, tl, "throughout")
    before = run.handles.get("digest_before")
    be = run.lab.topo.backends[0]
    changed = [t for t, v in tl.views(run.event, run.handles.get("recover_at", time.monotonic()))
               if any(C.digests(s) != before for s in v.values() if s is not None)]
    result["digest_changed_views"] = len(changed)
    result["checks"]["agreed_set_keeps_backend"] = before is not None and not changed
    down_seen = tl.first(run.victim.name, lambda s: C.backend_down(s, str(be.address)) is True,
                         run.event)
    result["victim_saw_backend_down_ms"] = C.ms(down_seen, run.event)


def _clear_and_mark(run: Run) -> None:
    run.handles["recover_at"] = time.monotonic()
    nft_clear(run.victim.ns)


# --- backend-kill-agreed -------------------------------------------------------

def _kill_prepare(run: Run) -> None:
    _start_pollers(run, KILL_SAMPLE_S, KILL_LOOP_S + 30)


def _server_pid(lab: Lab, name: str) -> int:
    proc = lab.state.find("server", name)
    if proc is None or not proc.same_process() or not netns.pid_alive(proc.pid):
        raise LabError(f"backend server {name} is not running")
    return proc.pid


def _restart_backend(run: Run) -> None:
    """Start be1's server again once the killed one is gone (a SIGKILL is
    not instant), and wait until it listens."""
    be = run.lab.topo.backends[0]
    proc = run.lab.state.find("server", be.name)
    killed = run.handles.pop("killed_server", None)
    if proc is not None and killed == proc.pid:
        netns.wait_for(lambda: not (proc.same_process() and netns.pid_alive(proc.pid)), 5.0,
                       f"killed server {be.name} (pid {proc.pid}) to exit")
    if proc is not None and not (proc.same_process() and netns.pid_alive(proc.pid)):
        run.lab.state.processes.remove(proc)
        run.lab.state.save()
        builder.start_backend(run.lab, be.index)
    netns.wait_for(lambda: bool(netns.run(["ss", "-Hltn", f"sport = :{T.BACKEND_HTTP_PORT}"],
                                          ns=be.ns, check=False).strip()),
                   5.0, f"backend server in {be.ns}")


def _kill_loop(run: Run) -> None:
    """Kill be1 up to KILLS times (within KILL_LOOP_S): each time wait for
    every node on one new digest, then restart it and wait for the digests
    to come back. Per kill: (kill, majority detection, all agreed) times."""
    be = run.lab.topo.backends[0]
    trials: list[dict[str, Any]] = []
    run.handles["trials"] = trials
    end = run.event + KILL_LOOP_S
    while len(trials) < KILLS and time.monotonic() < end:
        base_at = _wait_view(run, C.all_equal_digests, AGREE_TIMEOUT_S)
        before = C.digests(next(iter(_latest(run).values()), None))
        pid = _server_pid(run.lab, be.name)
        t_kill, wall_kill = time.monotonic(), time.time()
        os.kill(pid, signal.SIGKILL)
        run.handles["killed_server"] = pid

        def moved(view: dict[str, dict[str, Any] | None]) -> bool:
            return C.all_equal_digests(view) and C.digests(next(iter(view.values()))) != before
        agreed = _wait_view(run, moved, AGREE_TIMEOUT_S) if base_at is not None else None
        trials.append({"kill": t_kill, "wall": wall_kill, "agreed_seen": agreed,
                       "before": before})
        _restart_backend(run)
        if agreed is None:
            break  # no digests shown (or no agreement): one trial says it
        _wait_view(run, lambda v: C.all_equal_digests(v)
                   and C.digests(next(iter(v.values()))) == before, AGREE_TIMEOUT_S)


def _kill_finish(run: Run, result: dict[str, Any]) -> None:
    tl = _stop_pollers(run)
    address = str(run.lab.topo.backends[0].address)
    figures: list[dict[str, Any]] = []
    for i, trial in enumerate(run.handles.get("trials", [])):
        t_kill, before = trial["kill"], trial["before"]
        nxt = run.handles["trials"][i + 1]["kill"] if i + 1 < len(run.handles["trials"]) \
            else time.monotonic()
        detect = sorted(t for n in tl.nodes
                        if (t := tl.first(n, lambda s: C.backend_down(s, address) is True,
                                          t_kill, nxt)) is not None)
        agreed = tl.first_view(lambda v: C.all_equal_digests(v)
                               and C.digests(next(iter(v.values()))) != before, t_kill, nxt)
        majority = detect[len(tl.nodes) // 2] if len(detect) > len(tl.nodes) // 2 else None
        figures.append({"detect_ms": [C.ms(t, t_kill) for t in detect],
                        "majority_detect_ms": C.ms(majority, t_kill),
                        "all_same_new_digest_ms": C.ms(agreed, t_kill),
                        "latency_ms": None if agreed is None or majority is None
                        else round(max(0.0, agreed - majority) * 1000, 1)})
    _trace_kills(run, tl, figures)
    result["kills"] = figures
    seen = [float(f["latency_ms"]) for f in figures if isinstance(f["latency_ms"], float)]
    result["visible_latency_p50_ms"] = C.percentile(seen, 50)
    result["visible_latency_p99_ms"] = C.percentile(seen, 99)
    # The figure: from the nodes' own times (log lines and table_since, ms
    # precision), not the pollers' (which add up to a sample interval at
    # each end); the polled figure stays beside it.
    lat = [float(f["trace"]["latency_ms"]) for f in figures
           if isinstance((f.get("trace") or {}).get("latency_ms"), float)]
    result["latency_source"] = "node times (logs, table_since)"
    if not lat:
        lat, result["latency_source"] = seen, "status samples"
    result["kills_measured"] = len(lat)
    result["agree_latency_p50_ms"] = C.percentile(lat, 50)
    result["agree_latency_p99_ms"] = C.percentile(lat, 99)
    result["stage_p50_p99_ms"] = _stage_percentiles(figures)
    result["sample_interval_ms"] = KILL_SAMPLE_S * 1000
    if not any(C.digests(s.status) for s in tl.samples):
        C.not_available(result, "services[].table_digest")
    if not any(C.backend_down(s.status, address) is not None for s in tl.samples):
        C.not_available(result, "services[].backends[].local_state")
    checks = result["checks"]
    # Connections be1 had answered die with it, 20 times over: counted apart.
    for generic in ("no_failures_after_convergence", "no_failures_before_event"):
        checks.pop(generic, None)
    traffic = json.loads((run.handles["out_dir"] / "traffic.json").read_text())
    failed = [r for r in traffic["new"] if not r[2]]
    # A connection be1's kernel had accepted but be1 had not yet greeted
    # dies unnamed ("no greeting"): counted with be1's when it was in
    # progress at a kill (start and end in the traffic's own clock, s).
    kills = [trial["kill"] - float(traffic["t0"]) for trial in run.handles.get("trials", [])]

    def at_a_kill(r: list[Any]) -> bool:
        start, end = float(r[0]), float(r[0]) + float(r[1]) / 1000
        return not r[4] and any(start <= k <= end for k in kills)
    result["new_failed_unnamed_at_a_kill"] = sum(1 for r in failed if at_a_kill(r))
    result["new_failed_not_answered_by_killed"] = sum(
        1 for r in failed if r[4] != run.lab.topo.backends[0].name and not at_a_kill(r))
    checks["no_failures_but_killed_backend_flows"] = \
        result["new_failed_not_answered_by_killed"] == 0
    checks[f"kills_ge_{KILLS}"] = len(lat) >= KILLS
    checks["agree_p99_le_100ms"] = bool(lat) and (C.percentile(lat, 99) or 0) <= KILL_P99_MS


def _trace_kills(run: Run, tl: C.Timeline, figures: list[dict[str, Any]]) -> None:
    """Add to each kill's figures the stages read from the nodes' own
    times (:func:`consensus_results.agreement_trace`)."""
    be = run.lab.topo.backends[0]
    keys = {f"{be.address}:{s['port']}" for s in _service_ports(run)}
    logs: dict[str, list[C.LogEvent]] = {}
    for node in run.lab.topo.nodes:
        path = nodes.node_dir(run.lab.run_dir, node) / "anycast-lb.log"
        try:
            with path.open(errors="replace") as f:
                logs[node.name] = C.parse_log(f, C.TRACE_EVENTS)
        except OSError:
            return
    trials = run.handles.get("trials", [])
    for i, trial in enumerate(trials):
        nxt = trials[i + 1] if i + 1 < len(trials) else None
        until_t = nxt["kill"] if nxt else time.monotonic()
        until_wall = nxt["wall"] if nxt else time.time()
        tables = {}
        for n in tl.nodes:
            first = next((s for s in tl.sorted() if s.node == n and trial["kill"] <= s.t < until_t
                          and C.digests(s.status) not in (None, trial["before"])), None)
            tables[n] = C.table_since(first.status) if first is not None else None
        figures[i]["trace"] = C.agreement_trace(logs, keys, trial["wall"], until_wall, tables)


def _service_ports(run: Run) -> list[dict[str, Any]]:
    """The ports of the lab's services (backend side), from lb1's config."""
    path = nodes.node_dir(run.lab.run_dir, run.lab.topo.nodes[0]) / "node.yaml"
    config = yaml.safe_load(path.read_text())
    return [{"port": b["port"]} for s in config.get("services", [])
            for b in s.get("backends", [])[:1]]


def _stage_percentiles(figures: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """p50 and p99 over the kills of: the majority's vote committed, the
    last node's agreed set and table in place (ms after the majority's
    detection), and the spread between the first and last node of each."""
    columns: dict[str, list[float]] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, (int, float)):
            columns.setdefault(name, []).append(float(value))
    for f in figures:
        trace = f.get("trace")
        if not trace:
            continue
        add("majority_vote_committed", trace["majority_vote_committed_ms"])
        for stage in ("agreed", "table"):
            vals = [float(v[stage]) for v in trace["stages_ms"].values()
                    if isinstance(v[stage], (int, float))]
            if len(vals) == len(trace["stages_ms"]):
                add(f"last_{stage}", max(vals))
                add(f"skew_{stage}", max(vals) - min(vals))
    return {name: [C.percentile(v, 50), C.percentile(v, 99)] for name, v in columns.items()}


# --- rolling-drain -------------------------------------------------------------

def _drain_all(run: Run) -> None:
    barrier = threading.Barrier(len(run.lab.topo.nodes))
    sent: dict[str, float] = {}
    answers: dict[str, Any] = {}

    def post(node: T.Node) -> None:
        barrier.wait(2.0)
        sent[node.name] = time.monotonic()
        try:
            answers[node.name] = nodes.api_request(node.ns, "POST", "/drain",
                                                   token=T.ADMIN_TOKEN, timeout=2.0)[0]
        except LabError as exc:
            answers[node.name] = str(exc)
    threads = [threading.Thread(target=post, args=(n,), daemon=True) for n in run.lab.topo.nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5.0)
    run.handles["drain_sent"] = sent
    run.extras["drain_answers"] = answers
    run.extras["drain_sent_spread_ms"] = round((max(sent.values()) - min(sent.values()))
                                               * 1000, 1) if sent else None


def _undrain_all(run: Run) -> None:
    if "lock" in run.handles:
        run.handles["final"] = _latest(run)
    for node in run.lab.topo.nodes:
        try:
            nodes.api_request(node.ns, "POST", "/undrain", token=T.ADMIN_TOKEN)
        except LabError as exc:
            run.extras.setdefault("undrain_errors", []).append(str(exc))


def _drain_finish(run: Run, result: dict[str, Any]) -> None:
    tl = _stop_pollers(run)
    checks = result["checks"]
    # The VIP ends withdrawn everywhere: failures at the end are expected.
    for generic in ("no_failures_after_convergence", "no_failures_before_event"):
        checks.pop(generic, None)
    spread = result.get("drain_sent_spread_ms")
    checks["drains_sent_within_100ms"] = spread is not None and spread <= DRAIN_SPREAD_MS
    most = 0
    for _, view in tl.views(run.event):
        most = max(most, sum(1 for s in view.values() if C.drain_state(s) in C.DRAINING))
    result["most_draining_at_once"] = most
    checks["at_most_one_draining"] = most <= 1
    # From the FIB: each change removes at most one next hop, and the VIP
    # keeps >= 2 next hops until the second withdraw (so while the first
    # node drains, two announce).
    changes = [c for c in result["fib_changes"] if c["ms"] is not None and c["ms"] >= 0]
    prev = len(run.lab.topo.nodes)
    steps_ok = True
    withdraws: list[float] = []
    for c in changes:
        n = len(c["nexthops"])
        if n < prev:
            withdraws.append(c["ms"])
            steps_ok = steps_ok and prev - n == 1
        prev = n
    result["withdraw_ms"] = withdraws
    result["min_nexthops_before_second_withdraw"] = min(
        [len(c["nexthops"]) for c in changes if len(withdraws) < 2 or c["ms"] < withdraws[1]],
        default=len(run.lab.topo.nodes))
    checks["withdraws_one_at_a_time"] = steps_ok and all(
        b - a >= nodes.DRAIN_GRACE_S * 1000 for a, b in zip(withdraws, withdraws[1:]))
    checks["vip_by_2_while_first_drains"] = result["min_nexthops_before_second_withdraw"] >= 2
    final = {n: C.drain_state(s)
             for n, s in (run.handles.get("final") or _last_statuses(tl)).items()}
    result["final_drain_state"] = final
    checks["all_end_drained"] = all(v in ("withdrawn", "drained") for v in final.values())


def _last_statuses(tl: C.Timeline) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    for s in tl.sorted():
        if s.status is not None:
            out[s.node] = s.status
    return out


# --- table -------------------------------------------------------------------

def _t(text: str, **kw: Any) -> Any:
    return lambda lab: Target(text=text, **kw)


def _noop(run: Run) -> None:
    return None


CONSENSUS_SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("etcd-leader-kill", "SIGKILL of the etcd leader",
             _kill_leader, _recover_leader, False,
             _t("0 failed new connections, 0 withdraws, table digests stay equal",
                zero_new_failures=True, fib_unchanged=True),
             post_s=lambda lab: 5.0, prepare=_find_leader, setup=_need_consensus,
             finish=_finish_leader, in_demo=False),
    Scenario("etcd-quorum-loss", f"2 of 3 etcd members SIGKILLed for {QUORUM_LOSS_S:.0f} s, "
             "then restarted on the same ports",
             _kill_two, _recover_two, False,
             _t("0 withdraws, 0 failed new connections; every node isolated within 5 s, "
                "back in sync within 5 s of quorum", zero_new_failures=True, fib_unchanged=True),
             post_s=lambda lab: QUORUM_LOSS_S + 8.0, prepare=_two_prepare,
             setup=_need_consensus,
             finish=_finish_two),
    Scenario("etcd-partition", f"the victim cut from the management segment only for "
             f"{PARTITION_S:.0f} s (nft drop on mgmt0)",
             _cut, _uncut, False,
             _t("victim keeps serving (0 failed, 0 withdraws), the others keep equal digests, "
                "victim isolated within 5 s and resynced within 5 s of the heal",
                zero_new_failures=True, fib_unchanged=True),
             post_s=lambda lab: PARTITION_S + 7.0, prepare=_prepare, setup=_need_consensus,
             finish=_finish_partition, in_demo=False),
    Scenario("config-push", "cluster push of a pool adding be3 and removing be1 (baseline "
             "be1+be2)", _push_inject, _push_recover, False,
             _t("same new digest on every node within 1 s of the push, 0 failed new "
                "connections, flows on the removed backend end cleanly",
                zero_new_failures=True, fib_unchanged=True),
             post_s=lambda lab: 4.0, prepare=_push_prepare, setup=_push_setup,
             finish=_push_finish),
    Scenario("health-disagreement", "the victim alone loses reach to be1 (nft reject)",
             _lose_be1, _clear_and_mark, False,
             _t("agreed set keeps be1, digests equal throughout, 0 failed new connections",
                zero_new_failures=True, fib_unchanged=True),
             post_s=lambda lab: 4.0, prepare=_disagree_prepare, setup=_need_consensus,
             finish=_disagree_finish, in_demo=False),
    Scenario("backend-kill-agreed", f"SIGKILL of be1, {KILLS} times (restarted in between)",
             _kill_loop, _restart_backend, False,
             _t(f"majority detection -> identical new digest everywhere, p99 <= "
                f"{KILL_P99_MS:.0f} ms over >= {KILLS} kills; 0 withdraws",
                fib_unchanged=True),
             post_s=lambda lab: KILL_LOOP_S + 2.0, prepare=_kill_prepare,
             setup=_need_consensus, finish=_kill_finish),
    Scenario("rolling-drain", "POST /drain to all three nodes within 100 ms",
             _drain_all, _undrain_all, False,
             _t("at most one drains at a time, withdraws one by one (>= 2 announce while "
                "the first drains), all end drained"),
             post_s=lambda lab: 3 * (nodes.DRAIN_GRACE_S + nodes.DRAIN_TIMEOUT_S) + 4.0,
             prepare=_prepare, setup=_need_consensus, finish=_drain_finish,
             in_demo=False),
]}
"""All of them run in ``lab demo`` (unless ``--no-consensus``), after the
flows-* scenarios and before the floods."""


def summary_row(result: dict[str, Any]) -> list[str]:
    failed = ",".join(k for k, v in result["checks"].items() if not v) or "-"
    figure = {
        "etcd-leader-kill": f"new leader {result.get('etcd_new_leader_ms')} ms",
        "etcd-quorum-loss": f"isolated {result.get('isolated_after_ms')} "
                            f"resynced {result.get('resynced_after_quorum_ms')}",
        "etcd-partition": f"isolated {result.get('isolated_after_ms')} "
                          f"resynced {result.get('resynced_after_quorum_ms')}",
        "config-push": f"same new digest {result.get('same_new_digest_after_commit_ms')} ms "
                       "after the commit",
        "health-disagreement": f"digest changes {result.get('digest_changed_views')}",
        "backend-kill-agreed": f"p50/p99 {result.get('agree_latency_p50_ms')}/"
                               f"{result.get('agree_latency_p99_ms')} ms "
                               f"({result.get('kills_measured')} kills; polled "
                               f"{result.get('visible_latency_p50_ms')}/"
                               f"{result.get('visible_latency_p99_ms')})",
        "rolling-drain": f"most draining {result.get('most_draining_at_once')}, "
                         f"withdraws at {result.get('withdraw_ms')} ms",
    }.get(result["scenario"], "")
    return [result["scenario"],
            f"{result['new_connections_failed']}/{result['new_connections_total']}",
            f"{result['established_broken']}/{result['established_total']}",
            figure, ",".join(result.get("not_available", [])) or "-",
            "PASS" if result["pass"] else "FAIL", failed]


SUMMARY_HEADER = ["scenario", "new failed", "established broken", "figure",
                  "not available", "verdict", "failed checks"]

