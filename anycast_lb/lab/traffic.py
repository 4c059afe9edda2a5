"""Paced lab client, run inside the client namespace.

::

    ip netns exec alb-client python -m anycast_lb.lab.traffic --ns alb-client \\
        --vip 198.51.100.10 --port 80 --rate 300 --duration 8 --long 30 --out t.json

- New TCP connections at a fixed rate (``--rate`` per second, for
  ``--duration`` seconds, so at most rate x duration of them): each one
  connects, reads the backend's greeting ``NAME PEER``, sends a line, reads
  it back and closes. Outcome, start time, backend and PEER (the node's
  backend-LAN address, i.e. which node carried the flow) are recorded. A
  connection is judged by its start time, so a blackhole shows up as failed
  windows of the paced stream (a sequential client with a timeout
  under-counts failures during a blackhole).
- ``--long`` long-lived connections, opened before the stream starts, each
  sending a line every 100 ms and expecting the echo within
  ``--timeout``; the first miss or reset marks it broken (no reconnect).

Writes JSON (shape in :func:`main`) and prints ``started T0`` on stdout (T0 is
``time.monotonic()``, shared by every process on the machine) once the
long-lived connections are up, so a scenario can time its fault against the
stream. Refuses to run outside ``--ns``. Every loop is bounded in count and
time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from anycast_lb.errors import UnsafeLab
from anycast_lb.lab.netns import require_namespace

LONG_INTERVAL_S = 0.1
MAX_CONNECTIONS = 200_000
MAX_DURATION_S = 600.0


@dataclass
class Attempt:
    start: float
    elapsed_ms: float = 0.0
    ok: bool = False
    peer: str = ""
    backend: str = ""
    error: str = ""


@dataclass
class LongConn:
    index: int
    peer: str = ""
    backend: str = ""
    established: bool = False
    broken_at: float | None = None
    reason: str = ""
    messages: int = 0
    failures: list[float] = field(default_factory=list)


async def _greeting(reader: asyncio.StreamReader) -> tuple[str, str]:
    line = (await reader.readline()).decode("ascii", "replace").split()
    if len(line) < 2:
        raise ConnectionError("no greeting")
    return line[0], line[1]


def _error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, RuntimeError):
        return "closed"
    if type(exc) is ConnectionError and str(exc):
        return str(exc)
    return type(exc).__name__


async def one_connection(vip: str, port: int, timeout: float, t0: float) -> Attempt:
    attempt = Attempt(start=time.monotonic() - t0)
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(vip, port)
            attempt.backend, attempt.peer = await _greeting(reader)
            writer.write(b"ping\n")
            if await reader.readline() != b"ping\n":
                raise ConnectionError("bad echo")
            attempt.ok = True
    except (TimeoutError, OSError, ConnectionError, asyncio.IncompleteReadError, RuntimeError) as exc:
        attempt.error = _error(exc)
    finally:
        if writer is not None:
            writer.close()
    attempt.elapsed_ms = round((time.monotonic() - t0 - attempt.start) * 1000, 2)
    return attempt


async def long_connection(conn: LongConn, vip: str, port: int, timeout: float,
                          ready: asyncio.Event, stop: asyncio.Event, t0_box: list[float]
                          ) -> None:
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(vip, port)
            conn.backend, conn.peer = await _greeting(reader)
        conn.established = True
        await ready.wait()
        seq = 0
        while not stop.is_set():
            seq += 1
            try:
                async with asyncio.timeout(timeout):
                    writer.write(f"{conn.index}-{seq}\n".encode())
                    line = await reader.readline()
                    if line != f"{conn.index}-{seq}\n".encode():
                        raise ConnectionError("closed" if not line else "bad echo")
                conn.messages += 1
            except (TimeoutError, OSError, ConnectionError, RuntimeError) as exc:
                # uvloop raises RuntimeError writing to a transport already closed.
                conn.broken_at = round(time.monotonic() - t0_box[0], 4)
                conn.reason = _error(exc)
                return
            try:
                await asyncio.wait_for(stop.wait(), LONG_INTERVAL_S)
            except TimeoutError:
                pass
    except (TimeoutError, OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
        conn.reason = "connect: " + _error(exc)
    finally:
        if writer is not None:
            writer.close()


async def run(vip: str, port: int, rate: float, duration: float, n_long: int,
              timeout: float) -> dict[str, Any]:
    count = min(int(rate * duration), MAX_CONNECTIONS)
    ready, stop = asyncio.Event(), asyncio.Event()
    t0_box = [time.monotonic()]
    longs = [LongConn(i) for i in range(n_long)]
    long_tasks = [asyncio.create_task(long_connection(c, vip, port, timeout, ready, stop,
                                                      t0_box)) for c in longs]
    # Wait (bounded) until every long-lived connection is up or has failed.
    deadline = time.monotonic() + timeout + 1.0
    while time.monotonic() < deadline and not all(c.established or c.reason for c in longs):
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    t0_box[0] = t0
    ready.set()
    print(f"started {t0:.6f}", flush=True)
    loop = asyncio.get_running_loop()
    attempts: list[asyncio.Task[Attempt]] = []
    for i in range(count):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        attempts.append(loop.create_task(one_connection(vip, port, timeout, t0)))
    results = await asyncio.gather(*attempts)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*long_tasks), timeout + 1.0)
    return {
        "t0": t0,
        "rate": rate,
        "duration": duration,
        "timeout": timeout,
        "new_fields": ["start_s", "elapsed_ms", "ok", "peer", "backend", "error"],
        "new": [[round(a.start, 5), a.elapsed_ms, int(a.ok), a.peer, a.backend, a.error]
                for a in results],
        "long": [vars(c) for c in longs],
    }


def main(argv: list[str] | None = None) -> int:
    """JSON written to ``--out``: ``t0`` (monotonic s), ``new``: one row per new
    connection ``[start_s (from t0), elapsed_ms, ok, peer, backend, error]``,
    ``long``: one object per long-lived connection (peer, backend,
    established, broken_at (s from t0 or null), reason, messages)."""
    parser = argparse.ArgumentParser(prog="python -m anycast_lb.lab.traffic")
    parser.add_argument("--ns", required=True, help="lab namespace this must run in")
    parser.add_argument("--vip", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--rate", type=float, default=300.0, help="new connections per s")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of stream")
    parser.add_argument("--long", type=int, default=30, help="long-lived connections")
    parser.add_argument("--timeout", type=float, default=1.0, help="per-step timeout (s)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        require_namespace(args.ns)
    except UnsafeLab as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not (0 < args.rate <= 5000 and 0 < args.duration <= MAX_DURATION_S
            and 0 <= args.long <= 2000 and 0 < args.timeout <= 10):
        print("error: rate 0-5000/s, duration 0-600 s, long 0-2000, timeout 0-10 s",
              file=sys.stderr)
        return 2
    run_to_file(run(args.vip, args.port, args.rate, args.duration, args.long, args.timeout),
                args.out)
    return 0


def run_to_file(coro: Coroutine[Any, Any, Any], path: str) -> None:
    """Run a traffic tool's coroutine (on uvloop when installed) and write
    its JSON-able result to ``path``."""
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    with open(path, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    sys.exit(main())
