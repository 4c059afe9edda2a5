"""How far one-key-per-vote agreement on etcd scales: 10, 50 and 100 voting
members over 100 and 1,000 backends, on a real 3-member etcd on 127.0.0.1.

Each simulated member does what a node does (:mod:`anycast_lb.consensus`):
its own :class:`Store` (one gRPC channel), a lease kept by
:class:`LeaseKeeper` (TTL 2 s, keepalive every TTL/3), its member key
(:class:`MemberWriter`) and one vote key per backend (:class:`VoteWriter`,
service ``svc``). The first ``--watchers`` members (all of them up to that
number) also follow the cluster like a node: :func:`read_view` at one
revision (falling back to one read per backend when the single range read
is refused, e.g. above gRPC's 4 MiB message limit), then a watch from that
revision + 1 applied to their :class:`ClusterView`; after each watch batch
each recomputes the agreed state of the backends the batch touched
(:func:`agree`).

Measured per size:

- ``populate w/s``: vote writes per second while every member writes its
  first votes at once (etcd's write throughput under this load);
- ``agree p50/p99 ms``: one backend's votes flip (every member writes its
  new vote at once, as when all detect a death): time from the first flip
  write sent until every watching member computed the new agreed state, over
  ``--trials`` flips (alternately down and up);
- ``flip w/s``: the flip's writes over the time they took;
- ``rss MB``: the largest RSS of the three etcd members after populating;
  ``db MB``: etcd's database size then;
- ``full agree ms``: one :func:`agree` over every vote of the size (what a
  node pays if it recomputes everything per batch);
- ``read``: how the watchers' first read went (``range`` or ``per-backend``);
- ``leases lost``: leases etcd expired because a keepalive came too late
  (the member then re-grants and rewrites every vote, as a node does).

Everything is bounded: ``--trials`` flips per size, each waited for at
most 5 s, the whole run at most ``--max-seconds``. etcd members run with
``--heartbeat-interval 50 --election-timeout 500`` (as in the lab), data
dirs on disk in a temporary directory removed at the end, stopped by PID::

    .venv/bin/python benchmarks/consensus_scale.py [--members 10,50,100]
        [--backends 100,1000] [--trials 20] [--watchers 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anycast_lb.consensus.agree import agree
from anycast_lb.consensus.keys import Layout
from anycast_lb.consensus.members import (
    ClusterView,
    MemberInfo,
    MemberWriter,
    VoteWriter,
    read_view,
)
from anycast_lb.consensus.store import LeaseKeeper, Snapshot, Store
from anycast_lb.errors import ConsensusError, LeaseLost

SERVICE = "svc"
LEASE_TTL = 2.0
REQUEST_TIMEOUT = 2.0
FLIP_TIMEOUT = 5.0
PORT_RANGE = (20000, 32767)


# --- a real 3-member etcd on loopback -------------------------------------------

@dataclass
class Etcd:
    base: Path
    ports: list[tuple[int, int]] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{c}" for c, _ in self.ports]

    def start(self, attempts: int = 5) -> None:
        for _ in range(attempts):
            flat = random.sample(range(*PORT_RANGE), 6)
            self.ports = [(flat[i], flat[i + 3]) for i in range(3)]
            cluster = ",".join(f"s{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(self.ports))
            for i, (client, peer) in enumerate(self.ports):
                log = (self.base / f"s{i}.log").open("ab")
                self.procs.append(subprocess.Popen(
                    ["etcd", "--name", f"s{i}", "--data-dir", str(self.base / f"s{i}"),
                     "--listen-client-urls", f"http://127.0.0.1:{client}",
                     "--advertise-client-urls", f"http://127.0.0.1:{client}",
                     "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-cluster", cluster, "--initial-cluster-state", "new",
                     "--heartbeat-interval", "50", "--election-timeout", "500",
                     "--logger", "zap", "--log-outputs", "stderr"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log))
                log.close()
            deadline = time.monotonic() + 20.0
            while time.monotonic() < deadline:
                if any(p.poll() is not None for p in self.procs):
                    break
                if all(self._healthy(u) for u in self.urls):
                    return
                time.sleep(0.05)
            logs = " ".join((self.base / f"s{i}.log").read_text(errors="replace")[-3000:]
                            for i in range(3))
            self.stop()
            for i in range(3):
                shutil.rmtree(self.base / f"s{i}", ignore_errors=True)
            if "address already in use" not in logs:
                raise RuntimeError(f"etcd did not become healthy: {logs[-1500:]}")
        raise RuntimeError("no free ports for etcd")

    @staticmethod
    def _healthy(url: str) -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=0.5) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def rss_mb(self) -> float:
        """Largest VmRSS of the members (MB)."""
        out = 0.0
        for p in self.procs:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out = max(out, int(line.split()[1]) / 1024)
        return out

    def etcdctl(self, *args: str) -> str:
        return subprocess.run(["etcdctl", "--endpoints", ",".join(self.urls), *args],
                              capture_output=True, text=True, timeout=60, check=False).stdout

    def db_mb(self) -> float:
        data = json.loads(self.etcdctl("endpoint", "status", "-w", "json") or "[]")
        return max((e["Status"]["dbSize"] for e in data), default=0) / 1e6

    def compact(self) -> None:
        data = json.loads(self.etcdctl("endpoint", "status", "-w", "json") or "[]")
        rev = max((e["Status"]["header"]["revision"] for e in data), default=0)
        if rev:
            self.etcdctl("compact", str(rev))
            self.etcdctl("defrag")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs = []


# --- simulated members -------------------------------------------------------------

@dataclass
class Member:
    name: str
    store: Store
    layout: Layout
    backends: list[str]
    keeper: LeaseKeeper = field(init=False)
    votes: VoteWriter = field(init=False)
    view: ClusterView | None = None
    agreed: dict[str, bool] = field(default_factory=dict)
    changed: dict[str, float] = field(default_factory=dict)
    """Backend -> monotonic time its agreed state last changed here."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    read_mode: str = ""

    def __post_init__(self) -> None:
        self.keeper = LeaseKeeper(self.store, LEASE_TTL)
        self.votes = VoteWriter(self.store, self.layout, self.name)

    async def join(self) -> None:
        lease = await self.keeper.grant()
        info = MemberInfo(self.name, "127.0.0.1:9180", "", "bench", time.time())
        await MemberWriter(self.store, self.layout, info).register(lease.id)

    async def populate(self) -> int:
        assert self.keeper.lease is not None
        for backend in self.backends:
            await self.votes.vote(SERVICE, backend, True, self.keeper.lease.id)
        return len(self.backends)

    leases_lost: int = 0

    async def vote(self, backend: str, up: bool) -> None:
        assert self.keeper.lease is not None
        try:
            await self.votes.vote(SERVICE, backend, up, self.keeper.lease.id)
        except LeaseLost:
            await self.rejoin()

    async def rejoin(self) -> None:
        """What a node does when etcd dropped its lease: a new lease, the
        member key and every vote again."""
        self.leases_lost += 1
        await self.join()
        assert self.keeper.lease is not None
        await self.votes.rewrite(self.keeper.lease.id)

    async def keep(self) -> None:
        while True:
            try:
                await self.keeper.run()
            except LeaseLost:
                await self.rejoin()

    async def read(self) -> None:
        try:
            self.view = await read_view(self.store, self.layout)
            self.read_mode = "range"
        except ConsensusError:
            # One range read over every vote is refused above gRPC's 4 MiB
            # message limit: read the same revision one backend at a time.
            rev, _ = await self.store.get(self.layout.current)
            snaps = [await self.store.get_prefix(self.layout.members, revision=rev)]
            items = []
            for backend in self.backends:
                snap = await self.store.get_prefix(f"{self.layout.votes}{SERVICE}/{backend}/",
                                                   revision=rev)
                items += snap.items
            snaps.append(Snapshot(rev, tuple(items)))
            self.view = ClusterView.from_snapshot(self.layout, snaps)
            self.read_mode = "per-backend"
        result = self.view.agreed({SERVICE: self.backends})[SERVICE]
        self.agreed = {b: b in result for b in self.backends}

    async def follow(self) -> None:
        assert self.view is not None
        view = self.view
        async for batch in self.store.watch_prefix(self.layout.base, view.revision + 1):
            view.apply(batch)
            touched = {parts[1] for e in batch.events
                       if (parts := self.layout.vote_parts(e.key)) is not None}
            live = list(view.members)
            for backend in touched:
                votes = {(SERVICE, backend, n): view.votes[(SERVICE, backend, n)]
                         for n in live if (SERVICE, backend, n) in view.votes}
                up = backend in agree({SERVICE: [backend]}, live, votes)[SERVICE]
                if self.agreed.get(backend) != up:
                    self.agreed[backend] = up
                    self.changed[backend] = time.monotonic()
                    self.wake.set()


