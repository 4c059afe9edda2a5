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

from dataclasses import dataclass, field
from typing import Any

import yaml

HAPROXY_MAXPIPES = 256
"""HAProxy ``maxpipes``: pipes it may hold for splicing (default maxconn/4,
which costs two descriptors each whether used or not)."""


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

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "splice": self.splice,
                "buffer_size": self.buffer_size, "workers": self.workers}


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
             "balance": "round_robin", "idle_timeout": 30,
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


def max_idle_connections(nofile: int, maxpipes: int = HAPROXY_MAXPIPES, slack: int = 200) -> int:
    """The most idle connections both proxies can hold under a descriptor
    limit of ``nofile`` (the hard RLIMIT_NOFILE): HAProxy needs
    ``haproxy_fds(n + slack)``; rounded down to hundreds."""
    n = (nofile - 2 * maxpipes - 100) // 2 - slack
    return max(0, n // 100 * 100)
