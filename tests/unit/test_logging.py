"""Log rendering (kv unchanged, json one object per line with event, level
and fields) and docs/logging.md naming every event of the code with its
levels and fields (found by reading the source's ``log.*`` calls)."""

from __future__ import annotations

import ast
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from anycast_lb import log

ROOT = Path(__file__).resolve().parents[2]
_LEVELS = {"event": "info", "warning": "warning", "error": "error", "debug": "debug"}
_LEVEL_NAMES = {"INFO": "info", "WARNING": "warning", "ERROR": "error", "DEBUG": "debug"}


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    """What :func:`setup` writes to stderr (see :func:`setup`)."""
    logger = logging.getLogger("anycast_lb")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield io.StringIO()
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def setup(buffer: io.StringIO, level: str, fmt: log.LogFormat | None = None) -> None:
    """log.setup, its stderr handler pointed at ``buffer`` (pytest swaps
    sys.stderr between fixture setup and the test)."""
    log.setup(level, fmt)
    [handler] = logging.getLogger("anycast_lb").handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)


def test_kv_lines_are_unchanged(stderr: io.StringIO) -> None:
    setup(stderr, "debug", "kv")
    log.warning("backend.down", service="web", backend="203.0.113.130:8080",
                detail="connect refused")
    log.event("node.started", name="a", services=2, bgp=True)
    first, second = stderr.getvalue().splitlines()
    assert re.fullmatch(r'ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=warning '
                        r'event=backend\.down service=web backend=203\.0\.113\.130:8080 '
                        r'detail="connect refused"', first), first
    assert second.endswith(" level=info event=node.started name=a services=2 bgp=True")


def test_json_lines_parse_and_carry_event_level_and_fields(stderr: io.StringIO) -> None:
    import ipaddress

    setup(stderr, "debug", "json")
    log.warning("backend.down", service="web", backend="203.0.113.130:8080",
                detail='say "no"\nthen stop')
    log.event("node.started", name="a", services=2, bgp=True,
              address=ipaddress.ip_address("2001:db8::1"), level="shadowed")
    log.debug("health.overrun", service="web", skipped=1)
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 3
    down, started, overrun = (json.loads(line) for line in lines)
    assert list(down) == ["ts", "level", "event", "service", "backend", "detail"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", down["ts"])
    assert down["level"] == "warning" and down["event"] == "backend.down"
    assert down["detail"] == 'say "no"\nthen stop'
    assert started["services"] == 2 and started["bgp"] is True
    assert started["address"] == "2001:db8::1"
    assert started["level"] == "info" and started["field_level"] == "shadowed"
    assert overrun == {**overrun, "level": "debug", "event": "health.overrun", "skipped": 1}


def test_json_exception_is_text(stderr: io.StringIO) -> None:
    setup(stderr, "info", "json")
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        logging.getLogger("anycast_lb").exception("api.error")
    record = json.loads(stderr.getvalue())
    assert record["event"] == "api.error" and record["level"] == "error"
    assert "ZeroDivisionError: boom" in record["exception"]


def test_format_from_the_environment(stderr: io.StringIO,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(log.FORMAT_ENV, "json")
    setup(stderr, "info")
    log.event("announcer.start", pid=1)
    assert json.loads(stderr.getvalue())["event"] == "announcer.start"
    monkeypatch.setenv(log.FORMAT_ENV, "xml")
    with pytest.raises(ValueError, match="ANYCAST_LB_LOG_FORMAT"):
        log.setup("info")


# ---------------------------------------------------------------- the doc


def _strings(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    return []


def _levels(node: ast.expr) -> set[str]:
    if isinstance(node, ast.Attribute) and node.attr in _LEVEL_NAMES:
        return {_LEVEL_NAMES[node.attr]}
    if isinstance(node, ast.IfExp):
        return _levels(node.body) | _levels(node.orelse)
    raise AssertionError(f"level not understood: {ast.unparse(node)}")


def code_events() -> dict[str, tuple[set[str], set[str]]]:
    """event name -> (levels, field names) over every ``log.event/warning/
    error/debug`` call and every rate-limited log call (``*shed_log(...)``)."""
    found: dict[str, tuple[set[str], set[str]]] = {}
    for path in sorted((ROOT / "anycast_lb").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            func = node.func
            if isinstance(func.value, ast.Name) and func.value.id == "log" \
                    and func.attr in _LEVELS:
                levels = ({_LEVELS[func.attr]} if func.attr != "event" or len(node.args) < 2
                          else _levels(node.args[1]))
                fields = {k.arg for k in node.keywords if k.arg}
            elif func.attr.endswith("shed_log"):
                levels = {"warning"} if len(node.args) < 2 else _levels(node.args[1])
                fields = {k.arg for k in node.keywords if k.arg and k.arg != "key"}
                fields |= {"suppressed"}
                if any(k.arg is None for k in node.keywords):
                    fields.add("error")  # **({"error": detail} if detail else {})
            else:
                continue
            names = _strings(node.args[0]) if node.args else []
            assert names, f"{path}:{node.lineno}: event name is not a literal"
            for name in names:
                have = found.setdefault(name, (set(), set()))
                have[0].update(levels)
                have[1].update(fields)
    return found


def doc_events() -> dict[str, tuple[set[str], set[str]]]:
    """docs/logging.md's table rows: | `event` | levels | fields | ..."""
    rows: dict[str, tuple[set[str], set[str]]] = {}
    for line in (ROOT / "docs/logging.md").read_text().splitlines():
        m = re.match(r"\|\s*`([a-z_]+\.[a-z_]+)`\s*\|([^|]*)\|([^|]*)\|", line)
        if m:
            levels = set(re.findall(r"debug|info|warning|error", m.group(2)))
            fields = set(re.findall(r"`([a-z_]+)`", m.group(3)))
            rows[m.group(1)] = (levels, fields)
    return rows


def test_every_event_is_documented_with_its_levels_and_fields() -> None:
    code, doc = code_events(), doc_events()
    assert len(code) > 80
    assert code.keys() - doc.keys() == set(), "events not in docs/logging.md"
    assert doc.keys() - code.keys() == set(), "docs/logging.md names events no code logs"
    for name, (levels, fields) in code.items():
        assert doc[name][0] == levels, (name, levels, doc[name][0])
        assert fields <= doc[name][1], (name, fields - doc[name][1])


def test_withdraws_and_unhealthy_are_warnings() -> None:
    code = code_events()
    assert code["route.withdraw"][0] == {"warning"}
    assert code["route.withdraw_all"][0] == {"warning"}
    assert code["node.drain_withdraw"][0] == {"warning"}
    assert code["service.unhealthy"][0] == {"warning"}
    assert code["backend.down"][0] == {"warning"}
