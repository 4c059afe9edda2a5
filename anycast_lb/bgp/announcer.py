"""The ExaBGP API process: the one writer of ExaBGP's API (its stdin is our stdout).

ExaBGP starts it from the generated ``process`` stanza::

    python -m anycast_lb.bgp.announcer --socket PATH --node-timeout 0.6 --refresh 30

It connects to the node's UNIX socket at PATH (retrying every 50-500 ms
while the node is not there), receives the desired route set
(:mod:`anycast_lb.bgp.wire` has the protocol) and writes the
``announce``/``withdraw`` lines (:mod:`anycast_lb.bgp.render`) that take
ExaBGP there: one line, flush, wait for ExaBGP's ``done`` on stdin, next
line. ExaBGP's neighbor-changes messages are relayed to the node.

Liveness: with nothing else to write for ``PROBE_INTERVAL`` seconds, it
writes ``version`` (answered by ExaBGP 4.2 and 5.x alike, changes nothing);
every answer ExaBGP gives is relayed to the node as ``alive`` (at most one
every ``ALIVE_MIN_GAP`` s). A stopped or hung ExaBGP answers nothing, a
stopped or hung announcer relays nothing: the node then marks its BGP view
stale (:mod:`anycast_lb.bgp.liveness`).

Safety (the fail-safe direction is always "withdraw"):

- no message from the node for ``--node-timeout`` seconds (a hung node: the
  node's heartbeat runs on its event loop), or the socket closes (a dead
  node): withdraw everything at once, then keep trying to reconnect;
  announce again when routes come back;
- every ``--refresh`` seconds the whole current set is written again (ExaBGP
  ignores an announce it already holds, and re-inserts one it lost);
- SIGTERM or SIGINT: withdraw everything (waiting at most 0.3 s for acks: a
  live ExaBGP acks in milliseconds, and one that is itself shutting down
  has stopped reading and closes its sessions anyway; waiting longer only
  delays ExaBGP's exit, which waits for its helpers), then exit 0;
- stdin closed (ExaBGP gone): exit 0 at once;
- just started, ExaBGP's state unknown (ExaBGP respawns a helper that died,
  and keeps the routes the dead one announced): the first sync writes every
  desired route and withdraws the node's ``withdrawn`` prefixes; a
  withdraw-everything before the node ever spoke is ``clear adj-rib out``.

stdin is drained at all times, node or no node (ExaBGP blocks writing to a
helper that does not read). stdout is never closed and only API lines go
there (ExaBGP respawns a helper whose stdout closes, and gives up after
5 deaths); logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from anycast_lb import log
from anycast_lb.bgp import render, wire
from anycast_lb.bgp.policy import Prefix, Route
from anycast_lb.clock import Clock, SystemClock, wait_event, wait_for
from anycast_lb.errors import AnnouncerError

CONNECT_BACKOFF_MIN = 0.05
CONNECT_BACKOFF_MAX = 0.5
ACK_TIMEOUT = 5.0
"""Seconds to wait for ExaBGP's answer to one line before going on."""
STOP_TIMEOUT = 0.3
"""Seconds to spend withdrawing on SIGTERM."""
PROBE_INTERVAL = 1.0
"""Seconds between liveness probes of ExaBGP while no other line is written."""
PROBE_LINE = "version"
ALIVE_MIN_GAP = 0.25
"""Seconds between two ``alive`` messages to the node (a burst of answers
during a large route change sends one every this often, not one per line)."""
LINE_LIMIT = 16 * 1024 * 1024
CLEAR_ALL = "clear adj-rib out"


class _Exit(Exception):
    """Raised inside the task group to end the announcer."""


