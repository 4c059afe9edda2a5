"""The real announcer process between a fake ExaBGP (its stdin/stdout) and a
real UNIX-socket node side written here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from anycast_lb.bgp.announcer import Announcer
from anycast_lb.clock import FakeClock
from tests.waiting import wait_until

# Captured from ExaBGP 5.0.15's own JSON encoder (exabgp.reactor.api.response.json).
PEER_UP = (
    '{ "exabgp": "5.0.0", "time": 1795294985.340852, "host" : "vm", "pid" : 8379, '
    '"ppid" : 8377, "counter": 1, "type": "state", "neighbor": { "address": { "local": '
    '"203.0.113.10", "peer": "203.0.113.5" }, "asn": { "local": 65100, "peer": 65000 }, '
    '"router-id": "203.0.113.10" , "state": "up" } }'
)
SHUTDOWN = (
    '{ "exabgp": "5.0.0", "time": 1795294985.340975, "host" : "vm", "pid" : 8379, '
    '"ppid" : 8377, "type": "notification", "notification": "shutdown" }'
)

ROUTE = {"prefix": "198.51.100.10/32", "med": 100, "communities": ["65100:1"],
         "as_path_prepend": 0, "local_as": 65100}
ROUTE6 = {"prefix": "2001:db8::10/128", "med": 100, "communities": [],
          "as_path_prepend": 2, "local_as": 65100}
ANNOUNCE = "announce route 198.51.100.10/32 next-hop self med 100 community [65100:1]"
ANNOUNCE6 = "announce route 2001:db8::10/128 next-hop self med 100 as-path [65100 65100]"
WITHDRAW = "withdraw route 198.51.100.10/32"
WITHDRAW6 = "withdraw route 2001:db8::10/128"


@dataclass
class FakeExaBGP:
    """ExaBGP's side of an API process: reads its stdout, answers ``done``."""

    proc: asyncio.subprocess.Process
    lines: list[tuple[float, str]] = field(default_factory=list)
    answer: bool = True
    log: list[str] = field(default_factory=list)
    """The announcer's stderr (its log lines), read as it writes them."""

    async def pump_log(self) -> None:
        assert self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            self.log.append(raw.decode().rstrip("\n"))

    def up(self) -> bool:
        """Its interpreter started and imported the announcer (its first log
        line): from here on its own clock runs, connecting within ms."""
        return any("announcer.start" in line for line in self.log)

    async def pump(self) -> None:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        while raw := await self.proc.stdout.readline():
            self.lines.append((time.monotonic(), raw.decode().rstrip("\n")))
            if self.answer and not self.proc.stdin.is_closing():
                self.proc.stdin.write(b"done\n")
                # Other JSON traffic in between acks must not confuse it.
                self.proc.stdin.write(b'{ "exabgp": "5.0.0", "type": "keepalive" }\n')
                await self.proc.stdin.drain()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")

    def texts(self) -> list[str]:
        """Every line written but the liveness probes."""
        return [t for _, t in self.lines if t != "version"]

    def since(self, index: int) -> list[str]:
        return self.texts()[index:]


class FakeNode:
    """The node's side of the socket, with the accepted connections queued."""

    def __init__(self) -> None:
        self.conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.writers: list[asyncio.StreamWriter] = []

    def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.conns.put_nowait((reader, writer))

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


def routes_line(seq: int, *routes: dict[str, object], withdrawn: tuple[str, ...] = ()) -> bytes:
    return (json.dumps({"type": "routes", "seq": seq, "routes": list(routes),
                        "withdrawn": list(withdrawn)}) + "\n").encode()


async def read_message(reader: asyncio.StreamReader, kind: str, timeout: float = 5.0
                       ) -> dict[str, object]:
    async with asyncio.timeout(timeout):
        while True:
            line = await reader.readline()
            assert line, "announcer closed the socket"
            message: dict[str, object] = json.loads(line)
            if message["type"] == kind:
                return message


