"""The steering ruleset: pure rendering of ``nft -f`` scripts (nftables 1.0.6).

One ``ip`` table, owned whole by the node (docs/cluster.md)::

    prerouting (filter, priority raw = -300, before conntrack)
      TCP to a VIP:port of a service -> steer
    steer
      SYN                            -> return: a new flow is ours
      from the node LAN              -> receive: never steered twice
      4-tuple in @owner              -> fwmark of its owner, return
                                        (policy routing sends it to the owner)
      only the wildcard listener     -> orphan
      any other socket of ours       -> return (established, SYN-RECV, TIME-WAIT)
      no socket at all               -> orphan
    orphan
      4-tuple in @dead               -> return: the local stack answers RST
      live peers                     -> dup to each peer (second chance), drop
      no live peer                   -> return (RST)
    receive (packets a peer steered or duplicated here)
      only the wildcard listener     -> drop: not ours, the sender asked others too
      any other socket               -> accept
      no socket                      -> drop

The ``socket wildcard`` test is true only for a listener bound to the
wildcard address, so listeners must bind 0.0.0.0 and accepted sockets are
bound to the VIP. ``socket wildcard`` does not match a half-open or TIME-WAIT
socket (they are not full sockets), hence the second ``socket transparent 0``
test. Named counters keep counting across chain rewrites (a flushed chain
loses its rule counters).

Scripts change the kernel only as one transaction: a ``delete element`` of
a missing element aborts all of it, so callers delete only what their shadow
copy holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anycast_lb.flows import FlowKey

if TYPE_CHECKING:
    from anycast_lb.cluster.ownership import MapPlan

TUPLE = "ip saddr . tcp sport . ip daddr . tcp dport"
KEY_TYPE = "ipv4_addr . inet_service . ipv4_addr . inet_service"
COUNTERS = ("steered", "second_chance", "dead_owner", "received", "refused")
"""Packets: sent to their owner by the map; duplicated to every live peer;
of a dead owner (local RST); accepted from a peer; dropped from a peer."""
# Elements per ``add element`` statement: keeps each line of a large
# rewrite short enough to read in an error message.
_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class NftSettings:
    table: str
    """Name of the ``ip`` table (validated: letters, digits, underscore)."""
    interface: str
    """The node LAN interface (validated: no quotes or spaces)."""
    services: tuple[tuple[str, int], ...]
    """(VIP, port) of every IPv4 TCP service."""
    peers: tuple[str, ...]
    """LAN address of each peer, by index (the sorted peer list)."""
    fwmark_base: int
    dead_timeout: int
    """Seconds a dead peer's flow stays in the dead set."""

    def mark(self, index: int) -> int:
        return self.fwmark_base + index


def element(key: FlowKey) -> str:
    return f"{key[0]} . {key[1]} . {key[2]} . {key[3]}"


def _orphan_rules(s: NftSettings, live: Sequence[int]) -> list[str]:
    rules = [f'{TUPLE} @dead counter name "dead_owner" return']
    if live:
        dups = " ".join(f'dup to {s.peers[i]} device "{s.interface}"' for i in live)
        rules.append(f'counter name "second_chance" {dups} drop')
    return rules


def _elements(name: str, table: str, items: Sequence[str], verb: str = "add") -> list[str]:
    return [
        f"{verb} element ip {table} {name} {{ {', '.join(items[i:i + _CHUNK])} }}"
        for i in range(0, len(items), _CHUNK)
    ]


def render_table(
    s: NftSettings, live: Sequence[int], owner: Mapping[FlowKey, int] | None = None,
) -> str:
    """Create or replace the whole table in one transaction: the steering
    chains for the ``live`` peer indexes and the map holding ``owner``
    (flow -> peer index). The dead set and the counters start empty."""
    t = s.table
    services = ", ".join(f"{vip} . {port}" for vip, port in s.services)
    out = [
        f"table ip {t} {{}}",
        f"delete table ip {t}",
        f"table ip {t} {{",
        *(f"\tcounter {name} {{}}" for name in COUNTERS),
        "\tset services { type ipv4_addr . inet_service;"
        + (f" elements = {{ {services} }};" if services else "") + " }",
        f"\tmap owner {{ type {KEY_TYPE} : mark; }}",
        f"\tset dead {{ type {KEY_TYPE}; flags timeout; timeout {s.dead_timeout}s; }}",
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        "\t\tip daddr . tcp dport @services jump steer",
        "\t}",
        "\tchain steer {",
        "\t\ttcp flags & syn == syn return",
        f'\t\tiifname "{s.interface}" goto receive',
        f'\t\tmeta mark set {TUPLE} map @owner counter name "steered" return',
        "\t\tsocket wildcard 1 goto orphan",
        "\t\tsocket transparent 0 return",
        "\t\tgoto orphan",
        "\t}",
        "\tchain orphan {",
        *(f"\t\t{rule}" for rule in _orphan_rules(s, live)),
        "\t}",
        "\tchain receive {",
        '\t\tsocket wildcard 1 counter name "refused" drop',
        '\t\tsocket transparent 0 counter name "received" accept',
        '\t\tcounter name "refused" drop',
        "\t}",
        "}",
    ]
    if owner:
        out += _elements("owner", t, [f"{element(k)} : {s.mark(i):#x}" for k, i in owner.items()])
    return "\n".join(out) + "\n"


def render_update(s: NftSettings, live: Sequence[int] | None, plan: MapPlan) -> str:
    """One transaction: the orphan chain for a new ``live`` set (None: keep
    it), then the map and dead-set changes of ``plan``. Empty when there is
    nothing to do."""
    t = s.table
    out: list[str] = []
    if live is not None:
        out.append(f"flush chain ip {t} orphan")
        out += [f"add rule ip {t} orphan {rule}" for rule in _orphan_rules(s, live)]
    if plan.delete:
        out += _elements("owner", t, [element(k) for k in plan.delete], verb="delete")
    if plan.add:
        out += _elements("owner", t, [f"{element(k)} : {s.mark(i):#x}" for k, i in plan.add])
    if plan.dead:
        out += _elements("dead", t, [element(k) for k in plan.dead])
    return "\n".join(out) + "\n" if out else ""


def render_delete(s: NftSettings) -> str:
    """Remove the table if it exists (no error when it does not)."""
    return f"table ip {s.table} {{}}\ndelete table ip {s.table}\n"


def parse_counters(doc: Mapping[str, object], names: Iterable[str] = COUNTERS) -> dict[str, int]:
    """Packet counts from ``nft -j list counters table ip T`` output."""
    wanted = set(names)
    out: dict[str, int] = {}
    items = doc.get("nftables", [])
    if not isinstance(items, list):
        return out
    for item in items:
        counter = item.get("counter") if isinstance(item, dict) else None
        name = counter.get("name") if isinstance(counter, dict) else None
        if isinstance(counter, dict) and isinstance(name, str) and name in wanted:
            packets = counter.get("packets")
            if isinstance(packets, int):
                out[str(counter["name"])] = packets
    return out
