"""The kernel engine for real, in scratch namespaces (root and nft needed).

One bridge holds a client, two load-balancer nodes and two backends (the
VIP on their ``lo``, set up by ``anycast-lb backend-setup --apply``). The
client routes the VIP through one node or the other, as a router's ECMP
would. Each node loads the same table through :class:`NftForwarder`; the
backends answer the client directly (direct server return).

- the same 5-tuples reach the same backend through either node;
- established flows moved from one node to the other survive;
- during a drain, flows moved to the other node stay on the drained
  backend while new flows avoid it.

Namespaces are named ``albt-kern-<pid>-*`` and deleted at the end.
Addresses: 198.51.100.0/24 (the LAN) and 203.0.113.200 (the VIP), RFC 5737.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest

from anycast_lb.kernel import render
from anycast_lb.kernel.apply import NftForwarder, check_on_link, check_support
from anycast_lb.maglev import build_table

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
    reason="needs root, nft and ip (network namespaces)",
)

PREFIX = f"albt-kern-{os.getpid()}"
VIP = ipaddress.IPv4Address("203.0.113.200")
PORT = 80
CLIENT = "198.51.100.100"
NODES = {"n1": "198.51.100.11", "n2": "198.51.100.12"}
BACKENDS = {"b1": ipaddress.IPv4Address("198.51.100.21"),
            "b2": ipaddress.IPv4Address("198.51.100.22")}
SIZE = 251
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def ns(name: str) -> str:
    return f"{PREFIX}-{name}"


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
    return done.stdout


def _tcp_listener(address: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on ``address:port`` (made inside a namespace
    by :func:`in_netns`)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port))
    s.listen(backlog)
    return s


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread moved into namespace ``name``: sockets it
    makes live there, and may be used from any thread afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    box: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with open(f"/run/netns/{ns(name)}") as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            box.append(fn())
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(30)
    if errors:
        raise errors[0]
    return box[0]


def _serve(listener: socket.socket, name: bytes) -> None:
    """Answer each line on each connection with this backend's name."""
    def one(conn: socket.socket) -> None:
        with conn:
            try:
                for _line in conn.makefile("rb"):
                    conn.sendall(name + b"\n")
            except OSError:
                return  # the client resets its connections on purpose

    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def _answer_datagrams(sock: socket.socket, name: bytes) -> None:
    """Answer each datagram with this backend's name (from the VIP, direct)."""
    while True:
        try:
            _data, peer = sock.recvfrom(64)
            if peer is None:  # shut down at teardown
                return
            sock.sendto(name, peer)
        except OSError:
            return


@pytest.fixture(scope="module")
def lab() -> Iterator[None]:
    names = ["br", "cl", *NODES, *BACKENDS]
    try:
        for name in names:
            sh("ip", "netns", "add", ns(name))
        sh("ip", "-n", ns("br"), "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", ns("br"), "link", "set", "br0", "up")
        for name, addr in [("cl", CLIENT), *NODES.items(),
                           *((b, str(a)) for b, a in BACKENDS.items())]:
            sh("ip", "-n", ns(name), "link", "add", "lan0", "type", "veth", "peer", "name",
               f"p-{name}", "netns", ns("br"))
            sh("ip", "-n", ns("br"), "link", "set", f"p-{name}", "master", "br0", "up")
            sh("ip", "-n", ns(name), "addr", "add", f"{addr}/24", "dev", "lan0")
            sh("ip", "-n", ns(name), "link", "set", "lan0", "up")
            sh("ip", "-n", ns(name), "link", "set", "lo", "up")
        for name in BACKENDS:
            sh("ip", "netns", "exec", ns(name), sys.executable, "-m", "anycast_lb",
               "backend-setup", "--vip", str(VIP), "--apply")
        sh("ip", "-n", ns("cl"), "route", "add", f"{VIP}/32", "via", NODES["n1"])
        yield
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", ns(name)], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def backends(lab: None) -> Iterator[None]:
    listeners = []
    for name in BACKENDS:
        def udp() -> socket.socket:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind((str(VIP), UDP_PORT))
            return u
        echo = in_netns(name, udp)
        listeners.append(echo)
        threading.Thread(target=_answer_datagrams, args=(echo, name.encode()),
                         daemon=True).start()
        listener = in_netns(name, functools.partial(_tcp_listener, str(VIP), PORT, 256))
        listeners.append(listener)
        threading.Thread(target=_serve, args=(listener, name.encode()), daemon=True).start()
    yield
    for listener in listeners:
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # a datagram socket is not connected
        listener.close()


