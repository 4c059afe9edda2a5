"""Config files for one benchmark topology: the same pool behind both proxies.

::

    client --> VIP 127.0.0.10 :8080 (tcp) --> nginx 127.0.0.11:8080, 127.0.0.12:8080 (round robin)
                              :5201 (tcp) --> iperf3 127.0.0.11:5201 (one backend: iperf3's
                                              control and data connections must meet one server)
                              :9053 (udp) --> UDP echo 127.0.0.11:9053, 127.0.0.12:9053
                                              (anycast-lb only: HAProxy does not proxy UDP)

Pure functions: no file is written here, no process started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from anycast_lb.config import parse_config
from anycast_lb.errors import ConfigError
from anycast_lb.limits import plan

HAPROXY_MAXPIPES = 256
"""HAProxy ``maxpipes``: pipes it may hold for splicing (default maxconn/4,
which costs two descriptors each whether used or not)."""
UDP_MAX_FLOWS = 256
"""The UDP service's ``max_flows``, set so the descriptors left for TCP are
known (the UDP load opens 16 flows from one source; a quarter of 256 admits
them)."""


@dataclass(frozen=True)
class Topology:
    """Addresses and ports of the benchmark, all on loopback (127.0.0.0/8)."""

    vip: str = "127.0.0.10"
    backends: tuple[str, ...] = ("127.0.0.11", "127.0.0.12")
    web_port: int = 8080
    """TCP: short connections, latency and idle connections (nginx behind)."""
    bulk_port: int = 5201
    """TCP: iperf3 bulk transfer, first backend only."""
    udp_port: int = 9053
    """UDP: echo servers behind (anycast-lb only)."""

    @property
    def bulk_backend(self) -> str:
        return self.backends[0]


@dataclass(frozen=True)
class Forwarding:
    """anycast-lb's ``forwarding:`` section (see anycast_lb/config.py)."""

    engine: str = "relay"
    splice: bool = True
    buffer_size: int = 65536
    """Bytes per read, and pipe or user buffer per direction."""
    workers: int = 1
    max_tcp_connections: int | None = None
    """``max_tcp_connections`` and ``max_tcp_connections_per_source`` both:
    the idle load opens every connection from one source (127.0.0.1), which
    the default per-source cap (a quarter of the cap) would refuse. None
    leaves both to the node's descriptor budget."""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"engine": self.engine, "splice": self.splice,
                               "buffer_size": self.buffer_size, "workers": self.workers}
        if self.max_tcp_connections is not None:
            out["max_tcp_connections"] = self.max_tcp_connections
            out["max_tcp_connections_per_source"] = self.max_tcp_connections
        return out


@dataclass(frozen=True)
class HaproxyOptions:
    splice: bool = True
    """``option splice-auto``: let HAProxy splice in TCP mode where it judges it
    useful (it is off by default); the fair match for anycast-lb's splice."""
    maxconn: int = 20000
    maxpipes: int = HAPROXY_MAXPIPES
    extra_global: tuple[str, ...] = field(default_factory=tuple)
    """Lines added to ``global`` (e.g. ``tune.pipesize 262144``)."""
    extra_defaults: tuple[str, ...] = field(default_factory=tuple)
    """Lines added to ``defaults`` (e.g. ``option splice-response``)."""


def anycast_lb_config(topo: Topology, forwarding: Forwarding, api_listen: str = "127.0.0.1:0") -> dict[str, Any]:
    """The node config (a mapping ready for YAML): no ``bgp`` section, health
    ``kind: none`` with ``rise: 1`` so every backend is up at once, round
    robin like HAProxy's ``balance roundrobin``, drain timeout 1 s so a stop
    is quick."""
    none = {"kind": "none", "rise": 1}

    def backends(port: int, hosts: tuple[str, ...]) -> list[dict[str, Any]]:
        return [{"address": host, "port": port} for host in hosts]

    return {
        "node": {"name": "bench"},
        "api": {"listen": api_listen},
        "drain": {"timeout": 1, "announce_grace": 0},
        "forwarding": forwarding.as_dict(),
        "services": [
            {"name": "web", "vip": topo.vip, "port": topo.web_port, "protocol": "tcp",
             "balance": "round_robin", "idle_timeout": 600,
             "backends": backends(topo.web_port, topo.backends), "health": dict(none)},
            {"name": "bulk", "vip": topo.vip, "port": topo.bulk_port, "protocol": "tcp",
             "balance": "round_robin", "idle_timeout": 600,
             "backends": backends(topo.bulk_port, (topo.bulk_backend,)), "health": dict(none)},
            {"name": "udp", "vip": topo.vip, "port": topo.udp_port, "protocol": "udp",
             "balance": "round_robin", "idle_timeout": 30, "max_flows": UDP_MAX_FLOWS,
             "backends": backends(topo.udp_port, topo.backends), "health": dict(none)},
        ],
    }


def anycast_lb_yaml(topo: Topology, forwarding: Forwarding, api_listen: str = "127.0.0.1:0") -> str:
    return yaml.safe_dump(anycast_lb_config(topo, forwarding, api_listen), sort_keys=False)