class Heartbeat:
    """Sends the same routes message every 0.1 s while running."""

    def __init__(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        self.writer, self.data = writer, data
        self.last = 0.0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        for _ in range(600):  # bounded: at most 60 s of heartbeats
            self.writer.write(self.data)
            self.last = time.monotonic()
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


@dataclass
class Rig:
    exa: FakeExaBGP
    node: FakeNode
    sock: Path
    server: asyncio.Server | None


async def start(tmp_path: Path, node_timeout: float = 0.6, refresh: float = 30.0,
                listen: bool = True) -> AsyncIterator[Rig]:
    sock = tmp_path / "announcer.sock"
    node = FakeNode()
    server = await asyncio.start_unix_server(node.on_connect, path=str(sock)) if listen else None
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "anycast_lb.bgp.announcer", "--socket", str(sock),
        "--node-timeout", str(node_timeout), "--refresh", str(refresh),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    exa = FakeExaBGP(proc)
    pumps = [asyncio.create_task(exa.pump()), asyncio.create_task(exa.pump_log())]
    try:
        # The tests' deadlines (connect, ack, withdraw) time the announcer,
        # not the start of a Python interpreter, which a loaded machine can
        # stretch to seconds: they start once it is up. The bound here only
        # catches a process that never comes up.
        await wait_until(lambda: exa.up() or proc.returncode is not None, timeout=60,
                         what="the announcer's announcer.start log line")
        assert exa.up(), f"the announcer exited with {proc.returncode}: {exa.log}"
        yield Rig(exa, node, sock, server)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        for pump in pumps:
            pump.cancel()
        await node.close()
        if server is not None:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async for r in start(tmp_path):
        yield r


class InProcess:
    """An Announcer in this process on a FakeClock: ExaBGP's side is a real
    pipe (its stdout) and a StreamReader fed here (its stdin)."""

    def __init__(self, node: FakeNode, clock: FakeClock, stdin: asyncio.StreamReader,
                 stdout: asyncio.StreamReader) -> None:
        self.node, self.clock, self.stdin, self.stdout = node, clock, stdin, stdout
        self.lines: list[str] = []
        self.announcer: Announcer | None = None

    async def pump(self) -> None:
        while raw := await self.stdout.readline():
            self.lines.append(raw.decode().rstrip("\n"))
            self.stdin.feed_data(b"done\n")

    def texts(self) -> list[str]:
        return [t for t in self.lines if t != "version"]

    async def connected(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(5):
            return await self.node.conns.get()

    async def heard(self) -> None:
        """Wait (real time, bounded) until the announcer read what the node wrote."""
        writer = self.node.writers[-1]
        await writer.drain()
        transport = writer.transport
        await wait_until(lambda: transport.get_write_buffer_size() == 0, timeout=3,
                         what="the line sent")
        for _ in range(20):  # let the announcer's tasks run; the clock stays put
            await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def in_process(tmp_path: Path, node_timeout: float = 0.6, refresh: float = 30.0
                     ) -> AsyncIterator[InProcess]:
    sock = tmp_path / "announcer.sock"
    node = FakeNode()
    server = await asyncio.start_unix_server(node.on_connect, path=str(sock))
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    stdout_reader = asyncio.StreamReader()
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdout_reader), os.fdopen(read_fd, "rb", 0))
    write_transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(write_fd, "wb", 0))
    stdout = asyncio.StreamWriter(write_transport, protocol, None, loop)
    ip = InProcess(node, FakeClock(), asyncio.StreamReader(), stdout_reader)
    ip.announcer = Announcer(sock, node_timeout, refresh, ip.stdin, stdout, clock=ip.clock)
    run = asyncio.create_task(ip.announcer.run())
    pump = asyncio.create_task(ip.pump())
    try:
        yield ip
    finally:
        for task in (run, pump):
            task.cancel()
        await asyncio.gather(run, pump, return_exceptions=True)
        write_transport.close()
        read_transport.close()
        await node.close()
        server.close()
        await server.wait_closed()


async def connected(rig: Rig) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(5):
        return await rig.node.conns.get()


