"""The bounded load runs. Each takes the proxy's PID, runs one load on the
load CPU against the VIP, and returns that run's figures (a dict of figure
keys from ``report.FIGURES`` plus raw counts).

Every load is bounded in time (and where it counts, in number): wrk and
iperf3 by ``-d``/``-t``, ``loadgen`` by its count or seconds, the idle
connections by their number and a deadline. All traffic goes to the VIP on
127.0.0.0/8.
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.lbbench import procfs
from benchmarks.lbbench.configs import Topology
from benchmarks.lbbench.processes import BenchError, Supervisor

WRK_SCRIPT = """\
-- One request per connection: the server closes after answering and wrk
-- reconnects. done() prints the summary as one JSON line.
wrk.headers["Connection"] = "close"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
end
"""

KEEPALIVE_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


@dataclass(frozen=True)
class LoadContext:
    sup: Supervisor
    topo: Topology
    load_cpus: str
    proxy_cpus: tuple[int, ...]
    loadgen: Path
    workdir: Path


class CpuMeter:
    """CPU seconds used by a process tree between entering and leaving the
    ``with`` block, and the busy time of each CPU over the same span
    (/proc/stat): busy time on the proxy's CPUs beyond the proxy's own is
    other work (or softirq time not charged to the proxy) that shared them."""

    def __init__(self, pid: int, proxy_cpus: tuple[int, ...]) -> None:
        self.pid = pid
        self.proxy_cpus = proxy_cpus
        self._cpu0 = (0.0, 0.0)
        self._wall0 = 0.0
        self._busy0: dict[str, tuple[int, int]] = {}
        self.user_s = 0.0
        self.sys_s = 0.0
        """The proxy's CPU over the load, user and system (kernel) parts, s."""
        self.wall_s = 0.0
        self.busy_s: dict[str, float] = {}
        self.softirq_s: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._busy0 = cpu_busy_ticks()
        self._cpu0 = procfs.cpu_split(self.pid)
        self._wall0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        user, system = procfs.cpu_split(self.pid)
        self.user_s = user - self._cpu0[0]
        self.sys_s = system - self._cpu0[1]
        self.wall_s = time.monotonic() - self._wall0
        busy1 = cpu_busy_ticks()
        for name, (busy, softirq) in busy1.items():
            before = self._busy0.get(name, (0, 0))
            self.busy_s[name] = (busy - before[0]) / procfs.CLOCK_TICKS
            self.softirq_s[name] = (softirq - before[1]) / procfs.CLOCK_TICKS

    @property
    def cpu_s(self) -> float:
        """The proxy's CPU over the load, s (user + system)."""
        return self.user_s + self.sys_s

    def _share(self, seconds: float) -> float:
        capacity = self.wall_s * len(self.proxy_cpus)
        return max(0.0, seconds) / capacity if capacity else 0.0

    @property
    def softirq_fraction(self) -> float:
        """Share of the proxy CPUs' time spent in softirq (network receive
        work, which the kernel does not charge to any process)."""
        return self._share(sum(self.softirq_s.get(f"cpu{c}", 0.0) for c in self.proxy_cpus))

    @property
    def foreign_fraction(self) -> float:
        """Share of the proxy CPUs' time busy with other processes than the
        proxy, softirq left out (0 on a quiet machine)."""
        busy = sum(self.busy_s.get(f"cpu{c}", 0.0) for c in self.proxy_cpus)
        softirq = sum(self.softirq_s.get(f"cpu{c}", 0.0) for c in self.proxy_cpus)
        return self._share(busy - softirq - self.cpu_s)

    def record(self) -> dict[str, Any]:
        return {"proxy_cpu_s": round(self.cpu_s, 3), "proxy_user_s": round(self.user_s, 3),
                "proxy_sys_s": round(self.sys_s, 3), "wall_s": round(self.wall_s, 3),
                "cpu_busy_s": {k: round(v, 2) for k, v in self.busy_s.items()},
                "cpu_softirq_s": {k: round(v, 2) for k, v in self.softirq_s.items()},
                "foreign_on_proxy_cpu": round(self.foreign_fraction, 3),
                "softirq_on_proxy_cpu": round(self.softirq_fraction, 3)}


