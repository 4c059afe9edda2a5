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
