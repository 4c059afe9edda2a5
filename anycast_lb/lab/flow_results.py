"""Figures and a verdict for a long-lived flow scenario (pure, no I/O).

Inputs: the flow client's JSON (:mod:`anycast_lb.lab.flows`), the event time
and the FIB changes seen by the poller (seconds from the client's ``t0``),
the victim node, and which node owns each flow (the backend-LAN address the
backend saw). A flow is *established* once the backend's greeting arrived;
it is *broken* when it fails afterwards (RST, FIN, hang or a wrong echo)
before the run ends. Times in results are milliseconds from the event.

Owner split: the victim's own flows vs *collateral* (flows owned by other
nodes). In ``node-kill`` and ``node-silent`` the victim's flows cannot
survive (a terminating proxy died with them); what matters is that their
clients learn it fast (a RST or FIN, not a hang) and that no other node's
flow breaks.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

from anycast_lb.lab.results import converged_at

CLOSED_KINDS = frozenset({"reset", "eof"})
"""Failures a client sees as the connection ending (not a hang)."""


@dataclass(frozen=True)
class FlowTarget:
    """What a flow scenario must show to pass."""

    min_established: int = 300
    """Established flows needed for the run to count."""
    max_broken: int | None = None
    """Established flows that may break (None: not checked)."""
    zero_collateral: bool = False
    """No flow owned by a node other than the victim may break."""
    dead_owner_reset_ms: float | None = None
    """Every flow of the (dead) victim must end with a RST or FIN within this
    many ms of the event (None: not checked)..."""
    dead_owner_may_hang: bool = False
    """...and none may hang first (go ``hang`` s without an echo), unless
    this is set: without BFD the router keeps sending a silent node's flows
    to it for the whole hold time, and no node can answer them."""
    fib_within_ms: float = 10_000.0
    """The FIB must reach the expected next hops within this (the event
    really happened)."""
    churn: bool = False
    """Flows must have opened in the second before the FIB change and in
    the second after it (they were opening during the event)."""
    text: str = ""


def _ms(seconds: float, event_s: float) -> float:
    return round((seconds - event_s) * 1000, 1)


def _owner(flow: dict[str, Any], node_of_peer: dict[str, str]) -> str:
    peer = str(flow.get("peer") or "")
    return node_of_peer.get(peer, peer or "?")


def end_time(flow: dict[str, Any]) -> float | None:
    """When the client learned its connection was gone (s from t0): the RST
    or FIN, also one that came after a hang; None if it never did."""
    if flow.get("kind") in CLOSED_KINDS:
        return float(flow["failed_s"])
    if flow.get("kind") == "hang" and flow.get("late_kind") in CLOSED_KINDS:
        return float(flow["late_s"])
    return None


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None, "min": None}
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1),
            "min": round(min(values), 1)}


def analyse(scenario: str, traffic: dict[str, Any], event_s: float,
            changes: list[tuple[float, list[str]]], expected: list[str], victim: str,
            victim_dies: bool, node_of_peer: dict[str, str], node_of_hop: dict[str, str],
            target: FlowTarget) -> dict[str, Any]:
    """The result.json figures and pass/fail of one flow scenario run."""
    flows: list[dict[str, Any]] = traffic["flows"]
    established = [f for f in flows if f["open_s"] is not None]
    broken = [f for f in established if f["failed_s"] is not None]
    open_failed = [f for f in flows if f["open_s"] is None]
    victims = [f for f in established if _owner(f, node_of_peer) == victim]
    collateral = [f for f in broken if _owner(f, node_of_peer) != victim]
    result: dict[str, Any] = {
        "scenario": scenario,
        "victim": victim,
        "event_at": round(event_s, 4),
        "flows_total": len(flows),
        "established_total": len(established),
        "established_by_node": dict(sorted(Counter(
            _owner(f, node_of_peer) for f in established).items())),
        "established_broken": len(broken),
        "broken_by_node": dict(sorted(Counter(_owner(f, node_of_peer) for f in broken).items())),
        "victim_flows": len(victims),
        "victim_broken": sum(1 for f in victims if f["failed_s"] is not None),
        "collateral_broken": len(collateral),
        "failure_kinds": dict(Counter(f["kind"] for f in broken)),
        "broken_before_event": sum(1 for f in broken if f["failed_s"] < event_s),
        "open_failed": len(open_failed),
        "open_failure_kinds": dict(Counter(f["open_error"] for f in open_failed)),
        "opened_after_event": sum(1 for f in established if f["open_s"] >= event_s),
        "opening_at_event": sum(1 for f in flows if f["connect_s"] < event_s
                                and (f["open_s"] is None or f["open_s"] >= event_s)),
    }
    times = [_ms(f["failed_s"], event_s) for f in broken]
    result["first_break_ms"] = min(times, default=None)
    result["last_break_ms"] = max(times, default=None)
    conv = converged_at(changes, event_s, expected)
    result["fib_converged_ms"] = None if conv is None else _ms(conv, event_s)
    # Churn: flows whose handshake was under way when the ECMP set changed,
    # and flows opened within a second before and after it.
    result["opening_at_fib_change"] = None if conv is None else sum(
        1 for f in flows if f["connect_s"] < conv
        and (f["open_s"] is None or f["open_s"] >= conv))
    result["opened_1s_before_fib_change"] = None if conv is None else sum(
        1 for f in established if conv - 1.0 <= f["open_s"] < conv)
    result["opened_1s_after_fib_change"] = None if conv is None else sum(
        1 for f in established if conv <= f["open_s"] < conv + 1.0)
    # The longest wait between two echoes of a flow that did not break
    # (nominal: the client's interval); a moved flow waits for TCP's
    # retransmission on top of it.
    survivors = [f for f in established if f["failed_s"] is None and f.get("max_gap_s")]
    longest = max(survivors, key=lambda f: f["max_gap_s"], default=None)
    result["longest_gap_ms"] = None if longest is None else round(longest["max_gap_s"] * 1000, 1)
    result["longest_gap_at_ms"] = (None if longest is None or longest.get("max_gap_at_s") is None
                                   else _ms(longest["max_gap_at_s"], event_s))
    # The longest gap the event caused: one overlapping the time from the
    # event to 1 s after the FIB settled (3 s after the event if it never did).
    window_end = (conv + 1.0) if conv is not None else event_s + 3.0

    def caused(t: float, g: float) -> bool:
        return t >= event_s and t - g <= window_end

    at_event = [g for f in survivors for t, g in f.get("slow", []) if caused(t, g)]
    result["longest_gap_at_event_ms"] = round(max(at_event) * 1000, 1) if at_event else None
    result["flows_slowed_at_event"] = sum(
        1 for f in survivors if any(caused(t, g) for t, g in f.get("slow", [])))
    gaps = sorted(f["max_gap_s"] * 1000 for f in survivors)
    result["flows_gap_over_500ms"] = sum(1 for g in gaps if g > 500)
    result["established_by_backend"] = dict(sorted(Counter(
        str(f.get("backend") or "?") for f in established).items()))
    result["fib_changes"] = [{"ms": _ms(t, event_s),
                              "nexthops": [node_of_hop.get(h, h) for h in hops]}
                             for t, hops in changes]
    checks: dict[str, bool] = {
        "enough_established": len(established) >= target.min_established,
        "fib_changed": (result["fib_converged_ms"] is not None
                        and result["fib_converged_ms"] <= target.fib_within_ms),
    }
    if target.churn:
        checks["opening_across_fib_change"] = bool(
            result["opened_1s_before_fib_change"] and result["opened_1s_after_fib_change"])
    if victim_dies:
        # Only flows the victim owned when it died: one opened later went elsewhere.
        owned = [f for f in victims if f["open_s"] < event_s]
        ends = [_ms(t, event_s) for f in owned if (t := end_time(f)) is not None]
        result["dead_owner_flows"] = len(owned)
        result["dead_owner_closed"] = len(ends)
        result["dead_owner_hang"] = sum(1 for f in owned if f["kind"] == "hang")
        result["dead_owner_never_ended"] = sum(1 for f in owned if end_time(f) is None)
        result["dead_owner_end_kinds"] = dict(Counter(
            f["kind"] if f["kind"] != "hang" else f"hang+{f['late_kind'] or 'none'}"
            for f in owned))
        result["dead_owner_reset_ms"] = _stats(ends)
        if target.dead_owner_reset_ms is not None:
            checks["dead_owner_reset_fast"] = (
                bool(owned) and len(ends) == len(owned)
                and (target.dead_owner_may_hang or result["dead_owner_hang"] == 0)
                and max(ends) <= target.dead_owner_reset_ms)
    if target.max_broken is not None:
        checks["broken_within_target"] = len(broken) <= target.max_broken
    if target.zero_collateral:
        checks["zero_collateral"] = not collateral
    result["target"] = target.text
    result["checks"] = checks
    result["pass"] = all(checks.values())
    return result
