"""The cheap parts of benchmarks/forwarder_vs_haproxy.py, so a broken harness
shows in CI without HAProxy or a benchmark run: generated configs (the
anycast-lb one validated by the real config models), /proc accounting on a
real child process, figures and verdicts, and the C load generator built and
run briefly on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from anycast_lb.config import Engine, parse_config
from anycast_lb.errors import ConfigError
from anycast_lb.limits import plan
from benchmarks import forwarder_vs_haproxy as bench
from benchmarks.lbbench import configs, loads, processes, procfs, report

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ configs


def test_anycast_lb_config_is_valid_and_matches_the_pool() -> None:
    topo = configs.Topology()
    forwarding = configs.Forwarding(engine="asyncio", splice=False, buffer_size=131072, workers=2)
    cfg = parse_config(configs.anycast_lb_config(topo, forwarding), "bench")
    assert cfg.bgp is None
    assert cfg.forwarding.engine is Engine.ASYNCIO
    assert (cfg.forwarding.splice, cfg.forwarding.buffer_size, cfg.forwarding.workers) == (False, 131072, 2)
    by_name = {s.name: s for s in cfg.services}
    assert [str(b.address) for b in by_name["web"].backends] == list(topo.backends)
    assert [str(b.address) for b in by_name["bulk"].backends] == [topo.bulk_backend]
    assert by_name["udp"].protocol.value == "udp"
    for service in cfg.services:
        assert str(service.vip) == topo.vip
        assert service.health.kind.value == "none"
        assert service.balance.value == "round_robin"
    # Plain YAML (no anchors) that the CLI loads the same way.
    text = configs.anycast_lb_yaml(topo, forwarding)
    assert "&id" not in text and "*id" not in text


def test_haproxy_config_is_one_thread_tcp_round_robin_over_the_same_pool() -> None:
    topo = configs.Topology()
    text = configs.haproxy_config(topo, configs.HaproxyOptions(maxconn=9600, extra_defaults=("option tcplog",)))
    lines = [line.strip() for line in text.splitlines()]
    assert "nbthread 1" in lines
    assert "mode tcp" in lines
    assert "maxconn 9600" in lines
    assert "option splice-auto" in lines
    assert "option tcplog" in lines
    assert lines.count("balance roundrobin") == 2
    assert f"bind {topo.vip}:{topo.web_port}" in lines
    assert "server be1 127.0.0.11:8080" in lines and "server be2 127.0.0.12:8080" in lines
    assert f"server be1 {topo.bulk_backend}:{topo.bulk_port}" in lines
    assert "option splice-auto" not in configs.haproxy_config(topo, configs.HaproxyOptions(splice=False))


def test_nginx_config_answers_with_its_name() -> None:
    text = configs.nginx_config("127.0.0.11", 8080, "be1", "/tmp/x", max_connections=1234)
    assert "listen 127.0.0.11:8080" in text
    assert 'return 200 "be1\\n";' in text
    assert "worker_connections 1234;" in text
    assert "daemon off;" in text


@pytest.mark.parametrize("nofile", [1024, 4096, 20000, 65536, 1048576])
def test_idle_connections_fit_haproxys_descriptor_budget(nofile: int) -> None:
    n = configs.max_idle_connections(nofile)
    assert n % 100 == 0
    assert configs.haproxy_fds(n + 200) <= nofile
    assert configs.haproxy_fds(n + 300 + 200) > nofile - 200  # not needlessly small
    assert configs.max_idle_connections(20000) == 9400


@pytest.mark.parametrize("nofile", [4096, 20000, 65536])
@pytest.mark.parametrize("splice", [True, False])
def test_idle_connections_fit_the_nodes_descriptor_budget_from_one_source(nofile: int, splice: bool) -> None:
    topo = configs.Topology()
    engine = configs.Forwarding(splice=splice)
    n = configs.max_idle_connections(nofile, [(topo, engine)])
    assert 0 < n <= configs.max_idle_connections(nofile)
    most = configs.anycast_lb_max_connections(nofile, topo, engine)
    assert n + 200 <= most < n + 300 + 200 or n == configs.max_idle_connections(nofile)
    # The node admits them all from 127.0.0.1, as the idle load opens them.
    config = parse_config(configs.anycast_lb_config(topo, replace(engine, max_tcp_connections=n + 200)))
    budget = plan(nofile, config)
    assert budget.tcp_connections == budget.tcp_connections_per_source == n + 200
    assert budget.udp_flows_per_source["udp"] >= 16  # the UDP load's flows
    with pytest.raises(ConfigError):
        plan(nofile, parse_config(configs.anycast_lb_config(topo, replace(engine, max_tcp_connections=most + 1))))
    assert configs.anycast_lb_fds(most, topo, engine) <= nofile < configs.anycast_lb_fds(most + 1, topo, engine)


@pytest.mark.parametrize("nofile", [1024, 20000])
def test_the_node_config_sized_for_the_idle_count_starts_under_the_limit(nofile: int) -> None:
    """Under a small limit no idle connection fits both proxies, and the node
    keeps its own budget instead of caps it cannot hold."""
    topo = configs.Topology()
    engine = configs.Forwarding()
    idle = configs.max_idle_connections(nofile, [(topo, engine)])
    sized = configs.sized_for_idle(engine, idle)
    budget = plan(nofile, parse_config(configs.anycast_lb_config(topo, sized)))
    if idle:
        assert budget.tcp_connections_per_source == idle + 200
    else:
        assert sized == engine and budget.tcp_connections > 0


# ------------------------------------------------------------------ procfs


def test_parse_stat_counts_fields_after_the_last_parenthesis() -> None:
    fields = ["S"] + ["0"] * 10 + ["123", "45"] + ["0"] * 30
    text = "4242 (we ird) (name) " + " ".join(fields)
    assert procfs.parse_stat_split(text) == (123, 45)
    with pytest.raises(ValueError):
        procfs.parse_stat_split("4242 no parenthesis")


def test_parse_status_meminfo_sockstat() -> None:
    assert procfs.parse_status_rss("Name:\tx\nVmRSS:\t  2048 kB\n") == 2 * 1024 * 1024
    assert procfs.parse_status_rss("Name:\tzombie\n") == 0
    meminfo = procfs.parse_meminfo("MemTotal: 100 kB\nSlab:  7 kB\nHugePages_Total: 0\n")
    assert meminfo["Slab"] == 7 * 1024 and meminfo["HugePages_Total"] == 0
    sockstat = "sockets: used 39\nTCP: inuse 7 orphan 0 tw 3 alloc 10 mem 166\nUDP: inuse 1 mem 2\n"
    assert procfs.parse_sockstat_tcp_pages(sockstat) == 166


def test_parse_slabinfo_excludes_time_wait_sockets() -> None:
    text = ("slabinfo - version: 2.1\n# name <active_objs> <num_objs> <objsize> ...\n"
            "tw_sock_TCP   100 200 256 16 1 : tunables 0 0 0 : slabdata 1 1 0\n"
            "TCP            10  13 2368 13 8 : tunables 0 0 0 : slabdata 1 1 0\n"
            "filp            4   8  256 16 1 : tunables 0 0 0 : slabdata 1 1 0\n")
    assert loads.parse_slabinfo(text) == 10 * 2368 + 4 * 256


def test_parse_cpu_busy_leaves_out_idle_and_iowait() -> None:
    text = ("cpu  9 9 9 9 9 9 9 9 0 0\n"
            "cpu0 10 1 5 100 7 2 3 4 0 0\n"
            "cpu1 1 0 1 50 0 0 0 0 0 0\nintr 5\n")
    assert loads.parse_cpu_busy(text) == {"cpu0": (25, 3), "cpu1": (2, 0)}


SPINNER = """
import sys, threading, time, subprocess
def spin():
    end = time.thread_time() + 0.3
    while time.thread_time() < end:
        sum(range(2000))  # user time between the clock's system calls
