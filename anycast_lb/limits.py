"""The descriptor budget: what the data path may hold, and what it may never take.

Every proxied TCP connection costs the node two descriptors (client and
backend sockets), every UDP flow one (its connected socket towards the
backend). Without a bound, a flood of new connections or of UDP datagrams
from new source ports (which can be spoofed) runs the process out of
descriptors; then health checks fail with EMFILE, every VIP is withdrawn,
and anycast moves the flood to the next node. So at start the node raises
its soft RLIMIT_NOFILE to the hard limit (:func:`raise_nofile`) and
:func:`plan` splits that limit (docs/limits.md has the worked figures)::

    limit L
      reserve R   never used by the data path:
                  base       BASE_FDS (stdio, event loop, relay epoll and eventfd)
                  listeners  1 per service
                  health     per backend: PROBE_FDS[kind] (one check in flight:
                             health.timeout <= health.interval)
                  api        api.max_connections + 1 (the listener)
                  bgp        BGP_FDS with a bgp section (ExaBGP's pipes, log
                             file, the announcer socket)
                  cluster    CLUSTER_FDS with a cluster section
                  workers    WORKER_FDS per relay worker process
                  margin     MARGIN_FDS (libraries, /proc reads, a refused accept)
      data D = L - R
        pipes     relay engine with splice only: P = D // 16 pipes (2 fds
                  each, so an eighth of D); past P a direction copies
                  through user space instead
        explicit  caps set in the file: 2 per forwarding.max_tcp_connections,
                  1 per services[].max_flows (udp); they must fit in
                  D - 2P, else ConfigError naming the fields and numbers
        shares    the rest is split equally between the TCP services
                  together (one share: cap = share // 2) and each UDP service
                  without max_flows (cap = min(share, its max_flows default))

Per-source caps are a quarter of the cap they share (at least 1) unless
set: UDP ``max_flows_per_source`` per service, TCP
``forwarding.max_tcp_connections_per_source`` per process over every TCP
service, never above the cap. A relay worker process inherits the limit
and applies the same TCP caps in its own descriptor table.

:func:`plan` is pure (a limit and a config in, a :class:`Budget` out);
:func:`raise_nofile` and :func:`open_descriptors` are the thin I/O.
"""

from __future__ import annotations

import os
import resource
import socket
from dataclasses import dataclass, field
from typing import Any

from anycast_lb.config import Engine, HealthKind, NodeConfig, Transport
from anycast_lb.errors import ConfigError

TCP_CONNECTION_FDS = 2
"""Descriptors per proxied TCP connection (client and backend sockets)."""
UDP_FLOW_FDS = 1
"""Descriptors per UDP flow (its connected socket towards the backend)."""
BASE_FDS = 16
"""stdin/stdout/stderr, the event loop's selector and wake-up pipe, the
relay loop's epoll and eventfd, with room for a few more of the kind."""
PROBE_FDS = {HealthKind.TCP: 1, HealthKind.HTTP: 1, HealthKind.EXEC: 6, HealthKind.UDP: 1,
             HealthKind.DNS: 1, HealthKind.NONE: 0}
"""Descriptors one check in flight holds (exec: /dev/null three times, the
spawn's error pipe, a pidfd; udp and dns: one datagram socket)."""
BGP_FDS = 16
"""ExaBGP's stdin/stdout/stderr pipes, its log file, the announcer socket
(listener and connection), and a BFD daemon's."""
CLUSTER_FDS = 16
"""The sync socket, an ``nft``/``ip`` child's pipes, netlink."""
WORKER_FDS = 4
"""Per relay worker process: its stdin and stdout pipes, a pidfd."""
MARGIN_FDS = 64
"""Slack for libraries, /proc reads, and the one descriptor a refused
accept holds for an instant."""
PIPE_SHARE = 8
"""Splice pipes may hold 1/PIPE_SHARE of the data descriptors."""
SOURCE_SHARE = 4
"""Default per-source caps: the cap shared (a UDP service's flows, a
process's TCP connections) divided by this."""


