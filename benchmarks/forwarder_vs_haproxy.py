"""anycast-lb's TCP/UDP forwarder against HAProxy, side by side, on loopback.

One command, as root (``bash scripts/bench.sh ARGS`` installs what it needs
and runs this)::

    .venv/bin/python benchmarks/forwarder_vs_haproxy.py [--engine relay]
        [--extra-engine asyncio] [--repeat 3] [--duration 5] [--quick]
        [--out lab-results/forwarder_vs_haproxy.json] [--markdown FILE]

It starts the same real backends once (two nginx on 127.0.0.11 and
127.0.0.12 port 8080, one iperf3 server on 127.0.0.11:5201, two UDP echo
servers on port 9053), then, for each load and each repetition, starts
HAProxy (``nbthread 1``, TCP mode, round robin) and anycast-lb
(``anycast-lb run`` with a generated node config) one after the other on the
same VIP 127.0.0.10, runs the same load against each and stops it. The
proxy runs on CPU 0 (taskset); backends, load generators and this script on
CPU 1. Repetitions are interleaved (the proxy order alternates) and reported
as median [min-max]; ratios are anycast-lb / HAProxy.

Loads (each bounded in time, and in number where it counts), in this order:
  idle     N idle keep-alive connections held at once (N = 10,000, or what
           both proxies' descriptor budgets hold under RLIMIT_NOFILE; all
           from 127.0.0.1, so the node's caps, per source included, are set
           to N + 200): RSS, kernel slab and descriptors per connection.
           First, before any load leaves TIME_WAIT sockets.
  bulk     iperf3 through the proxy, 1 stream then 8 streams: Gbit/s and
           proxy CPU s per GB.
  udp      loadgen udp-flood, 16 flows of 64-byte datagrams echoed by the
           backends (anycast-lb only: HAProxy does not proxy UDP).
  short    wrk, one request per new TCP connection: connections/s and proxy
           CPU us per connection.
  latency  loadgen paced-tcp, open loop at half HAProxy's median short
           connection rate: p50/p99 latency from each connection's
           scheduled start to the server's close.

Proxy CPU is utime + stime of the proxy process (all threads) and its
descendants from /proc, over the load's run. Results: a table per anycast-lb
engine on stdout, every run and summary in the JSON file (--out).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.lbbench import configs, loads, report
from benchmarks.lbbench.processes import (
    BenchError,
    Supervisor,
    tcp_listening,
    udp_echoes,
    wait_until,
)
from benchmarks.lbbench.proxies import AnycastLb, Haproxy, Proxy

TESTS = ("idle", "bulk", "udp", "short", "latency")
TOOLS = ("haproxy", "nginx", "iperf3", "wrk", "gcc", "taskset")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run as root; see the module docstring for the method.")
    parser.add_argument("--engine", default="relay", choices=("relay", "asyncio"),
                        help="anycast-lb forwarding.engine compared with HAProxy (default relay)")
    parser.add_argument("--extra-engine", action="append", default=[], choices=("relay", "asyncio"),
                        help="another anycast-lb engine to run as an extra row (repeatable)")
    parser.add_argument("--no-splice", action="store_true", help="anycast-lb forwarding.splice: false")
    parser.add_argument("--buffer-size", type=int, default=65536, help="anycast-lb forwarding.buffer_size (bytes)")
    parser.add_argument("--workers", type=int, default=1, help="anycast-lb forwarding.workers")
    parser.add_argument("--no-haproxy-splice", action="store_true",
                        help="leave out HAProxy's 'option splice-auto'")
    parser.add_argument("--haproxy-global", action="append", default=[], metavar="LINE",
                        help="a line added to HAProxy's global section (repeatable)")
    parser.add_argument("--haproxy-defaults", action="append", default=[], metavar="LINE",
                        help="a line added to HAProxy's defaults section (repeatable)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per load (1-10)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per timed load (1-60)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections for the short test")
    parser.add_argument("--idle-connections", type=int, default=10000,
                        help="idle connections held at once (capped by RLIMIT_NOFILE)")
    parser.add_argument("--latency-rate", type=float, default=None,
                        help="offered conn/s for the latency test (default half HAProxy's median max)")
    parser.add_argument("--tests", default=",".join(TESTS),
                        help=f"comma-separated subset of {','.join(TESTS)}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 run, 1 s loads, 500 idle connections")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of every process of the benchmark (-20..19); below 0 on a "
                             "machine shared with other work")
    parser.add_argument("--proxy-cpu", default="0", help="CPU for the proxy (taskset list)")
    parser.add_argument("--load-cpu", default="1", help="CPU for backends and load generators")
    parser.add_argument("--out", type=Path, default=ROOT / "lab-results" / "forwarder_vs_haproxy.json")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.duration, args.idle_connections = 1, 1.0, 500
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat must be 1-10")
    if not 1 <= args.duration <= 60:
        parser.error("--duration must be 1-60 s")
    if not -20 <= args.nice <= 19:
        parser.error("--nice must be -20..19")
    if not 1 <= args.idle_connections <= 100_000:
        parser.error("--idle-connections must be 1-100000")
    tests = tuple(t.strip() for t in args.tests.split(",") if t.strip())
    unknown = set(tests) - set(TESTS)
    if unknown:
        parser.error(f"unknown test(s): {', '.join(sorted(unknown))}")
    args.tests = tests
    return args


def cpu_list(text: str) -> tuple[int, ...]:
    """CPUs of a taskset list such as ``0``, ``0,1`` or ``0-1``."""
    cpus: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus += range(int(low), int(high or low) + 1)
    return tuple(cpus)


def raise_nofile(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it) towards
    ``wanted``; returns the limit in force. Without CAP_SYS_RESOURCE the hard
    limit cannot be raised, only the soft limit up to it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard if hard != resource.RLIM_INFINITY else wanted


def build_loadgen() -> Path:
    """Compile benchmarks/loadgen.c into build/bench/loadgen when stale."""
    source = ROOT / "benchmarks" / "loadgen.c"
    binary = ROOT / "build" / "bench" / "loadgen"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source)], check=True)
    return binary


def running(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def start_backends(sup: Supervisor, topo: configs.Topology, cpus: str, loadgen: Path,
                   nginx_connections: int) -> None:
    for i, host in enumerate(topo.backends, start=1):
        name = f"be{i}"
        conf = sup.workdir / f"nginx-{name}.conf"
        conf.write_text(configs.nginx_config(host, topo.web_port, name, str(sup.workdir),
                                             nginx_connections))
        proc = sup.start(f"nginx-{name}", ["nginx", "-c", str(conf), "-p", str(sup.workdir)], cpus)
        wait_until(functools.partial(tcp_listening, host, topo.web_port), 10, f"nginx {name}",
                   alive=functools.partial(running, proc))
        echo = sup.start(f"udp-echo-{name}", [str(loadgen), "udp-echo-server", host,
                                              str(topo.udp_port), "3600"], cpus)
        wait_until(functools.partial(udp_echoes, host, topo.udp_port), 10, f"UDP echo {name}",
                   alive=functools.partial(running, echo))
    iperf = sup.start("iperf3-server", ["iperf3", "-s", "-B", topo.bulk_backend,
                                        "-p", str(topo.bulk_port)], cpus)
    wait_until(lambda: tcp_listening(topo.bulk_backend, topo.bulk_port), 10, "iperf3 server",
               alive=lambda: iperf.poll() is None)


def command_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def git(*argv: str) -> str:
    done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def meta(args: argparse.Namespace, nofile: int, idle: int) -> dict[str, Any]:
    relay = "anycast_lb/forward/relay.py"
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "anycast_lb")),
        "relay_committed": bool(git("ls-files", relay)),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "proxy_cpu": args.proxy_cpu,
        "load_cpu": args.load_cpu,
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "rlimit_nofile": nofile,
        "idle_connections": idle,
        "idle_connections_requested": args.idle_connections,
        "repeat": args.repeat,
        "duration_s": args.duration,
        "wrk_connections": args.connections,
        "nice": args.nice,
        "versions": {
            "haproxy": command_version(["haproxy", "-v"]),
            "nginx": command_version(["nginx", "-v"]),
            "iperf3": command_version(["iperf3", "-v"]),
            "wrk": command_version(["wrk", "-v"]),
            "python": platform.python_version(),
        },
        "forwarding": {"engine": args.engine, "extra_engines": args.extra_engine,
                       "splice": not args.no_splice, "buffer_size": args.buffer_size,
                       "workers": args.workers},
        "haproxy_splice_auto": not args.no_haproxy_splice,
        "haproxy_global": args.haproxy_global,
        "haproxy_defaults": args.haproxy_defaults,
    }


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def short_summary(record: dict[str, Any]) -> str:
    parts = []
    for figure in report.FIGURES:
        if figure.key in record and record[figure.key] is not None:
            parts.append(f"{figure.key}={report.format_value(record[figure.key], max(figure.decimals, 1))}")
    return " ".join(parts)


def run_one(proxy: Proxy, load: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    proxy.start()
    try:
        threads = proxy_threads(proxy.pid)
        record = load(proxy.pid)
        record["proxy_threads"] = threads
        return record
    finally:
        proxy.stop()


def proxy_threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"forwarder_vs_haproxy: missing {', '.join(missing)}: run bash scripts/bench.sh",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("forwarder_vs_haproxy: run as root (/proc/slabinfo, descriptor limits)", file=sys.stderr)
        return 2
    executable = ROOT / ".venv" / "bin" / "anycast-lb"
    if not executable.exists():
        print("forwarder_vs_haproxy: no .venv/bin/anycast-lb: run bash scripts/install.sh", file=sys.stderr)
        return 2

    # SIGTERM unwinds like Ctrl-C, so every process is stopped in finally.
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    os.sched_setaffinity(0, set(cpu_list(args.load_cpu)))
    topo = configs.Topology()
    engines = [configs.Forwarding(engine=e, splice=not args.no_splice,
                                  buffer_size=args.buffer_size, workers=args.workers)
               for e in dict.fromkeys([args.engine, *args.extra_engine])]
    wanted = args.idle_connections + 200
    nofile = raise_nofile(max(configs.haproxy_fds(wanted),
                              *(configs.anycast_lb_fds(wanted, topo, f) for f in engines)))
    idle = min(args.idle_connections, configs.max_idle_connections(nofile, [(topo, f) for f in engines]))
    if idle < args.idle_connections:
        progress(f"idle: RLIMIT_NOFILE is {nofile} and cannot be raised here: "
                 f"{idle} idle connections instead of {args.idle_connections}")
    forwarding = [configs.sized_for_idle(f, idle) for f in engines]
    loadgen = build_loadgen()
    workdir = Path(tempfile.mkdtemp(prefix="alb-bench-"))
    sup = Supervisor(workdir, nice=args.nice)
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # this process holds the idle connections
    info = meta(args, nofile, idle)
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        start_backends(sup, topo, args.load_cpu, loadgen, nginx_connections=min(idle + 1000, 15000))
        haproxy_options = configs.HaproxyOptions(splice=not args.no_haproxy_splice,
                                                 maxconn=idle + 200,
                                                 extra_global=tuple(args.haproxy_global),
                                                 extra_defaults=tuple(args.haproxy_defaults))
        proxies: list[Proxy] = [Haproxy(sup, topo, args.proxy_cpu, haproxy_options)]
        proxies += [AnycastLb(sup, topo, args.proxy_cpu, f, executable) for f in forwarding]
        ctx = loads.LoadContext(sup, topo, args.load_cpu, cpu_list(args.proxy_cpu), loadgen, workdir)
        d = args.duration
        plan: list[tuple[str, Callable[[Proxy], Callable[[int], dict[str, Any]] | None]]] = []
        if "idle" in args.tests:
            plan.append(("idle", lambda p: lambda pid: loads.idle_connections(ctx, pid, idle)))
        if "bulk" in args.tests:
            plan.append(("bulk1", lambda p: lambda pid: loads.bulk(ctx, pid, 1, d)))
            plan.append(("bulk8", lambda p: lambda pid: loads.bulk(ctx, pid, 8, d)))
        if "udp" in args.tests:
            plan.append(("udp", lambda p: (lambda pid: loads.udp_echo(ctx, pid, d)) if p.udp else None))
        if "short" in args.tests:
            plan.append(("short", lambda p: lambda pid: loads.short_connections(ctx, pid, d, args.connections)))
        if "latency" in args.tests:
            plan.append(("latency", lambda p: lambda pid: loads.paced_latency(ctx, pid, latency_rate(), d)))

        def latency_rate() -> float:
            if args.latency_rate is not None:
                return float(args.latency_rate)
            rates = [r["short_rate"] for r in runs if r["proxy"] == "haproxy" and r.get("short_rate")]
            if not rates:
                raise BenchError("no HAProxy short-connection rate measured: pass --latency-rate")
            summary = report.summarise(rates)
            assert summary is not None
            return round(summary.median / 2)

        for test, make in plan:
            for rep in range(args.repeat):
                order = proxies if rep % 2 == 0 else proxies[::-1]
                for proxy in order:
                    load = make(proxy)
                    if load is None:
                        continue
                    record: dict[str, Any] = {"test": test, "proxy": proxy.label, "rep": rep + 1}
                    try:
                        record.update(run_one(proxy, load))
                        progress(f"[{test} {rep + 1}/{args.repeat}] {proxy.label}: {short_summary(record)}")
                    except BenchError as exc:
                        record["error"] = str(exc)
                        progress(f"[{test} {rep + 1}/{args.repeat}] {proxy.label}: FAILED: {exc}")
                    runs.append(record)
    except KeyboardInterrupt:
        progress("interrupted: stopping every process started")
        raise
    finally:
        sup.close()
        if not args.keep and not any("error" in r for r in runs):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            progress(f"work directory kept: {workdir}")

    info["elapsed_s"] = round(time.monotonic() - started, 1)
    summaries = report.summarise_runs([r for r in runs if "error" not in r])
    tables_text, tables_md, comparisons = [], [], {}
    for proxy in proxies[1:]:
        rows = report.compare(summaries, proxy.label)
        tables_text.append(report.render_text(rows, proxy.label))
        tables_md.append(report.render_markdown(rows, proxy.label))
        comparisons[proxy.label] = [
            {"figure": r.figure.key, "ratio": r.ratio, "target": report.target_text(r.figure),
             "verdict": r.verdict} for r in rows]
    errors = [r for r in runs if "error" in r]
    print()
    print("\n\n".join(tables_text))
    held = f"{idle} idle connections; " if "idle" in args.tests else ""
    print(f"\nmedian [min-max] of {args.repeat} interleaved run(s); ratio = anycast-lb / HAProxy; "
          f"{held}{info['elapsed_s']} s in all")
    foreign: dict[str, dict[str, dict[str, float | int]]] = {}
    for proxy in proxies:
        shares = {}
        for key in ("foreign_on_proxy_cpu", "softirq_on_proxy_cpu"):
            summary = report.summarise([r.get(key) for r in runs
                                        if r["proxy"] == proxy.label and "error" not in r])
            if summary is not None:
                shares[key] = summary.as_dict()
        if shares:
            foreign[proxy.label] = shares
            print(f"proxy CPU during {proxy.label} runs, median share of its time: other processes "
                  f"{shares['foreign_on_proxy_cpu']['median']:.0%}, "
                  f"softirq {shares['softirq_on_proxy_cpu']['median']:.0%}")
    info["foreign_on_proxy_cpu"] = foreign
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    for r in errors:
        print(f"FAILED run: {r['test']} {r['proxy']} #{r['rep']}: {r['error'].splitlines()[0]}")
    result = {"meta": info, "runs": runs,
              "summary": {label: {k: s.as_dict() for k, s in figs.items()}
                          for label, figs in summaries.items()},
              "comparisons": comparisons}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n\n".join(tables_md) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
