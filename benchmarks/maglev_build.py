"""Maglev table build time, and what a background rebuild costs the event loop.

Part 1 times ``maglev.build_table`` (pure Python, no pause hook) for 1, 2, 5,
100 and 1000 backends at 65537 slots: median, min and max of ``--runs``
builds, in ms of wall time, and the median CPU time (less sensitive to other
load on the machine). The paper's C++ builds 1000 backends in 1.8 ms
(Eisenbud et al., NSDI 2016, section 5.3).

Part 2 runs an asyncio loop with a ticker every 1 ms and measures how late
each tick is (the stall), first idle, then while a 1000-backend table is
rebuilt after a backend goes down, three ways:

- ``inline``: the build runs on the loop (what a build at the next flow did);
- ``thread``: ``Pool``'s background thread, without yielding the GIL;
- ``pool``: ``Pool`` as shipped (background thread, GIL yielded every 0.5 ms).

Each way runs ``--runs`` rebuilds (a different backend goes down each time,
so no cached table is reused); the worst stall over them is reported, with
the 99th percentile of ticks and the rebuild's wall time. Figures depend on
what else the machine runs: compare the rows of one run. ::

    .venv/bin/python benchmarks/maglev_build.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from typing import Any

from anycast_lb import maglev, pool
from anycast_lb.config import ServiceConfig

SIZE = maglev.DEFAULT_TABLE_SIZE
COUNTS = (1, 2, 5, 100, 1000)
TICK_S = 0.001


def names(count: int) -> list[str]:
    return [f"203.0.{i // 250}.{i % 250 + 1}:8080" for i in range(count)]


def build_times(runs: int) -> None:
    print(f"build_table at {SIZE} slots, {runs} runs each (ms; wall time, and CPU time of the thread)")
    print(f"{'backends':>8} {'median':>8} {'min':>8} {'max':>8} {'cpu median':>11}")
    for count in COUNTS:
        backends = names(count)
        times = []
        cpu = []
        for _ in range(runs):
            started, started_cpu = time.perf_counter(), time.thread_time()
            maglev.build_table(backends, size=SIZE)
            times.append((time.perf_counter() - started) * 1000)
            cpu.append((time.thread_time() - started_cpu) * 1000)
        print(f"{count:>8} {statistics.median(times):>8.1f} {min(times):>8.1f} {max(times):>8.1f}"
              f" {statistics.median(cpu):>11.1f}")


def service(count: int) -> ServiceConfig:
    backends: list[dict[str, Any]] = [
        {"address": n.rsplit(":", 1)[0], "port": int(n.rsplit(":", 1)[1])} for n in names(count)
    ]
    return ServiceConfig.model_validate(
        {"name": "bench", "vip": "198.51.100.10", "port": 80, "backends": backends, "maglev_table_size": SIZE}
    )


class _NoYield(pool._GilYield):
    HOLD_S = float("inf")


def run_inline(job: pool.BuildJob) -> None:
    job()


async def rebuild_stalls(p: pool.Pool, key: str) -> tuple[list[float], float]:
    """Take ``key`` down (on the loop, as the health monitor does) while a
    1 ms ticker runs; returns the stalls (ms) of the ticks that overlap the
    rebuild and the rebuild's wall time (ms), from ``set_up`` to the table
    being in place."""
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            await asyncio.sleep(TICK_S)
            samples.append((began, time.perf_counter()))

    task = asyncio.create_task(ticker())
    while len(samples) < 5:  # the ticker is running before the transition
        await asyncio.sleep(TICK_S)
    started = time.perf_counter()
    p.set_up(key, False)
    if not await asyncio.to_thread(p.wait_table, 30.0):
        raise RuntimeError("table not rebuilt in 30 s")
    ready = time.perf_counter()
    stop.set()
    await task
    stalls = [(end - began - TICK_S) * 1000 for began, end in samples if end > started and began < ready]
    return stalls, (ready - started) * 1000


async def stall_during_rebuild(way: str, runs: int) -> tuple[list[float], list[float]]:
    """Tick stalls (ms) and rebuild wall times (ms) over ``runs`` rebuilds."""
    original = pool._GilYield
    if way in ("inline", "thread"):
        pool._GilYield = _NoYield  # type: ignore[misc]
    try:
        held: list[pool.BuildJob] = []
        p = pool.Pool(service(1000), run_build=held.append)
        for backend in p.backends:  # one build for the whole start-up
            p.set_up(backend.key, True)
        for job in held:
            job()
        if not p.table_ready:
            raise RuntimeError("initial table not built")
        p.run_build = run_inline if way == "inline" else pool.run_in_thread
        stalls: list[float] = []
        walls: list[float] = []
        for backend in p.backends[:runs]:
            pool._TABLES.clear()
            ticks, wall = await rebuild_stalls(p, backend.key)
            stalls += ticks
            walls.append(wall)
            p.set_up(backend.key, True)
            if not p.wait_table(30):
                raise RuntimeError("table not rebuilt in 30 s")
        return stalls, walls
    finally:
        pool._GilYield = original  # type: ignore[misc]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def stalls(runs: int) -> None:
    print(f"\nevent-loop stall, 1 ms ticker, rebuild of 1000 backends at {SIZE} slots, {runs} rebuilds each")
    print(f"{'way':>8} {'worst ms':>9} {'p99 ms':>7} {'ticks':>6} {'rebuild ms (median)':>20}")
    idle = []
    for _ in range(300):
        began = time.perf_counter()
        await asyncio.sleep(TICK_S)
        idle.append((time.perf_counter() - began - TICK_S) * 1000)
    print(f"{'idle':>8} {max(idle):>9.2f} {pct(idle, 0.99):>7.2f} {len(idle):>6} {'-':>20}")
    for way in ("inline", "thread", "pool"):
        ticks, walls = await stall_during_rebuild(way, runs)
        worst = max(ticks)
        print(f"{way:>8} {worst:>9.2f} {pct(ticks, 0.99):>7.2f} {len(ticks):>6} {statistics.median(walls):>20.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="builds per figure (1-50)")
    args = parser.parse_args()
    if not 1 <= args.runs <= 50:
        parser.error("--runs must be 1-50")
    print(f"python {sys.version.split()[0]}, switch interval {sys.getswitchinterval() * 1000:.0f} ms, "
          f"{threading.active_count()} thread(s)")
    build_times(args.runs)
    asyncio.run(stalls(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
