"""The drain semaphore decision (table-driven)."""

from __future__ import annotations

import pytest

from anycast_lb.consensus.semaphore import Decision, Held, Take, Wait, decide

CASES = [
    ("free: take slot 0", 1, {}, "a", Take(0)),
    ("mine: drain", 1, {0: "a"}, "a", Held(0)),
    ("taken: wait, naming the holder", 1, {0: "b"}, "a", Wait(("b",))),
    ("two slots, one taken: take the other", 2, {0: "b"}, "a", Take(1)),
    ("two slots, both taken", 2, {1: "c", 0: "b"}, "a", Wait(("b", "c"))),
    ("lowest free index", 3, {1: "b"}, "a", Take(0)),
    ("limit lowered: a holder above it still counts", 1, {3: "b"}, "a", Wait(("b",))),
    ("limit lowered: mine above it is still mine", 1, {0: "b", 3: "a"}, "a", Held(3)),
    ("holder above the limit, room left", 2, {5: "b"}, "a", Take(0)),
]


@pytest.mark.parametrize(("why", "limit", "holders", "node", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_decide(why: str, limit: int, holders: dict[int, str], node: str, expected: Decision) -> None:
    assert decide(limit, holders, node) == expected


def test_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        decide(0, {}, "a")
