"""Failover and flow-survival targets of the namespace lab, checked from measured runs.

Runs, each in a fresh lab of three nodes:

(each relay run with ``--engine relay --no-l2``: the relay phase only)

1. ``anycast-lb lab demo --full --no-flow-survival --no-consensus``: every
   scenario (failover and flows-*) with plain anycast, the baseline;
2. ``anycast-lb lab demo --full --no-consensus``: the same with flow survival
   (skipped with ``--no-flow-survival``, as are 5);
3. ``anycast-lb lab demo --no-flow-survival --bfd --scenario node-silent``:
   silent node death with FRR bfdd beside ExaBGP;
4. ``anycast-lb lab demo --no-flow-survival --bfd --scenario flows-...``: the
   flows-* scenarios, plain anycast with BFD (the baseline for 5);
5. ``anycast-lb lab demo --bfd --scenario flows-...``: with flow survival,
6. ``anycast-lb lab demo --scenario udp-flood --scenario tcp-flood --scenario
   sync-forgery``: the attacks (nodes at 1,024 open files, flow survival;
   1 and 2 run udp-flood as well, their last scenario),
7. ``anycast-lb lab demo --consensus --scenario etcd-leader-kill ...``: the
   consensus group (a 3-member etcd on the management segment; every
   scenario of ``CONSENSUS_SCENARIOS``; skipped with ``--no-consensus``),
8. ``anycast-lb lab demo --engine kernel --no-l2 --full [--bfd]``: the
   kernel engine's lab and its flow scenarios (with BFD also
   flows-node-silent),
9. ``anycast-lb lab demo --scenario l2-...``: the L2 lab and every l2-*
   scenario (skipped with ``--no-consensus``: it needs etcd),

then prints one table of failover figures, one of broken flows and one of
the attacks (withdraws seen by the router, failed health checks, new
connections ok, each node's log lines per second, forged flows found in
steering maps), one of the consensus scenarios (failed new connections,
the scenario's figure, fields the nodes do not show, failed checks), each
row with its target and verdict, and exits 1 if any target was missed.
Needs root, FRR, etcd and the package installed (``bash scripts/install.sh``)::

    sudo .venv/bin/python benchmarks/lab_failover.py [--out DIR] [--repeat N]
        [--group all|consensus] [--no-consensus]

Each run writes result.json and timeline.png per scenario under DIR.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ANYCAST_LB = [sys.executable, "-m", "anycast_lb"]
FLOW_SCENARIOS = ["flows-drain", "flows-join", "flows-churn-join", "flows-node-kill",
                  "flows-node-silent"]
ABUSE_SCENARIOS = ["udp-flood", "tcp-flood", "sync-forgery"]
L2_SCENARIOS = ["l2-owner-kill", "l2-owner-hang", "l2-owner-isolated", "l2-drain", "l2-preempt",
                "l2-owner-kill-v6", "l2-drain-v6"]
RELAY_ONLY = ("--engine", "relay", "--no-l2")
CONSENSUS_SCENARIOS = ["etcd-leader-kill", "etcd-quorum-loss", "etcd-partition", "config-push",
                       "health-disagreement", "backend-kill-agreed", "rolling-drain"]


def run_demo(out: Path, *extra: str) -> list[dict[str, Any]]:
    subprocess.run([*ANYCAST_LB, "lab", "demo", "--out", str(out), *extra], check=True)
    results: list[dict[str, Any]] = json.loads((out / "summary.json").read_text())
    return results


def run_relay(out: Path, *extra: str) -> list[dict[str, Any]]:
    return run_demo(out, *RELAY_ONLY, *extra)



def _label(r: dict[str, Any]) -> str:
    return (str(r["scenario"]) + (" --bfd" if r.get("bfd") else "")
            + (" (fs)" if r.get("flow_survival") else ""))


def _print_failover(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'scenario':24} {'fib_converged_ms':>16} {'new failed':>11} "
          f"{'estab. broken':>13}  verdict  target")
    for r in rows:
        fib = r.get("fib_converged_ms")
        print(f"{_label(r):24} {('-' if fib is None else f'{fib:.1f}'):>16} "
              f"{r['new_connections_failed']!s:>5}/{r['new_connections_total']!s:<5} "
              f"{r['established_broken']!s:>6}/{r['established_total']!s:<6}  "
              f"{'PASS' if r['pass'] else 'FAIL':7}  {r['target']}")


def _print_flows(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'scenario':30} {'broken':>9} {'victim':>8} {'collat.':>7} "
          f"{'RST ms med/max':>15} {'hang':>4}  verdict  target")
    for r in rows:
        rst = r.get("dead_owner_reset_ms") or {}
        rst_text = "-" if rst.get("max") is None else f"{rst['median']:.0f}/{rst['max']:.0f}"
        print(f"{_label(r):30} {r['established_broken']!s:>4}/{r['established_total']!s:<4} "
              f"{r['victim_broken']!s:>3}/{r['victim_flows']!s:<4} "
              f"{r['collateral_broken']!s:>7} {rst_text:>15} "
              f"{'-' if r.get('dead_owner_hang') is None else r['dead_owner_hang']!s:>4}  "
              f"{'PASS' if r['pass'] else 'FAIL':7}  {r['target']}")


def _print_abuse(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'scenario':24} {'withdraws':>9} {'health fail':>11} {'new ok %':>8} "
          f"{'log lines/s avg/peak per node':32} {'forged seen':>11}  verdict  failed checks")
    for r in rows:
        logs = r.get("node_logs", {})
        health = sum(s["health_failures"] + s["service_unhealthy"] for s in logs.values())
        volume = " ".join(f"{n}={s['lines_per_s']:.0f}/{s['peak_lines_per_s']}"
                          for n, s in logs.items())
        forged = r.get("forged_flows_seen")
        failed = ",".join(k for k, v in r["checks"].items() if not v) or "-"
        print(f"{_label(r):24} {r.get('withdraws', '-')!s:>9} {health:>11} "
              f"{r.get('new_success_pct', '-')!s:>8} {volume:32} "
              f"{'-' if forged is None else sum(forged.values())!s:>11}  "
              f"{'PASS' if r['pass'] else 'FAIL':7}  {failed}")


def _print_consensus(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'scenario':24} {'new failed':>11} {'figure':40} {'not available':28} "
          f"verdict  failed checks")
    for r in rows:
        figure = {
            "etcd-leader-kill": f"new etcd leader {r.get('etcd_new_leader_ms')} ms",
            "etcd-quorum-loss": f"isolated {r.get('isolated_after_ms')}",
            "etcd-partition": f"isolated {r.get('isolated_after_ms')}",
            "config-push": f"same digest {r.get('same_new_digest_after_commit_ms')} ms after commit",
            "health-disagreement": f"digest changes {r.get('digest_changed_views')}",
            "backend-kill-agreed": f"p50/p99 {r.get('agree_latency_p50_ms')}/"
                                   f"{r.get('agree_latency_p99_ms')} ms",
            "rolling-drain": f"most draining at once {r.get('most_draining_at_once')}",
        }.get(r["scenario"], "")
        failed = ",".join(k for k, v in r["checks"].items() if not v) or "-"
        print(f"{_label(r):24} {r['new_connections_failed']!s:>5}/{r['new_connections_total']!s:<5} "
              f"{figure[:40]:40} {','.join(r.get('not_available', [])) or '-':28} "
              f"{'PASS' if r['pass'] else 'FAIL':7}  {failed}")


def _print_l2(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'scenario':24} {'UDP lost':>12} {'resumed':>9} {'split brain':>11}  verdict")
    for r in rows:
        resumed = "never" if r.get("resumed_ms") is None else f"{r['resumed_ms']:.0f} ms"
        print(f"{r['scenario']:24} {r['udp_lost']!s:>5}/{r['udp_sent']!s:<6} {resumed:>9} "
              f"{r['split_brain_ms']:>8.0f} ms  {'PASS' if r['pass'] else 'FAIL'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("lab-results/benchmark"))
    parser.add_argument("--repeat", type=int, default=1, help="runs of the whole set (1-5)")
    parser.add_argument("--no-flow-survival", action="store_true",
                        help="skip the flow survival runs (a build without the cluster)")
    parser.add_argument("--no-consensus", action="store_true",
                        help="skip the consensus group (no etcd)")
    parser.add_argument("--group", choices=["all", "consensus"], default="all",
                        help="consensus: run only the consensus group")
    args = parser.parse_args()
    if args.group == "consensus" and args.no_consensus:
        parser.error("--group consensus with --no-consensus runs nothing")
    if not 1 <= args.repeat <= 5:
        parser.error("--repeat must be 1-5")
    only_flows = [arg for name in FLOW_SCENARIOS for arg in ("--scenario", name)]
    results: list[dict[str, Any]] = []
    only_consensus = [arg for name in CONSENSUS_SCENARIOS for arg in ("--scenario", name)]
    for i in range(args.repeat):
        base = args.out / f"run{i + 1}"
        if not args.no_consensus:
            results += run_relay(base.with_name(base.name + "-consensus"), "--consensus",
                                 *only_consensus)
            results += run_demo(base.with_name(base.name + "-l2"),
                                *[arg for name in L2_SCENARIOS for arg in ("--scenario", name)])
        if args.group == "consensus":
            continue
        plain = "--no-flow-survival"
        # The consensus scenarios ran above, in a lab of their own.
        results += run_relay(base, plain, "--no-consensus", "--full")
        if not args.no_flow_survival:
            results += run_relay(base.with_name(base.name + "-fs"), "--flow-survival",
                                 "--no-consensus", "--full")
        results += run_relay(base.with_name(base.name + "-bfd"), plain, "--bfd",
                             "--scenario", "node-silent")
        results += run_relay(base.with_name(base.name + "-flows-bfd"), plain, "--bfd",
                             *only_flows)
        if not args.no_flow_survival:
            results += run_relay(base.with_name(base.name + "-flows-bfd-fs"), "--bfd",
                                 "--flow-survival", *only_flows)
        abuse = [n for n in ABUSE_SCENARIOS
                 if not (args.no_flow_survival and n == "sync-forgery")]
        results += run_relay(base.with_name(base.name + "-abuse"),
                             "--no-flow-survival" if args.no_flow_survival else "--flow-survival",
                             *[arg for name in abuse for arg in ("--scenario", name)])
        results += run_demo(base.with_name(base.name + "-kernel"), "--engine", "kernel",
                            "--no-l2", "--full", "--bfd")
    _print_failover([r for r in results if "flows_total" not in r
                     and r["scenario"] not in ABUSE_SCENARIOS + CONSENSUS_SCENARIOS + L2_SCENARIOS])
    _print_flows([r for r in results if "flows_total" in r])
    _print_abuse([r for r in results if r["scenario"] in ABUSE_SCENARIOS])
    _print_consensus([r for r in results if r["scenario"] in CONSENSUS_SCENARIOS])
    _print_l2([r for r in results if r["scenario"] in L2_SCENARIOS])
    missed = sum(1 for r in results if not r["pass"])
    print(f"\n{len(results) - missed} of {len(results)} scenario runs met their targets")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
