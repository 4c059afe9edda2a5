"""Node configuration: the one source of truth (pydantic v2 models).

Shape of the YAML file (``docs/config.md`` has every field, and
``docs/config.schema.json`` is generated from these models)::

    node: {name: lb1}
    api: {listen: 127.0.0.1:9180, admin_token_file: /etc/anycast-lb/token}
    drain: {timeout: 30, announce_grace: 2}
    services:
      - name: web
        vip: 198.51.100.10
        port: 80
        protocol: tcp
        backends: [{address: 203.0.113.130, port: 8080, weight: 1}]
        health: {kind: http, path: /healthz}
    bgp: {...}            # optional; without it the node is a plain L4 LB
    cluster: {...}        # optional; flow survival over a node LAN

Every model is frozen and forbids unknown keys. Durations are seconds
(floats) unless a field says otherwise. ``load_config`` raises
:class:`~anycast_lb.errors.ConfigError` listing one line per problem, each
naming the field path (``services[0].backends[1].port: ...``).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from anycast_lb import rules
from anycast_lb.consensus.keys import client_target
from anycast_lb.errors import ConfigError
from anycast_lb.yamlload import field_path, load_yaml


def _ip(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None
    return value


IPAddress = Annotated[ipaddress.IPv4Address | ipaddress.IPv6Address, BeforeValidator(_ip)]
# Strict: YAML's `true` is not port 1 and `1.5` is not port 1; durations
# (StrictFloat) take ints and floats, never bools or strings.
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Seconds = Annotated[StrictFloat, Field(gt=0, le=86400)]

Name = Annotated[
    str,
    AfterValidator(rules.check_name),
    Field(json_schema_extra={"pattern": f"^{rules.NAME_PATTERN}$"}),
]
"""Node and service names (:func:`anycast_lb.rules.check_name`)."""
Community = Annotated[
    str,
    AfterValidator(rules.check_community),
    Field(json_schema_extra={"pattern": "^[0-9]{1,5}:[0-9]{1,5}$"}),
]
"""An RFC 1997 community ``ASN:VALUE`` (:func:`anycast_lb.rules.check_community`,
the rule the ExaBGP line renderer applies)."""
LargeCommunity = Annotated[
    str,
    AfterValidator(rules.check_large_community),
    Field(json_schema_extra={"pattern": rules.LARGE_COMMUNITY_PATTERN}),
]
"""An RFC 8092 large community ``ASN:DATA1:DATA2``
(:func:`anycast_lb.rules.check_large_community`)."""
ExtendedCommunity = Annotated[
    str,
    AfterValidator(rules.check_extended_community),
    Field(json_schema_extra={"pattern": rules.EXTENDED_COMMUNITY_PATTERN}),
]
"""An RFC 4360 route target or origin ``target:ADMIN:N`` / ``origin:ADMIN:N``
(:func:`anycast_lb.rules.check_extended_community`)."""
Argument = Annotated[str, AfterValidator(rules.check_argument)]
"""One argv word: non-empty, no control characters."""


def _path(value: Any) -> Any:
    if isinstance(value, str):
        rules.check_argument(value)
    return value


FilePath = Annotated[Path, BeforeValidator(_path)]
"""A file path: non-empty, no control characters (NUL cannot reach open())."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Transport(str, Enum):
    """A service's layer-4 protocol (``services[].protocol``)."""

    TCP = "tcp"
    UDP = "udp"


class Balance(str, Enum):
    MAGLEV = "maglev"
    ROUND_ROBIN = "round_robin"
    LEAST_CONN = "least_conn"


class HashKey(str, Enum):
    FIVE_TUPLE = "five_tuple"
    SOURCE_IP = "source_ip"


class HealthKind(str, Enum):
    TCP = "tcp"
    HTTP = "http"
    EXEC = "exec"
    UDP = "udp"
    DNS = "dns"
    NONE = "none"


DNS_TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16,
             "AAAA": 28, "SRV": 33}
"""Query types a ``dns`` check may ask for (RFC 1035 section 3.2.2, RFC 3596, RFC 2782)."""


class DnsRcode(str, Enum):
    """Response codes a ``dns`` check may accept (RFC 1035 section 4.1.1)."""

    NOERROR = "NOERROR"
    FORMERR = "FORMERR"
    SERVFAIL = "SERVFAIL"
    NXDOMAIN = "NXDOMAIN"
    NOTIMP = "NOTIMP"
    REFUSED = "REFUSED"

    @property
    def code(self) -> int:
        return list(DnsRcode).index(self)


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
    return value


def _hex(value: str) -> str:
    try:
        bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{value!r} is not hex bytes, e.g. '0a1bff'") from None
    return value


