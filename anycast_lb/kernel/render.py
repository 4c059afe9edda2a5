"""The kernel engine's ruleset: pure rendering of ``nft -f`` scripts (nftables 1.0.6).

Direct server return with a Maglev table (Eisenbud et al., NSDI 2016,
sections 3.3-3.4): every node computes the same function of a flow's
5-tuple, so any node forwards any packet of a flow to the same backend and
ECMP may move flows between nodes with no shared connection state. The
backend holds the VIP on ``lo`` and answers the client directly.

One ``netdev`` table, owned whole by the node, hooked at ``ingress`` on the
LAN-facing interface IFACE, or on ``forwarding.kernel.ingress`` when client
packets arrive on another (the only family with ``fwd``)::

    ingress (filter, device IFACE or the ingress interface)
      VIP . port of service i       -> jump s<i>
    s<i>
      SYN without ACK               -> delete its 5-tuple from @s<i>_flow
      5-tuple in @s<i>_flow         -> mark = its backend, goto s<i>_fwd
      mark = jhash(5-tuple) mod M seed S      (the slot)
      SYN without ACK               -> mark = @s<i>_cur[slot], goto s<i>_fwd
      anything else                 -> mark = @s<i>_prev[slot], goto s<i>_fwd
      no slot (empty table)         -> drop
    s<i>_fwd
      update @s<i>_flow { 5-tuple : mark }    (learn, or refresh the timeout)
      counter @s<i>_ctr[mark]                 (per backend: packets, bytes)
      fwd ip to @s<i>_addr[mark] device IFACE (the neighbour table gives the MAC)
      drop

A backend is named in the maps by its IPv4 address as a 32-bit mark (the
same on every node and across table changes); ``s<i>_addr`` turns it back
into the address, ``s<i>_ctr`` to its named counter ``s<i>_b<mark>``
(:func:`counter_name`). UDP has no SYN: every UDP miss uses the current table.

Traps this layout avoids (nft 1.0.6): ``jhash`` without ``seed`` draws a
random seed per rule, so nodes disagree; ``jhash ... map @m`` fails with a
datatype mismatch, hence the detour through ``meta mark``; a map declared
``typeof jhash ...`` makes ``nft list`` crash; ``mh`` is a reserved word.
``jhash ... mod M`` is ``(h * M) >> 32`` in the kernel, not ``h % M``: it
still covers 0..M-1, which is all the Maglev table needs.

Changes are diffs of map elements in one transaction (``delete element``
then ``add element`` of the changed slots; an ``add`` of an existing key
with other data aborts the transaction): never a flush on the hot path.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

TCP_TUPLE = "ip saddr . tcp sport . ip daddr . tcp dport"
UDP_TUPLE = "ip saddr . udp sport . ip daddr . udp dport"
FLOW_KEY_TYPE = "ipv4_addr . inet_service . ipv4_addr . inet_service"
# Elements per ``add element`` statement: keeps lines of a large load short.
_CHUNK = 2000
_SEED_DOMAIN = b"anycast-lb kernel jhash seed v1"


def derive_seed(vip: ipaddress.IPv4Address, port: int, protocol: str, size: int) -> int:
    """The 32-bit jhash seed of a service: a function of the shared service
    config only (VIP, port, protocol, table size), so every node given the
    same config computes the same slot for the same 5-tuple."""
    text = f"{vip}|{port}|{protocol}|{size}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=4, person=_SEED_DOMAIN[:16]).digest(),
                          "big")


def backend_mark(address: ipaddress.IPv4Address) -> int:
    """A backend's name in the maps: its address as a 32-bit integer."""
    return int(address)


def counter_name(index: int, mark: int) -> str:
    """The named nft counter of a backend of service ``index``: it counts
    the packets and bytes forwarded to it by this node, from the moment the
    backend entered the service's maps (a removed backend's counter goes)."""
    return f"s{index}_b{mark:08x}"


