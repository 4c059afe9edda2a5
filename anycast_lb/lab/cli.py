"""``anycast-lb lab``: bring the namespace lab up, inspect it, run scenarios.

Mounted by the main CLI (``from anycast_lb.lab.cli import lab``). Needs root;
installs nothing. Lab errors become a message and exit status 1.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from anycast_lb.errors import AnycastLBError, LabError
from anycast_lb.lab import (
    abuse,
    builder,
    consensus_scenarios,
    etcd,
    export,
    flow_scenarios,
    frr,
    netns,
    nodes,
    scenarios,
    state,
)
from anycast_lb.lab import l2 as l2_
from anycast_lb.lab import topology as T


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except AnycastLBError as exc:
        raise click.ClickException(str(exc)) from exc


def _need_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException(
            "the lab needs root (network namespaces, FRR, nftables): "
            "run `sudo anycast-lb lab ...`")


@click.group()
def lab() -> None:
    """Namespace lab: FRR router, N anycast-lb nodes, backends, a client."""


@lab.command()
@click.option("--nodes", "n_nodes", default=3, show_default=True,
              type=click.IntRange(1, T.MAX_NODES))
@click.option("--backends", "n_backends", default=3, show_default=True,
              type=click.IntRange(1, T.MAX_BACKENDS))
@click.option("--bfd", is_flag=True, help="Run FRR bfdd beside ExaBGP (100 ms x 3).")
@click.option("--mode", type=click.Choice(builder.MODES), default="node", show_default=True,
              help="node: real `anycast-lb run`; static: plain ExaBGP + a relay.")
@click.option("--flow-survival", is_flag=True,
              help="Nodes share their flows over the node LAN and steer packets to the "
                   "owner (a cluster: section in each node config).")
@click.option("--consensus", is_flag=True,
              help="A 3-member etcd cluster on a management segment (alb-etcd1..3) and a "
                   "consensus: section in each node config.")
@click.option("--engine", type=click.Choice(builder.ENGINES), default="relay",
              show_default=True,
              help="The nodes' forwarding.engine. kernel: nftables with direct server "
                   "return (the router on the backend LAN as the backends' gateway, the "
                   "VIP on each backend's lo, echo service on VIP port 9000).")
@click.option("--l2", is_flag=True,
              help="Implies --consensus: an ARP client (alb-arp) and a prober (alb-probe) "
                   "on the backend LAN, and via: l2 services (VIPs 198.51.100.140, "
                   "2001:db8:100::10) on every node (docs/l2.md).")
def up(n_nodes: int, n_backends: int, bfd: bool, mode: str, flow_survival: bool,
       consensus: bool, engine: str, l2: bool) -> None:
    """Build the lab and wait until the router has one ECMP path per node."""
    _need_root()
    started = time.monotonic()
    with _errors():
        try:
            lab_ = builder.up(n_nodes, n_backends, bfd, mode, flow_survival=flow_survival,
                              consensus=consensus, engine=engine, l2=l2)
        except (AnycastLBError, KeyboardInterrupt):
            builder.down()
            raise
    click.echo(f"lab up in {time.monotonic() - started:.1f} s: VIP {lab_.topo.vip} via "
               f"{n_nodes} node(s), {n_backends} backend(s), mode {mode}"
               + (", BFD" if bfd else "") + (", flow survival" if flow_survival else "")
               + (", kernel engine" if engine == "kernel" else "")
               + (f", etcd {', '.join(lab_.topo.etcd_urls())}" if lab_.topo.consensus else "")
               + (f", L2 VIPs {T.L2_VIP} and {T.L2_VIP6} owned by lb1" if l2 else ""))
    click.echo(f"try: ip netns exec {lab_.topo.client_ns} curl http://{lab_.topo.vip}:"
               f"{T.WEB_PORT}/   |   anycast-lb lab status")


def status_data(lab_: builder.Lab) -> dict[str, Any]:
    """What ``lab status --json`` prints."""
    topo = lab_.topo
    st = lab_.state

    def pid(role: str, node: str | None = None) -> int | None:
        proc = st.find(role, node)
        return proc.pid if proc and proc.same_process() and netns.pid_alive(proc.pid) else None

    try:
        with lab_.fib() as fib:
            hops = fib.nexthops(lab_.vip_prefix())
    except LabError as exc:
        hops = [f"error: {exc}"]
    try:
        sessions = frr.bgp_summary(topo.router_ns, lab_.router_frr)
    except LabError:
        sessions = {}
    by_hop = topo.node_by_router_address()
    node_list = []
    for node in topo.nodes:
        exa = None
        try:
            exa = scenarios.exabgp_pid(lab_, node)
        except LabError:
            pass
        node_list.append({
            "name": node.name, "namespace": node.ns, "address": str(node.address),
            "lan_address": str(node.lan_address), "bgp_peer": str(node.router_address),
            "bgp_session": sessions.get(str(node.address), "absent"),
            "in_fib": str(node.address) in hops,
            "pids": {"anycast_lb": pid("anycast-lb", node.name), "exabgp": exa,
                     "bfdd": pid("bfdd", node.name)},
            "api": f"http://{T.API_LISTEN} (inside {node.ns})",
            "config": str(nodes.node_dir(lab_.run_dir, node) / "node.yaml"),
        })
    return {
        "mode": lab_.mode,
        "bfd": topo.bfd,
        "flow_survival": topo.flow_survival,
        "node_nofile": st.topology.get("nofile"),
        "vip": str(topo.vip),
        "namespaces": st.namespaces,
        "client": {"namespace": topo.client_ns, "address": str(topo.client_address)},
        "router": {"namespace": topo.router_ns, "vip_nexthops": hops,
                   "vip_nexthop_nodes": [by_hop.get(h, h) for h in hops],
                   "pids": {d: pid(d) for d in ("zebra", "bgpd", "bfdd")}},
        "nodes": node_list,
        "backends": [{"name": b.name, "namespace": b.ns, "address": str(b.address),
                      "pid": pid("server", b.name)} for b in topo.backends],
        "consensus": topo.consensus,
        "l2": ({"client": {"namespace": topo.arp_ns, "address": str(T.L2_CLIENT)},
                "prober": {"namespace": topo.probe_ns, "address": str(T.L2_PROBE)},
                "vips": {vip: l2_.holders(lab_, vip) for vip in l2_.vips(lab_)}}
               if topo.l2 else None),
        "etcd": {"management_prefix": str(T.MGMT_PREFIX) if topo.consensus else None,
                 "cluster": T.CONSENSUS_CLUSTER if topo.consensus else None,
                 "members": etcd.members_status(st, topo)},
        "state_file": str(state.STATE_FILE),
    }


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Namespaces, VIP, nodes (PIDs, API), and the router's next hops."""
    _need_root()
    with _errors():
        data = status_data(builder.load())
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"VIP {data['vip']}  mode {data['mode']}  bfd {data['bfd']}  "
               f"flow survival {data['flow_survival']}")
    click.echo(f"router ({data['router']['namespace']}) next hops for the VIP: "
               f"{', '.join(data['router']['vip_nexthop_nodes']) or 'none'}")
    for n in data["nodes"]:
        p = n["pids"]
        click.echo(f"  {n['name']:4} ns {n['namespace']:9} {n['address']:14} "
                   f"bgp {n['bgp_session']:12} fib {'yes' if n['in_fib'] else 'no ':3} "
                   f"anycast-lb {p['anycast_lb']} exabgp {p['exabgp']}  api {n['api']}")
    for b in data["backends"]:
        click.echo(f"  {b['name']:4} ns {b['namespace']:9} {b['address']:14} pid {b['pid']}")
    if data["l2"]:
        for vip, held in data["l2"]["vips"].items():
            click.echo(f"  L2 VIP {vip} held by {', '.join(held) or 'nobody'}")
    for m in data["etcd"]["members"]:
        click.echo(f"  {m['name']:5} ns {m['namespace']:10} {m['client_url']:26} pid {m['pid']} "
                   + ("leader" if m["leader"] else "answering" if m["answering"] else "DOWN"))


