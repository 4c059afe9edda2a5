"""``anycast-lb status`` for people, and the end of a drain (pure).

Both read the ``GET /status`` document (:class:`anycast_lb.status.Status`,
as JSON data) and never touch a socket: the CLI fetches, these render.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _table(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def render(status: Mapping[str, Any]) -> str:
    """The status as text: a node line, one table of services (VIP,
    announcement, backends eligible/total, connections) and, per service, a
    table of backends (state, weight, admin state, active connections; a
    ``*`` marks a change made at runtime on this node only)."""
    node = status["node"]
    drain = node["drain_state"] + (" (waiting for a drain slot)" if node.get("drain_waiting")
                                   else "")
    lines = [f"node {node['name']}  drain: {drain}"
             + ("  stopping" if node.get("stopping") else "")
             + f"  config generation {status['config']['generation']}"]
    services = status["services"]
    rows = [["SERVICE", "VIP", "PROTO", "ANNOUNCEMENT", "HEALTHY", "BACKENDS", "CONNECTIONS"]]
    for s in services:
        rows.append([s["name"], f"{s['vip']}:{s['port']}", s["protocol"],
                     s.get("announcement") or "-", "yes" if s["healthy"] else "no",
                     f"{s['up_backends']}/{len(s['backends'])}", str(s["active_connections"])])
    lines += ["", *_table(rows)]
    overridden = False
    for s in services:
        rows = [["BACKEND", "STATE", "WEIGHT", "ADMIN", "CONNECTIONS", "LAST CHECK"]]
        for b in s["backends"]:
            host = f"[{b['address']}]" if ":" in b["address"] else b["address"]
            mark = "*" if b.get("runtime_override") else ""
            overridden |= bool(mark)
            rows.append([f"{host}:{b['port']}{mark}", b["state"], str(b["weight"]),
                         b.get("admin", "active"), str(b["active_connections"]),
                         b["last_detail"] or "-"])
        lines += ["", f"{s['name']}:", *_table(rows, "  ")]
    if overridden:
        lines += ["", "* drain or weight set at runtime on this node, not in its file"]
    return "\n".join(lines) + "\n"


def drain_progress(status: Mapping[str, Any]) -> tuple[bool, str]:
    """(drained, one progress line). Drained: the drain completed
    (``drain_state`` ``drained``), or the VIPs are withdrawn and no
    connection or UDP flow is left. Raises ValueError when the node is not
    draining at all (undrained meanwhile)."""
    node = status["node"]
    state = node["drain_state"]
    active = sum(int(s["active_connections"]) for s in status["services"])
    if not node["draining"] and state != "drained":
        if node.get("drain_waiting"):
            return False, "waiting for a drain slot"
        raise ValueError("the node is not draining (undrained?)")
    done = state == "drained" or (state == "withdrawn" and active == 0)
    return done, f"{state}: {active} connection(s) left"
