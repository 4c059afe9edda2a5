"""The per-VIP election and fencing machine, driven with plain times (s)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anycast_lb.election.machine import (
    Action,
    Advertise,
    Announce,
    Campaign,
    Candidate,
    Drop,
    ElectionMachine,
    ElectionSettings,
    OwnerRecord,
    Resign,
    Role,
    Take,
)

LEASE = 77


def machine(node: str = "a", priority: int = 100, preempt: bool = False, ttl: float = 1.0,
            margin: float = 0.25, burst: tuple[float, ...] = ()) -> ElectionMachine:
    """A machine whose announcements stay out of the way unless ``burst`` is given."""
    return ElectionMachine(ElectionSettings(
        node=node, lease_ttl=ttl, safety_margin=margin, priority=priority, preempt=preempt,
        announce_burst=burst, announce_interval=1000.0))


def cand(node: str, priority: int = 100, preempt: bool = False) -> Candidate:
    return Candidate(node, priority, preempt)


def owner_of(m: ElectionMachine, term: int = 10, *, ttl: float = 1.0, at: float = 0.0) -> list[Action]:
    """Drive ``m`` to owning the VIP with ``term`` at time ``at``."""
    out = m.lease_granted(LEASE, ttl, at, at)
    out += m.set_qualifies(True, at)
    out += m.observe(None, (cand(m.settings.node, m.settings.priority),), term - 1, at)
    out += m.campaign_result(term, at)
    return out


def test_a_lone_candidate_advertises_campaigns_and_takes() -> None:
    m = machine()
    assert owner_of(m) == [Advertise(True), Campaign(), Take(10)]
    assert m.role is Role.OWNER and m.has_vip and m.state().term == 10


@pytest.mark.parametrize(
    ("ttl", "margin", "keepalives", "drop_at"),
    [
        (1.0, 0.25, [], 0.75),                  # never renewed after the grant
        (1.0, 0.25, [0.33, 0.66], 1.41),        # renewed twice, then cut off
        (2.0, 0.3, [0.6, 1.2, 1.8], 3.5),
        (1.0, 0.1, [0.33], 1.23),
    ],
)
def test_an_owner_that_cannot_renew_drops_before_its_lease_can_expire(
    ttl: float, margin: float, keepalives: list[float], drop_at: float
) -> None:
    m = machine(ttl=ttl, margin=margin)
    owner_of(m, ttl=ttl)
    for sent in keepalives:
        assert m.keepalive_ok(sent, sent + 0.01) == []
    deadline = m.next_wakeup(keepalives[-1] if keepalives else 0.0)
    assert deadline == pytest.approx(drop_at)
    assert Drop(10, "fenced") not in m.tick(deadline - 0.001)
    assert m.tick(deadline) == [Drop(10, "fenced")]
    # etcd counts the TTL from no earlier than the last keepalive's sending:
    # no other node can win before last_sent + ttl.
    last_sent = keepalives[-1] if keepalives else 0.0
    assert drop_at <= last_sent + ttl - margin < last_sent + ttl
    assert not m.has_vip and m.tick(drop_at + 5) == []


def test_a_fenced_owner_whose_lease_survived_takes_the_vip_again_and_announces() -> None:
    m = machine()
    owner_of(m)
    assert m.tick(0.75) == [Drop(10, "fenced")]
    # The keepalive sent at 0.7 was acknowledged late: the lease was alive
    # throughout, so the key is still ours and nobody else could win.
    assert m.keepalive_ok(0.7, 0.9) == [Take(10)]
    assert m.role is Role.OWNER and m.has_vip


def test_a_lost_lease_drops_the_vip_and_campaigns_only_with_a_new_lease() -> None:
    m = machine()
    owner_of(m)
    assert m.lease_lost(0.5) == [Drop(10, "lease_lost")]
    assert m.role is Role.STANDBY
    assert m.observe(None, (), 12, 0.6) == []
    assert m.lease_granted(78, 1.0, 0.7, 0.7) == [Advertise(True), Campaign()]


def test_terms_only_increase_a_stale_owner_is_ignored() -> None:
    m = machine("b")
    m.lease_granted(LEASE, 1.0, 0.0, 0.0)
    m.set_qualifies(True, 0.0)
    m.observe(OwnerRecord("a", 20, 5, True), (), 21, 0.0)
    assert m.state().term == 20 and m.role is Role.STANDBY
    m.observe(OwnerRecord("c", 7, 6, True), (), 30, 0.1)  # a lower term: stale
    assert m.state().owner == "a" and m.state().term == 20
    m.observe(None, (), 19, 0.2)  # an older revision than seen
    assert m.state().owner == "a"


@given(st.lists(st.tuples(st.sampled_from(["observe", "vacant", "win", "keepalive", "tick",
                                           "lost", "grant", "qualify", "unqualify"]),
                          st.integers(1, 50)), max_size=40))
def test_terms_taken_never_decrease(ops: list[tuple[str, int]]) -> None:
    m = machine()
    m.lease_granted(LEASE, 1.0, 0.0, 0.0)
    m.set_qualifies(True, 0.0)
    now, revision, taken, highest = 0.0, 0, [], 0
    for op, n in ops:
        now += n / 100
        revision += 1
        if op == "observe":
            out = m.observe(OwnerRecord("z", n, 9, True), (), revision, now)
        elif op == "vacant":
            out = m.observe(None, (), revision, now)
        elif op == "win":
            out = m.campaign_result(n, now)
        elif op == "keepalive":
            out = m.keepalive_ok(now, now)
        elif op == "lost":
            out = m.lease_lost(now)
        elif op == "grant":
            out = m.lease_granted(LEASE + n, 1.0, now, now)
        else:
            out = m.set_qualifies(op == "qualify", now) if op != "tick" else m.tick(now)
        taken += [a.term for a in out if isinstance(a, Take)]
        assert m.highest_term >= highest
        highest = m.highest_term
    assert taken == sorted(taken)


def test_an_own_record_below_the_highest_term_is_not_taken_again() -> None:
    # Found by test_terms_taken_never_decrease: a campaign won term 1 and
    # the VIP was taken; the lease was lost; a later campaign's answer (term
    # 2) came while there was no lease, so the term-1 record stayed; a lease
    # with the old id (etcd does not reuse ids, the machine must not rely on
    # it) made that stale record look like ours again.
    m = machine()
    m.set_qualifies(True, 0.0)
    m.lease_granted(LEASE, 1.0, 0.0, 0.0)
    assert Take(1) in m.campaign_result(1, 0.01)
    m.lease_lost(0.02)
    m.campaign_result(2, 0.03)
    out = m.lease_granted(LEASE, 1.0, 0.04, 0.04)
    assert not any(isinstance(a, Take) for a in out) and not m.has_vip
    assert m.role is not Role.OWNER


def test_a_draining_owner_resigns_and_drops_only_after_its_successor_announced() -> None:
    m = machine()
    owner_of(m)
    assert m.set_qualifies(False, 0.5) == [Advertise(False), Resign(10)]
    assert m.role is Role.RESIGNED and m.has_vip  # make before break
    assert m.observe(None, (cand("b"),), 12, 0.51) == []
    assert m.observe(OwnerRecord("b", 13, 8, False), (cand("b"),), 13, 0.52) == []
    assert m.has_vip
    assert m.observe(OwnerRecord("b", 13, 8, True), (cand("b"),), 14, 0.53) == [Drop(10, "resigned")]
    assert m.role is Role.STANDBY and m.state().owner == "b"


def test_a_resigned_owner_without_successor_drops_after_the_handover_timeout() -> None:
    m = machine()
    owner_of(m)
    m.keepalive_ok(0.3, 0.3)
    m.set_qualifies(False, 0.4)
    m.observe(None, (), 11, 0.41)
    m.keepalive_ok(0.6, 0.6)
    m.keepalive_ok(0.9, 0.9)
    assert m.next_wakeup(0.9) == pytest.approx(0.4 + m.settings.handover_timeout)
    assert m.tick(1.39) == []
    assert m.tick(1.4) == [Drop(10, "resigned")]


def test_a_resigned_owner_still_drops_at_its_fencing_deadline() -> None:
    m = machine()
    owner_of(m)
    m.set_qualifies(False, 0.5)
    assert m.tick(0.75) == [Drop(10, "fenced")]


@pytest.mark.parametrize(
    ("challenger", "resigns"),
    [
        (cand("b", 200, preempt=True), True),
        (cand("b", 200, preempt=False), False),   # preempt belongs to the challenger
        (cand("b", 100, preempt=True), False),    # equal priority never preempts
        (cand("b", 50, preempt=True), False),
    ],
)
def test_preemption_by_a_higher_priority_candidate(challenger: Candidate, resigns: bool) -> None:
    m = machine(priority=100)
    owner_of(m)
    out = m.observe(OwnerRecord("a", 10, LEASE, True), (cand("a"), challenger), 11, 0.2)
    assert out == ([Resign(10)] if resigns else [])
    assert m.has_vip


def test_a_preempted_owner_defers_to_the_preemptor_when_the_vip_is_vacant() -> None:
    m = machine(priority=100)
    owner_of(m)
    b = cand("b", 200, preempt=True)
    m.observe(OwnerRecord("a", 10, LEASE, True), (cand("a"), b), 11, 0.2)
    m.keepalive_ok(0.2, 0.2)
    assert m.observe(None, (cand("a"), b), 12, 0.21) == []
    assert m.observe(OwnerRecord("b", 13, 8, True), (cand("a"), b), 13, 0.22) == [
        Drop(10, "resigned")]


@pytest.mark.parametrize(
    ("me", "others", "campaigns_now"),
    [
        (cand("a", 100), [cand("b", 200)], False),
        (cand("a", 200), [cand("b", 100)], True),
        (cand("a", 100), [cand("b", 100)], True),    # equal priority: lower name first
        (cand("b", 100), [cand("a", 100)], False),
        (cand("a", 100), [], True),
    ],
)
def test_a_candidate_campaigns_first_only_when_nobody_ranks_above_it(
    me: Candidate, others: list[Candidate], campaigns_now: bool
) -> None:
    m = machine(me.node, me.priority)
    m.lease_granted(LEASE, 1.0, 0.0, 0.0)
    m.set_qualifies(True, 0.0)
    out = m.observe(None, (me, *others), 5, 0.0)
    assert (Campaign() in out) is campaigns_now
    assert m.role is Role.CANDIDATE
    if not campaigns_now:
        # The higher candidate never campaigned: after lease_ttl s of vacancy, go.
        m.keepalive_ok(0.9, 0.9)
        assert m.next_wakeup(0.9) == pytest.approx(1.0)
        assert m.tick(0.99) == []
        assert m.tick(1.0) == [Campaign()]


def test_a_resign_that_did_not_reach_etcd_is_sent_again() -> None:
    m = machine()
    owner_of(m)
    assert m.set_qualifies(False, 0.1) == [Advertise(False), Resign(10)]
    m.keepalive_ok(0.4, 0.4)
    # The watch still shows our key: the delete is sent again every resign_retry s.
    assert m.observe(OwnerRecord("a", 10, LEASE, True), (), 12, 0.5) == []
    assert m.next_wakeup(0.5) == pytest.approx(0.6)
    assert m.tick(0.6) == [Resign(10)]
    m.keepalive_ok(0.7, 0.7)
    assert m.tick(1.1) == [Resign(10), Drop(10, "resigned")]  # handover timeout, key still there
    assert m.role is Role.STANDBY
    assert m.tick(1.6) == [Resign(10)]
    assert m.observe(None, (), 13, 1.65) == []


def test_a_won_campaign_whose_answer_was_lost_is_taken_from_the_watch() -> None:
    m = machine()
    m.lease_granted(LEASE, 1.0, 0.0, 0.0)
    m.set_qualifies(True, 0.0)
    m.observe(None, (), 4, 0.0)
    assert m.campaign_result(None, 0.2) == []  # the CAS timed out...
    assert m.observe(OwnerRecord("a", 5, LEASE, False), (), 5, 0.21) == [Take(5)]  # ...but committed


def test_a_key_of_an_older_lease_of_this_node_is_not_ours() -> None:
    m = machine()
    m.lease_granted(LEASE, 1.0, 0.0, 0.0)
    m.set_qualifies(True, 0.0)
    assert m.observe(OwnerRecord("a", 5, LEASE - 1, True), (), 5, 0.0) == []
    assert m.role is Role.STANDBY and not m.has_vip


def test_announcements_burst_after_a_take_then_repeat_periodically() -> None:
    m = machine(ttl=30.0, margin=1.0, burst=(0.1, 0.3, 0.7, 1.5))
    m.settings = ElectionSettings(**{**m.settings.__dict__, "announce_interval": 10.0})
    owner_of(m, ttl=30.0)
    sent = []
    now = 0.0
    while now < 25.0:
        wake = m.next_wakeup(now)
        assert wake is not None
        now = wake
        sent += [round(now, 3) for a in m.tick(now) if isinstance(a, Announce)]
        m.keepalive_ok(now, now)
    assert sent[:6] == [0.1, 0.3, 0.7, 1.5, 11.5, 21.5]


def test_another_owner_with_a_higher_term_supersedes_a_stale_self_view() -> None:
    m = machine()
    owner_of(m)
    m.keepalive_ok(0.3, 0.3)
    assert m.observe(OwnerRecord("b", 15, 8, True), (), 15, 0.4) == [Drop(10, "superseded")]
    assert m.role is Role.STANDBY


def test_an_advertisement_that_did_not_reach_etcd_is_sent_again() -> None:
    m = machine()
    out = m.lease_granted(LEASE, 1.0, 0.0, 0.0) + m.set_qualifies(True, 0.0)
    assert out.count(Advertise(True)) == 1
    assert Advertise(True) not in m.tick(0.1)
    assert Advertise(True) in m.advertise_failed(True, 0.2)
    # A failed withdrawal of the candidate key is sent again as well.
    assert m.set_qualifies(False, 0.3).count(Advertise(False)) == 1
    assert Advertise(False) in m.advertise_failed(False, 0.4)
    # A failure report about a state the machine has left changes nothing.
    assert Advertise(True) not in m.advertise_failed(True, 0.5)