KERNEL_DEMO = ("flows-node-kill", "flows-backend-drain")
"""The kernel phase of the demo without --full."""

ALL_SCENARIOS = [*scenarios.SCENARIOS, *flow_scenarios.FLOW_SCENARIOS, *abuse.ABUSE_SCENARIOS,
                 *consensus_scenarios.CONSENSUS_SCENARIOS, *l2_.L2_SCENARIOS]


def _run_any(lab_: builder.Lab, name: str, out_dir: Path, victim: str = "lb1",
             rate: float | None = None) -> dict[str, Any]:
    if name in flow_scenarios.FLOW_SCENARIOS:
        return flow_scenarios.run_flow_scenario(lab_, name, out_dir, victim)
    if name in l2_.L2_SCENARIOS:
        return l2_.run_l2_scenario(lab_, name, out_dir, victim)
    return scenarios.run_scenario(
        lab_, name, out_dir, victim, rate,
        scenario=abuse.ABUSE_SCENARIOS.get(name)
        or consensus_scenarios.CONSENSUS_SCENARIOS.get(name))


def _print_results(results: list[dict[str, Any]]) -> None:
    """One table each for failover, flow and abuse scenarios (floods,
    forged sync: their log volume per node is printed too)."""
    agreed = consensus_scenarios.CONSENSUS_SCENARIOS
    failover = [scenarios.summary_row(r) for r in results
                if "flows_total" not in r and r["scenario"] not in abuse.ABUSE_SCENARIOS
                and r["scenario"] not in agreed and r["scenario"] not in l2_.L2_SCENARIOS]
    flows = [flow_scenarios.summary_row(r) for r in results if "flows_total" in r]
    attacks = [abuse.summary_row(r) for r in results if r["scenario"] in abuse.ABUSE_SCENARIOS]
    consensus = [consensus_scenarios.summary_row(r) for r in results if r["scenario"] in agreed]
    owned = [l2_.summary_row(r) for r in results if r["scenario"] in l2_.L2_SCENARIOS]
    tables = [(failover, scenarios.SUMMARY_HEADER), (flows, flow_scenarios.SUMMARY_HEADER),
              (attacks, abuse.SUMMARY_HEADER), (consensus, consensus_scenarios.SUMMARY_HEADER),
              (owned, l2_.SUMMARY_HEADER)]
    for i, (rows, header) in enumerate(t for t in tables if t[0]):
        if i:
            click.echo("")
        _print_table(rows, header)


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    table = [header] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@lab.command("run")
@click.argument("scenario", type=click.Choice(ALL_SCENARIOS))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output directory (default lab-results/SCENARIO).")
@click.option("--node", "victim", default="lb1", show_default=True,
              help="Node the fault hits.")
