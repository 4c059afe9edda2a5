"""Reading a config file into plain data: bounded, strict YAML.

What a file must be, each refused with one ConfigError line that names
the place (``line N`` and, where there is one, the field path):

- at most :data:`MAX_BYTES` (1 MiB), read with a bounded read (a FIFO or
  ``/dev/zero`` cannot make it read forever);
- UTF-8 (a BOM is allowed); the first bad byte's offset and line are named;
- one YAML document, safe tags only (no Python objects);
- no mapping with the same key twice (PyYAML would keep the last one
  silently; YAML 1.2 section 3.2.1.1 requires keys to be unique); merge
  keys (``<<: *base``) may still be overridden;
- at most :data:`MAX_DEPTH` (64) nested collections, and at most
  :data:`MAX_NODES` nodes once aliases are expanded (a few lines of
  aliases can otherwise stand for billions of nodes); an alias to a
  collection that is still open (a recursive structure) is refused.

Depth and aliases are checked on the event stream before anything is
built, so a hostile file costs one linear pass. libyaml (``CSafeLoader``)
is used when PyYAML was built with it; the pure-Python loader otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from anycast_lb.errors import ConfigError

MAX_BYTES = 1024 * 1024
"""Largest config file, in bytes."""
MAX_DEPTH = 64
"""Most nested mappings and sequences."""
MAX_NODES = 1_000_000
"""Most scalars and collections in the document once aliases are expanded."""

_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(_SafeLoader):  # type: ignore[misc, valid-type]
    """Safe loader that refuses duplicate keys and turns value errors into YAML errors."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, ArithmeticError, LookupError, TypeError, AttributeError) as exc:
            # PyYAML's scalar constructors fail this way on bad values:
            # `2001-13-45` (month 13), `!!int x`, `!!int ''` (IndexError),
            # `!!timestamp x` (AttributeError).
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read value: {exc}", node.start_mark
            ) from exc

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue  # collection keys: the base class refuses them (unhashable)
                key = self.construct_object(key_node)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


_PLAIN_KEY = re.compile("[A-Za-z_][A-Za-z0-9_-]*")


def field_path(parts: Sequence[int | str]) -> str:
    """``services[0].backends[1].port``; a key that is not a plain ASCII word is
    quoted (``'a\\nb'``), so no key can break the one-line message."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + (part if _PLAIN_KEY.fullmatch(part) else repr(part))
    return out or "(top level)"


class _Refused(Exception):
    """The document breaks a limit; the message names the field path and line."""


class _Frame:
    __slots__ = ("anchor", "index", "is_mapping", "key", "loc", "start")

    def __init__(self, loc: int | str | None, is_mapping: bool, anchor: str | None, start: int):
        self.loc = loc
        self.is_mapping = is_mapping
        self.anchor = anchor
        self.start = start
        self.index = 0  # sequence: next item's index; mapping: items seen (keys and values)
        self.key = "?"


def _scan(text: str) -> None:
    """Check depth, expanded size and aliases on the event stream.

    Raises _Refused with the field path and line, or yaml.YAMLError.
    """
    stack: list[_Frame] = []
    sizes: dict[str, int] = {}
    open_anchors: set[str] = set()
    nodes = 0
    for event in yaml.parse(text, Loader=_SafeLoader):
        if not isinstance(event, (yaml.NodeEvent, yaml.CollectionEndEvent)):
            continue
        line = event.start_mark.line + 1 if event.start_mark else 0
        if isinstance(event, yaml.CollectionEndEvent):
            frame = stack.pop()
            if frame.anchor is not None:
                open_anchors.discard(frame.anchor)
                sizes[frame.anchor] = nodes - frame.start
            continue
        # Where this node sits in its parent.
        loc: int | str | None = None
        if stack:
            parent = stack[-1]
            if parent.is_mapping:
                if parent.index % 2 == 0:  # a key
                    parent.key = event.value if isinstance(event, yaml.ScalarEvent) else "?"
                else:
                    loc = parent.key
            else:
                loc = parent.index
            parent.index += 1
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in open_anchors:
                raise _Refused(f"{_path(stack, loc)}: alias *{event.anchor} refers to a "
                                 f"collection that contains it (line {line})")
            nodes += sizes.get(event.anchor or "", 1)
        else:
            nodes += 1
            anchor = event.anchor
            if isinstance(event, yaml.CollectionStartEvent):
                stack.append(_Frame(loc, isinstance(event, yaml.MappingStartEvent), anchor, nodes))
                if anchor is not None:
                    open_anchors.add(anchor)
                if len(stack) > MAX_DEPTH:
                    raise _Refused(f"{_path(stack[:-1], loc)}: nested deeper than "
                                     f"{MAX_DEPTH} levels (line {line})")
            elif anchor is not None:
                sizes[anchor] = 1
        if nodes > MAX_NODES:
            raise _Refused(f"{_path(stack, loc)}: more than {MAX_NODES} values once "
                             f"aliases are expanded (line {line})")


def _path(stack: list[_Frame], loc: int | str | None) -> str:
    parts = [f.loc for f in stack if f.loc is not None]
    return field_path(parts + ([loc] if loc is not None else []))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "invalid"
        return f"not valid YAML: {where}{what}"
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character  # an int from libyaml, a str from the pure-Python reader
        char = chr(char) if isinstance(char, int) else char
        return f"not valid YAML: character {char!r} at offset {exc.position} is not allowed"
    return f"not valid YAML: {' '.join(str(exc).split())}"


def parse_yaml(data: bytes, source: str = "<config>") -> Any:
    """Plain data (dicts, lists, scalars) from the bytes of a YAML document.

    Raises ConfigError (one line) for anything in the module docstring's list.
    """
    if len(data) > MAX_BYTES:
        raise ConfigError(source, [f"(file): larger than {MAX_BYTES} bytes (1 MiB)"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(source, [
            f"(file): not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line})"
        ]) from exc
    try:
        _scan(text)
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_yaml_problem(exc)]) from exc
    except _Refused as exc:
        raise ConfigError(source, [str(exc)]) from exc
    except ValueError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc


def load_yaml(path: Path) -> Any:
    """Read ``path`` (at most :data:`MAX_BYTES` + 1 bytes) and :func:`parse_yaml` it.

    Raises ConfigError for an unreadable file too.
    """
    try:
        with path.open("rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror or exc}"]) from exc
    except ValueError as exc:  # a NUL in the path
        raise ConfigError(str(path), [f"cannot read: {exc}"]) from exc
    return parse_yaml(data, str(path))