def _runner(name: str) -> Callable[..., object]:
    async def run(argv: Sequence[str], stdin: str | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns(name), *argv, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if proc.returncode:
            from anycast_lb.errors import ClusterError
            raise ClusterError(err.decode())
        return out.decode()
    return run


UDP_PORT = 53
SVC = render.KernelService(0, VIP, PORT, "tcp", SIZE, render.derive_seed(VIP, PORT, "tcp", SIZE),
                           300, 4096)
UDP_SVC = render.KernelService(1, VIP, UDP_PORT, "udp", SIZE,
                               render.derive_seed(VIP, UDP_PORT, "udp", SIZE), 30, 4096)
SETTINGS = render.KernelSettings("anycast_lb_fwd", "lan0", (SVC, UDP_SVC))


def _marks(names: Sequence[str], port: int = PORT) -> tuple[int, ...]:
    addrs = [BACKENDS[n] for n in names]
    return render.marks(build_table([f"{a}:{port}" for a in addrs], size=SIZE), addrs)


@pytest.fixture
def nodes(backends: None) -> Iterator[dict[str, NftForwarder]]:
    fwd = {name: NftForwarder(SETTINGS, runner=_runner(name)) for name in NODES}  # type: ignore[arg-type]

    async def install() -> None:
        for name, f in fwd.items():
            await check_support("lan0", _runner(name))  # type: ignore[arg-type]
            await check_on_link("lan0", BACKENDS.values(), _runner(name))  # type: ignore[arg-type]
            await f.install({
                0: render.steady(_marks(["b1", "b2"]), BACKENDS.values()),
                1: render.steady(_marks(["b1", "b2"], UDP_PORT), BACKENDS.values()),
            })

    asyncio.run(install())
    route("n1")
    yield fwd

    async def remove() -> None:
        for f in fwd.values():
            await f.remove()

    asyncio.run(remove())


def route(node: str) -> None:
    """Send the client's VIP traffic through ``node`` (an ECMP move)."""
    sh("ip", "-n", ns("cl"), "route", "replace", f"{VIP}/32", "via", NODES[node])


def connect(sport: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(5)
        s.bind((CLIENT, sport))
        s.connect((str(VIP), PORT))
        return s
    return in_netns("cl", make)


def ask(s: socket.socket) -> str:
    s.sendall(b"?\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(64)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data.decode().strip()


def reset(s: socket.socket) -> None:
    """Close with RST (no TIME-WAIT anywhere: the 5-tuple can be used again)."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_same_five_tuples_same_backend_through_either_node(
    nodes: dict[str, NftForwarder],
) -> None:
    sports = range(41000, 41060)
    seen: dict[str, list[str]] = {}
    for node in ("n1", "n2"):
        route(node)
        answers = []
        for sport in sports:
            s = connect(sport)
            answers.append(ask(s))
            reset(s)
        seen[node] = answers
    assert seen["n1"] == seen["n2"]
    assert set(seen["n1"]) == {"b1", "b2"}  # both backends take flows

    async def counters() -> dict[str, dict[str, int]]:
        out = {}
        for name, f in nodes.items():
            by_backend = await f.counters()
            out[name] = {b: by_backend[(0, addr)][0] for b, addr in BACKENDS.items()}
        return out

    packets = asyncio.run(counters())
    for node in ("n1", "n2"):  # each node forwarded each backend's flows: >= SYN, ?, ACK, RST
        for backend in ("b1", "b2"):
            assert packets[node][backend] >= 4 * seen[node].count(backend), packets


def test_moved_flows_survive(nodes: dict[str, NftForwarder]) -> None:
    route("n1")
    flows = [connect(sport) for sport in range(42000, 42040)]
    try:
        before = [ask(s) for s in flows]
        route("n2")
        after = [ask(s) for s in flows]  # a broken flow raises (RST or timeout)
        assert after == before
        route("n1")
        assert [ask(s) for s in flows] == before
    finally:
        for s in flows:
            reset(s)


def test_drain_keeps_moved_flows_and_sends_new_ones_elsewhere(
    nodes: dict[str, NftForwarder],
) -> None:
    route("n1")
    flows = [connect(sport) for sport in range(43000, 43040)]
    try:
        before = [ask(s) for s in flows]
        assert "b1" in before

        async def drain() -> None:
            for f in nodes.values():
                await f.update(0, render.start_drain(f.tables(0), _marks(["b2"])))

        asyncio.run(drain())
        route("n2")  # n2 never saw these flows: non-SYN misses use the previous table
        assert [ask(s) for s in flows] == before
        fresh = [connect(sport) for sport in range(43100, 43120)]
        try:
            assert {ask(s) for s in fresh} == {"b2"}  # SYN misses use the current table
        finally:
            for s in fresh:
                reset(s)
    finally:
        for s in flows:
            reset(s)


def test_engine_drain_promotion_and_status(backends: None) -> None:
    """KernelEngine on both nodes, from a node config: a drain and its end
    (promotion) break no flow, moved or not; status agrees across nodes."""
    from anycast_lb.config import parse_config
    from anycast_lb.kernel.engine import KernelEngine

    cfg = parse_config({
        "forwarding": {"engine": "kernel", "kernel": {"interface": "lan0"}},
        "services": [{"name": "web", "vip": str(VIP), "port": PORT, "maglev_table_size": SIZE,
                      "backends": [{"address": str(a), "port": PORT} for a in BACKENDS.values()]}],
    })
    engines = {name: KernelEngine(cfg, runner=_runner(name)) for name in NODES}  # type: ignore[arg-type]
    keys = {name: f"{addr}:{PORT}" for name, addr in BACKENDS.items()}

    async def each(step: Callable[[KernelEngine], Awaitable[None]]) -> None:
        for engine in engines.values():
            await step(engine)

    asyncio.run(each(lambda e: e.start()))
    try:
        asyncio.run(each(lambda e: e.set_up(0, keys.values())))
        route("n1")
        flows = [connect(sport) for sport in range(44000, 44040)]
        try:
            before = [ask(s) for s in flows]
            assert "b1" in before
            asyncio.run(each(lambda e: e.drain(0, keys["b1"])))
            route("n2")
            assert [ask(s) for s in flows] == before  # moved: previous table, then learned
            asyncio.run(each(lambda e: e.end_drain(0, keys["b1"])))
            assert [ask(s) for s in flows] == before  # promoted: the flow map holds them
            route("n1")
            assert [ask(s) for s in flows] == before  # back on n1: its own flow map
            fresh = [connect(sport) for sport in range(44100, 44120)]
            try:
                assert {ask(s) for s in fresh} == {"b2"}
            finally:
                for s in fresh:
                    reset(s)
        finally:
            for s in flows:
                reset(s)

        async def statuses() -> dict[str, Any]:
            return {name: await e.status() for name, e in engines.items()}

        status = asyncio.run(statuses())
        web1, web2 = status["n1"]["web"], status["n2"]["web"]
        assert (web1["seed"], web1["digest"], web1["generation"]) == (
            web2["seed"], web2["digest"], web2["generation"])
        assert web1["generation"] == 3 and web1["draining"] == [] and web1["table_size"] == SIZE
        assert web1["backends"][str(BACKENDS["b2"])]["packets"] > 0
        assert web2["backends"][str(BACKENDS["b1"])]["packets"] > 0  # moved flows
    finally:
        asyncio.run(each(lambda e: e.stop()))


def test_a_reused_five_tuple_follows_the_tables(nodes: dict[str, NftForwarder]) -> None:
    """A connection on a 5-tuple the flow map learned for an earlier one
    (reset, so the client may reuse its port at once) starts with a SYN,
    which forgets the old entry: after a drain it avoids the drained
    backend. Without the SYN's ``delete`` it would reach b1 again."""
    route("n1")
    sports = range(47000, 47040)
    first = {}
    for sport in sports:
        s = connect(sport)
        first[sport] = ask(s)
        reset(s)
    on_b1 = [p for p, b in first.items() if b == "b1"]
    assert on_b1

    async def drain() -> None:
        f = nodes["n1"]
        await f.update(0, render.start_drain(f.tables(0), _marks(["b2"])))

    asyncio.run(drain())
    again = []
    for sport in on_b1:
        s = connect(sport)
        again.append(ask(s))
        reset(s)
    assert set(again) == {"b2"}


def test_udp_same_five_tuples_same_backend_through_either_node(
    nodes: dict[str, NftForwarder],
) -> None:
    sports = range(45000, 45040)

    def make() -> list[socket.socket]:
        out = []
        for sport in sports:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.settimeout(5)
            u.bind((CLIENT, sport))
            out.append(u)
        return out

    socks = in_netns("cl", make)
    try:
        seen = {}
        for node in ("n1", "n2"):
            route(node)
            answers = []
            for u in socks:
                u.sendto(b"?", (str(VIP), UDP_PORT))
                answers.append(u.recvfrom(64)[0].decode())
            seen[node] = answers
        assert seen["n1"] == seen["n2"]
        assert set(seen["n1"]) == {"b1", "b2"}
    finally:
        for u in socks:
            u.close()


def test_refuses_a_missing_interface_and_off_link_backends(lab: None) -> None:
    from anycast_lb.errors import KernelEngineError

    run = _runner("n1")
    with pytest.raises(KernelEngineError, match="cannot run the engine's table on 'nosuch0'"):
        asyncio.run(check_support("nosuch0", run))  # type: ignore[arg-type]
    sh("ip", "-n", ns("n1"), "route", "add", "203.0.113.0/25", "via", BACKENDS["b1"].exploded)
    try:
        with pytest.raises(KernelEngineError) as info:
            asyncio.run(check_on_link("lan0", [BACKENDS["b2"], ipaddress.IPv4Address(
                "203.0.113.5"), ipaddress.IPv4Address("203.0.113.250")], run))  # type: ignore[arg-type]
    finally:
        sh("ip", "-n", ns("n1"), "route", "del", "203.0.113.0/25")
    message = str(info.value)
    assert "203.0.113.5: behind gateway 198.51.100.21" in message
    assert "203.0.113.250: no route" in message
    assert str(BACKENDS["b2"]) + ":" not in message


HEALTH_PORT = 8081


def _http(method: str, path: str, token: str | None = None) -> tuple[int, str]:
    """One request to the node's API on n1's loopback (port 9180)."""
    import http.client

    sock = in_netns("n1", lambda: socket.create_connection(("127.0.0.1", 9180), timeout=5))
    conn = http.client.HTTPConnection("127.0.0.1", 9180, timeout=5)
    conn.sock = sock
    conn.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    return response.status, body


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    from tests.waiting import wait_until

    def safe() -> bool:
        try:
            return predicate()
        except OSError:
            return False  # the API is not listening yet

    asyncio.run(wait_until(safe, timeout=timeout, interval=0.1, what=what))


def _web_status() -> dict[str, Any]:
    import json

    status, body = _http("GET", "/status")
    assert status == 200, body
    return next(s for s in json.loads(body)["services"] if s["name"] == "web")


@pytest.fixture
def health_listeners(backends: None) -> Iterator[None]:
    """Each backend accepts TCP health checks on its own address."""
    listeners = []
    for name, addr in BACKENDS.items():
        listener = in_netns(name, functools.partial(_tcp_listener, str(addr), HEALTH_PORT, 64))
        listeners.append(listener)
        threading.Thread(target=_serve, args=(listener, b"ok"), daemon=True).start()
    yield
    for listener in listeners:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()


def test_node_runs_the_engine(health_listeners: None, tmp_path: Any) -> None:
    """``anycast-lb run`` with ``engine: kernel`` on n1: health brings the
    backends into the table, ``POST /backends/.../drain`` drains one (its
    flows stay, new flows avoid it), ``/status`` and ``/metrics`` show the
    tables and counters, and SIGTERM removes the table."""
    import signal

    import yaml

    token = tmp_path / "token"
    token.write_text("secret-token\n")
    token.chmod(0o600)
    table = "albt_node_test"
    config = {
        "node": {"name": "n1"},
        "api": {"listen": "127.0.0.1:9180", "admin_token_file": str(token)},
        "drain": {"timeout": 3, "announce_grace": 0},
        "forwarding": {"engine": "kernel", "kernel": {"interface": "lan0", "table": table}},
        "services": [{"name": "web", "vip": str(VIP), "port": PORT, "maglev_table_size": SIZE,
                      "health": {"kind": "tcp", "port": HEALTH_PORT, "interval": 0.5,
                                 "timeout": 0.4, "rise": 1, "fall": 2},
                      "backends": [{"address": str(a), "port": PORT}
                                   for a in BACKENDS.values()]}],
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "node.log").open("w")
    proc = subprocess.Popen(["ip", "netns", "exec", ns("n1"), sys.executable, "-m", "anycast_lb",
                             "run", "--config", str(path)], stdout=log, stderr=log)
    flows: list[socket.socket] = []
    try:
        def serving() -> bool:
            assert proc.poll() is None, (tmp_path / "node.log").read_text()[-2000:]
            web = _web_status()
            return bool(web["listening"] and web["up_backends"] == 2)

        _wait(serving, "the node to serve web with both backends")
        kernel = _web_status()["kernel"]
        assert kernel["seed"] == f"{render.derive_seed(VIP, PORT, 'tcp', SIZE):#010x}"
        assert kernel["table_size"] == SIZE and kernel["generation"] >= 1
        route("n1")
        flows = [connect(sport) for sport in range(46000, 46030)]
        before = [ask(s) for s in flows]
        assert set(before) == {"b1", "b2"}
        drained = f"{BACKENDS['b1']}:{PORT}"
        status, body = _http("POST", f"/backends/web/{drained}/drain", token="secret-token")
        assert status == 200, body
        _wait(lambda: _web_status()["kernel"]["draining"] == [drained], "the drain to start")
        assert [ask(s) for s in flows] == before  # the flow map keeps them on b1
        fresh = [connect(sport) for sport in range(46100, 46120)]
        try:
            assert {ask(s) for s in fresh} == {"b2"}
        finally:
            for s in fresh:
                reset(s)
        _wait(lambda: _web_status()["kernel"]["backends"].get(str(BACKENDS["b1"]), {})
              .get("packets", 0) > 0, "b1's packet counter in /status")
        status, metrics = _http("GET", "/metrics")
        assert status == 200
        assert (f'anycast_lb_kernel_backend_packets_total{{backend="{BACKENDS["b2"]}",'
                'service="web"}') in metrics
        assert 'anycast_lb_kernel_draining_backends{service="web"} 1.0' in metrics
        # drain.timeout (3 s) later the drain is promoted: learned flows stay.
        _wait(lambda: _web_status()["kernel"]["drained"] == [drained], "the promotion", 10.0)
        assert [ask(s) for s in flows] == before
    finally:
        for s in flows:
            reset(s)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(5)
        log.close()
    assert code == 0, (tmp_path / "node.log").read_text()[-2000:]
    tables = sh("ip", "netns", "exec", ns("n1"), "nft", "list", "tables")
    assert table not in tables  # the node deleted its table at stop
