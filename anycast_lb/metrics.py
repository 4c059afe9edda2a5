"""Prometheus metrics of one node (prometheus-client, text exposition).

Data-path counters live as plain ints on each :class:`~anycast_lb.pool.Backend`
and are read at scrape time by a custom collector, so forwarding a byte costs
no metrics call. Only the health-check latency histogram is observed as it
happens (a few observations per second).

Exported families (all prefixed ``anycast_lb_``):

- ``backend_up{service,backend}`` gauge, 1 while the backend is up
- ``backend_drained{service,backend}`` gauge, 1 while it is admin drained
  (no new flows; ``anycast-lb backend drain``)
- ``backend_active_connections{service,backend}`` gauge (UDP: live flows)
- ``backend_connections_total{service,backend}`` counter
- ``backend_connect_failures_total{service,backend}`` counter
- ``backend_bytes_total{service,backend,direction}`` counter, direction
  ``in`` (client to backend) or ``out``
- ``backend_packets_total{service,backend,direction}`` counter (UDP)
- ``service_healthy{service}`` gauge, 1 while ``min_healthy`` backends are up
- ``service_up_backends{service}`` gauge: up and not drained
- ``node_draining`` gauge
- ``health_check_duration_seconds{service,backend}`` histogram
- ``api_connections``, ``api_connections_refused_total`` and
  ``api_requests_rejected_total{reason}``, from
  :class:`anycast_lb.api.ConnectionStats` (registered by the node)

Descriptor budget and load shedding (:mod:`anycast_lb.limits`, docs/limits.md);
names and labels are stable:

- ``flows_refused_total{service,reason}`` counter: new TCP connections or UDP
  flows refused; reason ``cap``, ``source_cap``, ``descriptors``,
  ``no_backend`` or ``connect_failed`` (node process and relay workers)
- ``udp_flows_evicted_total{service}`` counter: quiet flows replaced by new
  ones in a full table
- ``accept_paused_total{service}`` counter: accept loop pauses for want of
  descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)
- ``descriptor_limit`` gauge: the soft RLIMIT_NOFILE planned for;
  ``descriptor_reserve`` gauge: descriptors the data path never takes;
  ``descriptors_open`` gauge: open in the node process now
- ``tcp_connection_cap`` gauge: proxied TCP connections per process;
  ``tcp_connections_per_source_cap`` gauge: of those, per source;
  ``udp_flow_cap{service}`` and ``udp_flows_per_source_cap{service}`` gauges

Per-service traffic (node process and relay workers):

- ``connections_accepted_total{service}`` counter: TCP connections taken
  from the listener past the caps (then proxied, or reset for want of a
  backend: ``flows_refused_total`` reasons ``no_backend``, ``connect_failed``)
- ``udp_flows_total{service}`` counter: UDP flows started (one per new
  client address:port given a backend)
- ``udp_datagrams_dropped_total{service}`` counter: UDP datagrams lost to
  a full socket buffer, an ICMP error, or arriving for a new flow after the
  listener stopped accepting

With a ``cluster`` section (flow survival, :mod:`anycast_lb.cluster`):
``cluster_flow_survival``, ``cluster_live_peers``, ``cluster_peer_up{peer}``,
``cluster_peer_flows{peer}``, ``cluster_flows_owned``,
``cluster_steering_map_size``, ``cluster_steered_packets_total{verdict}``,
``cluster_sync_lag_seconds`` (histogram) and ``cluster_sync_lag_p99_seconds``,
``cluster_sync_gaps_total``, ``cluster_nft_failures_total``,
``cluster_stale_flows_aborted_total``,
``cluster_sync_datagrams_received_total`` (authenticated, not replayed),
``cluster_sync_datagrams_rejected_total{reason}`` (``unknown_peer``,
``malformed``, ``bad_mac``, ``replay``), ``cluster_sync_datagrams_sent_total``,
``cluster_sync_send_errors_total``, ``cluster_sync_published_total{kind}``
(``delta``, ``snapshot``) and ``cluster_key_file_error``
(1 while a changed key file is refused and the old keys stay in use).

With a ``bgp`` section (:mod:`anycast_lb.bgp.speaker`, per BGP peer and per
VIP; what ExaBGP confirmed within the confirm deadline):
``bgp_confirmed``, ``bgp_confirmed_age_seconds``, ``bgp_peer_up{peer}``,
``bgp_peer_state{peer,state}``, ``bgp_peer_uptime_seconds{peer}``,
``bgp_peer_updates_sent_total{peer}``, ``bgp_route_announced{prefix}``,
``bgp_exabgp_running``, ``bgp_exabgp_restarts_total``,
``bgp_exabgp_errors_total``, ``bgp_announcer_connected``,
``bgp_announce_ack_seconds`` (histogram), and from :func:`vip_families`
``vip_state{service,prefix,state}``, ``vip_damping_penalty{service,prefix}``,
``vip_damping_reuse_seconds{service,prefix}``,
``vip_last_change_timestamp_seconds{service,prefix}``.

Always: ``build_info{version,python,exabgp}`` and prometheus_client's
process (``process_*``) and platform (``python_info``) collectors.
docs/metrics.md lists every family with its labels and meaning.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from anycast_lb import __version__
from anycast_lb.bgp.policy import Prefix
from anycast_lb.pool import Backend, Pool
from anycast_lb.status import AnnouncementName, ServiceStatus

BackendCounterSource = Callable[[str, Backend], tuple[int, int, int, int, int]]
"""(service, backend) -> (active_connections, connections_total,
connect_failures, bytes_in, bytes_out) summed over the node's processes
(relay workers, :mod:`anycast_lb.forward.workers`); default: the
``Backend``'s own counters."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_CHECK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _PoolCollector(Collector):
    def __init__(
        self,
        pools: Mapping[str, Pool],
        draining: Callable[[], bool],
        extra: Callable[[], Iterator[Metric]] | None,
        counters: BackendCounterSource | None = None,
    ) -> None:
        self._pools = pools
        self._draining = draining
        self._extra = extra
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        labels = ["service", "backend"]
        up = GaugeMetricFamily("anycast_lb_backend_up", "1 while the backend is up", labels=labels)
        drained = GaugeMetricFamily("anycast_lb_backend_drained",
                                    "1 while the backend is admin drained (no new flows)",
                                    labels=labels)
        active = GaugeMetricFamily(
            "anycast_lb_backend_active_connections",
            "Open connections (UDP: live flows) to the backend",
            labels=labels,
        )
        conns = CounterMetricFamily(
            "anycast_lb_backend_connections", "Connections (UDP: flows) sent to the backend", labels=labels
        )
        failures = CounterMetricFamily(
            "anycast_lb_backend_connect_failures", "Failed connects to the backend", labels=labels
        )
        nbytes = CounterMetricFamily(
            "anycast_lb_backend_bytes", "Bytes relayed, in = client to backend", labels=[*labels, "direction"]
        )
        packets = CounterMetricFamily(
            "anycast_lb_backend_packets", "UDP datagrams relayed", labels=[*labels, "direction"]
        )
        healthy = GaugeMetricFamily(
            "anycast_lb_service_healthy", "1 while min_healthy backends are up", labels=["service"]
        )
        up_backends = GaugeMetricFamily(
            "anycast_lb_service_up_backends", "Backends new flows may go to: up, not drained",
            labels=["service"]
        )
        for name, pool in self._pools.items():
            healthy.add_metric([name], 1.0 if pool.healthy else 0.0)
            up_backends.add_metric([name], float(pool.up_count))
            for b in pool.backends:
                lv = [name, b.key]
                up.add_metric(lv, 1.0 if b.up else 0.0)
                drained.add_metric(lv, 1.0 if b.drained else 0.0)
                n_active, n_conns, n_failures, n_in, n_out = (
                    self._counters(name, b) if self._counters is not None
                    else (b.active_connections, b.connections_total, b.connect_failures,
                          b.bytes_in, b.bytes_out))
                active.add_metric(lv, float(n_active))
                conns.add_metric(lv, float(n_conns))
                failures.add_metric(lv, float(n_failures))
                nbytes.add_metric([*lv, "in"], float(n_in))
                nbytes.add_metric([*lv, "out"], float(n_out))
                packets.add_metric([*lv, "in"], float(b.packets_in))
                packets.add_metric([*lv, "out"], float(b.packets_out))
        draining = GaugeMetricFamily("anycast_lb_node_draining", "1 while the node drains")
        draining.add_metric([], 1.0 if self._draining() else 0.0)
        yield from (up, drained, active, conns, failures, nbytes, packets, healthy, up_backends, draining)
        if self._extra is not None:
            yield from self._extra()