def parse_host_port(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Parse ``host:port`` or ``[v6]:port`` into an address and a port.

    Raises ValueError naming what is wrong.
    """
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("IPv6 listen address must look like [::1]:9180")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("expected host:port, e.g. 127.0.0.1:9180")
        if ":" in host:
            raise ValueError("write an IPv6 address in brackets, e.g. [::1]:9180")
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"{host!r} is not an IP address") from exc
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 0 <= int(port) <= 65535:
        raise ValueError(f"{port!r} is not a port (0-65535)")
    return address, int(port)


def format_host_port(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | str, port: int
) -> str:
    """``198.51.100.1:80`` or ``[2001:db8::1]:80``."""
    address = ipaddress.ip_address(address)
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


class NodeSection(_Model):
    name: Name = "lb1"


class ApiConfig(_Model):
    listen: str = "127.0.0.1:9180"
    """``host:port``; IPv6 as ``[::1]:9180``. Port 0 picks a free port."""
    admin_token_file: FilePath | None = None
    """File holding the bearer token for POST /drain and /undrain. It must be
    a regular file readable by its owner only (no group or other permission
    bits): the node refuses to start otherwise."""
    max_connections: Annotated[StrictInt, Field(ge=1, le=65535)] = 256
    """Concurrent API connections; past it a new connection gets a
    best-effort 503 and is closed at once."""
    header_timeout: Annotated[StrictFloat, Field(gt=0, le=3600)] = 5.0
    """Seconds a connection may go without a request in progress: the time a
    client has to send a whole request line and headers after connecting or
    after its previous answer (so also the keep-alive idle limit)."""
    body_timeout: Annotated[StrictFloat, Field(gt=0, le=3600)] = 5.0
    """Seconds a client has to send a whole request body once its headers
    are in (408 after that)."""
    max_body_size: Annotated[StrictInt, Field(ge=1, le=16 * 1024 * 1024)] = 65536
    """Largest request body in bytes (413 past it)."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @property
    def host_port(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
        return parse_host_port(self.listen)


def _etcd_url(value: str) -> str:
    client_target(value)
    return value


class DrainConfig(_Model):
    timeout: Annotated[StrictFloat, Field(ge=0, le=86400)] = 30.0
    """Seconds established connections may keep running after a drain starts."""
    announce_grace: Annotated[StrictFloat, Field(ge=0, le=3600)] = 2.0
    """Seconds the GRACEFUL_SHUTDOWN announcement (RFC 8326) stays up before
    the withdraw, so routers move traffic away first."""
    max_concurrent: Annotated[StrictInt, Field(ge=1, le=64)] = 1
    """With consensus: nodes of the cluster that may drain at once."""
    slot_timeout: Annotated[StrictFloat, Field(ge=0, le=3600)] = 10.0
    """With consensus: seconds SIGTERM waits for a drain slot before it
    drains anyway (shutdown never hangs on etcd)."""


class ConsensusConfig(_Model):
    """Optional: agreed config, membership and backend health on an etcd
    cluster (docs/consensus.md). Absent: the node runs standalone."""

    endpoints: list[Annotated[str, AfterValidator(_etcd_url)]] = Field(min_length=1, max_length=15)
    """etcd client URLs, ``http://IPV4:PORT``, used round-robin."""
    cluster: Name
    """Keys live under ``/anycast-lb/<cluster>/``."""
    lease_ttl: Annotated[StrictFloat, Field(ge=1, le=60)] = 2.0
    """Seconds the member key and health votes outlive the node's last
    keepalive (etcd rounds up to whole seconds)."""
    request_timeout: Annotated[StrictFloat, Field(gt=0, le=10)] = 0.5
    """Seconds any one etcd call may take before etcd counts as unreachable."""

    @model_validator(mode="after")
    def _keepalive_fits(self) -> ConsensusConfig:
        # A keepalive goes out every lease_ttl/3 s; each must be able to fail
        # by its deadline before the next is due.
        if self.request_timeout * 3 > self.lease_ttl:
            raise ValueError(f"request_timeout ({self.request_timeout} s) must be at most "
                             f"lease_ttl / 3 ({self.lease_ttl / 3:.3g} s)")
        return self


class BackendConfig(_Model):
    address: IPAddress
    port: Port
    weight: Annotated[StrictInt, Field(ge=1, le=1000)] = 1
    drain: StrictBool = False
    """Admin drain: the backend gets no new flows (out of the Maglev table, as
    if down) and keeps its established ones. Set at runtime with
    ``anycast-lb backend drain`` (node-local, or pushed with consensus)."""

    @model_serializer(mode="wrap")
    def _omit_undrained(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # ``drain: false`` is left out of dumps, so a config without a drain
        # dumps (digest, pushed shared document) as before the field existed:
        # nodes of an older version take such revisions during an upgrade.
        data: dict[str, Any] = handler(self)
        if not self.drain:
            data.pop("drain", None)
        return data

    @property
    def key(self) -> str:
        """Stable backend name, ``addr:port``: the Maglev table hashes it, so
        every node given the same pool builds the same table."""
        return format_host_port(self.address, self.port)


class HealthConfig(_Model):
    kind: HealthKind = HealthKind.TCP
    port: Port | None = None
    """Port to probe; the backend's own port when unset."""
    path: Annotated[str, AfterValidator(rules.check_http_path)] = "/healthz"
    """HTTP only: request path, ``/`` then visible ASCII (percent-encode the rest)."""
    expect_status: list[Annotated[StrictInt, Field(ge=100, le=599)]] = Field(
        default_factory=lambda: list(range(200, 300)), min_length=1
    )
    """HTTP only: status codes counted as healthy (default any 2xx)."""
    host: Annotated[str, AfterValidator(rules.check_http_host)] | None = None
    """HTTP only: Host header, ``host`` or ``host:port`` (default the backend address)."""
    command: list[Argument] | None = None
    """exec only: argv run with env BACKEND_ADDRESS, BACKEND_PORT; exit 0 = healthy."""
    payload: Annotated[str, Field(min_length=1, max_length=1400)] | None = None
    """udp only: the datagram sent, as UTF-8 text (``payload`` or
    ``payload_hex`` is required: asyncio cannot send an empty datagram)."""
    payload_hex: Annotated[str, AfterValidator(_hex), Field(min_length=2, max_length=2800)] | None = None
    """udp only: the datagram sent, as hex bytes (instead of ``payload``)."""
    expect: Annotated[str, AfterValidator(_regex), Field(max_length=1024)] | None = None
    """udp only: a regular expression the reply must contain (``re.search``
    on the reply's bytes read as Latin-1, so ``^\\x00`` matches a leading
    zero byte); unset = any reply is healthy."""
    query_name: Annotated[str, AfterValidator(rules.check_dns_name)] | None = None
    """dns only: the name asked for (unset: ``.``, the root)."""
    query_type: Literal["A", "NS", "CNAME", "SOA", "PTR", "MX", "TXT", "AAAA", "SRV"] | None = None
    """dns only: the type asked for (unset: ``SOA``)."""
    expect_rcode: Annotated[list[DnsRcode], Field(min_length=1)] | None = None
    """dns only: response codes counted as healthy (unset: ``[NOERROR]``)."""
    interval: Seconds = 2.0
    fast_interval: Seconds = 0.2
    """Seconds between checks while a backend is rising or falling."""
    timeout: Seconds = 1.0
    rise: Annotated[StrictInt, Field(ge=1, le=100)] = 2
    fall: Annotated[StrictInt, Field(ge=1, le=100)] = 3

    @model_validator(mode="after")
    def _kind_fields(self) -> HealthConfig:
        if self.kind is HealthKind.EXEC and not self.command:
            raise ValueError("kind exec needs a non-empty command list")
        if self.kind is not HealthKind.EXEC and self.command:
            raise ValueError(f"command is only for kind exec, not {self.kind.value}")
        udp_only = [f for f in ("payload", "payload_hex", "expect") if getattr(self, f) is not None]
        if self.kind is not HealthKind.UDP and udp_only:
            raise ValueError(f"{', '.join(udp_only)}: only for kind udp, not {self.kind.value}")
        if self.payload is not None and self.payload_hex is not None:
            raise ValueError("set payload or payload_hex, not both")
        if self.kind is HealthKind.UDP and self.payload is None and self.payload_hex is None:
            raise ValueError("kind udp needs payload (text) or payload_hex (bytes)")
        dns_only = [f for f in ("query_name", "query_type", "expect_rcode")
                    if getattr(self, f) is not None]
        if self.kind is not HealthKind.DNS and dns_only:
            raise ValueError(f"{', '.join(dns_only)}: only for kind dns, not {self.kind.value}")
        if self.timeout > self.interval:
            raise ValueError("timeout must not exceed interval")
        return self


_IFNAME_RE = r"^[A-Za-z0-9_.-]{1,15}$"  # IFNAMSIZ - 1; no quotes or spaces reach nft or ip


class AnnounceMode(str, Enum):
    ACTIVE_ACTIVE = "active_active"
    ACTIVE_PASSIVE = "active_passive"


class AnnounceVia(str, Enum):
    BGP = "bgp"
    L2 = "l2"


class ServiceAnnounce(_Model):
    """How a service's VIP is announced (docs/l2.md)."""

    mode: AnnounceMode = AnnounceMode.ACTIVE_ACTIVE
    """``active_active``: every healthy node announces (the default).
    ``active_passive``: one owner at a time, elected on etcd; without a
    ``consensus`` section, over BGP, it means prepend-only: every node
    announces with its own ``bgp.announce.as_path_prepend`` (no election,
    the router decides)."""
    via: AnnounceVia = AnnounceVia.BGP
    """``bgp`` or ``l2`` (gratuitous ARP / unsolicited NA on
    ``election.interface``; needs ``mode: active_passive`` and ``consensus``)."""

    @model_validator(mode="after")
    def _l2_is_passive(self) -> ServiceAnnounce:
        if self.via is AnnounceVia.L2 and self.mode is not AnnounceMode.ACTIVE_PASSIVE:
            raise ValueError("via: l2 gives each VIP one owner at a time: set mode: active_passive")
        return self


class StandbyMode(str, Enum):
    WITHDRAW = "withdraw"
    PREPEND = "prepend"


class ElectionConfig(_Model):
    """This node's part in VIP ownership elections (``active_passive``
    services; docs/l2.md). Node-local."""

    priority: Annotated[StrictInt, Field(ge=0, le=65535)] = 100
    """Higher wins a vacant VIP first."""
    preempt: StrictBool = False
    """Take a VIP over from a lower-priority owner (make before break)."""
    safety_margin: Annotated[StrictFloat, Field(gt=0, le=10)] = 0.25
    """Seconds before etcd could expire this node's lease at which an owner
    that could not renew drops its VIPs (fencing)."""
    handover_timeout: Seconds = 1.0
    """Seconds a resigning owner (drain, preemption) keeps a VIP waiting for
    its successor's announcement (make before break) before it drops it
    anyway; never past its fencing deadline."""
    standby: StandbyMode = StandbyMode.WITHDRAW
    """BGP active-passive: a standby withdraws, or announces with
    ``bgp.announce.as_path_prepend`` (at least 1) as a warm standby; the
    owner announces with no prepend."""
    interface: Annotated[str, Field(pattern=_IFNAME_RE)] | None = None
    """``via: l2``: the interface on the VIPs' segment (VIPs are added and
    announced there)."""


class ServiceConfig(_Model):
    name: Name
    vip: IPAddress
    port: Port
    protocol: Transport = Transport.TCP
    balance: Balance = Balance.MAGLEV
    hash_key: HashKey = HashKey.FIVE_TUPLE
    min_healthy: Annotated[StrictInt, Field(ge=1)] = 1
    proxy_protocol: StrictBool = False
    """Send a PROXY protocol v2 header to backends (TCP only)."""
    connect_timeout: Seconds = 1.0
    idle_timeout: Seconds | None = None
    """Seconds a connection (TCP, default 300) or flow (UDP, default 30) may idle."""
    max_flows: Annotated[StrictInt, Field(ge=1, le=10_000_000)] = 65536
    """UDP: most client flows kept at once. Each costs one descriptor, so
    when unset the node lowers it to this service's share of the open-file
    budget (docs/limits.md); when set, it must fit that budget. Past it, a
    new flow replaces the least recently used flow if that one has been
    quiet for idle_timeout/8 s, else its datagram is dropped and counted."""
    max_flows_per_source: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | None = None
    """UDP: most flows one source (an address, or a prefix, see
    source_prefix_v4/v6) may hold; past it its new flows are dropped and
    counted. Default: a quarter of the service's flow cap."""
    source_prefix_v4: Annotated[StrictInt, Field(ge=8, le=32)] = 32
    """Prefix length grouping IPv4 clients for max_flows_per_source (32: per address)."""
    source_prefix_v6: Annotated[StrictInt, Field(ge=16, le=128)] = 64
    """Prefix length grouping IPv6 clients for max_flows_per_source (64: per subnet)."""
    maglev_table_size: Annotated[StrictInt, Field(ge=7, le=1_000_003)] = 65537
    backends: list[BackendConfig] = Field(min_length=1)
    health: HealthConfig = Field(default_factory=HealthConfig)
    announce: ServiceAnnounce = Field(default_factory=ServiceAnnounce)
    """Active-active (default) or active-passive, over BGP or L2 (docs/l2.md)."""
    manage_address: StrictBool = False
    """Put the VIP on ``lo`` (a /32 or /128) when the node starts, and take
    it off when the node stops, only if the node added it (it was not there
    already). Needs root or ``CAP_NET_ADMIN``. Without it the VIP must be on
    a local interface before the node starts, or the listener cannot bind
    ("Cannot assign requested address"). Not with ``announce.via: l2`` (the
    election puts the VIP on ``election.interface`` on its owner only)."""

    @field_validator("maglev_table_size")
    @classmethod
    def _prime(cls, value: int) -> int:
        if not _is_prime(value):
            raise ValueError("must be a prime (Maglev, NSDI 2016, section 3.4)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServiceConfig:
        if self.min_healthy > len(self.backends):
            raise ValueError(
                f"min_healthy ({self.min_healthy}) exceeds the number of backends "
                f"({len(self.backends)})"
            )
        if self.protocol is Transport.TCP and self.max_flows_per_source is not None:
            raise ValueError("max_flows_per_source is for udp services "
                             "(tcp: forwarding.max_tcp_connections_per_source)")
        if self.proxy_protocol and self.protocol is Transport.UDP:
            raise ValueError("proxy_protocol is only supported for tcp services")
        if self.manage_address and self.announce.via is AnnounceVia.L2:
            raise ValueError("manage_address cannot be combined with announce.via: l2 (the "
                             "election puts the VIP on election.interface on its owner only; "
                             "on lo every standby would answer ARP for it)")
        seen: set[str] = set()
        for backend in self.backends:
            if backend.key in seen:
                raise ValueError(f"duplicate backend {backend.key}")
            seen.add(backend.key)
        return self

    @property
    def effective_idle_timeout(self) -> float:
        if self.idle_timeout is not None:
            return self.idle_timeout
        return 30.0 if self.protocol is Transport.UDP else 300.0

    @property
    def prefix(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The VIP's anycast host prefix (/32 or /128)."""
        return ipaddress.ip_network(self.vip)


class PeerConfig(_Model):
    address: IPAddress
    peer_as: Annotated[StrictInt, Field(ge=1, le=rules.MAX_U32)]


class AnnounceConfig(_Model):
    med: Annotated[StrictInt, Field(ge=0, le=rules.MAX_U32)] = 100
    """Must be the same on every node, or ECMP drops the odd one out."""
    communities: list[Community] = Field(
        default_factory=list, max_length=rules.MAX_COMMUNITIES - 1
    )
    """RFC 1997 communities ``ASN:VALUE``; at most 31, leaving room for the
    GRACEFUL_SHUTDOWN community a drain adds (RFC 8326)."""
    large_communities: list[LargeCommunity] = Field(
        default_factory=list, max_length=rules.MAX_COMMUNITIES
    )
    """RFC 8092 large communities ``ASN:DATA1:DATA2`` (0-4294967295 each)."""
    extended_communities: list[ExtendedCommunity] = Field(
        default_factory=list, max_length=rules.MAX_COMMUNITIES
    )
    """RFC 4360 extended communities ``target:ADMIN:N`` or ``origin:ADMIN:N``."""
    as_path_prepend: Annotated[StrictInt, Field(ge=0, le=rules.MAX_AS_PATH_PREPEND)] = 0
    withdraw_on_down: StrictBool = True
    down_med: Annotated[StrictInt, Field(ge=0, le=rules.MAX_U32)] = 1000


class DampingConfig(_Model):
    """Origin-side flap damping (the idea of RFC 2439 section 4.2)."""

    enabled: StrictBool = True
    penalty: Annotated[StrictFloat, Field(gt=0)] = 1000.0
    """Added per withdraw."""
    suppress: Annotated[StrictFloat, Field(gt=0)] = 3000.0
    reuse: Annotated[StrictFloat, Field(gt=0)] = 750.0
    half_life: Seconds = 30.0
    max_suppress: Seconds = 300.0

    @model_validator(mode="after")
    def _thresholds(self) -> DampingConfig:
        if self.reuse >= self.suppress:
            raise ValueError("reuse must be below suppress")
        # The penalty is capped where it decays to reuse after max_suppress
        # (RFC 2439 section 4.2); below suppress, nothing could ever be held down.
        # In log space: 2 ** (max_suppress / half_life) overflows a float.
        if self.max_suppress / self.half_life < math.log2(self.suppress / self.reuse):
            raise ValueError("reuse * 2^(max_suppress/half_life) must reach suppress, "
                             "or damping never holds a prefix down")
        return self


class BgpConfig(_Model):
    local_as: Annotated[StrictInt, Field(ge=1, le=rules.MAX_U32)]
    router_id: ipaddress.IPv4Address
    local_address: IPAddress
    """The sessions' local address; every peer must be of its family."""
    next_hop_v4: ipaddress.IPv4Address | None = None
    """Next hop of IPv4 VIPs; unset = ``self`` (``local_address``), which
    needs IPv4 sessions. Set it to announce IPv4 VIPs over IPv6 sessions."""
    next_hop_v6: ipaddress.IPv6Address | None = None
    """Next hop of IPv6 VIPs; unset = ``self`` (``local_address``), which
    needs IPv6 sessions. Set it (the node's IPv6 address on the peering
    link) to announce IPv6 VIPs over IPv4 sessions: dual stack (RFC 4760)."""
    hold_time: Annotated[StrictInt, Field(ge=0, le=65535)] = 3
    """Seconds; 0 or at least 3 (RFC 4271 section 4.2)."""
    peers: list[PeerConfig] = Field(min_length=1)
    announce: AnnounceConfig = Field(default_factory=AnnounceConfig)
    damping: DampingConfig = Field(default_factory=DampingConfig)
    exabgp: Argument = "exabgp"
    """ExaBGP executable (5.x, started as ``exabgp server CONF``; tested from 5.0.10)."""
    refresh_interval: Seconds = 30.0
    """Seconds between safety-net re-announcements of the whole route set."""
    node_timeout: Seconds = 0.6
    """Seconds the announcer waits for word from the node before it stops
    trusting it and withdraws everything (a hung node)."""

    @field_validator("hold_time")
    @classmethod
    def _hold(cls, value: int) -> int:
        if value in (1, 2):
            raise ValueError("hold time must be 0 or at least 3 s (RFC 4271 section 4.2)")
        return value

    @model_validator(mode="after")
    def _families(self) -> BgpConfig:
        for peer in self.peers:
            if peer.address.version != self.local_address.version:
                raise ValueError(
                    f"peer {peer.address} is not in the family of local_address {self.local_address}"
                )
        for hop in (self.next_hop_v4, self.next_hop_v6):
            if hop is not None and (hop.is_unspecified or hop.is_multicast or (hop.is_loopback
                                    and not self.local_address.is_loopback)):
                raise ValueError(f"next hop {hop} cannot be a next hop")
        return self

    def next_hop(self, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The next hop for VIPs of IP ``version`` (4 or 6); None means ``self``.

        Raises ValueError if the sessions cannot carry that family: another
        family than ``local_address``'s with no ``next_hop_v4``/``next_hop_v6``.
        """
        hop = self.next_hop_v4 if version == 4 else self.next_hop_v6
        if hop is None and version != self.local_address.version:
            raise ValueError(
                f"IPv{version} VIPs over IPv{self.local_address.version} sessions need "
                f"bgp.next_hop_v{version} (next-hop self is an IPv{self.local_address.version} "
                "address)"
            )
        return hop

    def families(self) -> tuple[int, ...]:
        """IP versions the sessions negotiate (RFC 4760 multiprotocol): the
        family of ``local_address``, and the other one when its next hop is set."""
        return tuple(v for v in (4, 6) if v == self.local_address.version
                     or (self.next_hop_v4 if v == 4 else self.next_hop_v6) is not None)


class Engine(str, Enum):
    RELAY = "relay"
    ASYNCIO = "asyncio"
    KERNEL = "kernel"


class KernelEngineConfig(_Model):
    """``forwarding.engine: kernel``: Maglev in nftables with direct server
    return (docs/kernel.md). IPv4 backends on the interface's L2 segment,
    each holding the VIP on ``lo`` (``anycast-lb backend-setup``)."""

    interface: str = Field(pattern=_IFNAME_RE)
    """The LAN-facing interface: packets leave on it for the backend, and
    VIP packets arrive on it (netdev ingress hook) unless ``ingress`` names
    another."""
    ingress: str | None = Field(default=None, pattern=_IFNAME_RE)
    """The interface client packets for the VIPs arrive on, when it is not
    ``interface`` (a node with an uplink to its router and a leg on the
    backends' segment); None: ``interface``."""
    table: str = Field(default="anycast_lb_fwd", pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
    """Name of the ``netdev`` nftables table the node owns (created and deleted whole)."""
    flow_timeout: Annotated[StrictInt, Field(ge=1, le=86400)] = 300
    """Seconds an idle flow stays in the per-node flow map (keeps a drained
    backend's flows on it)."""
    flow_map_size: Annotated[StrictInt, Field(ge=1024, le=16_777_216)] = 262144
    """Most flows per service in the per-node flow map; past it new flows
    are not learned (they still follow the tables)."""


class ForwardingConfig(_Model):
    """How TCP bytes are moved (UDP always runs on the event loop)."""

    engine: Engine = Engine.RELAY
    """``relay``: a dedicated non-blocking epoll loop in its own thread, with
    zero-copy ``os.splice`` (Linux). ``asyncio``: asyncio Protocols on the
    node's event loop (portable; used automatically where epoll is missing).
    ``kernel``: packets forwarded by nftables to a backend on the same L2
    segment, which answers the client directly (docs/kernel.md)."""
    kernel: KernelEngineConfig | None = None
    """Required with ``engine: kernel``."""
    splice: StrictBool = True
    """relay only: move bytes with ``os.splice`` through a pipe where the
    platform has it; else ``recv_into``/``send`` through a user buffer."""
    buffer_size: Annotated[StrictInt, Field(ge=4096, le=16 * 1024 * 1024)] = 65536
    """Bytes moved per read, and the pipe size (splice) or user buffer size
    per direction in flight: at most this much is held per direction."""
    workers: Annotated[StrictInt, Field(ge=1, le=64)] = 1
    """relay only: processes accepting on the same listeners with
    SO_REUSEPORT, to use more than one core: the node's own relay thread
    plus workers - 1 worker processes for the TCP services
    (``anycast_lb.forward.workers``). Not with ``cluster.flow_survival``."""
    max_tcp_connections: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | None = None
    """Most proxied TCP connections open at once in one process (the node,
    and each relay worker), over all TCP services; past it new connections
    are reset at once and counted. Each costs two descriptors. Default: the
    TCP share of the open-file budget (docs/limits.md); when set, it must
    fit that budget."""
    max_tcp_connections_per_source: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | None = None
    """Most of those connections one source (an address, or a prefix, see
    tcp_source_prefix_v4/v6) may hold at once in one process, over all TCP
    services; past it its new connections are reset at once and counted
    (``source_cap``), so one client's idle connections cannot take the
    whole cap. Default: a quarter of the TCP cap; at most the cap."""
    tcp_source_prefix_v4: Annotated[StrictInt, Field(ge=8, le=32)] = 32
    """Prefix length grouping IPv4 clients for max_tcp_connections_per_source
    (32: per address)."""
    tcp_source_prefix_v6: Annotated[StrictInt, Field(ge=16, le=128)] = 64
    """Prefix length grouping IPv6 clients for max_tcp_connections_per_source
    (64: per subnet)."""


_NFT_NAME_RE = r"^[A-Za-z][A-Za-z0-9_]{0,31}$"
MAX_CLUSTER_PEERS = 63
"""Peers one node can steer to: each takes an fwmark and a routing table."""


def _peer(value: Any) -> Any:
    """Accept ``"203.0.113.2"`` or ``"203.0.113.2:7946"`` as well as a mapping."""
    if isinstance(value, str):
        if value.count(":") == 1:
            host, _, port = value.partition(":")
            # ASCII digits only; anything else stays a string the strict port refuses.
            return {"address": host, "port": int(port) if re.fullmatch("[0-9]{1,5}", port) else port}
        return {"address": value}
    return value


class ClusterPeer(_Model):
    address: ipaddress.IPv4Address
    """The peer's node LAN address."""
    port: Port | None = None
    """Its sync port; ``cluster.port`` when unset."""


class ClusterConfig(_Model):
    """Flow survival: nodes share which flows they own over a node LAN and
    steer packets of a peer's flows to it (docs/cluster.md).

    IPv4 only for now: the node LAN, the peers and the VIPs of TCP services.
    """

    flow_survival: StrictBool = True
    """Steer packets of flows owned by a live peer to it (needs root and
    nftables). False: only heartbeats, for membership in /status."""
    address: ipaddress.IPv4Address
    """This node's address on the node LAN; the sync endpoint binds it."""
    port: Port = 7946
    """UDP port of the sync endpoint (heartbeats, deltas, snapshots)."""
    interface: str = Field(pattern=_IFNAME_RE)
    """The node LAN interface: steered packets leave and arrive on it."""
    peers: list[Annotated[ClusterPeer, BeforeValidator(_peer)]] = Field(min_length=1)
    """Every node of the cluster; an entry equal to this node's own
    address:port is skipped, so all nodes may share one list."""
    heartbeat_interval: Annotated[StrictFloat, Field(gt=0, le=10)] = 0.1
    """Seconds between heartbeats to each peer."""
    peer_expiry: Annotated[StrictFloat, Field(gt=0, le=60)] = 0.4
    """Seconds without word from a peer before it counts as dead."""
    snapshot_interval: Annotated[StrictFloat, Field(gt=0, le=3600)] = 5.0
    """Seconds between full snapshots of the owned flows to each peer."""
    publish_delay: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.01
    """Seconds new and closed flows are gathered before one delta goes out."""
    publish_min_age: Annotated[StrictFloat, Field(ge=0, le=60)] = 0.2
    """Seconds a flow must have lived before it is published to the peers (0:
    at once). Shorter flows cost the peers no steering-map change; if ECMP
    moves one, the second chance (a copy to each live peer) still finds its
    owner. Only a silently dead owner's flows younger than this get no fast
    RST (they are in no dead set)."""
    apply_interval: Annotated[StrictFloat, Field(gt=0, le=5)] = 0.05
    """Least seconds between two batched updates of the steering map (``nft -f``
    transactions); an update starts as soon as there is work."""
    dead_flow_timeout: Annotated[StrictFloat, Field(ge=1, le=86400)] = 30.0
    """Seconds a dead peer's last published flows stay marked, so their
    packets get an immediate RST here instead of a second chance."""
    max_datagram: Annotated[StrictInt, Field(ge=256, le=65000)] = 1400
    """Largest sync datagram in bytes (keep it under the LAN MTU)."""
    fwmark_base: Annotated[StrictInt, Field(ge=1, le=0xFFFFFFFF - MAX_CLUSTER_PEERS)] = 0x1B0000
    """Packets for peer i (its index in the sorted peer list) get fwmark base + i."""
    route_table_base: Annotated[StrictInt, Field(ge=1, le=0xFFFFFFF0 - MAX_CLUSTER_PEERS)] = 4200
    """Routing table base + i routes peer i's packets to it."""
    rule_priority: Annotated[StrictInt, Field(ge=1, le=32000)] = 100
    """Policy rule priority of the first fwmark rule; the ``lookup local``
    rule moves from 0 to rule_priority + 64, below the fwmark rules."""
    nft_table: str = Field(default="anycast_lb", pattern=_NFT_NAME_RE)
    """Name of the ``ip`` nftables table the node owns (created and deleted whole)."""
    key_file: FilePath
    """File of the sync key(s), base64, one per line: the first signs, every
    one (at most two, for rotation) verifies; at least 16 bytes each, mode
    0600 (docs/cluster.md). Make one with ``head -c 32 /dev/urandom | base64``.
    Read at start and again within 1 s of a change."""

    @model_validator(mode="after")
    def _consistent(self) -> ClusterConfig:
        if self.peer_expiry <= self.heartbeat_interval:
            raise ValueError("peer_expiry must exceed heartbeat_interval")
        seen: set[tuple[str, int]] = set()
        for peer in self.peers:
            endpoint = (str(peer.address), peer.port or self.port)
            if endpoint in seen:
                raise ValueError(f"duplicate peer {endpoint[0]}:{endpoint[1]}")
            seen.add(endpoint)
        if len(self.remote_peers) > MAX_CLUSTER_PEERS:
            raise ValueError(f"at most {MAX_CLUSTER_PEERS} peers besides this node")
        return self

    @property
    def remote_peers(self) -> list[tuple[ipaddress.IPv4Address, int]]:
        """The other nodes as (LAN address, sync port), sorted: the index
        in this list picks the fwmark and routing table of each peer."""
        own = (self.address, self.port)
        return sorted(
            {(p.address, p.port or self.port) for p in self.peers} - {own}
        )


class NodeConfig(_Model):
    node: NodeSection = Field(default_factory=NodeSection)
    api: ApiConfig = Field(default_factory=ApiConfig)
    drain: DrainConfig = Field(default_factory=DrainConfig)
    forwarding: ForwardingConfig = Field(default_factory=ForwardingConfig)
    services: list[ServiceConfig] = Field(min_length=1)
    bgp: BgpConfig | None = None
    cluster: ClusterConfig | None = None
    """Optional: flow survival across drains and ECMP changes (docs/cluster.md)."""
    consensus: ConsensusConfig | None = None
    """Optional: agreed state on etcd (docs/consensus.md); absent = standalone."""
    election: ElectionConfig = Field(default_factory=ElectionConfig)
    """This node's priority, preempt and fencing margin for active-passive VIPs."""

    @property
    def managed_vips(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """The VIPs the node puts on ``lo`` (``manage_address: true`` on any
        service with that VIP), each once, in config order."""
        return list(dict.fromkeys(s.vip for s in self.services if s.manage_address))

    @model_validator(mode="after")
    def _unique(self) -> NodeConfig:
        names: set[str] = set()
        listeners: set[tuple[str, int, str]] = set()
        problems = []
        for service in self.services:
            if service.name in names:
                problems.append(f"duplicate service name {service.name!r}")
            names.add(service.name)
            listener = (str(service.vip), service.port, service.protocol.value)
            if listener in listeners:
                problems.append(
                    f"duplicate VIP:port {format_host_port(service.vip, service.port)}"
                    f"/{service.protocol.value} (service {service.name!r})"
                )
            listeners.add(listener)
        if self.bgp is not None:
            # via: l2 VIPs are never announced over BGP.
            for service in (s for s in self.services if s.announce.via is not AnnounceVia.L2):
                try:
                    self.bgp.next_hop(service.vip.version)
                except ValueError as exc:
                    problems.append(f"VIP {service.vip} (service {service.name!r}): {exc}")
        if self.cluster is not None and self.cluster.flow_survival:
            for service in self.services:
                if service.protocol is Transport.TCP and service.vip.version != 4:
                    problems.append(
                        f"VIP {service.vip} (service {service.name!r}): flow survival "
                        "supports IPv4 VIPs only for now (set cluster.flow_survival: false)"
                    )
            if self.forwarding.workers > 1:
                # A flow's owner is the process that accepted it; the cluster
                # publishes and steers per node (docs/performance.md, Workers).
                problems.append(
                    f"forwarding.workers: {self.forwarding.workers} cannot be combined with "
                    "cluster.flow_survival: true (set forwarding.workers: 1 or "
                    "cluster.flow_survival: false)"
                )
        problems += self._election_problems()
        problems += self._kernel_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _kernel_problems(self) -> list[str]:
        """What ``forwarding.engine: kernel`` cannot honour: it forwards
        packets unchanged at L2 (direct server return), so the backend port
        is the VIP port, no header can be added, no connect can be retried on
        another backend, and one table serves the node (no worker processes)."""
        fwd = self.forwarding
        if fwd.engine is not Engine.KERNEL:
            if fwd.kernel is not None:
                return ["forwarding.kernel is only read with forwarding.engine: kernel"]
            return []
        problems = []
        if fwd.kernel is None:
            problems.append("forwarding.engine: kernel needs a forwarding.kernel section "
                            "(at least interface: the LAN-facing interface)")
        if fwd.workers > 1:
            problems.append(f"forwarding.workers: {fwd.workers} cannot be combined with "
                            "forwarding.engine: kernel (the kernel forwards; set workers: 1)")
        if self.cluster is not None and self.cluster.flow_survival:
            problems.append("cluster.flow_survival: true cannot be combined with "
                            "forwarding.engine: kernel (every node hashes a flow to the same "
                            "backend: nothing to steer; set cluster.flow_survival: false)")
        for service in self.services:
            where = f"service {service.name!r}"
            if service.proxy_protocol:
                problems.append(f"{where}: proxy_protocol cannot be sent by forwarding.engine: "
                                "kernel (packets reach the backend unchanged)")
            if service.vip.version != 4:
                problems.append(f"{where}: forwarding.engine: kernel supports IPv4 VIPs only "
                                "for now")
            for backend in service.backends:
                if backend.address.version != 4:
                    problems.append(f"{where}: backend {backend.key}: forwarding.engine: kernel "
                                    "supports IPv4 backends only for now")
                if backend.port != service.port:
                    problems.append(
                        f"{where}: backend {backend.key}: forwarding.engine: kernel forwards at "
                        f"L2 (direct server return), so the backend port must be the VIP port "
                        f"{service.port}")
        return problems

    def _election_problems(self) -> list[str]:
        l2 = [s for s in self.services if s.announce.via is AnnounceVia.L2]
        elected = [s for s in self.services if s.announce.mode is AnnounceMode.ACTIVE_PASSIVE]
        problems = []
        if l2 and self.consensus is None:
            problems.append(
                f"service {l2[0].name!r}: announce.via: l2 needs a consensus section: without a "
                "quorum store (etcd) there is no safe election, and two nodes could answer for "
                "the VIP")
        if l2 and self.election.interface is None:
            problems.append(f"service {l2[0].name!r}: announce.via: l2 needs election.interface "
                            "(the interface on the VIP's segment)")
        if elected and self.consensus is not None:
            c = self.consensus
            # Keepalives go out every lease_ttl/4 s, each taking up to
            # request_timeout: a healthy owner's last renewal is at most
            # lease_ttl/4 + 2 * request_timeout old, and must not hit the fence.
            room = c.lease_ttl - c.lease_ttl / 4 - 2 * c.request_timeout
            if self.election.safety_margin >= room:
                problems.append(
                    f"election.safety_margin ({self.election.safety_margin} s) must be below "
                    f"consensus.lease_ttl * 3/4 - 2 * consensus.request_timeout ({room:.3g} s), "
                    "or a healthy owner would drop its VIPs between two keepalives")
        return problems


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


_YAML_KINDS = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
               (type(None), "null"), (list, "a list"), (dict, "a mapping"))


def _got(value: Any) -> str:
    """``a boolean (True)``: what a strict field was given, in YAML's words."""
    kind = next((name for t, name in _YAML_KINDS if isinstance(value, t)), type(value).__name__)
    if isinstance(value, (list, dict)) or value is None:
        return kind
    text = repr(value)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        # Union members add a location part naming the member's validator;
        # keep the user's field path only.
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and "[" in p))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] in ("int_type", "float_type", "bool_type", "string_type"):
            message += f", got {_got(error['input'])}"
        where = field_path(loc)
        problems.append(f"{where}: {message}")
    # Unions report once per member; keep each line once, in order.
    return list(dict.fromkeys(problems))


def parse_config(data: Any, source: str = "<config>") -> NodeConfig:
    """Validate already-parsed data. Raises ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping of sections"])
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _format_errors(exc)) from exc


def load_config(path: Path | str) -> NodeConfig:
    """Read and validate a YAML config file.

    Raises ConfigError for a missing/unreadable file, a file over 1 MiB, not
    UTF-8, bad or duplicate-key YAML, nesting over 64 levels
    (:mod:`anycast_lb.yamlload`), or any validation problem (one line each).
    """
    path = Path(path)
    return parse_config(load_yaml(path), str(path))


def json_schema() -> str:
    """The JSON schema of the config file, as published in docs/."""
    return json.dumps(NodeConfig.model_json_schema(), indent=2, sort_keys=True) + "\n"

