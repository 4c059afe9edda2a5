"""Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
Software Network Load Balancer", NSDI 2016, section 3.4). Pure: no I/O.

A Maglev table is a list of ``size`` slots (``size`` prime, 65537 by
default), each holding the index of a backend. A flow's hash picks a slot.
Each backend fills slots along its own permutation ``(offset + j * skip) %
size``, with ``offset`` and ``skip`` derived from the backend's *name* only,
so every node given the same set of backend names builds the same table,
whatever order they were configured in. Removing one of N backends changes
only about 1/N of the slots (the paper's "minimal disruption").

Weights: in each round of the population loop, a backend takes ``weight``
slots instead of one, so its share of the table is proportional to its
weight.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

DEFAULT_TABLE_SIZE = 65537


def _hash64(data: bytes, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, salt=salt).digest(), "little")


def flow_hash(key: bytes) -> int:
    """Stable 64-bit hash of a flow key (same value on every node and run,
    unlike Python's randomised ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def build_table(
    names: Sequence[str], weights: Sequence[int] | None = None, size: int = DEFAULT_TABLE_SIZE
) -> array[int]:
    """Populate a Maglev lookup table.

    ``names``: backend names, unique (``addr:port``). ``weights``: positive
    ints, one per name (default all 1). ``size``: a prime larger than the
    number of backends. Returns an ``array('l')`` of ``size`` slots holding
    indexes into ``names`` (in the caller's order), or an empty array when
    ``names`` is empty.

    Raises ValueError on duplicate names, bad weights, or ``size`` not larger
    than ``len(names)``.
    """
    n = len(names)
    if weights is None:
        weights = [1] * n
    if len(weights) != n:
        raise ValueError("one weight per backend name")
    if len(set(names)) != n:
        raise ValueError("backend names must be unique")
    if any(w < 1 for w in weights):
        raise ValueError("weights must be >= 1")
    if n == 0:
        return array("l")
    if size <= n:
        raise ValueError("table size must exceed the number of backends")
    if n == 1:
        return array("l", [0]) * size

    # Fill in canonical (sorted-name) order so the table does not depend on
    # configuration order; map back to caller indexes at the end.
    order = sorted(range(n), key=lambda i: names[i])
    offsets = []
    skips = []
    for i in order:
        raw = names[i].encode()
        offsets.append(_hash64(raw, b"maglev-offset") % size)
        skips.append(_hash64(raw, b"maglev-skip") % (size - 1) + 1)
    turns = [weights[i] for i in order]

    entry = array("l", [-1]) * size
    next_j = [0] * n
    filled = 0
    while True:
        for pos in range(n):
            offset, skip, j = offsets[pos], skips[pos], next_j[pos]
            owner = order[pos]
            for _ in range(turns[pos]):
                slot = (offset + j * skip) % size
                while entry[slot] >= 0:
                    j += 1
                    slot = (offset + j * skip) % size
                entry[slot] = owner
                j += 1
                filled += 1
                if filled == size:
                    return entry
            next_j[pos] = j


def lookup(table: array[int], key_hash: int) -> int:
    """Index of the backend owning ``key_hash``; -1 for an empty table."""
    if not table:
        return -1
    return table[key_hash % len(table)]