@dataclass(frozen=True, slots=True)
class Shedding:
    """What the shedding families show, read by the node at scrape time."""

    limit: int
    reserve: int
    open_descriptors: int | None
    tcp_connection_cap: int
    tcp_connections_per_source_cap: int = 0
    udp_flow_cap: Mapping[str, int] = field(default_factory=dict)
    udp_flows_per_source_cap: Mapping[str, int] = field(default_factory=dict)
    refused: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """service -> reason -> count."""
    evicted: Mapping[str, int] = field(default_factory=dict)
    accept_pauses: Mapping[str, int] = field(default_factory=dict)


def shedding_families(s: Shedding) -> Iterator[Metric]:
    """The descriptor budget and load-shedding families (module docstring)."""
    refused = CounterMetricFamily("anycast_lb_flows_refused",
                                  "New connections (TCP) or flows (UDP) refused, by reason",
                                  labels=["service", "reason"])
    for service, reasons in s.refused.items():
        for reason, count in sorted(reasons.items()):
            refused.add_metric([service, reason], float(count))
    evicted = CounterMetricFamily("anycast_lb_udp_flows_evicted",
                                  "Quiet UDP flows replaced by new ones in a full table",
                                  labels=["service"])
    for service, count in s.evicted.items():
        evicted.add_metric([service], float(count))
    pauses = CounterMetricFamily("anycast_lb_accept_paused",
                                 "Accept loop pauses for want of descriptors or memory",
                                 labels=["service"])
    for service, count in s.accept_pauses.items():
        pauses.add_metric([service], float(count))
    limit = GaugeMetricFamily("anycast_lb_descriptor_limit", "Soft RLIMIT_NOFILE planned for")
    limit.add_metric([], float(s.limit))
    reserve = GaugeMetricFamily("anycast_lb_descriptor_reserve",
                                "Descriptors kept from the data path (health, API, BGP, sync)")
    reserve.add_metric([], float(s.reserve))
    tcp_cap = GaugeMetricFamily("anycast_lb_tcp_connection_cap",
                                "Proxied TCP connections at once per process")
    tcp_cap.add_metric([], float(s.tcp_connection_cap))
    tcp_source_cap = GaugeMetricFamily("anycast_lb_tcp_connections_per_source_cap",
                                       "Proxied TCP connections one source address or prefix "
                                       "may hold at once per process")
    tcp_source_cap.add_metric([], float(s.tcp_connections_per_source_cap))
    udp_cap = GaugeMetricFamily("anycast_lb_udp_flow_cap", "UDP flows at once",
                                labels=["service"])
    for service, cap in s.udp_flow_cap.items():
        udp_cap.add_metric([service], float(cap))
    source_cap = GaugeMetricFamily("anycast_lb_udp_flows_per_source_cap",
                                   "UDP flows one source address or prefix may hold",
                                   labels=["service"])
    for service, cap in s.udp_flows_per_source_cap.items():
        source_cap.add_metric([service], float(cap))
    yield from (refused, evicted, pauses, limit, reserve, tcp_cap, tcp_source_cap, udp_cap,
                source_cap)
    if s.open_descriptors is not None:
        opened = GaugeMetricFamily("anycast_lb_descriptors_open",
                                   "Descriptors open in the node process")
        opened.add_metric([], float(s.open_descriptors))
        yield opened


