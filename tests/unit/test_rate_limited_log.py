"""Rate-limited log lines on an injected clock."""

from __future__ import annotations

import logging

import pytest

from anycast_lb import log
from anycast_lb.log import RateLimit, RateLimitedLog


def test_rate_limit_allows_one_per_interval_and_counts_the_rest() -> None:
    limit = RateLimit(1.0)
    assert limit.allow(10.0) == 0
    assert [limit.allow(10.0 + i / 100) for i in range(1, 100)] == [None] * 99
    assert limit.allow(11.0) == 99  # the next line carries the count
    assert limit.allow(11.5) is None
    assert limit.allow(30.0) == 1


def test_rate_limit_refuses_a_zero_interval() -> None:
    with pytest.raises(ValueError):
        RateLimit(0)


def test_rate_limited_log_writes_one_line_per_interval_and_key(
        caplog: pytest.LogCaptureFixture) -> None:
    log.setup("info")
    logger = logging.getLogger("anycast_lb")
    logger.propagate = True  # let caplog see the records
    now = [100.0]
    limited = RateLimitedLog(1.0, clock=lambda: now[0])
    try:
        with caplog.at_level(logging.WARNING, logger="anycast_lb"):
            written = 0
            for i in range(10_000):  # a 10 s storm at 1,000 errors a second
                now[0] = 100.0 + i / 1000
                written += limited("forward.accept_paused", key="web", service="web")
            written += limited("forward.accept_paused", key="dns", service="dns")
    finally:
        logger.propagate = False
    assert written == 11  # 10 intervals for web, 1 for dns
    records = [r for r in caplog.records if r.getMessage() == "forward.accept_paused"]
    assert len(records) == 11
    web = [r.kv for r in records if r.kv["service"] == "web"]  # type: ignore[attr-defined]
    assert web[0]["suppressed"] == 0
    assert all(fields["suppressed"] == 999 for fields in web[1:])
