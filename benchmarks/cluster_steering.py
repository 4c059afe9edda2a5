"""Kernel proof of flow survival steering, in scratch namespaces (needs root).

Topology (nothing touches the root namespace; documentation prefixes only)::

    albt-cluster-c (client 198.51.100.200 on lo, ECMP route to the VIP)
      |-- up0 198.51.100.18/30 -- albt-cluster-n1 (VIP 198.51.100.10 on lo)
      |-- up0 198.51.100.22/30 -- albt-cluster-n2       |
      |-- up0 198.51.100.26/30 -- albt-cluster-n3       | lan0 203.0.113.N/24
                                   albt-cluster-lan (bridge br0) ----+

Each node runs a real :class:`anycast_lb.cluster.Cluster` with the kernel
data path (nft table, fwmark rules, routes, sysctls) and a small echo server
bound to 0.0.0.0:80 that calls the cluster's flow hook. The client keeps
``--flows`` connections sending a line every 100 ms and counts the broken
ones. Scenarios:

- ``drain``: n1 leaves the ECMP route (a withdraw). Hash-threshold moves
  n1's flows and some of n2's and n3's; all must survive (steered by map).
- ``unpublished``: as ``drain``, but n1 never calls the flow hook (its flows
  are never published, as in the first sync period), so they survive only by the second chance
  (dup to every live peer; the owner accepts, the others drop).
- ``dead``: n1 is frozen (SIGSTOP and its links dropped), expires at its
  peers, then leaves the route: its flows must get an RST quickly from the
  node they land on (dead set), and no other flow may break.

Run: ``.venv/bin/python benchmarks/cluster_steering.py [--flows 60] [SCENARIO...]``.
Namespaces are deleted at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NS = "albt-cluster"
CLIENT = "198.51.100.200"
VIP = "198.51.100.10"
NODES = (1, 2, 3)
STATE = Path("/tmp/albt-cluster")
PY = sys.executable
HERE = Path(__file__).resolve()


def sh(*argv: str, ns: str | None = None, check: bool = True) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    out = subprocess.run(full, capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {out.stderr.strip()}")
    return out.stdout


def uplink(i: int) -> tuple[str, str]:
    """(client side, node side) of node i's /30."""
    base = 16 + 4 * (i - 1)
    return f"198.51.100.{base + 1}", f"198.51.100.{base + 2}"


def setup() -> None:
    teardown()
    for name in ("c", "lan", *(f"n{i}" for i in NODES)):
        sh("ip", "netns", "add", f"{NS}-{name}")
        sh("ip", "link", "set", "lo", "up", ns=f"{NS}-{name}")
    c, lan = f"{NS}-c", f"{NS}-lan"
    sh("ip", "link", "add", "br0", "type", "bridge", ns=lan)
    sh("ip", "link", "set", "br0", "up", ns=lan)
    sh("ip", "addr", "add", f"{CLIENT}/32", "dev", "lo", ns=c)
    for key in ("net.ipv4.conf.all.rp_filter=0", "net.ipv4.fib_multipath_hash_policy=1"):
        sh("sysctl", "-qw", key, ns=c)
    for i in NODES:
        n = f"{NS}-n{i}"
        cside, nside = uplink(i)
        sh("ip", "link", "add", f"c{i}", "netns", c, "type", "veth", "peer", "name", "up0",
           "netns", n)
        sh("ip", "addr", "add", f"{cside}/30", "dev", f"c{i}", ns=c)
        sh("ip", "link", "set", f"c{i}", "up", ns=c)
        sh("ip", "addr", "add", f"{nside}/30", "dev", "up0", ns=n)
        sh("ip", "link", "set", "up0", "up", ns=n)
        sh("ip", "route", "add", f"{CLIENT}/32", "via", cside, ns=n)
        sh("ip", "addr", "add", f"{VIP}/32", "dev", "lo", ns=n)
        sh("ip", "link", "add", f"l{i}", "netns", lan, "type", "veth", "peer", "name", "lan0",
           "netns", n)
        sh("ip", "link", "set", f"l{i}", "master", "br0", "up", ns=lan)
        sh("ip", "addr", "add", f"203.0.113.{i}/24", "dev", "lan0", ns=n)
        sh("ip", "link", "set", "lan0", "up", ns=n)
        # The lab's node namespaces start with strict reverse-path filtering.
        sh("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1", ns=n)
    route(NODES)


