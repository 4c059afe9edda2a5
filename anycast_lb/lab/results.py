"""Turn a scenario's raw records into figures and a verdict (pure, no I/O).

Inputs: the traffic client's JSON (see :mod:`anycast_lb.lab.traffic`), the
FIB changes seen by the poller (``[(seconds from t0, sorted next hops)]``),
the event time (seconds from t0) and the next hop set the FIB should end
with. Times in results are milliseconds from the event unless named ``_s``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

WINDOW_S = 0.010


@dataclass(frozen=True)
class Target:
    """What a scenario must show to pass."""

    fib_converged_ms: float | None = None
    """Upper bound for the FIB to reach the expected set (None: not checked)."""
    zero_new_failures: bool = False
    """No new connection may fail at all (drain, backend-fail)."""
    lost_with_backend: str | None = None
    """Backend killed by the scenario: a connection it had already answered
    (greeting received) before the event dies with it, as with any
    terminating proxy, and is not held against ``zero_new_failures``."""
    forgive_ecmp_change: bool = False
    """Plain anycast: a connection whose handshake straddled a FIB change
    (started within ``WINDOW_S`` of it) may fail; hash-threshold ECMP moves
    some flows between the nodes that stay (it is not consistent hashing), and only flow
    survival keeps them. Not held against ``zero_new_failures``."""
    fib_unchanged: bool = False
    """The router must keep every next hop throughout (backend-fail)."""
    ecmp_tolerance: float | None = None
    """Each node's share within this fraction of even (ecmp)."""
    min_new_success: float | None = None
    """Share of new connections that must succeed (0.99: 99 %), instead of
    the "no failure after convergence" checks (floods, forged sync)."""
    text: str = ""


def windows(rows: list[list[Any]], width_s: float = WINDOW_S) -> dict[int, list[int]]:
    """Window index (start // width) -> [ok, failed] of new connections."""
    out: dict[int, list[int]] = {}
    for row in rows:
        cell = out.setdefault(math.floor(row[0] / width_s), [0, 0])
        cell[0 if row[2] else 1] += 1
    return out


def spread(rows: list[list[Any]], node_of: dict[str, str], until_s: float | None = None
           ) -> dict[str, int]:
    """Successful new connections per node (by the backend-LAN peer address)."""
    counts: Counter[str] = Counter()
    for row in rows:
        if row[2] and (until_s is None or row[0] < until_s):
            counts[node_of.get(row[3], row[3] or "?")] += 1
    return dict(sorted(counts.items()))


def max_deviation(counts: dict[str, int], n_nodes: int) -> float:
    """Largest relative deviation of a node's count from an even share
    (0.05 = 5 %); nodes with no connection count as -100 %."""
    total = sum(counts.values())
    if total == 0 or n_nodes == 0:
        return 1.0
    even = total / n_nodes
    values = list(counts.values()) + [0] * max(0, n_nodes - len(counts))
    return max(abs(v - even) / even for v in values)


def converged_at(changes: list[tuple[float, list[str]]], event_s: float,
                 expected: list[str]) -> float | None:
    """First time (s from t0) at or after the event from which the FIB holds
    ``expected`` and keeps it until the end of the record; None if never."""
    result: float | None = None
    for t, hops in changes:
        if sorted(hops) == sorted(expected):
            if result is None:
                result = max(t, event_s)
        else:
            result = None
    return result


