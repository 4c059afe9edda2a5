"""The lab's FIB watch and plot step report their failures instead of
stopping or vanishing (no namespace: the FIB reader is a small fake)."""

from __future__ import annotations

import threading

from anycast_lb.errors import LabError
from anycast_lb.lab import scenarios

PREFIX = "198.51.100.10/32"


class FlakyFib:
    """Next hops that change on the 2nd poll; polls 3 and 4 fail."""

    def __init__(self, polls_wanted: int) -> None:
        self.polls = 0
        self.closed = False
        self.enough = threading.Event()
        self.wanted = polls_wanted

    def nexthops(self, prefix: str) -> list[str]:
        assert prefix == PREFIX
        self.polls += 1
        if self.polls >= self.wanted:
            self.enough.set()
        if self.polls in (3, 4):
            raise LabError(f"netlink route dump: timed out (poll {self.polls})")
        return ["10.0.0.1", "10.0.0.2"] if self.polls < 2 else ["10.0.0.1"]

    def close(self) -> None:
        self.closed = True


def test_fib_watch_goes_on_after_a_failed_poll_and_reports_it() -> None:
    fib = FlakyFib(polls_wanted=8)
    watch = scenarios.FibWatch(fib, PREFIX, limit_s=30.0)
    watch.start()
    assert fib.enough.wait(10.0), f"only {fib.polls} polls"
    watch.stop.set()
    watch.join(5.0)
    assert not watch.is_alive() and fib.closed
    assert [hops for _, hops in watch.changes] == [["10.0.0.1", "10.0.0.2"], ["10.0.0.1"]]
    assert watch.report() == {"fib_watch_errors": 2,
                              "fib_watch_error": "netlink route dump: timed out (poll 4)"}


def test_fib_watch_without_failures_reports_nothing() -> None:
    fib = FlakyFib(polls_wanted=2)
    watch = scenarios.FibWatch(fib, PREFIX, limit_s=30.0)
    watch.start()
    assert fib.enough.wait(10.0)
    watch.stop.set()
    watch.join(5.0)
    assert watch.report() == {}


def test_a_failed_plot_is_in_the_result() -> None:
    def draw() -> None:
        raise ValueError("x and y must have the same first dimension")

    result: dict[str, object] = {"scenario": "link-down"}
    scenarios.plot_timeline(draw, result)
    assert result["plot_error"] == "ValueError: x and y must have the same first dimension"


def test_a_plot_that_works_adds_nothing() -> None:
    drawn: list[bool] = []
    result: dict[str, object] = {}
    scenarios.plot_timeline(lambda: drawn.append(True), result)
    assert drawn == [True] and result == {}
