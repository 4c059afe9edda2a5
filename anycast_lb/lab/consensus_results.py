"""Read the consensus fields of the nodes' ``/status`` samples, and the
figures the consensus scenarios derive from them (pure, no I/O).

The fields are read by name, tolerantly: a node build that does not show a
field yields ``None`` and the scenario reports the field as "not
available" (a failed check naming it), never a crash. What is looked for:

- ``consensus.state`` (``isolated`` while the node has lost etcd quorum);
- per service (``services[]``), the Maglev table digest and the etcd
  revision it was built from: the first of ``DIGEST_KEYS`` /
  ``REVISION_KEYS`` found on the service itself or in one of its
  ``NESTS`` sub-objects;
- per backend (``services[].backends[]``), the node's own health
  observation (:func:`local_state`): with consensus ``state`` is the agreed
  one and ``consensus.disagreement`` lists, per service, the backends
  (``addr:port``) the node itself sees otherwise;
- ``node.drain_state`` (``serving``, ``graceful``, ``withdrawn``, ``drained``).

A sample is ``(t, node, status)``: ``t`` monotonic s, ``status`` the parsed
document or None when the node did not answer.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

DIGEST_KEYS = ("table_digest", "maglev_digest", "digest")
REVISION_KEYS = ("table_revision", "etcd_revision", "revision")
NESTS = ("table", "maglev", "consensus", "agreed")
LOCAL_STATE_KEYS = ("local_state", "observed_state", "local", "state")
ISOLATED = "isolated"
NOT_SYNCED = frozenset({ISOLATED, "connecting", "resyncing", "starting", "unknown",
                        "standalone", "disconnected"})
"""``consensus.state`` values that do not count as "in sync"."""
DRAINING = frozenset({"graceful", "withdrawn"})


@dataclass(frozen=True)
class Sample:
    t: float
    node: str
    status: dict[str, Any] | None


def _first(obj: dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if obj.get(key) is not None:
            return obj[key]
    return None


def _service_field(service: dict[str, Any], keys: Sequence[str]) -> Any:
    value = _first(service, keys)
    if value is not None:
        return value
    for nest in NESTS:
        sub = service.get(nest)
        if isinstance(sub, dict) and (value := _first(sub, keys)) is not None:
            return value
    return None


def consensus_state(status: dict[str, Any] | None) -> str | None:
    if not status:
        return None
    section = status.get("consensus")
    if isinstance(section, dict) and isinstance(section.get("state"), str):
        return str(section["state"])
    return None


def digests(status: dict[str, Any] | None) -> dict[str, str] | None:
    """Service name -> table digest; None when no service shows one."""
    if not status:
        return None
    out = {}
    for service in status.get("services") or []:
        if isinstance(service, dict) and (d := _service_field(service, DIGEST_KEYS)) is not None:
            out[str(service.get("name"))] = str(d)
    return out or None


def revisions(status: dict[str, Any] | None) -> dict[str, int] | None:
    """Service name -> etcd revision its table was built from."""
    if not status:
        return None
    out = {}
    for service in status.get("services") or []:
        if isinstance(service, dict):
            r = _service_field(service, REVISION_KEYS)
            if isinstance(r, int):
                out[str(service.get("name"))] = r
    return out or None


def _disagreeing(status: dict[str, Any], service: str) -> set[str]:
    """Backend keys (``addr:port``) of ``service`` whose local health differs
    from the agreed one (``consensus.disagreement``)."""
    section = status.get("consensus")
    table = section.get("disagreement") if isinstance(section, dict) else None
    keys = table.get(service) if isinstance(table, dict) else None
    return {str(k) for k in keys} if isinstance(keys, list) else set()


def local_state(status: dict[str, Any], service: dict[str, Any],
                backend: dict[str, Any]) -> str | None:
    """The node's own health observation of one ``services[].backends[]``
    entry: ``local_state`` when shown, else, with a ``consensus`` section,
    the agreed ``state`` flipped when the backend is listed in
    ``consensus.disagreement`` for the service (the node's pools hold the
    agreed set), else ``state`` (standalone: the node's own)."""
    for key in LOCAL_STATE_KEYS[:-1]:
        if backend.get(key) in ("up", "down"):
            return str(backend[key])
    state = backend.get("state")
    if state not in ("up", "down"):
        return None
    address = str(backend.get("address"))
    key = f"[{address}]:{backend.get('port')}" if ":" in address \
        else f"{address}:{backend.get('port')}"
    if key in _disagreeing(status, str(service.get("name"))):
        return "down" if state == "up" else "up"
    return str(state)


def backend_down(status: dict[str, Any] | None, address: str) -> bool | None:
    """True when every service's entry for backend ``address`` is locally
    down (:func:`local_state`), False when one is up, None when none shows
    a state."""
    if not status:
        return None
    seen: list[bool] = []
    for service in status.get("services") or []:
        for be in (service.get("backends") or []) if isinstance(service, dict) else []:
            if isinstance(be, dict) and be.get("address") == address:
                state = local_state(status, service, be)
                if state is not None:
                    seen.append(state == "down")
    return all(seen) if seen else None


def drain_state(status: dict[str, Any] | None) -> str | None:
    node = (status or {}).get("node")
    return str(node["drain_state"]) if isinstance(node, dict) and "drain_state" in node \
        else None


@dataclass
class Timeline:
    """Samples of every node in time order, with "latest of each node" views."""

    nodes: list[str]
    samples: list[Sample] = field(default_factory=list)

    def sorted(self) -> list[Sample]:
        return sorted(self.samples, key=lambda s: s.t)

    def views(self, since: float = -math.inf, until: float = math.inf
              ) -> Iterable[tuple[float, dict[str, dict[str, Any] | None]]]:
        """(t, latest status of every node at t) at each sample instant in
        [since, until) once every node has been sampled (answer or not)."""
        latest: dict[str, dict[str, Any] | None] = {}
        seen: set[str] = set()
        for s in self.sorted():
            latest[s.node] = s.status
            seen.add(s.node)
            if len(seen) == len(self.nodes) and since <= s.t < until:
                yield s.t, dict(latest)

    def first(self, node: str, pred: Callable[[dict[str, Any] | None], bool],
              after: float, until: float = math.inf) -> float | None:
        for s in self.sorted():
            if s.node == node and after <= s.t < until and pred(s.status):
                return s.t
        return None

    def first_view(self, pred: Callable[[dict[str, dict[str, Any] | None]], bool],
                   after: float, until: float = math.inf) -> float | None:
        for t, view in self.views(after, until):
            if pred(view):
                return t
        return None


def all_equal_digests(view: dict[str, dict[str, Any] | None]) -> bool:
    """Every node answered, shows digests, and they are the same."""
    got = [digests(s) for s in view.values()]
    return all(g is not None for g in got) and all(g == got[0] for g in got)


def digest_report(tl: Timeline, since: float, until: float,
                  nodes: Sequence[str] | None = None) -> dict[str, Any]:
    """Whether ``nodes`` (all by default) showed equal table digests at
    every sample instant of [since, until): ``available``, ``views``,
    ``unequal_views``, ``unanswered_views``, ``distinct`` (digest sets seen)."""
    who = list(nodes or tl.nodes)
    views = unequal = unanswered = 0
    distinct: set[str] = set()
    available = False
    for _, view in tl.views(since, until):
        views += 1
        sub = {n: view.get(n) for n in who}
        if any(s is None for s in sub.values()):
            unanswered += 1
            continue
        got = [digests(s) for s in sub.values()]
        if any(g is not None for g in got):
            available = True
        if any(g is None for g in got) or any(g != got[0] for g in got):
            unequal += 1
        for g in got:
            if g is not None:
                distinct.add(repr(sorted(g.items())))
    return {"available": available, "views": views, "unequal_views": unequal,
            "unanswered_views": unanswered, "distinct": len(distinct)}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(t: float | None, ref: float) -> float | None:
    return None if t is None else round((t - ref) * 1000, 1)


def not_available(result: dict[str, Any], what: str) -> None:
    """Record that the nodes do not show ``what`` (the check fails by name)."""
    missing: list[str] = result.setdefault("not_available", [])
    if what not in missing:
        missing.append(what)


# --- node logs: the stages of one agreement ---------------------------------------

_KV = re.compile(r'([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass(frozen=True)
class LogEvent:
    t: float
    """Wall clock s since the epoch (the line's ``ts``, millisecond precision)."""
    event: str
    fields: dict[str, str]


def parse_log(lines: Iterable[str], events: Collection[str]) -> list[LogEvent]:
    """The ``kv`` log lines (:mod:`anycast_lb.log`) whose event is one of
    ``events``, in file order; lines of another shape are skipped."""
    out: list[LogEvent] = []
    for line in lines:
        fields = {k: (v[1:-1].replace('\\"', '"') if v.startswith('"') else v)
                  for k, v in _KV.findall(line)}
        name, ts = fields.pop("event", None), fields.pop("ts", None)
        if name not in events or ts is None:
            continue
        try:
            when = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) \
                + int(ts[20:23]) / 1000
        except (ValueError, IndexError):
            continue
        out.append(LogEvent(when, name, fields))
    return out


TRACE_EVENTS = ("health.transition", "consensus.voted", "consensus.agreed")


def _names(field_value: str) -> set[str]:
    return set(filter(None, field_value.split(",")))


def agreement_trace(logs: dict[str, list[LogEvent]], backends: Collection[str],
                    kill: float, until: float,
                    tables: dict[str, float | None]) -> dict[str, Any]:
    """The stages of one agreed "down" of ``backends`` (``addr:port`` keys of
    one backend host, one per service) after a kill at wall time ``kill``
    (s), from each node's log (:data:`TRACE_EVENTS`) up to ``until``, and
    ``tables``: per node the wall time its table for the new agreed set was
    in place (``services[].table_since`` of the first sample showing the new
    digests), None when not seen.

    Per node: ``detect`` (its own check's transition to down; a node whose
    last transition before the kill was already down counts at the kill),
    ``voted`` (its vote committed: etcd answered), ``agreed`` (the agreed set
    took the backend out: last service), ``table`` (the new table in place).
    ``majority`` is the (n//2 + 1)-th detection; each stage is given in ms
    after it, and ``latency_ms`` = last node's ``table`` - ``majority``.
    """
    keys = set(backends)
    nodes = sorted(logs)
    per: dict[str, dict[str, float | None]] = {}
    for node in nodes:
        detect = voted = agreed = None
        before: bool | None = None
        for e in logs[node]:
            if e.event == "health.transition" and e.fields.get("backend") in keys:
                if e.t < kill:
                    before = e.fields.get("state") == "down"
                elif e.t < until and detect is None and e.fields.get("state") == "down":
                    detect = e.t
            elif not kill <= e.t < until:
                continue
            elif e.event == "consensus.voted" and voted is None \
                    and _names(e.fields.get("down", "")) & keys:
                voted = e.t
            elif e.event == "consensus.agreed" and _names(e.fields.get("down", "")) & keys:
                agreed = e.t if agreed is None else max(agreed, e.t)
        if detect is None and before:
            detect = kill  # never saw it back up: its vote was down already
            voted = kill if voted is None else voted
        per[node] = {"detect": detect, "voted": voted, "agreed": agreed,
                     "table": tables.get(node)}
    detects = sorted(d for n in nodes if (d := per[n]["detect"]) is not None)
    need = len(nodes) // 2 + 1
    majority = detects[need - 1] if len(detects) >= need else None
    votes = sorted(v for n in nodes if (v := per[n]["voted"]) is not None)
    out: dict[str, Any] = {
        "majority_detect_ms": ms(majority, kill),
        "stages_ms": {n: {k: (None if v is None or majority is None else ms(v, majority))
                          for k, v in per[n].items()} for n in nodes},
        "majority_vote_committed_ms": (ms(votes[need - 1], majority)
                                       if majority is not None and len(votes) >= need
                                       else None),
    }
    tables_in = [t for n in nodes if (t := per[n]["table"]) is not None]
    out["latency_ms"] = (None if majority is None or len(tables_in) < len(nodes)
                         else round(max(0.0, max(tables_in) - majority) * 1000, 1))
    return out


def table_since(status: dict[str, Any] | None) -> float | None:
    """The latest ``services[].table_since`` of a sample (the moment its
    whole set of tables was in place), None when a service shows none."""
    services = status.get("services") if isinstance(status, dict) else None
    if not isinstance(services, list) or not services:
        return None
    raw = [s.get("table_since") for s in services if isinstance(s, dict)]
    got = [float(g) for g in raw if isinstance(g, (int, float))]
    if not got or len(got) < len(raw):
        return None
    return max(got)
