"""Live apply: what changes between two configs, as actions (pure).

``plan(old, new)`` compares two validated :class:`NodeConfig` and returns the
actions that take a running node from ``old`` to ``new`` without a restart.
The same plan serves a pushed cluster revision, SIGHUP and
``anycast-lb reload``.

Identity: a service is its ``name``; a backend is its ``addr:port`` key. A
service whose listener (VIP, port or protocol) changes is a different
listener: it is removed and added. Every other service field is a settings
change on the running service.

Order is make-before-break: additions first, then changes, then removals,
so a pool gaining one backend and losing another is never short of both,
and a VIP moving between services keeps a listener:

1. ``AddService``          listen, check, announce when healthy
2. ``AddBackend``          new flows may go there once it is up
3. ``Reweight``            rebuild the Maglev table
   ``SetDrain``            admin drain on or off (``BackendConfig.drain``):
                           drained backends leave the Maglev table, keep
                           their established flows
4. ``ChangeHealth``        new probe settings; current states kept
5. ``ChangeServiceSettings`` the named fields of the running service
6. ``ChangeAnnounce``      re-announce the VIPs with the new attributes
7. ``RemoveBackend``       no new flows; established ones run to
                           ``drain.timeout``
8. ``RemoveService``       withdraw, stop listening, drain
9. ``NodeLocalChange``     sections live apply does not cover (node, api,
                           bgp session, forwarding, cluster, consensus,
                           drain): a plan holding it is refused whole
                           (:func:`refusal`); they need a restart

Carrying a plan out is :mod:`anycast_lb.applier`'s; this module also
decides, purely, whether a plan can be carried out at all (:func:`refusal`)
and names the config applied (:func:`digest`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from anycast_lb.config import (
    AnnounceConfig,
    AnnounceMode,
    BackendConfig,
    HealthConfig,
    NodeConfig,
    ServiceConfig,
    Transport,
)


@dataclass(frozen=True)
class AddService:
    service: ServiceConfig


@dataclass(frozen=True)
class AddBackend:
    service: str
    backend: BackendConfig


@dataclass(frozen=True)
class Reweight:
    service: str
    backend: str
    old: int
    new: int


@dataclass(frozen=True)
class SetDrain:
    service: str
    backend: str
    drain: bool


@dataclass(frozen=True)
class ChangeHealth:
    service: str
    health: HealthConfig


@dataclass(frozen=True)
class ChangeServiceSettings:
    service: ServiceConfig
    fields: tuple[str, ...]
    """Names of the changed ServiceConfig fields, sorted."""


@dataclass(frozen=True)
class ChangeAnnounce:
    announce: AnnounceConfig


@dataclass(frozen=True)
class RemoveBackend:
    service: str
    backend: str


@dataclass(frozen=True)
class RemoveService:
    name: str


@dataclass(frozen=True)
class NodeLocalChange:
    sections: tuple[str, ...]


Action = (AddService | AddBackend | Reweight | SetDrain | ChangeHealth | ChangeServiceSettings
          | ChangeAnnounce | RemoveBackend | RemoveService | NodeLocalChange)

_LISTENER = ("vip", "port", "protocol")
_SERVICE_SKIP = {"name", "backends", "health", *_LISTENER}
_NODE_LOCAL = ("node", "api", "drain", "forwarding", "cluster", "consensus", "election")


def _listener(s: ServiceConfig) -> tuple[str, int, str]:
    return (str(s.vip), s.port, s.protocol.value)


def plan(old: NodeConfig, new: NodeConfig) -> list[Action]:
    """Actions from ``old`` to ``new``, in the order above; empty when the
    two configs are equal where it matters."""
    adds: list[Action] = []
    backends_added: list[Action] = []
    reweights: list[Action] = []
    health: list[Action] = []
    settings: list[Action] = []
    backends_removed: list[Action] = []
    removes: list[Action] = []
    old_by_name = {s.name: s for s in old.services}
    new_by_name = {s.name: s for s in new.services}
    for name, gone in old_by_name.items():
        kept = new_by_name.get(name)
        if kept is None or _listener(kept) != _listener(gone):
            removes.append(RemoveService(name))
    for name, now in new_by_name.items():
        was = old_by_name.get(name)
        if was is None or _listener(now) != _listener(was):
            adds.append(AddService(now))
            continue
        old_backends = {b.key: b for b in was.backends}
        new_backends = {b.key: b for b in now.backends}
        for key, backend in new_backends.items():
            prior = old_backends.get(key)
            if prior is None:
                backends_added.append(AddBackend(name, backend))
            else:
                if prior.weight != backend.weight:
                    reweights.append(Reweight(name, key, prior.weight, backend.weight))
                if prior.drain != backend.drain:
                    reweights.append(SetDrain(name, key, backend.drain))
        backends_removed += [RemoveBackend(name, k) for k in old_backends if k not in new_backends]
        if was.health != now.health:
            health.append(ChangeHealth(name, now.health))
        changed = tuple(sorted(
            f for f in type(now).model_fields
            if f not in _SERVICE_SKIP and getattr(was, f) != getattr(now, f)))
        if changed:
            settings.append(ChangeServiceSettings(now, changed))
    announce: list[Action] = []
    if old.bgp is not None and new.bgp is not None and old.bgp.announce != new.bgp.announce:
        announce.append(ChangeAnnounce(new.bgp.announce))
    local = [s for s in _NODE_LOCAL if getattr(old, s, None) != getattr(new, s, None)]
    old_session = old.bgp.model_copy(update={"announce": None}) if old.bgp else None
    new_session = new.bgp.model_copy(update={"announce": None}) if new.bgp else None
    if old_session != new_session:
        local.append("bgp")
    tail: list[Action] = [NodeLocalChange(tuple(sorted(local)))] if local else []
    return [*adds, *backends_added, *reweights, *health, *settings, *announce,
            *backends_removed, *removes, *tail]


LIVE_SERVICE_FIELDS = frozenset({"balance", "hash_key", "min_healthy", "maglev_table_size",
                                 "connect_timeout", "proxy_protocol"})
"""Service settings a running service takes live (new flows use them). The
others (``idle_timeout``, the UDP flow caps and source prefixes) are fixed
when the listener starts: change them with a restart, or under a new service
name (add one, remove the other)."""


@dataclass(frozen=True)
class ApplyResult:
    """What one apply (push, SIGHUP, ``anycast-lb reload``) did."""

    applied: bool
    """False: refused whole, nothing changed."""
    generation: int
    """The config generation in effect afterwards: 1 for the config the
    node started with, +1 per applied config that changed something."""
    digest: str
    """:func:`digest` of the config in effect afterwards."""
    actions: tuple[str, ...] = ()
    """:func:`describe` of each action carried out (or, refused, planned)."""
    reason: str = ""
    """Why it was refused ("" when applied)."""
    source: str = field(default="", compare=False)
    """Where the config came from (a file path, ``push``)."""

    def as_dict(self) -> dict[str, object]:
        return {"result": "applied" if self.applied else "refused", "generation": self.generation,
                "digest": self.digest, "actions": list(self.actions), "reason": self.reason}


def digest(config: NodeConfig) -> str:
    """The first 16 hex digits of SHA-256 over the config's canonical JSON
    (the validated model, so formatting and comments of the file do not
    count)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def describe(action: Action) -> str:
    """One line naming the action, for logs and the API's answer."""
    match action:
        case AddService(service=s):
            return f"add service {s.name}"
        case AddBackend(service=name, backend=b):
            return f"add backend {b.key} to {name}"
        case Reweight(service=name, backend=key, old=was, new=now):
            return f"reweight {key} of {name} {was}->{now}"
        case SetDrain(service=name, backend=key, drain=drain):
            return f"{'drain' if drain else 'undrain'} backend {key} of {name}"
        case ChangeHealth(service=name):
            return f"change health checks of {name}"
        case ChangeServiceSettings(service=s, fields=names):
            return f"change {', '.join(names)} of {s.name}"
        case ChangeAnnounce():
            return "change announce attributes"
        case RemoveBackend(service=name, backend=key):
            return f"remove backend {key} from {name}"
        case RemoveService(name=name):
            return f"remove service {name}"
        case NodeLocalChange(sections=sections):
            return f"restart needed: {', '.join(sections)} changed"
    raise AssertionError(action)  # pragma: no cover


