"""Runtime control of one backend on a real node on 127.0.0.1: drain under
traffic (the established connection goes on, new flows avoid the backend),
undrain, reweight, kept across a reload; the API's refusals; the CLI
(``backend ...``, ``status`` table and ``--json``, ``drain --wait``) against
an ``anycast-lb run`` subprocess."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from anycast_lb.config import format_host_port, parse_config
from anycast_lb.node import Node
from tests.component.backends import TcpNameEcho, UdpNameEcho, tcp_request, udp_request
from tests.component.nodes import node_running, wait_bound
from tests.waiting import wait_until

HEALTH = {"kind": "tcp", "interval": 0.2, "fast_interval": 0.05, "timeout": 0.2, "rise": 1,
          "fall": 2}
TOKEN = "t0ken"
ROOT = Path(__file__).resolve().parents[2]


def node_config(ports: list[int], token: Path, engine: str = "asyncio",
                protocol: str = "tcp") -> dict[str, Any]:
    """A node whose API and "web" are to bind port 0 (bind_overrides or
    ``run --ephemeral-ports``: its configured port 1 is never bound)."""
    return {
        "node": {"name": "rtc"},
        "api": {"listen": "127.0.0.1:0", "admin_token_file": str(token)},
        "forwarding": {"engine": engine},
        "drain": {"timeout": 2, "announce_grace": 0.1},
        "services": [{"name": "web", "vip": "127.0.0.1", "port": 1, "protocol": protocol,
                      "backends": [{"address": "127.0.0.1", "port": p} for p in ports],
                      "health": HEALTH if protocol == "tcp" else {**HEALTH, "kind": "none"}}],
    }


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@contextlib.asynccontextmanager
async def running(cfg: dict[str, Any]) -> AsyncIterator[tuple[Node, str, int]]:
    node = Node(parse_config(cfg), bind_overrides={"web": ("127.0.0.1", 0)}, check_jitter=False)
    async with node_running(node):
        assert node.api_address is not None
        host, port = node.api_address
        yield node, f"http://{host}:{port}", node.service_addresses["web"][1]


async def post(url: str, path: str, body: object = None, token: str | None = TOKEN
               ) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.post(
            url + path, json=body, headers=headers) as response:
        return response.status, await response.json()


async def backend_status(url: str, key: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url + "/status") as response:
        status = await response.json()
    [web] = status["services"]
    [found] = [b for b in web["backends"] if f"{b['address']}:{b['port']}" == key]
    return found  # type: ignore[no-any-return]


async def spread(port: int, count: int) -> collections.Counter[str]:
    """Backends answering ``count`` new connections (one at a time)."""
    return collections.Counter([(await tcp_request(port))[0] for _ in range(count)])


@pytest.mark.parametrize("engine", ["asyncio", "relay"])
async def test_drain_undrain_and_weight_under_traffic(tmp_path: Path, engine: str) -> None:
    be1, be2 = TcpNameEcho("be1"), TcpNameEcho("be2")
    for b in (be1, be2):
        await b.start()
    cfg = node_config([be1.port, be2.port], token_file(tmp_path), engine=engine)
    names = {"be1": f"127.0.0.1:{be1.port}", "be2": f"127.0.0.1:{be2.port}"}
    try:
        async with running(cfg) as (node, url, port):
            await wait_until(lambda: node.pools["web"].up_count == 2
                             and node.pools["web"].table_ready, timeout=10, what="both up")
            # An established connection, to whichever backend the flow hashes to.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            held = (await reader.readline()).decode().strip()
            other = "be2" if held == "be1" else "be1"
            code, body = await post(url, f"/backends/web/{names[held]}/drain")
            assert code == 200 and body["applied"] and body["scope"] == "node", body
            status = await backend_status(url, names[held])
            assert status["admin"] == "drained" and status["runtime_override"] is True
            assert status["state"] == "up"
            assert node.pools["web"].up_count == 1
            async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as r:
                metrics = await r.text()
            assert (f'anycast_lb_backend_drained{{backend="{names[held]}",service="web"}} 1.0'
                    in metrics)
            assert (f'anycast_lb_backend_drained{{backend="{names[other]}",service="web"}} 0.0'
                    in metrics)
            assert 'anycast_lb_service_up_backends{service="web"} 1.0' in metrics
            # New flows avoid it ...
            assert await spread(port, 40) == {other: 40}
            # ... while its established connection carries on.
            writer.write(b"still here\n")
            assert await asyncio.wait_for(reader.readexactly(11), 2) == b"still here\n"
            assert status["active_connections"] == 1
            # Draining twice is no change; undrain brings it back.
            assert (await post(url, f"/backends/web/{names[held]}/drain"))[0] == 200
            code, body = await post(url, f"/backends/web/{names[held]}/undrain")
            assert code == 200 and body["applied"], body
            status = await backend_status(url, names[held])
            assert status["admin"] == "active" and status["runtime_override"] is False
            await wait_until(lambda: node.pools["web"].table_ready, timeout=10, what="table")
            assert set(await spread(port, 40)) == {"be1", "be2"}
            writer.close()
            # Reweight: be1 at 9, be2 at 1 takes most new flows.
            code, body = await post(url, f"/backends/web/{names['be1']}/weight", {"weight": 9})
            assert code == 200 and body["applied"], body
            assert (await backend_status(url, names["be1"]))["weight"] == 9
            await wait_until(lambda: node.pools["web"].table_ready, timeout=10, what="table")
            counts = await spread(port, 200)
            assert counts["be1"] > 140 and counts["be2"] > 0, counts
            # A reload of the file (weight 1 there) keeps the runtime override.
            result = await node.apply_config(parse_config(cfg), source="file")
            assert result.applied, result
            status = await backend_status(url, names["be1"])
            assert status["weight"] == 9 and status["runtime_override"] is True
            # Setting the file's value back is no override any more.
            assert (await post(url, f"/backends/web/{names['be1']}/weight", {"weight": 1}))[0] == 200
            assert (await backend_status(url, names["be1"]))["runtime_override"] is False
    finally:
        for b in (be1, be2):
            await b.stop()


def _udp_exchange(sock: socket.socket, payload: bytes) -> str:
    sock.send(payload)
    return sock.recv(256).split(b":", 1)[0].decode()


async def test_udp_flow_stays_on_a_drained_backend(tmp_path: Path) -> None:
    u1, u2 = UdpNameEcho("u1"), UdpNameEcho("u2")
    for u in (u1, u2):
        await u.start()
    names = {"u1": f"127.0.0.1:{u1.port}", "u2": f"127.0.0.1:{u2.port}"}
    cfg = node_config([u1.port, u2.port], token_file(tmp_path), protocol="udp")
    try:
        async with running(cfg) as (node, url, port):
            await wait_until(lambda: node.pools["web"].up_count == 2
                             and node.pools["web"].table_ready, timeout=10, what="both up")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flow:
                flow.settimeout(2)
                flow.connect(("127.0.0.1", port))
                held = await asyncio.to_thread(_udp_exchange, flow, b"a")
                other = "u2" if held == "u1" else "u1"
                code, body = await post(url, f"/backends/web/{names[held]}/drain")
                assert code == 200 and body["applied"], body
                # The established flow keeps its backend ...
                for i in range(5):
                    assert await asyncio.to_thread(_udp_exchange, flow, b"%d" % i) == held
                # ... new flows go to the other one.
                replies = {(await udp_request(port, b"n"))[0].split(b":")[0].decode()
                           for _ in range(20)}
                assert replies == {other}
    finally:
        for u in (u1, u2):
            u.stop()


async def test_refusals(tmp_path: Path) -> None:
    be = TcpNameEcho("be")
    await be.start()
    key = f"127.0.0.1:{be.port}"
    try:
        async with running(node_config([be.port], token_file(tmp_path))) as (node, url, _):
            assert (await post(url, f"/backends/web/{key}/drain", token=None))[0] == 401
            assert (await post(url, f"/backends/web/{key}/drain", token="wrong"))[0] == 401
            code, body = await post(url, "/backends/nope/127.0.0.1:1/drain")
            assert code == 404 and "no service 'nope'" in body["error"]
            code, body = await post(url, "/backends/web/127.0.0.1:1/drain")
            assert code == 404 and "no backend" in body["error"]
            for bad in ({"weight": 0}, {"weight": 1001}, {"weight": "2"}, {"weight": True},
                        {"weight": 2, "extra": 1}, [2]):
                code, body = await post(url, f"/backends/web/{key}/weight", bad)
                assert code == 400, (bad, body)
            assert node.config.services[0].backends[0].weight == 1
            assert not node.config.services[0].backends[0].drain
    finally:
        await be.stop()


async def test_cli_backend_status_and_drain_wait(tmp_path: Path) -> None:
    be1, be2 = TcpNameEcho("be1"), TcpNameEcho("be2")
    for b in (be1, be2):
        await b.start()
    # --ephemeral-ports: the API and "web" bind port 0; their ports are read from the log.
    cfg = node_config([be1.port, be2.port], token_file(tmp_path))
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "node.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "anycast_lb", "run", "--config", str(path),
                                 "--ephemeral-ports"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env,
                                start_new_session=True)
    api = ""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "anycast_lb", *args, "--config", str(path),
                               "--api", api],
                              capture_output=True, text=True, env=env, timeout=30)

    try:
        bound = await wait_bound(lambda: log.read_text(errors="replace"), ["web"],
                                 alive=lambda: proc.poll() is None)
        api = format_host_port(*bound.api)
        web_port = bound.services["web"][1]

        async def both_up() -> bool:
            try:
                async with aiohttp.ClientSession() as session, \
                        session.get(f"{bound.api_url}/status") as response:
                    return (await response.json())["services"][0]["up_backends"] == 2
            except aiohttp.ClientError:
                return False

        await wait_until(both_up, timeout=20, interval=0.05, what="both backends up")
        done = await asyncio.to_thread(cli, "backend", "drain", "web", f"127.0.0.1:{be1.port}")
        assert done.returncode == 0, done
        assert done.stdout == (f"applied: drain backend 127.0.0.1:{be1.port} of web "
                               "(this node only, not written to its file)\n")
        assert await spread(web_port, 20) == {"be2": 20}
        done = await asyncio.to_thread(cli, "backend", "weight", "web", f"127.0.0.1:{be2.port}",
                                       "7")
        assert done.returncode == 0 and "weight 7" in done.stdout, done
        done = await asyncio.to_thread(cli, "status")
        assert done.returncode == 0, done
        lines = done.stdout.splitlines()
        assert lines[0] == "node rtc  drain: serving  config generation 3", lines
        [web] = [ln for ln in lines if ln.startswith("web ")]
        # The VIP column is the configured VIP:port; /status "listen" is where it is bound.
        assert web.split() == ["web", "127.0.0.1:1", "tcp", "-", "yes", "1/2", "0"]
        [row1] = [ln for ln in lines if f"127.0.0.1:{be1.port}*" in ln]
        assert row1.split()[:5] == [f"127.0.0.1:{be1.port}*", "up", "1", "drained", "0"]
        [row2] = [ln for ln in lines if f"127.0.0.1:{be2.port}*" in ln]
        assert row2.split()[:5] == [f"127.0.0.1:{be2.port}*", "up", "7", "active", "0"]
        assert lines[-1].startswith("* drain or weight set at runtime")
        done = await asyncio.to_thread(cli, "status", "--json")
        assert done.returncode == 0, done
        document = yaml.safe_load(done.stdout)
        assert document["node"]["name"] == "rtc"
        assert document["services"][0]["listen"] == f"127.0.0.1:{web_port}"
        done = await asyncio.to_thread(cli, "backend", "undrain", "web", "127.0.0.1:1")
        assert done.returncode == 1 and "has no backend '127.0.0.1:1'" in done.stderr, done
        done = await asyncio.to_thread(cli, "backend", "weight", "web", "127.0.0.1:1", "0")
        assert done.returncode == 2, done
        # drain --wait: an open connection keeps it from finishing before the timeout ...
        reader, writer = await asyncio.open_connection("127.0.0.1", web_port)
        assert await reader.readline() == b"be2\n"
        done = await asyncio.to_thread(cli, "drain", "--wait", "--timeout", "1.5")
        assert done.returncode == 1, done
        assert "withdrawn: 1 connection(s) left" in done.stderr
        assert "not drained within 1.5 s" in done.stderr
        # ... and once it is closed, the wait ends.
        writer.close()
        done = await asyncio.to_thread(cli, "drain", "--wait", "--timeout", "10")
        assert done.returncode == 0 and done.stdout.endswith("drained\n"), done
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for b in (be1, be2):
            await b.stop()