def haproxy_config(topo: Topology, options: HaproxyOptions = HaproxyOptions()) -> str:
    """HAProxy in TCP mode, one thread, round robin over the same backends,
    no health checks (both proxies take every backend as up), no logging."""
    lines = [
        "global",
        "    nbthread 1",
        f"    maxconn {options.maxconn}",
        f"    maxpipes {options.maxpipes}",
        *(f"    {line}" for line in options.extra_global),
        "",
        "defaults",
        "    mode tcp",
        f"    maxconn {options.maxconn}",
        "    timeout connect 2s",
        "    timeout client 10m",
        "    timeout server 10m",
    ]
    if options.splice:
        lines.append("    option splice-auto")
    lines += [f"    {line}" for line in options.extra_defaults]
    services = [("web", topo.web_port, topo.backends), ("bulk", topo.bulk_port, (topo.bulk_backend,))]
    for name, port, hosts in services:
        lines += ["", f"frontend {name}", f"    bind {topo.vip}:{port}", f"    default_backend {name}",
                  "", f"backend {name}", "    balance roundrobin"]
        lines += [f"    server be{i + 1} {host}:{port}" for i, host in enumerate(hosts)]
    return "\n".join(lines) + "\n"


def nginx_config(address: str, port: int, name: str, prefix: str, max_connections: int = 15000) -> str:
    """One nginx backend: a single process (no master), answering every
    request with ``200 <name>``; idle keep-alive connections are kept 600 s
    so the idle-connection test holds them. ``prefix`` is a writable
    directory for nginx's pid and temp files. ``max_connections`` must fit
    the RLIMIT_NOFILE nginx inherits."""
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {prefix}/{name}.pid;
error_log {prefix}/{name}.error.log warn;
events {{
    worker_connections {max_connections};
    use epoll;
}}
http {{
    access_log off;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/{name}-body;
    proxy_temp_path {prefix}/{name}-proxy;
    fastcgi_temp_path {prefix}/{name}-fastcgi;
    uwsgi_temp_path {prefix}/{name}-uwsgi;
    scgi_temp_path {prefix}/{name}-scgi;
    server {{
        listen {address}:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "{name}\\n";
        }}
    }}
}}
"""


def haproxy_fds(maxconn: int, maxpipes: int = HAPROXY_MAXPIPES) -> int:
    """Descriptors HAProxy asks for at start: two per connection and per pipe,
    plus listeners and spares (it refuses to start when RLIMIT_NOFILE is
    lower and it cannot raise it)."""
    return 2 * maxconn + 2 * maxpipes + 100


def _admits(topo: Topology, forwarding: Forwarding, nofile: int, connections: int) -> bool:
    """Whether the node's descriptor budget (anycast_lb.limits.plan) under a
    limit of ``nofile`` fits ``max_tcp_connections: connections``."""
    config = parse_config(anycast_lb_config(topo, replace(forwarding, max_tcp_connections=connections)))
    try:
        plan(nofile, config)
    except ConfigError:
        return False
    return True


def _first_true(pred: Callable[[int], bool], lo: int, hi: int) -> int:
    """The least n in [lo, hi] with ``pred(n)`` (pred monotonic: False then
    True), or hi + 1 if none."""
    while lo <= hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid - 1
        else:
            lo = mid + 1
    return lo


def anycast_lb_max_connections(nofile: int, topo: Topology, forwarding: Forwarding) -> int:
    """The most TCP connections the node's descriptor budget admits under a
    limit of ``nofile`` (splice pipes take an eighth of the data descriptors,
    so it holds fewer than HAProxy with its fixed ``maxpipes``); 0 if none."""
    return _first_true(lambda n: not _admits(topo, forwarding, nofile, n), 1, nofile // 2) - 1


def anycast_lb_fds(connections: int, topo: Topology, forwarding: Forwarding) -> int:
    """The least RLIMIT_NOFILE under which the node admits ``connections``."""
    hi = 4 * connections + 10_000
    return _first_true(lambda nofile: _admits(topo, forwarding, nofile, connections), 1, hi)


def sized_for_idle(forwarding: Forwarding, idle: int, slack: int = 200) -> Forwarding:
    """``forwarding`` with the node's TCP caps, the per-source one included,
    at ``idle + slack`` (HAProxy's ``maxconn``): every idle connection comes
    from 127.0.0.1. Unchanged when ``idle`` is 0 (the limit holds none; the
    node keeps its own budget, which ``idle + slack`` would not fit)."""
    return replace(forwarding, max_tcp_connections=idle + slack) if idle else forwarding


def max_idle_connections(nofile: int, anycast_lb: Iterable[tuple[Topology, Forwarding]] = (),
                         maxpipes: int = HAPROXY_MAXPIPES, slack: int = 200) -> int:
    """The most idle connections every proxy can hold under a descriptor
    limit of ``nofile`` (the hard RLIMIT_NOFILE): HAProxy needs
    ``haproxy_fds(n + slack)``, each anycast-lb node configured as given
    admits ``n + slack`` (:func:`anycast_lb_max_connections`); rounded down
    to hundreds."""
    most = [(nofile - 2 * maxpipes - 100) // 2]
    most += [anycast_lb_max_connections(nofile, topo, f) for topo, f in anycast_lb]
    return max(0, (min(most) - slack) // 100 * 100)
