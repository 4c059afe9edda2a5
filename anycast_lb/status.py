"""``GET /status`` as typed models, and its published JSON schema.

The models are the single source of the document's shape: the node builds a
:class:`Status` and the API serves ``Status.model_dump(mode="json")``;
``docs/status.schema.json`` is generated from them (``anycast-lb
status-schema``), and a test keeps the committed file current.

Units are in the names: ``_ms`` milliseconds, ``_s`` seconds; times of day
are ISO 8601 UTC strings (``2026-11-21T21:00:00.123Z``). Sections of parts a
node does not run are ``null`` (``bgp`` without a ``bgp`` section,
``cluster`` without a ``cluster`` section, ``workers`` with
``forwarding.workers`` 1); so are a service's ``prefix``, ``announcement``
and ``damping`` without a ``bgp`` section.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from anycast_lb.bgp.liveness import UNCONFIRMED
from anycast_lb.bgp.policy import Prefix
from anycast_lb.config import ServiceConfig, format_host_port
from anycast_lb.pool import Pool

if TYPE_CHECKING:  # the schema needs none of the running parts
    from anycast_lb.bgp.controller import RouteDecision
    from anycast_lb.dataplane import DataPlane


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


DrainPhaseName = Literal["none", "graceful", "withdrawn"]
AnnouncementName = Literal["announced", "withdrawn", "draining", "damped", "pending",
                           "unconfirmed"]


class NodeInfo(_Model):
    name: str
    draining: bool
    drain_phase: DrainPhaseName
    """What the route policy sees: ``none``, ``graceful`` (announced with
    GRACEFUL_SHUTDOWN 65535:0, RFC 8326), ``withdrawn``."""
    drain_state: Literal["serving", "graceful", "withdrawn", "drained"]
    """The drain sequence (:mod:`anycast_lb.drain`): ``drained`` once the
    data path went idle or ``drain.timeout`` passed."""
    stopping: bool
    """A graceful stop (SIGTERM) has begun: undrain is refused."""
    pid: int
    drain_waiting: bool = False
    """With consensus: a drain was requested and waits for a drain slot
    (``consensus.drain_slot_holders`` names the holders)."""


class BackendStatus(_Model):
    address: str
    port: int
    weight: int
    state: Literal["up", "down"]
    admin: Literal["active", "drained"] = Field(
        description="drained: no new flows (established ones continue); "
                    "`anycast-lb backend drain`")
    runtime_override: bool = Field(
        description="drain or weight set at runtime on this node only, not in its file")
    last_check: str | None
    """ISO 8601 UTC time of the last health check."""
    last_latency_ms: float | None
    last_detail: str
    active_connections: int
    """Open connections (UDP: live flows), node process and relay workers."""
    connections_total: int
    connect_failures: int
    bytes_in: int
    """Bytes relayed client to backend."""
    bytes_out: int


class DampingStatus(_Model):
    penalty: float
    """Flap penalty decayed to now (RFC 2439 section 4.2)."""
    suppressed: bool
    reuse_in_s: float
    """Seconds until the prefix is reused; 0.0 when not suppressed."""


class KernelBackendCounters(_Model):
    packets: int
    bytes: int
    """Bytes of the packets (IP header on), client to backend: replies
    bypass the node (direct server return)."""


class KernelServiceStatus(_Model):
    """A service's nftables tables (``forwarding.engine: kernel``,
    docs/kernel.md). Two nodes with equal ``seed`` and ``digest`` forward
    every 5-tuple to the same backend."""

    seed: str
    """The jhash seed, ``0x`` and 8 hex digits (a function of the service config)."""
    table_size: int
    """Slots of the Maglev table (M)."""
    generation: int
    """Bumped at each change of the service's tables on this node."""
    digest: str
    """12 hex digits of sha256 over the current and previous tables."""
    draining: list[str]
    """Backends (``addr:port``) draining: new flows avoid them, flows moved
    here from another node keep them (previous table) until the promotion."""
    drained: list[str]
    """Drained backends past their promotion: only flows this node learned reach them."""
    backends: dict[str, KernelBackendCounters]
    """Per backend address: what this node forwarded to it since it entered
    the tables (read at most a second ago)."""


