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

``update`` changes the services checked while the monitor runs (live
apply): loops of targets gone stop, new targets start, and a backend that
joins a running target takes its state.

After each check the backend's ``last_check`` (wall-clock s),
``last_latency_ms`` and ``last_detail`` are updated and ``on_check`` is
called; on a transition the pool is updated (``Pool.set_up``), the events
``health.transition`` and ``backend.up`` / ``backend.down`` are logged, and
``on_change`` is called. Callbacks run inside the loop: they must not block,
and an exception in one stops the monitor (it is a bug, not a health result).
"""

from __future__ import annotations

import asyncio
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
_TargetKey = tuple[str, str, int]
"""(health settings as JSON, address, probe port): one check loop each."""


class _Target:
    """One health target: its members (service, pool, backend) and rise/fall machine."""

    __slots__ = ("members", "machine", "task")

    def __init__(self, members: list[_Member], machine: Hysteresis) -> None:
        self.members = members
        self.machine = machine
        self.task: asyncio.Task[None] | None = None


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
        self._local: dict[tuple[str, str], bool] = {}
        """(service, backend key) -> up as this node's checks last decided;
        what ``_seen_up`` answers when the pools are not ours to update."""
        self._targets: dict[_TargetKey, _Target] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._session: aiohttp.ClientSession | None = None

    async def run(self, started: asyncio.Event | None = None) -> None:
        """Check all backends until cancelled; set ``started`` once every loop runs.

        Raises whatever a callback or probe factory raises (in an
        ExceptionGroup, from the TaskGroup); probe failures are health
        results, not errors.
        """
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                self._sync()
                if started is not None:
                    started.set()
                await asyncio.Event().wait()  # until cancelled
        finally:
            self._tasks = None
            session, self._session = self._session, None
            if session is not None:
                await session.close()

    def update(self, services: Sequence[ServiceConfig], pools: Mapping[str, Pool]) -> None:
        """Check ``services`` from now on (live apply). Synchronous: call it
        in the same step that changed the pools, so no loop probes a backend
        its pool no longer holds.

        Targets no longer wanted stop; new targets (a new backend, or new
        health settings, which key the target) start, their machine starting
        from the members' current states, so a settings change keeps every
        backend's state until the new checks decide otherwise; a backend that
        joins a running target takes that target's state at once. Raises
        KeyError if a service has no pool.
        """
        for service in services:
            if service.name not in pools:
                raise KeyError(f"no pool for service {service.name!r}")
        self._services = list(services)
        self._pools = pools
        if self._tasks is not None:
            self._sync()

    def _wanted(self) -> dict[_TargetKey, list[_Member]]:
        targets: dict[_TargetKey, list[_Member]] = {}
        for service in self._services:
            pool = self._pools[service.name]
            for backend in pool.backends:
                port = service.health.port or backend.config.port
                key = (service.health.model_dump_json(), str(backend.config.address), port)
                targets.setdefault(key, []).append((service, pool, backend))
        return targets

    def _sync(self) -> None:
        """Start, stop and re-member the check loops to match ``_services``."""
        assert self._tasks is not None
        wanted = self._wanted()
        for key in list(self._targets):
            if key not in wanted:
                target = self._targets.pop(key)
                if target.task is not None:
                    target.task.cancel()
        for key, members in wanted.items():
            running = self._targets.get(key)
            if running is None:
                service, _, backend = members[0]
                up = all(self._seen_up(svc, b) for svc, _, b in members)
                target = _Target(members, Hysteresis(service.health.rise, service.health.fall,
                                                     State.UP if up else State.DOWN))
                if service.health.kind is HealthKind.HTTP and self._session is None:
                    # One session for every HTTP probe, opened when the first
                    # one starts (at start or by a live update).
                    self._session = make_session()
                probe = self._probe_factory(service.health, backend.config, self._session)
                target.task = self._tasks.create_task(
                    self._loop(target, probe), name=f"health {service.name} {backend.key}")
                self._targets[key] = target
                continue
            joined = [m for m in members if not any(m[2] is b for _, _, b in running.members)]
            running.members = members
            for service, pool, backend in joined:
                if self._seen_up(service, backend) != running.machine.up:
                    self._transition(service, pool, backend, running.machine.state,
                                     "joined a running check of the same target")

    async def _loop(self, target: _Target, probe: Probe) -> None:
        service, _, backend = target.members[0]
        health = service.health
        machine = target.machine
        jitter = self._random.uniform(0.0, min(health.interval, self._max_jitter))
        deadline = self._clock.monotonic() + jitter
        while True:
            delay = deadline - self._clock.monotonic()
            if delay > 0:
                await self._clock.sleep(delay)
            result = await self._check(service, backend, probe)
            new_state = machine.observe(result.ok)
            for member_service, pool, member in target.members:
                self._record(member_service, pool, member, new_state, result)
            if new_state is None and not machine.settling:
                # Members that started a live-applied target in another state
                # take its confirmed verdict.
                for member_service, pool, member in target.members:
                    if self._seen_up(member_service, member) != machine.up:
                        self._transition(member_service, pool, member, machine.state,
                                         result.detail)

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
        self._transition(service, pool, backend, new_state, result.detail)

    def _seen_up(self, service: ServiceConfig, backend: Backend) -> bool:
        """Whether this node's checks last saw ``backend`` up: the pool's
        flag when the monitor updates the pools; otherwise (consensus: the
        pools hold the agreed set) its own record, down until a check says up."""
        if self._update_pools:
            return backend.up
        return self._local.get((service.name, backend.key), False)

    def _transition(self, service: ServiceConfig, pool: Pool, backend: Backend,
                    new_state: State, detail: str) -> None:
        up = new_state is State.UP
        self._local[service.name, backend.key] = up
        if self._update_pools:
            pool.set_up(backend.key, up)
        name, key, state = service.name, backend.key, new_state.value
        log.event("health.transition", service=name, backend=key, state=state, detail=detail)
        if up:
            log.event("backend.up", service=name, backend=key, detail=detail)
        else:
            log.warning("backend.down", service=name, backend=key, detail=detail)
        if self._on_change is not None:
            self._on_change(service.name, backend, up)
