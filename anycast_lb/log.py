"""Structured logs to stderr (never stdout: ExaBGP reads an API process's stdout).

Each record is one line: ``ts=... level=info event=health.transition
service=web backend=203.0.113.130:8080 state=up``. Event names are stable
(``health.transition``, ``backend.down``, ``route.announce``,
``route.withdraw``, ``node.drain``...) so operators can alert on them.
"""

from __future__ import annotations

import logging
import sys
import time
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
