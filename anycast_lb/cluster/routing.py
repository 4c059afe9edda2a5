"""Policy routing and sysctls for steering: pure plans of ``ip`` commands.

A packet the nftables map marks with peer i's fwmark must leave on the node
LAN towards peer i, even though its destination (the VIP) is local here:

- table ``route_table_base + i``: ``default via PEER dev LAN onlink``;
- rule ``pref rule_priority + i fwmark MARK lookup TABLE``;
- the ``lookup local`` rule moves from priority 0 to ``rule_priority + 64``,
  below the fwmark rules (the local table would deliver the VIP here first);
- ``net.ipv4.ip_forward = 1``;
- ``rp_filter`` of the LAN interface loose (2) when strict (1) is in force:
  strict filtering drops every steered packet arriving here (source = the
  client, arriving on the LAN). The kernel uses the
  larger of ``all`` and the interface's value.

Setup adds the local rule at its new place before removing it at 0, so no
moment exists without it; teardown puts it back at 0 first. Teardown removes
only what setup added (its rules, its tables' routes) and restores only the
sysctls it changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LOCAL_SHIFT = 64
"""The moved ``lookup local`` rule sits this far below the first fwmark rule."""

Command = list[str]


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    interface: str
    peers: tuple[str, ...]
    """LAN address of each peer, by index."""
    fwmark_base: int
    table_base: int
    rule_priority: int

    @property
    def local_priority(self) -> int:
        return self.rule_priority + LOCAL_SHIFT


def _rule(s: RoutingSettings, index: int) -> Command:
    return ["pref", str(s.rule_priority + index), "fwmark", f"{s.fwmark_base + index:#x}",
            "lookup", str(s.table_base + index)]


def _has_rule(present: Sequence[Mapping[str, object]], priority: int, table: str,
              fwmark: str | None = None) -> bool:
    for rule in present:
        if (rule.get("priority") == priority and str(rule.get("table")) == table
                and rule.get("fwmark") == fwmark and rule.get("src", "all") == "all"
                and len(set(rule) - {"priority", "src", "table", "fwmark"}) == 0):
            return True
    return False


def setup_commands(s: RoutingSettings, present: Sequence[Mapping[str, object]]) -> list[Command]:
    """``ip`` argv lists that install steering routes and rules, given the
    rules present now (``ip -j rule show``): rules already there (from a
    run that crashed) are not added twice."""
    cmds: list[Command] = []
    for i, peer in enumerate(s.peers):
        cmds.append(["ip", "route", "replace", "default", "via", peer, "dev", s.interface,
                     "onlink", "table", str(s.table_base + i)])
    for i in range(len(s.peers)):
        if not _has_rule(present, s.rule_priority + i, str(s.table_base + i),
                         f"{s.fwmark_base + i:#x}"):
            cmds.append(["ip", "rule", "add", *_rule(s, i)])
    if not _has_rule(present, s.local_priority, "local"):
        cmds.append(["ip", "rule", "add", "pref", str(s.local_priority), "lookup", "local"])
    if _has_rule(present, 0, "local"):
        cmds.append(["ip", "rule", "del", "pref", "0", "lookup", "local"])
    return cmds


def teardown_commands(s: RoutingSettings, present: Sequence[Mapping[str, object]]) -> list[Command]:
    """``ip`` argv lists that undo :func:`setup_commands`."""
    cmds: list[Command] = []
    if not _has_rule(present, 0, "local"):
        cmds.append(["ip", "rule", "add", "pref", "0", "lookup", "local"])
    if _has_rule(present, s.local_priority, "local"):
        cmds.append(["ip", "rule", "del", "pref", str(s.local_priority), "lookup", "local"])
    for i in range(len(s.peers)):
        if _has_rule(present, s.rule_priority + i, str(s.table_base + i),
                     f"{s.fwmark_base + i:#x}"):
            cmds.append(["ip", "rule", "del", *_rule(s, i)])
        cmds.append(["ip", "route", "flush", "table", str(s.table_base + i)])
    return cmds


def sysctl_changes(interface: str, current: Mapping[str, int]) -> dict[str, int]:
    """Sysctl writes (key -> value) steering needs, given current values.

    Keys are paths under /proc/sys: ``net/ipv4/ip_forward``,
    ``net/ipv4/conf/all/rp_filter``, ``net/ipv4/conf/IF/rp_filter``.
    """
    out: dict[str, int] = {}
    if current.get("net/ipv4/ip_forward") != 1:
        out["net/ipv4/ip_forward"] = 1
    lan = f"net/ipv4/conf/{interface}/rp_filter"
    if max(current.get("net/ipv4/conf/all/rp_filter", 0), current.get(lan, 0)) == 1:
        out[lan] = 2  # loose: the max of all (1) and 2 is 2
    return out


def sysctl_keys(interface: str) -> tuple[str, ...]:
    return ("net/ipv4/ip_forward", "net/ipv4/conf/all/rp_filter",
            f"net/ipv4/conf/{interface}/rp_filter")
