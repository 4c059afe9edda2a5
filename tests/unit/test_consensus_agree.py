"""The agreement function: joins, leaves, ties, stale votes (table-driven)."""

from __future__ import annotations

import pytest

from anycast_lb.consensus.agree import Vote, agree, contested, disagreement

B1, B2 = "10.0.0.1:80", "10.0.0.2:80"
SERVICES = {"web": (B1, B2)}


def votes(*rows: tuple[str, str, bool]) -> dict[Vote, bool]:
    """(backend, node, up) rows for service web."""
    return {("web", b, n): up for b, n, up in rows}


CASES = [
    # (why, members, votes, agreed up for web)
    ("one member: its own view", {"a"},
     votes((B1, "a", True), (B2, "a", False)), {B1}),
    ("three agree", {"a", "b", "c"},
     votes((B1, "a", True), (B1, "b", True), (B1, "c", True)), {B1}),
    ("2 of 3 up: up", {"a", "b", "c"},
     votes((B1, "a", True), (B1, "b", True), (B1, "c", False)), {B1}),
    ("1 of 3 up: down", {"a", "b", "c"},
     votes((B1, "a", True), (B1, "b", False), (B1, "c", False)), set()),
    ("tie 2 of 4: down", {"a", "b", "c", "d"},
     votes((B1, "a", True), (B1, "b", True), (B1, "c", False), (B1, "d", False)), set()),
    ("tie 1 of 2: down", {"a", "b"},
     votes((B1, "a", True), (B1, "b", False)), set()),
    ("joining member without votes abstains", {"a", "b", "c", "new"},
     votes((B1, "a", True), (B1, "b", True), (B1, "c", False)), {B1}),
    ("member left: its votes no longer count", {"a", "b"},
     votes((B1, "a", True), (B1, "b", True), (B1, "gone", False), (B1, "gone2", False)), {B1}),
    ("stale votes of non-members cannot make a backend up", {"a"},
     votes((B1, "a", False), (B1, "x", True), (B1, "y", True)), set()),
    ("no votes at all: down", {"a", "b"}, {}, set()),
    ("no live members: down", set(), votes((B1, "a", True)), set()),
    ("votes per backend are independent", {"a", "b", "c"},
     votes((B1, "a", True), (B1, "b", True), (B2, "a", False), (B2, "b", True), (B2, "c", True)),
     {B1, B2}),
]


@pytest.mark.parametrize(("why", "members", "given", "expected"), CASES, ids=[c[0] for c in CASES])
def test_agree(why: str, members: set[str], given: dict[Vote, bool], expected: set[str]) -> None:
    assert agree(SERVICES, members, given) == {"web": frozenset(expected)}


def test_votes_on_unknown_services_and_backends_are_ignored() -> None:
    given = {("web", "10.9.9.9:80", "a"): True, ("old", B1, "a"): True, ("web", B1, "a"): True}
    assert agree({"web": (B1,), "dns": ()}, {"a"}, given) == {"web": frozenset({B1}), "dns": frozenset()}


def test_same_inputs_same_answer_whatever_the_order() -> None:
    rows = [(B1, n, up) for n, up in (("a", True), ("b", False), ("c", True))]
    forward, backward = votes(*rows), votes(*reversed(rows))
    assert agree(SERVICES, ["c", "b", "a"], forward) == agree(SERVICES, ["a", "b", "c"], backward)


def test_disagreement_lists_both_directions() -> None:
    agreed = {"web": frozenset({B1}), "dns": frozenset()}
    assert disagreement(agreed, {"web": {B2}}) == {"web": frozenset({B1, B2})}
    assert disagreement(agreed, {"web": {B1}}) == {}


def test_contested_lists_agreed_up_backends_a_live_member_votes_down() -> None:
    agreed = {"web": frozenset({"a:1", "b:1"}), "dns": frozenset({"a:53"})}
    votes: dict[Vote, bool] = {
        ("web", "a:1", "n1"): False, ("web", "a:1", "n2"): True, ("web", "a:1", "n3"): True,
        ("web", "b:1", "gone"): False,   # not a live member
        ("web", "c:1", "n1"): False,     # already agreed down
        ("dns", "a:53", "n1"): True,
    }
    assert contested(agreed, {"n1", "n2", "n3"}, votes) == {"web": frozenset({"a:1"})}