@dataclass(frozen=True, slots=True)
class KernelService:
    index: int
    """Position among the node's kernel services: names chains and maps ``s<index>``."""
    vip: ipaddress.IPv4Address
    port: int
    protocol: str
    """``tcp`` or ``udp``."""
    size: int
    """Maglev table size M (a prime): slots 0..M-1."""
    seed: int
    """32-bit jhash seed (:func:`derive_seed`)."""
    flow_timeout: int
    """Seconds an idle flow stays in the per-node flow map."""
    flow_map_size: int
    """Most flows the per-node flow map holds; past it new flows are not
    learned (they still follow the tables)."""

    @property
    def prefix(self) -> str:
        return f"s{self.index}"

    @property
    def tuple(self) -> str:
        return TCP_TUPLE if self.protocol == "tcp" else UDP_TUPLE


@dataclass(frozen=True, slots=True)
class KernelSettings:
    table: str
    """Name of the ``netdev`` table (validated: letters, digits, underscore)."""
    interface: str
    """The LAN-facing interface: packets leave on it for the backend (validated)."""
    services: tuple[KernelService, ...]
    ingress: str = ""
    """The interface VIP packets arrive on (the netdev ingress hook); empty:
    ``interface``."""

    @property
    def hook_device(self) -> str:
        return self.ingress or self.interface


@dataclass(frozen=True, slots=True)
class Tables:
    """What one service's maps hold.

    ``current`` and ``previous``: one backend mark per slot (length M), or
    empty when no backend is up. ``backends``: every backend the maps or a
    learned flow may name (address per mark)."""

    current: tuple[int, ...] = ()
    previous: tuple[int, ...] = ()
    backends: Mapping[int, ipaddress.IPv4Address] = field(default_factory=dict)

    @property
    def draining(self) -> bool:
        """True between :func:`start_drain` and :func:`promote`."""
        return self.current != self.previous


def marks(table: Sequence[int], addresses: Sequence[ipaddress.IPv4Address]) -> tuple[int, ...]:
    """A Maglev table of backend indexes (``maglev.build_table``) as marks."""
    by_index = [backend_mark(a) for a in addresses]
    return tuple(by_index[i] for i in table)


def steady(current: Sequence[int], backends: Iterable[ipaddress.IPv4Address]) -> Tables:
    """No drain: both tables equal. Used for start-up and health changes
    (a dead backend's flows cannot be kept, so both tables drop it)."""
    cur = tuple(current)
    return Tables(cur, cur, {backend_mark(a): a for a in backends})


def start_drain(tables: Tables, current: Sequence[int]) -> Tables:
    """A backend drains: new flows (SYN misses) use ``current``; flows that
    moved here from another node (non-SYN misses) keep the previous table,
    the same on every node. The drained backend stays addressable."""
    return Tables(tuple(current), tables.previous, tables.backends)


def promote(tables: Tables, backends: Iterable[ipaddress.IPv4Address] | None = None) -> Tables:
    """The drain ended: the current table becomes the previous one too.
    ``backends``, when given, replaces the addressable set (drop the drained one)."""
    addrs = tables.backends if backends is None else {backend_mark(a): a for a in backends}
    return Tables(tables.current, tables.current, addrs)


def _elements(verb: str, family_table: str, name: str, items: Sequence[str]) -> list[str]:
    return [
        f"{verb} element {family_table} {name} {{ {', '.join(items[i:i + _CHUNK])} }}"
        for i in range(0, len(items), _CHUNK)
    ]


def _add_backends(fam: str, svc: KernelService,
                  backends: Sequence[tuple[int, ipaddress.IPv4Address]]) -> list[str]:
    p = svc.prefix
    out = [f"add counter {fam} {counter_name(svc.index, m)}" for m, _ in backends]
    out += _elements("add", fam, f"{p}_addr", [f"{m:#x} : {a}" for m, a in backends])
    out += _elements("add", fam, f"{p}_ctr",
                     [f'{m:#x} : "{counter_name(svc.index, m)}"' for m, _ in backends])
    return out


