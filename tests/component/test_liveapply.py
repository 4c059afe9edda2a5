"""Live apply on a real node on 127.0.0.1: backends and services added and
removed under traffic, refused configs, SIGHUP and ``anycast-lb reload`` on
an ``anycast-lb run`` subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import subprocess
import sys
import time
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
DRAIN_TIMEOUT = 1.5
ENGINES = ["asyncio", "relay"]


def service(name: str, ports: list[int], protocol: str = "tcp") -> dict[str, Any]:
    health = HEALTH if protocol == "tcp" else {**HEALTH, "kind": "none"}
    return {"name": name, "vip": "127.0.0.1", "port": 1, "protocol": protocol,
            "backends": [{"address": "127.0.0.1", "port": p} for p in ports], "health": health}


def config(services: list[dict[str, Any]], engine: str = "asyncio") -> dict[str, Any]:
    return {"node": {"name": "live"}, "api": {"listen": "127.0.0.1:0"},
            "forwarding": {"engine": engine},
            "drain": {"timeout": DRAIN_TIMEOUT, "announce_grace": 0.1}, "services": services}


@contextlib.asynccontextmanager
async def running(cfg: dict[str, Any], names: tuple[str, ...] = ("web", "api", "dns"),
                  config_path: Path | None = None) -> AsyncIterator[Node]:
    node = Node(parse_config(cfg), bind_overrides={n: ("127.0.0.1", 0) for n in names},
                check_jitter=False, config_path=config_path)
    async with node_running(node):
        yield node


def all_up(node: Node) -> bool:
    return all(p.up_count == len(p.backends) and p.table_ready for p in node.pools.values())


async def backends(*names: str) -> list[TcpNameEcho]:
    servers = [TcpNameEcho(n) for n in names]
    for s in servers:
        await s.start()
    return servers


class Traffic:
    """A bounded stream of new connections (at most ``limit``, for at most
    ``seconds``), recording which backend answered and every failure."""

    def __init__(self, port: int, limit: int = 2000, seconds: float = 15.0) -> None:
        self.port, self.limit, self.seconds = port, limit, seconds
        self.seen: list[str] = []
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        for i in range(self.limit):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                self.seen.append((await tcp_request(self.port, f"{i}\n".encode()))[0])
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.failures.append(repr(exc))
            await asyncio.sleep(0.005)  # pacing, not waiting for readiness

    async def stop(self) -> None:
        self._stop.set()
        await self.task


@pytest.mark.parametrize("engine", ENGINES)
async def test_backend_added_under_traffic_gets_new_flows_and_none_fail(engine: str) -> None:
    be1, be2 = await backends("be1", "be2")
    cfg = config([service("web", [be1.port])], engine)
    async with running(cfg) as node:
        await wait_until(lambda: all_up(node), what="be1 up")
        port = node.service_addresses["web"][1]
        traffic = Traffic(port)
        await wait_until(lambda: len(traffic.seen) >= 20, what="traffic flowing")
        new = copy.deepcopy(cfg)
        new["services"][0] = service("web", [be1.port, be2.port])
        result = await node.apply_config(parse_config(new))
        assert result.applied and result.generation == 2, result
        assert result.actions == (f"add backend 127.0.0.1:{be2.port} to web",)
        await wait_until(lambda: traffic.seen.count("be2") >= 10, timeout=10, what="flows on be2")
        await traffic.stop()
        assert traffic.failures == []
        status = node.status()
        assert status["config"]["generation"] == 2 and status["config"]["digest"] == result.digest
        assert [b["port"] for b in status["services"][0]["backends"]] == [be1.port, be2.port]
    for s in (be1, be2):
        await s.stop()


async def _connection_to(port: int, backend: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection through the node that landed on ``backend`` (bounded tries)."""
    for _ in range(200):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if (await reader.readline()).decode().strip() == backend:
            return reader, writer
        writer.close()
    raise AssertionError(f"no connection reached {backend}")


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    async with asyncio.timeout(2):
        return await reader.readexactly(len(data))


