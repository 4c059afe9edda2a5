"""The kernel engine's writer task on a fake clock and a fake nft: pokes
become diffs, drains promote after ``promote_after`` s, a refused
transaction is retried, and a service is served once its table names a
backend. No kernel: the runner records the scripts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection, Sequence

from anycast_lb.clock import FakeClock
from anycast_lb.config import NodeConfig, ServiceConfig, parse_config
from anycast_lb.errors import ClusterError
from anycast_lb.kernel.engine import KernelEngine
from tests.waiting import wait_until

CFG = parse_config({
    "drain": {"timeout": 10},
    "forwarding": {"engine": "kernel", "kernel": {"interface": "lan0"}},
    "services": [{"name": "web", "vip": "192.0.2.10", "port": 80, "maglev_table_size": 251,
                  "backends": [{"address": f"198.51.100.{i}", "port": 80} for i in (1, 2, 3)]}],
})
K1, K2, K3 = (f"198.51.100.{i}:80" for i in (1, 2, 3))


class FakeNft:
    """What ``nft`` and ``ip`` would answer; records each ``nft -f`` script."""

    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.refuse = 0
        """Refuse this many ``nft -f`` scripts (after the first load)."""

    async def __call__(self, argv: Sequence[str], stdin: str | None = None) -> str:
        if argv[0] == "ip":
            return json.dumps([{"dev": "lan0"}])
        if "list" in argv:
            return json.dumps({"nftables": [{"counter": {
                "name": "s0_bc6336401", "packets": 7, "bytes": 420}}]})
        if "--check" in argv:
            return ""
        if self.refuse and self.scripts:
            self.refuse -= 1
            raise ClusterError("nft -f - failed (exit 1): Error: Could not process rule")
        self.scripts.append(stdin or "")
        return ""


class Pool:
    def __init__(self, cfg: NodeConfig) -> None:
        self.service: ServiceConfig = cfg.services[0]
        self.up: set[str] = set()
        self.drained: set[str] = set()

    def __call__(self, name: str) -> tuple[ServiceConfig, Collection[str], Collection[str]]:
        assert name == "web"
        return self.service, set(self.up), set(self.drained)


async def _started(nft: FakeNft, clock: FakeClock, pool: Pool,
                   applied: list[str]) -> tuple[KernelEngine, asyncio.Task[None]]:
    engine = KernelEngine(CFG, runner=nft, clock=clock)
    await engine.start()
    started = asyncio.Event()
    task = asyncio.create_task(engine.run(pool, started, applied.append))
    await started.wait()
    assert applied == ["web"]  # the first turn reconciles every service once
    applied.clear()
    return engine, task


async def test_pokes_become_diffs_and_a_drain_promotes_on_time() -> None:
    nft, clock, pool, applied = FakeNft(), FakeClock(), Pool(CFG), []
    engine, task = await _started(nft, clock, pool, applied)
    try:
        assert engine.installed and not engine.serving("web") and len(nft.scripts) == 1
        pool.up = {K1, K2, K3}
        engine.poke("web")
        await wait_until(lambda: engine.serving("web"), interval=0, what="the first diff")
        assert len(nft.scripts) == 2 and "add element netdev anycast_lb_fwd s0_cur" in nft.scripts[1]
        assert "delete table" not in nft.scripts[1]  # a diff, never a reload
        assert applied == ["web"] and not engine.pending("web")
        # A drain changes only the current table.
        pool.drained = {K3}
        engine.poke("web")
        await wait_until(lambda: engine.snapshot()["web"]["draining"] == [K3], interval=0,
                         what="the drain")
        assert " s0_cur " in nft.scripts[2] and " s0_prev " not in nft.scripts[2]
        await clock.advance(9.0)
        assert engine.snapshot()["web"]["draining"] == [K3]
        await clock.advance(1.5)  # drain.timeout (10 s) after the drain: the promotion
        await wait_until(lambda: engine.snapshot()["web"]["drained"] == [K3], interval=0,
                         what="the promotion")
        assert " s0_prev " in nft.scripts[3] and " s0_cur " not in nft.scripts[3]
        status = engine.snapshot()["web"]
        assert status["generation"] == 3 and status["seed"].startswith("0x")
        assert status["backends"] == {"198.51.100.1": {"packets": 7, "bytes": 420}}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_refused_transaction_is_retried_and_unknown_pokes_ignored() -> None:
    nft, clock, pool, applied = FakeNft(), FakeClock(), Pool(CFG), []
    engine, task = await _started(nft, clock, pool, applied)
    try:
        assert _transactions(engine) == (1, 0)  # the load
        nft.refuse = 1
        pool.up = {K1}
        engine.poke("web")
        engine.poke("nosuch")
        await wait_until(lambda: clock.sleepers > 0 and not nft.refuse, interval=0,
                         what="the refused transaction")
        assert not engine.serving("web") and engine.pending("web") and applied == []
        assert _transactions(engine) == (1, 1)
        await clock.advance(1.0)  # RETRY_S
        await wait_until(lambda: engine.serving("web"), interval=0, what="the retry")
        assert applied == ["web"] and len(nft.scripts) == 2
        assert _transactions(engine) == (2, 1)
        await engine.stop()
        assert not engine.installed and not engine.serving("web")
        assert "delete table netdev anycast_lb_fwd" in nft.scripts[-1]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _transactions(engine: KernelEngine) -> tuple[float, float]:
    """(applied, refused) as ``/metrics`` shows them."""
    found = {s.name: s.value for m in engine.metric_families() for s in m.samples}
    return (found["anycast_lb_kernel_transactions_total"],
            found["anycast_lb_kernel_transaction_failures_total"])
