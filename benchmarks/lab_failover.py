"""Failover targets of the namespace lab, checked from measured runs.

Runs ``anycast-lb lab demo`` (every scenario, three nodes) and
``anycast-lb lab demo --bfd --scenario node-silent`` (silent node death with
FRR bfdd beside ExaBGP), then prints one line per scenario with its figures,
its target and the verdict, and exits 1 if any target was missed. Needs
root, FRR and the package installed (``bash scripts/install.sh``)::

    sudo .venv/bin/python benchmarks/lab_failover.py [--out DIR] [--repeat N]

Each run writes result.json and timeline.png per scenario under DIR.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ANYCAST_LB = [sys.executable, "-m", "anycast_lb"]


def run_demo(out: Path, *extra: str) -> list[dict[str, object]]:
    subprocess.run([*ANYCAST_LB, "lab", "demo", "--out", str(out), *extra], check=True)
    results: list[dict[str, object]] = json.loads((out / "summary.json").read_text())
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("lab-results/benchmark"))
    parser.add_argument("--repeat", type=int, default=1, help="runs of the whole set (1-5)")
    args = parser.parse_args()
    if not 1 <= args.repeat <= 5:
        parser.error("--repeat must be 1-5")
    rows: list[tuple[str, dict[str, object]]] = []
    for i in range(args.repeat):
        for result in run_demo(args.out / f"run{i + 1}"):
            rows.append((str(result["scenario"]), result))
        for result in run_demo(args.out / f"run{i + 1}-bfd", "--bfd", "--scenario", "node-silent"):
            rows.append((f"{result['scenario']} --bfd", result))
    print(f"\n{'scenario':20} {'fib_converged_ms':>16} {'new failed':>11} {'estab. broken':>13}  "
          f"verdict  target")
    missed = 0
    for name, r in rows:
        fib = r.get("fib_converged_ms")
        print(f"{name:20} {('-' if fib is None else f'{fib:.1f}'):>16} "
              f"{r['new_connections_failed']!s:>5}/{r['new_connections_total']!s:<5} "
              f"{r['established_broken']!s:>6}/{r['established_total']!s:<6}  "
              f"{'PASS' if r['pass'] else 'FAIL':7}  {r['target']}")
        missed += not r["pass"]
    print(f"\n{len(rows) - missed} of {len(rows)} scenario runs met their targets")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
