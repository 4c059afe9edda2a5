"""Runtime control of single backends: admin drain and weight (pure).

``anycast-lb backend drain|undrain|weight`` (``POST
/backends/{service}/{backend}/...``) change one backend of the config in
effect. Both are config fields (``BackendConfig.drain``, ``weight``), so a
change is a new config carried out by live apply
(:class:`anycast_lb.applier.LiveApplier`, driven by
:class:`anycast_lb.backendctl.BackendControl`); this module only computes
that config.

Standalone the change is node-local: it is kept as an :class:`Override` on
top of the node's file (never written to it), survives ``reload`` for as long
as the backend is in the file, and ``/status`` marks the backend
``runtime_override``. With a consensus store the same edit is made to the
cluster's shared document (:func:`edit_services`) and pushed as a new
revision, so every node applies it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from anycast_lb.config import BackendConfig, NodeConfig, ServiceConfig
from anycast_lb.errors import UnknownBackend

BackendId = tuple[str, str]
"""(service name, backend key ``addr:port``)."""


@dataclass(frozen=True)
class Override:
    """A node-local change of one backend; None: as in the file."""

    drain: bool | None = None
    weight: int | None = None

    @property
    def empty(self) -> bool:
        return self.drain is None and self.weight is None


@dataclass(frozen=True)
class Change:
    """One runtime change: ``drain`` and/or ``weight`` (None: unchanged)."""

    service: str
    backend: str
    drain: bool | None = None
    weight: int | None = None

    def describe(self) -> str:
        parts = []
        if self.drain is not None:
            parts.append("drain" if self.drain else "undrain")
        if self.weight is not None:
            parts.append(f"set weight {self.weight} of")
        return f"{' and '.join(parts)} backend {self.backend} of {self.service}"


@dataclass(frozen=True)
class BackendAnswer:
    """What one runtime change did (the body of ``POST /backends/...``)."""

    applied: bool
    """True once in effect on this node."""
    scope: str
    """``node`` (standalone, node-local) or ``cluster`` (pushed through consensus)."""
    revision: int | None
    """The cluster config revision pushed (``cluster`` scope)."""
    generation: int
    """This node's config generation afterwards."""
    reason: str = ""
    """Why live apply refused it ("" when applied)."""
    pending: bool = False
    """``cluster`` scope: pushed, not yet applied on this node."""

    def as_dict(self) -> dict[str, object]:
        return {"applied": self.applied, "scope": self.scope, "revision": self.revision,
                "generation": self.generation, "reason": self.reason, "pending": self.pending}


def edit_services(services: Sequence[ServiceConfig], change: Change) -> tuple[ServiceConfig, ...]:
    """``services`` with ``change`` made. Raises UnknownBackend when the
    service or backend does not exist, ValueError for a weight out of the
    config's range (1..1000)."""
    found = False
    edited: list[ServiceConfig] = []
    for service in services:
        if service.name != change.service:
            edited.append(service)
            continue
        backends = []
        for backend in service.backends:
            if backend.key == change.backend:
                found = True
                update: dict[str, object] = {}
                if change.drain is not None:
                    update["drain"] = change.drain
                if change.weight is not None:
                    update["weight"] = change.weight
                # Validated again (model_copy skips validation): the weight bounds hold.
                backend = type(backend).model_validate({**backend.model_dump(), **update})
            backends.append(backend)
        edited.append(service.model_copy(update={"backends": backends}))
    if not found:
        names = {s.name: s for s in services}
        if change.service not in names:
            raise UnknownBackend(f"no service {change.service!r}")
        raise UnknownBackend(f"service {change.service!r} has no backend {change.backend!r}")
    return tuple(edited)


def record(overrides: Mapping[BackendId, Override], base: NodeConfig,
           change: Change) -> dict[BackendId, Override]:
    """The node-local overrides after ``change``, relative to ``base`` (the
    node's file): a value equal to the file's is no override. Raises
    UnknownBackend when ``base`` has no such backend (a backend must be in
    the file to be changed at runtime)."""
    edit_services(base.services, change)  # raises for an unknown backend
    file_backend = _backend(base, change.service, change.backend)
    ident = (change.service, change.backend)
    old = overrides.get(ident, Override())
    drain, weight = old.drain, old.weight
    if change.drain is not None:
        drain = None if change.drain == file_backend.drain else change.drain
    if change.weight is not None:
        weight = None if change.weight == file_backend.weight else change.weight
    new = Override(drain, weight)
    result = {k: v for k, v in overrides.items() if k != ident}
    if not new.empty:
        result[ident] = new
    return result


def prune(overrides: Mapping[BackendId, Override], base: NodeConfig) -> dict[BackendId, Override]:
    """``overrides`` without those of backends ``base`` no longer has, or
    whose values ``base`` now holds (a reload of an edited file)."""
    kept: dict[BackendId, Override] = {}
    for ident, override in overrides.items():
        try:
            kept.update(record(kept, base, Change(*ident, override.drain, override.weight)))
        except UnknownBackend:
            continue
    return kept


def overlay(base: NodeConfig, overrides: Mapping[BackendId, Override]) -> NodeConfig:
    """``base`` with every override applied (overrides of backends it lacks
    are skipped)."""
    services: Sequence[ServiceConfig] = base.services
    for (service, backend), override in overrides.items():
        try:
            services = edit_services(services, Change(service, backend, override.drain,
                                                      override.weight))
        except UnknownBackend:
            continue
    if services is base.services:
        return base
    return base.model_copy(update={"services": list(services)})


def holds(config: NodeConfig, change: Change) -> bool:
    """``config`` has ``change``'s values (False when it lacks the backend)."""
    try:
        backend = _backend(config, change.service, change.backend)
    except UnknownBackend:
        return False
    return ((change.drain is None or backend.drain == change.drain)
            and (change.weight is None or backend.weight == change.weight))


def _backend(config: NodeConfig, service: str, key: str) -> BackendConfig:
    for s in config.services:
        if s.name == service:
            for b in s.backends:
                if b.key == key:
                    return b
    raise UnknownBackend(f"service {service!r} has no backend {key!r}")