@pytest.mark.parametrize("engine", ENGINES)
async def test_removed_backend_gets_no_new_flows_and_its_connection_runs_to_drain_timeout(
        engine: str) -> None:
    be1, be2 = await backends("be1", "be2")
    cfg = config([service("web", [be1.port, be2.port])], engine)
    async with running(cfg) as node:
        await wait_until(lambda: all_up(node), what="backends up")
        port = node.service_addresses["web"][1]
        reader, writer = await _connection_to(port, "be2")
        new = copy.deepcopy(cfg)
        new["services"][0] = service("web", [be1.port])
        result = await node.apply_config(parse_config(new))
        applied_at = time.monotonic()
        assert result.applied, result
        # Established: still relayed. New flows: never to be2.
        assert await _echo(reader, writer, b"still here\n") == b"still here\n"
        names = [(await tcp_request(port))[0] for _ in range(30)]
        assert set(names) == {"be1"}
        assert await _echo(reader, writer, b"again\n") == b"again\n"
        # Past drain.timeout it is reset.
        async with asyncio.timeout(DRAIN_TIMEOUT + 5):
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
        assert time.monotonic() - applied_at >= DRAIN_TIMEOUT - 0.2
        writer.close()
    for s in (be1, be2):
        await s.stop()


@pytest.mark.parametrize("engine", ENGINES)
async def test_services_added_and_removed(engine: str) -> None:
    be1, be2 = await backends("be1", "be2")
    u1 = UdpNameEcho("u1")
    await u1.start()
    cfg = config([service("web", [be1.port])], engine)
    async with running(cfg) as node:
        await wait_until(lambda: all_up(node), what="web up")
        web_port = node.service_addresses["web"][1]
        added = copy.deepcopy(cfg)
        added["services"] += [{**service("api", [be2.port]), "port": 2},
                              service("dns", [u1.port], "udp")]
        result = await node.apply_config(parse_config(added))
        assert result.applied and result.actions == ("add service api", "add service dns"), result
        await wait_until(lambda: all_up(node), what="new services' backends up")
        await wait_until(lambda: node.readiness()[0], what="ready")
        assert (await tcp_request(node.service_addresses["api"][1]))[0] == "be2"
        assert (await udp_request(node.service_addresses["dns"][1], b"q"))[0] == b"u1:q"
        assert [s["name"] for s in node.status()["services"]] == ["web", "api", "dns"]

        reader, writer = await _connection_to(web_port, "be1")
        removed = copy.deepcopy(added)
        removed["services"] = removed["services"][1:]
        result = await node.apply_config(parse_config(removed))
        assert result.applied and result.actions == ("remove service web",), result
        assert "web" not in node.service_addresses and "web" not in node.pools
        # Its established connection finishes; new connections are refused.
        assert await _echo(reader, writer, b"last\n") == b"last\n"

        async def refused() -> bool:
            try:
                await tcp_request(web_port, timeout=0.5)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                return True
            return False

        await wait_until(refused, what="web's listener closed")
        writer.close()
        await wait_until(lambda: node.data.retiring == 0, what="web's connection gone")
        # The remaining services never stopped.
        assert (await tcp_request(node.service_addresses["api"][1]))[0] == "be2"
        assert node.status()["config"]["generation"] == 3
    for s in (be1, be2):
        await s.stop()
    u1.stop()


async def test_refused_configs_keep_the_last_good_one_and_are_counted(tmp_path: Path) -> None:
    (be1,) = await backends("be1")
    cfg = config([service("web", [be1.port])])
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    async with running(cfg, config_path=path) as node:
        await wait_until(lambda: all_up(node), what="web up")
        port = node.service_addresses["web"][1]
        digest = node.digest
        local = copy.deepcopy(cfg)
        local["drain"]["timeout"] = 9
        local["services"][0] = service("web", [be1.port, be1.port + 1])  # refused whole
        result = await node.apply_config(parse_config(local))
        assert not result.applied and "restart needed: drain changed" in result.reason
        assert node.config.services[0].backends == parse_config(cfg).services[0].backends

        path.write_text("services: [\n")  # not even YAML
        result = await node.reload()
        assert not result.applied and result.reason.startswith("invalid config"), result
        path.write_text(yaml.safe_dump({**cfg, "services": [{"name": "web"}]}))
        result = await node.reload()
        assert not result.applied and "services[0].vip: Field required" in result.reason, result

        assert (await tcp_request(port))[0] == "be1"
        status = node.status()["config"]
        assert (status["generation"], status["digest"], status["refusals"]) == (1, digest, 3)
        assert "services[0].port: Field required" in status["last_refusal"]
        metrics = node.metrics_exposition().decode()
        assert 'anycast_lb_config_applies_total{result="refused"} 3.0' in metrics
        assert 'anycast_lb_config_applies_total{result="applied"} 0.0' in metrics
    await be1.stop()


