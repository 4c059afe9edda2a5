"""Backend selection over the up backends of a pool."""

from __future__ import annotations

import ipaddress
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from anycast_lb import maglev
from anycast_lb import pool as pool_module
from anycast_lb.config import ServiceConfig
from anycast_lb.pool import BuildJob


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
KEYS = [f"203.0.113.{130 + i}:8080" for i in range(4)]
CLIENTS = [("198.51.100.77", p) for p in range(40000, 41000)]


class ThreadedBuilds:
    """The default ``BuildRunner`` (a real daemon thread per build burst),
    keeping the threads so that the test can join them: no build of one test
    may still write the shared table cache while the next one runs."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def __call__(self, job: BuildJob) -> None:
        thread = threading.Thread(target=job, name="maglev-build", daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a Maglev build outlived its test"


THREADS = ThreadedBuilds()


@pytest.fixture(autouse=True)
def no_cached_tables() -> Iterator[None]:
    # Tables are cached per backend set across pools: start each test cold,
    # and end it only once every build it started has finished (a build
    # still running would put its table into the next test's cache).
    pool_module._TABLES.clear()
    yield
    THREADS.join(10)
    THREADS.threads.clear()
    pool_module._TABLES.clear()


def make_pool(service: ServiceConfig, run_build: pool_module.BuildRunner | None = None) -> pool_module.Pool:
    """A pool whose background builds run on threads the test joins."""
    return pool_module.Pool(service, run_build=run_build or THREADS)


class HeldBuilds:
    """A ``BuildRunner`` that keeps build jobs until the test runs them."""

    def __init__(self) -> None:
        self.jobs: list[BuildJob] = []

    def __call__(self, job: BuildJob) -> None:
        self.jobs.append(job)

    def run(self) -> int:
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job()
        return len(jobs)


def all_up(pool: pool_module.Pool) -> pool_module.Pool:
    for backend in pool.backends:
        pool.set_up(backend.key, True)
    assert pool.wait_table(10)
    return pool


def firsts(pool: pool_module.Pool) -> list[str]:
    return [pool.candidates(client, VIP)[0].key for client in CLIENTS]


def maglev_firsts(keys: list[str]) -> list[str]:
    """What a fresh table over ``keys`` chooses for each of ``CLIENTS``."""
    fresh = make_pool(service())
    table = maglev.build_table(keys)
    return [keys[maglev.lookup(table, maglev.flow_hash(fresh.flow_key(c, VIP)))] for c in CLIENTS]


def test_backends_start_down_and_get_no_traffic() -> None:
    pool = make_pool(service())
    assert pool.up_count == 0 and not pool.healthy
    assert pool.candidates(CLIENT, VIP) == []


def test_only_up_backends_are_candidates() -> None:
    pool = make_pool(service())
    pool.set_up("203.0.113.130:8080", True)
    pool.set_up("203.0.113.132:8080", True)
    keys = [b.key for b in pool.candidates(CLIENT, VIP)]
    assert sorted(keys) == ["203.0.113.130:8080", "203.0.113.132:8080"]


def test_maglev_choice_is_the_same_on_two_nodes() -> None:
    a, b = make_pool(service()), make_pool(service(backends=list(reversed(service().model_dump()["backends"]))))
    for pool in (a, b):
        all_up(pool)
    for port in range(40000, 40200):
        client = ("198.51.100.77", port)
        assert a.candidates(client, VIP)[0].key == b.candidates(client, VIP)[0].key


def test_maglev_spreads_flows() -> None:
    pool = all_up(make_pool(service()))
    counts = Counter(pool.candidates(("198.51.100.77", p), VIP)[0].key for p in range(1024, 9024))
    assert len(counts) == 4 and min(counts.values()) > 1600


def test_source_ip_hash_ignores_port() -> None:
    pool = make_pool(service(hash_key="source_ip"))
    for backend in pool.backends:
        pool.set_up(backend.key, True)
    chosen = {pool.candidates(("198.51.100.77", p), VIP)[0].key for p in range(1024, 1100)}
    assert len(chosen) == 1


def test_a_live_update_changes_the_hash_key_and_the_balance() -> None:
    pool = all_up(make_pool(service()))
    client = ("198.51.100.77", 40000)
    assert pool.flow_key(client, VIP) == b"tcp|198.51.100.77|40000|198.51.100.10|80"
    pool.update(service(hash_key="source_ip", balance="round_robin"))
    assert pool.flow_key(client, VIP) == bytes([198, 51, 100, 77])
    firsts = {pool.candidates(client, VIP)[0].key for _ in range(4)}
    assert len(firsts) == 4  # round robin: the same flow rotates


def test_flow_key_is_the_five_tuple_whatever_local_tuple_is_passed() -> None:
    pool = make_pool(service())
    client = ("198.51.100.77", 40000)
    assert pool.flow_key(client, ("198.51.100.10", 80)) == b"tcp|198.51.100.77|40000|198.51.100.10|80"
    assert pool.flow_key(client, ("198.51.100.11", 443)) == b"tcp|198.51.100.77|40000|198.51.100.11|443"
    assert pool.flow_key(client, ("198.51.100.10", 80)) == b"tcp|198.51.100.77|40000|198.51.100.10|80"


@pytest.mark.parametrize("address", ["198.51.100.77", "0.0.0.0", "2001:db8::7", "::ffff:192.0.2.1", "fe80::1%eth0"])
def test_source_ip_key_is_the_packed_address(address: str) -> None:
    pool = make_pool(service(hash_key="source_ip"))
    assert pool.flow_key((address, 40000), VIP) == ipaddress.ip_address(address).packed


def test_fallbacks_hold_every_other_up_backend() -> None:
    pool = all_up(make_pool(service()))
    candidates = pool.candidates(CLIENT, VIP)
    assert len({b.key for b in candidates}) == 4


def test_round_robin_rotates() -> None:
    pool = make_pool(service(balance="round_robin"))
    for backend in pool.backends:
        pool.set_up(backend.key, True)
    firsts = [pool.candidates(CLIENT, VIP)[0].key for _ in range(8)]
    assert firsts[:4] == firsts[4:] and len(set(firsts)) == 4


def test_least_conn_prefers_fewest_per_weight() -> None:
    pool = make_pool(service(balance="least_conn"))
    for backend in pool.backends:
        pool.set_up(backend.key, True)
        backend.active_connections = 5
    pool.get("203.0.113.132:8080").active_connections = 1
    assert pool.candidates(CLIENT, VIP)[0].key == "203.0.113.132:8080"


def test_healthy_follows_min_healthy_and_generation_counts_changes() -> None:
    pool = make_pool(service(min_healthy=2))
    assert pool.set_up("203.0.113.130:8080", True)
    assert not pool.healthy
    assert not pool.set_up("203.0.113.130:8080", True)
    pool.set_up("203.0.113.131:8080", True)
    assert pool.healthy and pool.generation == 2


def test_background_build_gives_the_maglev_table() -> None:
    pool = all_up(make_pool(service()))
    assert pool.table_ready and firsts(pool) == maglev_firsts(KEYS)
    pool.set_up(KEYS[2], False)
    assert pool.wait_table(10)
    assert firsts(pool) == maglev_firsts([KEYS[0], KEYS[1], KEYS[3]])


def test_set_up_never_builds_and_flows_get_an_answer_meanwhile() -> None:
    builds = HeldBuilds()
    pool = make_pool(service(), run_build=builds)
    pool.set_up(KEYS[0], True)  # one backend: a table costs nothing, no build
    assert pool.table_ready and not builds.jobs
    pool.set_up(KEYS[1], True)
    assert not pool.table_ready and not pool.wait_table(0)
    assert len(builds.jobs) == 1
    # Meanwhile: flows of KEYS[0] (the old table's only backend) stay there.
    assert set(firsts(pool)) == {KEYS[0]}
    assert builds.run() == 1
    assert pool.table_ready and pool.wait_table(0)
    assert firsts(pool) == maglev_firsts(KEYS[:2])


def test_during_rebuild_flows_keep_up_backends_and_spread_the_lost_ones() -> None:
    builds = HeldBuilds()
    pool = make_pool(service(), run_build=builds)
    for key in KEYS:
        pool.set_up(key, True)
    builds.run()
    before = firsts(pool)
    pool.set_up(KEYS[1], False)
    assert not pool.table_ready
    during = firsts(pool)
    survivors = sorted([KEYS[0], KEYS[2], KEYS[3]])
    for client, old, now in zip(CLIENTS, before, during):
        if old != KEYS[1]:
            assert now == old
        else:
            # The documented rule: the (hash % n)-th up backend in name order.
            h = maglev.flow_hash(pool.flow_key(client, VIP))
            assert now == survivors[h % 3]
    assert len({now for old, now in zip(before, during) if old == KEYS[1]}) == 3
    builds.run()
    assert firsts(pool) == maglev_firsts([KEYS[0], KEYS[2], KEYS[3]])


def test_nodes_agree_during_a_rebuild_whatever_the_configuration_order() -> None:
    forward, backward = HeldBuilds(), HeldBuilds()
    a = make_pool(service(), run_build=forward)
    b = make_pool(service(backends=list(reversed(service().model_dump()["backends"]))), run_build=backward)
    for pool, _builds in ((a, forward), (b, backward)):
        for key in KEYS[:3]:
            pool.set_up(key, True)
        assert not pool.table_ready  # no table yet: name-order rotation
    assert firsts(a) == firsts(b)
    forward.run(), backward.run()
    for pool in (a, b):
        pool.set_up(KEYS[0], False)
        pool.set_up(KEYS[3], True)
    assert firsts(a) == firsts(b)  # previous table, then rotation


def test_rebuilds_coalesce_to_the_latest_up_set() -> None:
    builds = HeldBuilds()
    pool = make_pool(service(), run_build=builds)
    for key in KEYS:
        pool.set_up(key, True)
    pool.set_up(KEYS[0], False)
    # Five transitions, one job; it builds the table for the set now up.
    assert builds.run() == 1 and not builds.jobs
    assert pool.table_ready and firsts(pool) == maglev_firsts(KEYS[1:])


def test_a_set_seen_before_gets_its_table_at_once() -> None:
    builds = HeldBuilds()
    pool = make_pool(service(), run_build=builds)
    for key in KEYS:
        pool.set_up(key, True)
    builds.run()
    pool.set_up(KEYS[3], False)
    builds.run()
    pool.set_up(KEYS[3], True)  # back to the full set: cached
    assert pool.table_ready and not builds.jobs
    other = make_pool(service(), run_build=builds)  # another service on the same backends
    for key in KEYS:
        other.set_up(key, True)
    assert other.table_ready and firsts(other) == firsts(pool)


def test_a_failed_build_keeps_serving_from_the_previous_table(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = HeldBuilds()
    pool = make_pool(service(), run_build=builds)
    for key in KEYS:
        pool.set_up(key, True)
    builds.run()
    before = firsts(pool)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(maglev, "build_table", broken)
    pool.set_up(KEYS[0], False)
    builds.run()
    assert not pool.table_ready
    assert all(now == old for old, now in zip(before, firsts(pool)) if old != KEYS[0])
    monkeypatch.undo()
    pool.set_up(KEYS[0], True)  # the next transition builds again (cached: at once)
    assert pool.table_ready and firsts(pool) == before


def test_no_thread_for_a_build_is_retried_at_the_next_transition() -> None:
    builds = HeldBuilds()
    refuse = True

    def runner(job: BuildJob) -> None:
        if refuse:
            raise RuntimeError("can't start new thread")
        builds(job)

    pool = make_pool(service(), run_build=runner)
    for key in KEYS[:3]:
        assert pool.set_up(key, True)  # the transition itself never fails
    assert not pool.table_ready and pool.candidates(CLIENT, VIP)
    refuse = False
    pool.set_up(KEYS[3], True)
    assert builds.run() == 1 and firsts(pool) == maglev_firsts(KEYS)


class Flapping:
    """12 backends at 251 slots whose first 4 go down and up; the table of
    every up set met is cached, so each transition publishes a ready table,
    and ``expected`` holds the Maglev answer of each set for ``clients``."""

    def __init__(self) -> None:
        self.pool = all_up(make_pool(service(
            backends=[{"address": f"203.0.113.{i + 1}", "port": 8080} for i in range(12)],
            maglev_table_size=251,
        )))
        self.keys = [b.key for b in self.pool.backends[:4]]
        for key in self.keys:
            self.pool.set_up(key, False)
            assert self.pool.wait_table(10)
            self.pool.set_up(key, True)
        self.clients = CLIENTS[:64]
        hashes = [maglev.flow_hash(self.pool.flow_key(c, VIP)) for c in self.clients]
        self.expected: dict[frozenset[str], list[str]] = {}
        for gone in [None, *self.keys]:
            keys = [b.key for b in self.pool.backends if b.key != gone]
            table = maglev.build_table(keys, size=251)
            self.expected[frozenset(keys)] = [keys[maglev.lookup(table, h)] for h in hashes]

    def check(self, i: int, got: list[pool_module.Backend]) -> frozenset[str]:
        """The answer for client ``i`` is the Maglev answer of the set it returns."""
        keys = frozenset(b.key for b in got)
        assert len(keys) == len(got) and got[0].key == self.expected[keys][i]
        return keys


def test_a_transition_in_the_middle_of_a_choice_does_not_mix_states(monkeypatch: pytest.MonkeyPatch) -> None:
    # The loop thread publishing a new state while a relay thread is halfway
    # through candidates, made deterministic: the transition runs inside the
    # flow hash. The answer must be all of the state read on entry.
    flapping = Flapping()
    real_hash = maglev.flow_hash

    def hash_during_transition(key: bytes) -> int:
        flapping.pool.set_up(flapping.keys[0], False)
        return real_hash(key)

    monkeypatch.setattr(maglev, "flow_hash", hash_during_transition)
    full = frozenset(b.key for b in flapping.pool.backends)
    for i, client in enumerate(flapping.clients):
        assert flapping.check(i, flapping.pool.candidates(client, VIP)) == full
        assert flapping.pool.set_up(flapping.keys[0], True)


def test_readers_on_other_threads_never_see_a_half_updated_pool() -> None:
    # The same with real threads and frequent thread switches: a relay
    # thread choosing while the loop thread flips backends.
    flapping = Flapping()
    pool = flapping.pool
    stop = threading.Event()
    errors: list[BaseException] = []
    answers = 0

    def relay() -> None:
        nonlocal answers
        try:
            while not stop.is_set():
                for i, client in enumerate(flapping.clients):
                    flapping.check(i, pool.candidates(client, VIP))
                    answers += 1
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    reader = threading.Thread(target=relay)
    reader.start()
    try:
        for i in range(300):
            key = flapping.keys[i % 4]
            assert pool.set_up(key, False) and pool.table_ready
            assert pool.set_up(key, True) and pool.table_ready
    finally:
        stop.set()
        reader.join(10)
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    assert answers > 0 and not reader.is_alive()


def test_prepare_builds_the_table_a_later_up_set_publishes_ready() -> None:
    held = HeldBuilds()
    pool = make_pool(service(), run_build=held)
    pool.set_up_set(KEYS)
    held.run()
    assert pool.table_ready
    assert pool.prepare(KEYS[1:])
    assert not pool.prepare(KEYS[1:]), "one build per table while it is being prepared"
    assert pool.generation == 1 and pool.up_count == 4, "preparing publishes nothing"
    assert held.run() == 1
    assert not pool.prepare(KEYS[1:]), "already cached"
    pool.set_up_set(KEYS[1:])
    assert pool.table_ready, "published with the prepared table, no build"
    assert held.jobs == []
    assert firsts(pool) == maglev_firsts(KEYS[1:])


def test_prepare_skips_what_needs_no_build() -> None:
    held = HeldBuilds()
    pool = make_pool(service(), run_build=held)
    assert not pool.prepare(KEYS[:1]), "one backend: built on the spot when published"
    assert not make_pool(service(balance="round_robin"), run_build=held).prepare(KEYS[1:])
    assert held.jobs == []


def test_table_since_is_when_the_current_table_was_in_place() -> None:
    held = HeldBuilds()
    pool = make_pool(service(), run_build=held)
    before = time.time()
    pool.set_up_set(KEYS)
    assert pool.table_since() is None, "being built"
    held.run()
    since = pool.table_since()
    assert since is not None and before <= since <= time.time()
