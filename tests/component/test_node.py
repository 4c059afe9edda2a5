"""A whole node (no bgp section) on 127.0.0.1 with real backends: traffic,
a backend failure that no client notices, /status, /readyz, /metrics, drain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from anycast_lb.config import parse_config
from anycast_lb.node import Node
from anycast_lb.status import Status
from tests.component.backends import TcpNameEcho, UdpNameEcho, tcp_request, udp_request
from tests.component.nodes import node_running
from tests.waiting import wait_until

TOKEN = "s3cret-token"


def node_config(tcp_ports: list[int], udp_ports: list[int], token_file: Path | None) -> dict[str, Any]:
    health = {"kind": "tcp", "interval": 0.2, "fast_interval": 0.05, "timeout": 0.2, "rise": 2, "fall": 2}
    api: dict[str, Any] = {"listen": "127.0.0.1:0"}
    if token_file is not None:
        api["admin_token_file"] = str(token_file)
    return {
        "node": {"name": "test-node"},
        "api": api,
        "drain": {"timeout": 2, "announce_grace": 0.1},
        "services": [
            {
                "name": "web",
                "vip": "127.0.0.1",
                "port": 1,
                "protocol": "tcp",
                "backends": [{"address": "127.0.0.1", "port": p} for p in tcp_ports],
                "health": health,
            },
            {
                "name": "dns",
                "vip": "127.0.0.1",
                "port": 1,
                "protocol": "udp",
                "idle_timeout": 5,
                "backends": [{"address": "127.0.0.1", "port": p} for p in udp_ports],
                "health": {"kind": "none", "interval": 0.2, "fast_interval": 0.05, "timeout": 0.1, "rise": 1},
            },
        ],
    }


class RunningNode:
    def __init__(self, node: Node, task: asyncio.Task[None]) -> None:
        self.node = node
        self.task = task
        assert node.api_address is not None
        self.api = f"http://127.0.0.1:{node.api_address[1]}"
        self.tcp_port = node.service_addresses["web"][1]
        self.udp_port = node.service_addresses["dns"][1] if "dns" in node.service_addresses else 0

    async def get(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.get(self.api + path) as response:
            body = await (response.json() if path != "/metrics" else response.text())
            return response.status, body

    async def post(self, path: str, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with aiohttp.ClientSession() as session, session.post(self.api + path, headers=headers) as r:
            return r.status, await r.json()


@contextlib.asynccontextmanager
async def running(config: dict[str, Any]) -> AsyncIterator[RunningNode]:
    node = Node(
        parse_config(config),
        bind_overrides={s["name"]: ("127.0.0.1", 0) for s in config["services"]},
        check_jitter=False,
    )
    async with node_running(node) as task:
        yield RunningNode(node, task)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


async def test_backend_failure_is_invisible_to_clients(token_file: Path) -> None:
    be1, be2 = TcpNameEcho("be1"), TcpNameEcho("be2")
    u1 = UdpNameEcho("u1")
    ports = [await be1.start(), await be2.start()]
    await u1.start()
    async with running(node_config(ports, [u1.port], token_file)) as rn:
        # Every backend up and its Maglev table built (in the background:
        # until then flows stay on the backends of the previous table).
        await wait_until(lambda: all(p.up_count == len(p.backends) and p.table_ready
                                     for p in rn.node.pools.values()), what="pools up, tables built")
        status, body = await rn.get("/readyz")
        assert status == 200 and body["ready"]

        # Traffic reaches both backends through the TCP forwarder.
        seen = {(await tcp_request(rn.tcp_port, f"hello {i}\n".encode()))[0] for i in range(40)}
        assert seen == {"be1", "be2"}
        reply, source = await udp_request(rn.udp_port, b"q1")
        assert reply == b"u1:q1" and source[1] == rn.udp_port

        # Kill be1 while a client keeps opening connections: no new connection
        # may fail. A connection be1 had already answered when it died dies
        # with it (the proxy terminates TCP); only those may break.
        failures: list[BaseException] = []
        broken_on_be1: list[BaseException] = []
        answered: list[str] = []
        stop = asyncio.Event()

        async def request(payload: bytes) -> None:
            name = ""
            try:
                async with asyncio.timeout(2.0):
                    reader, writer = await asyncio.open_connection("127.0.0.1", rn.tcp_port)
                    try:
                        name = (await reader.readline()).decode().strip()
                        writer.write(payload)
                        await reader.readexactly(len(payload))
                    finally:
                        writer.close()
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                (broken_on_be1 if name == "be1" else failures).append(exc)
            else:
                answered.append(name)

        async def client() -> None:
            for i in range(2000):  # bounded in count...
                if stop.is_set():
                    return
                await request(f"m{i}\n".encode())

        client_task = asyncio.create_task(client())
        try:
            await wait_until(lambda: len(answered) >= 20, what="client running")
            await be1.stop(release=False)  # its port stays held for its return
            be1_key = f"127.0.0.1:{ports[0]}"
            await wait_until(lambda: not rn.node.pools["web"].get(be1_key).up, timeout=3,
                             what="be1 down")
            marked_down_at = len(answered)
            await wait_until(lambda: len(answered) >= marked_down_at + 20,
                             what="traffic after be1 down")
        finally:
            stop.set()
            await asyncio.wait_for(client_task, 10)  # ...and in time
        assert failures == []
        assert len(broken_on_be1) <= 1  # the client has one connection open at a time
        assert set(answered[marked_down_at:]) == {"be2"}

        status, body = await rn.get("/status")
        Status.model_validate(body)  # the published schema's models
        web = next(s for s in body["services"] if s["name"] == "web")
        states = {f"{b['address']}:{b['port']}": b["state"] for b in web["backends"]}
        assert states == {be1_key: "down", f"127.0.0.1:{ports[1]}": "up"}
        assert web["healthy"] is True
        backend = web["backends"][0]
        assert backend["last_check"].endswith("Z") and backend["last_latency_ms"] is not None
        status, metrics = await rn.get("/metrics")
        assert f'anycast_lb_backend_up{{backend="{be1_key}",service="web"}} 0.0' in metrics
        assert 'anycast_lb_service_healthy{service="web"} 1.0' in metrics
        assert "anycast_lb_backend_bytes_total" in metrics
        assert "anycast_lb_health_check_duration_seconds_bucket" in metrics

        # be1 comes back on the same port and rises again.
        assert await be1.start() == ports[0]
        await wait_until(lambda: rn.node.pools["web"].get(be1_key).up, timeout=3, what="be1 up again")
        await be1.stop()
    await be2.stop()
    u1.stop()


def sample(metrics: str, name: str, service: str) -> float:
    """The value of ``name{service="..."}`` in a text exposition."""
    prefix = f'{name}{{service="{service}"}} '
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, (prefix, metrics)
    return float(lines[0][len(prefix):])


async def test_traffic_counters_reach_metrics() -> None:
    """Connections accepted (TCP), flows started and datagrams dropped (UDP)
    are counted by the forwarders and exported per service."""
    be = TcpNameEcho("be")
    u1 = UdpNameEcho("u1")
    await be.start()
    await u1.start()
    async with running(node_config([be.port], [u1.port], None)) as rn:
        await wait_until(lambda: all(p.up_count == len(p.backends) and p.table_ready
                                     for p in rn.node.pools.values()), what="pools up")
        for i in range(5):
            assert (await tcp_request(rn.tcp_port, f"hi {i}\n".encode()))[0] == "be"
        for i in range(3):  # three client sockets: three flows
            assert (await udp_request(rn.udp_port, b"q%d" % i))[0] == b"u1:q%d" % i
        # One flow stays open; then a new client's datagram after the
        # listener stopped accepting is dropped (it is still bound for the
        # open flow).
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                replies.put_nowait(data)

        kept, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", rn.udp_port))
        late, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", rn.udp_port))
        try:
            kept.sendto(b"kept")
            assert await asyncio.wait_for(replies.get(), 2) == b"u1:kept"
            udp = rn.node.forwarders["dns"]
            udp.stop_accepting()
            late.sendto(b"late")
            kept.sendto(b"again")  # sent after the late one, answered: the late one was handled
            assert await asyncio.wait_for(replies.get(), 2) == b"u1:again"
            assert replies.empty()
            _, metrics = await rn.get("/metrics")
        finally:
            kept.close()
            late.close()
        assert sample(metrics, "anycast_lb_connections_accepted_total", "web") == 5.0
        assert sample(metrics, "anycast_lb_udp_flows_total", "dns") == 4.0
        assert sample(metrics, "anycast_lb_udp_datagrams_dropped_total", "dns") == 1.0
        # Per service and protocol: no UDP family for a TCP service, nor the reverse.
        assert 'anycast_lb_connections_accepted_total{service="dns"}' not in metrics
        assert 'anycast_lb_udp_flows_total{service="web"}' not in metrics
    await be.stop()
    u1.stop()


async def test_readyz_fails_without_backends() -> None:
    be = TcpNameEcho("be")
    port = await be.start()
    await be.stop()  # nothing listens there any more
    u1 = UdpNameEcho("u1")
    await u1.start()
    config = node_config([port], [u1.port], None)
    config["services"].pop()  # tcp service only
    async with running(config) as rn:
        await wait_until(lambda: rn.node.pools["web"].backends[0].last_check is not None, what="checked")
        status, body = await rn.get("/readyz")
        assert status == 503 and "no service" in body["reason"]
        status, body = await rn.get("/status")
        assert body["services"][0]["healthy"] is False
    u1.stop()


async def test_drain_and_undrain_need_the_token(token_file: Path) -> None:
    be, u1 = TcpNameEcho("be"), UdpNameEcho("u1")
    await be.start()
    await u1.start()
    async with running(node_config([be.port], [u1.port], token_file)) as rn:
        await wait_until(lambda: all(p.healthy for p in rn.node.pools.values()), what="pools healthy")
        assert (await rn.post("/drain"))[0] == 401
        assert (await rn.post("/drain", "wrong"))[0] == 401
        assert not rn.node.draining
        status, body = await rn.post("/drain", TOKEN)
        assert status == 200 and body == {"draining": True}
        status, body = await rn.get("/readyz")
        assert status == 503 and "draining" in body["reason"]
        assert (await rn.get("/status"))[1]["node"]["draining"] is True
        # A draining node still serves what reaches it.
        assert (await tcp_request(rn.tcp_port))[0] == "be"
        assert (await rn.post("/undrain", TOKEN))[0] == 200
        assert (await rn.get("/readyz"))[0] == 200
    await be.stop()
    u1.stop()


async def test_admin_is_forbidden_without_a_token_file() -> None:
    be, u1 = TcpNameEcho("be"), UdpNameEcho("u1")
    await be.start()
    await u1.start()
    async with running(node_config([be.port], [u1.port], None)) as rn:
        status, body = await rn.post("/drain", TOKEN)
        assert status == 403 and "admin_token_file" in body["error"]
        assert not rn.node.draining
    await be.stop()
    u1.stop()


async def test_malformed_requests_get_json_4xx(token_file: Path) -> None:
    be, u1 = TcpNameEcho("be"), UdpNameEcho("u1")
    await be.start()
    await u1.start()
    async with running(node_config([be.port], [u1.port], token_file)) as rn:
        async with aiohttp.ClientSession() as session:
            for method, path in [("GET", "/nope"), ("POST", "/status"), ("GET", "/drain")]:
                async with session.request(method, rn.api + path) as response:
                    assert 400 <= response.status < 500
                    assert "error" in await response.json()
            async with session.post(rn.api + "/drain", headers={"Authorization": "Basic x"}) as r:
                assert r.status == 401
        # Raw garbage on the socket: a 400, not a traceback.
        reader, writer = await asyncio.open_connection("127.0.0.1", int(rn.api.rsplit(":", 1)[1]))
        writer.write(b"\x00\x01 NOT HTTP\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.split()[1] == b"400", line
        writer.close()
    await be.stop()
    u1.stop()


async def test_graceful_stop_lets_connections_finish(token_file: Path) -> None:
    be, u1 = TcpNameEcho("be"), UdpNameEcho("u1")
    await be.start()
    await u1.start()
    async with running(node_config([be.port], [u1.port], token_file)) as rn:
        await wait_until(lambda: all(p.healthy for p in rn.node.pools.values()), what="pools healthy")
        reader, writer = await asyncio.open_connection("127.0.0.1", rn.tcp_port)
        assert (await reader.readline()) == b"be\n"
        rn.node.request_stop()
        await wait_until(lambda: not rn.node.forwarders["web"].listening, what="listener closed")
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", rn.tcp_port)
        # The established connection still works during the drain.
        writer.write(b"still here\n")
        assert await asyncio.wait_for(reader.readline(), 2) == b"still here\n"
        assert not rn.task.done()
        writer.close()
        await asyncio.wait_for(asyncio.shield(rn.task), 5)
    await be.stop()
    u1.stop()
