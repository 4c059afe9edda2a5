"""Coordinated drain: the decision of the cluster-wide drain semaphore (pure).

``drain.max_concurrent`` slots, each an etcd key ``drain/slots/<i>`` held
under the holder's lease (so a node that dies frees its slot when its lease
expires). A node takes slot ``i`` with a transaction that succeeds only if
the key is absent; two nodes racing for one slot: one wins, the other
re-reads and decides again.

Every holder counts, including one on a slot index at or above
``max_concurrent`` (the limit was lowered while it drained): a node may take
a slot only while fewer than ``max_concurrent`` nodes hold one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Held:
    """This node already holds ``slot``: drain."""

    slot: int


@dataclass(frozen=True)
class Take:
    """Try to create ``slot`` (absent-key transaction), then decide again."""

    slot: int


@dataclass(frozen=True)
class Wait:
    """Every slot is taken: wait for a change under ``drain/slots/``.
    ``holders`` names the nodes holding one, sorted (for the operator)."""

    holders: tuple[str, ...]


Decision = Held | Take | Wait


def decide(max_concurrent: int, holders: Mapping[int, str], node: str) -> Decision:
    """What ``node`` does next, given the slots held (slot index -> node).

    Raises ValueError for ``max_concurrent`` < 1.
    """
    if max_concurrent < 1:
        raise ValueError("max_concurrent must be at least 1")
    for slot, holder in sorted(holders.items()):
        if holder == node:
            return Held(slot)
    if len(holders) >= max_concurrent:
        return Wait(tuple(sorted(holders.values())))
    free = next(i for i in range(max_concurrent) if i not in holders)
    return Take(free)