@dataclass(frozen=True, slots=True)
class Reserve:
    """Descriptors kept from the data path, by owner."""

    base: int
    listeners: int
    health: int
    api: int
    bgp: int
    cluster: int
    workers: int
    margin: int

    @property
    def total(self) -> int:
        return (self.base + self.listeners + self.health + self.api + self.bgp + self.cluster
                + self.workers + self.margin)


@dataclass(frozen=True, slots=True)
class Budget:
    """The split of one process's open-file limit (see the module docstring)."""

    limit: int
    """The soft RLIMIT_NOFILE planned for (descriptors)."""
    reserve: Reserve
    pipes: int
    """Splice pipes the relay loop may hold at once (2 descriptors each)."""
    tcp_connections: int
    """Proxied TCP connections at once per process, all TCP services
    together; 0 without a TCP service."""
    tcp_connections_per_source: int = 0
    """Of those, what one source (address or prefix) may hold; 0 without a
    TCP service."""
    udp_flows: dict[str, int] = field(default_factory=dict)
    """UDP service name -> flow cap."""
    udp_flows_per_source: dict[str, int] = field(default_factory=dict)
    """UDP service name -> flows one source (address or prefix) may hold."""

    @property
    def data(self) -> int:
        """Descriptors the data path may use: limit - reserve."""
        return self.limit - self.reserve.total

    def as_dict(self) -> dict[str, Any]:
        """For ``/status``: every figure, with the reserve itemised. Built
        field by field: ``dataclasses.asdict`` deep-copies every value and
        took about a third of a ``/status`` answer."""
        reserve: dict[str, Any] = {name: getattr(self.reserve, name)
                                   for name in self.reserve.__dataclass_fields__}
        reserve["total"] = self.reserve.total
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = reserve if name == "reserve" else (
                dict(value) if isinstance(value, dict) else value)
        out["data"] = self.data
        return out


