"""Structured logs to stderr (never stdout: ExaBGP reads an API process's stdout).

Each record is one line: ``ts=... level=info event=health.transition
service=web backend=203.0.113.130:8080 state=up``. Event names are stable
(``health.transition``, ``backend.down``, ``route.announce``,
``route.withdraw``, ``node.drain``...) so operators can alert on them.

Errors that can repeat thousands of times a second (an accept loop out of
descriptors, a flood refused) go through :class:`RateLimitedLog`: one line
per interval with a ``suppressed`` count.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

_LOGGER = logging.getLogger("anycast_lb")


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ms = int(record.msecs)
        fields: dict[str, Any] = getattr(record, "kv", {})
        parts = [f"ts={ts}.{ms:03d}Z", f"level={record.levelname.lower()}", f"event={record.getMessage()}"]
        parts += [f"{k}={_quote(v)}" for k, v in fields.items()]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup(level: str = "info") -> None:
    """Send this package's logs to stderr as key=value lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    _LOGGER.handlers[:] = [handler]
    _LOGGER.setLevel(level.upper())
    _LOGGER.propagate = False


def event(name: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one event with a stable name and key-value fields."""
    if _LOGGER.isEnabledFor(level):
        _LOGGER.log(level, name, extra={"kv": fields})


def warning(name: str, /, **fields: Any) -> None:
    event(name, logging.WARNING, **fields)


def error(name: str, /, **fields: Any) -> None:
    event(name, logging.ERROR, **fields)


def debug(name: str, /, **fields: Any) -> None:
    event(name, logging.DEBUG, **fields)


class RateLimit:
    """The decision of a rate-limited log line, without the logging (pure).

    ``allow(now)`` is called once per occurrence with the monotonic time in
    seconds. The first occurrence, and the first one at least ``interval_s``
    after the last allowed one, are allowed: it returns how many occurrences
    were suppressed since the last allowed line (0 or more). Every other
    occurrence returns None and is counted. So a burst of errors gives at
    most one line per interval, each carrying the count it stands for.
    """

    __slots__ = ("interval_s", "_last", "_suppressed")

    def __init__(self, interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self._last: float | None = None
        self._suppressed = 0

    def allow(self, now: float) -> int | None:
        if self._last is None or now - self._last >= self.interval_s:
            suppressed, self._suppressed = self._suppressed, 0
            self._last = now
            return suppressed
        self._suppressed += 1
        return None


class RateLimitedLog:
    """Log an event at most once per ``interval_s`` per event name and key.

    ``__call__(name, level, key=..., **fields)`` logs like :func:`event`
    when allowed, with an extra ``suppressed=N`` field (occurrences since the
    last line of that name and key that were not logged); otherwise it only
    counts. ``clock`` gives monotonic seconds (injected for tests). Not
    thread-safe: use one instance per thread (the relay loop has its own).
    """

    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._limits: dict[tuple[str, str], RateLimit] = {}

    def __call__(self, name: str, level: int = logging.WARNING, /, key: str = "",
                 **fields: Any) -> bool:
        """True when a line was written (or would be, at a lower log level)."""
        limit = self._limits.get((name, key))
        if limit is None:
            limit = self._limits[(name, key)] = RateLimit(self.interval_s)
        suppressed = limit.allow(self._clock())
        if suppressed is None:
            return False
        event(name, level, **fields, suppressed=suppressed)
        return True