def refusal(old: NodeConfig, actions: Sequence[Action], *, workers: bool = False,
            cluster: bool = False, kernel: bool = False) -> str | None:
    """Why ``actions`` (``plan(old, ...)``) cannot be applied live, or None.

    ``workers``: relay worker processes run (``forwarding.workers`` > 1);
    they build their TCP pools once, from the config they started with, so
    backend and service changes of TCP services are refused while they run.
    ``cluster``: flow survival runs; its steering is built for the services
    the node started with, so services cannot be added or removed.
    ``kernel``: the kernel engine runs (``forwarding.engine: kernel``); its
    nftables table holds the services and jhash seeds it started with, so
    services cannot be added or removed and ``maglev_table_size`` (part of
    the seed) cannot change; backends, weights and drains can.
    """
    reasons: list[str] = []
    tcp = {s.name for s in old.services if s.protocol is Transport.TCP}
    for action in actions:
        match action:
            case NodeLocalChange(sections=sections):
                reasons.append(f"restart needed: {', '.join(sections)} changed (node-local "
                               "sections are read at start only)")
            case ChangeServiceSettings(service=s, fields=names):
                fixed = [n for n in names if n not in LIVE_SERVICE_FIELDS]
                if fixed:
                    reasons.append(f"restart needed: service {s.name}: {', '.join(fixed)} "
                                   "cannot change on a running listener (or rename the service)")
                elif workers and s.name in tcp:
                    reasons.append(f"service {s.name}: settings of a TCP service cannot change "
                                   "live with relay workers (forwarding.workers > 1)")
                elif kernel and "maglev_table_size" in names:
                    reasons.append(f"restart needed: service {s.name}: maglev_table_size is part "
                                   "of the kernel engine's jhash seed and map (fixed at start)")
            case AddService() | RemoveService() if kernel:
                name = action.service.name if isinstance(action, AddService) else action.name
                reasons.append(f"service {name}: services cannot be added or removed live with "
                               "forwarding.engine: kernel (one table built at start): "
                               "restart needed")
            case AddService() | RemoveService() if cluster:
                name = action.service.name if isinstance(action, AddService) else action.name
                reasons.append(f"service {name}: services cannot be added or removed live with "
                               "flow survival (cluster section): restart needed")
            case AddService(service=s) if s.announce.mode is AnnounceMode.ACTIVE_PASSIVE:
                reasons.append(f"service {s.name}: active_passive services cannot be added live "
                               "(VIP elections start with the node): restart needed")
            case AddService(service=s) if s.manage_address:
                reasons.append(f"service {s.name}: a service with manage_address cannot be added "
                               "live (its VIP is put on lo at start): restart needed")
            case AddService(service=s) if workers and s.protocol is Transport.TCP:
                reasons.append(f"service {s.name}: TCP services cannot be added live with relay "
                               "workers (forwarding.workers > 1): restart needed")
            case RemoveService(name=name) if workers and name in tcp:
                reasons.append(f"service {name}: TCP services cannot be removed live with relay "
                               "workers (forwarding.workers > 1): restart needed")
            case AddBackend(service=name) | Reweight(service=name) | SetDrain(service=name) \
                    | RemoveBackend(service=name) \
                    if workers and name in tcp:
                reasons.append(f"service {name}: TCP backends cannot change live with relay "
                               "workers (forwarding.workers > 1): restart needed")
    unique = list(dict.fromkeys(reasons))
    return "; ".join(unique) if unique else None
