"""Runtime control with a consensus store (a real etcd): ``backend drain``,
``weight`` and ``undrain`` asked of any node become pushed config revisions
(compare-and-swap through the config history) that every node applies."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp

from anycast_lb.consensus.history import ConfigHistory
from anycast_lb.consensus.keys import Layout
from anycast_lb.consensus.store import Store
from tests.component.backends import tcp_request
from tests.component.etcd import EtcdMember
from tests.component.test_consensus_node import (  # noqa: F401 (fixtures)
    TOKEN,
    Running,
    backends,
    config,
    running,
    token_file,
)
from tests.waiting import wait_until


async def post(node: Running, path: str, body: object = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(
            node.api + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        return r.status, await r.json()


def drained(node: Running) -> set[str]:
    return {b.key for b in node.node.pools["web"].backends if b.drained}


async def test_backend_changes_go_through_etcd_to_every_node(
        etcd_member: EtcdMember, etcd_cluster: str, backends: list[int],  # noqa: F811
        token_file: Path) -> None:  # noqa: F811
    be1, be2 = (f"127.0.0.1:{p}" for p in backends)
    async with contextlib.AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(running(config(
            n, etcd_member, etcd_cluster, backends, token_file=token_file))) for n in ("a", "b")]
        await wait_until(lambda: all(n.agent.view is not None and n.node.pools["web"].up_count == 2
                                     for n in (a, b)), timeout=10, what="synced, both up")
        # Drain asked of a: revision 1, applied on a before the answer, then on b.
        code, body = await post(a, f"/backends/web/{be1}/drain")
        assert code == 200, body
        assert body["scope"] == "cluster" and body["revision"] == 1 and body["applied"]
        assert drained(a) == {be1}
        await wait_until(lambda: drained(b) == {be1}, timeout=10, what="b applied the drain")
        for n in (a, b):
            assert {(await tcp_request(n.port, f"x{i}\n".encode()))[0] for i in range(20)} \
                == {"be2"}
        code, status = await b.http("GET", "/status")
        [row] = [r for r in status["services"][0]["backends"] if r["port"] == backends[0]]
        assert (row["admin"], row["runtime_override"]) == ("drained", False)
        assert status["consensus"]["config_revision"] == 1
        # Weight asked of b: revision 2, based on 1.
        code, body = await post(b, f"/backends/web/{be2}/weight", {"weight": 4})
        assert code == 200 and body["revision"] == 2, body
        await wait_until(lambda: a.node.pools["web"].get(be2).config.weight == 4, timeout=10,
                         what="a took the weight")
        # Undrain on a: revision 3; both serve from both again.
        code, body = await post(a, f"/backends/web/{be1}/undrain")
        assert code == 200 and body["revision"] == 3, body
        await wait_until(lambda: not drained(b) and b.node.pools["web"].up_count == 2,
                         timeout=10, what="b undrained")
        # An unknown backend pushes nothing.
        code, body = await post(b, "/backends/web/127.0.0.1:1/drain")
        assert code == 404, body
        async with Store([etcd_member.client_url], 1.0) as store:
            history = await ConfigHistory(store, Layout(etcd_cluster)).history()
        assert [(r.number, r.based_on, r.author, r.message) for r in history] == [
            (1, 0, "a (runtime control)", f"drain backend {be1} of web"),
            (2, 1, "b (runtime control)", f"set weight 4 of backend {be2} of web"),
            (3, 2, "a (runtime control)", f"undrain backend {be1} of web"),
        ]
        assert [(x.drain, x.weight) for x in history[-1].shared.services[0].backends] == [
            (False, 1), (False, 4)]


async def test_without_etcd_a_change_is_refused_not_made_locally(
        etcd_private: EtcdMember, backends: list[int], token_file: Path) -> None:  # noqa: F811
    be1 = f"127.0.0.1:{backends[0]}"
    async with running(config("a", etcd_private, "rtc-down", backends,
                              token_file=token_file)) as a:
        await wait_until(lambda: a.agent.view is not None and a.node.pools["web"].up_count == 2,
                         timeout=10, what="synced, both up")
        await asyncio.to_thread(etcd_private.stop)
        code, body = await post(a, f"/backends/web/{be1}/drain")
        assert code == 503 and "etcd cannot take the change" in body["error"], body
        assert drained(a) == set() and a.node.pools["web"].up_count == 2
        assert a.agent.config_revision == 0
