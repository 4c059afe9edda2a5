"""CPU per short TCP connection of the relay engine, on loopback only.

    .venv/bin/python benchmarks/relay_short_conns.py [--connections 3000]
        [--concurrency 20] [--no-splice] [--proxy-protocol] [--timeout 120]
        [--no-gc] [--callgrind [--small 500]] [--opcodes]

This process runs one ``RelayLoop`` and one ``RelayForwarder`` bound to
127.0.0.1 (port 0, read back). A child process (this script with
``--role load``) runs the backend, which answers one line and closes, and
the clients: each connects through the forwarder, sends a line, reads to
EOF and closes; ``--concurrency`` at a time, ``--connections`` in all, the
whole run bounded by ``--timeout`` s. Only the forwarder runs in this
process, so its CPU time (utime + stime of every thread, from
``resource.getrusage``) over the load is the relay's cost.

Prints one JSON object: ``connections`` completed, ``errors``, ``cpu_s``,
``us_per_conn`` (CPU microseconds per connection; ``user_us_per_conn`` and
``sys_us_per_conn`` its user and system parts), ``wall_s``. To compare two
trees, run it with ``PYTHONPATH`` pointing at each, alternating.

CPU time on a shared machine moves with the load; instruction counts do
not. ``--no-gc`` turns the forwarder process's garbage collector off (its
runs depend on allocation timing), and valgrind's callgrind (which follows
only this process, not the load child) counts its instructions; two runs
give the count per connection, (I(N) - I(small)) / (N - small), the
start-up and shutdown cancelling out. ``--callgrind`` runs both (valgrind
must be installed; ``--connections`` defaults to 2500 there, ``--small`` to
500, each run bounded by ``--timeout`` + 60 s) and prints one JSON object:
``instructions`` of each run and ``instructions_per_conn``. By hand::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python benchmarks/relay_short_conns.py --connections 500 \
        --timeout 800 --no-gc    # then --connections 2500: "Collected : I"

To count another tree, point ``PYTHONPATH`` at a directory holding its
``anycast_lb`` package; the child processes inherit it.

``--opcodes`` traces the relay loop's thread (``threading.settrace`` with
opcode events: slow, for a few hundred connections) and prints, after the
JSON line, the bytecodes executed per connection in all and for the 25
busiest functions, with their calls per connection: where the interpreter
spends its instructions.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
import types
from typing import Any

PAYLOAD = b"GET / HTTP/1.0\r\n"
ANSWER = b"HTTP/1.0 200 OK\r\n\r\nok\n"


def _cpu() -> tuple[float, float]:
    """User and system CPU time of this process (s)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def _load(args: argparse.Namespace) -> None:
    """Child: the backend and the clients."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if args.proxy_protocol:
                # The PROXY v2 header first (its signature holds a newline):
                # 16 bytes, the last two the length of the addresses.
                head = await reader.readexactly(16)
                await reader.readexactly(int.from_bytes(head[14:16], "big"))
            await reader.readline()
            writer.write(ANSWER)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    print("backend", server.sockets[0].getsockname()[1], flush=True)
    port = int(sys.stdin.readline())
    done = errors = 0
    todo = iter(range(args.connections))

    async def client() -> None:
        nonlocal done, errors
        for _ in todo:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(PAYLOAD)
                data = await reader.read()
                writer.close()
                if data == ANSWER:
                    done += 1
                else:
                    errors += 1
            except OSError:
                errors += 1

    try:
        async with asyncio.timeout(args.timeout):
            await asyncio.gather(*(client() for _ in range(args.concurrency)))
    except TimeoutError:
        errors += 1
    server.close()
    print(json.dumps({"done": done, "errors": errors}), flush=True)


def _trace_opcodes() -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Count bytecodes and calls per function on threads started from now on."""
    opcodes: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()

    def tracer(frame: types.FrameType, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        key = f"{os.path.basename(code.co_filename)}:{code.co_name}"
        calls[key] += 1

        def local(frame: types.FrameType, event: str, arg: object) -> Any:
            if event == "opcode":
                opcodes[key] += 1
            return local
        return local

    threading.settrace(tracer)
    return opcodes, calls


async def _forward(args: argparse.Namespace) -> None:
    if args.no_gc:
        gc.disable()
    from anycast_lb.config import ForwardingConfig, ServiceConfig
    from anycast_lb.forward.relay import RelayForwarder, RelayLoop
    from anycast_lb.pool import Pool

    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--role", "load", "--connections", str(args.connections),
        "--concurrency", str(args.concurrency), "--timeout", str(args.timeout),
        *(["--proxy-protocol"] if args.proxy_protocol else []),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    loop = RelayLoop(ForwardingConfig(splice=args.splice))
    traced = _trace_opcodes() if args.opcodes else None
    loop.start()
    try:
        async with asyncio.timeout(args.timeout + 10):
            _, backend_port = (await child.stdout.readline()).split()
            service = ServiceConfig.model_validate({
                "name": "bench", "vip": "127.0.0.1", "port": 80, "protocol": "tcp",
                "proxy_protocol": args.proxy_protocol,
                "backends": [{"address": "127.0.0.1", "port": int(backend_port)}],
            })
            pool = Pool(service)
            for backend in pool.backends:
                pool.set_up(backend.key, True)
            fwd = RelayForwarder(service, pool, loop, bind_host="127.0.0.1", bind_port=0)
            _, port = await fwd.start()
            start, wall = _cpu(), time.monotonic()
            child.stdin.write(b"%d\n" % port)
            await child.stdin.drain()
            result = json.loads(await child.stdout.readline())
            (user, system), wall = _cpu(), time.monotonic() - wall
            user, system = user - start[0], system - start[1]
            cpu = user + system
            await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        loop.stop()
    print(json.dumps({
        "connections": result["done"], "errors": result["errors"], "cpu_s": round(cpu, 3),
        "us_per_conn": round(cpu / max(result["done"], 1) * 1e6, 1),
        "user_us_per_conn": round(user / max(result["done"], 1) * 1e6, 1),
        "sys_us_per_conn": round(system / max(result["done"], 1) * 1e6, 1), "wall_s": round(wall, 2),
        "splice": args.splice, "proxy_protocol": args.proxy_protocol,
    }))
    if traced is not None:
        opcodes, calls = traced
        n = max(result["done"], 1)
        print(f"bytecodes per connection: {sum(opcodes.values()) / n:.0f}")
        for key, count in opcodes.most_common(25):
            print(f"{count / n:8.1f} {calls[key] / n:6.2f}  {key}")


def _instructions(args: argparse.Namespace, connections: int) -> int:
    """One run of the forwarder under callgrind: its instruction count."""
    cmd = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, os.path.abspath(__file__), "--no-gc",
        "--connections", str(connections), "--concurrency", str(args.concurrency),
        "--timeout", str(args.timeout),
    ]
    if not args.splice:
        cmd.append("--no-splice")
    if args.proxy_protocol:
        cmd.append("--proxy-protocol")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 60,
                         check=False)
    found = re.search(r"Collected : (\d+)", run.stderr)
    result = run.stdout.strip().splitlines()[-1:] if run.stdout.strip() else []
    if run.returncode != 0 or found is None or not result:
        raise SystemExit(f"callgrind run failed ({run.returncode}): {run.stderr[-2000:]}")
    counted = json.loads(result[0])
    if counted["connections"] != connections or counted["errors"]:
        raise SystemExit(f"callgrind run incomplete: {counted}")
    return int(found.group(1))