def _slot_items(table: Sequence[int]) -> list[str]:
    return [f"{slot} : {mark:#x}" for slot, mark in enumerate(table)]


def _service_decl(s: KernelSettings, svc: KernelService) -> list[str]:
    p = svc.prefix
    syn = ["\t\ttcp flags & (syn | ack) == syn "
           f"meta mark set meta mark map @{p}_cur goto {p}_fwd"] if svc.protocol == "tcp" else []
    # A SYN starts a new connection: forget what the flow map learned for
    # an earlier one on the same 5-tuple (``update`` refreshes an entry's
    # timeout but never its backend), so a reused port follows the tables.
    forget = [f"\t\ttcp flags & (syn | ack) == syn delete @{p}_flow {{ {svc.tuple} : meta mark }}"
              ] if svc.protocol == "tcp" else []
    later = f"{p}_prev" if svc.protocol == "tcp" else f"{p}_cur"
    return [
        f"\tmap {p}_cur {{ type mark : mark; }}",
        f"\tmap {p}_prev {{ type mark : mark; }}",
        f"\tmap {p}_addr {{ type mark : ipv4_addr; }}",
        f"\tmap {p}_ctr {{ type mark : counter; }}",
        f"\tmap {p}_flow {{ type {FLOW_KEY_TYPE} : mark; size {svc.flow_map_size}; "
        f"flags dynamic,timeout; timeout {svc.flow_timeout}s; }}",
        f"\tchain {p} {{",
        *forget,
        f"\t\tmeta mark set {svc.tuple} map @{p}_flow goto {p}_fwd",
        f"\t\tmeta mark set jhash {svc.tuple} mod {svc.size} seed {svc.seed:#010x}",
        *syn,
        f"\t\tmeta mark set meta mark map @{later} goto {p}_fwd",
        "\t\tdrop",
        "\t}",
        f"\tchain {p}_fwd {{",
        f"\t\tupdate @{p}_flow {{ {svc.tuple} : meta mark }}",
        f"\t\tcounter name meta mark map @{p}_ctr",
        f'\t\tfwd ip to meta mark map @{p}_addr device "{s.interface}"',
        "\t\tdrop",
        "\t}",
    ]


def render_table(s: KernelSettings, tables: Mapping[int, Tables]) -> str:
    """Create or replace the whole table in one transaction, the maps of
    service ``i`` holding ``tables[i]`` (missing: empty). Flow maps start
    empty. Used at start and on a config change, never on a health change."""
    fam = f"netdev {s.table}"
    out = [
        f"table {fam} {{}}",
        f"delete table {fam}",
        f"table {fam} {{",
        "\tchain ingress {",
        f'\t\ttype filter hook ingress device "{s.hook_device}" priority filter; policy accept;',
        *(f"\t\tip daddr {svc.vip} {svc.protocol} dport {svc.port} jump {svc.prefix}"
          for svc in s.services),
        "\t}",
    ]
    for svc in s.services:
        out += _service_decl(s, svc)
    out.append("}")
    for svc in s.services:
        t = tables.get(svc.index, Tables())
        p = svc.prefix
        out += _add_backends(fam, svc, sorted(t.backends.items()))
        out += _elements("add", fam, f"{p}_cur", _slot_items(t.current))
        out += _elements("add", fam, f"{p}_prev", _slot_items(t.previous))
    return "\n".join(out) + "\n"


def _map_diff(fam: str, name: str, old: Sequence[int], new: Sequence[int]) -> tuple[list[str], list[str]]:
    if old is new or old == new:  # tuples compare in C: the common case costs ~0.1 ms
        return ([], [])
    gone = [str(slot) for slot in range(len(new), len(old))]
    changed = [slot for slot, (a, b) in enumerate(zip(old, new)) if a != b]
    delete = [str(slot) for slot in changed] + gone
    add = [f"{slot} : {new[slot]:#x}" for slot in changed]
    add += [f"{slot} : {new[slot]:#x}" for slot in range(len(old), len(new))]
    return (_elements("delete", fam, name, delete), _elements("add", fam, name, add))