def parse_cpu_busy(text: str) -> dict[str, tuple[int, int]]:
    """(busy, softirq) ticks per ``cpuN`` line of /proc/stat; busy is every
    column of the first eight but idle and iowait."""
    out = {}
    for line in text.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields]
            out[name] = (sum(values[:8]) - values[3] - values[4], values[6])
    return out


def cpu_busy_ticks() -> dict[str, tuple[int, int]]:
    return parse_cpu_busy(Path("/proc/stat").read_text())


def parse_wrk(stdout: str) -> dict[str, int]:
    """The JSON line printed by WRK_SCRIPT's done(). Raises BenchError."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            parsed: dict[str, int] = json.loads(line)
            return parsed
    raise BenchError(f"wrk printed no summary: {stdout[-300:]!r}")


def short_connections(ctx: LoadContext, pid: int, seconds: float, connections: int) -> dict[str, Any]:
    """Closed loop: wrk with ``connections`` connections, each request on a
    new TCP connection (``Connection: close``), for ``seconds`` s."""
    script = ctx.workdir / "close.lua"
    script.write_text(WRK_SCRIPT)
    url = f"http://{ctx.topo.vip}:{ctx.topo.web_port}/"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", str(script), url]
    with CpuMeter(pid, ctx.proxy_cpus) as meter:
        out = ctx.sup.run("wrk", argv, ctx.load_cpus, timeout=seconds + 30)
    wrk = parse_wrk(out)
    errors = wrk["connect"] + wrk["read"] + wrk["write"] + wrk["status"] + wrk["timeout"]
    done = wrk["requests"] - wrk["status"]
    duration = wrk["duration_us"] / 1e6
    return {"short_rate": done / duration,
            "short_cpu_us": meter.cpu_s / done * 1e6 if done else None,
            "short_user_us": meter.user_s / done * 1e6 if done else None,
            "short_sys_us": meter.sys_s / done * 1e6 if done else None,
            "short_requests": done, "short_errors": errors, "wrk": wrk, **meter.record()}


def paced_latency(ctx: LoadContext, pid: int, rate: float, seconds: float) -> dict[str, Any]:
    """Open loop: ``loadgen paced-tcp``, one new connection every 1/rate s,
    ``rate * seconds`` of them; latency from each one's scheduled start."""
    count = max(1, int(rate * seconds))
    argv = [str(ctx.loadgen), "paced-tcp", ctx.topo.vip, str(ctx.topo.web_port),
            f"{rate:.1f}", str(count), "2000"]
    with CpuMeter(pid, ctx.proxy_cpus) as meter:
        out = ctx.sup.run("loadgen", argv, ctx.load_cpus, timeout=seconds + 30)
    result: dict[str, Any] = json.loads(out)
    failed = result["errors"] + result["timeouts"] + result["not_started"]
    return {"lat_rate": rate, "lat_p50_us": result["p50_us"], "lat_p99_us": result["p99_us"],
            "lat_errors": failed, "loadgen": result, **meter.record()}


def bulk(ctx: LoadContext, pid: int, streams: int, seconds: float) -> dict[str, Any]:
    """iperf3 through the bulk VIP port, ``streams`` parallel TCP streams,
    client to server; bytes are those the iperf3 server received."""
    argv = ["iperf3", "-c", ctx.topo.vip, "-p", str(ctx.topo.bulk_port), "-t", f"{seconds:g}",
            "-P", str(streams), "-J"]
    with CpuMeter(pid, ctx.proxy_cpus) as meter:
        out = ctx.sup.run("iperf3", argv, ctx.load_cpus, timeout=seconds + 30)
    result = json.loads(out)
    if "error" in result:
        raise BenchError(f"iperf3: {result['error']}")
    received = result["end"]["sum_received"]
    gigabytes = received["bytes"] / 1e9
    key = f"bulk{streams}"
    return {f"{key}_gbps": received["bytes"] * 8 / received["seconds"] / 1e9,
            f"{key}_cpu_s_per_gb": meter.cpu_s / gigabytes if gigabytes else None,
            f"{key}_bytes": received["bytes"], **meter.record()}


