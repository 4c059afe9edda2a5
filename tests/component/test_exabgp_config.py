"""The generated ExaBGP config is accepted by the real ExaBGP (``exabgp
validate``), and the whole chain speaker -> announcer -> real ExaBGP gets
every line answered ``done``."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from anycast_lb.bgp.exabgp import (
    announcer_argv,
    detect_version,
    exabgp_argv,
    exabgp_config_text,
    render_config,
)
from anycast_lb.bgp.policy import Route
from anycast_lb.bgp.speaker import BgpSpeaker, resolve_exabgp
from anycast_lb.clock import SystemClock
from anycast_lb.config import BgpConfig, parse_config
from anycast_lb.errors import AnnouncerError
from tests.component.bgp_peer import BgpPeer
from tests.procs import exited
from tests.waiting import wait_until

EXABGP = str(Path(sys.executable).parent / "exabgp")

pytestmark = pytest.mark.skipif(not Path(EXABGP).exists(), reason="exabgp not in the venv")


def bgp(**extra: object) -> BgpConfig:
    data: dict[str, object] = {
        "local_as": 65100, "router_id": "203.0.113.10", "local_address": "203.0.113.10",
        "peers": [{"address": "203.0.113.1", "peer_as": 65000},
                  {"address": "203.0.113.2", "peer_as": 65000}],
    }
    data.update(extra)
    return BgpConfig.model_validate(data)


def validate(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXABGP, "validate", "-n", "-v", str(conf)], capture_output=True,
                          text=True, timeout=60, check=False)


def write(tmp_path: Path, text: str) -> Path:
    conf = tmp_path / "exabgp.conf"
    conf.write_text(text)
    return conf


def test_rendered_config_is_accepted_as_meant(tmp_path: Path) -> None:
    sock = tmp_path / "run dir" / "announcer.sock"  # a space: must be quoted
    argv = announcer_argv(sock, 0.6, 30.0)
    conf = write(tmp_path, render_config(bgp(), "lb1", argv))
    done = validate(conf)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # ExaBGP's own reading of what we wrote:
    assert "✓ neighbor  203.0.113.1" in out and "✓ neighbor  203.0.113.2" in out
    assert " ".join(repr(a) for a in argv) in out  # the run argv, word for word
    assert "graceful-restart disable" in out  # a dead node's route must not stay as stale
    assert "processes [ announcer-lb1 ]" in out
    assert "ipv4 unicast" in out and "ipv6 unicast" not in out


def test_broken_config_is_rejected(tmp_path: Path) -> None:
    # The check above could not pass on a bad file.
    text = render_config(bgp(), "lb1", announcer_argv(tmp_path / "a.sock", 0.6, 30.0))
    done = validate(write(tmp_path, text.replace("peer-as", "peer-asn", 1)))
    assert done.returncode != 0


def test_ipv6_session_and_hold_time_0_configs_are_accepted(tmp_path: Path) -> None:
    argv = announcer_argv(tmp_path / "a.sock", 0.6, 30.0)
    text = render_config(bgp(hold_time=0), "lb-2", argv)
    assert validate(write(tmp_path, text)).returncode == 0
    v6 = bgp(local_address="2001:db8::10", peers=[{"address": "2001:db8::1", "peer_as": 65000}])
    text = render_config(v6, "lb3", argv)
    assert "ipv6 unicast;" in text and "ipv4 unicast" not in text
    done = validate(write(tmp_path, text))
    assert done.returncode == 0, done.stdout + done.stderr


def test_mixed_family_peer_is_refused_before_exabgp_sees_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in the family of local_address"):
        bgp(peers=[{"address": "2001:db8::1", "peer_as": 65000}])


def test_unquotable_argument_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AnnouncerError):
        render_config(bgp(), "lb1", [sys.executable, "--socket", 'a";\nneighbor x {'])


def test_exabgp_config_text_for_self_run_exabgp(tmp_path: Path) -> None:
    cfg = parse_config({
        "node": {"name": "lb7"},
        "services": [{"name": "web", "vip": "198.51.100.10", "port": 80,
                      "backends": [{"address": "203.0.113.130", "port": 8080}]}],
        "bgp": {"local_as": 65100, "router_id": "203.0.113.10",
                "local_address": "203.0.113.10",
                "peers": [{"address": "203.0.113.1", "peer_as": 65000}]},
    })
    text = exabgp_config_text(cfg, Path("/etc/anycast-lb/node.yaml"), run_dir=tmp_path)
    assert "exabgp_api_cli=false" in text and "exabgp_daemon_drop=false" in text
    assert f"--socket {tmp_path}/announcer.sock" in text
    done = validate(write(tmp_path, text))
    assert done.returncode == 0, done.stdout + done.stderr


def test_detect_version_and_argv() -> None:
    version = detect_version(EXABGP)
    assert version >= (4, 2)
    conf = Path("/x/exabgp.conf")
    assert exabgp_argv(EXABGP, (5, 0), conf) == [EXABGP, "server", "/x/exabgp.conf"]
    assert exabgp_argv(EXABGP, (4, 2), conf) == [EXABGP, "/x/exabgp.conf"]
    with pytest.raises(AnnouncerError):
        detect_version("/bin/true")


async def test_real_exabgp_answers_done_to_every_line(tmp_path: Path) -> None:
    # Peers on 127.0.0.2/3 port 179: nothing listens, sessions stay down;
    # ExaBGP still takes the routes into its RIB and answers each line.
    config = bgp(local_address="127.0.0.1", router_id="127.0.0.1",
                 peers=[{"address": "127.0.0.2", "peer_as": 65000},
                        {"address": "127.0.0.3", "peer_as": 65000}],
                 exabgp=resolve_exabgp(EXABGP))
    speaker = BgpSpeaker(config, "lbt", tmp_path / "run", SystemClock(),
                         log_file=tmp_path / "exabgp.log")
    v4 = ipaddress.ip_network("198.51.100.10/32")
    v4b = ipaddress.ip_network("198.51.100.11/32")
    v6 = ipaddress.ip_network("2001:db8::10/128")
    routes = {
        v4: Route(v4, 100, ("65100:1", "65535:0"), 2, 65100),
        v4b: Route(v4b, 1000, (), 0, 65100),
    }
    started = asyncio.Event()
    task = asyncio.create_task(speaker.run(started))
    try:
        async with asyncio.timeout(20):
            await started.wait()
        pid = speaker.status()["exabgp_pid"]
        assert isinstance(pid, int)
        speaker.set_routes(routes)
        async with asyncio.timeout(20):
            await speaker.wait_synced()
        status = speaker.status()
        assert status["routes"] == {str(v4): "announced", str(v4b): "announced"}
        assert status["exabgp_errors"] == 0
        assert set(status["peers"]) == {"127.0.0.2", "127.0.0.3"}  # type: ignore[arg-type]

        speaker.set_routes({v4b: routes[v4b]})
        assert speaker.status()["routes"] == {str(v4): "pending", str(v4b): "announced"}
        async with asyncio.timeout(20):
            await speaker.wait_synced()
        assert speaker.status()["routes"] == {str(v4): "withdrawn", str(v4b): "announced"}
        assert speaker.status()["exabgp_errors"] == 0

        # An IPv6 route cannot go over these IPv4 sessions without bgp.next_hop_v6:
        # never sent, stays pending; the IPv4 route is withdrawn.
        speaker.set_routes({v6: Route(v6, 100, (), 0, 65100)})
        async with asyncio.timeout(20):
            await speaker.wait_synced()
        assert speaker.status()["routes"] == {
            str(v4): "withdrawn", str(v4b): "withdrawn", str(v6): "pending"}
        assert speaker.status()["exabgp_errors"] == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await wait_until(lambda: exited(pid),
                     timeout=10, what="ExaBGP gone")
    log_text = (tmp_path / "exabgp.log").read_text()
    assert "route added to neighbor 127.0.0.2" in log_text, log_text[-2000:]
    assert "route removed from neighbor 127.0.0.2" in log_text, log_text[-2000:]


def dual_stack(**extra: object) -> BgpConfig:
    return bgp(next_hop_v6="2001:db8::a", **extra)


def test_dual_stack_config_negotiates_both_families(tmp_path: Path) -> None:
    text = render_config(dual_stack(), "lb1", announcer_argv(tmp_path / "a.sock", 0.6, 30.0))
    assert "        ipv4 unicast;\n        ipv6 unicast;\n" in text
    done = validate(write(tmp_path, text))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "ipv4 unicast" in out and "ipv6 unicast" in out  # ExaBGP's own reading


async def test_dual_stack_routes_and_communities_reach_a_real_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One IPv4 session from ExaBGP to the test peer on 127.0.0.2 carries an
    # IPv4 VIP (next-hop self) and an IPv6 VIP (MP_REACH_NLRI, RFC 4760) with
    # large and extended communities; the withdraw of the IPv6 VIP arrives as
    # MP_UNREACH_NLRI.
    peer = BgpPeer()
    await peer.start()
    monkeypatch.setenv("exabgp_tcp_port", str(peer.port))  # ExaBGP connects here, not to 179
    config = dual_stack(local_address="127.0.0.1", router_id="127.0.0.1",
                        peers=[{"address": peer.host, "peer_as": peer.asn}],
                        exabgp=resolve_exabgp(EXABGP))
    speaker = BgpSpeaker(config, "lbds", tmp_path / "run", SystemClock(),
                         log_file=tmp_path / "exabgp.log")
    v4 = ipaddress.ip_network("198.51.100.10/32")
    v6 = ipaddress.ip_network("2001:db8::10/128")
    nh6 = ipaddress.ip_address("2001:db8::a")
    extra = {"large_communities": ("65100:1:2",), "extended_communities": ("target:65100:7",)}
    routes = {v4: Route(v4, 100, ("65100:1",), 0, 65100, **extra),  # type: ignore[arg-type]
              v6: Route(v6, 100, ("65100:1",), 0, 65100, next_hop=nh6, **extra)}  # type: ignore[arg-type]
    started = asyncio.Event()
    task = asyncio.create_task(speaker.run(started))
    try:
        async with asyncio.timeout(20):
            await started.wait()
        speaker.set_routes(routes)
        await wait_until(lambda: bool(peer.prefix_events(str(v4)) and peer.prefix_events(str(v6))),
                         timeout=20, what="both VIPs announced to the peer")
        assert speaker.status()["exabgp_errors"] == 0
        kind, update6 = peer.prefix_events(str(v6))[0]
        assert kind == "announce" and "2001:db8::a" in update6.next_hops
        kind, update4 = peer.prefix_events(str(v4))[0]
        assert kind == "announce" and "127.0.0.1" in update4.next_hops
        for update in (update4, update6):
            assert update.communities == ("65100:1",)
            assert update.large_communities == ("65100:1:2",)
            # Two-octet AS specific route target (RFC 4360 section 4): type 0x00, subtype 0x02.
            assert update.extended_communities == (bytes([0, 2]) + (65100).to_bytes(2, "big")
                                                   + (7).to_bytes(4, "big"),)
        speaker.set_routes({v4: routes[v4]})
        await wait_until(lambda: [k for k, _ in peer.prefix_events(str(v6))][-1] == "withdraw",
                         timeout=20, what="the IPv6 VIP withdrawn at the peer")
        assert [k for k, _ in peer.prefix_events(str(v4))] == ["announce"]
        async with asyncio.timeout(20):
            await speaker.wait_synced()
        assert speaker.status()["exabgp_errors"] == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await peer.stop()
