"""The node <-> announcer socket protocol and ExaBGP's stdin lines (pure).

Node <-> announcer: JSON objects, one per line (UTF-8, ``\\n``-terminated),
over a UNIX stream socket the node listens on (``run_dir/announcer.sock``);
the announcer connects.

node -> announcer, on every change of the route set and at least every
0.2 s as a heartbeat (same ``seq`` while the set is unchanged)::

    {"type": "routes", "seq": 7,
     "routes": [{"prefix": "198.51.100.10/32", "med": 100,
                 "communities": ["65100:1"], "as_path_prepend": 0,
                 "local_as": 65100}],
                 # and, only when set: "large_communities": ["65100:1:2"],
                 # "extended_communities": ["target:65100:7"],
                 # "next_hop": "2001:db8::a" (absent: next-hop self)
     "withdrawn": ["198.51.100.11/32"]}

``routes`` is the complete set to announce; anything else is withdrawn.
``withdrawn`` (optional) names prefixes the node knows and does not want
announced: an announcer that does not know what ExaBGP holds (it just
started, perhaps respawned by ExaBGP after a crash) withdraws them
explicitly.

announcer -> node::

    {"type": "peer", "address": "203.0.113.5", "state": "up"}   # or down, connected
    {"type": "ack", "seq": 7, "ok": true}
    {"type": "alive"}

``peer`` relays ExaBGP's neighbor-changes (sent for every peer again after
each connect); ``ack`` says ExaBGP answered every line for ``seq`` (``ok``
false if it answered ``error`` or did not answer in time). Acks are sent once
per seq per connection. ``alive`` says ExaBGP just answered an API line (at
most one every 0.25 s; the announcer asks at least every second): the node's
BGP view is confirmed only while these keep coming
(:mod:`anycast_lb.bgp.liveness`).

ExaBGP -> announcer stdin: ``done`` / ``error`` / ``shutdown`` (text acks,
or their JSON form ``{"answer": "done", ...}``) interleaved with JSON
messages such as ``{"exabgp": "5.0.0", "type": "state", "neighbor":
{"address": {"local": ..., "peer": ...}, "state": "up", ...}}``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from anycast_lb.bgp.policy import Prefix, Route, sorted_prefixes
from anycast_lb.bgp.render import (
    announce_line,
    check_community,
    check_extended_community,
    check_large_community,
    check_prefix,
)
from anycast_lb.errors import AnnouncerError

PEER_STATES = frozenset({"up", "down", "connected"})


class WireError(AnnouncerError):
    """A line on the node socket is not a valid protocol message."""


@dataclass(frozen=True)
class RoutesMessage:
    seq: int
    routes: dict[Prefix, Route]
    withdrawn: frozenset[Prefix]


@dataclass(frozen=True)
class PeerMessage:
    address: str
    state: str


@dataclass(frozen=True)
class AckMessage:
    seq: int
    ok: bool


@dataclass(frozen=True)
class AliveMessage:
    """ExaBGP answered the announcer just now."""


@dataclass(frozen=True)
class ExaAnswer:
    """ExaBGP's answer to one command: ``done`` (ok), ``error`` (not ok)."""

    ok: bool


@dataclass(frozen=True)
class ExaShutdown:
    """ExaBGP says it is shutting down."""


ExaLine = ExaAnswer | ExaShutdown | PeerMessage | None


def _dumps(obj: object) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n").encode()


def route_to_json(route: Route) -> dict[str, object]:
    out: dict[str, object] = {
        "prefix": str(route.prefix),
        "med": route.med,
        "communities": list(route.communities),
        "as_path_prepend": route.as_path_prepend,
        "local_as": route.local_as,
    }
    if route.large_communities:
        out["large_communities"] = list(route.large_communities)
    if route.extended_communities:
        out["extended_communities"] = list(route.extended_communities)
    if route.next_hop is not None:
        out["next_hop"] = str(route.next_hop)
    return out


def encode_routes(
    seq: int, routes: Mapping[Prefix, Route], withdrawn: Iterable[Prefix] = ()
) -> bytes:
    return _dumps({
        "type": "routes",
        "seq": seq,
        "routes": [route_to_json(routes[p]) for p in sorted_prefixes(routes)],
        "withdrawn": [str(p) for p in sorted_prefixes(set(withdrawn) - set(routes))],
    })


def encode_peer(address: str, state: str) -> bytes:
    return _dumps({"type": "peer", "address": address, "state": state})


def encode_ack(seq: int, ok: bool) -> bytes:
    return _dumps({"type": "ack", "seq": seq, "ok": ok})


def encode_alive() -> bytes:
    return _dumps({"type": "alive"})


