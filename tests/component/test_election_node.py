"""Two whole nodes in this process sharing one real etcd decide the owner of
an ``active_passive`` VIP over BGP without a BGP router: each node's real
:class:`RouteController` runs on its route view into a recording sink, so
the test checks the decisions the speaker would get (owner announces with no
prepend; a standby withdraws, or announces prepended with ``standby:
prepend``), ``/status`` ``vips``, ``/metrics`` and ``anycast-lb vip
owners``; a drain is a planned move, make before break."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest

from anycast_lb.bgp.controller import RouteController
from anycast_lb.bgp.policy import Prefix, Route
from anycast_lb.config import BgpConfig, parse_config
from anycast_lb.errors import L2Error
from anycast_lb.node import Node
from tests.component.backends import TcpNameEcho
from tests.component.etcd import EtcdMember
from tests.component.nodes import node_running
from tests.component.test_metrics import undocumented
from tests.waiting import wait_until

VIP = "127.0.0.1"
PREFIX = "127.0.0.1/32"
BGP = BgpConfig.model_validate({
    "local_as": 65100, "router_id": "203.0.113.10", "local_address": "127.0.0.1",
    "peers": [{"address": "127.0.0.2", "peer_as": 65000}],
    "announce": {"med": 100, "as_path_prepend": 3},
})


HANDOVER_TIMEOUT = 30.0
"""s: ``election.handover_timeout``. The node promises make before break
only while the successor announces within it (the resign, then the
successor's campaign, take and ``announced`` mark: etcd round trips and
watch events through the one event loop that runs both nodes), and this
test asserts make before break, so it must not rest on the 1 s default: it
measured 0.01-0.36 s on a loaded 2-core machine, and each etcd request
that misses its timeout there adds a retry. A drain returns as soon as the successor
announced, so this bound costs nothing when the test passes."""


def config(name: str, etcd: EtcdMember, cluster: str, backend: int, priority: int,
           standby: str) -> dict[str, Any]:
    # No assertion below waits for a lease, an etcd request or a health
    # check to time out: each bound is one a loaded machine keeps (a 0.1 s
    # etcd request or health check timeout, a 1 s lease renewed every
    # 0.25 s, were missed under load and moved the VIP before the drain).
    return {
        "node": {"name": name},
        "api": {"listen": "127.0.0.1:0"},
        "drain": {"timeout": 1.0, "announce_grace": 0.05},
        "consensus": {"endpoints": [etcd.client_url], "cluster": cluster,
                      "lease_ttl": 6.0, "request_timeout": 2.0},
        "election": {"priority": priority, "standby": standby, "safety_margin": 0.25,
                     "handover_timeout": HANDOVER_TIMEOUT},
        "services": [{
            "name": "web", "vip": VIP, "port": 1, "protocol": "tcp", "maglev_table_size": 251,
            "announce": {"mode": "active_passive", "via": "bgp"},
            "backends": [{"address": "127.0.0.1", "port": backend}],
            "health": {"kind": "tcp", "interval": 2.0, "fast_interval": 0.05, "timeout": 2.0,
                       "rise": 1, "fall": 3},
        }],
    }


class Sink:
    def __init__(self) -> None:
        self.routes: Mapping[Prefix, Route] = {}

    def set_routes(self, routes: Mapping[Prefix, Route]) -> None:
        self.routes = dict(routes)


class Running:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.sink = Sink()
        self.routes = RouteController(BGP, node.view, self.sink, node.clock)
        assert node.api_address is not None
        self.api = f"http://127.0.0.1:{node.api_address[1]}"

    def prepend(self) -> int | None:
        """The decision for the VIP: its AS-path prepend, None if withdrawn."""
        self.routes.evaluate()
        route = {str(p): r for p, r in self.sink.routes.items()}.get(PREFIX)
        return None if route is None else route.as_path_prepend

    def owns(self) -> bool:
        assert self.node.owners is not None
        return self.node.owners.owns(self.node.config.services[0].vip)

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.api + path) as r:
            return await (r.json() if path == "/status" else r.text())


@contextlib.asynccontextmanager
async def running(cfg: dict[str, Any]) -> AsyncIterator[Running]:
    node = Node(parse_config(cfg), bind_overrides={"web": ("127.0.0.1", 0)}, check_jitter=False)
    async with node_running(node):
        yield Running(node)


async def test_bgp_owner_announces_standby_withdraws_or_prepends_and_drain_moves_it(
        etcd_member: EtcdMember, etcd_cluster: str) -> None:
    backend = TcpNameEcho("b1")
    port = await backend.start()
    try:
        async with running(config("a", etcd_member, etcd_cluster, port, 200, "withdraw")) as a:
            await wait_until(a.owns, timeout=10, what="a owns the VIP")
            async with running(config("b", etcd_member, etcd_cluster, port, 100,
                                      "prepend")) as b:
                await wait_until(lambda: b.node.status()["vips"][0]["owner"] == "a",
                                 timeout=10, what="b sees a own the VIP")
                assert a.prepend() == 0          # owner: no prepend
                # Warm standby: bgp.announce.as_path_prepend, once b's own
                # view of the service is ready (seeing a's key, an etcd watch
                # event, can come first on a loaded machine).
                await wait_until(lambda: b.prepend() == 3, timeout=10,
                                 what="b announces as a warm standby (prepend 3)")
                assert not b.owns()
                status = await a.get("/status")
                [row] = status["vips"]
                assert row["vip"] == VIP and row["via"] == "bgp" and row["owner"] == "a"
                assert row["role"] == "owner" and row["has_vip"] and row["qualifies"]
                assert row["term"] >= 1 and row["since"].endswith("Z")
                term = row["term"]
                metrics = await b.get("/metrics")
                assert f'anycast_lb_vip_owner{{owner="a",vip="{VIP}"}} 1.0' in metrics
                assert f'anycast_lb_vip_term{{vip="{VIP}"}} {float(term)}' in metrics
                assert f'anycast_lb_vip_is_owner{{vip="{VIP}"}} 0.0' in metrics
                assert not undocumented(metrics)

                cli = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "anycast_lb", "vip",
                    "--endpoints", etcd_member.client_url, "--cluster", etcd_cluster,
                    "owners", "--json",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await asyncio.wait_for(cli.communicate(), 30)
                assert cli.returncode == 0, err
                [owners] = json.loads(out)
                assert owners["vip"] == VIP and owners["owner"] == "a"
                assert owners["term"] == term and owners["announced"] is True
                assert sorted(owners["candidates"]) == ["a", "b"]
                assert abs(owners["since"] - time.time()) < 60

                # Drain a: a planned move, make before break. Record who
                # holds the VIP at each ownership change of either node.
                seen: list[tuple[bool, bool]] = []
                for r in (a, b):
                    assert r.node.owners is not None
                    inner = r.node.owners._on_change

                    def record(inner: Any = inner) -> None:
                        seen.append((a.owns(), b.owns()))
                        inner()
                    r.node.owners._on_change = record
                answer = await a.node.drain("test")
                assert answer.draining
                assert b.owns() and not a.owns()
                assert (True, True) in seen, seen         # make before break:
                assert (False, False) not in seen, seen   # never nobody
                assert b.prepend() == 0
                assert a.prepend() is None       # draining, and a standby that withdraws
                new = b.node.status()["vips"][0]
                assert new["owner"] == "b" and new["term"] > term
                await wait_until(lambda: a.node.status()["vips"][0]["owner"] == "b",
                                 timeout=5, what="a sees b own the VIP")
                assert a.node.status()["vips"][0]["qualifies"] is False

                # Undrain: a qualifies again; without preempt, b keeps the VIP.
                assert await a.node.undrain()
                await wait_until(lambda: a.node.status()["vips"][0]["qualifies"], timeout=5,
                                 what="a qualifies again")
                assert a.node.status()["vips"][0]["role"] == "standby"
                assert b.owns() and a.prepend() is None and b.prepend() == 0
    finally:
        await backend.stop()


def test_without_consensus_active_passive_over_bgp_is_prepend_only() -> None:
    """No quorum store, no election: the node announces the VIP with its own
    bgp.announce.as_path_prepend (the routers choose) and runs no ownership."""
    node = Node(parse_config({
        "node": {"name": "solo"},
        "services": [{"name": "web", "vip": VIP, "port": 1,
                      "announce": {"mode": "active_passive"},
                      "backends": [{"address": "127.0.0.1", "port": 2}]}],
    }))
    assert node.owners is None
    [service] = node.view().services
    assert service.ownership.value == "unelected"
    assert node.status()["vips"] is None


async def test_a_node_that_cannot_announce_on_its_l2_interface_does_not_run() -> None:
    node = Node(parse_config({
        "node": {"name": "l2"},
        "api": {"listen": "127.0.0.1:0"},
        "consensus": {"endpoints": ["http://127.0.0.1:9"], "cluster": "c",
                      "lease_ttl": 1.0, "request_timeout": 0.1},
        "election": {"interface": "albt-nosuch0"},
        "services": [{"name": "web", "vip": VIP, "port": 1,
                      "announce": {"mode": "active_passive", "via": "l2"},
                      "backends": [{"address": "127.0.0.1", "port": 2}]}],
    }), bind_overrides={"web": ("127.0.0.1", 0)})
    with pytest.raises(L2Error, match=r"albt-nosuch0|raw socket"):
        await asyncio.wait_for(node.run(), 30)
