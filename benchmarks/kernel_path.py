"""The kernel engine against no load balancer, the relay engine and HAProxy,
side by side in one run, on a namespace topology with direct server return;
and what flow survival costs the relay engine.

Run as root (network namespaces, nft), after ``bash scripts/apt-install.sh
haproxy nginx iperf3 wrk gcc libc6-dev`` and ``bash scripts/install.sh``::

    sudo .venv/bin/python benchmarks/kernel_path.py [--repeat 3] [--duration 5]

Topology (namespaces ``<prefix>cl``, ``rt``, ``n1``, ``n2``, ``be``; prefix
``albb-`` by default, ``--prefix`` or ``ANYCAST_LB_LAB_NS_PREFIX``)::

    client 203.0.113.2 --- router --- node LAN 198.51.100.0/24 (a bridge in the router)
                                      |-- n1 198.51.100.11 (the load balancer)
                                      |-- n2 198.51.100.12 (flow survival peer only)
                                      `-- backend 198.51.100.21 (VIP 203.0.113.200 on lo,
                                          arp_ignore=1, arp_announce=2; nginx :8080,
                                          iperf3 -s :5201)

The router routes the VIP (``203.0.113.200/32``) to:

- ``nolb``: the backend itself (no load balancer at all);
- ``kernel``: n1, where :class:`anycast_lb.kernel.engine.KernelEngine` holds
  the ``netdev`` table on n1's ``lan0``: packets are forwarded to the backend
  at L2 and the backend answers the client directly through the router;
- ``relay``: n1 running ``anycast-lb run`` with the relay engine (splice);
- ``haproxy``: n1 running HAProxy (``nbthread 1``, ``option splice-auto``).

For the relay and HAProxy the VIP is on n1's ``lo`` and both directions
cross n1. Figures per path, each load bounded in time (iperf3 ``-t``, wrk
``-d``, the open-loop client's count and timeout): iperf3 1 and 8 streams (Gbit/s at the server),
wrk short connections (``Connection: close``, 1 thread, 32 connections), and
the CPU of every process involved (client tool, server, the proxy with its
waited-for children, ``ksoftirqd``) per GB and per connection, with the
machine's softirq share (see :mod:`benchmarks.lbbench.cpuacct` for what
the kernel's tick accounting charges where). ``LB cost`` is a path's
involved CPU minus the no-LB path's in the same repetition.

The flow survival section runs ``anycast-lb run`` (relay) on n1 and n2 with
a ``cluster`` section (peers n1 and n2, sync on the node LAN), the VIP
routed to n1, with ``flow_survival: false``, with ``true`` and every flow
published (``publish_min_age: 0``, the behaviour before that setting), and
with ``true`` and the default ``publish_min_age``:
wrk's closed-loop rate and latency, an open-loop latency at ``--fs-rate``
connections/s (:func:`paced_tcp`), and the CPU of both nodes per connection.

Last, ``benchmarks/kernel_update.py`` (its own scratch namespace,
``<prefix>kern-update``) times one backend change at 1000 backends and
65537 slots.

Every process is stopped by its PID; namespaces are deleted by name at the
end (also on Ctrl-C). Traffic stays inside the namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from anycast_lb.cluster.keys import new_key_line, write_key_file  # noqa: E402
from anycast_lb.config import parse_config  # noqa: E402
from anycast_lb.errors import ClusterError  # noqa: E402
from anycast_lb.kernel.engine import KernelEngine  # noqa: E402
from benchmarks.lbbench import configs, cpuacct, procfs  # noqa: E402
from benchmarks.lbbench.processes import BenchError, Supervisor  # noqa: E402

T = TypeVar("T")
CLIENT, ROUTER_OUT = "203.0.113.2", "203.0.113.1"
ROUTER_LAN, N1, N2, BACKEND = "198.51.100.1", "198.51.100.11", "198.51.100.12", "198.51.100.21"
VIP = "203.0.113.200"
WEB, BULK = 8080, 5201
API_PORT = 9180
MODES = ("nolb", "kernel", "relay", "haproxy")
FS_VARIANTS: dict[str, tuple[bool, float | None]] = {
    "plain": (False, None), "fs-age0": (True, 0.0), "fs": (True, None)}
"""Flow survival configs: (``flow_survival``, ``publish_min_age``; None: the default)."""
FS_LABELS = {"plain": "flow_survival: false",
             "fs-age0": "flow_survival: true, publish_min_age: 0 (every flow published)",
             "fs": "flow_survival: true (default publish_min_age)"}
CLONE_NEWNET = 0x40000000
TOOLS = ("ip", "nft", "haproxy", "nginx", "iperf3", "wrk", "gcc", "taskset")

WRK_SCRIPT = """\
wrk.headers["Connection"] = "close"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": %d, "lat_p50_us": %d, "lat_p99_us": %d, ' ..
    '"lat_mean_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Net:
    """The namespaces, created by :meth:`up` and deleted by name by :meth:`down`."""

    prefix: str

    def ns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    @property
    def names(self) -> list[str]:
        return [self.ns(n) for n in ("cl", "rt", "n1", "n2", "be")]

    def ip(self, where: str, *argv: str, check: bool = True) -> str:
        return sh("ip", "-n", self.ns(where), *argv, check=check)

    def sysctl(self, where: str, key: str, value: str) -> None:
        sh("ip", "netns", "exec", self.ns(where), "sysctl", "-qw", f"{key}={value}")

    def up(self) -> None:
        existing = sh("ip", "netns", "list")
        for name in self.names:
            if re.search(rf"^{re.escape(name)}(\s|$)", existing, re.M):
                raise BenchError(f"namespace {name} exists: another run, or a leftover "
                                 f"(ip netns del {name})")
        for name in self.names:
            sh("ip", "netns", "add", name)
            self.ip(name.removeprefix(self.prefix), "link", "set", "lo", "up")
        self.ip("rt", "link", "add", "br0", "type", "bridge")
        self.ip("rt", "addr", "add", f"{ROUTER_LAN}/24", "dev", "br0")
        self.ip("rt", "link", "set", "br0", "up")
        self.ip("rt", "link", "add", "rt0", "type", "veth", "peer", "name", "eth0", "netns",
                self.ns("cl"))
        self.ip("rt", "addr", "add", f"{ROUTER_OUT}/25", "dev", "rt0")
        self.ip("rt", "link", "set", "rt0", "up")
        self.ip("cl", "addr", "add", f"{CLIENT}/25", "dev", "eth0")
        self.ip("cl", "link", "set", "eth0", "up")
        self.ip("cl", "route", "add", "default", "via", ROUTER_OUT)
        for where, addr in (("n1", N1), ("n2", N2), ("be", BACKEND)):
            self.ip("rt", "link", "add", f"v-{where}", "type", "veth", "peer", "name", "lan0",
                    "netns", self.ns(where))
            self.ip("rt", "link", "set", f"v-{where}", "master", "br0", "up")
            self.ip(where, "addr", "add", f"{addr}/24", "dev", "lan0")
            self.ip(where, "link", "set", "lan0", "up")
            self.ip(where, "route", "add", "default", "via", ROUTER_LAN)
        for where in ("rt", "n1", "n2", "be", "cl"):
            for scope in ("all", "default"):
                self.sysctl(where, f"net.ipv4.conf.{scope}.rp_filter", "0")
        self.sysctl("rt", "net.ipv4.ip_forward", "1")
        # The client opens tens of thousands of short connections per minute:
        # the widest port range makes it reuse a 4-tuple still in TIME-WAIT on
        # the server side (a SYN then waits a retransmission) as rarely as can be.
        self.sysctl("cl", "net.ipv4.ip_local_port_range", "1024 65535")
        sh("ip", "netns", "exec", self.ns("be"), sys.executable, "-m", "anycast_lb",
           "backend-setup", "--vip", VIP, "--apply")

    def route_vip(self, via: str) -> None:
        self.ip("rt", "route", "replace", f"{VIP}/32", "via", via)
        # Forget the client's and router's cached paths (and any neighbour of the old hop).
        self.ip("rt", "route", "flush", "cache", check=False)

    def vip_on_lo(self, where: str, present: bool) -> None:
        if present:
            self.ip(where, "addr", "replace", f"{VIP}/32", "dev", "lo")
        else:
            self.ip(where, "addr", "del", f"{VIP}/32", "dev", "lo", check=False)

    def down(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def in_netns(path: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """Run ``fn`` on a thread moved into the namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    box: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with open(path) as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            box.append(fn())
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout)
    if errors:
        raise errors[0]
    if not box:
        raise BenchError(f"in {path}: no answer in {timeout} s")
    return box[0]


def wait_until(what: str, probe: Callable[[], bool], timeout: float,
               proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: the process exited with {proc.returncode}")
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.05)  # poll interval of a deadline-bounded wait
    raise BenchError(f"{what}: not ready after {timeout} s")


def http_ok(net: Net) -> bool:
    """One request from the client to the VIP's web port answers 200."""
    def get() -> bool:
        with socket.create_connection((VIP, WEB), timeout=1) as s:
            s.settimeout(1)
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    return in_netns(f"/run/netns/{net.ns('cl')}", get)


def listening(pid: int, port: int) -> bool:
    """A TCP socket in LISTEN on ``port`` in the namespace of ``pid``."""
    for table in ("tcp", "tcp6"):
        text = Path(f"/proc/{pid}/net/{table}").read_text()
        if any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
               for line in text.splitlines()[1:]):
            return True
    return False


def all_up(net: Net, where: str) -> bool:
    """The node in ``where`` listens on every service with every backend up."""
    services = api_status(net, where)["services"]
    return all(s["listening"] and s["up_backends"] == len(s["backends"]) for s in services)


def api_status(net: Net, where: str) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{API_PORT}/status", timeout=2) as r:
            data: dict[str, Any] = json.load(r)
            return data
    return in_netns(f"/run/netns/{net.ns(where)}", get)


REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def paced_tcp(host: str, port: int, rate: float, count: int, timeout_s: float = 2.0
              ) -> dict[str, Any]:
    """Open loop: connection i opens at t0 + i/rate s whatever happened to
    earlier ones, sends one HTTP request and reads until the server closes;
    its latency runs from its *scheduled* start (a stall is charged to every
    connection it delays). Bounded: ``count`` connections, each closed after
    ``timeout_s``. Latencies in us: p50, p99 of the completed ones."""
    sel = selectors.DefaultSelector()
    t0 = time.monotonic() + 0.05
    started = ok = errors = timeouts = 0
    latencies: list[float] = []
    live: dict[socket.socket, list[Any]] = {}  # sock -> [scheduled, head, sent]

    def finish(sock: socket.socket, good: bool) -> None:
        nonlocal ok, errors
        state = live.pop(sock)
        sel.unregister(sock)
        sock.close()
        if good and state[1].startswith(b"HTTP/1.1 200"):
            ok += 1
            latencies.append((time.monotonic() - state[0]) * 1e6)
        else:
            errors += 1

    while started < count or live:
        now = time.monotonic()
        while started < count and t0 + started / rate <= now:
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((host, port))
            live[sock] = [t0 + started / rate, b"", False]
            sel.register(sock, selectors.EVENT_WRITE)
            started += 1
        wake = t0 + started / rate if started < count else now + 0.05
        for key, _ in sel.select(max(0.0, min(wake - time.monotonic(), 0.05))):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            sock = ready
            state = live[sock]
            try:
                if not state[2]:
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        finish(sock, False)
                        continue
                    sock.send(REQUEST)
                    state[2] = True
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                data = sock.recv(4096)
            except OSError:
                finish(sock, False)
                continue
            if data:
                if len(state[1]) < 12:
                    state[1] += data[:12]
            else:
                finish(sock, True)
        now = time.monotonic()
        for sock in [s for s, st in live.items() if now - st[0] > timeout_s]:
            finish(sock, False)
            errors -= 1
            timeouts += 1
    latencies.sort()

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None
    return {"rate": rate, "count": count, "ok": ok, "failed": errors + timeouts,
            "timeouts": timeouts, "p50_us": pct(0.5), "p99_us": pct(0.99)}


# ---------------------------------------------------------------- one path


@dataclass
class Path_:
    """What a path's loads charge: the proxy's PIDs (none for nolb/kernel)."""

    mode: str
    proxies: list[int]


class Bench:
    def __init__(self, args: argparse.Namespace, net: Net, sup: Supervisor, workdir: Path,
                 loadgen: Path) -> None:
        self.args = args
        self.net = net
        self.sup = sup
        self.workdir = workdir
        self.loadgen = loadgen
        self.servers: dict[str, int] = {}
        self.ksoftirqd = cpuacct.ksoftirqd_pids()
        self.cpus = args.cpus
        self.loop = asyncio.new_event_loop()
        self.kernel_status: list[dict[str, Any]] = []
        (workdir / "close.lua").write_text(WRK_SCRIPT)

    def start_servers(self) -> None:
        conf = self.workdir / "nginx.conf"
        conf.write_text(configs.nginx_config("0.0.0.0", WEB, "be1", str(self.workdir)))
        nginx = self.sup.start("nginx", ["ip", "netns", "exec", self.net.ns("be"), "nginx",
                                         "-c", str(conf), "-p", str(self.workdir)], self.cpus)
        iperf = self.sup.start("iperf3-server", ["ip", "netns", "exec", self.net.ns("be"),
                                                 "iperf3", "-s", "-p", str(BULK)], self.cpus)
        wait_until("nginx", lambda: listening(nginx.pid, WEB), 10, nginx)
        wait_until("iperf3 -s", lambda: listening(iperf.pid, BULK), 10, iperf)
        self.servers = {"nginx": nginx.pid, "iperf3-server": iperf.pid}

    # -------------------------------------------------------- loads

    def _client(self, name: str, argv: Sequence[str], timeout: float) -> str:
        return self.sup.run(name, ["ip", "netns", "exec", self.net.ns("cl"), *argv],
                            self.cpus, timeout)

    def _groups(self, proxies: Sequence[int], server: str) -> dict[str, list[int]]:
        return {"lb": list(proxies), "server": [self.servers[server]],
                "ksoftirqd": self.ksoftirqd}

    def bulk(self, proxies: Sequence[int], streams: int) -> dict[str, Any]:
        secs = self.args.duration
        groups = self._groups(proxies, "iperf3-server")
        before = cpuacct.sample(groups, "client")
        out = self._client("iperf3", ["iperf3", "-c", VIP, "-p", str(BULK), "-t", f"{secs:g}",
                                      "-P", str(streams), "-J"], secs + 30)
        after = cpuacct.sample(groups, "client")
        result = json.loads(out)
        if "error" in result:
            raise BenchError(f"iperf3: {result['error']}")
        received = result["end"]["sum_received"]
        cpu = cpuacct.breakdown(before, after, procfs.CLOCK_TICKS)
        gb = received["bytes"] / 1e9
        return {"gbps": received["bytes"] * 8 / received["seconds"] / 1e9, "bytes": received["bytes"],
                "cpu_s": cpu.processes, "softirq_s": cpu.softirq_s, "other_s": cpu.other_s,
                "per_gb": cpuacct.per_unit(cpu, gb)}

    def short(self, proxies: Sequence[int], secs: float | None = None,
              extra: dict[str, list[int]] | None = None) -> dict[str, Any]:
        secs = secs or self.args.duration
        groups = {**self._groups(proxies, "nginx"), **(extra or {})}
        before = cpuacct.sample(groups, "client")
        out = self._client("wrk", ["wrk", "-t1", f"-c{self.args.connections}",
                                   f"-d{max(1, round(secs))}s", "-s",
                                   str(self.workdir / "close.lua"), f"http://{VIP}:{WEB}/"],
                           secs + 30)
        after = cpuacct.sample(groups, "client")
        line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
        if line is None:
            raise BenchError(f"wrk printed no summary: {out[-300:]!r}")
        wrk = json.loads(line)
        done = wrk["requests"]
        cpu = cpuacct.breakdown(before, after, procfs.CLOCK_TICKS)
        return {"rate": done / (wrk["duration_us"] / 1e6), "connections": done,
                "errors": wrk["errors"], "wrk_p50_us": wrk["lat_p50_us"],
                "wrk_p99_us": wrk["lat_p99_us"], "cpu_s": cpu.processes,
                "softirq_s": cpu.softirq_s, "other_s": cpu.other_s,
                "per_conn": cpuacct.per_unit(cpu, done)}

    def paced(self, proxies: Sequence[int], rate: float, extra: dict[str, list[int]]
              ) -> dict[str, Any]:
        count = max(1, int(rate * self.args.duration))
        groups = {**self._groups(proxies, "nginx"), **extra}
        before = cpuacct.sample(groups)
        result = in_netns(f"/run/netns/{self.net.ns('cl')}",
                          lambda: paced_tcp(VIP, WEB, rate, count),
                          timeout=count / rate + 30)
        after = cpuacct.sample(groups)
        cpu = cpuacct.breakdown(before, after, procfs.CLOCK_TICKS)
        return {**result, "cpu_s": cpu.processes, "per_conn": cpuacct.per_unit(cpu, result["ok"])}

    def loads(self, proxies: Sequence[int]) -> dict[str, Any]:
        return {"bulk1": self.bulk(proxies, 1), "bulk8": self.bulk(proxies, 8),
                "short": self.short(proxies)}

    # -------------------------------------------------------- paths

    def _node_config(self, cluster: dict[str, Any] | None = None,
                     engine: str = "relay") -> dict[str, Any]:
        topo = configs.Topology(vip=VIP, backends=(BACKEND,), web_port=WEB, bulk_port=BULK)
        data = configs.anycast_lb_config(topo, configs.Forwarding(engine="relay"),
                                         api_listen=f"127.0.0.1:{API_PORT}")
        data["services"] = [s for s in data["services"] if s["protocol"] == "tcp"]
        if engine == "kernel":
            data["forwarding"] = {"engine": "kernel", "kernel": {"interface": "lan0"}}
            for s in data["services"]:
                s["balance"] = "maglev"
        if cluster is not None:
            data["cluster"] = cluster
        return data

    def _nft_runner(self, where: str) -> Callable[..., Any]:
        ns = self.net.ns(where)

        async def run(argv: Sequence[str], stdin: str | None = None) -> str:
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", ns, *argv, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
            if proc.returncode:
                raise ClusterError(f"{argv[0]} in {ns}: {err.decode().strip()[:300]}")
            return out.decode()
        return run

    @contextmanager
    def path(self, mode: str) -> Iterator[Path_]:
        net = self.net
        if mode == "nolb":
            net.vip_on_lo("n1", False)
            net.route_vip(BACKEND)
            wait_until("no-LB path", lambda: http_ok(net), 10)
            yield Path_(mode, [])
            return
        if mode == "kernel":
            net.vip_on_lo("n1", False)
            cfg = parse_config(self._node_config(engine="kernel"), "kernel bench")
            engine = KernelEngine(cfg, runner=self._nft_runner("n1"))
            self.loop.run_until_complete(engine.start())
            try:
                for index, svc in enumerate(cfg.services):
                    self.loop.run_until_complete(
                        engine.set_up(index, {b.key for b in svc.backends}))
                net.route_vip(N1)
                wait_until("kernel path", lambda: http_ok(net), 10)
                yield Path_(mode, [])
                status = self.loop.run_until_complete(engine.status())
                self.kernel_status.append(dict(status))
            finally:
                self.loop.run_until_complete(engine.stop())
            return
        net.vip_on_lo("n1", True)
        net.route_vip(N1)
        if mode == "relay":
            conf = self.workdir / "relay.yaml"
            conf.write_text(yaml.safe_dump(self._node_config(), sort_keys=False))
            proc = self.sup.start("relay", ["ip", "netns", "exec", net.ns("n1"),
                                            str(ROOT / ".venv" / "bin" / "anycast-lb"), "run",
                                            "--config", str(conf)], self.cpus)
        else:
            conf = self.workdir / "haproxy.cfg"
            topo = configs.Topology(vip=VIP, backends=(BACKEND,), web_port=WEB, bulk_port=BULK)
            conf.write_text(configs.haproxy_config(topo, configs.HaproxyOptions(maxconn=5000)))
            proc = self.sup.start("haproxy", ["ip", "netns", "exec", net.ns("n1"), "haproxy",
                                              "-db", "-f", str(conf)], self.cpus)
        try:
            wait_until(mode, lambda: listening(proc.pid, BULK) and http_ok(net)
                       and (mode != "relay" or all_up(net, "n1")), 20, proc)
            yield Path_(mode, [proc.pid])
        finally:
            self.sup.stop(proc)

    # -------------------------------------------------------- flow survival

    def cluster_nodes(self, variant: str) -> list[subprocess.Popen[bytes]]:
        survival, min_age = FS_VARIANTS[variant]
        net = self.net
        key = self.workdir / "cluster.key"
        if not key.exists():
            write_key_file(key, [new_key_line()])
        procs = []
        for where, addr in (("n1", N1), ("n2", N2)):
            net.vip_on_lo(where, True)
            cluster = {"flow_survival": survival, "address": addr, "interface": "lan0",
                       "peers": [N1, N2], "key_file": str(key)}
            if min_age is not None:
                cluster["publish_min_age"] = min_age
            data = self._node_config(cluster)
            data["node"]["name"] = where
            conf = self.workdir / f"cluster-{where}.yaml"
            conf.write_text(yaml.safe_dump(data, sort_keys=False))
            procs.append(self.sup.start(
                f"cluster-{where}-{variant}",
                ["ip", "netns", "exec", net.ns(where), str(ROOT / ".venv" / "bin" / "anycast-lb"),
                 "run", "--config", str(conf)], self.cpus))
        net.route_vip(N1)
        want = "active" if survival else "off"

        def ready() -> bool:
            status = api_status(net, "n1")["cluster"]
            return bool(status["flow_survival"] == want and status["live_peers"] == 1
                        and all_up(net, "n1") and http_ok(net))
        try:
            wait_until(f"cluster ({want})", ready, 30, procs[0])
        except BaseException:
            for proc in procs:
                self.sup.stop(proc)
            raise
        return procs

    def flow_survival(self, variant: str) -> dict[str, Any]:
        procs = self.cluster_nodes(variant)
        try:
            peer = {"peer": [procs[1].pid]}
            spies = []
            if self.args.profile:
                spies = [self._profile(p.pid, f"{where}-{variant}")
                         for p, where in zip(procs, ("n1", "n2"), strict=True)]
            short = self.short([procs[0].pid], extra=peer)
            for spy in spies:
                if spy is not None:
                    spy.wait(self.args.duration + 30)
            paced = self.paced([procs[0].pid], self.args.fs_rate, peer)
            cluster = api_status(self.net, "n1")["cluster"]
            return {"short": short, "paced": paced,
                    "cluster": {k: cluster.get(k) for k in
                                ("flow_survival", "steering_map_size", "flows_owned",
                                 "steered", "second_chance", "received", "refused", "sync")}}
        finally:
            for proc in procs:
                self.sup.stop(proc)

    def _profile(self, pid: int, name: str) -> subprocess.Popen[bytes] | None:
        spy = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
        if not Path(spy).exists():
            print("py-spy not found: no profile", file=sys.stderr)
            return None
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen([spy, "record", "-p", str(pid), "--threads", "--subprocesses",
                                 "-r", "200", "-d", str(int(self.args.duration)), "-f", "raw",
                                 "-o", str(out / f"{name}.txt")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------- report


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per mode, the medians over repetitions of the table's figures. LB cost
    is a path's involved CPU minus the no-LB path's, per repetition."""
    out: dict[str, dict[str, float | None]] = {}
    for mode in MODES:
        rows = [r[mode] for r in runs if mode in r]
        base = [r.get("nolb") for r in runs if mode in r]

        def lb_cost(load: str, unit: str, rows: Sequence[dict[str, Any]] = rows,
                    base: Sequence[dict[str, Any] | None] = base) -> float | None:
            vals = []
            for row, b in zip(rows, base, strict=True):
                if b is None or row[load][unit]["involved"] is None:
                    continue
                vals.append(row[load][unit]["involved"] - b[load][unit]["involved"])
            return median(vals)

        out[mode] = {
            "bulk1_gbps": median([r["bulk1"]["gbps"] for r in rows]),
            "bulk8_gbps": median([r["bulk8"]["gbps"] for r in rows]),
            "bulk1_s_per_gb": median([r["bulk1"]["per_gb"]["involved"] for r in rows]),
            "bulk8_s_per_gb": median([r["bulk8"]["per_gb"]["involved"] for r in rows]),
            "bulk1_softirq_s_per_gb": median([r["bulk1"]["per_gb"]["softirq"] for r in rows]),
            "bulk1_lb_s_per_gb": lb_cost("bulk1", "per_gb"),
            "bulk8_lb_s_per_gb": lb_cost("bulk8", "per_gb"),
            "short_rate": median([r["short"]["rate"] for r in rows]),
            "short_us": median([(r["short"]["per_conn"]["involved"] or 0) * 1e6 for r in rows]),
            "short_lb_us": median([(v or 0) * 1e6 for v in [lb_cost("short", "per_conn")]]),
        }
    return out


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(summary: dict[str, dict[str, float | None]]) -> str:
    head = ("| path | 1 stream Gbit/s | 8 streams Gbit/s | CPU s/GB 1 / 8 (all involved) "
            "| softirq s/GB (1) | LB cost s/GB 1 / 8 | short conn/s | CPU us/conn | "
            "LB cost us/conn |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        s = summary[mode]
        lines.append(
            f"| {mode} | {fmt(s['bulk1_gbps'], '.2f')} | {fmt(s['bulk8_gbps'], '.2f')} | "
            f"{fmt(s['bulk1_s_per_gb'], '.3f')} / {fmt(s['bulk8_s_per_gb'], '.3f')} | "
            f"{fmt(s['bulk1_softirq_s_per_gb'], '.3f')} | "
            f"{fmt(s['bulk1_lb_s_per_gb'], '.3f')} / {fmt(s['bulk8_lb_s_per_gb'], '.3f')} | "
            f"{fmt(s['short_rate'], ',.0f')} | {fmt(s['short_us'], '.1f')} | "
            f"{fmt(s['short_lb_us'], '.1f')} |")
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def paired(runs: Sequence[dict[str, Any]], a: str, b: str,
           get: Callable[[dict[str, Any]], float | None]) -> float | None:
    """Median over repetitions of ``get(run[a]) / get(run[b])`` (paired within
    a repetition: the machine's load moves less within one than across)."""
    return median([ratio(get(r[a]), get(r[b])) for r in runs if a in r and b in r])


def _lb_cost(run: dict[str, Any], mode: str, load: str, unit: str) -> float | None:
    mine, base = run[mode][load][unit]["involved"], run["nolb"][load][unit]["involved"]
    return None if mine is None or base is None else mine - base


def targets(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The issue's targets, as paired ratios (see :func:`paired`)."""
    out = []
    for streams in (1, 8):
        load = f"bulk{streams}"

        def gbps(r: dict[str, Any], load: str = load) -> float:
            return float(r[load]["gbps"])
        to_nolb = paired(runs, "kernel", "nolb", gbps)
        to_haproxy = paired(runs, "kernel", "haproxy", gbps)
        cost = median([ratio(_lb_cost(r, "kernel", load, "per_gb"),
                             _lb_cost(r, "haproxy", load, "per_gb")) for r in runs])
        def per_gb(r: dict[str, Any], load: str = load) -> float | None:
            value: float | None = r[load]["per_gb"]["involved"]
            return value
        total = paired(runs, "kernel", "haproxy", per_gb)
        out.append(f"kernel, {streams} stream(s): throughput {fmt(to_nolb, '.2f')}x no-LB "
                   f"(target >= 0.9), {fmt(to_haproxy, '.2f')}x HAProxy (target >= 2); "
                   f"LB cost per GB {fmt(cost, '.2f')}x HAProxy's (target <= 0.3), "
                   f"all involved CPU per GB {fmt(total, '.2f')}x")
    rate = paired(runs, "kernel", "haproxy", lambda r: r["short"]["rate"])
    out.append(f"kernel, short connections: {fmt(rate, '.2f')}x HAProxy's rate, "
               f"{fmt(paired(runs, 'kernel', 'nolb', lambda r: r['short']['rate']), '.2f')}x "
               "no-LB's")
    return out


def breakdown_table(runs: Sequence[dict[str, Any]]) -> str:
    """Median CPU per GB (1 stream) and per short connection of each process
    group, and the machine's softirq time over the same span."""
    parts = ("client", "server", "lb", "ksoftirqd", "softirq")
    lines = ["| path | 1 stream s/GB: " + " / ".join(parts) + " | short us/conn: "
             + " / ".join(parts) + " |", "|---|---|---|"]
    for mode in MODES:
        rows = [r[mode] for r in runs if mode in r]
        if not rows:
            continue
        gb = [fmt(median([r["bulk1"]["per_gb"].get(p) for r in rows]), ".3f") for p in parts]
        us = [fmt(median([(r["short"]["per_conn"].get(p) or 0) * 1e6 for r in rows]), ".1f")
              for p in parts]
        lines.append(f"| {mode} | {' / '.join(gb)} | {' / '.join(us)} |")
    return "\n".join(lines)


def fs_table(runs: Sequence[dict[str, Any]]) -> tuple[str, list[str]]:
    """The flow survival table (medians over repetitions) and, per variant
    with flow survival, the median over repetitions of its ratio to the
    plain run of the same repetition (paired: the machine's load moves
    less within one repetition than across them)."""
    variants = [v for v in FS_VARIANTS if any(v in r for r in runs)]
    rows = {}
    for key in variants:
        got = [r[key] for r in runs if key in r]
        rows[key] = {
            "rate": median([g["short"]["rate"] for g in got]),
            "wrk_p50": median([g["short"]["wrk_p50_us"] / 1000 for g in got]),
            "wrk_p99": median([g["short"]["wrk_p99_us"] / 1000 for g in got]),
            "p50": median([(g["paced"]["p50_us"] or 0) / 1000 for g in got]),
            "p99": median([(g["paced"]["p99_us"] or 0) / 1000 for g in got]),
            "cpu_us": median([_nodes_us(g) for g in got]),
            "errors": sum(g["short"]["errors"] + g["paced"]["failed"] for g in got),
        }
    lines = ["| relay, two nodes | short conn/s (wrk) | wrk p50 / p99 ms | paced p50 / p99 ms "
             "| both nodes' CPU us/conn | failed |", "|---|---:|---:|---:|---:|---:|"]
    for key in variants:
        r = rows[key]
        lines.append(f"| {FS_LABELS[key]} | {fmt(r['rate'], ',.0f')} | "
                     f"{fmt(r['wrk_p50'], '.2f')} / {fmt(r['wrk_p99'], '.2f')} | "
                     f"{fmt(r['p50'], '.2f')} / {fmt(r['p99'], '.2f')} | "
                     f"{fmt(r['cpu_us'], '.0f')} | {r['errors']:.0f} |")
    notes = []
    for key in variants:
        if key == "plain":
            continue
        pairs = [r for r in runs if key in r and "plain" in r]

        def paired(get: Callable[[dict[str, Any]], float | None],
                   pairs: Sequence[dict[str, Any]] = pairs, key: str = key) -> float | None:
            return median([ratio(get(r[key]), get(r["plain"])) for r in pairs])
        notes.append(
            f"{FS_LABELS[key]}, paired with plain ({len(pairs)} pairs): rate "
            f"{fmt(paired(lambda g: g['short']['rate']), '.2f')}x (target >= 0.8), "
            f"wrk p50 {fmt(paired(lambda g: g['short']['wrk_p50_us']), '.2f')}x, paced p50 "
            f"{fmt(paired(lambda g: g['paced']['p50_us']), '.2f')}x (target <= 1.2), "
            f"CPU per connection {fmt(paired(_nodes_us), '.2f')}x")
    return "\n".join(lines), notes


def _nodes_us(g: dict[str, Any]) -> float:
    """Both nodes' CPU (n1 with its nft children, n2) per short connection, us."""
    cpu = g["short"]["cpu_s"]
    return float((cpu["lb"] + cpu.get("peer", 0.0)) / max(g["short"]["connections"], 1) * 1e6)


def build_loadgen() -> Path:
    source = ROOT / "benchmarks" / "loadgen.c"
    binary = ROOT / "build" / "bench" / "loadgen"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source)],
                       check=True)
    return binary


def update_time(runs: int, namespace: str) -> dict[str, dict[str, float]]:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_update.py"),
                          "--runs", str(runs), "--namespace", namespace], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise BenchError(f"kernel_update.py: {out.stderr.strip()[-300:]}")
    print(out.stdout, end="")
    return cpuacct.parse_update_report(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions, paths interleaved")
    parser.add_argument("--duration", type=float, default=5.0, help="s per load")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-flow-survival", action="store_true", help="skip that section")
    parser.add_argument("--fs-only", action="store_true", help="only the flow survival section")
    parser.add_argument("--fs-variants", default=",".join(FS_VARIANTS),
                        help="flow survival configs to compare: " + ", ".join(
                            f"{k} ({v})" for k, v in FS_LABELS.items()))
    parser.add_argument("--fs-rate", type=float, default=400.0,
                        help="open-loop connections/s for the flow survival latency")
    parser.add_argument("--update-runs", type=int, default=5,
                        help="kernel_update.py runs (0: skip)")
    parser.add_argument("--profile", default=None,
                        help="directory: py-spy profiles (raw) of n1 and n2 under wrk, flow survival on and off")
    parser.add_argument("--cpus", default=f"0-{(os.cpu_count() or 1) - 1}",
                        help="taskset CPU list for every process (default: all)")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of every process started (below 0 wins the CPU from "
                        "other work on a shared machine)")
    parser.add_argument("--prefix", default=os.environ.get("ANYCAST_LB_LAB_NS_PREFIX", "albb-"))
    parser.add_argument("--out", default="lab-results/kernel_path.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("kernel_path: run as root (network namespaces, nft)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"kernel_path: missing {', '.join(missing)} "
                         "(bash scripts/apt-install.sh haproxy nginx iperf3 wrk gcc libc6-dev)")
    modes = [m for m in args.modes.split(",") if m]
    workdir = Path(f"/tmp/{args.prefix}kernel-path-{os.getpid()}")
    workdir.mkdir(parents=True)
    loadgen = build_loadgen()
    net = Net(args.prefix)
    sup = Supervisor(workdir, nice=args.nice)
    runs: list[dict[str, Any]] = []
    fs_runs: list[dict[str, Any]] = []
    load = os.getloadavg()[0]
    bench: Bench | None = None
    try:
        net.up()
        bench = Bench(args, net, sup, workdir, loadgen)
        bench.start_servers()
        for rep in range(args.repeat):
            if not args.fs_only:
                run: dict[str, Any] = {}
                order = modes if rep % 2 == 0 else modes[::-1]
                for mode in order:
                    with bench.path(mode) as p:
                        run[mode] = bench.loads(p.proxies)
                    print(f"run {rep + 1} {mode}: "
                          f"{run[mode]['bulk1']['gbps']:.2f} / {run[mode]['bulk8']['gbps']:.2f} "
                          f"Gbit/s, {run[mode]['short']['rate']:,.0f} conn/s", file=sys.stderr)
                runs.append(run)
            if not args.no_flow_survival:
                fs: dict[str, Any] = {}
                variants = [v for v in args.fs_variants.split(",") if v]
                for variant in (variants if rep % 2 == 0 else variants[::-1]):
                    fs[variant] = bench.flow_survival(variant)
                print(f"run {rep + 1} flow survival: " + ", ".join(
                    f"{v} {fs[v]['short']['rate']:,.0f} conn/s" for v in variants),
                    file=sys.stderr)
                fs_runs.append(fs)
        sup.close()
    finally:
        sup.close()
        net.down()
    updates = update_time(args.update_runs, f"{args.prefix}kern-update") if args.update_runs else {}
    print(f"\nload average at start {load:.1f}, at end {os.getloadavg()[0]:.1f}; "
          f"repetitions {args.repeat}, {args.duration:g} s per load, CPUs {args.cpus}, "
          f"nice {args.nice}")
    result: dict[str, Any] = {"args": vars(args), "load_average": load, "runs": runs,
                              "flow_survival": fs_runs, "update": updates,
                              "kernel_status": bench.kernel_status if bench else []}
    if runs and set(MODES) <= set(modes):
        summary = summarize(runs)
        result["summary"] = summary
        print(table(summary))
        print()
        print(breakdown_table(runs))
        print()
        for line in targets(runs):
            print(line)
        print()
    if fs_runs:
        text, notes = fs_table(fs_runs)
        print(text)
        for line in notes:
            print(line)
    if bench is not None and bench.kernel_status:
        packets = sum(b["packets"] for st in bench.kernel_status for svc in st.values()
                      for b in svc["backends"].values())
        print(f"kernel engine: {packets:,} packets counted by its nft counters over "
              f"{len(bench.kernel_status)} runs (client to backend only: replies bypass n1)")
    for label, fig in updates.items():
        print(f"table update, {label}: {fig['slots']:.0f} slots, render+apply median "
              f"{fig['total']:.1f} ms (max {fig['max']:.1f}), CPU {fig['cpu']:.1f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"every run in {out}; process logs in {workdir}")


if __name__ == "__main__":
    main()
