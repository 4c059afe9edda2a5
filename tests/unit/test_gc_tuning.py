"""The node's garbage collector setting (``reactor.tune_gc``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from anycast_lb.forward.reactor import GC_THRESHOLD0, tune_gc


@pytest.fixture
def thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*before)


@pytest.mark.usefixtures("thresholds")
def test_tune_gc_raises_the_young_threshold_and_keeps_the_older_ones() -> None:
    gc.set_threshold(700, 7, 3)
    tune_gc()
    assert gc.get_threshold() == (GC_THRESHOLD0, 7, 3)
    assert GC_THRESHOLD0 > 700
