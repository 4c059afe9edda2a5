"""What follows a change of a node's backends or pools.

The health monitor reports each check and each up/down transition; the
consensus agent reports changes of the agreed up sets; live apply reports
pools it changed, added or removed. This part passes each on: relay
workers learn a backend's state, the kernel engine's tables follow
(through the data plane), with consensus the node's own check becomes a
vote, and the routes and VIP elections decide again (``routes_changed``).

Log events: ``service.healthy`` and ``service.unhealthy`` (warning: it
withdraws the VIP with a ``bgp`` section), with ``service`` and
``up_backends``, once per transition of a service's health.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from anycast_lb import log
from anycast_lb.health.probes import ProbeResult
from anycast_lb.pool import Backend, Pool


class Workers(Protocol):
    """Relay worker processes (:class:`anycast_lb.forward.workers.WorkerGroup`)."""

    def backend_changed(self, service: str, key: str, up: bool) -> None: ...


class PoolData(Protocol):
    """The data plane (:class:`anycast_lb.dataplane.DataPlane`)."""

    @property
    def kernel(self) -> object | None: ...

    @property
    def workers(self) -> Workers | None: ...

    def listening(self, service: str) -> bool: ...

    def pool_changed(self, service: str) -> None:
        """The kernel engine's tables follow ``service``'s pool."""
        ...


class Votes(Protocol):
    """The consensus agent (:class:`anycast_lb.consensus.agent.ConsensusAgent`)."""

    def local_changed(self, service: str, backend: Backend, up: bool) -> None: ...


class PoolEvents:
    """``observe`` records a check's latency (service, backend key, s);
    ``consensus`` takes this node's checks as votes when the node has a
    ``consensus`` section."""

    def __init__(self, pools: Mapping[str, Pool], data: PoolData, *,
                 routes_changed: Callable[[], None],
                 observe: Callable[[str, str, float], None],
                 consensus: Votes | None = None) -> None:
        self._pools, self._data, self._routes_changed = pools, data, routes_changed
        self._observe, self._consensus = observe, consensus
        self._healthy: dict[str, bool] = {name: False for name in pools}
        """Per service, its health as last logged."""

    def checked(self, service: str, backend: Backend, result: ProbeResult) -> None:
        """A health check ran (the monitor's ``on_check``)."""
        self._observe(service, backend.key, result.latency_s)
        if self._data.kernel is not None and not self._data.listening(service):
            self._routes_changed()  # the kernel engine announces once every backend was checked

    def backend_changed(self, service: str, backend: Backend, up: bool) -> None:
        """``backend`` of ``service`` went up or down in its pool."""
        workers = self._data.workers
        if workers is not None:
            workers.backend_changed(service, backend.key, up)
        self.pool_changed(service)

    def local_health(self, service: str, backend: Backend, up: bool) -> None:
        """With consensus: the node's own check becomes a vote, and the
        announcement is decided again (it needs the agreed backends to pass
        this node's own checks too, :meth:`ConsensusAgent.announce_healthy`)."""
        assert self._consensus is not None
        self._consensus.local_changed(service, backend, up)
        self._routes_changed()

    def service_added(self, name: str) -> None:
        self._healthy[name] = False

    def service_removed(self, name: str) -> None:
        self._healthy.pop(name, None)

    def pool_changed(self, name: str) -> None:
        """The eligible set of service ``name`` may have changed (health,
        drain): the kernel engine's tables follow, a service health
        transition is logged, the routes are decided again."""
        self._data.pool_changed(name)
        pool = self._pools[name]
        healthy = pool.healthy
        if healthy != self._healthy.get(name):
            self._healthy[name] = healthy
            if healthy:
                log.event("service.healthy", service=name, up_backends=pool.up_count)
            else:  # withdraws the VIP (with a bgp section): a warning
                log.warning("service.unhealthy", service=name, up_backends=pool.up_count)
        self._routes_changed()