def _backends(n: int) -> list[str]:
    return [f"10.{i // 250}.{i % 250 + 1}.1:8080" for i in range(n)]


def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


async def run_size(etcd: Etcd, n: int, b: int, trials: int, watchers: int,
                   deadline: float) -> dict[str, Any]:
    layout = Layout(f"scale-{n}-{b}-{random.randrange(1 << 30):x}")
    backends = _backends(b)
    members = [Member(f"m{i:03d}", Store(etcd.urls, REQUEST_TIMEOUT), layout, backends)
               for i in range(n)]
    tasks: list[asyncio.Task[None]] = []
    row: dict[str, Any] = {"members": n, "backends": b, "vote_keys": n * b}
    try:
        for m in members:
            m.store.connect()
        await asyncio.gather(*(m.join() for m in members))
        tasks += [asyncio.create_task(m.keep()) for m in members]
        t0 = time.monotonic()
        written = sum(await asyncio.gather(*(m.populate() for m in members)))
        row["populate_s"] = round(time.monotonic() - t0, 2)
        row["populate_writes_per_s"] = round(written / (time.monotonic() - t0))
        row["etcd_rss_mb"] = round(etcd.rss_mb(), 1)
        row["etcd_db_mb"] = round(etcd.db_mb(), 1)
        followers = members[:watchers]
        t0 = time.monotonic()
        await asyncio.gather(*(m.read() for m in followers))
        row["first_read_ms"] = round((time.monotonic() - t0) * 1000 / len(followers), 1)
        row["read"] = ",".join(sorted({m.read_mode for m in followers}))
        view = followers[0].view
        assert view is not None
        t0 = time.perf_counter()
        view.agreed({SERVICE: backends})
        row["full_agree_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        tasks += [asyncio.create_task(m.follow()) for m in followers]
        await asyncio.sleep(0.2)  # let the watches be created before the first flip
        latencies: list[float] = []
        flip_rates: list[float] = []
        timeouts = 0
        for t in range(trials):
            if time.monotonic() > deadline:
                break
            backend = backends[(t // 2) % b]
            up = t % 2 == 1
            for m in followers:
                m.wake.clear()
            start = time.monotonic()
            await asyncio.gather(*(m.vote(backend, up) for m in members))
            flip_rates.append(n / (time.monotonic() - start))
            limit = start + FLIP_TIMEOUT
            while not all(m.agreed.get(backend) == up for m in followers):
                if time.monotonic() > limit:
                    break
                waits = [asyncio.create_task(m.wake.wait()) for m in followers]
                await asyncio.wait(waits, timeout=max(0.0, limit - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
                for m in followers:
                    m.wake.clear()
            if all(m.agreed.get(backend) == up for m in followers):
                latencies.append((max(m.changed[backend] for m in followers) - start) * 1000)
            else:
                timeouts += 1
        row["flips"] = len(latencies)
        row["flip_timeouts"] = timeouts
        row["agree_p50_ms"] = None if not latencies else round(_pct(latencies, 50) or 0, 1)
        row["agree_p99_ms"] = None if not latencies else round(_pct(latencies, 99) or 0, 1)
        row["flip_writes_per_s"] = round(sum(flip_rates) / len(flip_rates)) if flip_rates else None
        row["watchers"] = len(followers)
    except ConsensusError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        print(f"{n} x {b}: {row['error']}", file=sys.stderr)
    finally:
        row["leases_lost"] = sum(m.leases_lost for m in members)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for m in members:
            if m.keeper.lease is not None:
                try:
                    await m.store.revoke(m.keeper.lease.id)
                except ConsensusError:
                    pass
            await m.store.close()
    return row


def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


COLUMNS = [("members", "members"), ("backends", "backends"), ("vote_keys", "vote keys"),
           ("populate_writes_per_s", "populate w/s"), ("agree_p50_ms", "agree p50 ms"),
           ("agree_p99_ms", "agree p99 ms"), ("flips", "flips"),
           ("flip_writes_per_s", "flip w/s"), ("etcd_rss_mb", "rss MB"), ("etcd_db_mb", "db MB"),
           ("full_agree_ms", "full agree ms"), ("first_read_ms", "first read ms"),
           ("read", "read"), ("watchers", "watchers"), ("leases_lost", "leases lost")]


def print_table(rows: list[dict[str, Any]]) -> None:
    table = [[h for _, h in COLUMNS]] + [[_fmt(r.get(k)) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    for r in table:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


async def main_async(args: argparse.Namespace, etcd: Etcd) -> list[dict[str, Any]]:
    deadline = time.monotonic() + args.max_seconds
    rows = []
    for n in args.members:
        for b in args.backends:
            if time.monotonic() > deadline:
                print(f"skipped {n} x {b}: --max-seconds reached", file=sys.stderr)
                continue
            print(f"{n} members x {b} backends ...", file=sys.stderr, flush=True)
            rows.append(await run_size(etcd, n, b, args.trials, args.watchers, deadline))
            etcd.compact()
    return rows


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=_ints, default=[10, 50, 100])
    parser.add_argument("--backends", type=_ints, default=[100, 1000])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--watchers", type=int, default=10,
                        help="members that also follow and compute the agreed set")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not (1 <= args.trials <= 200 and all(1 <= n <= 200 for n in args.members)
            and all(1 <= b <= 5000 for b in args.backends) and 1 <= args.watchers <= 200):
        parser.error("trials 1-200, members 1-200, backends 1-5000, watchers 1-200")
    if shutil.which("etcd") is None:
        parser.error("etcd is not installed (scripts/install.sh)")
    base = Path(tempfile.mkdtemp(prefix="alb-etcd-scale-", dir="/var/tmp"))
    etcd = Etcd(base)
    try:
        etcd.start()
        rows = asyncio.run(main_async(args, etcd))
    finally:
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
