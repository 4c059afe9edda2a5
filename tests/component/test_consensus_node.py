"""Whole nodes in this process sharing one real etcd: agreed backend health
and identical Maglev tables, the tie rule, a stopped node's votes leaving,
fail-static while etcd is stopped and the resync after it returns, pushed
config, coordinated drain. Nothing mocks etcd."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from anycast_lb.config import NodeConfig, parse_config
from anycast_lb.consensus import document
from anycast_lb.consensus.history import ConfigHistory
from anycast_lb.consensus.keys import Layout
from anycast_lb.consensus.members import read_view
from anycast_lb.consensus.store import Store
from anycast_lb.node import Node
from tests.component.backends import TcpNameEcho, tcp_request
from tests.component.etcd import EtcdMember
from tests.component.nodes import node_running
from tests.waiting import wait_until

TOKEN = "s3cret-token"


def config(name: str, etcd: EtcdMember, cluster: str, ports: list[int], *,
           health_port: int | None = None, token_file: Path | None = None,
           drain_timeout: float = 1.0, slot_timeout: float = 10.0) -> dict[str, Any]:
    health: dict[str, Any] = {"kind": "tcp", "interval": 0.1, "fast_interval": 0.05,
                              "timeout": 0.1, "rise": 1, "fall": 1}
    if health_port is not None:
        health["port"] = health_port
    api: dict[str, Any] = {"listen": "127.0.0.1:0"}
    if token_file is not None:
        api["admin_token_file"] = str(token_file)
    return {
        "node": {"name": name},
        "api": api,
        "drain": {"timeout": drain_timeout, "announce_grace": 0.05, "max_concurrent": 1,
                  "slot_timeout": slot_timeout},
        "consensus": {"endpoints": [etcd.client_url], "cluster": cluster,
                      "lease_ttl": 2.0, "request_timeout": 0.5},
        "services": [{
            "name": "web", "vip": "127.0.0.1", "port": 1, "protocol": "tcp",
            "maglev_table_size": 251,
            "backends": [{"address": "127.0.0.1", "port": p} for p in ports],
            "health": health,
        }],
    }


class Running:
    def __init__(self, node: Node, task: asyncio.Task[None]) -> None:
        self.node, self.task = node, task
        assert node.api_address is not None
        self.api = f"http://127.0.0.1:{node.api_address[1]}"
        self.port = node.service_addresses["web"][1]

    @property
    def agent(self) -> Any:
        assert self.node.consensus is not None
        return self.node.consensus

    def up(self) -> set[str]:
        return {b.key for b in self.node.pools["web"].backends if b.up}

    def digest(self) -> str | None:
        return self.node.pools["web"].table_digest()

    async def http(self, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession() as s, s.request(method, self.api + path,
                                                           headers=headers) as r:
            return r.status, await (r.json() if path != "/metrics" else r.text())


@contextlib.asynccontextmanager
async def running(cfg: dict[str, Any], **kwargs: Any) -> AsyncIterator[Running]:
    node = Node(parse_config(cfg), bind_overrides={"web": ("127.0.0.1", 0)},
                check_jitter=False, **kwargs)
    async with node_running(node) as task:
        yield Running(node, task)


@pytest.fixture
async def backends() -> AsyncIterator[list[int]]:
    servers = [TcpNameEcho("be1"), TcpNameEcho("be2")]
    ports = [await s.start() for s in servers]
    yield ports
    for s in servers:
        await s.stop()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def keys(ports: list[int]) -> set[str]:
    return {f"127.0.0.1:{p}" for p in ports}


async def test_majority_keeps_a_backend_one_node_cannot_reach_and_tables_match(
        etcd_member: EtcdMember, etcd_cluster: str, backends: list[int]) -> None:
    # Node c checks its backends on a side port the test opens and closes:
    # its own view goes down while a and b keep seeing them up.
    side = TcpNameEcho("side")
    side_port = await side.start()
    all_up = keys(backends)
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(running(config(n, etcd_member, etcd_cluster,
                                                                backends)))
                 for n in ("a", "b")]
        c = await stack.enter_async_context(running(config(
            "c", etcd_member, etcd_cluster, backends, health_port=side_port)))
        nodes.append(c)
        await wait_until(lambda: all(n.agent.view is not None for n in nodes), timeout=10,
                         what="every node synced")
        await wait_until(lambda: all(n.up() == all_up and n.digest() is not None for n in nodes),
                         timeout=10, what="every node agreed on both backends")
        await wait_until(lambda: len({n.digest() for n in nodes}) == 1, what="equal digests")
        await wait_until(lambda: all(len(n.agent.view.members) == 3 for n in nodes),
                         what="three members")

        await side.stop()  # c alone loses its backends
        await wait_until(lambda: c.agent.disagreement() == {"web": frozenset(all_up)},
                         what="c disagrees with the agreed set")
        await wait_until(lambda: all(
            n.agent.view.votes.get(("web", k, "c")) is False for n in nodes for k in all_up),
            what="c's down votes seen everywhere")
        # 2 of 3 up: the backends stay agreed up, every table is the same.
        assert all(n.up() == all_up for n in nodes)
        assert len({n.digest() for n in nodes}) == 1
        # c keeps them in its table and its clients still get through.
        names = {(await tcp_request(c.port, f"x{i}\n".encode()))[0] for i in range(20)}
        assert names == {"be1", "be2"}
        status, body = await c.http("GET", "/status")
        assert status == 200
        svc = body["services"][0]
        assert svc["table_digest"] == nodes[0].digest()
        assert svc["table_revision"] >= 1
        assert body["consensus"]["state"] == "synced"
        assert [m["name"] for m in body["consensus"]["members"]] == ["a", "b", "c"]
        assert body["consensus"]["disagreement"] == {"web": sorted(all_up)}
        _, metrics = await c.http("GET", "/metrics")
        assert 'anycast_lb_consensus_state{state="synced"} 1.0' in metrics
        assert "anycast_lb_consensus_members 3.0" in metrics
        assert (f'anycast_lb_consensus_backend_disagreement{{backend="127.0.0.1:{backends[0]}",'
                f'service="web"}} 1.0') in metrics

        # b stops: its lease goes with its member key and votes. a (up) and
        # c (down) tie, and a tie is down (consensus/agree.py).
        b = nodes.pop(1)
        b.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await b.task
        await wait_until(lambda: all(n.up() == set() for n in nodes), timeout=5,
                         what="tie: agreed down on a and c")
        assert all("b" not in n.agent.view.members for n in nodes)
        assert not any(node == "b" for n in nodes for (_, _, node) in n.agent.view.votes)
        await wait_until(lambda: len({n.digest() for n in nodes}) == 1, what="equal digests")


async def test_fail_static_while_etcd_is_stopped_then_resync(
        etcd_private: EtcdMember, backends: list[int]) -> None:
    async with running(config("a", etcd_private, "fs", backends)) as a:
        await wait_until(lambda: a.agent.view is not None and a.up() == keys(backends),
                         timeout=10, what="agreed up")
        lease = a.agent.lease_id
        digest = a.digest()
        assert a.node.view().services[0].healthy

        await asyncio.to_thread(etcd_private.stop)
        await wait_until(lambda: a.agent.state.value == "isolated", timeout=5,
                         what="isolated")
        # Frozen: same table, still announced healthy, still serving.
        assert a.up() == keys(backends) and a.digest() == digest
        assert a.node.view().services[0].healthy
        assert (await tcp_request(a.port))[0] in ("be1", "be2")
        _, body = await a.http("GET", "/status")
        assert body["consensus"]["state"] == "isolated" and body["consensus"]["since_s"] >= 0
        _, metrics = await a.http("GET", "/metrics")
        assert 'anycast_lb_consensus_state{state="isolated"} 1.0' in metrics

        await asyncio.to_thread(etcd_private.start)
        await wait_until(lambda: a.agent.state.value == "synced", timeout=10, what="resynced")
        assert a.agent.lease_id != lease  # registered again under a new lease
        async with Store([etcd_private.client_url], 1.0) as store:
            view = await read_view(store, Layout("fs"))
        assert set(view.members) == {"a"}
        assert view.members["a"].api == a.api.removeprefix("http://")
        assert {k for (_, k, n), up in view.votes.items() if n == "a" and up} == keys(backends)
        assert a.up() == keys(backends)


async def test_pushed_config_is_merged_and_handed_to_apply(
        etcd_member: EtcdMember, etcd_cluster: str, backends: list[int]) -> None:
    applied: list[NodeConfig] = []

    async def apply(cfg: NodeConfig) -> bool:
        applied.append(cfg)
        return True

    cfg = config("a", etcd_member, etcd_cluster, backends)
    async with running(cfg, apply=apply) as a:
        await wait_until(lambda: a.agent.view is not None, what="synced")
        shared = document.from_data({"services": [{**cfg["services"][0], "backends": [
            {"address": "127.0.0.1", "port": backends[0], "weight": 3}]}]})
        async with Store([etcd_member.client_url], 1.0) as store:
            history = ConfigHistory(store, Layout(etcd_cluster))
            await history.push(shared, author="test", message="one backend")
            await wait_until(lambda: len(applied) == 1, what="revision 1 applied")
            assert [b.weight for b in applied[0].services[0].backends] == [3]
            assert applied[0].node.name == "a" and applied[0].consensus is not None
            assert a.agent.config_revision == 1 and a.agent.pushes_applied == 1
            # A revision that does not validate (written past the checks
            # `cluster push` makes) is refused whole; the node keeps running.
            layout = Layout(etcd_cluster)
            await store.put(layout.revision(2), json.dumps({
                "revision": 2, "based_on": 1, "time": 0.0, "author": "x", "message": "bad",
                "config": {"services": []}}).encode())
            await store.put(layout.current, b'{"revision": 2}')
            await wait_until(lambda: a.agent.pushes_refused == 1, what="revision 2 refused")
            assert len(applied) == 1 and a.agent.config_revision == 2
            assert not a.task.done()


async def test_one_node_drains_at_a_time(etcd_member: EtcdMember, etcd_cluster: str,
                                         backends: list[int], token_file: Path) -> None:
    slow = TcpNameEcho("slow")
    await slow.start()
    cfg_a = config("a", etcd_member, etcd_cluster, backends, token_file=token_file,
                   drain_timeout=30.0)
    cfg_b = config("b", etcd_member, etcd_cluster, backends, token_file=token_file,
                   slot_timeout=0.5)
    async with running(cfg_a) as a, running(cfg_b) as b:
        await wait_until(lambda: a.agent.view is not None and b.agent.view is not None
                         and a.up() == b.up() == keys(backends), timeout=10, what="both synced")
        # A connection through a keeps a in its drain (WITHDRAWN, holding the slot).
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        writer.write(b"hold\n")
        await reader.readline()
        assert await a.http("POST", "/drain", TOKEN) == (200, {"draining": True})
        await wait_until(lambda: a.agent.slot is not None, what="a holds the slot")

        status, body = await b.http("POST", "/drain?no_wait=1", TOKEN)
        assert status == 409 and body["holders"] == ["a"] and not b.node.draining
        status, body = await b.http("POST", "/drain", TOKEN)
        assert status == 202 and body == {"draining": False, "waiting": True, "holders": ["a"]}
        _, st = await b.http("GET", "/status")
        assert st["node"]["drain_waiting"] and st["consensus"]["drain_slot_holders"] == ["a"]
        assert not b.node.draining

        # a's last connection ends: a is drained and frees the slot; b drains.
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: b.node.draining, timeout=10, what="b drains after a")
        assert a.node.drainer.state.phase.value == "drained"
        # b has no connection: it is drained at once and frees the slot too.
        await wait_until(lambda: b.node.drainer.state.phase.value == "drained"
                         and not b.agent.view.slots and b.agent.slot is None,
                         what="b drained, slot free")
        assert await b.http("POST", "/undrain", TOKEN) == (200, {"draining": False})
    await slow.stop()


async def test_stop_waits_for_a_slot_at_most_slot_timeout(
        etcd_member: EtcdMember, etcd_cluster: str, backends: list[int], token_file: Path) -> None:
    cfg_a = config("a", etcd_member, etcd_cluster, backends, token_file=token_file,
                   drain_timeout=30.0)
    cfg_b = config("b", etcd_member, etcd_cluster, backends, slot_timeout=0.5)
    async with running(cfg_a) as a, running(cfg_b) as b:
        await wait_until(lambda: a.agent.view is not None and b.agent.view is not None
                         and a.up() == b.up() == keys(backends), timeout=10, what="both synced")
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        writer.write(b"hold\n")
        await reader.readline()
        assert (await a.http("POST", "/drain", TOKEN))[0] == 200
        await wait_until(lambda: a.agent.slot is not None, what="a holds the slot")
        loop = asyncio.get_running_loop()
        started = loop.time()
        b.node.request_stop()
        await asyncio.wait_for(asyncio.shield(b.task), timeout=10)
        # slot_timeout (0.5 s), then the drain and stop of an idle node.
        assert loop.time() - started < 5
        assert a.agent.slot is not None  # a still holds it: b drained without one
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("ahead", ["single failures", "contested only"])
async def test_table_without_a_backend_is_ready_before_the_majority_agrees(
        etcd_member: EtcdMember, etcd_cluster: str, ahead: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Node a and two members written by the test (x, y). With three agreed-up
    # backends a prepares the table for each single failure at once; with
    # that off ("contested only") it prepares the table without be1 when
    # one member (y) votes be1 down, still agreed up (2 of 3). Either way
    # the agreement that follows (x down too) publishes a ready table.
    from anycast_lb import pool as pool_module
    from anycast_lb.consensus import agent as agent_module
    from anycast_lb.consensus.members import MemberInfo, MemberWriter, VoteWriter
    from anycast_lb.consensus.store import LeaseKeeper

    if ahead == "contested only":
        monkeypatch.setattr(agent_module, "PREPARE_ALL_UP_TO", 0)
    pool_module._TABLES.clear()  # no table of an earlier test's backends

    servers = [TcpNameEcho(f"be{i}") for i in (1, 2, 3)]
    ports = [await s.start() for s in servers]
    layout = Layout(etcd_cluster)
    cfg = config("a", etcd_member, etcd_cluster, ports)
    cfg["services"][0]["maglev_table_size"] = 65537
    try:
        async with running(cfg) as a, Store([etcd_member.client_url], 1.0) as store, \
                asyncio.TaskGroup() as tg:
            keeping, voters = [], {}
            for name in ("x", "y"):
                keeper = LeaseKeeper(store, 2.0)
                lease = await keeper.grant()
                keeping.append(tg.create_task(keeper.run()))
                await MemberWriter(store, layout, MemberInfo(name, "", "", "0", 0.0)
                                   ).register(lease.id)
                voters[name] = (VoteWriter(store, layout, name), lease.id)
                await voters[name][0].vote_many({("web", k): True for k in keys(ports)},
                                                lease.id)
            await wait_until(lambda: a.agent.view is not None and len(a.agent.view.members) == 3
                             and a.up() == keys(ports), timeout=10, what="three members, all up")
            rest = [b for b in a.node.pools["web"].backends if b.config.port != ports[0]]
            key = pool_module._table_key(tuple(rest), 65537)
            if ahead == "single failures":
                await wait_until(lambda: pool_module._TABLES.peek(key), timeout=5,
                                 what="the table without be1 prepared with no down vote")
            else:
                assert not pool_module._TABLES.peek(key)

            writer, lease_id = voters["y"]
            await writer.vote_many({("web", f"127.0.0.1:{ports[0]}"): False}, lease_id)
            await wait_until(lambda: pool_module._TABLES.peek(key), timeout=5,
                             what="the table without be1 prepared")
            assert a.up() == keys(ports), "one down vote of three: be1 stays agreed up"

            writer, lease_id = voters["x"]
            await writer.vote_many({("web", f"127.0.0.1:{ports[0]}"): False}, lease_id)
            await wait_until(lambda: a.up() == keys(ports[1:]), timeout=5, what="be1 agreed down")
            assert a.node.pools["web"].table_ready
            _, body = await a.http("GET", "/status")
            assert body["services"][0]["table_since"] is not None
            for task in keeping:  # the test is over: x and y leave with their leases
                task.cancel()
    finally:
        for s in servers:
            await s.stop()
