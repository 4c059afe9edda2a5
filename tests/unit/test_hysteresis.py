"""Rise/fall hysteresis: table-driven cases and a property test against run lengths."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anycast_lb.health.hysteresis import Hysteresis, State

UP, DOWN = State.UP, State.DOWN


def _run(machine: Hysteresis, results: str) -> list[State | None]:
    """Feed "+" (ok) / "-" (fail) results; return what observe() returned for each."""
    return [machine.observe(c == "+") for c in results]


# (rise, fall, initial, results, expected transitions as {index: state}, final state)
CASES = [
    (2, 3, DOWN, "", {}, DOWN),
    (2, 3, DOWN, "+", {}, DOWN),
    (2, 3, DOWN, "++", {1: UP}, UP),
    (2, 3, DOWN, "+-+", {}, DOWN),
    (2, 3, DOWN, "+-++", {3: UP}, UP),
    (2, 3, DOWN, "++++", {1: UP}, UP),
    (2, 3, DOWN, "++--", {1: UP}, UP),
    (2, 3, DOWN, "++---", {1: UP, 4: DOWN}, DOWN),
    (2, 3, DOWN, "++--+---", {1: UP, 7: DOWN}, DOWN),
    (2, 3, DOWN, "++---++", {1: UP, 4: DOWN, 6: UP}, UP),
    (2, 3, DOWN, "---------", {}, DOWN),
    (2, 3, DOWN, "+-+-+-+-", {}, DOWN),
    (2, 3, UP, "+-+-+-+-", {}, UP),
    (2, 3, UP, "---", {2: DOWN}, DOWN),
    (2, 3, UP, "--+--", {}, UP),
    (1, 1, DOWN, "+", {0: UP}, UP),
    (1, 1, DOWN, "+-+-", {0: UP, 1: DOWN, 2: UP, 3: DOWN}, DOWN),
    (1, 1, DOWN, "--", {}, DOWN),
    (1, 1, UP, "-", {0: DOWN}, DOWN),
    (3, 1, DOWN, "++-+++", {5: UP}, UP),
    (3, 1, DOWN, "+++-", {2: UP, 3: DOWN}, DOWN),
    (1, 3, DOWN, "+--+---", {0: UP, 6: DOWN}, DOWN),
    (5, 5, DOWN, "++++" "+" "----" "-", {4: UP, 9: DOWN}, DOWN),
]


@pytest.mark.parametrize(("rise", "fall", "initial", "results", "transitions", "final"), CASES)
def test_transitions(
    rise: int,
    fall: int,
    initial: State,
    results: str,
    transitions: dict[int, State],
    final: State,
) -> None:
    machine = Hysteresis(rise, fall, initial)
    got = _run(machine, results)
    assert {i: s for i, s in enumerate(got) if s is not None} == transitions
    assert machine.state is final
    assert machine.up is (final is UP)


# (rise, fall, initial, results, settling after each result; first entry = before any)
SETTLING = [
    # Starts unconfirmed; a dead backend is confirmed DOWN after `fall` failures.
    (2, 3, DOWN, "---+--", [True, True, True, False, True, False, False]),
    # Rising, up (settled), falling, back up (streak reset), falling, down.
    (2, 3, DOWN, "++-+---", [True, True, False, True, False, True, True, False]),
    (2, 3, UP, "++-", [True, True, False, True]),
    (1, 1, DOWN, "+-", [True, False, False]),
]


@pytest.mark.parametrize(("rise", "fall", "initial", "results", "expected"), SETTLING)
def test_settling(
    rise: int, fall: int, initial: State, results: str, expected: list[bool]
) -> None:
    machine = Hysteresis(rise, fall, initial)
    seen = [machine.settling]
    for c in results:
        machine.observe(c == "+")
        seen.append(machine.settling)
    assert seen == expected


def test_state_values_are_plain_text() -> None:
    # str(Enum) on 3.11 gives "State.UP"; callers must use .value.
    assert UP.value == "up" and DOWN.value == "down"
    assert State("up") is UP


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 3)])
def test_rejects_non_positive_thresholds(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="rise and fall must be >= 1"):
        Hysteresis(rise, fall)


def test_repr_shows_state_value() -> None:
    assert "state=down" in repr(Hysteresis(2, 3))


@given(
    rise=st.integers(1, 6),
    fall=st.integers(1, 6),
    initial=st.sampled_from(State),
    results=st.lists(st.booleans(), max_size=60),
)
def test_flips_exactly_after_rise_ok_or_fall_failures(
    rise: int, fall: int, initial: State, results: list[bool]
) -> None:
    machine = Hysteresis(rise, fall, initial)
    state = initial
    run_value: bool | None = None
    run_length = 0
    # Length of the current run counted since the last transition.
    for ok in results:
        if ok == run_value:
            run_length += 1
        else:
            run_value, run_length = ok, 1
        got = machine.observe(ok)

        if state is DOWN and ok and run_length == rise:
            expected: State | None = UP
        elif state is UP and not ok and run_length == fall:
            expected = DOWN
        else:
            expected = None
        assert got is expected
        if expected is not None:
            state = expected
            # A transition spends the streak: the next one needs a fresh run.
            run_value, run_length = None, 0
        assert machine.state is state
        assert machine.streak == (
            run_length if run_value is (state is DOWN) and expected is None else 0
        )
