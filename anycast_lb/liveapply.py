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
4. ``ChangeHealth``        new probe settings; current states kept
5. ``ChangeServiceSettings`` the named fields of the running service
6. ``ChangeAnnounce``      re-announce the VIPs with the new attributes
7. ``RemoveBackend``       no new flows; established ones run to
                           ``drain.timeout``
8. ``RemoveService``       withdraw, stop listening, drain
9. ``NodeLocalChange``     sections live apply does not cover (node, api,
                           bgp session, forwarding, cluster, consensus,
                           drain): logged, applied at the next restart
"""

from __future__ import annotations

from dataclasses import dataclass

from anycast_lb.config import AnnounceConfig, BackendConfig, HealthConfig, NodeConfig, ServiceConfig


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


Action = (AddService | AddBackend | Reweight | ChangeHealth | ChangeServiceSettings
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
            elif prior.weight != backend.weight:
                reweights.append(Reweight(name, key, prior.weight, backend.weight))
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
