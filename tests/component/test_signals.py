"""Signals and truthful BGP status of a whole node run as ``anycast-lb run``,
with the real ExaBGP holding a session to a small BGP peer on 127.0.0.2
(tests/component/bgp_peer.py), and the UDP drain of an in-process node.

The node runs in its own session, so a signal sent to its process group here
is what Ctrl-C, ``timeout`` or systemd's ``KillMode=control-group`` send."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from anycast_lb.bgp.announcer import PROBE_INTERVAL
from anycast_lb.bgp.liveness import CONFIRM_DEADLINE
from anycast_lb.config import parse_config
from anycast_lb.forward.udp import DRAIN_IDLE
from anycast_lb.node import Node
from anycast_lb.status import Status
from tests.component.backends import TcpNameEcho, UdpNameEcho, udp_request
from tests.component.bgp_peer import BgpPeer
from tests.component.nodes import node_running, wait_bound
from tests.procs import exited
from tests.waiting import wait_until

VIP_PREFIX = "127.0.0.1/32"
GRACEFUL_SHUTDOWN = "65535:0"
ANNOUNCE_GRACE = 0.5


@dataclass
class BgpNode:
    proc: subprocess.Popen[bytes]
    peer: BgpPeer
    api: str
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def get(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.get(self.api + path) as response:
            body = await (response.json() if path != "/metrics" else response.text())
            return response.status, body

    async def ready(self) -> bool:
        try:
            return (await self.get("/readyz"))[0] == 200
        except aiohttp.ClientError:
            return False


@contextlib.asynccontextmanager
async def bgp_node(tmp_path: Path, *args: str) -> AsyncIterator[BgpNode]:
    """A node run as ``anycast-lb run ... *args``, its peer up, its VIP announced."""
    backend = TcpNameEcho("be")
    await backend.start()
    peer = BgpPeer()
    await peer.start()
    config = {  # run with --ephemeral-ports: the API and "web" bind port 0
        "node": {"name": "sig"},
        "api": {"listen": "127.0.0.1:0"},
        "drain": {"timeout": 5, "announce_grace": ANNOUNCE_GRACE},
        "services": [{
            "name": "web", "vip": "127.0.0.1", "port": 80,
            "backends": [{"address": "127.0.0.1", "port": backend.port}],
            "health": {"kind": "tcp", "interval": 0.2, "fast_interval": 0.05, "timeout": 0.2,
                       "rise": 1},
        }],
        "bgp": {
            "local_as": 65100, "router_id": "127.0.0.1", "local_address": "127.0.0.1",
            "peers": [{"address": peer.host, "peer_as": peer.asn}],
        },
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "node.log"
    # exabgp_tcp_port: the port ExaBGP connects to (the peer's, not 179).
    env = dict(os.environ, exabgp_tcp_port=str(peer.port),
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "anycast_lb", "run", "--config", str(path),
             "--run-dir", str(tmp_path / "run"), "--ephemeral-ports", *args],
            stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True,
        )
    node = BgpNode(proc, peer, "", log)
    exabgp_pid: int | None = None
    try:
        node.api = (await wait_bound(node.text, ["web"], alive=lambda: proc.poll() is None)).api_url
        await wait_until(node.ready, timeout=20, interval=0.05, what="node ready")
        await wait_until(lambda: bool(peer.prefix_events(VIP_PREFIX)), timeout=20,
                         what="the peer to receive the announce")
        exabgp_pid = (await node.get("/status"))[1]["bgp"]["exabgp_pid"]
        yield node
    finally:
        if exabgp_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(exabgp_pid, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # ExaBGP follows (PR_SET_PDEATHSIG)
            proc.wait()
        if exabgp_pid is not None:
            await wait_until(lambda: exited(exabgp_pid), timeout=10, what="ExaBGP gone")
        await peer.stop()
        await backend.stop()


async def test_group_sigterm_drains_withdraws_then_stops_exabgp(tmp_path: Path) -> None:
    async with bgp_node(tmp_path) as node:
        [(kind, first)] = node.peer.prefix_events(VIP_PREFIX)
        assert kind == "announce" and GRACEFUL_SHUTDOWN not in first.communities
        os.killpg(node.proc.pid, signal.SIGTERM)  # as Ctrl-C or systemd would
        began = time.monotonic()
        code = await asyncio.to_thread(node.proc.wait, 20)
        stopped_in = time.monotonic() - began
        log = node.text()
        assert code == 0, log
        events = node.peer.prefix_events(VIP_PREFIX)
        kinds = [(k, GRACEFUL_SHUTDOWN in u.communities) for k, u in events]
        # The router saw 65535:0 (RFC 8326), then the withdraw, then the
        # session closed; never a second session (no ExaBGP restart).
        assert kinds == [("announce", False), ("announce", True), ("withdraw", False)], kinds
        graceful_at, withdraw_at = events[1][1].at, events[2][1].at
        assert withdraw_at - graceful_at >= ANNOUNCE_GRACE - 0.05
        assert node.peer.closed_at and node.peer.closed_at[0] >= withdraw_at
        assert node.peer.sessions == 1
        assert "restart_in_s" not in log and log.count("event=exabgp.start") == 1
        order = [log.index(e) for e in ("event=node.signal signal=SIGTERM", "event=node.stopping",
                                        "event=node.drain_withdraw", "event=exabgp.stop",
                                        "event=node.stopped")]
        assert order == sorted(order), log
        assert stopped_in < 10, stopped_in


async def test_group_sighup_reloads_and_disturbs_nothing(tmp_path: Path) -> None:
    async with bgp_node(tmp_path) as node:
        exabgp_pid = (await node.get("/status"))[1]["bgp"]["exabgp_pid"]
        os.killpg(node.proc.pid, signal.SIGHUP)
        await wait_until(lambda: "event=config.applied" in node.text(),
                         timeout=5, what="the reload's log line")
        assert "event=node.signal signal=SIGHUP action=reload" in node.text()
        assert "actions=none" in node.text().split("event=config.applied", 1)[1].splitlines()[0]
        assert await node.ready()
        assert node.proc.poll() is None
        status = (await node.get("/status"))[1]
        assert Status.model_validate(status).bgp is not None
        assert status["bgp"]["exabgp_pid"] == exabgp_pid and not exited(exabgp_pid)
        assert status["services"][0]["announcement"] == "announced"
        assert node.peer.sessions == 1 and len(node.peer.prefix_events(VIP_PREFIX)) == 1
        # Nor did it reach ExaBGP (which reloads on SIGHUP) or its API process
        # (whose default is to die, and be respawned): watched for 1.5 s,
        # in which both happen within milliseconds when they share our group.
        exabgp_log = node.log.parent / "run" / "exabgp.log"

        def disturbed() -> bool:
            text = exabgp_log.read_text(errors="replace")
            return "SIGHUP" in text or text.count("event=announcer.start") > 1

        with pytest.raises(AssertionError, match="timed out"):
            await wait_until(disturbed, timeout=1.5, interval=0.05, what="ExaBGP disturbed")


async def test_stopped_exabgp_turns_status_stale_and_readyz_503(tmp_path: Path) -> None:
    async with bgp_node(tmp_path) as node:
        await wait_until(lambda: _peer_up(node), timeout=10, what="peer up in /status")
        exabgp_pid = (await node.get("/status"))[1]["bgp"]["exabgp_pid"]
        os.kill(exabgp_pid, signal.SIGSTOP)  # hung: no answer, no session change
        stopped = time.monotonic()
        deadline = CONFIRM_DEADLINE + PROBE_INTERVAL + 1.0  # last answer <= 1 probe before

        async def not_ready() -> bool:
            return not await node.ready()

        await wait_until(not_ready, timeout=deadline, interval=0.05, what="/readyz 503")
        took = time.monotonic() - stopped
        assert took >= CONFIRM_DEADLINE - PROBE_INTERVAL - 0.3, took
        print(f"readyz 503 {took:.2f} s after SIGSTOP of ExaBGP")
        code, body = await node.get("/readyz")
        assert code == 503 and "unconfirmed" in body["reason"]
        bgp = (await node.get("/status"))[1]["bgp"]
        assert bgp["confirmed"] is False and bgp["peers"] == {node.peer.host: "unknown"}
        assert bgp["routes"] == {VIP_PREFIX: "unconfirmed"}
        assert (await node.get("/status"))[1]["services"][0]["announcement"] == "unconfirmed"
        metrics = (await node.get("/metrics"))[1]
        assert f'anycast_lb_bgp_peer_up{{peer="{node.peer.host}"}} 0.0' in metrics
        assert "anycast_lb_bgp_confirmed 0.0" in metrics

        await wait_until(lambda: "event=bgp.unconfirmed" in node.text(), timeout=2,
                         what="the bgp.unconfirmed log line")

        os.kill(exabgp_pid, signal.SIGCONT)  # it answers again: confirmed again
        await wait_until(node.ready, timeout=deadline, interval=0.05, what="/readyz 200")
        await wait_until(lambda: _peer_up(node), timeout=5, what="peer up again")
        metrics = (await node.get("/metrics"))[1]
        assert f'anycast_lb_bgp_peer_up{{peer="{node.peer.host}"}} 1.0' in metrics


async def _peer_up(node: BgpNode) -> bool:
    peers = (await node.get("/status"))[1]["bgp"]["peers"]
    return bool(peers == {node.peer.host: "up"})


async def test_idle_udp_flow_does_not_hold_the_stop() -> None:
    u1 = UdpNameEcho("u1")
    await u1.start()
    config = {
        "node": {"name": "udp-drain"},
        "api": {"listen": "127.0.0.1:0"},
        "drain": {"timeout": 30, "announce_grace": 0.1},
        "services": [{
            "name": "dns", "vip": "127.0.0.1", "port": 1, "protocol": "udp",
            "backends": [{"address": "127.0.0.1", "port": u1.port}],
            "health": {"kind": "none", "interval": 0.2, "fast_interval": 0.05, "timeout": 0.1,
                       "rise": 1},
        }],
    }
    node = Node(parse_config(config), bind_overrides={"dns": ("127.0.0.1", 0)}, check_jitter=False)
    try:
        async with node_running(node) as task:
            await wait_until(lambda: node.pools["dns"].healthy, what="pool healthy")
            port = node.service_addresses["dns"][1]
            # An active flow (one client socket, one source port) keeps being
            # served during the drain...
            loop = asyncio.get_running_loop()
            replies: asyncio.Queue[bytes] = asyncio.Queue()

            class Client(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                    replies.put_nowait(data)

            transport, _ = await loop.create_datagram_endpoint(
                Client, remote_addr=("127.0.0.1", port))
            try:
                transport.sendto(b"hello")
                assert await asyncio.wait_for(replies.get(), 2) == b"u1:hello"
                # ... and a second client goes quiet after one exchange.
                assert (await udp_request(port, b"once"))[0] == b"u1:once"
                assert node.forwarders["dns"].active == 2
                node.request_stop()
                began = time.monotonic()
                await wait_until(lambda: not node.forwarders["dns"].listening, what="draining")
                for i in range(6):  # 1.8 s of traffic, longer than DRAIN_IDLE
                    transport.sendto(b"more %d" % i)
                    assert await asyncio.wait_for(replies.get(), 2) == b"u1:more %d" % i
                    await asyncio.sleep(0.3)
                assert not task.done() and node.forwarders["dns"].active == 1
                last = time.monotonic()
            finally:
                transport.close()
            await asyncio.wait_for(asyncio.shield(task), 10)
            ended = time.monotonic()
            # Over DRAIN_IDLE to 1.5x DRAIN_IDLE after the last datagram (plus
            # scheduling), far below drain.timeout (30 s).
            assert DRAIN_IDLE * 0.9 <= ended - last <= DRAIN_IDLE * 1.5 + 0.5, ended - last
            assert ended - began < 5
    finally:
        u1.stop()