class ServiceStatus(_Model):
    name: str
    vip: str
    port: int
    protocol: Literal["tcp", "udp"]
    balance: Literal["maglev", "round_robin", "least_conn"]
    listen: str | None
    """The bound address ``host:port`` (``[v6]:port``), None before it binds."""
    listening: bool
    healthy: bool
    """At least ``min_healthy`` backends up and not drained."""
    min_healthy: int
    up_backends: int
    """Backends new flows may go to: up and not drained."""
    active_connections: int
    backends: list[BackendStatus]
    refused: dict[str, int]
    """New connections or flows refused, by reason (``cap``, ``source_cap``,
    ``descriptors``, ``no_backend``, ``connect_failed``)."""
    prefix: str | None = None
    """The VIP prefix announced (bgp only)."""
    announcement: AnnouncementName | None = None
    """The route controller's decision once ExaBGP acknowledged it;
    ``pending`` until it did, ``unconfirmed`` while ExaBGP does not answer
    (bgp only)."""
    damping: DampingStatus | None = None
    """bgp only."""
    table_digest: str | None = None
    """Short hash of the backend selection (Maglev table and its up set,
    :meth:`anycast_lb.pool.Pool.table_digest`): equal digests, equal
    tables. None while the table is being built."""
    table_revision: int | None = None
    """With consensus: the etcd revision of the view whose agreed set the
    table holds (None standalone)."""
    kernel: KernelServiceStatus | None = None
    """``forwarding.engine: kernel`` only: the service's nftables tables
    and per-backend packet and byte counters."""
    table_since: float | None = None
    """Wall clock s since the epoch when the table of ``table_digest`` was
    in place on this node (None while it is being built)."""


class BgpStatus(_Model):
    confirmed: bool
    """ExaBGP answered within ``confirm_deadline_s``."""
    confirmed_age_s: float
    confirm_deadline_s: float
    peers: dict[str, Literal["up", "down", "connected", "unknown"]]
    routes: dict[str, Literal["announced", "withdrawn", "pending", "unconfirmed"]]
    exabgp_pid: int | None
    exabgp_restarts: int
    announcer_connected: bool
    seq: int
    """Sequence number of the current route set."""
    exabgp_errors: int
    """Route sets ExaBGP answered ``error`` to, or did not answer in time."""


class ClusterPeerStatus(_Model):
    address: str
    port: int
    name: str
    alive: bool
    steering_receiver: bool
    in_sync: bool
    flows: int
    reported_flows: int | None
    last_heard_ms_ago: float | None
    gaps: int
    snapshots: int
    fwmark: int
    key_id: int | None


class ClusterSyncStatus(_Model):
    datagrams_received: int
    datagrams_sent: int
    send_errors: int
    rejected: dict[str, int]
    """By reason: ``unknown_peer``, ``malformed``, ``bad_mac``, ``replay``."""
    signing_key_id: int
    accepted_key_ids: list[int]
    key_file_error: str | None


class ClusterStatus(_Model):
    flow_survival: Literal["off", "starting", "active", "unavailable", "stopped"]
    reason: str | None
    address: str
    interface: str | None
    epoch: int
    seq: int
    live_peers: int
    steering_peers: int
    flows_owned: int
    steering_map_size: int
    sync_lag_p99_ms: float | None
    packets: dict[str, int]
    """Steered packets by verdict (nft counters)."""
    stale_flows_aborted: int
    sync: ClusterSyncStatus
    peers: list[ClusterPeerStatus]


class WorkerStatus(_Model):
    worker: int
    pid: int | None
    alive: bool
    listening: bool
    restarts: int
    accepted: int
    active_connections: int


class ReserveStatus(_Model):
    base: int
    listeners: int
    health: int
    api: int
    bgp: int
    cluster: int
    workers: int
    margin: int
    total: int


class LimitsStatus(_Model):
    limit: int
    """The soft RLIMIT_NOFILE planned for (descriptors)."""
    reserve: ReserveStatus
    pipes: int
    tcp_connections: int
    """Proxied TCP connections at once per process, all TCP services together."""
    tcp_connections_per_source: int
    """Of those, what one source (address or prefix) may hold."""
    udp_flows: dict[str, int]
    udp_flows_per_source: dict[str, int]
    data: int
    open_descriptors: int | None


class MemberStatus(_Model):
    name: str
    api: str
    lan: str
    version: str
    started: float
    """Wall clock s since the epoch."""


class ConsensusStatus(_Model):
    """The node's view of the cluster on etcd (docs/consensus.md)."""

    cluster: str
    state: Literal["starting", "synced", "isolated"]
    """``isolated``: etcd (a quorum) unreachable; the last agreed state is
    frozen and the node serves on its own health."""
    since: float
    """Wall clock s since the epoch when the state began."""
    since_s: float
    """Seconds in the state."""
    reason: str
    revision: int
    """etcd revision of the cluster view applied."""
    config_revision: int
    """Config revision applied or refused last (0: the node's own file)."""
    lease_silent_s: float | None
    """Seconds since the last acknowledged lease keepalive."""
    watch_lag_s: float
    members: list[MemberStatus]
    pushes_applied: int
    pushes_refused: int
    drain_slot: int | None
    """The drain slot this node holds."""
    drain_slot_holders: list[str]
    disagreement: dict[str, list[str]]
    """Per service, backends whose own health here differs from the agreed one."""