def plan(limit: int, config: NodeConfig, *, source: str = "<config>") -> Budget:
    """Split ``limit`` descriptors for ``config`` (arithmetic in the module docstring).

    Raises ConfigError (naming the fields and the numbers) when the caps set
    in the file cannot fit, or when the limit leaves a derived cap at 0.
    """
    services = config.services
    tcp = [s for s in services if s.protocol is Transport.TCP]
    udp = [s for s in services if s.protocol is Transport.UDP]
    forwarding = config.forwarding
    reserve = Reserve(
        base=BASE_FDS,
        listeners=len(services),
        health=sum(PROBE_FDS[s.health.kind] * len(s.backends) for s in services),
        api=config.api.max_connections + 1,
        bgp=BGP_FDS if config.bgp is not None else 0,
        cluster=CLUSTER_FDS if config.cluster is not None else 0,
        workers=WORKER_FDS * (forwarding.workers - 1) if tcp else 0,
        margin=MARGIN_FDS,
    )
    data = limit - reserve.total
    where = (f"the open-file limit {limit} leaves {max(data, 0)} descriptors for "
             f"connections and flows after a reserve of {reserve.total}")
    if data <= 0:
        raise ConfigError(source, [f"(open-file limit): {where}; raise LimitNOFILE "
                                   f"(ulimit -n) to at least {reserve.total + 64}"])
    splice = bool(tcp) and forwarding.engine is Engine.RELAY and forwarding.splice
    pipes = data // (2 * PIPE_SHARE) if splice else 0
    available = data - 2 * pipes

    explicit: list[tuple[str, int, int]] = []  # (field, cap, descriptors)
    if tcp and forwarding.max_tcp_connections is not None:
        cap = forwarding.max_tcp_connections
        explicit.append(("forwarding.max_tcp_connections", cap, cap * TCP_CONNECTION_FDS))
    index = {s.name: i for i, s in enumerate(services)}
    for s in udp:
        if "max_flows" in s.model_fields_set:
            explicit.append((f"services[{index[s.name]}].max_flows", s.max_flows,
                             s.max_flows * UDP_FLOW_FDS))
    needed = sum(fds for _, _, fds in explicit)
    if needed > available:
        total = ", ".join(f"{name}: {cap}" for name, cap, _ in explicit)
        raise ConfigError(source, [
            f"{name}: {cap} needs {fds} descriptors; the caps set ({total}) need {needed}, "
            f"but {where} and {2 * pipes} for splice pipes ({available} left); lower the "
            "caps or raise LimitNOFILE (ulimit -n)"
            for name, cap, fds in explicit
        ])

    rest = available - needed
    unset_udp = [s for s in udp if "max_flows" not in s.model_fields_set]
    claimants = (1 if tcp and forwarding.max_tcp_connections is None else 0) + len(unset_udp)
    share = rest // claimants if claimants else 0
    tcp_cap = 0
    if tcp:
        tcp_cap = forwarding.max_tcp_connections or share // TCP_CONNECTION_FDS
    udp_caps = {s.name: s.max_flows for s in udp}
    for s in unset_udp:
        udp_caps[s.name] = min(s.max_flows, share // UDP_FLOW_FDS)
    problems = []
    if tcp and tcp_cap < 1:
        problems.append(f"forwarding.max_tcp_connections: {where}, too few for one connection")
    for s in unset_udp:
        if udp_caps[s.name] < 1:
            problems.append(f"services[{index[s.name]}].max_flows: {where}, too few for one flow")
    if problems:
        raise ConfigError(source, problems)
    per_source = {
        s.name: min(s.max_flows_per_source, udp_caps[s.name])
        if s.max_flows_per_source is not None
        else max(1, udp_caps[s.name] // SOURCE_SHARE)
        for s in udp
    }
    tcp_per_source = 0
    if tcp:
        tcp_per_source = (min(forwarding.max_tcp_connections_per_source, tcp_cap)
                          if forwarding.max_tcp_connections_per_source is not None
                          else max(1, tcp_cap // SOURCE_SHARE))
    return Budget(limit=limit, reserve=reserve, pipes=pipes, tcp_connections=tcp_cap,
                  tcp_connections_per_source=tcp_per_source,
                  udp_flows=udp_caps, udp_flows_per_source=per_source)


# -- counting (one writer thread each) -----------------------------------------

REFUSAL_REASONS = ("cap", "source_cap", "descriptors", "no_backend", "connect_failed")
"""Why a forwarder refused a new connection or flow (the ``reason`` label
of ``anycast_lb_flows_refused_total``): ``cap`` the process's TCP cap or
the service's UDP flow cap, ``source_cap`` a per-source cap (TCP or UDP),
``descriptors`` no socket could be opened (EMFILE, ENFILE), ``no_backend``
no backend up, ``connect_failed`` every candidate failed (TCP)."""


@dataclass(slots=True)
class Refusals:
    """A forwarder's shed-load counters (plain ints, read at scrape time)."""

    cap: int = 0
    source_cap: int = 0
    descriptors: int = 0
    accept_pauses: int = 0
    """Times the accept loop paused for want of descriptors or memory."""
    evicted: int = 0
    """UDP: quiet flows replaced by new ones in a full table (0 for TCP)."""

    def count(self, reason: str) -> None:
        """One refusal for ``cap``, ``source_cap`` or ``descriptors``. Raises
        AttributeError for another reason (a bug)."""
        setattr(self, reason, getattr(self, reason) + 1)

    def by_reason(self, no_backend: int = 0, connect_failed: int = 0) -> dict[str, int]:
        """Every reason of REFUSAL_REASONS with its count."""
        return {"cap": self.cap, "source_cap": self.source_cap, "descriptors": self.descriptors,
                "no_backend": no_backend, "connect_failed": connect_failed}


class Slots:
    """Held slots against a cap: the TCP connections of one process, and
    with ``per_source`` each source's share of them.

    ``take()`` is False (nothing taken) at the cap; ``give()`` returns one.
    ``admit(host)`` and ``release(host)`` do the same for a connection from
    client address ``host``, also counting it against its source group
    (``source_key`` with ``prefix_v4``/``prefix_v6``): one dict lookup each.
    A connection admitted with ``admit(host)`` must be released exactly
    once with ``release(host)`` and the same address. ``cap`` None means
    no cap; ``per_source`` None no per-source cap. Not thread-safe: one
    owner (the relay loop thread, or the event loop of the asyncio engine).
    """

    __slots__ = ("cap", "used", "sources", "_v4", "_v6")

    def __init__(self, cap: int | None = None, per_source: int | None = None, *,
                 prefix_v4: int = 32, prefix_v6: int = 64) -> None:
        self.cap = cap
        self.used = 0
        self.sources = SourceCounts(per_source) if per_source is not None else None
        """Connections held per source group (None: not counted)."""
        self._v4 = prefix_v4
        self._v6 = prefix_v6

    @property
    def per_source(self) -> int | None:
        return self.sources.cap if self.sources is not None else None

    def take(self) -> bool:
        if self.cap is not None and self.used >= self.cap:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1

    def source(self, host: str) -> str:
        """``host``'s source group. Raises ValueError for a string that is
        not an IP address."""
        if self._v4 == 32 and ":" not in host:
            return host  # the common case, without parsing the address
        return source_key(host, self._v4, self._v6)

    def admit(self, host: str) -> str | None:
        """Take a slot for a new connection from client address ``host``.

        Returns None when taken, else the refusal reason and nothing is
        taken: ``"source_cap"`` when ``host``'s group holds ``per_source``
        (checked first, so a flood's excess is named as its own even when
        the cap is full too), ``"cap"`` at the cap.
        """
        sources = self.sources
        if sources is None:  # the common case, inline: it runs per connection
            cap = self.cap
            if cap is not None and self.used >= cap:
                return "cap"
            self.used += 1
            return None
        key = self.source(host)
        if not sources.take(key):
            return "source_cap"
        if not self.take():
            sources.give(key)
            return "cap"
        return None

    def release(self, host: str) -> None:
        """Give back the slot ``admit(host)`` took."""
        self.used -= 1
        if self.sources is not None:
            self.sources.give(self.source(host))


def source_key(host: str, prefix_v4: int = 32, prefix_v6: int = 64) -> str:
    """The group a client address counts in for per-source caps: the
    address itself, or its /prefix network (``198.51.100.0/24``), in the
    canonical text form (RFC 5952 for IPv6), so any spelling of an address
    gives the same key. About 1 us (inet_pton, a mask, inet_ntop): it runs
    for every new TCP connection and UDP flow when grouping by prefix.

    Raises ValueError for a string that is not an IP address.
    """
    if "%" in host:
        host = host.partition("%")[0]  # an IPv6 zone: the address is what counts
    family, bits, prefix = ((socket.AF_INET6, 128, prefix_v6) if ":" in host
                            else (socket.AF_INET, 32, prefix_v4))
    try:
        packed = socket.inet_pton(family, host)
    except OSError as exc:
        raise ValueError(f"not an IP address: {host!r}") from exc
    if prefix >= bits:
        return socket.inet_ntop(family, packed)
    shift = bits - prefix
    network = (int.from_bytes(packed, "big") >> shift) << shift
    return f"{socket.inet_ntop(family, network.to_bytes(bits // 8, 'big'))}/{prefix}"


class SourceCounts:
    """Flows held per source group, against a per-source cap.

    ``take(key)`` is False at the cap (nothing counted); ``give(key)``
    releases one; keys at zero are forgotten, so the map holds only the
    sources with flows.
    """

    __slots__ = ("cap", "_counts")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._counts: dict[str, int] = {}

    def take(self, key: str) -> bool:
        held = self._counts.get(key, 0)
        if held >= self.cap:
            return False
        self._counts[key] = held + 1
        return True

    def give(self, key: str) -> None:
        held = self._counts.get(key, 0) - 1
        if held > 0:
            self._counts[key] = held
        else:
            self._counts.pop(key, None)

    def held(self, key: str) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)


# -- the thin I/O ----------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard)
    as they are afterwards. An unlimited hard limit (not on Linux, where
    fs.nr_open bounds it) is taken as 1,048,576. Raises nothing: if the
    kernel refuses, the soft limit stays and is returned."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, hard
    return target, hard


def soft_nofile() -> int:
    """The soft RLIMIT_NOFILE of this process (descriptors it may open)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def hard_nofile() -> int:
    """The hard RLIMIT_NOFILE of this process (what the soft limit can reach)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


def open_descriptors() -> int | None:
    """Descriptors open in this process now (Linux /proc/self/fd), or None."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the directory's own descriptor
    except OSError:
        return None
