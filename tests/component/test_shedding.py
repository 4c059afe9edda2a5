"""Load shedding on 127.0.0.1: floods past the caps are refused and counted,
while health checks, a legitimate flow and a fresh TCP connection keep
working (docs/limits.md)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from anycast_lb.config import ForwardingConfig, parse_config
from anycast_lb.forward.relay import RelayForwarder, RelayLoop
from anycast_lb.forward.tcp import TcpForwarder
from anycast_lb.forward.workers import ServiceCounters
from anycast_lb.limits import Slots
from anycast_lb.node import Node
from anycast_lb.pool import Pool
from tests.component.backends import TcpNameEcho, UdpNameEcho, tcp_request, udp_request
from tests.component.nodes import node_running
from tests.component.test_tcp_forwarder import LineBackend, service_for
from tests.waiting import wait_until

DEADLINE = 5.0


@pytest.fixture(params=["asyncio", "relay"])
async def capped(request: pytest.FixtureRequest
                 ) -> AsyncIterator[tuple[TcpForwarder | RelayForwarder, tuple[str, int]]]:
    """A forwarder capped at 20 connections in front of a line echo backend."""
    backend = LineBackend("b1")
    pool = Pool(service_for([await backend.start()]))
    for b in pool.backends:
        pool.set_up(b.key, True)
    relay = None
    fwd: TcpForwarder | RelayForwarder
    if request.param == "relay":
        relay = RelayLoop(ForwardingConfig(), max_connections=20)
        relay.start()
        fwd = RelayForwarder(pool.service, pool, relay, "127.0.0.1", 0)
    else:
        fwd = TcpForwarder(pool.service, pool, "127.0.0.1", 0, slots=Slots(20))
    address = await fwd.start()
    try:
        yield fwd, address
    finally:
        fwd.stop_accepting()
        fwd.abort_all()
        await fwd.wait_idle(DEADLINE)
        await backend.close()
        if relay is not None:
            relay.stop()


async def open_idle(address: tuple[str, int]
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """An idle client connection, or None when the forwarder's reset came
    before the client saw its handshake complete."""
    try:
        return await asyncio.open_connection(*address)
    except ConnectionResetError:
        return None


async def test_tcp_flood_past_the_cap_is_reset_and_counted(
        capped: tuple[TcpForwarder | RelayForwarder, tuple[str, int]]) -> None:
    fwd, address = capped
    attempts = [await open_idle(address) for _ in range(60)]  # idle, 3x the cap
    flood = [c for c in attempts if c is not None]
    try:
        await wait_until(lambda: fwd.refused()["cap"] == 40, what="40 refusals at the cap")
        assert fwd.active == 20 and fwd.accepted == 20
        # The 20 admitted are relayed; the 40 past the cap were reset at
        # once, not left waiting.
        served = 0
        for reader, writer in flood:
            writer.write(b"still here\n")
            try:
                async with asyncio.timeout(DEADLINE):
                    line = await reader.readline()
            except ConnectionResetError:
                line = b""
            served += line == b"b1:still here\n"
            assert line in (b"b1:still here\n", b"")
        assert served == 20
    finally:
        for _, writer in flood:
            writer.close()
    await wait_until(lambda: fwd.active == 0, what="the flood's connections to close")
    reader, writer = await asyncio.open_connection(*address)  # a legitimate client after it
    try:
        writer.write(b"hello\n")
        async with asyncio.timeout(DEADLINE):
            assert await reader.readline() == b"b1:hello\n"
    finally:
        writer.close()
    assert fwd.refused()["cap"] == 40 and fwd.refused()["descriptors"] == 0


UDP_CAP = 45
PER_SOURCE = 10
FLOOD_SOURCES = [f"127.0.0.{i}" for i in range(2, 7)]
SOCKETS_PER_SOURCE = 50
ROUNDS = 8  # 5 sources x 50 sockets x 8 rounds = 2,000 datagrams


async def test_udp_burst_past_the_caps_leaves_health_checks_and_tcp_working() -> None:
    web, dns = TcpNameEcho("web1"), UdpNameEcho("dns1")
    web_port, dns_port = await web.start(), await dns.start()
    config = parse_config({
        "api": {"listen": "127.0.0.1:0"},
        "services": [
            {"name": "web", "vip": "127.0.0.1", "port": 1, "protocol": "tcp",
             "backends": [{"address": "127.0.0.1", "port": web_port}],
             # fall 1: a single failed check during the flood would show
             "health": {"kind": "tcp", "interval": 0.1, "fast_interval": 0.05,
                        "timeout": 0.1, "rise": 1, "fall": 1}},
            {"name": "dns", "vip": "127.0.0.1", "port": 1, "protocol": "udp",
             "max_flows": UDP_CAP, "max_flows_per_source": PER_SOURCE,
             # no sweep during the test: every admitted flow stays active
             "idle_timeout": 600,
             "backends": [{"address": "127.0.0.1", "port": dns_port}],
             "health": {"kind": "none", "rise": 1}},
        ],
    })
    node = Node(config, bind_overrides={"web": ("127.0.0.1", 0), "dns": ("127.0.0.1", 0)},
                api_listen=("127.0.0.1", 0), check_jitter=False)
    flood: list[socket.socket] = []
    try:
        async with node_running(node):
            web_backend = node.pools["web"].backends[0]
            await wait_until(lambda: web_backend.up, what="web backend up")
            udp_port = node.service_addresses["dns"][1]
            tcp_port = node.service_addresses["web"][1]
            udp = node.forwarders["dns"]
            assert (await udp_request(udp_port, b"before"))[0] == b"dns1:before"
            legit = await loop_client(udp_port)
            assert await legit.ask(b"1") == b"dns1:1"
            for host in FLOOD_SOURCES:
                for _ in range(SOCKETS_PER_SOURCE):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.bind((host, 0))
                    sock.setblocking(False)
                    flood.append(sock)
            checks_before = web_backend.last_check
            sent = asked = 0
            dns_backend = node.pools["dns"].backends[0]
            forwarded_before = dns_backend.packets_in

            def processed() -> int:
                refused = udp.refused()  # type: ignore[attr-defined]
                return (dns_backend.packets_in - forwarded_before
                        + refused["cap"] + refused["source_cap"])

            for _ in range(ROUNDS):
                for i in range(0, len(flood), SOCKETS_PER_SOURCE):
                    for sock in flood[i:i + SOCKETS_PER_SOURCE]:
                        sock.sendto(b"flood", ("127.0.0.1", udp_port))
                    sent += SOCKETS_PER_SOURCE
                    # Paced by the forwarder: the next 50 go once these are handled.
                    await wait_until(lambda: processed() == sent + asked, what="the burst handled")
                # Meanwhile: the legitimate flow, a fresh TCP connection, health.
                assert await legit.ask(b"2") == b"dns1:2"
                asked += 1
                assert await tcp_request(tcp_port) == ("web1", b"ping\n")
                assert web_backend.up and node.readiness()[0]
            assert sent == 2000
            # Two flows from before the flood (127.0.0.1 and .9); 4 sources
            # fill their share (40 flows) and the 5th takes 3 more, up to the
            # cap of 45. Every other datagram of the flood was refused, each
            # round: 40 per full source, 47 of the 5th's at the cap.
            refused = udp.refused()  # type: ignore[attr-defined]
            assert udp.active == UDP_CAP
            assert refused["source_cap"] == ROUNDS * 4 * (SOCKETS_PER_SOURCE - PER_SOURCE)
            assert refused["cap"] == ROUNDS * (SOCKETS_PER_SOURCE - 3)
            assert refused["descriptors"] == 0
            assert udp.evicted == 0  # type: ignore[attr-defined]
            # Health checks ran through the flood and never failed (fall 1).
            assert web_backend.last_check is not None and web_backend.last_check != checks_before
            assert web_backend.up
            async with aiohttp.ClientSession() as session:
                assert node.api_address is not None
                base = f"http://127.0.0.1:{node.api_address[1]}"
                async with session.get(f"{base}/metrics") as response:
                    metrics = await response.text()
                async with session.get(f"{base}/status") as response:
                    status = await response.json()
            assert (f'anycast_lb_flows_refused_total{{reason="cap",service="dns"}} '
                    f'{float(refused["cap"])}') in metrics
            assert (f'anycast_lb_flows_refused_total{{reason="source_cap",service="dns"}} '
                    f'{float(refused["source_cap"])}') in metrics
            assert f'anycast_lb_udp_flow_cap{{service="dns"}} {float(UDP_CAP)}' in metrics
            assert "anycast_lb_descriptor_limit " in metrics
            dns_status = next(s for s in status["services"] if s["name"] == "dns")
            assert dns_status["refused"]["cap"] == refused["cap"]
            assert status["limits"]["udp_flows"]["dns"] == UDP_CAP
            assert status["limits"]["reserve"]["total"] > 0
            legit.close()
    finally:
        for sock in flood:
            sock.close()
        await web.stop()
        dns.stop()


class LoopClient(asyncio.DatagramProtocol):
    """A long-lived UDP client flow (one socket, many requests)."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.replies.put_nowait(data)

    async def ask(self, payload: bytes) -> bytes:
        assert self.transport is not None
        self.transport.sendto(payload)
        async with asyncio.timeout(DEADLINE):
            return await self.replies.get()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def loop_client(port: int) -> LoopClient:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(
        LoopClient, local_addr=("127.0.0.9", 0), remote_addr=("127.0.0.1", port))
    return protocol


