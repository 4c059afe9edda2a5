"""Config history, membership and votes against a real single-member etcd."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from anycast_lb.consensus import document
from anycast_lb.consensus.history import ConfigHistory
from anycast_lb.consensus.keys import Layout
from anycast_lb.consensus.members import (
    MemberInfo,
    MemberWriter,
    VoteWriter,
    read_view,
    release_drain_slot,
    take_drain_slot,
)
from anycast_lb.consensus.semaphore import Held, Wait
from anycast_lb.consensus.store import LeaseKeeper, Store
from anycast_lb.errors import ConsensusConflict
from tests.component.etcd import EtcdMember
from tests.waiting import wait_until

B1, B2, B3 = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"


def shared_doc(*backends: str, med: int = 100) -> dict[str, Any]:
    return {
        "services": [{"name": "web", "vip": "198.51.100.10", "port": 80, "backends": [
            {"address": b.split(":")[0], "port": int(b.split(":")[1])} for b in backends]}],
        "announce": {"med": med},
    }


def cli(member: EtcdMember, cluster: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "anycast_lb", "cluster", "--endpoints", member.client_url,
            "--cluster", cluster, *args]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def test_push_show_history_diff_rollback(etcd_member: EtcdMember, etcd_cluster: str,
                                         tmp_path: Path) -> None:
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(yaml.safe_dump(shared_doc(B1, B2)))
    two.write_text(yaml.safe_dump(shared_doc(B1, B3, med=50)))
    first = cli(etcd_member, etcd_cluster, "push", str(one), "-m", "first pool", "--author", "ops")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("revision 1 (based on 0")
    second = cli(etcd_member, etcd_cluster, "push", str(two), "-m", "swap .2 for .3",
                 "--based-on", "1", "--author", "ops")
    assert second.returncode == 0, second.stderr

    shown = cli(etcd_member, etcd_cluster, "show")
    assert shown.returncode == 0 and "# revision 2 by ops" in shown.stdout
    body = yaml.safe_load(shown.stdout)
    assert [b["address"] for b in body["services"][0]["backends"]] == ["10.0.0.1", "10.0.0.3"]

    hist = cli(etcd_member, etcd_cluster, "history", "--json")
    rows = json.loads(hist.stdout)
    assert [(r["revision"], r["based_on"], r["author"], r["message"]) for r in rows] == [
        (1, 0, "ops", "first pool"), (2, 1, "ops", "swap .2 for .3")]
    assert rows[0]["etcd_revision"] < rows[1]["etcd_revision"]

    diff = cli(etcd_member, etcd_cluster, "diff", "1")
    assert diff.returncode == 0
    changed = [line for line in diff.stdout.splitlines() if line[:1] in "+-"]
    assert "-  - address: 10.0.0.2" in changed and "+  - address: 10.0.0.3" in changed
    assert "-  med: 100" in changed and "+  med: 50" in changed

    back = cli(etcd_member, etcd_cluster, "rollback", "1", "-m", "pool .3 misbehaves")
    assert back.returncode == 0 and back.stdout.strip() == "revision 3: rollback to 1: pool .3 misbehaves"
    assert cli(etcd_member, etcd_cluster, "diff", "1", "3").stdout == ""


def test_push_refuses_an_invalid_file_and_a_stale_base(etcd_member: EtcdMember, etcd_cluster: str,
                                                       tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"services": [{"name": "web", "vip": "198.51.100.10",
                                                 "port": True, "backends": []}]}))
    refused = cli(etcd_member, etcd_cluster, "push", str(bad))
    assert refused.returncode == 2
    assert "services[0].port" in refused.stderr and "services[0].backends" in refused.stderr

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(shared_doc(B1)))
    assert cli(etcd_member, etcd_cluster, "push", str(good)).returncode == 0
    assert cli(etcd_member, etcd_cluster, "push", str(good)).returncode == 0
    stale = cli(etcd_member, etcd_cluster, "push", str(good), "--based-on", "1")
    assert stale.returncode == 1
    assert "push refused" in stale.stderr and "revision 2 is current" in stale.stderr


async def test_concurrent_pushes_never_lose_an_update(etcd_member: EtcdMember,
                                                      etcd_cluster: str) -> None:
    shared = document.from_data(shared_doc(B1))
    async with Store([etcd_member.client_url], 2.0) as store:
        hist = ConfigHistory(store, Layout(etcd_cluster))
        await hist.push(shared, author="t", message="base")
        outcomes = await asyncio.gather(
            *(hist.push(shared, author=f"p{i}", message="race", based_on=1) for i in range(6)),
            return_exceptions=True)
        wins = [o for o in outcomes if not isinstance(o, BaseException)]
        conflicts = [o for o in outcomes if isinstance(o, ConsensusConflict)]
        assert len(wins) == 1 and len(conflicts) == 5, outcomes
        revs = await hist.history()
        assert [(r.number, r.based_on) for r in revs] == [(1, 0), (2, 1)]


async def test_watch_delivers_a_push(etcd_member: EtcdMember, etcd_cluster: str) -> None:
    layout = Layout(etcd_cluster)
    async with Store([etcd_member.client_url], 2.0) as store:
        view = await read_view(store, layout)
        assert view.config_revision == 0
        got: list[float] = []

        async def follow() -> None:
            async for batch in store.watch_prefix(layout.base, view.revision + 1):
                view.apply(batch)
                if view.config_revision:
                    got.append(time.monotonic())

        task = asyncio.create_task(follow())
        try:
            hist = ConfigHistory(store, layout)
            sent = time.monotonic()
            pushed = await hist.push(document.from_data(shared_doc(B1, B2)), author="t", message="m")
            await wait_until(lambda: bool(got), what="push seen by the watch")
        finally:
            task.cancel()
        assert view.config_revision == pushed.number and view.revision == pushed.etcd_revision
        assert got[0] - sent < 1.0
        applied = await hist.get(view.config_revision, linearizable=False)
        assert applied.shared == document.from_data(shared_doc(B1, B2))


async def test_lease_expiry_removes_a_members_votes(etcd_member: EtcdMember,
                                                    etcd_cluster: str) -> None:
    layout = Layout(etcd_cluster)
    services = {"web": [B1, B2]}
    async with Store([etcd_member.client_url], 2.0) as store:
        keepers = {}
        tasks = []
        for name, b1_up in (("a", True), ("b", True), ("c", False)):
            keeper = LeaseKeeper(store, ttl=1.0)
            lease = await keeper.grant()
            await MemberWriter(store, layout, MemberInfo(name, "127.0.0.1:9180", "", "t", 0.0)
                               ).register(lease.id)
            votes = VoteWriter(store, layout, name)
            await votes.vote("web", B1, b1_up, lease.id)
            await votes.vote("web", B2, name == "c", lease.id)
            keepers[name] = keeper
            tasks.append((name, asyncio.create_task(keeper.run())))
        try:
            view = await read_view(store, layout)
            assert sorted(view.members) == ["a", "b", "c"] and len(view.votes) == 6
            assert view.agreed(services) == {"web": frozenset({B1})}
            # b stops keeping its lease (a crash): its member key and votes go.
            dict(tasks)["b"].cancel()

            async def b_gone() -> bool:
                v = await read_view(store, layout)
                return "b" not in v.members and all(n != "b" for _, _, n in v.votes)

            await wait_until(b_gone, timeout=5, interval=0.05, what="b's lease expiry")
            view = await read_view(store, layout)
            assert sorted(view.members) == ["a", "c"]
            # B1: a up, c down -> tie -> down. B2: a down, c up -> tie -> down.
            assert view.agreed(services) == {"web": frozenset()}
        finally:
            for _, t in tasks:
                t.cancel()


async def test_drain_slots_admit_one_node_at_a_time(etcd_member: EtcdMember,
                                                    etcd_cluster: str) -> None:
    layout = Layout(etcd_cluster)
    async with Store([etcd_member.client_url], 2.0) as store:
        la, lb = await store.grant(5), await store.grant(5)
        first = await take_drain_slot(store, layout, "a", 1, la.id, 0.0)
        second = await take_drain_slot(store, layout, "b", 1, lb.id, 0.0)
        assert first == Held(0) and second == Wait(("a",))
        assert await take_drain_slot(store, layout, "a", 1, la.id, 0.0) == Held(0)
        await release_drain_slot(store, layout, 0)
        assert await take_drain_slot(store, layout, "b", 1, lb.id, 0.0) == Held(0)
        racers = await asyncio.gather(*(take_drain_slot(store, layout, n, 2, la.id, 0.0)
                                        for n in ("c", "d", "e")))
        assert sorted(type(r).__name__ for r in racers) == ["Held", "Wait", "Wait"]


def test_members_command(etcd_member: EtcdMember, etcd_cluster: str) -> None:
    layout = Layout(etcd_cluster)
    info = MemberInfo("lb7", "127.0.0.1:9187", "203.0.113.7", "0.1.0", 1_700_000_000.0)

    async def register() -> None:
        async with Store([etcd_member.client_url], 2.0) as store:
            lease = await store.grant(30)
            await MemberWriter(store, layout, info).register(lease.id)

    asyncio.run(register())
    shown = cli(etcd_member, etcd_cluster, "members", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["members"] == [info.__dict__]


@pytest.mark.parametrize("args", [["--endpoints", "http://localhost:1"], ["--cluster", "x"]])
def test_cluster_commands_need_a_target(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "anycast_lb", "cluster", *args, "history"],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2


async def test_votes_changed_together_land_in_one_revision(etcd_member: EtcdMember,
                                                           etcd_cluster: str) -> None:
    """A node's changed votes go in one transaction: the others see them in
    one watch batch at one revision, so the agreed set moves once."""
    layout = Layout(etcd_cluster)
    async with Store([etcd_member.client_url], 2.0) as store:
        lease = await LeaseKeeper(store, ttl=5.0).grant()
        votes = VoteWriter(store, layout, "a")
        first = await votes.vote_many({("web", B1): True, ("web", B2): True,
                                       ("dns", B1): True}, lease.id)
        assert len(first) == 3
        view = await read_view(store, layout)
        batches: list[list[int]] = []

        async def follow() -> None:
            async for batch in store.watch_prefix(layout.votes, view.revision + 1):
                batches.append([e.mod_revision for e in batch.events])

        task = asyncio.create_task(follow())
        try:
            written = await votes.vote_many({("web", B1): False, ("web", B2): True,
                                             ("dns", B1): False}, lease.id)
            assert written == [("dns", B1, False), ("web", B1, False)]   # B2 unchanged
            await wait_until(lambda: sum(map(len, batches)) >= 2,
                             what="both votes through the watch")
        finally:
            task.cancel()
        assert len(batches) == 1 and len(set(batches[0])) == 1
        assert await votes.vote_many({("web", B1): False}, lease.id) == []