def _object(line: bytes | str) -> dict[str, object]:
    try:
        obj: object = json.loads(line)
    except (ValueError, RecursionError) as exc:  # nested deeper than the interpreter's stack
        raise WireError(f"not JSON: {line[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise WireError(f"not a JSON object: {line[:200]!r}")
    return {str(k): v for k, v in obj.items()}


def _int(obj: Mapping[str, object], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"{key} must be an integer, got {value!r}")
    return value


def _prefix(value: object) -> Prefix:
    if not isinstance(value, str):
        raise WireError(f"prefix must be a string, got {value!r}")
    try:
        return check_prefix(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise WireError(f"bad prefix {value!r}: {exc}") from exc


def _next_hop(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise WireError(f"next_hop must be a string, got {value!r}")
    try:
        return ipaddress.ip_address(value)
    except ValueError as exc:
        raise WireError(f"bad next_hop {value!r}: {exc}") from exc


def _route(obj: object) -> Route:
    if not isinstance(obj, dict):
        raise WireError(f"route must be an object, got {obj!r}")
    fields = {str(k): v for k, v in obj.items()}
    communities = fields.get("communities", [])
    if not isinstance(communities, list):
        raise WireError(f"communities must be a list, got {communities!r}")
    large = fields.get("large_communities", [])
    extended = fields.get("extended_communities", [])
    if not isinstance(large, list) or not isinstance(extended, list):
        raise WireError(f"large_communities and extended_communities must be lists, "
                        f"got {large!r}, {extended!r}")
    route = Route(
        prefix=_prefix(fields.get("prefix")),
        med=_int(fields, "med"),
        communities=tuple(check_community(c) for c in communities),
        as_path_prepend=_int(fields, "as_path_prepend"),
        local_as=_int(fields, "local_as"),
        large_communities=tuple(check_large_community(c) for c in large),
        extended_communities=tuple(check_extended_community(c) for c in extended),
        next_hop=_next_hop(fields.get("next_hop")),
    )
    announce_line(route)  # every attribute checked once, here
    return route


def decode_node_message(line: bytes | str) -> RoutesMessage:
    """Parse one node -> announcer line. Raises WireError (or UnsafeAttribute)."""
    obj = _object(line)
    if obj.get("type") != "routes":
        raise WireError(f"unknown message type {obj.get('type')!r}")
    seq = _int(obj, "seq")
    raw_routes = obj.get("routes")
    if not isinstance(raw_routes, list):
        raise WireError("routes must be a list")
    routes: dict[Prefix, Route] = {}
    for raw in raw_routes:
        route = _route(raw)
        if route.prefix in routes:
            raise WireError(f"prefix {route.prefix} listed twice")
        routes[route.prefix] = route
    raw_withdrawn = obj.get("withdrawn", [])
    if not isinstance(raw_withdrawn, list):
        raise WireError("withdrawn must be a list")
    withdrawn = frozenset(_prefix(p) for p in raw_withdrawn) - set(routes)
    return RoutesMessage(seq=seq, routes=routes, withdrawn=withdrawn)


def decode_announcer_message(line: bytes | str) -> PeerMessage | AckMessage | AliveMessage:
    """Parse one announcer -> node line. Raises WireError."""
    obj = _object(line)
    kind = obj.get("type")
    if kind == "alive":
        return AliveMessage()
    if kind == "ack":
        ok = obj.get("ok", True)
        return AckMessage(seq=_int(obj, "seq"), ok=ok is True)
    if kind == "peer":
        address, state = obj.get("address"), obj.get("state")
        # isinstance first: a JSON list or object is unhashable (TypeError).
        if not isinstance(address, str) or not isinstance(state, str) or state not in PEER_STATES:
            raise WireError(f"bad peer message {line[:200]!r}")
        return PeerMessage(address=address, state=str(state))
    raise WireError(f"unknown message type {kind!r}")


def classify_exabgp_line(line: str) -> ExaLine:
    """What one line ExaBGP wrote to the API process's stdin means.

    Returns ExaAnswer for an ack, ExaShutdown, PeerMessage for a
    neighbor-changes ``state`` message, None for anything else (other JSON
    messages, blank lines). Never raises.
    """
    text = line.strip()
    if text in ("done", "error"):
        return ExaAnswer(ok=text == "done")
    if text == "shutdown":
        return ExaShutdown()
    if not text.startswith("{"):
        return None
    try:
        obj = _object(text)
    except WireError:
        return None
    answer = obj.get("answer")
    if answer in ("done", "error"):
        return ExaAnswer(ok=answer == "done")
    if answer == "shutdown" or obj.get("notification") == "shutdown":
        return ExaShutdown()
    if obj.get("type") != "state":
        return None
    neighbor = obj.get("neighbor")
    if not isinstance(neighbor, dict):
        return None
    address = neighbor.get("address")
    peer = address.get("peer") if isinstance(address, dict) else None
    state = neighbor.get("state")
    if isinstance(peer, str) and isinstance(state, str) and state in PEER_STATES:
        return PeerMessage(address=peer, state=state)
    return None