def render_diff(s: KernelSettings, svc: KernelService, old: Tables, new: Tables) -> str:
    """One transaction taking service ``svc``'s maps from ``old`` to ``new``:
    only changed elements (slots whose backend changed, backends added or
    removed). Addresses are added first and removed last, so no slot names a
    backend the address map lacks. Empty when nothing changed.

    ``old`` must be what the kernel holds: a ``delete element`` of a
    missing element aborts the whole transaction (the kernel is then
    unchanged)."""
    fam = f"netdev {s.table}"
    p = svc.prefix
    # A mark is its address, so an address never changes under a mark.
    added = {m: a for m, a in new.backends.items() if m not in old.backends}
    removed = [m for m in old.backends if m not in new.backends]
    out = _add_backends(fam, svc, sorted(added.items()))
    for name, before, after in ((f"{p}_cur", old.current, new.current),
                                (f"{p}_prev", old.previous, new.previous)):
        delete, add = _map_diff(fam, name, before, after)
        out += delete + add
    gone = [f"{m:#x}" for m in sorted(removed)]
    out += _elements("delete", fam, f"{p}_addr", gone)
    out += _elements("delete", fam, f"{p}_ctr", gone)
    out += [f"delete counter {fam} {counter_name(svc.index, m)}" for m in sorted(removed)]
    return "\n".join(out) + "\n" if out else ""


def parse_counters(
    doc: Mapping[str, object], s: KernelSettings,
) -> dict[tuple[int, ipaddress.IPv4Address], tuple[int, int]]:
    """(packets, bytes) per (service index, backend address) from ``nft -j
    list counters table netdev T`` output; other counters are ignored."""
    names = {}
    for svc in s.services:
        names[svc.prefix] = svc.index
    out: dict[tuple[int, ipaddress.IPv4Address], tuple[int, int]] = {}
    items = doc.get("nftables", [])
    if not isinstance(items, list):
        return out
    for item in items:
        counter = item.get("counter") if isinstance(item, dict) else None
        if not isinstance(counter, dict):
            continue
        name, packets, nbytes = counter.get("name"), counter.get("packets"), counter.get("bytes")
        if not (isinstance(name, str) and isinstance(packets, int) and isinstance(nbytes, int)):
            continue
        prefix, sep, mark = name.partition("_b")
        if not sep or prefix not in names or len(mark) != 8:
            continue
        try:
            address = ipaddress.IPv4Address(int(mark, 16))
        except ValueError:
            continue
        out[(names[prefix], address)] = (packets, nbytes)
    return out


def render_delete(s: KernelSettings) -> str:
    """Remove the table if it exists (no error when it does not)."""
    return f"table netdev {s.table} {{}}\ndelete table netdev {s.table}\n"


def render_probe(table: str, device: str = "lo") -> str:
    """A throw-away table using every feature the engine needs (netdev
    ingress, jhash with a seed, maps, a dynamic map with timeouts, counters
    through a map and ``fwd``), for ``nft --check``: the kernel validates it and commits
    nothing."""
    return (
        f"table netdev {table} {{\n"
        "\tmap a { type mark : ipv4_addr; }\n"
        "\tmap n { type mark : counter; }\n"
        f"\tmap f {{ type {FLOW_KEY_TYPE} : mark; size 16; flags dynamic,timeout; timeout 1s; }}\n"
        "\tchain c {\n"
        f'\t\ttype filter hook ingress device "{device}" priority filter; policy accept;\n'
        f"\t\tmeta mark set jhash {TCP_TUPLE} mod 7 seed 0x1\n"
        f"\t\ttcp flags & (syn | ack) == syn delete @f {{ {TCP_TUPLE} : meta mark }}\n"
        f"\t\tupdate @f {{ {TCP_TUPLE} : meta mark }}\n"
        "\t\tcounter name meta mark map @n\n"
        f'\t\tfwd ip to meta mark map @a device "{device}"\n'
        "\t}\n"
        "}\n"
    )