@dataclass(frozen=True, slots=True)
class Traffic:
    """Per-service traffic counters, read by the node at scrape time
    (service -> count, summed over the node process and relay workers)."""

    accepted: Mapping[str, int] = field(default_factory=dict)
    """TCP services: connections accepted."""
    udp_flows: Mapping[str, int] = field(default_factory=dict)
    """UDP services: flows started."""
    udp_dropped: Mapping[str, int] = field(default_factory=dict)
    """UDP services: datagrams dropped."""


def traffic_families(t: Traffic) -> Iterator[Metric]:
    """The per-service traffic families (module docstring)."""
    for name, doc, values in (
        ("anycast_lb_connections_accepted", "TCP connections accepted past the caps", t.accepted),
        ("anycast_lb_udp_flows", "UDP flows started", t.udp_flows),
        ("anycast_lb_udp_datagrams_dropped",
         "UDP datagrams dropped (full buffer, ICMP error, new flow while not accepting)",
         t.udp_dropped),
    ):
        family = CounterMetricFamily(name, doc, labels=["service"])
        for service, count in values.items():
            family.add_metric([service], float(count))
        yield family


FamilySource = Callable[[], Iterable[Metric]]
"""A part's metric families, read at scrape time."""


def chain_families(*sources: FamilySource | None) -> Callable[[], Iterator[Metric]]:
    """One source of the families of each of ``sources`` in order (None:
    a part the node does not run)."""
    present = [s for s in sources if s is not None]

    def families() -> Iterator[Metric]:
        for source in present:
            yield from source()

    return families


