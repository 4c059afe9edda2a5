"""What follows a backend or pool change, over small complete parts."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from anycast_lb import log
from anycast_lb.config import parse_config
from anycast_lb.health.probes import ProbeResult
from anycast_lb.pool import Backend, Pool
from anycast_lb.poolevents import PoolEvents


class Parts:
    """Data plane, relay workers and consensus votes, recording into ``calls``."""

    def __init__(self, kernel: bool = False, workers: bool = False) -> None:
        self.calls: list[str] = []
        self.kernel = object() if kernel else None
        self.workers = self if workers else None
        self.listening_on: set[str] = set()

    def listening(self, service: str) -> bool:
        return service in self.listening_on

    def pool_changed(self, service: str) -> None:
        self.calls.append(f"tables {service}")

    def backend_changed(self, service: str, key: str, up: bool) -> None:
        self.calls.append(f"worker {service} {key} {up}")

    def local_changed(self, service: str, backend: Backend, up: bool) -> None:
        self.calls.append(f"vote {service} {backend.key} {up}")


def setup(parts: Parts) -> tuple[PoolEvents, Pool]:
    config = parse_config({"services": [{
        "name": "web", "vip": "198.51.100.10", "port": 80, "min_healthy": 1,
        "backends": [{"address": "10.0.0.1", "port": 80}, {"address": "10.0.0.2", "port": 80}]}]})
    pool = Pool(config.services[0])
    events = PoolEvents({"web": pool}, parts, routes_changed=lambda: parts.calls.append("routes"),
                        observe=lambda s, b, t: parts.calls.append(f"observe {s} {b} {t:g}"),
                        consensus=parts)
    return events, pool


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    log.setup("info")
    logger = logging.getLogger("anycast_lb")
    logger.propagate = True  # let caplog see the records
    try:
        with caplog.at_level(logging.INFO, logger="anycast_lb"):
            yield caplog
    finally:
        logger.propagate = False


def test_a_service_health_transition_is_logged_once(logs: pytest.LogCaptureFixture) -> None:
    parts = Parts(workers=True)
    events, pool = setup(parts)
    a, b = pool.backends
    for backend in (a, b):  # the second one changes nothing about the service
        pool.set_up(backend.key, True)
        events.backend_changed("web", backend, True)
    for backend in (a, b):
        pool.set_up(backend.key, False)
        events.backend_changed("web", backend, False)
    logged = [(r.getMessage(), r.kv["up_backends"]) for r in logs.records  # type: ignore[attr-defined]
              if r.getMessage().startswith("service.")]
    assert logged == [("service.healthy", 1), ("service.unhealthy", 0)]
    assert parts.calls[:3] == [f"worker web {a.key} True", "tables web", "routes"]


def test_a_service_added_again_logs_its_health_again(logs: pytest.LogCaptureFixture) -> None:
    parts = Parts()
    events, pool = setup(parts)
    pool.set_up(pool.backends[0].key, True)
    events.pool_changed("web")
    events.service_removed("web")
    events.service_added("web")
    events.pool_changed("web")
    assert [r.getMessage() for r in logs.records].count("service.healthy") == 2


def test_checks_observed_and_the_kernel_engine_announces_once_checked() -> None:
    parts = Parts(kernel=True)
    events, pool = setup(parts)
    result = ProbeResult(ok=True, latency_s=0.002, detail="")
    events.checked("web", pool.backends[0], result)
    assert parts.calls == ["observe web 10.0.0.1:80 0.002", "routes"]
    parts.listening_on.add("web")
    events.checked("web", pool.backends[0], result)
    assert parts.calls[2:] == ["observe web 10.0.0.1:80 0.002"]


def test_with_consensus_a_local_check_is_a_vote() -> None:
    parts = Parts()
    events, pool = setup(parts)
    events.local_health("web", pool.backends[1], True)
    assert parts.calls == ["vote web 10.0.0.2:80 True", "routes"]
