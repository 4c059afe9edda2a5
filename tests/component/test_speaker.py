"""BgpSpeaker's socket side, with a stand-in ExaBGP and a test-driven announcer."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from anycast_lb.bgp.liveness import CONFIRM_DEADLINE
from anycast_lb.bgp.policy import Route
from anycast_lb.bgp.speaker import BgpSpeaker
from anycast_lb.clock import FakeClock, SystemClock
from anycast_lb.config import BgpConfig
from tests.waiting import wait_until

V4 = ipaddress.ip_network("198.51.100.10/32")
V4B = ipaddress.ip_network("198.51.100.11/32")
FAKE_EXABGP = """#!/bin/sh
if [ "$1" = version ]; then echo "ExaBGP : 5.0.15"; exit 0; fi
exec sleep 60
"""


@pytest.fixture
async def speaker(tmp_path: Path) -> AsyncIterator[BgpSpeaker]:
    exe = tmp_path / "exabgp"
    exe.write_text(FAKE_EXABGP)
    exe.chmod(0o755)
    cfg = BgpConfig.model_validate({
        "local_as": 65100, "router_id": "203.0.113.10", "local_address": "203.0.113.10",
        "peers": [{"address": "203.0.113.1", "peer_as": 65000}], "exabgp": str(exe),
    })
    sp = BgpSpeaker(cfg, "lb1", tmp_path / "run", SystemClock())
    started = asyncio.Event()
    task = asyncio.create_task(sp.run(started))
    async with asyncio.timeout(10):
        await started.wait()
    yield sp
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def read_routes(reader: asyncio.StreamReader) -> tuple[float, dict[str, object]]:
    async with asyncio.timeout(5):
        line = await reader.readline()
    assert line, "speaker closed the socket"
    message: dict[str, object] = json.loads(line)
    assert message["type"] == "routes"
    return time.monotonic(), message


async def test_config_written_and_exabgp_started(speaker: BgpSpeaker) -> None:
    text = speaker.config_path.read_text()
    assert "process announcer-lb1" in text and f"--socket {speaker.socket_path}" in text
    assert isinstance(speaker.status()["exabgp_pid"], int)


async def test_heartbeat_every_200_ms_and_at_once_on_change(speaker: BgpSpeaker) -> None:
    reader, writer = await asyncio.open_unix_connection(str(speaker.socket_path))
    try:
        times = [(await read_routes(reader))[0] for _ in range(6)]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(0.1 < g < 0.35 for g in gaps), gaps
        route = Route(V4, 100, ("65100:1",), 0, 65100)
        before = time.monotonic()
        speaker.set_routes({V4: route})
        async with asyncio.timeout(5):
            while True:
                at, message = await read_routes(reader)
                if message["seq"] == 1:
                    break
        assert at - before < 0.1
        assert message["routes"] == [{"prefix": str(V4), "med": 100, "communities": ["65100:1"],
                                      "as_path_prepend": 0, "local_as": 65100}]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_hung_node_loop_stops_the_heartbeat(speaker: BgpSpeaker) -> None:
    reader, writer = await asyncio.open_unix_connection(str(speaker.socket_path))
    try:
        await read_routes(reader)
        time.sleep(0.8)  # the node's event loop is blocked (a hung node)
        # Nothing was sent during the hang: what arrives now is at most the one
        # heartbeat written right after the loop woke up.
        arrived = 0
        while True:
            try:
                async with asyncio.timeout(0.05):
                    await reader.readline()
                arrived += 1
            except TimeoutError:
                break
        assert arrived <= 1
    finally:
        writer.close()
        await writer.wait_closed()


async def test_status_pending_until_acked_then_peers_relayed(speaker: BgpSpeaker) -> None:
    assert speaker.status()["announcer_connected"] is False
    # ExaBGP has confirmed nothing yet: no peer state is claimed.
    assert speaker.status()["peers"] == {"203.0.113.1": "unknown"}
    assert speaker.status()["confirmed"] is False
    reader, writer = await asyncio.open_unix_connection(str(speaker.socket_path))
    try:
        await wait_until(lambda: speaker.status()["announcer_connected"] is True)
        routes = {V4: Route(V4, 100, (), 0, 65100), V4B: Route(V4B, 100, (), 0, 65100)}
        speaker.set_routes(routes)
        assert speaker.status()["routes"] == {str(V4): "unconfirmed", str(V4B): "unconfirmed"}
        writer.write(b'{"type": "alive"}\n')
        await wait_until(lambda: speaker.status()["confirmed"] is True, what="confirmed")
        assert speaker.status()["peers"] == {"203.0.113.1": "down"}
        assert speaker.status()["routes"] == {str(V4): "pending", str(V4B): "pending"}
        assert not speaker.synced()
        writer.write(b'{"type": "ack", "seq": 1, "ok": true}\n')
        writer.write(b'{"type": "peer", "address": "203.0.113.1", "state": "up"}\n')
        await wait_until(speaker.synced, what="synced")
        assert speaker.status()["routes"] == {str(V4): "announced", str(V4B): "announced"}
        await wait_until(lambda: speaker.status()["peers"] == {"203.0.113.1": "up"})

        speaker.set_routes({V4B: routes[V4B]})
        assert speaker.status()["routes"] == {str(V4): "pending", str(V4B): "announced"}
        # An ack for an older seq does not confirm the newer set.
        writer.write(b'{"type": "ack", "seq": 1, "ok": false}\n')
        await wait_until(lambda: speaker.status()["exabgp_errors"] == 1)
        assert not speaker.synced()
        writer.write(b'{"type": "ack", "seq": 2, "ok": true}\n')
        async with asyncio.timeout(5):
            await speaker.wait_synced()
        assert speaker.status()["routes"] == {str(V4): "withdrawn", str(V4B): "announced"}
        # The speaker tells a (new) announcer which prefixes to withdraw.
        async with asyncio.timeout(5):
            while True:
                _, message = await read_routes(reader)
                if message["seq"] == 2:
                    assert message["withdrawn"] == [str(V4)]
                    break
    finally:
        writer.close()
        await writer.wait_closed()
    # The announcer is gone: it withdrew everything, nothing is confirmed.
    await wait_until(lambda: speaker.status()["announcer_connected"] is False)
    assert speaker.status()["routes"] == {str(V4): "withdrawn", str(V4B): "pending"}


async def test_bad_announcer_line_drops_the_connection(speaker: BgpSpeaker) -> None:
    reader, writer = await asyncio.open_unix_connection(str(speaker.socket_path))
    try:
        writer.write(b"nonsense\n")
        async with asyncio.timeout(5):
            while await reader.readline():
                pass
    finally:
        writer.close()
        await writer.wait_closed()


async def test_view_goes_stale_past_the_deadline_without_an_answer(tmp_path: Path) -> None:
    exe = tmp_path / "exabgp"
    exe.write_text(FAKE_EXABGP)
    exe.chmod(0o755)
    cfg = BgpConfig.model_validate({
        "local_as": 65100, "router_id": "203.0.113.10", "local_address": "203.0.113.10",
        "peers": [{"address": "203.0.113.1", "peer_as": 65000}], "exabgp": str(exe),
    })
    clock = FakeClock()
    sp = BgpSpeaker(cfg, "lb1", tmp_path / "run", clock)
    started = asyncio.Event()
    task = asyncio.create_task(sp.run(started))
    try:
        async with asyncio.timeout(10):
            await started.wait()
        _, writer = await asyncio.open_unix_connection(str(sp.socket_path))
        sp.set_routes({V4: Route(V4, 100, (), 0, 65100)})
        writer.write(b'{"type": "peer", "address": "203.0.113.1", "state": "up"}\n')
        writer.write(b'{"type": "ack", "seq": 1, "ok": true}\n')
        await wait_until(sp.synced, what="synced")
        assert sp.status()["peers"] == {"203.0.113.1": "up"}
        assert sp.status()["routes"] == {str(V4): "announced"}

        await clock.advance(CONFIRM_DEADLINE)  # at the deadline: still trusted
        assert sp.status()["confirmed"] is True
        await clock.advance(0.01)  # ExaBGP said nothing more
        status = sp.status()
        assert status["confirmed"] is False and status["confirmed_age_s"] == CONFIRM_DEADLINE + 0.01
        assert status["peers"] == {"203.0.113.1": "unknown"}
        assert status["routes"] == {str(V4): "unconfirmed"}
        metrics = {m.name: m.samples for m in sp.metric_families()}
        assert [s.value for s in metrics["anycast_lb_bgp_confirmed"]] == [0.0]
        assert [(s.labels, s.value) for s in metrics["anycast_lb_bgp_peer_up"]] == [
            ({"peer": "203.0.113.1"}, 0.0)]

        writer.write(b'{"type": "alive"}\n')  # it answers again
        await wait_until(lambda: sp.status()["confirmed"] is True, what="confirmed again")
        assert sp.status()["peers"] == {"203.0.113.1": "up"}
        metrics = {m.name: m.samples for m in sp.metric_families()}
        assert [s.value for s in metrics["anycast_lb_bgp_peer_up"]] == [1.0]
        assert [s.value for s in metrics["anycast_lb_bgp_route_announced"]] == [1.0]
        writer.close()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
