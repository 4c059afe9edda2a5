"""The etcd adapter against a real single-member etcd (no mock)."""

from __future__ import annotations

import asyncio
import time

import pytest

from anycast_lb.consensus.store import Delete, LeaseKeeper, ModRevisionIs, Put, Store, WatchBatch
from anycast_lb.errors import ConsensusCompacted, ConsensusConflict, ConsensusUnavailable, LeaseLost
from tests.component.etcd import EtcdMember
from tests.waiting import wait_until


async def test_put_get_and_prefix_at_a_revision(etcd_member: EtcdMember, etcd_cluster: str) -> None:
    p = f"/{etcd_cluster}/"
    async with Store([etcd_member.client_url], 2.0) as store:
        r1 = await store.put(p + "a", b"1")
        r2 = await store.put(p + "b", b"2")
        await store.put(p + "a", b"3")
        rev, kv = await store.get(p + "a")
        assert kv is not None and kv.value == b"3" and rev >= r2
        _, missing = await store.get(p + "zz", linearizable=False)
        assert missing is None
        old = await store.get_prefix(p, revision=r2)
        assert [(i.key, i.value) for i in old.items] == [(p + "a", b"1"), (p + "b", b"2")]
        assert old.revision == r2 and old.items[0].mod_revision == r1
        now = await store.get_prefix(p)
        assert [i.value for i in now.items] == [b"3", b"2"]


async def test_compare_and_put_refuses_a_moved_key(etcd_member: EtcdMember, etcd_cluster: str) -> None:
    key = f"/{etcd_cluster}/current"
    async with Store([etcd_member.client_url], 2.0) as store:
        rev = await store.compare_and_put(key, b"v1", mod_revision=0)
        with pytest.raises(ConsensusConflict):
            await store.compare_and_put(key, b"again", mod_revision=0)
        rev2 = await store.compare_and_put(key, b"v2", mod_revision=rev,
                                           also=[Put(key + "/h2", b"x")])
        with pytest.raises(ConsensusConflict):
            await store.compare_and_put(key, b"stale", mod_revision=rev)
        _, kv = await store.get(key)
        assert kv is not None and kv.value == b"v2" and kv.mod_revision == rev2
        ok, _ = await store.transact([ModRevisionIs(key, rev2)], [Delete(key + "/h2")])
        assert ok and (await store.get(key + "/h2"))[1] is None


async def test_watch_from_a_revision_sees_every_change_once(etcd_member: EtcdMember, etcd_cluster: str) -> None:
    p = f"/{etcd_cluster}/w/"
    async with Store([etcd_member.client_url], 2.0) as store:
        start = await store.put(p + "k0", b"before") + 1
        await store.put(p + "k1", b"a")
        await store.delete(p + "k0")
        seen: list[tuple[str, str, bytes]] = []

        async def consume() -> None:
            batch: WatchBatch
            async for batch in store.watch_prefix(p, start):
                seen.extend((e.kind, e.key, e.value) for e in batch.events)

        task = asyncio.create_task(consume())
        try:
            await wait_until(lambda: len(seen) == 2, what="history replayed")
            await store.put(p + "k2", b"live")
            await store.put(f"/{etcd_cluster}/other", b"not watched")
            await wait_until(lambda: len(seen) == 3, what="live event")
        finally:
            task.cancel()
        assert seen == [("put", p + "k1", b"a"), ("delete", p + "k0", b""), ("put", p + "k2", b"live")]


async def test_watch_resumes_after_etcd_restarts(etcd_private: EtcdMember) -> None:
    async with Store([etcd_private.client_url], 1.0, watch_backoff=0.05) as store:
        start = await store.put("/r/k", b"0")
        seen: list[bytes] = []
        losses: list[Exception] = []

        async def consume() -> None:
            async for batch in store.watch_prefix("/r/", start + 1, losses.append):
                seen.extend(e.value for e in batch.events)

        task = asyncio.create_task(consume())
        try:
            await store.put("/r/k", b"1")
            await wait_until(lambda: seen == [b"1"], what="first event")
            etcd_private.stop()
            await wait_until(lambda: bool(losses), what="watch loss noticed")
            etcd_private.start()

            async def put_again() -> bool:
                try:
                    await store.put("/r/k", b"2")
                except ConsensusUnavailable:
                    return False  # the channel reconnects within its 1 s back-off cap
                return True

            await wait_until(put_again, timeout=5, what="etcd writable again")
            await wait_until(lambda: seen == [b"1", b"2"], timeout=10, what="event after restart")
        finally:
            task.cancel()


async def test_compacted_revision_is_its_own_error(etcd_member: EtcdMember, etcd_cluster: str) -> None:
    key = f"/{etcd_cluster}/c"
    async with Store([etcd_member.client_url], 2.0) as store:
        first = await store.put(key, b"1")
        last = await store.put(key, b"2")
        assert store._kv is not None
        await store._kv.compact(last)
        with pytest.raises(ConsensusCompacted):
            await store.get_prefix(key, revision=first)
        with pytest.raises(ConsensusCompacted):
            async for _ in store.watch_prefix(key, first):
                break


async def test_lease_keys_vanish_when_keepalives_stop(etcd_member: EtcdMember, etcd_cluster: str) -> None:
    key = f"/{etcd_cluster}/members/n1"
    async with Store([etcd_member.client_url], 2.0) as store:
        keeper = LeaseKeeper(store, ttl=1.0)
        lease = await keeper.grant()
        assert lease.ttl >= 1
        await store.put(key, b"n1", lease=lease.id)
        task = asyncio.create_task(keeper.run())
        try:
            before = keeper.last_ok
            await wait_until(lambda: keeper.last_ok != before, timeout=3, what="a keepalive")
            assert keeper.silent_for() < 1.0
        finally:
            task.cancel()
        stopped = time.monotonic()

        async def gone() -> bool:
            return (await store.get(key))[1] is None

        await wait_until(gone, timeout=5, interval=0.05, what="key expiry")
        assert time.monotonic() - stopped < 4
        with pytest.raises(LeaseLost):
            await store.keepalive(lease.id)


async def test_every_call_is_bounded_when_etcd_is_gone(etcd_private: EtcdMember) -> None:
    async with Store([etcd_private.client_url], 0.3) as store:
        await store.put("/x", b"1")
        etcd_private.stop()
        for call in (store.get("/x"), store.put("/x", b"2"), store.grant(2.0),
                     store.get_prefix("/", linearizable=False)):
            started = time.monotonic()
            with pytest.raises(ConsensusUnavailable):
                await call
            assert time.monotonic() - started < 0.6
