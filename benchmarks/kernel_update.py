"""Time one backend change of the kernel engine: 1000 backends, 65537 slots.

Run as root (it creates and deletes a scratch network namespace
``albt-kern-bench-<pid>`` holding one veth pair; no packet is sent)::

    sudo .venv/bin/python benchmarks/kernel_update.py [--backends 1000] [--size 65537] [--runs 5]

Prints, in ms: the Maglev build, the first full load of the table, and for
one backend removed (a health change: both tables) and one backend drained
(the current table only), the render time, the apply time (``nft -f -``,
one transaction), the CPU time it cost (this process, nft and ``ip netns
exec``: unlike wall time, it does not grow when other work shares the
cores) and the number of changed slots. Backend addresses come
from 198.18.0.0/15 (RFC 2544, benchmarking): they only fill maps.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Sequence

from anycast_lb.kernel import render
from anycast_lb.kernel.apply import NftForwarder
from anycast_lb.maglev import build_table


def _tables(addrs: Sequence[ipaddress.IPv4Address], size: int) -> tuple[int, ...]:
    return render.marks(build_table([str(a) for a in addrs], size=size), addrs)


async def _main(args: argparse.Namespace) -> None:
    ns = args.namespace or f"albt-kern-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "lan0", "type", "veth", "peer", "name",
                        "lan1"], check=True)

        async def in_ns(argv: Sequence[str], stdin: str | None = None) -> str:
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", ns, *argv, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate(stdin.encode() if stdin else None)
            if proc.returncode:
                raise SystemExit(err.decode())
            return out.decode()

        base = int(ipaddress.IPv4Address("198.18.0.1"))
        addrs = [ipaddress.IPv4Address(base + i) for i in range(args.backends)]
        vip = ipaddress.IPv4Address("203.0.113.200")
        svc = render.KernelService(0, vip, 80, "tcp", args.size,
                                   render.derive_seed(vip, 80, "tcp", args.size), 300, 262144)
        settings = render.KernelSettings("anycast_lb_fwd", "lan0", (svc,))
        fwd = NftForwarder(settings, runner=in_ns)

        started = time.perf_counter()
        full = _tables(addrs, args.size)
        build_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        await fwd.install({0: render.steady(full, addrs)})
        load_ms = (time.perf_counter() - started) * 1000
        print(f"backends {args.backends}, slots {args.size}")
        print(f"maglev build: {build_ms:.0f} ms; first full load (render + nft -f): {load_ms:.0f} ms")

        less = _tables(addrs[1:], args.size)
        changed = sum(1 for a, b in zip(full, less, strict=True) if a != b)
        for label, make in (
            ("remove one backend (both tables)", lambda: render.steady(less, addrs[1:])),
            ("drain one backend (current table)", lambda: render.start_drain(fwd.tables(0), less)),
        ):
            renders, applies, cpu = [], [], []
            for _ in range(args.runs):
                new = make()
                t0, c0 = time.perf_counter(), time.process_time()
                kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                script = render.render_diff(settings, svc, fwd.tables(0), new)
                renders.append((time.perf_counter() - t0) * 1000)
                await fwd.update(0, new)  # renders again, then nft -f
                applies.append(fwd.last_apply_s * 1000)
                kids = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu.append((time.process_time() - c0 + kids.ru_utime - kids0.ru_utime
                            + kids.ru_stime - kids0.ru_stime) * 1000)
                await fwd.update(0, render.steady(full, addrs))  # back, for the next run
            total = [r + a for r, a in zip(renders, applies, strict=True)]
            print(f"{label}: {changed} slots changed, {script.count(chr(10))} script lines; "
                  f"render median {statistics.median(renders):.1f} ms, apply median "
                  f"{statistics.median(applies):.1f} ms, render+apply median "
                  f"{statistics.median(total):.1f} ms, max {max(total):.1f} ms; CPU (this "
                  f"process and nft) median {statistics.median(cpu):.1f} ms ({args.runs} runs)")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--size", type=int, default=65537)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--namespace", default=None,
                        help="name of the scratch namespace (default albt-kern-bench-PID)")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