# ---------------------------------------------------------------- subprocess


async def test_sighup_and_reload_command_on_a_running_node(tmp_path: Path) -> None:
    be1, be2 = await backends("be1", "be2")
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    # --ephemeral-ports: the API and "web" (configured port 1) bind port 0;
    # their ports are read from the log.
    cfg = config([service("web", [be1.port])])
    cfg["api"] = {"listen": "127.0.0.1:0", "admin_token_file": str(token)}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "node.log"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "anycast_lb", "run", "--config", str(path),
                                 "--ephemeral-ports"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env,
                                start_new_session=True)

    async def status() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, \
                session.get(f"{bound.api_url}/status") as response:
            return await response.json()  # type: ignore[no-any-return]

    async def config_status() -> dict[str, Any]:
        return (await status())["config"]  # type: ignore[no-any-return]

    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as session, \
                    session.get(f"{bound.api_url}/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    def cli_reload() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "anycast_lb", "reload", "--config", str(path),
                               "--api", format_host_port(*bound.api)],
                              capture_output=True, text=True, env=env, timeout=20)

    try:
        bound = await wait_bound(lambda: log.read_text(errors="replace"), ["web"],
                                 alive=lambda: proc.poll() is None)
        web_port = bound.services["web"][1]
        await wait_until(ready, timeout=20, interval=0.05, what="node ready")
        # SIGHUP with a changed file: applied. The service added live binds
        # port 0 too (--ephemeral-ports), not its configured port 2.
        new = copy.deepcopy(cfg)
        new["services"][0]["backends"].append({"address": "127.0.0.1", "port": be2.port})
        new["services"].append({**service("extra", [be2.port]), "port": 2})
        path.write_text(yaml.safe_dump(new))
        os.kill(proc.pid, signal.SIGHUP)

        async def generation(n: int) -> bool:
            return (await config_status())["generation"] == n

        await wait_until(lambda: generation(2), timeout=10, what="generation 2")
        extra = (await wait_bound(lambda: log.read_text(errors="replace"), ["extra"])).services
        assert extra["extra"][1] != 2, extra

        async def extra_serves() -> bool:  # once its backend passed a first check
            try:
                return (await tcp_request(extra["extra"][1]))[0] == "be2"
            except (OSError, asyncio.IncompleteReadError):
                return False

        await wait_until(extra_serves, timeout=10, what="extra serving")

        async def be2_serves() -> bool:
            return "be2" in {(await tcp_request(web_port))[0] for _ in range(20)}

        await wait_until(be2_serves, timeout=10, what="be2 serving")
        # SIGHUP with a bad file: refused, the node lives on.
        path.write_text("services: [\n")
        os.killpg(proc.pid, signal.SIGHUP)
        await wait_until(lambda: "event=config.refused" in log.read_text(), timeout=10,
                         what="config.refused")
        assert proc.poll() is None
        assert (await config_status())["generation"] == 2
        assert (await tcp_request(web_port))[0] in {"be1", "be2"}
        # anycast-lb reload: the bad file is refused (exit 1), a good one applied.
        done = await asyncio.to_thread(cli_reload)
        assert done.returncode != 0  # the CLI cannot even read the bad file
        path.write_text(yaml.safe_dump(cfg))
        done = await asyncio.to_thread(cli_reload)
        assert done.returncode == 0 and done.stdout.startswith("applied: generation 3"), done
        local = copy.deepcopy(cfg)
        local["drain"]["timeout"] = 9
        path.write_text(yaml.safe_dump(local))
        done = await asyncio.to_thread(cli_reload)
        assert done.returncode == 1 and done.stdout.startswith("refused: restart needed: drain"), done
        assert proc.poll() is None
        # Through every reload "web" kept the port it bound at start: never rebound.
        [web] = (await status())["services"]
        assert web["listen"] == f"127.0.0.1:{web_port}" and web["listening"], web
        assert log.read_text().count("event=forwarder.listening service=web ") == 1
        assert (await tcp_request(web_port))[0] == "be1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for s in (be1, be2):
            await s.stop()