def _callgrind(args: argparse.Namespace) -> None:
    small, large = args.small, args.connections
    counts = {n: _instructions(args, n) for n in (small, large)}
    print(json.dumps({
        "instructions": {str(n): i for n, i in counts.items()},
        "instructions_per_conn": round((counts[large] - counts[small]) / (large - small)),
        "splice": args.splice, "proxy_protocol": args.proxy_protocol,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("forward", "load"), default="forward")
    parser.add_argument("--connections", type=int, default=None,
                        help="connections (default 3000; 2500 with --callgrind)")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--no-splice", dest="splice", action="store_false")
    parser.add_argument("--proxy-protocol", action="store_true")
    parser.add_argument("--no-gc", action="store_true",
                        help="garbage collector off in the forwarder process (for callgrind)")
    parser.add_argument("--callgrind", action="store_true",
                        help="count instructions per connection with valgrind (two runs)")
    parser.add_argument("--opcodes", action="store_true",
                        help="count the relay thread's bytecodes per connection (slow)")
    parser.add_argument("--small", type=int, default=500,
                        help="connections of the smaller --callgrind run")
    args = parser.parse_args()
    if args.connections is None:
        args.connections = 2500 if args.callgrind else 3000
    if args.callgrind and not 0 < args.small < args.connections:
        parser.error("--small must be in 1..connections-1")
    if not 0 < args.connections <= 100_000 or not 0 < args.concurrency <= 200:
        parser.error("connections must be in 1..100000 and concurrency in 1..200")
    if args.callgrind:
        _callgrind(args)
        return
    asyncio.run(_load(args) if args.role == "load" else _forward(args))


if __name__ == "__main__":
    main()
