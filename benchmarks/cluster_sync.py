"""Sync lag of flow survival at a given new-flow rate (needs root; bounded).

Two scratch namespaces joined by a veth pair (203.0.113.1/24 and .2/24,
nothing else, deleted at the end). Each runs a real Cluster with the kernel
data path (nft table, rules, routes). The origin's flow hook is called from
a separate thread (as the relay does) ``--rate`` times a second for
``--seconds`` seconds; each flow closes ``--life`` seconds later. The
receiver measures, per flow, the time from the origin's accept (the hook
call) until its own ``nft -f`` transaction holding the flow returned: the
window in which a moved packet of that flow would only get the second chance.

Run: ``.venv/bin/python benchmarks/cluster_sync.py [--rate 1000] [--seconds 10]``.
Prints one JSON line; exits 1 if p99 exceeds ``--target-ms`` (100).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NS = ("albt-cluster-s1", "albt-cluster-s2")
HERE = Path(__file__).resolve()
VIP = "198.51.100.10"


def sh(*argv: str, ns: str | None = None, check: bool = True) -> None:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    out = subprocess.run(full, capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {out.stderr.strip()}")


def setup() -> None:
    teardown()
    for ns in NS:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    sh("ip", "link", "add", "lan0", "netns", NS[0], "type", "veth", "peer", "name", "lan0",
       "netns", NS[1])
    for i, ns in enumerate(NS, 1):
        sh("ip", "addr", "add", f"203.0.113.{i}/24", "dev", "lan0", ns=ns)
        sh("ip", "link", "set", "lan0", "up", ns=ns)


def teardown() -> None:
    for ns in NS:
        sh("ip", "netns", "del", ns, check=False)


def bench_key_file() -> Any:
    """A sync key file (mode 0600) in a fresh temp dir: every node process
    writes the same fixed key (scratch namespaces only)."""
    import tempfile
    from pathlib import Path

    from anycast_lb.cluster.keys import write_key_file

    path = Path(tempfile.mkdtemp(prefix="albt-key-")) / "cluster.key"
    write_key_file(path, [BENCH_KEY])
    return path


BENCH_KEY = "YW55Y2FzdC1sYiBiZW5jaG1hcmsgc3luYyBrZXkgMDE="
"""base64 of a fixed 32-byte key, shared by the benchmark's node processes."""


def make_cluster(index: int) -> Any:
    from anycast_lb.cluster import Cluster
    from anycast_lb.config import ClusterConfig, ServiceConfig

    config = ClusterConfig.model_validate({
        "address": f"203.0.113.{index}", "interface": "lan0",
        "peers": ["203.0.113.1", "203.0.113.2"], "key_file": str(bench_key_file()), "nft_table": "albt_bench",
        # Every flow published at once: the lag measured is the sync's own
        # (from accept to the peer's map), as before publish_min_age existed.
        "publish_min_age": 0.0})
    service = ServiceConfig.model_validate({"name": "web", "vip": VIP, "port": 80,
                                            "backends": [{"address": "127.0.0.1", "port": 9}]})
    return Cluster(config, [service], name=f"s{index}")


async def until(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("peer not up")
        await asyncio.sleep(0.02)


async def origin(rate: int, seconds: float, life: float) -> None:
    cluster = make_cluster(1)
    task = asyncio.create_task(cluster.run())
    await until(lambda: cluster.membership.steerable() == (0,), 10)

    def generate() -> None:
        # Bounded: rate * seconds flows, paced every 10 ms.
        total = int(rate * seconds)
        closing: collections.deque[tuple[float, tuple[str, int, str, int]]] = collections.deque()
        start = time.monotonic()
        for n in range(total):
            due = start + n / rate
            while closing and closing[0][0] <= time.monotonic():
                cluster.on_flow(False, closing.popleft()[1])
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            key = (f"198.51.{100 + n // 60000}.{(n // 250) % 250 + 1}", 1024 + n % 60000, VIP, 80)
            cluster.on_flow(True, key)
            closing.append((time.monotonic() + life, key))
        while closing:
            time.sleep(max(0.0, closing[0][0] - time.monotonic()))
            cluster.on_flow(False, closing.popleft()[1])

    await asyncio.to_thread(generate)
    await asyncio.sleep(0.5)
    cluster.stop()
    await task


async def receiver(timeout: float) -> dict[str, Any]:
    cluster = make_cluster(2)
    cluster.lag_samples = collections.deque()  # keep every sample, not the last 4096
    arrival: list[float] = []  # origin accept -> datagram here, s
    handle = cluster._on_message

    def on_message(index: int, message: Any) -> None:
        if hasattr(message, "added"):
            now_ms = time.time() * 1000
            arrival.extend((now_ms - since) / 1000 for since in message.added.values())
        handle(index, message)

    cluster._on_message = on_message
    cluster.endpoint._on_message = on_message
    task = asyncio.create_task(cluster.run())
    await until(lambda: cluster.membership.steerable() == (0,), 10)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    tx0 = cluster.datapath.transactions
    started = time.monotonic()
    peak = 0
    # The origin leaves when done (a "leaving" heartbeat): then stop.
    while cluster.membership.peers[0].alive and time.monotonic() - started < timeout:
        peak = max(peak, len(cluster.steering.shadow))
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    samples = sorted(cluster.lag_samples)
    cluster.stop()
    await task

    def pct(p: float) -> float:
        return round(samples[min(len(samples) - 1, int(p * len(samples)))] * 1000, 1)

    return {
        "flows_measured": len(samples),
        "lag_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                   "max": round(samples[-1] * 1000, 1)},
        "nft_transactions": cluster.datapath.transactions - tx0,
        "peak_map_size": peak,
        "seconds": round(elapsed, 1),
        "receiver_cpu_s": round(cpu.ru_utime + cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2),
        "nft_cpu_s": round(kids.ru_utime + kids.ru_stime - kids0.ru_utime - kids0.ru_stime, 2),
        "sync_gaps": cluster.gaps,
        "arrival_ms": {"p50": round(sorted(arrival)[len(arrival) // 2] * 1000, 1),
                       "p99": round(sorted(arrival)[int(0.99 * len(arrival))] * 1000, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="new flows per second (<= 5000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="<= 60")
    parser.add_argument("--life", type=float, default=2.0, help="seconds each flow stays open")
    parser.add_argument("--target-ms", type=float, default=100.0)
    parser.add_argument("role", nargs="?", default="main", choices=["main", "origin", "receiver"])
    args = parser.parse_args()
    args.rate, args.seconds = min(args.rate, 5000), min(args.seconds, 60.0)
    if args.role == "origin":
        asyncio.run(origin(args.rate, args.seconds, args.life))
        return
    if args.role == "receiver":
        print(json.dumps(asyncio.run(receiver(args.seconds + args.life + 10))))
        return
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, nftables)")
    setup()
    try:
        common = ["--rate", str(args.rate), "--seconds", str(args.seconds),
                  "--life", str(args.life)]
        recv = subprocess.Popen(["ip", "netns", "exec", NS[1], sys.executable, str(HERE),
                                 *common, "receiver"], stdout=subprocess.PIPE, text=True)
        orig = subprocess.run(["ip", "netns", "exec", NS[0], sys.executable, str(HERE),
                               *common, "origin"], timeout=args.seconds + 60, check=True)
        del orig
        out, _ = recv.communicate(timeout=30)
        result = json.loads(out)
        result.update(rate=args.rate, life_s=args.life)
        print(json.dumps(result))
        if result["lag_ms"]["p99"] > args.target_ms:
            sys.exit(1)
    finally:
        teardown()


if __name__ == "__main__":
    main()
