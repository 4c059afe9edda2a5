"""The BGP view's freshness (pure): ExaBGP's word within the deadline, or unknown."""

from __future__ import annotations

import pytest

from anycast_lb.bgp.liveness import (
    CONFIRM_DEADLINE,
    UNCONFIRMED,
    UNKNOWN,
    Freshness,
    freshness,
    peer_states,
    route_states,
)


@pytest.mark.parametrize(
    ("now", "confirmed_at", "since", "expected"),
    [
        # never answered: stale, age counted from when the node started waiting
        (100.0, None, 100.0, Freshness(False, 0.0)),
        (105.0, None, 100.0, Freshness(False, 5.0)),
        # answered just now, within, at and past the deadline
        (100.0, 100.0, 0.0, Freshness(True, 0.0)),
        (102.5, 100.0, 0.0, Freshness(True, 2.5)),
        (100.0 + CONFIRM_DEADLINE, 100.0, 0.0, Freshness(True, CONFIRM_DEADLINE)),
        (100.0 + CONFIRM_DEADLINE + 0.001, 100.0, 0.0, Freshness(False, CONFIRM_DEADLINE + 0.001)),
        (1000.0, 100.0, 0.0, Freshness(False, 900.0)),
        # a clock read before the answer was recorded never gives a negative age
        (99.0, 100.0, 0.0, Freshness(True, 0.0)),
    ],
)
def test_freshness(now: float, confirmed_at: float | None, since: float, expected: Freshness) -> None:
    got = freshness(now, confirmed_at, since)
    assert got.confirmed == expected.confirmed
    assert got.age == pytest.approx(expected.age)


def test_custom_deadline() -> None:
    assert freshness(10.5, 10.0, 0.0, deadline=0.5).confirmed
    assert not freshness(10.51, 10.0, 0.0, deadline=0.5).confirmed


def test_stale_view_claims_nothing() -> None:
    peers = {"203.0.113.1": "up", "203.0.113.2": "down"}
    routes = {"198.51.100.10/32": "announced", "198.51.100.11/32": "pending",
              "198.51.100.12/32": "withdrawn"}
    assert peer_states(peers, True) == peers
    assert route_states(routes, True) == routes
    assert peer_states(peers, False) == {a: UNKNOWN for a in peers}
    assert route_states(routes, False) == {p: UNCONFIRMED for p in routes}
    assert peer_states({}, False) == {} and route_states({}, False) == {}
