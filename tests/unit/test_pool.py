"""Backend selection over the up backends of a pool."""

from __future__ import annotations

from collections import Counter
from typing import Any

from anycast_lb.config import ServiceConfig
from anycast_lb.pool import Pool


def service(**overrides: Any) -> ServiceConfig:
    data: dict[str, Any] = {
        "name": "web",
        "vip": "198.51.100.10",
        "port": 80,
        "backends": [{"address": f"203.0.113.{130 + i}", "port": 8080} for i in range(4)],
    }
    data.update(overrides)
    return ServiceConfig.model_validate(data)


CLIENT = ("198.51.100.77", 40000)
VIP = ("198.51.100.10", 80)


def test_backends_start_down_and_get_no_traffic() -> None:
    pool = Pool(service())
    assert pool.up_count == 0 and not pool.healthy
    assert pool.candidates(CLIENT, VIP) == []


def test_only_up_backends_are_candidates() -> None:
    pool = Pool(service())
    pool.set_up("203.0.113.130:8080", True)
    pool.set_up("203.0.113.132:8080", True)
    keys = [b.key for b in pool.candidates(CLIENT, VIP)]
    assert sorted(keys) == ["203.0.113.130:8080", "203.0.113.132:8080"]


def test_maglev_choice_is_the_same_on_two_nodes() -> None:
    a, b = Pool(service()), Pool(service(backends=list(reversed(service().model_dump()["backends"]))))
    for pool in (a, b):
        for backend in pool.backends:
            pool.set_up(backend.key, True)
    for port in range(40000, 40200):
        client = ("198.51.100.77", port)
        assert a.candidates(client, VIP)[0].key == b.candidates(client, VIP)[0].key


def test_maglev_spreads_flows() -> None:
    pool = Pool(service())
    for backend in pool.backends:
        pool.set_up(backend.key, True)
    counts = Counter(pool.candidates(("198.51.100.77", p), VIP)[0].key for p in range(1024, 9024))
    assert len(counts) == 4 and min(counts.values()) > 1600


def test_source_ip_hash_ignores_port() -> None:
    pool = Pool(service(hash_key="source_ip"))
    for backend in pool.backends:
        pool.set_up(backend.key, True)
    chosen = {pool.candidates(("198.51.100.77", p), VIP)[0].key for p in range(1024, 1100)}
    assert len(chosen) == 1


def test_fallbacks_hold_every_other_up_backend() -> None:
    pool = Pool(service())
    for backend in pool.backends:
        pool.set_up(backend.key, True)
    candidates = pool.candidates(CLIENT, VIP)
    assert len({b.key for b in candidates}) == 4


def test_round_robin_rotates() -> None:
    pool = Pool(service(balance="round_robin"))
    for backend in pool.backends:
        pool.set_up(backend.key, True)
    firsts = [pool.candidates(CLIENT, VIP)[0].key for _ in range(8)]
    assert firsts[:4] == firsts[4:] and len(set(firsts)) == 4


def test_least_conn_prefers_fewest_per_weight() -> None:
    pool = Pool(service(balance="least_conn"))
    for backend in pool.backends:
        pool.set_up(backend.key, True)
        backend.active_connections = 5
    pool.get("203.0.113.132:8080").active_connections = 1
    assert pool.candidates(CLIENT, VIP)[0].key == "203.0.113.132:8080"


def test_healthy_follows_min_healthy_and_generation_counts_changes() -> None:
    pool = Pool(service(min_healthy=2))
    assert pool.set_up("203.0.113.130:8080", True)
    assert not pool.healthy
    assert not pool.set_up("203.0.113.130:8080", True)
    pool.set_up("203.0.113.131:8080", True)
    assert pool.healthy and pool.generation == 2
