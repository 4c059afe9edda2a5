"""Rise/fall hysteresis for one health-checked thing (backend, service, node).

Pure: no I/O, no clock, no logging. The caller feeds one check result at a
time and acts on the returned transition.

Rule (the classic rise/fall of LVS/keepalived and ExaBGP ``healthcheck``):
a DOWN machine goes UP after ``rise`` consecutive successes; an UP machine
goes DOWN after ``fall`` consecutive failures. A success resets the failure
streak and a failure resets the success streak, so an alternating result
never flips the state (for rise, fall >= 2).
"""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    """Health state. Use ``.value`` ("up"/"down") for text: ``str(State.UP)``
    is "State.UP" on Python 3.11."""

    UP = "up"
    DOWN = "down"


class Hysteresis:
    """Rise/fall state machine.

    ``settling`` tells the monitor to check at its fast interval: it is True
    while the initial state is still unconfirmed (until the first transition,
    or until ``fall`` failures confirm an initial DOWN / ``rise`` successes
    confirm an initial UP), and while a streak toward the other state is in
    progress.
    """

    __slots__ = ("rise", "fall", "_state", "_ok_streak", "_fail_streak", "_confirmed")

    def __init__(self, rise: int, fall: int, initial: State = State.DOWN) -> None:
        """``rise``, ``fall``: consecutive results needed (each >= 1).

        Raises ValueError if either is below 1.
        """
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be >= 1 (got rise={rise}, fall={fall})")
        self.rise = rise
        self.fall = fall
        self._state = initial
        self._ok_streak = 0
        self._fail_streak = 0
        self._confirmed = False

    @property
    def state(self) -> State:
        return self._state

    @property
    def up(self) -> bool:
        return self._state is State.UP

    @property
    def streak(self) -> int:
        """Consecutive results so far toward the other state (0 when none)."""
        return self._ok_streak if self._state is State.DOWN else self._fail_streak

    @property
    def settling(self) -> bool:
        return not self._confirmed or self.streak > 0

    def observe(self, ok: bool) -> State | None:
        """Record one check result; return the new state on a transition, else None."""
        if ok:
            # Capped: only "reached the threshold" matters, and the counters
            # must not grow for ever on a long-lived backend.
            self._ok_streak = min(self._ok_streak + 1, self.rise)
            self._fail_streak = 0
        else:
            self._fail_streak = min(self._fail_streak + 1, self.fall)
            self._ok_streak = 0

        if self._state is State.DOWN and self._ok_streak >= self.rise:
            return self._flip(State.UP)
        if self._state is State.UP and self._fail_streak >= self.fall:
            return self._flip(State.DOWN)
        if not self._confirmed:
            if self._state is State.DOWN and self._fail_streak >= self.fall:
                self._confirmed = True
            elif self._state is State.UP and self._ok_streak >= self.rise:
                self._confirmed = True
        return None

    def _flip(self, state: State) -> State:
        self._state = state
        self._confirmed = True
        # The streak that caused the flip is spent; the next streak toward
        # the other state starts from zero.
        self._ok_streak = 0
        self._fail_streak = 0
        return state

    def __repr__(self) -> str:
        return (
            f"Hysteresis(rise={self.rise}, fall={self.fall}, state={self._state.value}, "
            f"streak={self.streak}, settling={self.settling})"
        )
