"""Relay worker processes (``forwarding.workers``): a node on 127.0.0.1 with
real backends and real worker processes sharing its listener (SO_REUSEPORT).

Health uses exec probes on marker files, so a test can mark a backend down
in the node while the backend itself still answers: a worker that missed
the change would still send it connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from anycast_lb.config import parse_config
from anycast_lb.errors import ConfigError, WorkerProtocolError
from anycast_lb.forward import RelayForwarder
from anycast_lb.forward.workers import (
    BackendCounters,
    ServiceCounters,
    WorkerGroup,
    WorkerSpec,
    add_counters,
    encode,
    parse_report,
)
from anycast_lb.node import Node
from anycast_lb.status import Status
from tests.component.backends import TcpNameEcho, tcp_request
from tests.component.nodes import node_running
from tests.procs import exited
from tests.waiting import wait_until


def node_config(ports: list[int], marks: Path, workers: int = 2, drain_timeout: float = 10) -> dict[str, Any]:
    """One TCP service over ``ports``; a backend is healthy while the file
    ``marks/up-PORT`` exists."""
    return {
        "node": {"name": "workers-node"},
        "api": {"listen": "127.0.0.1:0"},
        "drain": {"timeout": drain_timeout, "announce_grace": 0.1},
        "forwarding": {"engine": "relay", "workers": workers},
        "services": [{
            "name": "web",
            "vip": "127.0.0.1",
            "port": 1,
            "protocol": "tcp",
            "balance": "round_robin",
            "backends": [{"address": "127.0.0.1", "port": p} for p in ports],
            "health": {"kind": "exec", "command": ["sh", "-c", 'test -e "$0/up-$BACKEND_PORT"', str(marks)],
                       "interval": 0.2, "fast_interval": 0.05, "timeout": 0.2, "rise": 1, "fall": 1},
        }],
    }


@contextlib.asynccontextmanager
async def running(config: dict[str, Any]) -> AsyncIterator[tuple[Node, asyncio.Task[None]]]:
    node = Node(parse_config(config), bind_overrides={"web": ("127.0.0.1", 0)},
                api_listen=("127.0.0.1", 0), check_jitter=False)
    async with node_running(node) as task:
        yield node, task


async def backends(names: list[str], marks: Path) -> list[TcpNameEcho]:
    out = []
    for name in names:
        be = TcpNameEcho(name)
        port = await be.start()
        (marks / f"up-{port}").touch()
        out.append(be)
    return out


def relay_group(node: Node) -> tuple[RelayForwarder, WorkerGroup]:
    forwarder, group = node.forwarders["web"], node.workers
    assert isinstance(forwarder, RelayForwarder) and group is not None
    return forwarder, group


async def many(port: int, count: int) -> list[str]:
    """``count`` requests, 20 at a time; the backend name of each."""
    names: list[str] = []
    for start in range(0, count, 20):
        batch = await asyncio.gather(*(tcp_request(port, f"r{i}\n".encode())
                                       for i in range(start, min(count, start + 20))))
        assert all(echoed == f"r{i}\n".encode() for i, (_, echoed) in enumerate(batch, start))
        names += [name for name, _ in batch]
    return names


async def get_json(node: Node, path: str) -> Any:
    assert node.api_address is not None
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{node.api_address[1]}{path}") as response:
        return await (response.json() if path != "/metrics" else response.text())


def refused(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


# -- wire format ---------------------------------------------------------------


def test_spec_and_counters_round_trip() -> None:
    config = parse_config(node_config([9001, 9002], Path("/nonexistent")))
    spec = WorkerSpec(index=1, forwarding=config.forwarding, services=config.services,
                      binds={"web": ("127.0.0.1", 4242)})
    again = WorkerSpec.model_validate_json(spec.model_dump_json())
    assert again == spec and again.services[0].backends[1].key == "127.0.0.1:9002"

    line = encode({"op": "counters", "services": {"web": {
        "accepted": 5, "rejected": 1, "active": 2, "up_backends": 2,
        "backends": {"127.0.0.1:9001": [2, 4, 1, 100, 200]}}}})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    services = parse_report(line).services
    assert services is not None
    counters = services["web"]
    assert counters.backends["127.0.0.1:9001"] == BackendCounters(2, 4, 1, 100, 200)
    total = add_counters(add_counters(ServiceCounters(), counters), counters)
    # An exited worker's cumulative counts are kept, its open connections are not.
    assert (total.accepted, total.rejected, total.active) == (10, 2, 0)
    assert total.backends["127.0.0.1:9001"] == BackendCounters(0, 8, 2, 200, 400)
    for bad in (b"[]", b'{"no": "op"}', b"not json",
                b'{"op": "counters", "services": {"web": {"accepted": "many"}}}'):
        with pytest.raises(WorkerProtocolError):
            parse_report(bad)


def test_flow_survival_refused_with_workers() -> None:
    config = node_config([9001], Path("/nonexistent"), workers=3)
    config["cluster"] = {"address": "203.0.113.1", "interface": "eth1", "peers": ["203.0.113.2"],
                         "key_file": "/nonexistent/cluster.key"}
    with pytest.raises(ConfigError, match=r"forwarding\.workers: 3 cannot be combined with "
                                          r"cluster\.flow_survival: true"):
        parse_config(config)
    config["cluster"]["flow_survival"] = False
    assert parse_config(config).forwarding.workers == 3


# -- a node with workers ---------------------------------------------------------


async def test_workers_share_connections_and_follow_health(tmp_path: Path) -> None:
    be1, be2 = await backends(["be1", "be2"], tmp_path)
    async with running(node_config([be1.port, be2.port], tmp_path, workers=3)) as (node, _):
        forwarder, group = relay_group(node)
        await wait_until(lambda: node.pools["web"].up_count == 2, what="both backends up")
        await wait_until(lambda: all(w.services.get("web", ServiceCounters()).up_backends == 2
                                     for w in group.workers), what="workers see both up")
        port = node.service_addresses["web"][1]
        assert len(group.workers) == 2 and group.listening

        names = await many(port, 150)
        assert set(names) == {"be1", "be2"}
        # Every process accepted some: the kernel spread the connections.
        await wait_until(lambda: forwarder.accepted + sum(w.accepted("web") for w in group.workers) == 150,
                         what="workers' counters reported")
        assert forwarder.accepted > 0 and all(w.accepted("web") > 0 for w in group.workers)

        # /status and /metrics add the workers' counters to the node's, once.
        status = await get_json(node, "/status")
        assert Status.model_validate(status).workers is not None
        web = status["services"][0]
        assert sum(b["connections_total"] for b in web["backends"]) == 150
        assert sum(b["bytes_in"] for b in web["backends"]) == sum(len(f"r{i}\n") for i in range(150))
        assert [w["alive"] and w["listening"] for w in status["workers"]] == [True, True]
        metrics = await get_json(node, "/metrics")
        totals = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("anycast_lb_backend_connections_total{")]
        assert sum(totals) == 150
        assert 'anycast_lb_connections_accepted_total{service="web"} 150.0' in metrics

        # be1 is marked down in the node while it still answers: no process
        # may send it a new connection.
        (tmp_path / f"up-{be1.port}").unlink()
        await wait_until(lambda: node.pools["web"].up_count == 1, what="be1 down in the node")
        await wait_until(lambda: all(w.services["web"].up_backends == 1 for w in group.workers),
                         what="workers applied the change")
        before = [w.accepted("web") for w in group.workers]
        assert set(await many(port, 100)) == {"be2"}
        await wait_until(lambda: all(w.accepted("web") > b for w, b in zip(group.workers, before, strict=True)),
                         what="workers served after the change")
    await be1.stop()
    await be2.stop()


async def test_crashed_worker_is_replaced_and_its_counts_kept(tmp_path: Path) -> None:
    (be1,) = await backends(["be1"], tmp_path)
    async with running(node_config([be1.port], tmp_path)) as (node, _):
        forwarder, group = relay_group(node)
        await wait_until(lambda: node.pools["web"].up_count == 1, what="backend up")
        worker = group.workers[0]
        await wait_until(lambda: worker.services.get("web", ServiceCounters()).up_backends == 1,
                         what="worker sees the backend")
        port = node.service_addresses["web"][1]
        await many(port, 60)
        await wait_until(lambda: forwarder.accepted + worker.accepted("web") == 60, what="reported")
        served_by_worker = worker.accepted("web")
        assert served_by_worker > 0

        first = worker.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: worker.pid != first and worker.alive and worker.listening,
                         timeout=10, what="worker started again")
        assert worker.restarts == 1
        await wait_until(lambda: worker.services.get("web", ServiceCounters()).up_backends == 1,
                         what="new worker got the state")
        # The dead worker's counts stay in the totals.
        assert node.status()["services"][0]["backends"][0]["connections_total"] == 60
        await many(port, 60)
        await wait_until(lambda: node.status()["services"][0]["backends"][0]["connections_total"] == 120,
                         what="totals after the restart")
        # So do its accepted connections, in /metrics.
        metrics = await get_json(node, "/metrics")
        assert 'anycast_lb_connections_accepted_total{service="web"} 120.0' in metrics

        # A worker whose stdin closes exits on its own (the node is gone).
        second, proc = worker.pid, worker.proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert second is not None and exited(second)
    await be1.stop()


async def test_graceful_stop_drains_workers(tmp_path: Path) -> None:
    (be1,) = await backends(["be1"], tmp_path)
    async with running(node_config([be1.port], tmp_path, drain_timeout=20)) as (node, task):
        forwarder, group = relay_group(node)
        await wait_until(lambda: node.pools["web"].up_count == 1, what="backend up")
        worker = group.workers[0]
        await wait_until(lambda: worker.services.get("web", ServiceCounters()).up_backends == 1,
                         what="worker sees the backend")
        port = node.service_addresses["web"][1]
        held = []
        for _ in range(40):  # open connections until both processes hold some
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.readline(), 2) == b"be1\n"
            held.append((reader, writer))
        await wait_until(lambda: forwarder.active + group.active == 40, what="workers reported")
        assert forwarder.active > 0 and group.active > 0

        started = time.monotonic()
        node.request_stop()
        probes: list[bool] = []  # a probe may still reach the worker before it closes
        await wait_until(lambda: probes.append(refused(port)) or probes[-1],
                         what="every listener closed")
        assert not group.listening
        # The connections in both processes still work...
        for i, (reader, writer) in enumerate(held):
            writer.write(f"after {i}\n".encode())
            assert await asyncio.wait_for(reader.readline(), 2) == f"after {i}\n".encode()
            writer.close()
        # ...and once they end, the workers and the node stop well before the drain timeout.
        await asyncio.wait_for(task, 10)
        assert time.monotonic() - started < 10
        assert worker.idle is True and worker.proc is not None and worker.proc.returncode == 0
        # A probe that reached a listener as it closed was reset, not relayed.
        assert 40 <= node.status()["services"][0]["backends"][0]["connections_total"] <= 40 + probes.count(False)
    await be1.stop()


NODE_SCRIPT = """
import asyncio, json, sys
import uvloop
from anycast_lb.config import parse_config
from anycast_lb.node import Node

