"""Flood tool of the abuse scenarios, run inside the client namespace.

::

    ip netns exec alb-client python -m anycast_lb.lab.flood --ns alb-client \\
        --source 203.0.113.65 --vip 198.51.100.10 --out f.json \\
        udp --port 9000 --count 30720 --rate 5120
    ip netns exec alb-client python -m anycast_lb.lab.flood --ns alb-client \\
        --source 203.0.113.65 --vip 198.51.100.10 --out f.json \\
        tcp --port 80 --count 6144 --rate 1024 --hold 3

- ``udp``: ``--count`` datagrams at ``--rate`` per second, each from its
  own source port (1024, 1025, ...; one socket bound, used once, closed):
  every datagram is a new flow for the node that receives it.
- ``tcp``: ``--count`` connections at ``--rate`` per second (2 s connect
  timeout each), kept open and idle (nothing sent) until ``--hold`` s after
  the last one was started, then closed.

Prints ``started T0`` (``time.monotonic()``), writes JSON counts (sent,
errors by errno name; tcp: established, failed by kind, peak open).
Refuses to run outside ``--ns`` or toward an address outside the lab's
prefixes. Bounded: at most ``MAX_COUNT`` datagrams or connections and
``MAX_DURATION_S`` s.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import json
import resource
import socket
import sys
import time
from collections import Counter
from typing import Any

from anycast_lb.errors import UnsafeLab
from anycast_lb.lab.netns import require_namespace
from anycast_lb.lab.topology import in_lab_prefixes

MAX_COUNT = 64_000
MAX_RATE = 20_000.0
MAX_DURATION_S = 60.0
FIRST_PORT = 1024
CONNECT_TIMEOUT_S = 2.0
_IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the port at connect, not bind


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def udp_flood(source: str, vip: str, port: int, count: int, rate: float) -> dict[str, Any]:
    """Send ``count`` one-datagram flows, source ports FIRST_PORT upward."""
    t0 = time.monotonic()
    print(f"started {t0:.6f}", flush=True)
    errors: Counter[str] = Counter()
    sent = 0
    for i in range(count):
        due = t0 + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing, not readiness
        if time.monotonic() - t0 > MAX_DURATION_S:
            break
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((source, FIRST_PORT + i))
            sock.sendto(b"flood %d\n" % i, (vip, port))
            sent += 1
        except OSError as exc:
            errors[_errname(exc)] += 1
        finally:
            sock.close()
    return {"mode": "udp", "t0": t0, "count": count, "rate": rate, "sent": sent,
            "errors": dict(errors), "first_port": FIRST_PORT,
            "elapsed_s": round(time.monotonic() - t0, 3)}


async def tcp_flood(source: str, vip: str, port: int, count: int, rate: float,
                    hold: float) -> dict[str, Any]:
    """Open ``count`` idle connections; hold them ``hold`` s after the last start."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    print(f"started {t0:.6f}", flush=True)
    kinds: Counter[str] = Counter()
    open_socks: list[socket.socket] = []
    peak = 0

    async def one() -> None:
        nonlocal peak
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            await asyncio.wait_for(loop.sock_connect(sock, (vip, port)), CONNECT_TIMEOUT_S)
        except TimeoutError:
            kinds["timeout"] += 1
            sock.close()
            return
        except OSError as exc:
            kinds[_errname(exc)] += 1
            sock.close()
            return
        kinds["established"] += 1
        open_socks.append(sock)
        peak = max(peak, len(open_socks))

    tasks = []
    for i in range(count):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing
        if time.monotonic() - t0 > MAX_DURATION_S:
            break
        tasks.append(loop.create_task(one()))
    last_start = time.monotonic()
    await asyncio.gather(*tasks)
    await asyncio.sleep(max(0.0, last_start + hold - time.monotonic()))
    # How many the node has closed meanwhile (RST or FIN): readable with 0 bytes.
    closed_by_node = 0
    for sock in open_socks:
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"":
                closed_by_node += 1
        except BlockingIOError:
            pass
        except OSError:
            closed_by_node += 1
        sock.close()
    return {"mode": "tcp", "t0": t0, "count": count, "rate": rate, "hold_s": hold,
            "started": len(tasks), "established": kinds.pop("established", 0),
            "failed": dict(kinds), "peak_open": peak, "closed_by_node": closed_by_node,
            "elapsed_s": round(time.monotonic() - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", required=True, help="lab namespace this must run in")
    parser.add_argument("--source", required=True)
    parser.add_argument("--vip", required=True)
    parser.add_argument("--out", required=True)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("udp", "tcp"):
        p = sub.add_parser(mode)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--count", type=int, required=True)
        p.add_argument("--rate", type=float, required=True)
        if mode == "tcp":
            p.add_argument("--hold", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        require_namespace(args.ns)
        for address in (args.source, args.vip):
            if not in_lab_prefixes(ipaddress.ip_address(address)):
                raise UnsafeLab(f"{address} is not a lab address")
    except (UnsafeLab, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hold = getattr(args, "hold", 0.0)
    if not (0 < args.count <= MAX_COUNT and 0 < args.rate <= MAX_RATE
            and args.count / args.rate + hold <= MAX_DURATION_S and 0 < args.port < 65536
            and (args.mode == "tcp" or FIRST_PORT + args.count <= 65536)):
        print(f"error: count 1-{MAX_COUNT}, rate up to {MAX_RATE:.0f}/s, "
              f"at most {MAX_DURATION_S:.0f} s", file=sys.stderr)
        return 2
    if args.mode == "udp":
        result = udp_flood(args.source, args.vip, args.port, args.count, args.rate)
    else:
        want = args.count + 256
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < want:
            hard = want  # root may raise the hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        result = asyncio.run(tcp_flood(args.source, args.vip, args.port, args.count,
                                       args.rate, hold))
    with open(args.out, "w") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
