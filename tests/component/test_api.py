"""The HTTP API's limits on real sockets on 127.0.0.1: connection cap,
header and body timeouts, body size, half-closed requests, ``Allow`` on 405,
the admin token file's mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from anycast_lb.api import ApiServer, read_token_file
from anycast_lb.config import ApiConfig, parse_config
from anycast_lb.errors import ConfigError
from anycast_lb.liveapply import ApplyResult
from anycast_lb.node import Node
from tests.component.nodes import node_running
from tests.waiting import wait_until

TOKEN = "s3cret-token"
GET = b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n"


class FakeNode:
    """A complete small NodeControl; ``drain`` can be held open by the test."""

    def __init__(self) -> None:
        self.draining = False
        self.drain_entered = asyncio.Event()
        self.drain_release: asyncio.Event | None = None
        self.reloads = 0

    def status(self) -> dict[str, Any]:
        return {"node": {"name": "fake", "draining": self.draining}}

    def readiness(self) -> tuple[bool, str]:
        return (not self.draining, "draining" if self.draining else "ok")

    def metrics_exposition(self) -> bytes:
        return b"# nothing\n"

    async def drain(self, reason: str) -> None:
        self.drain_entered.set()
        if self.drain_release is not None:
            await self.drain_release.wait()
        self.draining = True

    async def undrain(self) -> bool:
        self.draining = False
        return True

    async def reload(self) -> ApplyResult:
        self.reloads += 1
        if self.reloads % 2:
            return ApplyResult(True, 2, "0123456789abcdef", ("add service api",))
        return ApplyResult(False, 2, "0123456789abcdef", (), "restart needed: api changed")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@contextlib.asynccontextmanager
async def serving(node: FakeNode | None = None, **limits: Any) -> AsyncIterator[tuple[ApiServer, int]]:
    server = ApiServer(node or FakeNode(), ApiConfig(listen="127.0.0.1:0", **limits))
    _, port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.cleanup()


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader, deadline: float) -> bytes:
    """Everything the server sends until it closes (a reset counts as a
    close); AssertionError if it is still open after ``deadline`` s."""
    try:
        return await asyncio.wait_for(reader.read(), deadline)
    except ConnectionResetError:
        return b""
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {deadline} s") from None


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_connections_past_the_cap_are_refused_at_once() -> None:
    cap = 4
    async with serving(max_connections=cap, header_timeout=60) as (server, port), \
            contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(connection(port)) for _ in range(cap)]
        await wait_until(lambda: server.stats.active == cap, what="cap reached")
        for _ in range(10):
            async with connection(port) as (reader, _):
                answer = await read_until_closed(reader, 2)
                assert answer == b"" or status_of(answer) == 503, answer
        assert server.stats.refused == 10
        assert server.stats.active == cap
        # The held connections were not touched: they still get answers.
        reader, writer = held[0]
        writer.write(GET)
        assert status_of(await asyncio.wait_for(reader.readline(), 2)) == 200
        # Once some close, new connections are served again.
        for _, writer in held[:2]:
            writer.close()
        await wait_until(lambda: server.stats.active == cap - 2, what="slots freed")
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: api\r\n", b"GE"],
                         ids=["nothing", "headers-unfinished", "request-line-unfinished"])
async def test_a_stalled_request_is_closed_after_the_header_timeout(sent: bytes) -> None:
    async with serving(header_timeout=0.3) as (server, port):
        # The server's timer starts when it accepts, which may run before
        # this task resumes after the connect: start the clock before it.
        start = time.monotonic()
        async with connection(port) as (reader, writer):
            writer.write(sent)
            assert await read_until_closed(reader, 3) == b""
            assert time.monotonic() - start >= 0.25
            assert server.stats.header_timeouts == 1
            await wait_until(lambda: server.stats.active == 0, what="slot freed")


async def test_a_trickled_request_head_is_closed_at_the_header_timeout() -> None:
    """Slowloris: bytes keep coming, the head never completes in time."""
    async with serving(header_timeout=0.5) as (server, port):
        start = time.monotonic()  # before the connect, as above
        async with connection(port) as (reader, writer):
            closed = asyncio.create_task(read_until_closed(reader, 3))
            head = b"GET /healthz HTTP/1.1\r\n" + b"X-Slow: a\r\n" * 100
            for i in range(len(head)):  # bounded: at most 3 s at 10 ms a byte
                if closed.done() or time.monotonic() - start > 3:
                    break
                writer.write(head[i:i + 1])
                await asyncio.sleep(0.01)  # pacing the trickle, not waiting for readiness
            assert await closed == b""
            assert 0.45 <= time.monotonic() - start < 2
            assert server.stats.header_timeouts == 1


async def test_an_idle_keep_alive_connection_is_closed_after_the_header_timeout() -> None:
    async with serving(header_timeout=0.3) as (server, port):
        async with connection(port) as (reader, writer):
            writer.write(GET)
            answer = await read_until_closed(reader, 3)
            assert status_of(answer) == 200 and answer.endswith(b'{"status": "alive"}')
            assert server.stats.header_timeouts == 1


async def test_a_stalled_body_gets_408(token_file: Path) -> None:
    async with serving(admin_token_file=token_file, body_timeout=0.3, header_timeout=5) as (
            server, port):
        async with connection(port) as (reader, writer):
            writer.write(b"POST /drain HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer " + TOKEN.encode()
                         + b"\r\nContent-Length: 10\r\n\r\nabc")
            answer = await read_until_closed(reader, 3)
            assert status_of(answer) == 408
            assert b"Connection: close" in answer and answer.endswith(b"}")
            assert server.stats.body_timeouts == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_past_max_body_size_gets_413(token_file: Path, chunked: bool) -> None:
    node = FakeNode()
    async with serving(node, admin_token_file=token_file, max_body_size=1024) as (server, port):
        async with connection(port) as (reader, writer):
            head = b"POST /drain HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer " + TOKEN.encode()
            if chunked:
                chunk = b"x" * 2048
                writer.write(head + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
            else:
                writer.write(head + b"\r\nContent-Length: 2048\r\n\r\n")  # and no body at all
            answer = await read_until_closed(reader, 3)
            assert status_of(answer) == 413
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
            assert server.stats.too_large == 1
            assert not node.draining


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_a_half_closed_request_is_answered(version: str) -> None:
    async with serving(header_timeout=30) as (_, port):
        async with connection(port) as (reader, writer):
            writer.write(f"GET /readyz HTTP/{version}\r\nHost: api\r\n\r\n".encode())
            writer.write_eof()
            answer = await read_until_closed(reader, 3)  # answered, then closed at once
            assert status_of(answer) == 200
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"ready": True, "reason": "ok"}


async def test_a_request_in_flight_when_the_client_half_closes_is_answered(
        token_file: Path) -> None:
    node = FakeNode()
    node.drain_release = asyncio.Event()
    async with serving(node, admin_token_file=token_file, header_timeout=30) as (server, port):
        async with connection(port) as (reader, writer):
            writer.write(b"POST /drain HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer "
                         + TOKEN.encode() + b"\r\nContent-Length: 0\r\n\r\n")
            await asyncio.wait_for(node.drain_entered.wait(), 3)
            writer.write_eof()
            await wait_until(lambda: any(c.half_closed for c in server.connections.values()),
                             what="the server saw the half-close")
            node.drain_release.set()
            answer = await read_until_closed(reader, 3)
            assert status_of(answer) == 200 and answer.endswith(b'{"draining": true}')


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost:"],
                         ids=["idle", "request-unfinished"])
async def test_a_half_close_without_a_whole_request_closes_at_once(sent: bytes) -> None:
    async with serving(header_timeout=30) as (server, port):
        async with connection(port) as (reader, writer):
            writer.write(sent)
            writer.write_eof()
            assert await read_until_closed(reader, 2) == b""
            await wait_until(lambda: server.stats.active == 0, what="slot freed")


async def test_malformed_requests_are_counted_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    async with serving() as (server, port):
        for garbage in [b"\x00\x01 NOT HTTP\r\n\r\n", b"GET / HTTP/1.1\r\nX-Bad: \x00\r\n\r\n"]:
            async with connection(port) as (reader, writer):
                writer.write(garbage)
                assert status_of(await read_until_closed(reader, 2)) == 400
        assert server.stats.malformed == 2
    assert not [r for r in caplog.records if "Error handling request" in r.getMessage()]


async def test_every_route_answers_405_with_allow() -> None:
    async with serving() as (server, port):
        routes: dict[str, set[str]] = {}
        for resource in server.app.router.resources():
            info = resource.get_info()
            if "path" in info:
                routes[info["path"]] = {route.method for route in resource}
        assert set(routes) == {"/healthz", "/readyz", "/status", "/metrics", "/drain", "/undrain",
                               "/reload"}
        async with aiohttp.ClientSession() as session:
            for path, allowed in routes.items():
                for method in {"GET", "POST", "PUT", "DELETE", "PATCH"} - allowed:
                    async with session.request(method, f"http://127.0.0.1:{port}{path}") as r:
                        assert r.status == 405, (method, path)
                        assert set(r.headers["Allow"].split(",")) == allowed, (method, path)
                        assert "error" in await r.json()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o610])
async def test_a_token_file_others_can_reach_is_refused_at_start(
        token_file: Path, mode: int) -> None:
    token_file.chmod(mode)
    server = ApiServer(FakeNode(), ApiConfig(listen="127.0.0.1:0", admin_token_file=token_file))
    with pytest.raises(ConfigError) as caught:
        await server.start("127.0.0.1", 0)
    assert f"api.admin_token_file: {token_file} is accessible by group or others" in str(caught.value)
    assert "chmod 600" in str(caught.value)


def test_token_file_problems_name_the_field(tmp_path: Path) -> None:
    cases = {"missing": None, "empty": b"  \n", "not-utf8": b"\xff\xfe", "huge": b"x" * 5000}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
            path.chmod(0o600)
        with pytest.raises(ConfigError) as caught:
            read_token_file(path)
        assert caught.value.problems[0].startswith("api.admin_token_file: "), name
    with pytest.raises(ConfigError, match="not a regular file"):
        read_token_file(tmp_path)
    (tmp_path / "ok").write_text(f"  {TOKEN}\n")
    (tmp_path / "ok").chmod(0o400)
    assert read_token_file(tmp_path / "ok") == TOKEN


async def test_admin_requests_check_the_token_in_full(token_file: Path) -> None:
    node = FakeNode()
    async with serving(node, admin_token_file=token_file) as (_, port):
        url = f"http://127.0.0.1:{port}/drain"
        async with aiohttp.ClientSession() as session:
            for given in ["", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "x" * len(TOKEN)]:
                async with session.post(url, headers={"Authorization": f"Bearer {given}"}) as r:
                    assert r.status == 401, given
            assert not node.draining
            # A file made readable by others after start disables admin requests.
            token_file.chmod(0o644)
            async with session.post(url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 403 and "unusable" in (await r.json())["error"]
            assert not node.draining
            token_file.chmod(0o600)
            async with session.post(url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200
            assert node.draining


async def test_reload_needs_the_token_and_answers_applied_or_refused(token_file: Path) -> None:
    node = FakeNode()
    async with serving(node, admin_token_file=token_file) as (_, port):
        url = f"http://127.0.0.1:{port}/reload"
        async with aiohttp.ClientSession() as session:
            async with session.post(url) as r:
                assert r.status == 401 and node.reloads == 0
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with session.post(url, headers=auth) as r:
                assert r.status == 200
                assert await r.json() == {"result": "applied", "generation": 2,
                                          "digest": "0123456789abcdef",
                                          "actions": ["add service api"], "reason": ""}
            async with session.post(url, headers=auth) as r:
                assert r.status == 409
                body = await r.json()
                assert body["result"] == "refused"
                assert body["reason"] == "restart needed: api changed"


def _node_config(token_file: Path) -> dict[str, Any]:
    return {
        "api": {"listen": "127.0.0.1:0", "admin_token_file": str(token_file),
                "max_connections": 8},
        "services": [{
            "name": "web", "vip": "127.0.0.1", "port": 1, "protocol": "tcp",
            "backends": [{"address": "127.0.0.1", "port": 9}],
            "health": {"kind": "none", "interval": 0.2, "fast_interval": 0.05, "timeout": 0.1},
        }],
    }


async def test_a_node_refuses_to_start_with_a_readable_token_file(token_file: Path) -> None:
    token_file.chmod(0o644)
    node = Node(parse_config(_node_config(token_file)),
                bind_overrides={"web": ("127.0.0.1", 0)}, check_jitter=False)
    with pytest.raises(ConfigError, match="chmod 600"):
        async with node_running(node):
            pass


async def test_a_node_exports_api_connection_metrics(token_file: Path) -> None:
    node = Node(parse_config(_node_config(token_file)),
                bind_overrides={"web": ("127.0.0.1", 0)}, check_jitter=False)
    async with node_running(node):
        assert node.api_address is not None
        port = node.api_address[1]
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(8):
                await stack.enter_async_context(connection(port))
            async with connection(port) as (reader, _):
                refused = await read_until_closed(reader, 2)
                assert refused == b"" or status_of(refused) == 503

        async def scrape() -> str:
            async with aiohttp.ClientSession() as session, session.get(
                    f"http://127.0.0.1:{port}/metrics") as response:
                return await response.text()

        async def freed() -> bool:
            try:
                return "anycast_lb_api_connections 1.0" in await scrape()
            except aiohttp.ClientError:
                return False

        await wait_until(freed, what="held connections released")
        text = await scrape()
        # At least the one refused above (scrapes made before the held
        # connections were released may have been refused too).
        refused = re.search(r"^anycast_lb_api_connections_refused_total (\S+)$", text, re.M)
        assert refused is not None and float(refused.group(1)) >= 1
        assert 'anycast_lb_api_requests_rejected_total{reason="header_timeout"} 0.0' in text


def test_check_config_refuses_a_readable_token_file(tmp_path: Path, token_file: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(_node_config(token_file)))
    check = [sys.executable, "-m", "anycast_lb", "check-config", str(path)]
    assert subprocess.run(check, capture_output=True, check=False, timeout=30).returncode == 0
    token_file.chmod(0o644)
    result = subprocess.run(check, capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 2
    assert "api.admin_token_file:" in result.stderr and "chmod 600" in result.stderr
    assert "Traceback" not in result.stderr

