"""``GET /status`` of one node, built from its parts at request time.

The document's shape is :class:`anycast_lb.status.Status` (its models and
published schema); this module only reads the parts that fill it: the
drain state, the data plane, the pools, the route controller's decision and
what ExaBGP acknowledged, and the status of each optional part (cluster,
relay workers, consensus, VIP elections). The per-VIP metric families
(:func:`anycast_lb.metrics.vip_families`) read the same services.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client.core import Metric

from anycast_lb.bgp.controller import RouteDecision
from anycast_lb.bgp.policy import Prefix
from anycast_lb.config import NodeConfig
from anycast_lb.dataplane import DataPlane
from anycast_lb.drain import DrainState
from anycast_lb.limits import Budget, open_descriptors
from anycast_lb.metrics import vip_families
from anycast_lb.pool import Pool
from anycast_lb.status import BgpStatus, ConfigStatus, NodeInfo, Status, service_status


class Section(Protocol):
    """A part whose ``status()`` is one section of the document, as JSON
    data its model validates."""

    def status(self) -> object: ...


class Drain(Protocol):
    """The drainer (:class:`anycast_lb.drainer.Drainer`)."""

    @property
    def state(self) -> DrainState: ...

    @property
    def waiting_for_slot(self) -> bool: ...


class Routes(Protocol):
    """The route controller (:class:`anycast_lb.bgp.controller.RouteController`)."""

    @property
    def decision(self) -> RouteDecision | None: ...

    @property
    def changed_at(self) -> Mapping[Prefix, float]:
        """Per prefix, the epoch s its decision last changed."""
        ...

    def damping_status(self, prefix: Prefix) -> Mapping[str, float | bool]: ...


class Consensus(Section, Protocol):
    """The consensus agent (:class:`anycast_lb.consensus.agent.ConsensusAgent`)."""

    def table_revision(self, service: str) -> int | None: ...


class Applied(Protocol):
    """Live apply (:class:`anycast_lb.applier.LiveApplier`)."""

    @property
    def config(self) -> NodeConfig: ...

    def config_status(self) -> ConfigStatus: ...

    def runtime_overrides(self, service: str) -> frozenset[str]: ...


class NodeStatus:
    """The ``/status`` document of a node made of these parts (None: the
    node does not run that part)."""

    def __init__(self, applied: Applied, pools: Mapping[str, Pool], data: DataPlane,
                 drain: Drain, budget: Budget, *, speaker: Section | None = None,
                 routes: Routes | None = None, cluster: Section | None = None,
                 consensus: Consensus | None = None, owners: Section | None = None,
                 pid: Callable[[], int] = os.getpid) -> None:
        self._applied, self._pools, self._data, self._drain = applied, pools, data, drain
        self._budget, self._speaker, self._routes = budget, speaker, routes
        self._cluster, self._consensus, self._owners = cluster, consensus, owners
        self._pid = pid

    def model(self) -> Status:
        """The document now."""
        speaker, routes, consensus = self._speaker, self._routes, self._consensus
        config = self._applied.config
        bgp = BgpStatus.model_validate(speaker.status()) if speaker is not None else None
        drain = self._drain.state
        workers = self._data.workers
        return Status.model_validate({
            "node": NodeInfo(name=config.node.name, draining=drain.draining,
                             drain_phase=drain.phase.route_phase.value,
                             drain_state=drain.phase.value, stopping=drain.stopping,
                             pid=self._pid(), drain_waiting=self._drain.waiting_for_slot),
            "services": [
                service_status(s, self._pools[s.name], self._data,
                               with_bgp=bgp is not None,
                               decision=routes.decision if routes is not None else None,
                               acked=bgp.routes if bgp is not None else {},
                               damping=routes.damping_status if routes is not None else None,
                               table_revision=(consensus.table_revision(s.name)
                                               if consensus is not None else None),
                               runtime_overrides=self._applied.runtime_overrides(s.name))
                for s in config.services
            ],
            "bgp": bgp,
            "cluster": self._cluster.status() if self._cluster is not None else None,
            "workers": workers.status() if workers is not None else None,
            "limits": {**self._budget.as_dict(), "open_descriptors": open_descriptors()},
            "consensus": consensus.status() if consensus is not None else None,
            "config": self._applied.config_status(),
            "vips": self._owners.status() if self._owners is not None else None,
        })

    def vip_families(self) -> Iterator[Metric]:
        """Per-VIP metric families (:func:`anycast_lb.metrics.vip_families`);
        none without a route controller (no ``bgp`` section)."""
        if self._routes is not None:
            yield from vip_families(self.model().services, self._routes.changed_at)