VIP_STATES: tuple[AnnouncementName, ...] = (
    "announced", "draining", "damped", "withdrawn", "pending", "unconfirmed")
"""Values of the ``state`` label of ``anycast_lb_vip_state`` (``/status``'s
``announcement``)."""


def vip_families(services: Iterable[ServiceStatus],
                 changed_at: Mapping[Prefix, float]) -> Iterator[Metric]:
    """Per VIP (service with a ``bgp`` section): its announcement state
    one-hot, flap damping penalty and time to reuse (s, RFC 2439 section
    4.2), and the epoch s the route controller's decision last changed
    (``changed_at``, keyed by prefix). Services without a prefix (no ``bgp``
    section) are skipped."""
    labels = ["service", "prefix"]
    state = GaugeMetricFamily(
        "anycast_lb_vip_state",
        "1 for the VIP's announcement state (announced, draining, damped, withdrawn, pending, "
        "unconfirmed)", labels=[*labels, "state"])
    penalty = GaugeMetricFamily("anycast_lb_vip_damping_penalty",
                                "Flap damping penalty of the VIP prefix, decayed to now",
                                labels=labels)
    reuse = GaugeMetricFamily("anycast_lb_vip_damping_reuse_seconds",
                              "Seconds until a damped VIP prefix is announced again (0: not damped)",
                              labels=labels)
    changed = GaugeMetricFamily("anycast_lb_vip_last_change_timestamp_seconds",
                                "Epoch seconds the VIP's announcement decision last changed",
                                labels=labels)
    by_prefix = {str(p): at for p, at in changed_at.items()}
    for s in services:
        if s.prefix is None:
            continue
        lv = [s.name, s.prefix]
        for name in VIP_STATES:
            state.add_metric([*lv, name], 1.0 if s.announcement == name else 0.0)
        damping = s.damping
        penalty.add_metric(lv, damping.penalty if damping is not None else 0.0)
        reuse.add_metric(lv, damping.reuse_in_s if damping is not None else 0.0)
        if s.prefix in by_prefix:
            changed.add_metric(lv, by_prefix[s.prefix])
    yield from (state, penalty, reuse, changed)


def exabgp_version() -> str:
    """Version of the ExaBGP distribution installed beside anycast-lb (the
    one ``bgp.exabgp`` runs by default), "" when none is."""
    try:
        return importlib.metadata.version("exabgp")
    except importlib.metadata.PackageNotFoundError:
        return ""


class _BuildInfo(Collector):
    def __init__(self) -> None:
        self._labels = [__version__, platform.python_version(), exabgp_version()]

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("anycast_lb_build_info",
                                 "Always 1; the versions of anycast-lb, Python and ExaBGP",
                                 labels=["version", "python", "exabgp"])
        info.add_metric(self._labels, 1.0)
        yield info


class NodeMetrics:
    """The metrics registry of one node (not the process-global registry, so
    tests can run several nodes in one process). ``counters`` adds the
    relay workers' backend counters (``BackendCounterSource``);
    ``shedding`` gives the descriptor budget and shedding counters;
    ``traffic`` the per-service traffic counters."""

    def __init__(
        self,
        pools: Mapping[str, Pool],
        draining: Callable[[], bool],
        extra: Callable[[], Iterator[Metric]] | None = None,
        counters: BackendCounterSource | None = None,
        shedding: Callable[[], Shedding] | None = None,
        traffic: Callable[[], Traffic] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if shedding is not None or traffic is not None:
            more = extra

            def extra_shedding_traffic() -> Iterator[Metric]:
                if more is not None:
                    yield from more()
                if shedding is not None:
                    yield from shedding_families(shedding())
                if traffic is not None:
                    yield from traffic_families(traffic())

            extra = extra_shedding_traffic
        self.registry.register(_PoolCollector(pools, draining, extra, counters))
        self.registry.register(_BuildInfo())
        # The process-global collectors' own kind, in this node's registry.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.check_duration = Histogram(
            "anycast_lb_health_check_duration_seconds",
            "Duration of backend health checks (s)",
            ["service", "backend"],
            buckets=_CHECK_BUCKETS,
            registry=self.registry,
        )

    def observe_check(self, service: str, backend: str, seconds: float) -> None:
        self.check_duration.labels(service, backend).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)
