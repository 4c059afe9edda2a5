"""Flow ownership (pure): own-flow deltas, the sequence and snapshot rules,
peer expiry on a fake clock, and the steering map diff against its shadow."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from anycast_lb.clock import FakeClock
from anycast_lb.cluster.ownership import (
    Delta,
    LocalFlows,
    Membership,
    Snapshot,
    Steering,
)

VIP = "198.51.100.10"
EXPIRY = 0.4
REQUEST = 0.2
E1, E2 = 11, 22  # epochs


def key(n: int) -> tuple[str, int, str, int]:
    return ("203.0.113.7", 40000 + n, VIP, 80)


A, B, C = key(1), key(2), key(3)


def live_members(peers: int = 2, clock: FakeClock | None = None) -> Membership:
    """Peers that have heartbeated (receiver on, in sync at seq 0)."""
    m = Membership(peers, EXPIRY, REQUEST)
    now = clock.monotonic() if clock else 0.0
    for i in range(peers):
        m.on_heartbeat(i, now, E1 + i, 0, receiver=True)
    return m


# ------------------------------------------------------------------ LocalFlows

def test_local_flow_opened_and_closed_within_one_delta_is_never_published() -> None:
    local = LocalFlows()
    local.opened(A, 1000)
    local.closed(A)
    assert local.take_delta() == ({}, [], {A})
    assert len(local) == 0


def test_local_deltas_publish_opens_closes_and_reopens() -> None:
    local = LocalFlows()
    local.opened(A, 1000)
    local.opened(B, 1001)
    assert local.take_delta()[:2] == ({A: 1000, B: 1001}, [])
    local.closed(A)
    local.closed(C)  # never opened: ignored
    assert local.take_delta()[:2] == ({}, [A])
    local.closed(B)
    local.opened(B, 2000)  # the 4-tuple reused: published again with its new time
    assert local.take_delta()[:2] == ({B: 2000}, [])
    assert local.take_delta() == ({}, [], set())
    assert local.owned == {B: 2000}


def test_local_flow_younger_than_min_age_waits_and_is_published_once_of_age() -> None:
    local = LocalFlows()
    local.opened(A, 1000)
    assert local.take_delta(1100, 200) == ({}, [], {A})
    assert local.next_due_ms == 1200
    assert local.published() == {}
    local.opened(B, 1150)
    assert local.take_delta(1199, 200) == ({}, [], {B})  # A still one ms short
    assert local.next_due_ms == 1200
    assert local.take_delta(1200, 200)[:2] == ({A: 1000}, [])
    assert local.next_due_ms == 1350
    assert local.published() == {A: 1000}
    assert local.take_delta(1400, 200) == ({B: 1150}, [], set())
    assert local.next_due_ms is None
    assert local.published() == {A: 1000, B: 1150}


def test_local_flow_closed_before_min_age_is_never_published() -> None:
    local = LocalFlows()
    local.opened(A, 1000)
    assert local.take_delta(1010, 200)[:2] == ({}, [])
    local.closed(A)
    assert local.take_delta(1050, 200) == ({}, [], {A})
    assert local.take_delta(5000, 200) == ({}, [], set())
    assert local.next_due_ms is None and len(local) == 0


def test_local_removal_of_published_flow_is_not_held_back_by_min_age() -> None:
    local = LocalFlows()
    local.opened(A, 1000)
    assert local.take_delta(2000, 200)[:2] == ({A: 1000}, [])
    local.closed(A)
    local.opened(A, 2100)  # the 4-tuple reused: the old claim (ours) stands until of age
    assert local.take_delta(2150, 200)[:2] == ({}, [])
    assert local.published() == {A: 2100}
    assert local.take_delta(2300, 200)[:2] == ({A: 2100}, [])
    local.closed(A)
    assert local.take_delta(2310, 200)[:2] == ({}, [A])


# ------------------------------------------------------------------ sequences

def test_deltas_in_order_apply_and_a_duplicate_is_ignored() -> None:
    m = Membership(1, EXPIRY, REQUEST)
    e = m.on_delta(0, 0.0, E1, Delta(1, {A: 5}))
    assert m.peers[0].in_sync and not e.want_snapshot and e.touched == {A} and e.added == [5]
    e = m.on_delta(0, 0.0, E1, Delta(2, {B: 6}, (A,)))
    assert m.peers[0].flows == {B: 6} and e.touched == {A, B}
    e = m.on_delta(0, 0.0, E1, Delta(2, {C: 7}))
    assert m.peers[0].flows == {B: 6} and e.touched == set() and e.added == []


def test_a_gap_applies_the_delta_marks_out_of_sync_and_asks_for_a_snapshot() -> None:
    m = Membership(1, EXPIRY, REQUEST)
    m.on_delta(0, 0.0, E1, Delta(1, {A: 5}))
    e = m.on_delta(0, 0.0, E1, Delta(3, {C: 7}))
    peer = m.peers[0]
    assert e.gap and e.want_snapshot and not peer.in_sync
    assert peer.flows == {A: 5, C: 7} and peer.seq == 3 and peer.gaps == 1
    # Asked once per request interval, not once per datagram.
    assert not m.on_delta(0, 0.1, E1, Delta(4, {})).want_snapshot
    assert m.on_delta(0, 0.1 + REQUEST, E1, Delta(5, {})).want_snapshot


def test_first_delta_of_an_unknown_epoch_other_than_seq_1_is_out_of_sync() -> None:
    m = Membership(1, EXPIRY, REQUEST)
    e = m.on_delta(0, 0.0, E1, Delta(7, {A: 5}))
    assert e.want_snapshot and not m.peers[0].in_sync and m.peers[0].flows == {A: 5}


def test_heartbeat_ahead_of_the_last_delta_means_tail_loss() -> None:
    m = Membership(1, EXPIRY, REQUEST)
    m.on_delta(0, 0.0, E1, Delta(1, {A: 5}))
    assert not m.on_heartbeat(0, 0.0, E1, 1, receiver=True).want_snapshot
    assert m.peers[0].in_sync
    e = m.on_heartbeat(0, 0.05, E1, 2, receiver=True)
    assert e.want_snapshot and not m.peers[0].in_sync


def test_fresh_epoch_heartbeat_at_seq_0_is_in_sync_and_empty() -> None:
    m = Membership(1, EXPIRY, REQUEST)
    e = m.on_heartbeat(0, 0.0, E1, 0, receiver=True, name="lb2", owned=0)
    peer = m.peers[0]
    assert peer.in_sync and peer.alive and peer.steerable and peer.name == "lb2"
    assert e.liveness_changed and not e.want_snapshot


# ------------------------------------------------------------------ snapshots

def test_snapshot_replaces_flows_and_replays_later_deltas() -> None:
    m = Membership(1, EXPIRY, REQUEST)
    m.on_delta(0, 0.0, E1, Delta(1, {A: 5, B: 6}))
    # Delta 2 (removing A) is lost; 3 arrives.
    m.on_delta(0, 0.0, E1, Delta(3, {C: 7}))
    assert m.peers[0].flows == {A: 5, B: 6, C: 7}
    # The snapshot was taken after delta 2: A is gone there.
    e = m.on_snapshot(0, 0.0, E1, Snapshot(2, {B: 6}))
    peer = m.peers[0]
    assert peer.flows == {B: 6, C: 7} and peer.in_sync and peer.seq == 3
    assert e.touched == {A} and not e.want_snapshot


def test_snapshot_before_a_gap_cannot_repair_it() -> None:
    m = Membership(1, EXPIRY, REQUEST)
    m.on_delta(0, 0.0, E1, Delta(1, {A: 5}))
    m.on_delta(0, 0.0, E1, Delta(3, {C: 7}))  # 2 lost
    e = m.on_snapshot(0, 1.0, E1, Snapshot(1, {A: 5}))
    assert not m.peers[0].in_sync and e.want_snapshot
    assert m.peers[0].flows == {A: 5, C: 7}


def test_snapshot_when_in_sync_and_recent_deltas_cover_it_changes_nothing() -> None:
    m = Membership(1, EXPIRY, REQUEST)
    m.on_delta(0, 0.0, E1, Delta(1, {A: 5}))
    m.on_delta(0, 0.0, E1, Delta(2, {B: 6}))
    e = m.on_snapshot(0, 0.0, E1, Snapshot(1, {A: 5}))
    assert e.touched == set() and m.peers[0].flows == {A: 5, B: 6} and m.peers[0].in_sync


def test_snapshot_parts_assemble_and_a_new_snapshot_id_starts_over() -> None:
    m = Membership(1, EXPIRY, REQUEST)
    m.on_heartbeat(0, 0.0, E1, 4, receiver=True)  # out of sync: wants a snapshot
    assert not m.on_snapshot_part(0, 0.0, E1, 4, 1, 0, 2, {A: 5}).touched
    # Part 1 of snapshot 1 is lost; snapshot 2 arrives whole.
    m.on_snapshot_part(0, 0.1, E1, 4, 2, 1, 2, {B: 6})
    assert m.peers[0].flows == {}
    e = m.on_snapshot_part(0, 0.1, E1, 4, 2, 0, 2, {A: 5})
    assert m.peers[0].flows == {A: 5, B: 6} and m.peers[0].in_sync and e.touched == {A, B}


# ------------------------------------------------------------------ epochs, expiry

def test_new_epoch_sends_the_old_incarnations_flows_to_the_dead_set() -> None:
    m = live_members(1)
    m.on_delta(0, 0.0, E1, Delta(1, {A: 5, B: 6}))
    e = m.on_heartbeat(0, 1.0, E2, 0, receiver=True)
    assert sorted(e.dead) == [A, B] and e.touched == {A, B}
    assert m.peers[0].flows == {} and m.peers[0].in_sync and m.peers[0].epoch == E2


def test_peer_expiry_on_a_fake_clock() -> None:
    clock = FakeClock()
    m = live_members(2, clock)
    t0 = clock.monotonic()
    m.on_delta(0, t0, E1, Delta(1, {A: 5}))
    assert m.next_expiry() == t0 + EXPIRY
    assert not m.expire(t0 + EXPIRY).liveness_changed  # exactly at expiry: still live
    m.on_heartbeat(1, t0 + 0.3, E1 + 1, 0, receiver=True)  # peer 1 keeps talking
    e = m.expire(t0 + EXPIRY + 0.001)
    assert e.liveness_changed and e.dead == [A] and e.touched == {A}
    assert m.steerable() == (1,)
    assert m.expire(t0 + EXPIRY + 0.002).dead == []  # dies once
    # Heard again with the same epoch: its flows count again.
    e = m.on_heartbeat(0, t0 + 1.0, E1, 1, receiver=True)
    assert e.liveness_changed and e.touched == {A} and e.dead == []
    assert m.peers[0].flows == {A: 5} and m.steerable() == (0, 1)


def test_a_leaving_peer_is_dead_at_once() -> None:
    m = live_members(1)
    m.on_delta(0, 0.0, E1, Delta(1, {A: 5}))
    e = m.on_heartbeat(0, 0.1, E1, 1, receiver=False, leaving=True)
    assert e.dead == [A] and e.liveness_changed and m.steerable() == ()


def test_a_peer_without_its_steering_receiver_is_live_but_never_steered_to() -> None:
    m = Membership(1, EXPIRY, REQUEST)
    m.on_heartbeat(0, 0.0, E1, 0, receiver=False)
    m.on_delta(0, 0.0, E1, Delta(1, {A: 5}))
    steering = Steering(m, LocalFlows())
    assert m.peers[0].alive and m.steerable() == ()
    assert steering.plan({A}).add == ()
    e = m.on_heartbeat(0, 0.1, E1, 1, receiver=True)
    assert e.liveness_changed and A in e.touched
    assert steering.plan(e.touched).add == ((A, 0),)


# ------------------------------------------------------------------ steering

def test_plan_adds_moves_and_deletes_against_the_shadow() -> None:
    m = live_members(2)
    steering = Steering(m, LocalFlows())
    e = m.on_delta(0, 0.0, E1, Delta(1, {A: 5, B: 6}))
    plan = steering.plan(e.touched)
    assert set(plan.add) == {(A, 0), (B, 0)} and plan.delete == ()
    steering.commit(plan)
    # Peer 1 accepts A's 4-tuple later (newer claim): A moves to peer 1.
    e = m.on_delta(1, 0.0, E1 + 1, Delta(1, {A: 9}))
    plan = steering.plan(e.touched)
    assert plan.delete == (A,) and plan.add == ((A, 1),)
    steering.commit(plan)
    e = m.on_delta(0, 0.0, E1, Delta(2, {}, (B,)))
    plan = steering.plan(e.touched)
    assert plan.delete == (B,) and plan.add == ()
    steering.commit(plan)
    assert steering.shadow == {A: 1} == steering.desired()
    assert steering.plan({A, B, C}).empty  # nothing to do: no delete of a missing key


def test_our_own_newer_flow_wins_and_an_older_one_is_stale() -> None:
    m = live_members(1)
    local = LocalFlows()
    steering = Steering(m, local)
    local.opened(A, 100)  # ours, accepted at 100 ms
    m.on_delta(0, 0.0, E1, Delta(1, {A: 50, B: 60}))  # the peer's claim on A is older
    plan = steering.plan({A, B})
    assert plan.add == ((B, 0),) and plan.stale_local == ()
    m.on_delta(0, 0.0, E1, Delta(2, {A: 200}))  # the peer's claim is now newer
    plan = steering.plan({A})
    assert plan.add == ((A, 0),) and plan.stale_local == (A,)


def test_dead_peer_flows_leave_the_map_and_enter_the_dead_set() -> None:
    clock = FakeClock()
    m = live_members(1, clock)
    steering = Steering(m, LocalFlows())
    e = m.on_delta(0, clock.monotonic(), E1, Delta(1, {A: 5}))
    steering.commit(steering.plan(e.touched))
    e = m.expire(clock.monotonic() + 1.0)
    plan = steering.plan(e.touched, e.dead)
    assert plan.delete == (A,) and plan.dead == (A,) and plan.add == ()


# A random walk over peers' deltas, deaths and our own flows: after each
# plan and commit the shadow equals the desired map, and a plan never deletes
# a key the shadow lacks (which would abort the nft transaction).
_op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 5), st.integers(0, 9)),
    st.tuples(st.just("remove"), st.integers(0, 2), st.integers(0, 5), st.just(0)),
    st.tuples(st.just("die"), st.integers(0, 2), st.just(0), st.just(0)),
    st.tuples(st.just("hello"), st.integers(0, 2), st.just(0), st.just(0)),
    st.tuples(st.just("open"), st.just(0), st.integers(0, 5), st.integers(0, 9)),
    st.tuples(st.just("close"), st.just(0), st.integers(0, 5), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=40))
def test_shadow_always_matches_desired_and_deletes_only_what_it_holds(
    ops: list[tuple[str, int, int, int]],
) -> None:
    m = live_members(3)
    local = LocalFlows()
    steering = Steering(m, local)
    seqs = [0, 0, 0]
    now = 0.0
    for op, peer, k, since in ops:
        now += 0.01
        if op in ("add", "remove"):
            seqs[peer] += 1
            delta = Delta(seqs[peer], {key(k): since}) if op == "add" else Delta(
                seqs[peer], {}, (key(k),))
            e = m.on_delta(peer, now, E1 + peer, delta)
        elif op == "die":
            m.peers[peer].last_heard = now - 1.0
            e = m.expire(now)
        elif op == "hello":
            e = m.on_heartbeat(peer, now, E1 + peer, seqs[peer], receiver=True)
        else:
            local.opened(key(k), since) if op == "open" else local.closed(key(k))
            e = m.expire(now - 10)  # no-op effects
            e.touched |= local.take_delta()[2]
        plan = steering.plan(e.touched, e.dead)
        assert set(plan.delete) <= steering.shadow.keys()
        added = {k for k, _ in plan.add}
        assert not (added & steering.shadow.keys()) - set(plan.delete)
        steering.commit(plan)
        assert steering.shadow == steering.desired()
