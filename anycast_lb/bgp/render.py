"""ExaBGP API lines (pure): routes -> ``announce route`` / ``withdraw route`` text.

The lines (ExaBGP 5.x API)::

    announce route 198.51.100.10/32 next-hop self med 100 community [65100:1 65535:0] as-path [65100 65100]
    announce route 2001:db8::10/128 next-hop 2001:db8::a med 100 large-community [65100:1:2]
        extended-community [target:65100:7]   (one line on the wire)
    withdraw route 198.51.100.10/32

``next-hop self`` is the session's local address; a route of the other
family (an IPv6 VIP over IPv4 sessions, RFC 4760) names its next hop.
``community [...]``, ``large-community [...]`` (RFC 8092) and
``extended-community [...]`` (RFC 4360) appear only when there are some,
``as-path [...]`` only when ``as_path_prepend > 0`` (``local_as`` repeated
that many times; on eBGP ExaBGP puts ``local_as`` in front once more
itself). A withdraw names no next hop: ExaBGP keys its RIB by prefix, and
``next-hop self`` on a withdraw of the other family would be refused.

Each line is one API command: a newline, a control character, a bracket or
a semicolon smuggled into an attribute would end it and inject another
command, so every attribute is checked against a whitelist and
:class:`~anycast_lb.errors.UnsafeAttribute` is raised for anything else.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from anycast_lb import rules
from anycast_lb.bgp.policy import Prefix, Route, sorted_prefixes
from anycast_lb.errors import UnsafeAttribute

_MAX_U32 = rules.MAX_U32
_MAX_PREPEND = rules.MAX_AS_PATH_PREPEND
_LINE_SAFE = re.compile(r"[0-9A-Za-z .:/\[\]-]+")


def _check_int(name: str, value: object, low: int, high: int) -> int:
    try:
        return rules.check_uint(name, value, low, high)
    except ValueError as exc:
        raise UnsafeAttribute(str(exc)) from exc


def check_community(value: object) -> str:
    """Return ``value`` if it is an RFC 1997 community ``ASN:VALUE`` (0-65535 each).

    The rule is :func:`anycast_lb.rules.check_community`, the one the config
    model applies to ``bgp.announce.communities``. Raises UnsafeAttribute
    otherwise (including any control character, bracket, whitespace or
    non-ASCII digit, which could break or inject an API command).
    """
    try:
        return rules.check_community(value)
    except ValueError as exc:
        raise UnsafeAttribute(str(exc)) from exc


def check_large_community(value: object) -> str:
    """Return ``value`` if it is an RFC 8092 large community; UnsafeAttribute otherwise.

    The rule is :func:`anycast_lb.rules.check_large_community`, the one the
    config model applies to ``bgp.announce.large_communities``.
    """
    try:
        return rules.check_large_community(value)
    except ValueError as exc:
        raise UnsafeAttribute(str(exc)) from exc


def check_extended_community(value: object) -> str:
    """Return ``value`` if it is an RFC 4360 route target or origin; UnsafeAttribute otherwise.

    The rule is :func:`anycast_lb.rules.check_extended_community`, the one the
    config model applies to ``bgp.announce.extended_communities``.
    """
    try:
        return rules.check_extended_community(value)
    except ValueError as exc:
        raise UnsafeAttribute(str(exc)) from exc


def _strings(name: str, values: object, check: Callable[[object], str]) -> list[str]:
    if not isinstance(values, tuple):
        raise UnsafeAttribute(f"{name} must be a tuple, got {values!r}")
    if len(values) > rules.MAX_COMMUNITIES:
        raise UnsafeAttribute(f"{name}: at most {rules.MAX_COMMUNITIES}, got {len(values)}")
    return [check(v) for v in values]


def check_next_hop(prefix: Prefix, next_hop: object) -> str:
    """``self`` for None, else the address of the prefix's family, as text.

    Raises UnsafeAttribute for anything else (a string, or an address of the
    other family: RFC 4760 carries an IPv6 route with an IPv6 next hop).
    """
    if next_hop is None:
        return "self"
    if not isinstance(next_hop, (IPv4Address, IPv6Address)):
        raise UnsafeAttribute(f"next hop must be an IPv4Address or IPv6Address, got {next_hop!r}")
    if next_hop.version != prefix.version:
        raise UnsafeAttribute(f"next hop {next_hop} is not of the family of {prefix}")
    return str(next_hop)


def check_prefix(prefix: object) -> Prefix:
    """Return ``prefix`` if it is an ``ipaddress`` network; UnsafeAttribute otherwise.

    Strings are refused: only a parsed network is known to render safely.
    """
    if not isinstance(prefix, (IPv4Network, IPv6Network)):
        raise UnsafeAttribute(f"prefix must be an IPv4Network or IPv6Network, got {prefix!r}")
    return prefix


def _checked(line: str) -> str:
    # Defence in depth: whatever the checks above missed cannot leave here.
    if not _LINE_SAFE.fullmatch(line):
        raise UnsafeAttribute(f"refusing to emit API line {line!r}")
    return line


def announce_line(route: Route) -> str:
    """The ``announce route ...`` line for ``route`` (no trailing newline).

    Raises UnsafeAttribute if any attribute is out of range or unsafe.
    """
    prefix = check_prefix(route.prefix)
    med = _check_int("med", route.med, 0, _MAX_U32)
    prepend = _check_int("as_path_prepend", route.as_path_prepend, 0, _MAX_PREPEND)
    local_as = _check_int("local_as", route.local_as, 1, _MAX_U32)
    communities = _strings("communities", route.communities, check_community)
    large = _strings("large_communities", route.large_communities, check_large_community)
    extended = _strings(
        "extended_communities", route.extended_communities, check_extended_community
    )
    next_hop = check_next_hop(prefix, route.next_hop)
    parts = [f"announce route {prefix} next-hop {next_hop} med {med}"]
    if communities:
        parts.append(f"community [{' '.join(communities)}]")
    if large:
        parts.append(f"large-community [{' '.join(large)}]")
    if extended:
        parts.append(f"extended-community [{' '.join(extended)}]")
    if prepend:
        parts.append(f"as-path [{' '.join([str(local_as)] * prepend)}]")
    return _checked(" ".join(parts))


def withdraw_line(prefix: Prefix) -> str:
    """The ``withdraw route ...`` line for ``prefix`` (no trailing newline)."""
    return _checked(f"withdraw route {check_prefix(prefix)}")


def diff(old: Mapping[Prefix, Route], new: Mapping[Prefix, Route]) -> list[str]:
    """Lines that take ExaBGP from announcing ``old`` to announcing ``new``.

    Withdraws for prefixes gone from ``new`` first, then announces for new or
    changed routes (a BGP UPDATE replaces the previous attributes of the
    same prefix, RFC 4271 section 3.1, so a change needs no withdraw).
    Each group is in a stable prefix order. Raises UnsafeAttribute.
    """
    for prefix, route in new.items():
        if route.prefix != prefix:
            raise UnsafeAttribute(f"route for {prefix} names prefix {route.prefix}")
    lines = [withdraw_line(p) for p in sorted_prefixes(set(old) - set(new))]
    lines += [
        announce_line(new[p]) for p in sorted_prefixes(new) if old.get(p) != new[p]
    ]
    return lines


def full(routes: Mapping[Prefix, Route]) -> list[str]:
    """Announce lines for every route (the periodic safety-net refresh)."""
    return [announce_line(routes[p]) for p in sorted_prefixes(routes)]
