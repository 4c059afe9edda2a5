"""A real lab: FRR router, three `anycast-lb run` nodes with ExaBGP, backends.

Brought up once for the module (about 4 s) and torn down by the last test,
which checks that nothing is left. Needs root, FRR (/usr/lib/frr) and
ExaBGP; skipped otherwise. Every wait is a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from anycast_lb.lab import builder, frr, netns, nodes, scenarios, state
from anycast_lb.lab import topology as T
from anycast_lb.lab.builder import Lab
from tests.lab.support import fresh_lab, require

pytestmark = pytest.mark.lab

require()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from fresh_lab(bfd=False)


def hops(lab: Lab) -> list[str]:
    with lab.fib() as fib:
        return fib.nexthops(lab.vip_prefix())


def wait_hops(lab: Lab, want: list[str], timeout: float) -> float:
    """Seconds until the FIB holds exactly ``want``; fails at the deadline."""
    start = time.monotonic()
    with lab.fib() as fib:
        at, _ = fib.wait(lab.vip_prefix(), lambda h: sorted(h) == sorted(want), timeout)
    return at - start


def without(lab: Lab, node: T.Node) -> list[str]:
    return [h for h in builder.all_hops(lab) if h != str(node.address)]


def test_three_equal_paths_installed(lab: Lab) -> None:
    want = sorted(str(n.address) for n in lab.topo.nodes)
    assert sorted(hops(lab)) == want
    assert frr.route_nexthops(lab.topo.router_ns, lab.router_frr, lab.vip_prefix()) == want
    paths = frr.bgp_paths(lab.topo.router_ns, lab.router_frr, lab.vip_prefix())
    assert sorted(p["peer"] for p in paths) == want
    assert all(p["multipath"] and p["med"] == 100 for p in paths)
    assert all(T.NODE_COMMUNITY in p["communities"] for p in paths)


def test_traffic_reaches_every_node(lab: Lab, tmp_path: Path) -> None:
    """Before the fault new connections reach all three nodes (ECMP); the
    victim's link goes down and the router's FIB converges to the other
    two next hops within the FIB watch's deadline; the result and the plot
    are written.

    How fast the FIB converged is the scenario's figure (its target, 100 ms,
    is checked by ``anycast-lb lab run link-down``), not asserted here: on
    a shared machine wall-clock time measures the other jobs' load too.
    """
    result = scenarios.run_scenario(lab, "link-down", tmp_path, victim="lb3", rate=200)
    for key in ("scenario", "event_at", "fib_converged_ms", "all_new_ok_after_ms",
                "new_connections_failed", "established_broken", "established_total",
                "ecmp_spread", "target", "pass"):
        assert key in result
    watch = {k: v for k, v in result.items() if k.startswith("fib_watch")}
    assert set(result["ecmp_spread"]) == {"lb1", "lb2", "lb3"}, (result["ecmp_spread"], watch)
    assert result["fib_converged_ms"] is not None, (result["fib_changes"], watch)
    assert "plot_error" not in result, result["plot_error"]
    assert json.loads((tmp_path / "result.json").read_text())["scenario"] == "link-down"
    assert (tmp_path / "timeline.png").stat().st_size > 1000


def test_health_fail_withdraws_and_recovery_reannounces(lab: Lab) -> None:
    victim = lab.topo.node("lb1")
    run = scenarios.Run(lab, victim)
    scenarios.SCENARIOS["health-fail"].inject(run)
    try:
        withdrawn_s = wait_hops(lab, without(lab, victim), 3.0)
    finally:
        scenarios.SCENARIOS["health-fail"].recover(run)
    back_s = wait_hops(lab, builder.all_hops(lab), 5.0)
    # fall 3 x 0.1 s + BGP/FRR: well under a second; rise 2 x 0.1 s to return.
    assert withdrawn_s < 1.0
    assert back_s < 2.0


def test_drain_sends_graceful_shutdown_before_withdraw(lab: Lab) -> None:
    victim = lab.topo.node("lb2")
    peer = str(victim.address)

    def victim_path() -> dict[str, object] | None:
        paths = frr.bgp_paths(lab.topo.router_ns, lab.router_frr, lab.vip_prefix())
        return next((p for p in paths if p["peer"] == peer), None)

    status, body = nodes.api_request(victim.ns, "POST", "/drain", token=T.ADMIN_TOKEN)
    assert status == 200, body
    try:
        path = netns.wait_for(lambda: (p := victim_path()) is not None
                              and T.GRACEFUL_SHUTDOWN in p["communities"] and p,
                              3.0, "GRACEFUL_SHUTDOWN on the victim's path", interval=0.01)
        assert path["peer"] == peer          # still announced, now with 65535:0
        # LOCAL_PREF 0 (router policy, RFC 8326) takes it out of ECMP first...
        wait_hops(lab, without(lab, victim), 2.0)
        # ...then the node withdraws after announce_grace.
        netns.wait_for(lambda: victim_path() is None, nodes.DRAIN_GRACE_S + 3.0,
                       "the victim's path to be withdrawn", interval=0.02)
        _, st = nodes.api_request(victim.ns, "GET", "/status")
        assert st["node"]["draining"] is True
    finally:
        status, body = nodes.api_request(victim.ns, "POST", "/undrain", token=T.ADMIN_TOKEN)
    assert status == 200, body
    wait_hops(lab, builder.all_hops(lab), 5.0)


def test_drain_needs_the_admin_token(lab: Lab) -> None:
    victim = lab.topo.node("lb2")
    status, _ = nodes.api_request(victim.ns, "POST", "/drain", token="wrong")
    assert status == 401
    assert sorted(hops(lab)) == builder.all_hops(lab)


def test_node_kill_withdraws(lab: Lab) -> None:
    victim = lab.topo.node("lb3")
    node_pid = scenarios.node_proc(lab, victim).pid
    run = scenarios.Run(lab, victim)
    run.extras["exabgp_pid"] = scenarios.exabgp_pid(lab, victim)
    assert run.extras["exabgp_pid"] is not None
    os.kill(node_pid, signal.SIGKILL)
    try:
        assert wait_hops(lab, without(lab, victim), 3.0) < 1.0
    finally:
        scenarios.SCENARIOS["node-kill"].recover(run)
    wait_hops(lab, builder.all_hops(lab), 15.0)


def test_node_kill_leaves_no_orphaned_exabgp(lab: Lab) -> None:
    victim = lab.topo.node("lb3")
    node_pid = scenarios.node_proc(lab, victim).pid
    run = scenarios.Run(lab, victim)
    exabgp = run.extras["exabgp_pid"] = scenarios.exabgp_pid(lab, victim)
    assert exabgp is not None
    os.kill(node_pid, signal.SIGKILL)
    try:
        # It would keep the BGP session up and block the restarted node's.
        # ExaBGP gets SIGTERM at once (PR_SET_PDEATHSIG) and takes about
        # 2 s to stop its API process before it exits.
        netns.wait_for(lambda: not netns.pid_alive(exabgp), 8.0,
                       "the killed node's ExaBGP to exit")
    finally:
        scenarios.SCENARIOS["node-kill"].recover(run)
        wait_hops(lab, builder.all_hops(lab), 15.0)


def test_teardown_leaves_nothing_behind(lab: Lab) -> None:
    pids = [(p.pid, p.start) for p in lab.state.processes if p.same_process()]
    for node in lab.topo.nodes:
        exa = scenarios.exabgp_pid(lab, node)
        if exa is not None:
            pids.append((exa, netns.proc_start(exa)))
    pids += [(pid, netns.proc_start(pid)) for ns in lab.topo.namespaces
             for pid in netns.pids_in(ns)]
    assert len(pids) >= 3 + 3 + 2 + 3        # nodes, their ExaBGP, zebra+bgpd, servers
    builder.down()
    assert netns.lab_namespaces() == []
    assert not any(netns.exists(ns) for ns in lab.topo.namespaces)
    alive = [pid for pid, start in pids
             if start is not None and netns.proc_start(pid) == start and netns.pid_alive(pid)]
    assert alive == []
    assert state.load() is None
    assert builder.leftovers() == []
