"""Origin-side flap damping, in numbers (RFC 2439 section 4.2 idea)."""

from __future__ import annotations

import ipaddress
import math

import pytest

from anycast_lb.bgp.damping import FlapDamper
from anycast_lb.config import DampingConfig

P = ipaddress.ip_network("198.51.100.10/32")
Q = ipaddress.ip_network("2001:db8::10/128")
# penalty 1000 per flap, suppress at 3000, reuse below 750, half-life 30 s.
CFG = DampingConfig(penalty=1000, suppress=3000, reuse=750, half_life=30, max_suppress=300)


def flap(d: FlapDamper, at: float, prefix: ipaddress.IPv4Network | ipaddress.IPv6Network = P
         ) -> None:
    d.observe(prefix, True, at)
    d.observe(prefix, False, at)


def test_first_observation_is_not_a_flap() -> None:
    d = FlapDamper(CFG)
    d.observe(P, False, 0.0)
    assert d.status(P, 0.0)["penalty"] == 0.0


def test_only_up_to_down_adds_penalty_and_it_halves_every_half_life() -> None:
    d = FlapDamper(CFG)
    d.observe(P, True, 0.0)
    d.observe(P, True, 1.0)  # no change
    d.observe(P, False, 10.0)  # flap
    d.observe(P, False, 11.0)  # still down
    d.observe(P, True, 12.0)  # down -> up: free
    assert d.status(P, 10.0)["penalty"] == pytest.approx(1000)
    assert d.status(P, 40.0)["penalty"] == pytest.approx(500)
    assert d.status(P, 70.0)["penalty"] == pytest.approx(250)
    assert d.suppressed(40.0) == frozenset()


def test_suppressed_at_threshold_and_reused_below_reuse() -> None:
    d = FlapDamper(CFG)
    d.observe(P, True, 0.0)
    flap(d, 0.0)
    flap(d, 0.0)
    assert not d.is_suppressed(P, 0.0)  # 2000 < 3000
    flap(d, 0.0)  # 3000: suppressed
    assert d.suppressed(0.0) == frozenset({P})
    # 3000 -> 750 takes two half-lives: 60 s.
    assert d.status(P, 0.0)["reuse_in_s"] == pytest.approx(60.0)
    assert d.next_change(0.0) == pytest.approx(60.0)
    assert d.is_suppressed(P, 59.9)
    assert d.status(P, 59.9)["suppressed"] is True
    assert not d.is_suppressed(P, 60.0)
    assert d.next_change(60.0) is None
    assert d.status(P, 60.0) == {"penalty": pytest.approx(750), "suppressed": False,
                                 "reuse_in_s": 0.0}


def test_hysteresis_between_reuse_and_suppress() -> None:
    d = FlapDamper(CFG)
    d.observe(P, True, 0.0)
    for _ in range(3):
        flap(d, 0.0)
    # At 45 s the penalty is 3000 * 2**-1.5 = 1061: below suppress, still held.
    assert d.status(P, 45.0)["penalty"] == pytest.approx(3000 * 2 ** -1.5)
    assert d.is_suppressed(P, 45.0)
    # A flap while suppressed adds to the decayed penalty and extends the hold.
    flap(d, 45.0)
    penalty = 3000 * 2 ** -1.5 + 1000
    assert d.status(P, 45.0)["penalty"] == pytest.approx(penalty)
    assert d.next_change(45.0) == pytest.approx(45.0 + 30 * math.log2(penalty / 750))


def test_not_suppressed_again_until_suppress_is_reached() -> None:
    d = FlapDamper(CFG)
    d.observe(P, True, 0.0)
    for _ in range(3):
        flap(d, 0.0)
    # reused at 60 s with 750; one flap -> 1750 < 3000: announced.
    flap(d, 60.0)
    assert d.status(P, 60.0)["penalty"] == pytest.approx(1750)
    assert not d.is_suppressed(P, 60.0)


def test_never_suppressed_longer_than_max_suppress_after_the_last_flap() -> None:
    cfg = DampingConfig(penalty=1000, suppress=3000, reuse=750, half_life=30, max_suppress=90)
    d = FlapDamper(cfg)
    d.observe(P, True, 0.0)
    for _ in range(50):  # 50000 uncapped; ceiling 750 * 2**3 = 6000
        flap(d, 0.0)
    assert d.status(P, 0.0)["penalty"] == pytest.approx(6000)
    assert d.next_change(0.0) == pytest.approx(90.0)
    assert not d.is_suppressed(P, 90.0)


def test_config_refuses_a_ceiling_below_suppress() -> None:
    # Ceiling 750 * 2**(30/30) = 1500 < 3000: damping could never engage.
    with pytest.raises(ValueError, match="never holds a prefix down"):
        DampingConfig(penalty=1000, suppress=3000, reuse=750, half_life=30, max_suppress=30)


def test_disabled_damper_never_suppresses() -> None:
    d = FlapDamper(DampingConfig(enabled=False))
    d.observe(P, True, 0.0)
    for _ in range(10):
        flap(d, 0.0)
    assert d.suppressed(0.0) == frozenset()
    assert d.next_change(0.0) is None


def test_prefixes_are_independent_and_next_change_is_the_earliest() -> None:
    d = FlapDamper(CFG)
    d.observe(P, True, 0.0)
    d.observe(Q, True, 0.0)
    for _ in range(3):
        flap(d, 0.0, P)
    for _ in range(4):
        flap(d, 10.0, Q)  # 4000 -> reuse after 30 * log2(4000/750) s
    assert d.suppressed(10.0) == frozenset({P, Q})
    assert d.next_change(10.0) == pytest.approx(60.0)
    assert d.next_change(60.0) == pytest.approx(10.0 + 30 * math.log2(4000 / 750))
    assert d.prefixes() == [P, Q]


def test_clock_going_backwards_is_no_time() -> None:
    d = FlapDamper(CFG)
    d.observe(P, True, 100.0)
    flap(d, 100.0)
    d.observe(P, True, 50.0)
    d.observe(P, False, 50.0)
    assert d.status(P, 100.0)["penalty"] == pytest.approx(2000)
