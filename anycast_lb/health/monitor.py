"""The health monitor: one check loop per backend, feeding rise/fall machines.

Each loop checks its backend on a fixed schedule (next deadline = previous
deadline + interval, so check duration does not drift the schedule; a check
that overran skips to the next future slot), at ``fast_interval`` while its
:class:`~anycast_lb.health.hysteresis.Hysteresis` is settling and at
``interval`` otherwise. Loops start with a random splay of up to
``min(interval, max_jitter)`` seconds so a node restart does not probe
every backend at the same instant.

Backends of several services that share one health target (the same
address, probe port and health settings) share one loop and one rise/fall
machine: the target is probed once per interval, not once per service, and
every service sees the same verdict at the same instant (so a VIP carried by
several services is withdrawn at one probe's fall, not at the latest of
several unaligned ones).

After each check the backend's ``last_check`` (wall-clock s),
``last_latency_ms`` and ``last_detail`` are updated and ``on_check`` is
called; on a transition the pool is updated (``Pool.set_up``), the events
``health.transition`` and ``backend.up`` / ``backend.down`` are logged, and
``on_change`` is called. Callbacks run inside the loop: they must not block,
and an exception in one stops the monitor (it is a bug, not a health result).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random as _random
from collections.abc import Callable, Mapping, Sequence

import aiohttp

from anycast_lb import log
from anycast_lb.clock import Clock
from anycast_lb.config import HealthKind, ServiceConfig
from anycast_lb.health.hysteresis import Hysteresis, State
from anycast_lb.health.probes import Probe, ProbeFactory, ProbeResult, make_probe, make_session
from anycast_lb.pool import Backend, Pool

OnChange = Callable[[str, Backend, bool], None]
"""``(service_name, backend, up)``, called after the pool was updated."""
OnCheck = Callable[[str, Backend, ProbeResult], None]
"""``(service_name, backend, result)``, called after every check."""
_Member = tuple[ServiceConfig, Pool, Backend]


class HealthMonitor:
    """Checks every backend of ``services`` and keeps ``pools`` up to date."""

    def __init__(
        self,
        services: Sequence[ServiceConfig],
        pools: Mapping[str, Pool],
        clock: Clock,
        on_change: OnChange | None = None,
        on_check: OnCheck | None = None,
        random: _random.Random | None = None,
        *,
        probe_factory: ProbeFactory = make_probe,
        max_jitter: float = 1.0,
        update_pools: bool = True,
    ) -> None:
        """``pools`` is keyed by service name and must hold every service.

        ``random`` draws the start-up splay (default: a fresh unseeded
        generator); ``max_jitter`` caps it, in seconds (0 disables it).
        ``probe_factory`` builds each backend's probe (tests pass fakes).
        ``update_pools`` False: transitions are only reported (``on_change``),
        the pools are left alone and every machine starts down (with
        consensus the pools hold the agreed set, not this node's view).
        Raises KeyError if a service has no pool.
        """
        self._services = list(services)
        for service in self._services:
            if service.name not in pools:
                raise KeyError(f"no pool for service {service.name!r}")
        self._pools = pools
        self._clock = clock
        self._on_change = on_change
        self._on_check = on_check
        self._random = random if random is not None else _random.Random()
        self._probe_factory = probe_factory
        self._max_jitter = max(0.0, max_jitter)
        self._update_pools = update_pools

    async def run(self, started: asyncio.Event | None = None) -> None:
        """Check all backends until cancelled; set ``started`` once every loop runs.

        Raises whatever a callback or probe factory raises (in an
        ExceptionGroup, from the TaskGroup); probe failures are health
        results, not errors.
        """
        needs_http = any(s.health.kind is HealthKind.HTTP for s in self._services)
        async with contextlib.AsyncExitStack() as stack:
            session: aiohttp.ClientSession | None = None
            if needs_http:
                session = await stack.enter_async_context(make_session())
            targets: dict[tuple[str, str, int], list[_Member]] = {}
            for service in self._services:
                pool = self._pools[service.name]
                for backend in pool.backends:
                    port = service.health.port or backend.config.port
                    key = (service.health.model_dump_json(), str(backend.config.address), port)
                    targets.setdefault(key, []).append((service, pool, backend))
            async with asyncio.TaskGroup() as tasks:
                for members in targets.values():
                    service, _, backend = members[0]
                    probe = self._probe_factory(service.health, backend.config, session)
                    tasks.create_task(
                        self._loop(members, probe),
                        name=f"health {service.name} {backend.key}",
                    )
                if started is not None:
                    started.set()

    async def _loop(self, members: list[_Member], probe: Probe) -> None:
        service, _, backend = members[0]
        health = service.health
        up = self._update_pools and all(b.up for _, _, b in members)
        machine = Hysteresis(health.rise, health.fall, State.UP if up else State.DOWN)
        jitter = self._random.uniform(0.0, min(health.interval, self._max_jitter))
        deadline = self._clock.monotonic() + jitter
        while True:
            delay = deadline - self._clock.monotonic()
            if delay > 0:
                await self._clock.sleep(delay)
            result = await self._check(service, backend, probe)
            new_state = machine.observe(result.ok)
            for member_service, pool, member in members:
                self._record(member_service, pool, member, new_state, result)

            step = health.fast_interval if machine.settling else health.interval
            deadline += step
            now = self._clock.monotonic()
            if deadline <= now:
                missed = math.floor((now - deadline) / step) + 1
                log.debug(
                    "health.overrun", service=service.name, backend=backend.key, skipped=missed
                )
                deadline += missed * step

    async def _check(self, service: ServiceConfig, backend: Backend, probe: Probe) -> ProbeResult:
        start = self._clock.monotonic()
        try:
            return await probe.check()
        except Exception as exc:
            # A probe must not raise; if one does (a bug), count a failed
            # check rather than let one backend take down every loop.
            log.error(
                "health.probe_error",
                service=service.name,
                backend=backend.key,
                error=f"{type(exc).__name__}: {exc}",
            )
            return ProbeResult(
                False, self._clock.monotonic() - start, f"probe error: {type(exc).__name__}"
            )

    def _record(
        self,
        service: ServiceConfig,
        pool: Pool,
        backend: Backend,
        new_state: State | None,
        result: ProbeResult,
    ) -> None:
        backend.last_check = self._clock.wall()
        backend.last_latency_ms = result.latency_s * 1000.0
        backend.last_detail = result.detail
        if self._on_check is not None:
            self._on_check(service.name, backend, result)
        if new_state is None:
            return
        up = new_state is State.UP
        if self._update_pools:
            pool.set_up(backend.key, up)
        name, key, state, detail = service.name, backend.key, new_state.value, result.detail
        log.event("health.transition", service=name, backend=key, state=state, detail=detail)
        if up:
            log.event("backend.up", service=name, backend=key, detail=detail)
        else:
            log.warning("backend.down", service=name, backend=key, detail=detail)
        if self._on_change is not None:
            self._on_change(service.name, backend, up)
