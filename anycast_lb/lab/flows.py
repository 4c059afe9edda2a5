"""Long-lived flow client, run inside the client namespace.

::

    ip netns exec alb-client python -m anycast_lb.lab.flows --ns alb-client \\
        --vip 198.51.100.10 --port 80 --flows 300 --out flows.json

Each flow is one TCP connection to the VIP's greeting echo service: it reads
the backend's greeting ``BACKEND PEER`` (PEER is the forwarding node's
backend-LAN address, so it names the node that owns the flow), then sends a
line every ``--interval`` s (100 ms) and expects the same line back within
``--hang`` s (1 s). The first failure ends the flow, with its kind:

- ``reset``: the connection was reset (RST);
- ``eof``: the peer closed it (FIN), or a write found it closed;
- ``hang``: no echo within ``--hang`` s. The flow then keeps listening for
  up to ``--late`` s and records a late RST or FIN (``late_kind``,
  ``late_s``), so a slow reset is told apart from a real hang;
- ``bad-echo``: a wrong line came back (a flow answered by another backend).

Between two messages the flow waits on its socket, so a FIN or RST that
arrives unprompted (a killed node's kernel closing its sockets) is seen at
once, not at the next message.

Two ways to open:

- default: every flow is opened first (at most ``OPEN_CONCURRENCY``
  connects at a time); ``started T`` is printed once all are up or failed;
- ``--open-rate R`` (churn): ``started T`` is printed at once and flows are
  opened at R per second while the run lasts, until ``--flows`` are open or
  SIGUSR1 says to stop opening.

T is ``time.monotonic()``, shared by every process on the machine, so a
scenario can time its fault against the flows. SIGTERM or SIGINT ends the
run (flows stop sending and close); so does ``--max-duration`` (counted
from T). Times in the output are seconds from the client's start (``t0``). Refuses to
run outside ``--ns``. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from anycast_lb.errors import UnsafeLab
from anycast_lb.lab.netns import require_namespace
from anycast_lb.lab.traffic import run_to_file

OPEN_CONCURRENCY = 50
MAX_FLOWS = 2000
MAX_DURATION_S = 300.0
CONNECT_TIMEOUT_S = 2.0
MAX_SLOW = 50


@dataclass
class Flow:
    """One long-lived flow; times are seconds from T0 (None: did not happen)."""

    index: int
    connect_s: float = 0.0
    """When the connect started."""
    open_s: float | None = None
    """When the greeting arrived: the flow is established from here on."""
    open_error: str = ""
    backend: str = ""
    peer: str = ""
    port: int = 0
    """The client's own TCP port (the flow's 4-tuple with the VIP and 80)."""
    messages: int = 0
    """Echoes received."""
    last_ok_s: float | None = None
    failed_s: float | None = None
    """When the failure was seen (for a hang: when the echo was overdue)."""
    kind: str = ""
    sent_s: float | None = None
    """When the message that failed was sent."""
    late_kind: str = ""
    late_s: float | None = None
    max_gap_s: float = 0.0
    """Longest time between two echoes received in a row (from the greeting
    for the first): about ``--interval`` while the path is steady; a route
    move shows as the retransmission wait on top of it."""
    max_gap_at_s: float | None = None
    """When that gap ended (its second echo arrived)."""
    slow: list[tuple[float, float]] = field(default_factory=list)
    """(when it ended, gap) of gaps longer than 1.5 ``--interval``, the
    first MAX_SLOW of them: which ones a routing event caused."""


def _kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "hang"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (BrokenPipeError, EOFError, asyncio.IncompleteReadError, RuntimeError)):
        # uvloop raises RuntimeError writing to a transport already closed.
        return "eof"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


class _Closed(EOFError):
    pass


class FlowClient:
    def __init__(self, vip: str, port: int, interval: float, hang: float, late: float) -> None:
        self.vip, self.port = vip, port
        self.interval, self.hang, self.late = interval, hang, late
        self.t0 = time.monotonic()
        self.stop = asyncio.Event()
        self.stop_opening = asyncio.Event()
        self.flows: list[Flow] = []

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    async def open(self, flow: Flow) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        flow.connect_s = self.now()
        writer = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(self.vip, self.port)
                words = (await reader.readline()).decode("ascii", "replace").split()
            if len(words) < 2:
                raise _Closed("no greeting")
        except (OSError, TimeoutError, EOFError, RuntimeError) as exc:
            flow.open_error = "timeout" if isinstance(exc, TimeoutError) else _kind(exc)
            if writer is not None:
                writer.close()
            return None
        flow.backend, flow.peer = words[0], words[1]
        sockname = writer.get_extra_info("sockname")
        flow.port = int(sockname[1]) if sockname else 0
        flow.open_s = self.now()
        return reader, writer

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    line: bytes) -> None:
        writer.write(line)
        async with asyncio.timeout(self.hang):
            got = await reader.readline()
        if not got:
            raise _Closed("eof")
        if got != line:
            raise ValueError("bad echo")

    async def _quiet(self, reader: asyncio.StreamReader, seconds: float) -> None:
        """Wait ``seconds`` on the socket: nothing may arrive (raise on FIN/RST)."""
        try:
            async with asyncio.timeout(seconds):
                got = await reader.readline()
        except TimeoutError:
            return
        raise _Closed("eof") if not got else ValueError("unexpected data")

    async def _late(self, flow: Flow, reader: asyncio.StreamReader) -> None:
        """After a hang: wait up to ``late`` s (or the stop) for a FIN or RST."""
        stop = asyncio.ensure_future(self.stop.wait())
        read = asyncio.ensure_future(reader.read(65536))
        try:
            done, _ = await asyncio.wait({stop, read}, timeout=self.late,
                                         return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                exc = read.exception()
                if exc is not None or not read.result():
                    flow.late_kind = "eof" if exc is None else _kind(exc)
                    flow.late_s = self.now()
        finally:
            for task in (stop, read):
                task.cancel()
            await asyncio.gather(stop, read, return_exceptions=True)

    async def run_flow(self, flow: Flow, gate: asyncio.Semaphore | None = None,
                       settled: asyncio.Event | None = None) -> None:
        """Open ``flow`` (holding ``gate`` while connecting; ``settled`` is set
        once it is up or failed), then exchange messages until it fails or
        the run stops."""
        try:
            if gate is None:
                opened = await self.open(flow)
            else:
                async with gate:
                    opened = await self.open(flow)
        finally:
            if settled is not None:
                settled.set()
        if opened is None:
            return
        reader, writer = opened
        seq = 0
        try:
            while not self.stop.is_set():
                seq += 1
                flow.sent_s = self.now()
                tick = time.monotonic() + self.interval
                try:
                    await self._echo(reader, writer, f"{flow.index}-{seq}\n".encode())
                    flow.messages += 1
                    previous = flow.last_ok_s if flow.last_ok_s is not None else flow.open_s
                    flow.last_ok_s = self.now()
                    gap = flow.last_ok_s - previous if previous is not None else 0.0
                    if gap > flow.max_gap_s:
                        flow.max_gap_s = round(gap, 4)
                        flow.max_gap_at_s = flow.last_ok_s
                    if gap > 1.5 * self.interval and len(flow.slow) < MAX_SLOW:
                        flow.slow.append((flow.last_ok_s, round(gap, 4)))
                    await self._quiet(reader, max(0.0, tick - time.monotonic()))
                except (OSError, TimeoutError, EOFError, ValueError, RuntimeError) as exc:
                    if self.stop.is_set():
                        return  # the run ended while this flow waited: not a failure
                    flow.failed_s = self.now()
                    flow.kind = "bad-echo" if isinstance(exc, ValueError) else _kind(exc)
                    if flow.kind == "hang":
                        await self._late(flow, reader)
                    return
        finally:
            writer.close()

    async def open_all(self, n: int) -> list[asyncio.Task[None]]:
        """Open ``n`` flows (bounded concurrency); return once each is up or failed."""
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)
        self.flows = [Flow(i) for i in range(n)]
        settled = [asyncio.Event() for _ in self.flows]
        tasks = [asyncio.create_task(self.run_flow(f, gate, e))
                 for f, e in zip(self.flows, settled)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in settled)),
                               CONNECT_TIMEOUT_S * (n / OPEN_CONCURRENCY + 2))
        return tasks

    async def open_paced(self, n: int, rate: float) -> list[asyncio.Task[None]]:
        """Open up to ``n`` flows at ``rate`` per second until told to stop."""
        tasks: list[asyncio.Task[None]] = []
        start = time.monotonic()
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(self.stop_opening.wait(), delay)
                except TimeoutError:
                    pass
            if self.stop_opening.is_set() or self.stop.is_set():
                break
            flow = Flow(i)
            self.flows.append(flow)
            tasks.append(asyncio.create_task(self.run_flow(flow)))
        return tasks


async def run(vip: str, port: int, n: int, open_rate: float, interval: float, hang: float,
              late: float, max_duration: float) -> dict[str, Any]:
    client = FlowClient(vip, port, interval, hang, late)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, client.stop.set)
    loop.add_signal_handler(signal.SIGUSR1, client.stop_opening.set)
    tasks: list[asyncio.Task[None]] = []
    if open_rate <= 0:
        tasks = await client.open_all(n)
    ready_s = client.now()
    print(f"started {client.t0 + ready_s:.6f}", flush=True)
    if open_rate > 0:
        opener = asyncio.create_task(client.open_paced(n, open_rate))
    try:
        await asyncio.wait_for(client.stop.wait(), max_duration)
    except TimeoutError:
        client.stop.set()
    client.stop_opening.set()
    if open_rate > 0:
        tasks = await opener
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                           hang + late + CONNECT_TIMEOUT_S + 1.0)
    return {"t0": client.t0, "ready_s": ready_s, "interval": interval, "hang": hang, "late": late,
            "open_rate": open_rate, "flows": [asdict(f) for f in client.flows]}


def main(argv: list[str] | None = None) -> int:
    """JSON written to ``--out``: ``t0`` (monotonic s: the zero of every time
    in the file), ``ready_s`` (when ``started`` was printed), ``interval``, ``hang``,
    ``late`` (s), ``open_rate`` (flows/s, 0: all opened before T0) and
    ``flows``: one object per flow (fields of :class:`Flow`)."""
    parser = argparse.ArgumentParser(prog="python -m anycast_lb.lab.flows")
    parser.add_argument("--ns", required=True, help="lab namespace this must run in")
    parser.add_argument("--vip", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--flows", type=int, default=300, help="flows to open (churn: at most)")
    parser.add_argument("--open-rate", type=float, default=0.0,
                        help="churn: open flows at this rate (per s) during the run")
    parser.add_argument("--interval", type=float, default=0.1, help="s between messages")
    parser.add_argument("--hang", type=float, default=1.0, help="s without echo = hang")
    parser.add_argument("--late", type=float, default=3.0,
                        help="s to keep listening for a RST after a hang")
    parser.add_argument("--max-duration", type=float, default=60.0,
                        help="s after T0 at most (SIGTERM ends the run earlier)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        require_namespace(args.ns)
    except UnsafeLab as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not (0 <= args.flows <= MAX_FLOWS and 0 <= args.open_rate <= 2000
            and 0.01 <= args.interval <= 10 and 0 < args.hang <= 10 and 0 <= args.late <= 30
            and 0 < args.max_duration <= MAX_DURATION_S):
        print(f"error: flows 0-{MAX_FLOWS}, open-rate 0-2000/s, interval 0.01-10 s, "
              f"hang 0-10 s, late 0-30 s, max-duration 0-{MAX_DURATION_S:.0f} s",
              file=sys.stderr)
        return 2
    run_to_file(run(args.vip, args.port, args.flows, args.open_rate, args.interval, args.hang,
                    args.late, args.max_duration), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