class ConfigStatus(_Model):
    """The config in effect and the live applies offered to the node
    (SIGHUP, ``POST /reload``, pushed revisions)."""

    generation: int
    """1 for the config the node started with, +1 per applied change."""
    digest: str
    """First 16 hex digits of SHA-256 over the validated config's JSON."""
    applied_at: str
    """When this generation took effect (ISO 8601 UTC)."""
    source: str | None
    """The file SIGHUP and ``POST /reload`` re-read (null: none)."""
    applies: int
    """Configs applied since start (including ones that changed nothing)."""
    refusals: int
    """Configs refused since start."""
    last_refusal: str | None
    """Why the last refused config was refused (null: none yet)."""
    last_refusal_at: str | None


class VipOwnerStatus(_Model):
    """One elected VIP (``announce.mode: active_passive``; docs/l2.md)."""

    vip: str
    via: Literal["bgp", "l2"]
    owner: str | None
    """The owner as last observed on etcd (null: vacant, or not seen yet)."""
    term: int | None
    """The owner key's create revision (fencing token; only grows)."""
    since: str | None
    """ISO 8601 UTC: when this node took the VIP, or first saw its owner."""
    role: Literal["standby", "candidate", "owner", "resigned"]
    has_vip: bool
    """This node holds the VIP now (fenced: false once its lease may lapse)."""
    qualifies: bool
    """This node can serve the VIP now (a candidate)."""


class Status(_Model):
    """The whole ``GET /status`` document."""

    node: NodeInfo
    services: list[ServiceStatus]
    bgp: BgpStatus | None = Field(description="null without a bgp section")
    cluster: ClusterStatus | None = Field(description="null without a cluster section")
    workers: list[WorkerStatus] | None = Field(
        description="null without relay workers (forwarding.workers 1)")
    limits: LimitsStatus
    consensus: ConsensusStatus | None = Field(description="null without a consensus section")
    config: ConfigStatus
    vips: list[VipOwnerStatus] | None = Field(
        description="null without a consensus section or active_passive services")


def json_schema() -> str:
    """The JSON schema of ``/status`` (docs/status.schema.json), as text."""
    return json.dumps(Status.model_json_schema(), indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------- building


def iso_utc(wall: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds, or None."""
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


def service_status(
    service: ServiceConfig,
    pool: Pool,
    data: DataPlane,
    *,
    with_bgp: bool,
    decision: RouteDecision | None,
    acked: Mapping[str, str],
    damping: Callable[[Prefix], Mapping[str, float | bool]] | None,
    table_revision: int | None = None,
    runtime_overrides: Collection[str] = frozenset(),
) -> ServiceStatus:
    """One service: its forwarder, pool, backends and (``with_bgp``) its
    announcement as the route controller decided it and ExaBGP acked it."""
    listen = data.addresses.get(service.name)
    bgp_fields: dict[str, object] = {}
    if with_bgp:
        # The controller's intent once ExaBGP acked it; "pending" until it
        # did, "unconfirmed" while ExaBGP does not answer.
        reported = acked.get(str(service.prefix))
        intent = decision.intent if decision is not None else {}
        bgp_fields = {
            "prefix": str(service.prefix),
            "announcement": reported if reported in ("pending", UNCONFIRMED)
            else intent.get(service.prefix, "withdrawn"),
            "damping": damping(service.prefix) if damping is not None else None,
        }
    return ServiceStatus.model_validate({
        "name": service.name,
        "vip": str(service.vip),
        "port": service.port,
        "protocol": service.protocol.value,
        "balance": service.balance.value,
        "listen": format_host_port(*listen) if listen is not None else None,
        "listening": data.listening(service.name),
        "healthy": pool.healthy,
        "min_healthy": service.min_healthy,
        "up_backends": pool.up_count,
        "active_connections": data.service_active(service.name),
        "backends": [
            {
                "address": b.host,
                "port": b.config.port,
                "weight": b.config.weight,
                "state": "up" if b.up else "down",
                "admin": "drained" if b.config.drain else "active",
                "runtime_override": b.key in runtime_overrides,
                "last_check": iso_utc(b.last_check),
                "last_latency_ms": None if b.last_latency_ms is None
                else round(b.last_latency_ms, 3),
                "last_detail": b.last_detail,
                **data.backend_counters(service.name, b)._asdict(),
            }
            for b in pool.backends
        ],
        "refused": data.refused(service.name)[0],
        "table_digest": pool.table_digest(),
        "table_revision": table_revision,
        "kernel": data.kernel.snapshot().get(service.name) if data.kernel is not None else None,
        "table_since": pool.table_since(),
        **bgp_fields,
    })