async def test_routes_become_announce_lines_and_are_acked(rig: Rig) -> None:
    reader, writer = await connected(rig)
    writer.write(routes_line(1, ROUTE, ROUTE6))
    ack = await read_message(reader, "ack")
    assert ack == {"type": "ack", "seq": 1, "ok": True}
    assert rig.exa.texts() == [ANNOUNCE, ANNOUNCE6]

    # A changed set: only the difference is written, withdraws first.
    changed = dict(ROUTE, med=200)
    writer.write(routes_line(2, changed))
    assert (await read_message(reader, "ack"))["seq"] == 2
    assert rig.exa.since(2) == [
        WITHDRAW6, "announce route 198.51.100.10/32 next-hop self med 200 community [65100:1]",
    ]
    # The same set again (a heartbeat) writes nothing.
    writer.write(routes_line(2, changed))
    writer.write(routes_line(3, changed))
    assert (await read_message(reader, "ack"))["seq"] == 3
    assert len(rig.exa.texts()) == 4


async def test_peer_state_is_relayed_and_replayed_on_reconnect(rig: Rig) -> None:
    reader, writer = await connected(rig)
    rig.exa.send(SHUTDOWN)  # ignored, not a peer message
    rig.exa.send(PEER_UP)
    peer = await read_message(reader, "peer")
    assert peer == {"type": "peer", "address": "203.0.113.5", "state": "up"}
    writer.close()
    reader2, _ = await connected(rig)
    assert await read_message(reader2, "peer") == peer


async def test_hung_node_is_withdrawn_within_node_timeout(tmp_path: Path) -> None:
    async with in_process(tmp_path) as ip:
        reader, writer = await ip.connected()
        writer.write(routes_line(1, ROUTE))
        await read_message(reader, "ack")
        # Heartbeats every 0.1 s keep it announced well past node_timeout (0.6 s).
        for _ in range(10):
            await ip.clock.advance(0.1)
            writer.write(routes_line(1, ROUTE))
            await ip.heard()
        assert WITHDRAW not in ip.texts()
        # The node "hangs": socket open, silent. Withdrawn at node_timeout, not before.
        await ip.clock.advance(0.5)
        assert WITHDRAW not in ip.texts()
        await ip.clock.advance(0.15)
        await wait_until(lambda: WITHDRAW in ip.texts(), timeout=3, what="withdraw")


async def test_closed_socket_withdraws_at_once_and_reconnect_announces(tmp_path: Path) -> None:
    async for rig in start(tmp_path, node_timeout=3.0):
        reader, writer = await connected(rig)
        writer.write(routes_line(1, ROUTE))
        await read_message(reader, "ack")
        closed_at = time.monotonic()
        writer.close()  # the node died
        await wait_until(lambda: WITHDRAW in rig.exa.texts(), timeout=5, what="withdraw")
        withdrawn_at = next(t for t, line in rig.exa.lines if line == WITHDRAW)
        assert withdrawn_at - closed_at < 1.0  # not the 3 s timeout

        reader2, writer2 = await connected(rig)  # the announcer reconnects
        writer2.write(routes_line(1, ROUTE))
        assert (await read_message(reader2, "ack"))["seq"] == 1
        assert rig.exa.texts() == [ANNOUNCE, WITHDRAW, ANNOUNCE]


async def test_node_absent_at_start_clears_everything(tmp_path: Path) -> None:
    # A respawned announcer cannot know what its predecessor announced.
    async for rig in start(tmp_path, listen=False):
        await wait_until(lambda: rig.exa.texts() == ["clear adj-rib out"], timeout=3,
                         what="clear adj-rib out")
        server = await asyncio.start_unix_server(rig.node.on_connect, path=str(rig.sock))
        try:
            reader, writer = await connected(rig)
            writer.write(routes_line(5, ROUTE))
            assert (await read_message(reader, "ack"))["seq"] == 5
            assert rig.exa.texts() == ["clear adj-rib out", ANNOUNCE]
        finally:
            # Since Python 3.12.1 wait_closed() waits for the server's open
            # connections too: close the accepted one first.
            await rig.node.close()
            server.close()
            await server.wait_closed()


async def test_first_sync_withdraws_prefixes_the_node_knows(rig: Rig) -> None:
    reader, writer = await connected(rig)
    writer.write(routes_line(1, ROUTE, withdrawn=("2001:db8::10/128",)))
    await read_message(reader, "ack")
    assert rig.exa.texts() == [WITHDRAW6, ANNOUNCE]


