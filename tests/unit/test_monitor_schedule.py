"""The health monitor's schedule and wiring, on a FakeClock with scripted probes.

Nothing here waits in real time: "fall after 3 misses at 200 ms" runs in
microseconds.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from ipaddress import ip_address
from typing import Any

import aiohttp
import pytest

from anycast_lb.clock import FakeClock
from anycast_lb.config import BackendConfig, HealthConfig, ServiceConfig
from anycast_lb.health import HealthMonitor, Probe, ProbeResult
from anycast_lb.pool import Backend, Pool

T0 = 1000.0  # FakeClock's default start


class ScriptedProbe:
    """A Probe that returns scripted results and records when it was called.

    ``results`` holds True/False per check (the last one repeats). If
    ``duration`` is set, each check takes that many seconds of fake time.
    """

    def __init__(
        self, clock: FakeClock, results: Iterable[bool], duration: float = 0.0
    ) -> None:
        self.clock = clock
        self.results = list(results)
        self.duration = duration
        self.calls: list[float] = []

    async def check(self) -> ProbeResult:
        self.calls.append(self.clock.monotonic() - T0)
        if self.duration:
            await self.clock.sleep(self.duration)
        ok = self.results[min(len(self.calls) - 1, len(self.results) - 1)]
        return ProbeResult(ok, 0.0042, "fake ok" if ok else "fake fail")


class RaisingProbe:
    def __init__(self) -> None:
        self.calls = 0

    async def check(self) -> ProbeResult:
        self.calls += 1
        raise RuntimeError("probe bug")


def _service(name: str = "web", backends: int = 1, port: int = 0, **health: Any) -> ServiceConfig:
    """A service whose backends are 203.0.113.130:8080, :8081... (or, with
    ``port``, 203.0.113.131:port, port+1...)."""
    settings: dict[str, Any] = {"rise": 2, "fall": 3, "interval": 2.0, "fast_interval": 0.2}
    settings.update(health)
    return ServiceConfig(
        name=name,
        vip=ip_address("198.51.100.10"),
        port=80,
        backends=[
            BackendConfig(
                address=ip_address("203.0.113.131" if port else "203.0.113.130"),
                port=(port or 8080) + i)
            for i in range(backends)
        ],
        health=HealthConfig(**settings),
    )


def _factory(probes: dict[str, Probe]) -> Callable[..., Probe]:
    def make(
        health: HealthConfig, backend: BackendConfig, session: aiohttp.ClientSession | None
    ) -> Probe:
        assert session is None  # no http service here: no session is opened
        return probes[backend.key]

    return make


async def _yield(times: int = 20) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


class Harness:
    def __init__(self, services: list[ServiceConfig], probes: dict[str, Probe], **kw: Any) -> None:
        self.clock = FakeClock()
        self.pools = {s.name: Pool(s) for s in services}
        self.changes: list[tuple[str, str, bool, float]] = []
        self.checks: list[tuple[str, str, ProbeResult]] = []
        kw.setdefault("max_jitter", 0.0)
        self.monitor = HealthMonitor(
            services,
            self.pools,
            self.clock,
            on_change=self._on_change,
            on_check=lambda s, b, r: self.checks.append((s, b.key, r)),
            probe_factory=_factory(probes),
            **kw,
        )

    def _on_change(self, service: str, backend: Backend, up: bool) -> None:
        # The pool must already reflect the change when on_change runs.
        assert self.pools[service].get(backend.key).up is up
        self.changes.append((service, backend.key, up, round(self.clock.monotonic() - T0, 6)))

    async def advance_to(self, t: float) -> None:
        """Advance fake time to just past T0 + t (past, so float rounding in
        accumulated deadlines cannot leave a check due at t unrun)."""
        await self.clock.advance(T0 + t + 1e-6 - self.clock.monotonic())


@asynccontextmanager
async def running(h: Harness) -> AsyncIterator[asyncio.Task[None]]:
    started = asyncio.Event()
    task = asyncio.create_task(h.monitor.run(started))
    async with asyncio.timeout(5):
        await started.wait()
    await _yield()
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def _approx(values: list[float]) -> Any:
    return pytest.approx(values, abs=1e-9)


async def test_rise_at_fast_interval_then_normal_interval() -> None:
    clock_probe: dict[str, Probe] = {}
    h = Harness([_service()], clock_probe)
    probe = ScriptedProbe(h.clock, [True])
    clock_probe["203.0.113.130:8080"] = probe
    async with running(h):
        pool = h.pools["web"]
        assert probe.calls == [0.0] and pool.up_count == 0
        await h.advance_to(0.2)
        assert pool.up_count == 1
        assert h.changes == [("web", "203.0.113.130:8080", True, 0.2)]
        await h.advance_to(6.3)
    assert probe.calls == _approx([0.0, 0.2, 2.2, 4.2, 6.2])


async def test_fall_after_three_misses_at_fast_interval() -> None:
    probes: dict[str, Probe] = {}
    h = Harness([_service()], probes)
    # up after 2 checks, one more ok, then failures for ever
    probe = ScriptedProbe(h.clock, [True, True, True, False])
    probes["203.0.113.130:8080"] = probe
    async with running(h):
        pool = h.pools["web"]
        await h.advance_to(2.2)
        assert pool.up_count == 1
        await h.advance_to(4.2)  # first miss: falling, still up
        assert pool.up_count == 1
        await h.advance_to(4.4)  # second miss
        assert pool.up_count == 1
        await h.advance_to(4.6)  # third miss at +200 ms: down
        assert pool.up_count == 0
        assert not pool.healthy
        await h.advance_to(9.0)
    # Misses at 4.2, 4.4, 4.6 (fast), then down is confirmed: back to 2 s.
    assert probe.calls == _approx([0.0, 0.2, 2.2, 4.2, 4.4, 4.6, 6.6, 8.6])
    key = "203.0.113.130:8080"
    assert h.changes == [
        ("web", key, True, 0.2),
        ("web", key, False, 4.6),
    ]
    backend = h.pools["web"].get(key)
    assert backend.last_detail == "fake fail"
    assert backend.last_latency_ms == pytest.approx(4.2)
    assert backend.last_check == pytest.approx(1_700_000_000.0 + T0 + 8.6)  # FakeClock.wall at the check


async def test_dead_backend_settles_to_normal_interval() -> None:
    probes: dict[str, Probe] = {}
    h = Harness([_service()], probes)
    probe = ScriptedProbe(h.clock, [False])
    probes["203.0.113.130:8080"] = probe
    async with running(h):
        await h.advance_to(5.0)
    # Unconfirmed start: fast until `fall` failures confirm down, then interval.
    assert probe.calls == _approx([0.0, 0.2, 0.4, 2.4, 4.4])
    assert h.changes == []


async def test_fixed_schedule_does_not_drift_with_check_duration() -> None:
    probes: dict[str, Probe] = {}
    h = Harness([_service(rise=1)], probes)
    probe = ScriptedProbe(h.clock, [True], duration=0.5)
    probes["203.0.113.130:8080"] = probe
    async with running(h):
        await h.advance_to(6.9)
    # "sleep after check" would give 0, 2.5, 5.0.
    assert probe.calls == _approx([0.0, 2.0, 4.0, 6.0])


async def test_overrun_skips_to_next_future_slot() -> None:
    probes: dict[str, Probe] = {}
    h = Harness([_service(rise=1)], probes)
    probe = ScriptedProbe(h.clock, [True], duration=2.5)
    probes["203.0.113.130:8080"] = probe
    async with running(h):
        await h.advance_to(8.9)
    # Each check ends at slot + 2.5, past the next slot: that slot is skipped.
    assert probe.calls == _approx([0.0, 4.0, 8.0])


async def test_settling_while_rising_uses_fast_interval_after_flap() -> None:
    probes: dict[str, Probe] = {}
    h = Harness([_service()], probes)
    # down confirmed (3 fails), then one ok (rising: fast), fail, then ok ok.
    probe = ScriptedProbe(h.clock, [False, False, False, True, False, True, True, True])
    probes["203.0.113.130:8080"] = probe
    async with running(h):
        await h.advance_to(7.0)
    assert probe.calls == _approx([0.0, 0.2, 0.4, 2.4, 2.6, 4.6, 4.8, 6.8])
    assert [(up, t) for _, _, up, t in h.changes] == [(True, 4.8)]


async def test_on_check_gets_every_result_and_services_are_independent() -> None:
    probes: dict[str, Probe] = {}
    web = _service("web", backends=2)
    dns = _service("dns", backends=1, port=9000, rise=1, fall=1, interval=1.0, fast_interval=0.1)
    h = Harness([web, dns], probes)
    a = ScriptedProbe(h.clock, [True])
    b = ScriptedProbe(h.clock, [False])
    c = ScriptedProbe(h.clock, [True, False])
    probes.update({"203.0.113.130:8080": a, "203.0.113.130:8081": b, "203.0.113.131:9000": c})
    async with running(h):
        await h.advance_to(1.05)
    assert h.pools["web"].up_count == 1
    assert h.pools["web"].get("203.0.113.130:8080").up
    assert not h.pools["web"].get("203.0.113.130:8081").up
    assert h.pools["dns"].up_count == 0
    # dns: rise 1 -> up at once and settled (1 s interval); fall 1 -> down at 1.0.
    assert c.calls == _approx([0.0, 1.0])
    assert sorted(h.changes, key=lambda c: c[3]) == [
        ("dns", "203.0.113.131:9000", True, 0.0),
        ("web", "203.0.113.130:8080", True, 0.2),
        ("dns", "203.0.113.131:9000", False, 1.0),
    ]
    assert {(s, k) for s, k, _ in h.checks} == {
        ("web", "203.0.113.130:8080"),
        ("web", "203.0.113.130:8081"),
        ("dns", "203.0.113.131:9000"),
    }
    assert len(h.checks) == len(a.calls) + len(b.calls) + len(c.calls)
    assert [r.ok for s, _, r in h.checks if s == "dns"] == [True, False]


async def test_start_up_jitter_comes_from_injected_random() -> None:
    probes: dict[str, Probe] = {}
    h = Harness([_service(backends=3)], probes, random=random.Random(7), max_jitter=1.0)
    for i in range(3):
        probes[f"203.0.113.130:{8080 + i}"] = ScriptedProbe(h.clock, [False])
    expected_rng = random.Random(7)
    expected = [expected_rng.uniform(0.0, 1.0) for _ in range(3)]
    async with running(h):
        await h.advance_to(1.0)
    firsts = [p.calls[0] for p in probes.values()]  # type: ignore[attr-defined]
    assert firsts == _approx(expected)
    assert len(set(firsts)) == 3 and all(0.0 <= f < 1.0 for f in firsts)


async def test_jitter_is_capped_by_interval() -> None:
    probes: dict[str, Probe] = {}

    class High(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b  # the top of the range the monitor asks for

    h = Harness([_service(interval=0.5, fast_interval=0.1, timeout=0.5)], probes,
                random=High(), max_jitter=1.0)
    probe = ScriptedProbe(h.clock, [False])
    probes["203.0.113.130:8080"] = probe
    async with running(h):
        await h.advance_to(0.6)
    assert probe.calls == _approx([0.5, 0.6])


async def test_raising_probe_counts_as_failure_and_monitor_keeps_running() -> None:
    probes: dict[str, Probe] = {}
    h = Harness([_service(backends=2)], probes)
    bad = RaisingProbe()
    good = ScriptedProbe(h.clock, [True])
    probes.update({"203.0.113.130:8080": bad, "203.0.113.130:8081": good})
    async with running(h) as task:
        await h.advance_to(2.5)
        assert not task.done()
    assert bad.calls == 4  # 0, 0.2, 0.4 (fast, unconfirmed), 2.4
    assert h.pools["web"].get("203.0.113.130:8080").last_detail == "probe error: RuntimeError"
    assert h.pools["web"].get("203.0.113.130:8081").up


async def test_started_is_set_and_run_is_cancellable() -> None:
    probes: dict[str, Probe] = {}
    h = Harness([_service()], probes)
    probe = ScriptedProbe(h.clock, [True])
    probes["203.0.113.130:8080"] = probe
    started = asyncio.Event()
    task = asyncio.create_task(h.monitor.run(started))
    async with asyncio.timeout(5):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


def test_missing_pool_is_an_error() -> None:
    with pytest.raises(KeyError, match="no pool for service 'web'"):
        HealthMonitor([_service()], {}, FakeClock())


async def test_services_sharing_a_health_target_share_one_probe() -> None:
    probes: dict[str, Probe] = {}
    made: list[str] = []
    web, echo = _service("web"), _service("echo")  # same backend, same health settings
    other = _service("other", fall=2)  # same backend, other settings: its own probe
    h = Harness([web, echo, other], probes)
    probe = ScriptedProbe(h.clock, [True, True, False])
    own = ScriptedProbe(h.clock, [True, True, False])
    key = "203.0.113.130:8080"

    def factory(health: HealthConfig, backend: BackendConfig, session: Any) -> Probe:
        made.append(backend.key)
        return own if health.fall == 2 else probe

    h.monitor._probe_factory = factory
    async with running(h):
        await h.advance_to(0.2)
        assert h.pools["web"].up_count == h.pools["echo"].up_count == 1
        await h.advance_to(2.6)  # misses at 2.2 and 2.4 (and 2.6 for fall 3)
    assert made == [key, key]  # one probe for web+echo, one for other
    assert probe.calls == _approx([0.0, 0.2, 2.2, 2.4, 2.6])
    downs = [(s, t) for s, _, up, t in h.changes if not up]
    # Both services sharing the target fall at the same check.
    assert downs == [("other", 2.4), ("web", 2.6), ("echo", 2.6)]
