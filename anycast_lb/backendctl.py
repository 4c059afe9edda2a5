"""Runtime control of one backend carried out: ``anycast-lb backend
drain|undrain|weight`` and ``POST /backends/{service}/{backend}/...``.

:mod:`anycast_lb.runtime` computes the config (pure); this module takes it
to the running node. Standalone, the change is a node-local override of the
file, carried out by live apply (:meth:`LiveApplier.apply_override
<anycast_lb.applier.LiveApplier.apply_override>`). With consensus, it is
pushed as the cluster's next config revision (compare-and-swap), which
every node applies.

Log event: ``backend.runtime_change`` (service, backend, change, scope,
revision, applied).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from anycast_lb import log, runtime
from anycast_lb.applier import BACKEND_DRAIN_POLL, LiveApplier
from anycast_lb.clock import Clock

if TYPE_CHECKING:
    from anycast_lb.consensus import document


class ConfigPush(Protocol):
    """The consensus agent (:class:`anycast_lb.consensus.agent.ConsensusAgent`)
    as runtime control pushes through it."""

    @property
    def config_revision(self) -> int:
        """The cluster config revision this node applied or refused last."""
        ...

    async def push_edit(self, edit: Callable[[document.Shared], document.Shared], *,
                        author: str, message: str) -> int:
        """Push ``edit`` of the shared config; the new revision number.
        Raises ConsensusError."""
        ...


class Settled(Protocol):
    """The data plane as runtime control waits for it."""

    async def settled(self, service: str) -> bool:
        """Wait until the kernel engine (if any) holds ``service``'s pool."""
        ...


class BackendControl:
    """Runtime changes of single backends on one node. ``consensus`` (with
    its ``request_timeout`` s) when the node has a ``consensus`` section."""

    def __init__(self, node_name: str, applier: LiveApplier, data: Settled, clock: Clock, *,
                 consensus: ConfigPush | None = None, request_timeout: float = 0.0) -> None:
        self._name, self._applier, self._data, self._clock = node_name, applier, data, clock
        self._consensus, self._request_timeout = consensus, request_timeout

    async def change(self, change: runtime.Change) -> runtime.BackendAnswer:
        """Drain, undrain or reweight one backend.

        Standalone: a node-local override of the file, carried out by live
        apply (never written to the file; ``/status`` marks it
        ``runtime_override``). With consensus: pushed as the cluster's next
        config revision, waiting up to ``3 * request_timeout`` s for this
        node to apply it. Raises UnknownBackend for a service or backend not
        configured, ConsensusError when etcd cannot take the push
        (ConsensusConflict: another push won)."""
        if self._consensus is not None:
            return await self._push(self._consensus, change)
        result = await self._applier.apply_override(change)
        if result.applied:
            await self._data.settled(change.service)  # the kernel engine holds it too
            log.event("backend.runtime_change", service=change.service, backend=change.backend,
                      change=change.describe(), scope="node", revision=None, applied=True)
        return runtime.BackendAnswer(applied=result.applied, scope="node", revision=None,
                                     generation=result.generation, reason=result.reason)

    async def _push(self, consensus: ConfigPush, change: runtime.Change) -> runtime.BackendAnswer:
        clock = self._clock
        number = await consensus.push_edit(
            lambda shared: type(shared)(runtime.edit_services(shared.services, change),
                                        shared.announce),
            author=f"{self._name} (runtime control)", message=change.describe())
        deadline = clock.monotonic() + 3 * self._request_timeout
        while consensus.config_revision < number and clock.monotonic() < deadline:
            await clock.sleep(BACKEND_DRAIN_POLL)
        reached = consensus.config_revision >= number
        applied = reached and runtime.holds(self._applier.config, change)
        log.event("backend.runtime_change", service=change.service, backend=change.backend,
                  change=change.describe(), scope="cluster", revision=number, applied=applied)
        return runtime.BackendAnswer(
            applied=applied, scope="cluster", revision=number,
            generation=self._applier.record.generation, pending=not reached,
            reason="" if applied or not reached else
            f"revision {number} was not applied on this node (see its config.refused log)")
