"""Probes against real sockets and processes on 127.0.0.1 (ports picked by
the kernel and read back after bind). Readiness is awaited, never slept for."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from ipaddress import ip_address
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from anycast_lb.config import BackendConfig, HealthConfig, HealthKind
from anycast_lb.health import (
    ExecProbe,
    HttpProbe,
    NoneProbe,
    TcpProbe,
    make_probe,
    make_session,
)
from tests.procs import exited
from tests.waiting import wait_until

LOCAL = "127.0.0.1"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with make_session() as s:
        yield s


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connects get RST (connection refused)."""
    sock = socket.socket()
    sock.bind((LOCAL, 0))
    yield sock.getsockname()[1]
    sock.close()


# --- TCP ---------------------------------------------------------------------


async def test_tcp_ok_connects_and_closes() -> None:
    accepted = asyncio.Event()
    closed_by_peer = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        if await reader.read() == b"":
            closed_by_peer.set()
        writer.close()

    server = await asyncio.start_server(handle, LOCAL, 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        result = await TcpProbe(LOCAL, port, 1.0).check()
        assert result.ok, result
        assert result.detail == "connected"
        assert 0.0 <= result.latency_s < 1.0
        async with asyncio.timeout(5):
            await accepted.wait()
            await closed_by_peer.wait()  # the probe does not leave the socket open


async def test_tcp_refused(refused_port: int) -> None:
    result = await TcpProbe(LOCAL, refused_port, 1.0).check()
    assert not result.ok
    assert result.detail == "connect refused"


async def test_tcp_timeout_on_full_backlog() -> None:
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen(0)
    addr = listener.getsockname()
    fillers: list[socket.socket] = []
    try:
        # Fill the accept queue until a connect stalls: further SYNs are dropped.
        for _ in range(8):
            filler = socket.socket()
            filler.settimeout(0.2)
            fillers.append(filler)
            try:
                filler.connect(addr)
            except TimeoutError:
                break
        else:
            pytest.fail("could not fill the listen backlog")
        started = time.monotonic()
        result = await TcpProbe(LOCAL, addr[1], 0.3).check()
        elapsed = time.monotonic() - started
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert not result.ok
    assert result.detail == "timeout after 0.3 s"
    assert 0.25 <= elapsed < 2.0
    assert result.latency_s == pytest.approx(elapsed, abs=0.1)


# --- HTTP --------------------------------------------------------------------


class HttpBackend:
    """A real aiohttp.web server: /healthz 200, /broken 500, anything else 404.
    Records (path, Host header, client port) of each request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, int]] = []
        app = web.Application()
        app.router.add_get("/healthz", self._ok)
        app.router.add_get("/broken", self._broken)
        self.runner = web.AppRunner(app, access_log=None)
        self.port = 0

    def _record(self, request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append((request.path, request.headers.get("Host", ""), peer[1] if peer else -1))

    async def _ok(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(text="ok")

    async def _broken(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(status=500, text="broken")

    async def start(self, host: str = LOCAL) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, 0)
        await site.start()
        self.port = self.runner.addresses[0][1]


@pytest.fixture
async def http_backend() -> AsyncIterator[HttpBackend]:
    backend = HttpBackend()
    await backend.start()
    try:
        yield backend
    finally:
        await backend.runner.cleanup()


async def test_http_200_is_ok_with_host_header(
    session: aiohttp.ClientSession, http_backend: HttpBackend
) -> None:
    probe = HttpProbe(session, LOCAL, http_backend.port, "/healthz", 1.0, range(200, 300),
                      host="web.example")
    result = await probe.check()
    assert result.ok, result
    assert result.detail == "status 200"
    assert http_backend.requests[0][:2] == ("/healthz", "web.example")


async def test_http_default_host_is_backend_address(
    session: aiohttp.ClientSession, http_backend: HttpBackend
) -> None:
    probe = HttpProbe(session, LOCAL, http_backend.port, "/healthz", 1.0, [200])
    assert (await probe.check()).ok
    assert http_backend.requests[0][1] == f"{LOCAL}:{http_backend.port}"


async def test_http_500_fails(session: aiohttp.ClientSession, http_backend: HttpBackend) -> None:
    probe = HttpProbe(session, LOCAL, http_backend.port, "/broken", 1.0, range(200, 300))
    result = await probe.check()
    assert not result.ok
    assert result.detail == "status 500"
    assert [r[0] for r in http_backend.requests] == ["/broken"]


async def test_http_path_and_expect_status(
    session: aiohttp.ClientSession, http_backend: HttpBackend
) -> None:
    missing = HttpProbe(session, LOCAL, http_backend.port, "/missing", 1.0, range(200, 300))
    result = await missing.check()
    assert (result.ok, result.detail) == (False, "status 404")
    # A 500 can be made healthy on purpose, and a 200 unhealthy.
    assert (await HttpProbe(session, LOCAL, http_backend.port, "/broken", 1.0, [500]).check()).ok
    assert not (await HttpProbe(session, LOCAL, http_backend.port, "/healthz", 1.0, [204]).check()).ok


async def test_http_each_check_is_a_fresh_connection(
    session: aiohttp.ClientSession, http_backend: HttpBackend
) -> None:
    probe = HttpProbe(session, LOCAL, http_backend.port, "/healthz", 1.0, [200])
    for _ in range(3):
        assert (await probe.check()).ok
    client_ports = [r[2] for r in http_backend.requests]
    assert len(client_ports) == 3
    assert len(set(client_ports)) == 3, client_ports


async def test_http_refused(session: aiohttp.ClientSession, refused_port: int) -> None:
    result = await HttpProbe(session, LOCAL, refused_port, "/healthz", 1.0, [200]).check()
    assert (result.ok, result.detail) == (False, "connect refused")


async def test_http_timeout_when_server_never_answers(session: aiohttp.ClientSession) -> None:
    connected = asyncio.Event()
    release = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await release.wait()  # read nothing, answer nothing
        writer.close()

    server = await asyncio.start_server(silent, LOCAL, 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        started = time.monotonic()
        result = await HttpProbe(session, LOCAL, port, "/healthz", 0.3, [200]).check()
        elapsed = time.monotonic() - started
        release.set()
    assert connected.is_set()  # it was the answer that timed out, not the connect
    assert (result.ok, result.detail) == (False, "timeout after 0.3 s")
    assert 0.25 <= elapsed < 2.0


async def test_http_ipv6_address_is_bracketed(session: aiohttp.ClientSession) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe_sock:
            probe_sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    backend = HttpBackend()
    await backend.start("::1")
    try:
        probe = HttpProbe(session, "::1", backend.port, "/healthz", 1.0, [200])
        assert probe.url == f"http://[::1]:{backend.port}/healthz"
        result = await probe.check()
    finally:
        await backend.runner.cleanup()
    assert result.ok, result
    assert backend.requests[0][1] == f"[::1]:{backend.port}"


# --- exec --------------------------------------------------------------------


async def test_exec_true_is_ok() -> None:
    result = await ExecProbe(["/bin/true"], LOCAL, 80, 2.0).check()
    assert (result.ok, result.detail) == (True, "exit 0")


async def test_exec_false_fails() -> None:
    result = await ExecProbe(["/bin/false"], LOCAL, 80, 2.0).check()
    assert (result.ok, result.detail) == (False, "exit 1")


async def test_exec_missing_command_fails() -> None:
    result = await ExecProbe(["/nonexistent/check"], LOCAL, 80, 2.0).check()
    assert not result.ok
    assert result.detail.startswith("cannot run: ")


async def test_exec_timeout_kills_the_command_and_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The shell starts a grandchild, records both pids, and waits for ever.
    script = f'sleep 30 & echo "$$ $!" > {pids}.tmp && mv {pids}.tmp {pids}; wait'
    probe = ExecProbe(["/bin/sh", "-c", script], LOCAL, 80, 0.5)
    started = time.monotonic()
    result = await probe.check()
    elapsed = time.monotonic() - started
    assert (result.ok, result.detail) == (False, "timeout after 0.5 s")
    assert 0.45 <= elapsed < 3.0
    shell_pid, sleep_pid = (int(p) for p in pids.read_text().split())
    assert exited(shell_pid)  # killed and reaped by the probe
    await wait_until(lambda: exited(sleep_pid), what="the probe's child gone")  # killed with its process group


async def test_exec_cancel_kills_the_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f'echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; exec sleep 30'
    task = asyncio.ensure_future(ExecProbe(["/bin/sh", "-c", script], LOCAL, 80, 20.0).check())
    await wait_until(pidfile.exists, what="the pid file")
    pid = int(pidfile.read_text())
    assert not exited(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert exited(pid)


@pytest.mark.parametrize(
    ("address", "port", "ok"),
    [("203.0.113.130", 8080, True), ("203.0.113.131", 8080, False), ("203.0.113.130", 8081, False)],
)
async def test_exec_gets_backend_env_and_inherits_environment(
    monkeypatch: pytest.MonkeyPatch, address: str, port: int, ok: bool
) -> None:
    monkeypatch.setenv("ANYCAST_LB_TEST_MARK", "inherited")
    script = (
        'test "$BACKEND_ADDRESS" = 203.0.113.130 && test "$BACKEND_PORT" = 8080 '
        '&& test "$ANYCAST_LB_TEST_MARK" = inherited'
    )
    result = await ExecProbe(["/bin/sh", "-c", script], address, port, 2.0).check()
    assert result.ok is ok, result


async def test_exec_env_does_not_leak_into_this_process() -> None:
    assert (await ExecProbe(["/bin/true"], "203.0.113.1", 1, 2.0).check()).ok
    assert "BACKEND_ADDRESS" not in os.environ


# --- factory -----------------------------------------------------------------


async def test_make_probe_builds_each_kind(
    session: aiohttp.ClientSession, http_backend: HttpBackend
) -> None:
    backend = BackendConfig(address=ip_address(LOCAL), port=1)  # port 1: nothing listens
    # health.port overrides the backend port for tcp and http.
    tcp = make_probe(HealthConfig(kind=HealthKind.TCP, port=http_backend.port), backend, None)
    assert isinstance(tcp, TcpProbe) and (await tcp.check()).ok
    http = make_probe(
        HealthConfig(kind=HealthKind.HTTP, port=http_backend.port, host="h.example"),
        backend,
        session,
    )
    assert isinstance(http, HttpProbe)
    assert (await http.check()).ok
    assert http_backend.requests[-1][:2] == ("/healthz", "h.example")
    exe = make_probe(
        HealthConfig(kind=HealthKind.EXEC, command=["/bin/sh", "-c", 'test "$BACKEND_PORT" = 1']),
        backend,
        None,
    )
    assert isinstance(exe, ExecProbe) and (await exe.check()).ok
    none = make_probe(HealthConfig(kind=HealthKind.NONE), backend, None)
    assert isinstance(none, NoneProbe)
    assert (await none.check()).ok
    assert not (await make_probe(HealthConfig(), backend, None).check()).ok  # tcp to port 1


def test_make_probe_http_needs_a_session() -> None:
    backend = BackendConfig(address=ip_address(LOCAL), port=80)
    with pytest.raises(ValueError, match="need an aiohttp session"):
        make_probe(HealthConfig(kind=HealthKind.HTTP), backend, None)