def route(nodes: tuple[int, ...]) -> None:
    hops = [arg for i in nodes for arg in ("nexthop", "via", uplink(i)[1])]
    sh("ip", "route", "replace", f"{VIP}/32", *hops, ns=f"{NS}-c")


def teardown() -> None:
    for name in ("c", "lan", *(f"n{i}" for i in NODES)):
        sh("ip", "netns", "del", f"{NS}-{name}", check=False)


# ------------------------------------------------------------------ node side

def bench_key_file() -> Any:
    """A sync key file (mode 0600) in a fresh temp dir: every node process
    writes the same fixed key (scratch namespaces only)."""
    import tempfile
    from pathlib import Path

    from anycast_lb.cluster.keys import write_key_file

    path = Path(tempfile.mkdtemp(prefix="albt-key-")) / "cluster.key"
    write_key_file(path, [BENCH_KEY])
    return path


BENCH_KEY = "YW55Y2FzdC1sYiBiZW5jaG1hcmsgc3luYyBrZXkgMDE="
"""base64 of a fixed 32-byte key, shared by the benchmark's node processes."""


async def node_main(index: int, publish: bool) -> None:
    from anycast_lb import log
    from anycast_lb.cluster import Cluster
    from anycast_lb.config import ClusterConfig, ServiceConfig

    log.setup("info")
    config = ClusterConfig.model_validate({
        "address": f"203.0.113.{index}", "interface": "lan0",
        "peers": [f"203.0.113.{i}" for i in NODES], "key_file": str(bench_key_file()), "nft_table": "albt_steer",
    })
    service = ServiceConfig.model_validate({"name": "echo", "vip": VIP, "port": 80,
                                            "backends": [{"address": "127.0.0.1", "port": 9}]})
    conns: dict[tuple[str, int, str, int], asyncio.Transport] = {}

    def abort(keys: Any) -> int:
        found = 0
        for key in keys:
            transport = conns.get(key)
            if transport is not None:
                found += 1
                transport.abort()
        return found

    cluster = Cluster(config, [service], name=f"n{index}", abort=abort)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.t = transport
            peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
            self.key = (peer[0], peer[1], local[0], local[1])
            conns[self.key] = transport
            if publish:
                cluster.on_flow(True, self.key)

        def data_received(self, data: bytes) -> None:
            self.t.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            conns.pop(self.key, None)
            if publish:
                cluster.on_flow(False, self.key)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "0.0.0.0", 80, reuse_address=True)
    task = asyncio.create_task(cluster.run())
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    path = STATE / f"n{index}.json"
    while not stop.is_set():
        status = cluster.status()
        status["connections"] = len(conns)
        path.write_text(json.dumps(status))
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass
    server.close()
    cluster.stop()
    await task


# ------------------------------------------------------------------ client side