class Announcer:
    """State and tasks of one announcer process.

    ``stdin``/``stdout`` are ExaBGP's side; tests may pass their own streams.
    Every timeout (node silence, ExaBGP's answer, refresh, probe, back-off)
    runs on ``clock`` (default: the system clock).
    """

    def __init__(
        self,
        socket_path: Path,
        node_timeout: float,
        refresh: float,
        stdin: asyncio.StreamReader,
        stdout: asyncio.StreamWriter,
        clock: Clock | None = None,
    ) -> None:
        self._clock: Clock = clock or SystemClock()
        self._socket_path = socket_path
        self._node_timeout = node_timeout
        self._refresh = refresh
        self._stdin = stdin
        self._stdout = stdout
        # What ExaBGP should hold; seq None: not from the node (withdraw-all).
        self._target: dict[Prefix, Route] = {}
        self._target_seq: int | None = None
        self._withdrawn: frozenset[Prefix] = frozenset()
        # What ExaBGP holds, as far as we know; None: unknown (just started).
        self._installed: dict[Prefix, Route] | None = None
        self._refresh_due = False
        self._probe_due = False
        self._alive_sent = 0.0
        self._dirty = asyncio.Event()
        self._synced = asyncio.Event()
        self._answers: asyncio.Queue[bool] = asyncio.Queue()
        self._stale_answers = 0
        self._peers: dict[str, str] = {}
        self._node: asyncio.StreamWriter | None = None
        self._acked_seq: int | None = None
        self._generation = 0
        """Bumped on every connect and loss: an ack belongs to one connection."""
        self._stop = asyncio.Event()

    # -- node side ---------------------------------------------------------

    def _send_node(self, data: bytes) -> None:
        node = self._node
        if node is not None and not node.is_closing():
            node.write(data)

    def _withdraw_all(self, reason: str) -> None:
        if self._target or self._target_seq is not None or self._installed is None:
            log.warning("route.withdraw_all", reason=reason, prefixes=len(self._target))
        self._target, self._target_seq = {}, None
        self._dirty.set()

    def _on_routes(self, message: wire.RoutesMessage) -> None:
        if message.routes != self._target or message.seq != self._target_seq:
            self._target = dict(message.routes)
            self._target_seq = message.seq
            self._withdrawn = message.withdrawn
            self._dirty.set()

    async def _node_loop(self) -> None:
        backoff = CONNECT_BACKOFF_MIN
        last_contact = self._clock.monotonic()
        withdrawn = False
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(
                    self._socket_path, limit=LINE_LIMIT
                )
            except OSError as exc:
                if not withdrawn and self._clock.monotonic() - last_contact >= self._node_timeout:
                    self._withdraw_all(f"node unreachable: {exc.strerror or exc}")
                    withdrawn = True
                await self._clock.sleep(backoff)
                backoff = min(backoff * 2, CONNECT_BACKOFF_MAX)
                continue
            backoff = CONNECT_BACKOFF_MIN
            log.event("announcer.node_connected", socket=str(self._socket_path))
            self._node, self._acked_seq = writer, None
            self._generation += 1
            for address, state in self._peers.items():
                self._send_node(wire.encode_peer(address, state))
            reason = "node closed the socket"
            try:
                while True:
                    try:
                        line = await wait_for(self._clock, reader.readline(), self._node_timeout)
                    except TimeoutError:
                        reason = f"no word from the node for {self._node_timeout} s"
                        break
                    if not line.endswith(b"\n"):
                        break
                    last_contact = self._clock.monotonic()
                    withdrawn = False
                    self._on_routes(wire.decode_node_message(line))
            except AnnouncerError as exc:
                reason = f"protocol error: {exc}"
            except (OSError, ValueError) as exc:  # ValueError: line over LINE_LIMIT
                reason = f"socket error: {exc}"
            finally:
                self._node = None
                self._generation += 1
                writer.close()
            log.warning("announcer.node_lost", reason=reason)
            self._withdraw_all(reason)
            withdrawn = True
            last_contact = self._clock.monotonic()
            await self._clock.sleep(CONNECT_BACKOFF_MIN)  # no busy loop on accept-and-close

    # -- ExaBGP side -------------------------------------------------------

    async def _stdin_loop(self) -> None:
        while True:
            try:
                raw = await self._stdin.readline()
            except ValueError:  # a line over the limit: skip it, keep draining
                continue
            if not raw:
                log.event("announcer.stdin_closed")
                raise _Exit("stdin closed")
            item = wire.classify_exabgp_line(raw.decode("utf-8", "replace"))
            if isinstance(item, wire.ExaAnswer):
                self._relay_alive()
                if self._stale_answers:
                    self._stale_answers -= 1
                else:
                    self._answers.put_nowait(item.ok)
            elif isinstance(item, wire.PeerMessage):
                log.event("bgp.peer", log.INFO if item.state == "up" else log.WARNING,
                          address=item.address, state=item.state)
                self._peers[item.address] = item.state
                self._send_node(wire.encode_peer(item.address, item.state))
            elif isinstance(item, wire.ExaShutdown):
                log.event("announcer.exabgp_shutdown")

    def _relay_alive(self) -> None:
        now = self._clock.monotonic()
        if self._node is not None and now - self._alive_sent >= ALIVE_MIN_GAP:
            self._alive_sent = now
            self._send_node(wire.encode_alive())

    async def _command(self, line: str) -> bool:
        """Write one API line, wait for ExaBGP's answer; True if ``done``."""
        self._stdout.write(line.encode("ascii") + b"\n")
        await self._stdout.drain()
        try:
            ok = await wait_for(self._clock, self._answers.get(), ACK_TIMEOUT)
        except TimeoutError:
            self._stale_answers += 1
            log.warning("announcer.ack_timeout", line=line, timeout_s=ACK_TIMEOUT)
            return False
        if line == PROBE_LINE:
            return ok
        if ok:
            # A withdraw (or clearing every route) is a warning, an announce info.
            if line == CLEAR_ALL:
                log.warning("route.clear", line=line)
            elif line.startswith("withdraw"):
                log.warning("route.withdraw", line=line)
            else:
                log.event("route.announce", line=line)
        else:
            log.error("announcer.command_error", line=line)
        return ok

    def _plan(self) -> tuple[list[str], dict[Prefix, Route]]:
        target = dict(self._target)
        installed = self._installed
        if installed is None:
            if self._target_seq is None:
                return [CLEAR_ALL], target
            lines = [render.withdraw_line(p) for p in sorted(self._withdrawn, key=_key)]
            return lines + render.full(target), target
        if self._refresh_due:
            gone = [render.withdraw_line(p) for p in sorted(set(installed) - set(target), key=_key)]
            return gone + render.full(target), target
        return render.diff(installed, target), target

    async def _drive_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            seq, generation = self._target_seq, self._generation
            refresh, probe = self._refresh_due, self._probe_due
            lines, target = self._plan()
            self._refresh_due = self._probe_due = False
            if probe and not lines:  # any other line's answer proves as much
                lines = [PROBE_LINE]
            ok = True
            for line in lines:
                ok = await self._command(line) and ok
            self._installed = target
            if refresh:
                log.debug("announcer.refresh", routes=len(target))
            current = seq == self._target_seq and generation == self._generation
            if seq is not None and seq != self._acked_seq and current:
                self._acked_seq = seq
                self._send_node(wire.encode_ack(seq, ok))
            if not self._dirty.is_set():
                self._synced.set()

    async def _refresh_loop(self) -> None:
        while True:
            await self._clock.sleep(self._refresh)
            self._refresh_due = True
            self._dirty.set()

    async def _probe_loop(self) -> None:
        while True:
            await self._clock.sleep(PROBE_INTERVAL)
            self._probe_due = True
            self._dirty.set()

    async def _stop_watch(self, node_task: asyncio.Task[None]) -> None:
        await self._stop.wait()
        log.event("announcer.stopping")
        node_task.cancel()
        self._synced.clear()
        self._withdraw_all("stopping")
        if not await wait_event(self._clock, self._synced, STOP_TIMEOUT):
            log.warning("announcer.stop_timeout", timeout_s=STOP_TIMEOUT)
        raise _Exit("stopped")

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Run until SIGTERM handling finishes or stdin closes."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._stdin_loop())
                tg.create_task(self._drive_loop())
                tg.create_task(self._refresh_loop())
                tg.create_task(self._probe_loop())
                node_task = tg.create_task(self._node_loop())
                tg.create_task(self._stop_watch(node_task))
        except* _Exit:
            pass
        except* (BrokenPipeError, ConnectionResetError):
            log.event("announcer.stdout_closed")