@click.option("--rate", type=click.FloatRange(1, 2000), default=None,
              help="New connections per second (default 300; ecmp 400; not for flows-*).")
def run_cmd(scenario: str, out_dir: Path | None, victim: str, rate: float | None) -> None:
    """Run SCENARIO under a paced client stream (flows-*: 300 long-lived
    flows); write result.json and timeline.png."""
    _need_root()
    out_dir = out_dir or Path("lab-results") / scenario
    with _errors():
        result = _run_any(builder.load(), scenario, out_dir, victim, rate)
    _print_results([result])
    click.echo(f"target: {result['target']}")
    if "plot_error" in result:
        click.echo(f"wrote {out_dir / 'result.json'}; no timeline.png: {result['plot_error']}")
    else:
        click.echo(f"wrote {out_dir / 'result.json'} and {out_dir / 'timeline.png'}")
    if "fib_watch_error" in result:
        click.echo(f"FIB watch: {result['fib_watch_errors']} failed polls, the last: "
                   f"{result['fib_watch_error']}")
    if not result["pass"]:
        failed = [k for k, v in result["checks"].items() if not v]
        click.echo(f"FAILED checks: {', '.join(failed)}")


@lab.command()
def down() -> None:
    """Stop every lab process and delete every lab namespace (also after a crash)."""
    _need_root()
    with _errors():
        for line in builder.down():
            click.echo(line)
        left = builder.leftovers()
    if left:
        raise click.ClickException("left behind: " + ", ".join(left))
    click.echo("lab down: no lab namespace or process left")


@lab.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=Path("lab-results"), show_default=True)
@click.option("--bfd", is_flag=True)
@click.option("--mode", type=click.Choice(builder.MODES), default="node", show_default=True)
@click.option("--scenario", "only", multiple=True,
              type=click.Choice(ALL_SCENARIOS),
              help="Run only these (repeatable), in every phase that has them.")
