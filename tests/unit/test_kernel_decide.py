"""What a kernel-engine service's maps hold through health changes and drains."""

from __future__ import annotations

import ipaddress

from anycast_lb.config import ServiceConfig
from anycast_lb.kernel import render
from anycast_lb.kernel.decide import ServiceTables

SERVICE = ServiceConfig.model_validate({
    "name": "web", "vip": "192.0.2.10", "port": 80, "maglev_table_size": 251,
    "backends": [{"address": f"198.51.100.{i}", "port": 80} for i in (1, 2, 3)],
})
K1, K2, K3 = (f"198.51.100.{i}:80" for i in (1, 2, 3))
M1, M2, M3 = (int(ipaddress.IPv4Address(f"198.51.100.{i}")) for i in (1, 2, 3))


def test_health_changes_move_both_tables() -> None:
    s = ServiceTables(SERVICE)
    assert s.tables == render.Tables() and s.generation == 0
    t = s.set_up({K1, K2, K3, "203.0.113.9:80"})
    assert set(t.current) == {M1, M2, M3} and t.current == t.previous
    assert not t.draining and set(t.backends) == {M1, M2, M3}
    assert s.generation == 1
    assert s.set_up({K1, K2, K3}) == t and s.generation == 1  # nothing changed
    t = s.set_up({K1, K2})
    assert set(t.current) == {M1, M2} and t.current == t.previous and M3 not in t.backends
    assert s.generation == 2
    assert s.set_up(()).current == () and s.generation == 3


def test_drain_then_promotion() -> None:
    s = ServiceTables(SERVICE)
    steady = s.set_up({K1, K2, K3})
    draining = s.drain(K3)
    assert set(draining.current) == {M1, M2}
    assert draining.previous == steady.previous  # moved flows still reach K3
    assert M3 in draining.backends and s.draining == {K3}
    # A health change during the drain keeps the drain.
    during = s.set_up({K1, K2, K3})
    assert during == draining
    done = s.end_drain(K3)
    assert done.previous == done.current == draining.current
    assert M3 in done.backends  # learned flows still reach it while it is up
    assert M3 not in s.set_up({K1, K2}).backends
    assert s.generation == 4
    s.set_up({K1, K2, K3})
    back = s.undrain(K3)
    assert back == steady and s.generation == 6


def test_same_inputs_same_tables_and_digest_on_every_node() -> None:
    a, b = ServiceTables(SERVICE), ServiceTables(SERVICE)
    a.set_up({K1, K2, K3})
    a.drain(K2)
    b.set_up({K3, K2, K1})
    b.drain(K2)
    assert a.tables == b.tables and a.digest() == b.digest()
    b.end_drain(K2)
    assert a.digest() != b.digest()
    assert len(a.digest()) == 12


def test_reconcile_drives_a_drain_from_the_pool_and_promotes_on_time() -> None:
    """What the node drives: the pool's up set and admin drains at a time;
    the promotion comes ``promote_after`` s after the drain started."""
    s = ServiceTables(SERVICE)
    steady = s.reconcile(SERVICE, {K1, K2, K3}, (), now=100.0, promote_after=30.0)
    assert s.next_promotion(30.0) is None and set(steady.current) == {M1, M2, M3}
    t = s.reconcile(SERVICE, {K1, K2, K3}, {K3}, now=110.0, promote_after=30.0)
    assert set(t.current) == {M1, M2} and t.previous == steady.previous
    assert s.draining == {K3} and s.next_promotion(30.0) == 140.0
    # Later pokes (health of others) do not restart the drain's clock.
    s.reconcile(SERVICE, {K1, K2, K3}, {K3}, now=125.0, promote_after=30.0)
    assert s.next_promotion(30.0) == 140.0
    t = s.reconcile(SERVICE, {K1, K2, K3}, {K3}, now=139.9, promote_after=30.0)
    assert t.draining
    t = s.reconcile(SERVICE, {K1, K2, K3}, {K3}, now=140.0, promote_after=30.0)
    assert not t.draining and set(t.previous) == {M1, M2}
    assert M3 in t.backends  # learned flows still reach it
    assert s.draining == frozenset() and s.drained == {K3} and s.next_promotion(30.0) is None
    # Undrained: back in both tables.
    t = s.reconcile(SERVICE, {K1, K2, K3}, (), now=150.0, promote_after=30.0)
    assert t == steady and s.drained == frozenset()


def test_reconcile_same_inputs_same_digest_on_two_nodes() -> None:
    """Two nodes reconciling the same pool state (at different times within
    the drain) hold the same tables and digest."""
    a, b = ServiceTables(SERVICE), ServiceTables(SERVICE)
    for node, now in ((a, 10.0), (b, 10.4)):
        node.reconcile(SERVICE, {K1, K2, K3}, (), now=now, promote_after=5.0)
        node.reconcile(SERVICE, {K1, K2, K3}, {K2}, now=now + 1, promote_after=5.0)
    assert a.digest() == b.digest() and a.tables == b.tables


def test_reconcile_takes_new_weights() -> None:
    s = ServiceTables(SERVICE)
    even = s.reconcile(SERVICE, {K1, K2, K3}, (), now=0.0, promote_after=5.0)
    heavy = SERVICE.model_copy(update={"backends": [
        b.model_copy(update={"weight": 5 if b.key == K1 else 1}) for b in SERVICE.backends]})
    t = s.reconcile(heavy, {K1, K2, K3}, (), now=1.0, promote_after=5.0)
    assert t.current.count(M1) > even.current.count(M1)