REPO = Path(__file__).resolve().parents[2]


class Child:
    """``tests.component.nofile_child``: a forwarder whose process the test
    runs out of descriptors."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr = bytearray()
        assert proc.stderr is not None
        self._drain = asyncio.create_task(self._read_stderr(proc.stderr))
        self.port = 0

    @classmethod
    async def start(cls, engine: str, backend_port: int) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.component.nofile_child", engine, str(backend_port),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=REPO)
        child = cls(proc)
        child.port = int((await child.answer())["port"])
        return child

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.stderr += chunk

    async def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(DEADLINE):
            line = await self.proc.stdout.readline()
        assert line, f"the child ended: {self.stderr.decode(errors='replace')}"
        result: dict[str, Any] = json.loads(line)
        return result

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        return await self.answer()

    def cpu_s(self) -> float:
        """utime + stime of the child so far (s), from /proc/PID/stat."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def lines(self, event: str) -> int:
        return sum(1 for line in self.stderr.decode(errors="replace").splitlines()
                   if f"event={event} " in line + " ")

    async def close(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                async with asyncio.timeout(DEADLINE):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._drain


@pytest.fixture(params=["asyncio", "relay"])
async def child(request: pytest.FixtureRequest) -> AsyncIterator[Child]:
    backend = LineBackend("b1")
    _, port = await backend.start()
    child = await Child.start(request.param, port)
    try:
        yield child
    finally:
        await child.close()
        await backend.close()


async def test_accept_pauses_on_emfile_logs_a_bounded_number_of_lines_and_recovers(
        child: Child) -> None:
    assert (await child.ask("fill"))["held"] > 0
    start, cpu_start = time.monotonic(), child.cpu_s()
    # Handshakes complete in the kernel; the child cannot accept them.
    clients = [await asyncio.open_connection("127.0.0.1", child.port) for _ in range(5)]
    try:
        async def paused_often() -> bool:
            return int((await child.ask("report"))["pauses"]) >= 5

        await wait_until(paused_often, timeout=DEADLINE, interval=0.05,
                         what="five accept pauses (0.05 + 0.1 + 0.2 + 0.4 s of back-off)")
        elapsed, cpu = time.monotonic() - start, child.cpu_s() - cpu_start
        # Paused, not spinning: a retry loop on EMFILE burns a whole core.
        assert cpu < 0.5 * elapsed, f"{cpu:.2f} s of CPU in {elapsed:.2f} s"
        await child.ask("free")
        for i, (reader, writer) in enumerate(clients):  # each is served once resumed
            writer.write(b"%d\n" % i)
            async with asyncio.timeout(DEADLINE):
                assert await reader.readline() == b"b1:%d\n" % i
        report = await child.ask("report")
        assert report["accepted"] == 5 and report["refused"]["descriptors"] == 0
        pauses = int(report["pauses"])
    finally:
        for _, writer in clients:
            writer.close()
    elapsed = time.monotonic() - start
    await child.close()
    lines = child.lines("forward.accept_paused")
    # One line per second at most (the first at once), each with a count.
    assert 1 <= lines <= elapsed + 1, f"{lines} lines in {elapsed:.2f} s"
    assert pauses <= 5 + elapsed  # back-off doubles to 1 s, not a retry per wake-up
    assert "suppressed=" in child.stderr.decode()


async def test_no_leak_when_the_backend_socket_cannot_be_opened(child: Child) -> None:
    await child.ask("fill-but-one")  # accept takes the last descriptor; socket() fails
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", child.port)
    except ConnectionResetError:
        pass  # reset before the handshake was seen complete: refused all the same
    else:
        try:
            async with asyncio.timeout(DEADLINE):  # reset at once, not after an idle sweep
                assert await reader.read() == b""
        except ConnectionResetError:
            pass
        finally:
            writer.close()

    async def refused() -> bool:
        report = await child.ask("report")
        return bool(report["refused"]["descriptors"] == 1 and report["active"] == 0)

    await wait_until(refused, interval=0.05, what="one refusal for descriptors, nothing held")
    await child.ask("free")
    reader, writer = await asyncio.open_connection("127.0.0.1", child.port)
    try:
        writer.write(b"after\n")
        async with asyncio.timeout(DEADLINE):
            assert await reader.readline() == b"b1:after\n"
    finally:
        writer.close()
    await child.close()
    assert child.lines("forward.refused") == 1


# -- per-source TCP cap ----------------------------------------------------------

TCP_CAP = 20
TCP_PER_SOURCE = TCP_CAP // 4
ATTACKER, LEGIT = "127.0.0.2", "127.0.0.3"


@pytest.fixture(params=["asyncio", "relay", "relay-copy"])
async def per_source(request: pytest.FixtureRequest
                     ) -> AsyncIterator[tuple[TcpForwarder | RelayForwarder, Slots,
                                              tuple[str, int]]]:
    """A forwarder capped at 20 connections, 5 per source, before a line echo."""
    backend = LineBackend("b1")
    pool = Pool(service_for([await backend.start()]))
    for b in pool.backends:
        pool.set_up(b.key, True)
    relay = None
    fwd: TcpForwarder | RelayForwarder
    if request.param.startswith("relay"):
        relay = RelayLoop(ForwardingConfig(splice=request.param == "relay"),
                          max_connections=TCP_CAP, max_connections_per_source=TCP_PER_SOURCE)
        relay.start()
        fwd = RelayForwarder(pool.service, pool, relay, "127.0.0.1", 0)
        slots = relay.slots
    else:
        slots = Slots(TCP_CAP, TCP_PER_SOURCE)
        fwd = TcpForwarder(pool.service, pool, "127.0.0.1", 0, slots=slots)
    address = await fwd.start()
    try:
        yield fwd, slots, address
    finally:
        fwd.stop_accepting()
        fwd.abort_all()
        await fwd.wait_idle(DEADLINE)
        await backend.close()
        if relay is not None:
            relay.stop()


async def open_from(host: str, address: tuple[str, int]
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A client connection from ``host``, or None when the forwarder's reset
    came before the client saw its handshake complete."""
    try:
        return await asyncio.open_connection(*address, local_addr=(host, 0))
    except ConnectionResetError:
        return None


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: bytes) -> bytes:
    """The line the backend sends back for ``text``; b"" when reset."""
    writer.write(text + b"\n")
    try:
        async with asyncio.timeout(DEADLINE):
            return await reader.readline()
    except ConnectionResetError:
        return b""


async def test_one_source_holds_its_share_and_others_still_connect(
        per_source: tuple[TcpForwarder | RelayForwarder, Slots, tuple[str, int]]) -> None:
    fwd, slots, address = per_source
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    legit_served = 0
    try:
        # The attacker opens idle connections up to twice the cap; after
        # every 8th, the legitimate client makes a fresh connection and
        # gets its echo.
        for i in range(2 * TCP_CAP):
            conn = await open_from(ATTACKER, address)
            if conn is not None:
                flood.append(conn)
            if i % 8 == 7:
                legit = await open_from(LEGIT, address)
                assert legit is not None, "the legitimate client was reset"
                reader, writer = legit
                try:
                    assert await echo(reader, writer, b"legit %d" % i) == b"b1:legit %d\n" % i
                    legit_served += 1
                finally:
                    writer.close()
        refused_excess = 2 * TCP_CAP - TCP_PER_SOURCE
        await wait_until(lambda: fwd.refused()["source_cap"] == refused_excess,
                         what=f"{refused_excess} refusals past the source's share")
        assert legit_served == 5
        # The attacker's share is relayed; its excess was reset at once.
        answers = [await echo(r, w, b"flood") for r, w in flood]
        assert answers.count(b"b1:flood\n") == TCP_PER_SOURCE
        assert set(answers) <= {b"b1:flood\n", b""}
        assert fwd.refused() == {"cap": 0, "source_cap": refused_excess, "descriptors": 0,
                                 "no_backend": 0, "connect_failed": 0}
        assert fwd.accepted == TCP_PER_SOURCE + legit_served
        assert slots.sources is not None and slots.sources.held(ATTACKER) == TCP_PER_SOURCE
    finally:
        for _, writer in flood:
            writer.close()
    # Every connection ended: each released exactly once.
    await wait_until(lambda: fwd.active == 0, what="every connection to close")
    await wait_until(lambda: slots.used == 0, what="every slot given back")
    assert slots.sources is not None and len(slots.sources) == 0
    # The same source may connect again, up to its share.
    again = [await open_from(ATTACKER, address) for _ in range(TCP_PER_SOURCE + 1)]
    try:
        answers = [await echo(*c, b"again") if c is not None else b"" for c in again]
        assert answers.count(b"b1:again\n") == TCP_PER_SOURCE
        await wait_until(lambda: fwd.refused()["source_cap"] == 2 * TCP_CAP - TCP_PER_SOURCE + 1,
                         what="one more refusal past the share")
    finally:
        for c in again:
            if c is not None:
                c[1].close()
    await wait_until(lambda: slots.used == 0, what="every slot given back")
    assert len(slots.sources) == 0


async def test_the_cap_still_bounds_many_sources(
        per_source: tuple[TcpForwarder | RelayForwarder, Slots, tuple[str, int]]) -> None:
    """Four sources at their share fill the cap; a fifth is refused as ``cap``."""
    fwd, slots, address = per_source
    conns = [await open_from(f"127.0.0.{10 + i // TCP_PER_SOURCE}", address)
             for i in range(TCP_CAP)]
    late = await open_from("127.0.0.20", address)
    try:
        assert all(c is not None for c in conns)
        await wait_until(lambda: fwd.refused()["cap"] == 1, what="the fifth source refused")
        assert fwd.accepted == TCP_CAP and fwd.refused()["source_cap"] == 0
        if late is not None:
            assert await echo(*late, b"late") == b""
        assert slots.sources is not None and slots.sources.held("127.0.0.20") == 0
    finally:
        for c in [*conns, late]:
            if c is not None:
                c[1].close()
    await wait_until(lambda: slots.used == 0, what="every slot given back")


async def first_line(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> bytes:
    """The first line a connection receives; b"" when it was refused."""
    if conn is None:
        return b""
    try:
        async with asyncio.timeout(DEADLINE):
            return await conn[0].readline()
    except ConnectionResetError:
        return b""


@pytest.mark.parametrize(("engine", "workers"), [("relay", 1), ("asyncio", 1), ("relay", 2)])
async def test_node_applies_the_per_source_share_and_shows_it(engine: str, workers: int) -> None:
    """The node's budget reaches the engine (and each relay worker): 8
    connections, a quarter (2) per source by default, per process;
    refusals and the cap in /metrics and /status."""
    web = TcpNameEcho("web1")
    web_port = await web.start()
    config = parse_config({
        "api": {"listen": "127.0.0.1:0"},
        "forwarding": {"engine": engine, "workers": workers, "max_tcp_connections": 8},
        "services": [
            {"name": "web", "vip": "127.0.0.1", "port": 1, "protocol": "tcp",
             "backends": [{"address": "127.0.0.1", "port": web_port}],
             "health": {"kind": "none", "rise": 1}}],
    })
    node = Node(config, bind_overrides={"web": ("127.0.0.1", 0)}, api_listen=("127.0.0.1", 0),
                check_jitter=False)
    # With 2 processes, 30 connections: SO_REUSEPORT hashes each 4-tuple,
    # so each process gets at least its 2 (all but 62 in 2**30 spreads).
    attempts = 6 if workers == 1 else 30
    admitted = 2 * workers
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = []
    try:
        async with node_running(node):
            assert node.budget.tcp_connections_per_source == 2
            await wait_until(lambda: node.pools["web"].backends[0].up, what="web backend up")
            port = node.service_addresses["web"][1]
            group = node.workers
            if workers > 1:  # each worker serves once it knows the backend is up
                assert group is not None
                await wait_until(lambda: all(
                    w.services.get("web", ServiceCounters()).up_backends == 1
                    for w in group.workers), what="the backend up in the worker")
            conns = [await open_from(ATTACKER, ("127.0.0.1", port)) for _ in range(attempts)]
            lines = [await first_line(c) for c in conns]
            assert lines.count(b"web1\n") == admitted
            assert await tcp_request(port) == ("web1", b"ping\n")  # from 127.0.0.1
            assert node.api_address is not None
            base = f"http://127.0.0.1:{node.api_address[1]}"
            expected = (f'anycast_lb_flows_refused_total{{reason="source_cap",service="web"}} '
                        f"{float(attempts - admitted)}")
            async with aiohttp.ClientSession() as session:
                async def counted() -> bool:
                    async with session.get(f"{base}/metrics") as response:
                        return expected in await response.text()

                # Relay workers report their counters to the node periodically.
                await wait_until(counted, interval=0.1, what=expected)
                async with session.get(f"{base}/metrics") as response:
                    metrics = await response.text()
                async with session.get(f"{base}/status") as response:
                    status = await response.json()
            assert "anycast_lb_tcp_connections_per_source_cap 2.0" in metrics
            assert status["limits"]["tcp_connections_per_source"] == 2
    finally:
        for c in conns:
            if c is not None:
                c[1].close()
        await web.stop()