@click.option("--full", is_flag=True,
              help="Every scenario of every phase (the full matrix) instead "
                   "of the representative set (each capability once, a few minutes).")
@click.option("--flow-survival/--no-flow-survival", default=True, show_default=True,
              help="Nodes share their flows over the node LAN and steer packets to the "
                   "owner (a cluster: section on every node); --no-flow-survival: plain "
                   "anycast, the baseline.")
@click.option("--consensus/--no-consensus", default=None,
              help="Run etcd (3 members) in the relay phase and give the nodes a consensus: "
                   "section, with the consensus scenarios after the flows-* ones. Default: "
                   "on, unless --scenario names only scenarios that need no etcd.")
@click.option("--engine", "engines", multiple=True, type=click.Choice(builder.ENGINES),
              default=builder.ENGINES, show_default=True,
              help="Phases (repeatable): relay, the lab above; kernel, a lab of its own with "
                   "forwarding.engine: kernel (" + ", ".join(KERNEL_DEMO) + "; --full: "
                   + ", ".join(flow_scenarios.KERNEL_SCENARIOS) + ", with --bfd also "
                   "flows-node-silent), results under OUT/kernel/.")
@click.option("--l2/--no-l2", default=True, show_default=True,
              help="The L2 phase: a lab of its own (etcd, VIPs moved by gratuitous ARP / NA, "
                   "no flow survival) with the l2-* scenarios, results under OUT/l2/ "
                   "(docs/l2.md).")
def demo(out_dir: Path, bfd: bool, mode: str, only: tuple[str, ...], full: bool,
         flow_survival: bool, consensus: bool | None, engines: tuple[str, ...],
         l2: bool) -> None:
    """Up, run the scenarios of each phase (relay: failover, flows-*,
    consensus, udp-flood; kernel; L2), print figures vs targets, down."""
    _need_root()
    all_results: list[dict[str, Any]] = []
    if "relay" in engines:
        all_results += _relay_phase(out_dir, bfd, mode, only, full, flow_survival, consensus)
    if "kernel" in engines and mode == "node":
        all_results += _kernel_phase(out_dir / "kernel", bfd, only, full)
    if l2 and mode == "node":
        all_results += _l2_phase(out_dir / "l2", only, full)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(all_results, indent=2) + "\n")
    _print_results(all_results)
    click.echo(f"results and plots under {out_dir}/")


def _chosen(names: list[str], in_demo: dict[str, bool], only: tuple[str, ...],
            full: bool) -> list[str]:
    """The scenarios of one phase that run: those named with --scenario,
    else every one (--full), else the demo's representative set."""
    if only:
        return [n for n in names if n in only]
    return [n for n in names if full or in_demo.get(n, False)]


def _run_phase(out_dir: Path, names: list[str], label: str,
               up: Callable[[], builder.Lab], descriptions: dict[str, str],
               target: Callable[[builder.Lab, str], str] | None = None
               ) -> list[dict[str, Any]]:
    """Build one lab with ``up()``, run ``names`` on it, take it down."""
    results: list[dict[str, Any]] = []
    if not names:
        return results
    with _errors():
        started = time.monotonic()
        try:
            lab_ = up()
            click.echo(f"lab up in {time.monotonic() - started:.1f} s{label}")
            for name in names:
                text = target(lab_, name) if target is not None else ""
                click.echo(f"running {name}: {descriptions[name]}"
                           + (f" (target: {text})" if text else ""))
                results.append(_run_any(lab_, name, out_dir / name))
        finally:
            builder.down()
    return results


def _kernel_phase(out_dir: Path, bfd: bool, only: tuple[str, ...],
                  full: bool) -> list[dict[str, Any]]:
    """A lab with the kernel engine, the kernel scenarios on it, down."""
    # A silent node stalls its flows until the router notices: within the
    # 1 s hang limit with BFD only.
    kernel = [*flow_scenarios.KERNEL_SCENARIOS, *(["flows-node-silent"] if bfd else [])]
    names = _chosen(kernel, {n: n in KERNEL_DEMO for n in kernel}, only, full)
    descriptions = {n: (flow_scenarios.FLOW_SCENARIOS[n].description
                        if n in flow_scenarios.FLOW_SCENARIOS
                        else scenarios.SCENARIOS[n].description) for n in kernel}
    return _run_phase(out_dir, names, " (kernel engine)",
                      lambda: builder.up(3, 3, bfd, "node", engine="kernel"), descriptions)