def analyse(scenario: str, traffic: dict[str, Any], changes: list[tuple[float, list[str]]],
            event_s: float | None, expected: list[str], all_hops: list[str],
            node_of_peer: dict[str, str], node_of_hop: dict[str, str], n_nodes: int,
            target: Target) -> dict[str, Any]:
    """The result.json figures and pass/fail for one scenario run."""
    rows: list[list[Any]] = traffic["new"]
    longs: list[dict[str, Any]] = traffic["long"]
    failed = [r for r in rows if not r[2]]
    lost = [r for r in failed if target.lost_with_backend is not None and event_s is not None
            and r[4] == target.lost_with_backend and r[0] < event_s]
    at_change = [r for r in failed if r not in lost and event_s is not None and any(
        t >= event_s and r[0] - WINDOW_S <= t <= r[0] + r[1] / 1000 + WINDOW_S
        for t, _ in changes)]
    forgiven = lost + (at_change if target.forgive_ecmp_change else [])
    counted = [r for r in failed if r not in forgiven]
    result: dict[str, Any] = {"scenario": scenario, "event_at": event_s,
                              "new_connections_total": len(rows),
                              "new_connections_failed": len(failed),
                              "failure_kinds": dict(Counter(r[5] for r in failed)),
                              # Failed after the backend's greeting: the flow
                              # was up, then moved by an ECMP change.
                              "new_failed_in_flight": sum(1 for r in failed if r[4]),
                              "failed_answered_by_killed_backend": len(lost),
                              "failed_at_ecmp_change": len(at_change)}
    established = [c for c in longs if c["established"]]
    broken = [c for c in established if c["broken_at"] is not None]
    result["established_total"] = len(established)
    result["established_broken"] = len(broken)
    result["established_broken_by_node"] = dict(Counter(
        node_of_peer.get(c["peer"], c["peer"]) for c in broken))
    result["established_by_node"] = dict(Counter(
        node_of_peer.get(c["peer"], c["peer"]) for c in established))
    result["ecmp_spread"] = spread(rows, node_of_peer, event_s)
    result["ecmp_max_deviation_pct"] = round(100 * max_deviation(
        result["ecmp_spread"], n_nodes), 1)
    result["fib_changes"] = [{"ms": None if event_s is None else round((t - event_s) * 1000, 1),
                              "nexthops": [node_of_hop.get(h, h) for h in hops]}
                             for t, hops in changes]
    checks: dict[str, bool] = {}
    if event_s is None:
        result["fib_converged_ms"] = None
        result["all_new_ok_after_ms"] = None
        result["failed_after_converged"] = len(counted)
    else:
        conv = converged_at(changes, event_s, expected) if expected != all_hops else None
        result["fib_converged_ms"] = None if conv is None else round((conv - event_s) * 1000, 1)
        # A connection counts against the event if it was still open at the
        # event (started before it, failed after it): one opened 0.1 ms
        # before a SIGSTOP hangs because of the SIGSTOP.
        after = [r for r in counted if r[0] + r[1] / 1000 >= event_s]
        result["new_failed_before_event"] = len(counted) - len(after)
        last = max((r[0] for r in after), default=None)
        # Every new connection started after this point succeeded; measured to
        # the end of the window holding the last failure.
        result["all_new_ok_after_ms"] = 0.0 if last is None else round(
            (math.floor(last / WINDOW_S) + 1) * WINDOW_S * 1000 - event_s * 1000, 1)
        horizon = None if conv is None else conv + WINDOW_S
        result["failed_after_converged"] = (len(after) if horizon is None
                                            else sum(1 for r in after if r[0] > horizon))
        if target.fib_converged_ms is not None:
            checks["fib_converged"] = (result["fib_converged_ms"] is not None
                                       and result["fib_converged_ms"] <= target.fib_converged_ms)
        if target.min_new_success is None:
            checks["no_failures_after_convergence"] = result["failed_after_converged"] == 0
            checks["no_failures_before_event"] = result["new_failed_before_event"] == 0
    if target.min_new_success is not None:
        result["new_success_pct"] = round(100 * (len(rows) - len(failed)) / len(rows), 2) \
            if rows else 0.0
        checks["new_success"] = bool(rows) and \
            len(rows) - len(failed) >= target.min_new_success * len(rows)
    if target.zero_new_failures:
        checks["zero_new_failures"] = not counted
    if target.fib_unchanged:
        checks["fib_unchanged"] = all(sorted(h) == sorted(all_hops) for _, h in changes)
    if target.ecmp_tolerance is not None:
        checks["ecmp_even"] = (len(result["ecmp_spread"]) == n_nodes and
                               max_deviation(result["ecmp_spread"], n_nodes)
                               <= target.ecmp_tolerance)
        checks["no_failures"] = len(failed) == 0
    result["target"] = target.text
    result["checks"] = checks
    result["pass"] = all(checks.values())
    return result