async def test_unsafe_attribute_from_node_withdraws_and_drops_connection(rig: Rig) -> None:
    reader, writer = await connected(rig)
    writer.write(routes_line(1, ROUTE))
    await read_message(reader, "ack")
    bad = dict(ROUTE, communities=["65100:1]\nannounce route 0.0.0.0/0 next-hop self"])
    writer.write(routes_line(2, bad))
    await wait_until(lambda: WITHDRAW in rig.exa.texts(), timeout=3, what="withdraw")
    assert await reader.read() == b""  # the announcer hung up
    assert not any("0.0.0.0/0" in line for line in rig.exa.texts())


async def test_sigterm_withdraws_all_then_exits(rig: Rig) -> None:
    reader, writer = await connected(rig)
    beat = Heartbeat(writer, routes_line(1, ROUTE, ROUTE6))
    await read_message(reader, "ack")
    rig.exa.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(5):
        code = await rig.exa.proc.wait()
    await beat.stop()
    assert code == 0
    assert rig.exa.texts()[-2:] == [WITHDRAW, WITHDRAW6]


async def test_exits_when_exabgp_closes_stdin(rig: Rig) -> None:
    reader, writer = await connected(rig)
    writer.write(routes_line(1, ROUTE))
    await read_message(reader, "ack")
    assert rig.exa.proc.stdin is not None
    rig.exa.proc.stdin.close()
    async with asyncio.timeout(5):
        assert await rig.exa.proc.wait() == 0


async def test_periodic_refresh_rewrites_the_whole_set(tmp_path: Path) -> None:
    async with in_process(tmp_path, refresh=30.0) as ip:
        reader, writer = await ip.connected()
        writer.write(routes_line(1, ROUTE))
        await read_message(reader, "ack")
        assert ip.texts().count(ANNOUNCE) == 1
        for n in (2, 3):
            for _ in range(305):  # a little over 30 s of heartbeats at 0.1 s
                await ip.clock.advance(0.1)
                writer.write(routes_line(1, ROUTE))
                await ip.heard()
            await wait_until(lambda: ip.texts().count(ANNOUNCE) >= n, timeout=3,
                             what=f"refresh {n - 1}")
        assert set(ip.texts()) <= {ANNOUNCE, "clear adj-rib out"}


async def test_keeps_draining_stdin_without_a_node(tmp_path: Path) -> None:
    # ExaBGP blocks writing to a helper that does not read its stdin.
    async for rig in start(tmp_path, listen=False):
        chunk = (PEER_UP + "\n").encode() * 200
        assert rig.exa.proc.stdin is not None
        async with asyncio.timeout(5):
            for _ in range(20):  # ~1 MiB, far beyond a pipe buffer
                rig.exa.proc.stdin.write(chunk)
                await rig.exa.proc.stdin.drain()
        assert rig.exa.proc.returncode is None


async def test_idle_announcer_probes_exabgp_and_relays_alive_only_on_answers(rig: Rig) -> None:
    reader, writer = await connected(rig)
    beat = Heartbeat(writer, routes_line(1, ROUTE))
    assert (await read_message(reader, "ack"))["seq"] == 1
    # Nothing to write: it asks ExaBGP "version" every second and says alive
    # to the node after each answer.
    began = time.monotonic()
    for _ in range(2):
        await read_message(reader, "alive", timeout=3)
    assert time.monotonic() - began < 3
    probes = [line for _, line in rig.exa.lines if line == "version"]
    assert len(probes) >= 1
    assert rig.exa.texts() == [ANNOUNCE]  # probes change no route

    rig.exa.answer = False  # ExaBGP stops answering (hung, stopped)
    await wait_until(lambda: len([1 for _, t in rig.exa.lines if t == "version"]) > len(probes),
                     timeout=3, what="an unanswered probe")
    quiet_from = time.monotonic()
    with pytest.raises(TimeoutError):
        await read_message(reader, "alive", timeout=2.5)
    assert time.monotonic() - quiet_from >= 2.4
    await beat.stop()


def test_the_announcer_process_imports_no_config_models_or_console_renderer() -> None:
    # ExaBGP starts it at every (re)spawn: pydantic's config models and
    # structlog's dev renderer with rich tripled its start-up CPU (0.08 ->
    # 0.27 s), seconds on a loaded machine.
    heavy = ("pydantic", "structlog", "rich")
    code = ("import sys, anycast_lb.bgp.announcer; "
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    assert done.stdout.split() == []