async def client_main(flows: int, seconds: float, events: list[tuple[float, str]]) -> dict[str, Any]:
    """Run ``flows`` echo connections for ``seconds``; ``events`` are (at s, action)."""
    broken: list[dict[str, Any]] = []
    start = time.monotonic()
    origin = [start]  # the events' time 0: once every flow is open
    ready = asyncio.Event()
    opened = 0

    async def one(n: int) -> None:
        nonlocal opened
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.bind((CLIENT, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (VIP, 80))
        reader, writer = await asyncio.open_connection(sock=sock)
        opened += 1
        if opened == flows:
            ready.set()
        last_ok = time.monotonic()
        try:
            while time.monotonic() - start < seconds:
                line = f"flow {n} {time.monotonic():.3f}\n".encode()
                writer.write(line)
                got = await asyncio.wait_for(reader.readline(), 2.0)
                if got != line:
                    raise ConnectionError("eof" if not got else "garbled")
                last_ok = time.monotonic()
                await asyncio.sleep(0.1)
        except (OSError, TimeoutError, ConnectionError) as exc:
            broken.append({"flow": n, "port": sock.getsockname()[1] if sock.fileno() >= 0 else 0,
                           "at": round(time.monotonic() - origin[0], 3),
                           "silent_ms": round((time.monotonic() - last_ok) * 1000),
                           "error": type(exc).__name__})
        finally:
            writer.close()

    tasks = [asyncio.create_task(one(n)) for n in range(flows)]
    await asyncio.wait_for(ready.wait(), 10)
    t0 = origin[0] = time.monotonic()
    for at, action in events:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        subprocess.run(action, shell=True, check=True)
    await asyncio.gather(*tasks)
    return {"flows": flows, "broken": broken}


# ------------------------------------------------------------------ orchestration

def status(i: int) -> dict[str, Any]:
    try:
        return dict(json.loads((STATE / f"n{i}.json").read_text()))
    except (OSError, ValueError):
        return {}


def wait_for(pred: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_scenario(name: str, flows: int) -> dict[str, Any]:
    setup()
    STATE.mkdir(exist_ok=True)
    for f in STATE.glob("*.json"):
        f.unlink()
    procs = {}
    logs = {}
    for i in NODES:
        publish = "0" if (name == "unpublished" and i == 1) else "1"
        logs[i] = open(STATE / f"n{i}.log", "w")
        procs[i] = subprocess.Popen(
            ["ip", "netns", "exec", f"{NS}-n{i}", PY, str(HERE), "node", str(i), publish],
            stderr=logs[i], cwd=HERE.parent.parent)
    try:
        wait_for(lambda: all(status(i).get("steering_peers") == 2 for i in NODES),
                 "every node to steer to its two peers")
        n1 = f"{NS}-n1"
        snap = f"mkdir -p {STATE}/event && cp {STATE}/n*.json {STATE}/event/; "
        if name in ("drain", "unpublished"):
            events = [(2.0, snap + f"ip netns exec {NS}-c ip route replace {VIP}/32 "
                            f"nexthop via {uplink(2)[1]} nexthop via {uplink(3)[1]}")]
        else:  # dead: freeze n1 and cut it off, then withdraw it after its expiry
            events = [
                (1.0, f"kill -STOP {procs[1].pid}; ip netns exec {n1} nft add table ip freeze; "
                      f"ip netns exec {n1} nft add chain ip freeze out "
                      "'{ type filter hook output priority 0; policy drop; }'; "
                      f"ip netns exec {n1} nft add chain ip freeze in "
                      "'{ type filter hook prerouting priority -400; policy drop; }'"),
                (2.0, snap + f"ip netns exec {NS}-c ip route replace {VIP}/32 "
                      f"nexthop via {uplink(2)[1]} nexthop via {uplink(3)[1]}"),
            ]
        cmd = ["ip", "netns", "exec", f"{NS}-c", PY, str(HERE), "client", str(flows), "5",
               json.dumps(events)]
        for f in (STATE / "event").glob("*.json"):
            f.unlink()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60,
                             cwd=HERE.parent.parent)
        result = json.loads(out.stdout)
        after = {i: status(i) for i in NODES if i != 1 or name != "dead"}
        result["scenario"] = name
        at_event = {i: json.loads((STATE / "event" / f"n{i}.json").read_text()) for i in NODES}
        result["owned_at_withdraw"] = {i: s["flows_owned"] for i, s in at_event.items()}
        result["map_at_withdraw"] = {i: s["steering_map_size"] for i, s in at_event.items()}
        result["packets_after"] = {i: s.get("packets") for i, s in after.items()}
        result["sync_lag_p99_ms"] = {i: s.get("sync_lag_p99_ms") for i, s in after.items()}
        return result
    finally:
        if name == "dead":
            os.kill(procs[1].pid, signal.SIGCONT)
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs.values():
            f.close()
        # Teardown check: the node removed its table and restored the local rule.
        for i in NODES:
            if name == "dead" and i == 1:
                continue
            tables = sh("nft", "list", "tables", ns=f"{NS}-n{i}")
            rules = sh("ip", "rule", "show", ns=f"{NS}-n{i}")
            if "albt_steer" in tables or "0:\tfrom all lookup local" not in rules:
                print(f"n{i}: teardown incomplete:\n{tables}\n{rules}", file=sys.stderr)
        teardown()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        asyncio.run(node_main(int(sys.argv[2]), sys.argv[3] == "1"))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        events = [tuple(e) for e in json.loads(sys.argv[4])]
        print(json.dumps(asyncio.run(client_main(int(sys.argv[2]), float(sys.argv[3]),
                                                 events))))  # type: ignore[arg-type]
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=60)
    parser.add_argument("scenarios", nargs="*", default=["drain", "unpublished", "dead"])
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, nftables)")
    for name in args.scenarios:
        result = run_scenario(name, args.flows)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