def _l2_phase(out_dir: Path, only: tuple[str, ...], full: bool) -> list[dict[str, Any]]:
    """The L2 lab (etcd, no flow survival: it takes IPv4 VIPs only, and an
    elected VIP has one owner at a time anyway), the l2-* scenarios, down."""
    registry = l2_.L2_SCENARIOS
    names = _chosen(list(registry), {n: s.in_demo for n, s in registry.items()}, only, full)
    return _run_phase(
        out_dir, names, " (L2: etcd, VIPs moved by ARP/NA)",
        lambda: builder.up(3, 3, False, "node", consensus=True, l2=True),
        {n: s.description for n, s in registry.items()},
        lambda lab_, n: l2_.target_text(registry[n], nodes.L2_LEASE_TTL_S))


def _relay_phase(out_dir: Path, bfd: bool, mode: str, only: tuple[str, ...], full: bool,
                 flow_survival: bool, consensus: bool | None) -> list[dict[str, Any]]:
    """The relay engine's lab and its scenarios (failover, flows-*,
    consensus, floods last), down."""
    flow_survival = flow_survival and mode == "node"  # static mode runs no node
    agreed = consensus_scenarios.CONSENSUS_SCENARIOS
    named = [name for name in only if name in agreed]
    if named and consensus is False:
        raise click.UsageError(f"{', '.join(named)} need etcd: drop --no-consensus")
    if consensus is None:
        consensus = mode == "node" and (not only or bool(named))
    if consensus and mode != "node":
        raise click.UsageError("--consensus needs --mode node")
    registry: dict[str, tuple[str, bool, bool]] = {
        **{n: (s.description, s.needs_node, s.in_demo) for n, s in scenarios.SCENARIOS.items()},
        **{n: (s.description, True, s.in_demo)
           for n, s in flow_scenarios.FLOW_SCENARIOS.items()},
        **{n: (s.description, True, s.in_demo) for n, s in agreed.items() if consensus},
        # The floods last: they leave the nodes at 1,024 open files (a
        # consensus scenario would restart them).
        **{n: (s.description, True, s.in_demo) for n, s in abuse.ABUSE_SCENARIOS.items()
           if flow_survival or not s.needs_flow_survival}}
    runnable = [n for n, (_, needs_node, _) in registry.items()
                if not (needs_node and mode == "static")]
    names = _chosen(runnable, {n: v[2] for n, v in registry.items()}, only, full)
    label = ((" (flow survival)" if flow_survival else "")
             + (" (consensus)" if consensus else ""))
    return _run_phase(
        out_dir, names, label,
        lambda: builder.up(3, 3, bfd, mode, flow_survival=flow_survival, consensus=consensus),
        {n: v[0] for n, v in registry.items()},
        lambda lab_, n: agreed[n].target(lab_).text if n in agreed else "")


@lab.command("export")
@click.option("--format", "fmt", type=click.Choice(export.FORMATS), required=True,
              help="compose: docker-compose.yml; containerlab: the topology and the "
                   "files it binds.")
@click.option("--dir", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Where to write (default, from the repository root: "
                                 "`.` for compose, `labs/containerlab` for containerlab).")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 1 naming each file that differs from the generator.")
def export_cmd(fmt: str, out_dir: Path | None, check: bool) -> None:
    """Write the lab's topology (3 nodes, 3 backends) for Docker Compose or
    containerlab, generated from the namespace lab's own plan. Needs no root."""
    out_dir = out_dir or Path(export.DEFAULT_DIRS[fmt])
    stale = []
    for name, text in export.export(fmt).items():
        path = out_dir / name
        try:
            current = path.read_text()
        except OSError:
            current = None
        if current == text:
            continue
        stale.append(str(path))
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if check and stale:
        raise click.ClickException(
            f"differs from `anycast-lb lab export --format {fmt}`: {', '.join(stale)}")
    click.echo(f"{fmt}: {len(stale)} file(s) {'differ' if check else 'written'}, "
               f"under {out_dir}/")
