"""Figures of the abuse scenarios (floods, forged sync) from raw evidence:
pure, no I/O.

Inputs are what the scenario gathered: each node's log lines written
during the run (``ts=... level=... event=...`` lines, :mod:`anycast_lb.log`,
plus whatever the node's children wrote), Prometheus text scraped from
``/metrics`` before and after, the router's FIB changes, and samples of the
nodes' steering maps. Counters a build may not have yet (flow caps,
refused flows, rejected sync datagrams, failed health checks) are read when
present and reported as ``None`` when absent, never guessed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(metric name, sorted label pairs) -> value."""

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_TS = re.compile(r'^ts=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)')
_EVENT = re.compile(r'\bevent=(\S+)')
_STATE = re.compile(r'\bstate=(\S+)')

TCP_CAP_NAME = re.compile(r"^anycast_lb_tcp_connection_cap$")
"""The node's TCP connection cap per process (docs/limits.md)."""
UDP_CAP_NAME = re.compile(r"^anycast_lb_udp_flow_cap$")
"""A UDP service's flow cap (label ``service``)."""
REFUSED_NAME = re.compile(r"^anycast_lb_\w*(refused|shed|evicted|dropped)\w*(_total)?$")
REJECTED_SYNC_NAME = re.compile(
    r"^anycast_lb_cluster_\w*(reject|unauth|bad_mac|invalid|dropped)\w*$")
HEALTH_FAILED_NAME = re.compile(r"^anycast_lb_health_check_\w*fail\w*$")


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition (0.0.4) -> samples; comments and
    malformed lines are skipped."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        out[(m.group(1), labels)] = value
    return out


def metric_sum(samples: Samples, name: re.Pattern[str],
               where: Mapping[str, Iterable[str]] | None = None) -> float | None:
    """Sum of the samples whose name matches (``_created`` samples left
    out) and whose labels hold one of the allowed values for each key of
    ``where``; None when no sample matches (the build lacks the metric)."""
    total, found = 0.0, False
    for (metric, labels), value in samples.items():
        if metric.endswith("_created") or not name.match(metric):
            continue
        got = dict(labels)
        if where and not all(got.get(k) in set(v) for k, v in where.items()):
            continue
        total += value
        found = True
    return total if found else None


def metric_min(samples: Samples, name: re.Pattern[str],
               where: Mapping[str, Iterable[str]] | None = None) -> float | None:
    """Smallest positive matching sample (a cap), None when absent."""
    values = [v for (metric, labels), v in samples.items() if name.match(metric) and v > 0
              and (not where or all(dict(labels).get(k) in set(a) for k, a in where.items()))]
    return min(values) if values else None


def delta(before: float | None, after: float | None) -> float | None:
    """after - before for counters; None when the counter is absent after."""
    if after is None:
        return None
    return after - (before or 0.0)


def log_summary(lines: list[str], window_s: float) -> dict[str, Any]:
    """Volume and notable events of one node's log over a run of
    ``window_s`` seconds: ``lines``, ``lines_per_s`` (average),
    ``peak_lines_per_s`` (the busiest wall-clock second of the node's own
    ``ts=`` lines; lines without a timestamp are counted in ``lines`` only),
    ``health_failures`` (``health.transition`` to any state but ``up``),
    ``service_unhealthy``, ``route_withdraws``, ``peer_down``
    (``cluster.peer_down``), ``top_events`` (the five most frequent)."""
    per_second: Counter[str] = Counter()
    events: Counter[str] = Counter()
    health_failures = 0
    for line in lines:
        ts = _TS.match(line)
        if ts:
            per_second[ts.group(1)] += 1
        ev = _EVENT.search(line)
        if ev is None:
            continue
        name = ev.group(1)
        events[name] += 1
        if name == "health.transition":
            state = _STATE.search(line)
            if state is None or state.group(1) != "up":
                health_failures += 1
    return {
        "lines": len(lines),
        "lines_per_s": round(len(lines) / window_s, 1) if window_s > 0 else None,
        "peak_lines_per_s": max(per_second.values(), default=0),
        "health_failures": health_failures,
        "service_unhealthy": events["service.unhealthy"],
        "route_withdraws": events["route.withdraw"],
        "peer_down": events["cluster.peer_down"],
        "top_events": dict(events.most_common(5)),
    }


def route_counts(fib_changes: list[dict[str, Any]]) -> dict[str, Any]:
    """From the FIB changes of a run (``{"ms", "nexthops"}``, first one the
    state at the start): ``withdraws`` (next hops lost, summed over the
    changes: three nodes withdrawing in one change count 3),
    ``min_nexthops`` and ``timeline`` [[ms, next hop count]]."""
    timeline = [[c["ms"], len(c["nexthops"])] for c in fib_changes]
    withdraws = 0
    for before, after in zip(fib_changes, fib_changes[1:]):
        withdraws += len(set(before["nexthops"]) - set(after["nexthops"]))
    return {"withdraws": withdraws,
            "min_nexthops": min((n for _, n in timeline), default=None),
            "timeline": timeline}


_ELEMENT = re.compile(r"(\d+\.\d+\.\d+\.\d+) \. (\d+) \. (\d+\.\d+\.\d+\.\d+) \. (\d+)")


def forged_keys(nft_text: str, client: str, ports: tuple[int, int], vip: str) -> set[int]:
    """Client ports of forged flows (``client``:port in ``ports``, to
    ``vip``) found in ``nft list`` output of the steering map or dead set."""
    found: set[int] = set()
    for c, port, v, _ in _ELEMENT.findall(nft_text):
        if c == client and v == vip and ports[0] <= int(port) <= ports[1]:
            found.add(int(port))
    return found


def peers_all_alive(status: Mapping[str, Any]) -> bool | None:
    """From a node's /status: every cluster peer alive (None: no cluster)."""
    cluster = status.get("cluster")
    if not isinstance(cluster, dict):
        return None
    return all(bool(p.get("alive")) for p in cluster.get("peers", []))