def udp_echo(ctx: LoadContext, pid: int, seconds: float, flows: int = 16, size: int = 64,
             window: int = 16) -> dict[str, Any]:
    """``loadgen udp-flood``: ``flows`` client flows, ``window`` datagrams of
    ``size`` bytes in flight each, echoed by the backends. Each echo counts
    as two datagrams through the proxy (request and reply)."""
    argv = [str(ctx.loadgen), "udp-flood", ctx.topo.vip, str(ctx.topo.udp_port), str(flows),
            str(size), str(window), f"{seconds:g}"]
    with CpuMeter(pid, ctx.proxy_cpus) as meter:
        out = ctx.sup.run("loadgen", argv, ctx.load_cpus, timeout=seconds + 30)
    result: dict[str, Any] = json.loads(out)
    datagrams = 2 * result["received"]
    return {"udp_pps": datagrams / result["duration_s"],
            "udp_cpu_us_per_pkt": meter.cpu_s / datagrams * 1e6 if datagrams else None,
            "udp_sent": result["sent"], "udp_received": result["received"], **meter.record()}


def idle_connections(ctx: LoadContext, pid: int, count: int, deadline_s: float = 120.0,
                     in_progress: int = 256) -> dict[str, Any]:
    """Hold ``count`` idle connections through the proxy and measure what each
    costs: the proxy's RSS and file descriptors, and kernel slab (active
    objects, TIME_WAIT sockets excluded; the whole path: client, both proxy
    sockets and backend). Each connection sends one keep-alive request and
    reads its answer, so it reaches a backend, then stays idle.

    Runs in this process (pinned to the load CPU): at most ``in_progress``
    connections are being opened at once. Raises BenchError if they are not
    all answered within ``deadline_s`` s."""
    rss0, fds0, slab0 = procfs.rss_bytes(pid), procfs.fd_count(pid), slab_bytes()
    sel = selectors.DefaultSelector()
    opened: list[socket.socket] = []
    answered = 0
    pending = 0
    buffers: dict[int, bytes] = {}
    deadline = time.monotonic() + deadline_s
    address = (ctx.topo.vip, ctx.topo.web_port)
    try:
        while answered < count:
            while pending < in_progress and len(opened) < count:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                opened.append(s)
                s.connect_ex(address)
                sel.register(s, selectors.EVENT_WRITE)
                pending += 1
            if time.monotonic() > deadline:
                raise BenchError(f"idle connections: {answered} of {count} answered "
                                 f"after {deadline_s} s")
            for key, events in sel.select(timeout=0.5):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                if events & selectors.EVENT_WRITE:
                    error = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise BenchError(f"idle connections: connect failed: errno {error}")
                    conn.send(KEEPALIVE_REQUEST)
                    sel.modify(conn, selectors.EVENT_READ)
                    continue
                chunk = conn.recv(4096)
                if not chunk:
                    raise BenchError("idle connections: closed before the answer")
                data = buffers.pop(conn.fileno(), b"") + chunk
                if response_complete(data):
                    sel.unregister(conn)
                    answered += 1
                    pending -= 1
                else:
                    buffers[conn.fileno()] = data
        rss1, fds1, slab1 = procfs.rss_bytes(pid), procfs.fd_count(pid), slab_bytes()
    finally:
        sel.close()
        for s in opened:
            s.close()
    return {"idle_connections": count,
            "idle_rss_per_conn": (rss1 - rss0) / count,
            "idle_slab_per_conn": (slab1 - slab0) / count,
            "idle_fds_per_conn": (fds1 - fds0) / count,
            "idle_rss_before": rss0, "idle_rss_after": rss1}


def response_complete(data: bytes) -> bool:
    """True once ``data`` holds a whole HTTP/1.1 response with Content-Length."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    raise BenchError(f"response without Content-Length: {head[:200]!r}")


def parse_slabinfo(text: str, exclude_prefixes: tuple[str, ...] = ("tw_sock_",)) -> int:
    """Bytes in active slab objects (active_objs * objsize) over every cache
    of /proc/slabinfo (version 2.1) but those named with ``exclude_prefixes``:
    TIME_WAIT sockets left by earlier runs expire on their own clock (60 s)
    and would blur a delta."""
    total = 0
    for line in text.splitlines():
        if line.startswith(("slabinfo", "#")):
            continue
        fields = line.split()
        if len(fields) < 4 or fields[0].startswith(exclude_prefixes):
            continue
        total += int(fields[1]) * int(fields[3])
    return total


def slab_bytes() -> int:
    return parse_slabinfo(Path("/proc/slabinfo").read_text())
