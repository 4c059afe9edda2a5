"""Structured logs to stderr (never stdout: ExaBGP reads an API process's stdout).

Each record is one line, in one of two formats (``anycast-lb run
--log-format``):

- ``kv`` (default): ``ts=2026-11-21T21:00:00.123Z level=info
  event=health.transition service=web backend=203.0.113.130:8080 state=up``;
- ``json``: one JSON object per line with the same keys, ``{"ts": "...",
  "level": "info", "event": "health.transition", "service": "web", ...}``
  (rendered by structlog's ``ProcessorFormatter`` and ``JSONRenderer``;
  numbers and booleans stay JSON numbers and booleans, anything else is its
  ``str()``).

Event names are stable (``health.transition``, ``backend.down``,
``route.announce``, ``route.withdraw``, ``node.drain``...) so operators can
alert on them; docs/logging.md lists every one with its level and fields.
Levels: anything that withdraws a VIP (or stops serving one) is a
``warning``; a fault of the node itself is an ``error``.

Child processes (relay workers, the announcer ExaBGP runs) inherit the
format through the ``ANYCAST_LB_LOG_FORMAT`` environment variable, which
:func:`setup` reads when no format is given.

Errors that can repeat thousands of times a second (an accept loop out of
descriptors, a flood refused) go through :class:`RateLimitedLog`: one line
per interval with a ``suppressed`` count.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Literal

_LOGGER = logging.getLogger("anycast_lb")

DEBUG, INFO, WARNING, ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR

LogFormat = Literal["kv", "json"]
FORMATS: tuple[LogFormat, ...] = ("kv", "json")
FORMAT_ENV = "ANYCAST_LB_LOG_FORMAT"
"""Environment variable naming the format (``kv`` or ``json``) for
:func:`setup` calls that give none (child processes)."""
RESERVED = ("ts", "level", "event")
"""Keys every line carries; a field of the same name is renamed
``field_<name>`` so it never hides them."""


def _timestamp(created: float) -> str:
    """Epoch seconds as ISO 8601 UTC with milliseconds."""
    ms = int(created % 1 * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = getattr(record, "kv", {})
    return {f"field_{k}" if k in RESERVED else k: v for k, v in fields.items()}


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ms = int(record.msecs)
        parts = [f"ts={ts}.{ms:03d}Z", f"level={record.levelname.lower()}", f"event={record.getMessage()}"]
        parts += [f"{k}={_quote(v)}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def _record_fields(_logger: Any, _name: str,
                   event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the record's time, level, event name and fields,
    in that order (the order of the kv format)."""
    record: logging.LogRecord = event_dict["_record"]
    out: dict[str, Any] = {
        "ts": _timestamp(record.created),
        "level": record.levelname.lower(),
        "event": event_dict["event"],
        **_fields(record),
    }
    if "exc_info" in event_dict:  # taken off the record by ProcessorFormatter
        out["exc_info"] = event_dict["exc_info"]
    return out


def _plain(value: Any) -> Any:
    """JSON fallback: an address, path or enum is its ``str()``."""
    return str(value)


def json_formatter() -> logging.Formatter:
    """The ``json`` format: one JSON object per record (structlog)."""
    # Imported here, not at the top: ``import structlog`` imports its dev
    # console renderer and, through it, rich (~0.06 s of CPU), which the
    # ``kv`` format and the child processes that use it never need.
    import structlog

    return structlog.stdlib.ProcessorFormatter(
        processors=[
            _record_fields,
            structlog.processors.format_exc_info,  # exc_info -> "exception": traceback text
            structlog.processors.JSONRenderer(default=_plain),
        ],
        foreign_pre_chain=[],
    )


def formatter(fmt: LogFormat) -> logging.Formatter:
    """The formatter of ``fmt`` (``kv`` or ``json``)."""
    return json_formatter() if fmt == "json" else _KeyValueFormatter()


def setup(level: str = "info", fmt: LogFormat | None = None) -> None:
    """Send this package's logs to stderr, one line per event, as ``fmt``
    (``kv`` or ``json``; None: ``$ANYCAST_LB_LOG_FORMAT``, else ``kv``).
    Raises ValueError for an unknown format."""
    if fmt is None:
        env = os.environ.get(FORMAT_ENV, "kv") or "kv"
        if env not in FORMATS:
            raise ValueError(f"{FORMAT_ENV}={env!r}: expected one of {', '.join(FORMATS)}")
        fmt = "json" if env == "json" else "kv"
    elif fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
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