def _key(prefix: Prefix) -> tuple[int, int, int]:
    return (prefix.version, int(prefix.network_address), prefix.prefixlen)


async def _main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    # Our own handles on fds 0 and 1; Python's sys.stdout is pointed at
    # stderr so that a stray print() can never inject an API command.
    stdin_file = os.fdopen(0, "rb", buffering=0, closefd=False)
    stdout_file = os.fdopen(1, "wb", buffering=0, closefd=False)
    sys.stdout = sys.stderr
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin_file)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, stdout_file
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    announcer = Announcer(args.socket, args.node_timeout, args.refresh, reader, writer)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, announcer.request_stop)
    await announcer.run()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m anycast_lb.bgp.announcer",
        description="anycast-lb ExaBGP API process (run by ExaBGP, not by hand)",
    )
    parser.add_argument("--socket", type=Path, required=True, help="node's UNIX socket")
    parser.add_argument("--node-timeout", type=float, default=0.6,
                        help="seconds without word from the node before withdrawing all")
    parser.add_argument("--refresh", type=float, default=30.0,
                        help="seconds between full re-announcements")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if not 0 < args.node_timeout <= 3600 or not 0 < args.refresh <= 86400:
        parser.error("--node-timeout and --refresh must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log.setup(args.log_level)
    log.event("announcer.start", pid=os.getpid(), socket=str(args.socket),
              node_timeout_s=args.node_timeout, refresh_s=args.refresh)
    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        pass
    log.event("announcer.exit", pid=os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