async def main():
    node = Node(parse_config(json.loads(sys.argv[1])), bind_overrides={"web": ("127.0.0.1", 0)},
                api_listen=("127.0.0.1", 0), check_jitter=False)
    started = asyncio.Event()
    task = asyncio.create_task(node.run(started))
    await started.wait()
    print(json.dumps({"port": node.service_addresses["web"][1],
                      "workers": [w.pid for w in node.workers.workers]}), flush=True)
    await task

uvloop.run(main())
"""


async def test_killed_node_leaves_no_worker(tmp_path: Path) -> None:
    (be1,) = await backends(["be1"], tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", NODE_SCRIPT, json.dumps(node_config([be1.port], tmp_path, workers=3)),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        info = json.loads(line)
        port, workers = info["port"], info["workers"]
        assert len(workers) == 2 and not any(exited(pid) for pid in workers)

        async def serving() -> bool:
            try:
                return (await tcp_request(port))[0] == "be1"
            except (OSError, asyncio.IncompleteReadError):
                return False  # the backend is not up yet

        await wait_until(serving, what="serving")
        proc.kill()  # SIGKILL: no drain, no word to the workers
        await proc.wait()
        await wait_until(lambda: all(exited(pid) for pid in workers), timeout=5, what="workers gone")
        await wait_until(lambda: refused(port), what="no listener left")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await be1.stop()