t = threading.Thread(target=spin)
t.start(); t.join()
child = subprocess.Popen([sys.executable, "-c", "import sys; print(1, flush=True); sys.stdin.read()"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
child.stdout.readline()  # the child's interpreter is up: its RSS is real
print(child.pid, flush=True)
sys.stdin.read()
child.stdin.close(); child.wait()
"""


def test_cpu_rss_and_tree_of_a_real_process_include_threads_and_children() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SPINNER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        # The spinning thread has exited: its 0.3 s still count for the process.
        user, system = procfs.cpu_split(proc.pid)
        assert user + system >= 0.25
        assert user >= 0.15  # the spin is mostly user time
        assert grandchild in procfs.process_tree(proc.pid)
        assert procfs.rss_bytes(proc.pid) > procfs.rss_bytes(grandchild) > 1024 * 1024
        assert procfs.fd_count(proc.pid) >= 3
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]


# ------------------------------------------------------------------ report


def test_summaries_ratios_and_verdicts() -> None:
    runs: list[dict[str, object]] = [
        {"proxy": "haproxy", "short_cpu_us": 10.0, "udp_pps": None, "bulk1_gbps": 10.0},
        {"proxy": "haproxy", "short_cpu_us": 30.0, "bulk1_gbps": 12.0},
        {"proxy": "haproxy", "short_cpu_us": 20.0, "bulk1_gbps": 11.0},
        {"proxy": "anycast-lb relay", "short_cpu_us": 25.0, "udp_pps": 1000.0, "bulk1_gbps": 10.0},
    ]
    summaries = report.summarise_runs(runs)
    assert summaries["haproxy"]["short_cpu_us"] == report.Summary(20.0, 10.0, 30.0, 3)
    assert "udp_pps" not in summaries["haproxy"]
    rows = {r.figure.key: r for r in report.compare(summaries, "anycast-lb relay")}
    assert rows["short_cpu_us"].ratio == pytest.approx(1.25)
    assert rows["short_cpu_us"].verdict == "FAIL"            # target <= 1.2x
    assert rows["bulk1_gbps"].verdict == "FAIL"              # 10 / 11 < 1.0x
    assert rows["udp_pps"].ratio is None and rows["udp_pps"].verdict == "-"
    text = report.render_text(list(rows.values()), "anycast-lb relay")
    assert "20.0 [10.0-30.0]" in text and "<= 1.2x" in text and "n/a" in text
    markdown = report.render_markdown(list(rows.values()), "anycast-lb relay")
    assert markdown.splitlines()[0] == "| figure | HAProxy | anycast-lb relay | ratio | target | verdict |"
    assert report.verdict(report.FIGURE_BY_KEY["bulk8_gbps"], 1.0) == "PASS"
    assert report.verdict(report.FIGURE_BY_KEY["lat_p99_us"], None) == "n/a"


def test_wrk_summary_and_http_response_parsing() -> None:
    out = 'Running 1s test\n{"requests": 10, "duration_us": 1000000, "connect": 0, "read": 1, ' \
          '"write": 0, "status": 0, "timeout": 0}\n'
    assert loads.parse_wrk(out)["read"] == 1
    assert not loads.response_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbe")
    assert loads.response_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbe1\n")


def test_command_line() -> None:
    args = bench.parse_args(["--quick", "--engine", "asyncio", "--tests", "short,latency"])
    assert (args.repeat, args.duration, args.idle_connections) == (1, 1.0, 500)
    assert args.tests == ("short", "latency")
    assert bench.cpu_list("0-2,5") == (0, 1, 2, 5)
    with pytest.raises(SystemExit):
        bench.parse_args(["--tests", "nonsense"])


def test_tcp_listening_reads_proc_net_tcp() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not processes.tcp_listening("127.0.0.1", port)
        s.listen()
        assert processes.tcp_listening("127.0.0.1", port)


# ------------------------------------------------------------------ loadgen


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (scripts/bench.sh installs it)")
    binary = tmp_path_factory.mktemp("loadgen") / "loadgen"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary),
                    str(ROOT / "benchmarks" / "loadgen.c")], check=True, timeout=60)
    return binary


class _CloseAfterAnswer(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(1024)
            if not chunk:
                return
            data += chunk
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")


@pytest.fixture
def http_server() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _CloseAfterAnswer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_loadgen_paced_tcp_measures_every_connection(loadgen: Path, http_server: int) -> None:
    started = time.monotonic()
    out = subprocess.run([str(loadgen), "paced-tcp", "127.0.0.1", str(http_server), "200", "40", "2000"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    result = json.loads(out)
    assert result["ok"] == 40 and result["errors"] == result["timeouts"] == 0
    assert 0 < result["p50_us"] <= result["p99_us"] <= result["max_us"]
    # Open loop: 40 connections at 200/s take about 0.2 s, not 40 round trips' worth of waits.
    assert 0.18 <= result["duration_s"] and time.monotonic() - started < 10


def test_loadgen_refuses_non_loopback_targets(loadgen: Path) -> None:
    done = subprocess.run([str(loadgen), "paced-tcp", "203.0.113.1", "80", "10", "1", "100"],
                          capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 2 and "loopback" in done.stderr


def test_loadgen_udp_echo_and_flood(loadgen: Path) -> None:
    server = subprocess.Popen([str(loadgen), "udp-echo-server", "127.0.0.1", "0", "30"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline().split()
        assert line[0] == "ready"
        out = subprocess.run([str(loadgen), "udp-flood", "127.0.0.1", line[1], "4", "64", "4", "0.2"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        result = json.loads(out)
        assert result["received"] > 100
        assert result["sent"] >= result["received"]
    finally:
        server.terminate()
        server.wait(10)
        server.stdout.close()  # type: ignore[union-attr]
