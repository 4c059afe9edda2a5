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

Build cost, pure Python (``benchmarks/maglev_build.py``): tens of ms at 65537
slots for 2 to 1,000 backends, against 1.8 ms for the paper's C++. A caller
on a latency-sensitive thread builds in a background thread and passes
``pause`` (see :func:`build_table`); ``anycast_lb.pool`` does.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence
from math import isqrt
from typing import cast

DEFAULT_TABLE_SIZE = 65537


def _hash64(data: bytes, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, salt=salt).digest(), "little")


_FLOW_HASHER = hashlib.blake2b(digest_size=8)
"""BLAKE2b-64's initial state, copied per flow: ``copy()`` and ``update()``
cost about half of ``blake2b(key, digest_size=8)``, whose keyword
arguments are parsed on every call, for the same digest. Never updated
itself, so copies from any thread are safe."""


def flow_hash(key: bytes) -> int:
    """Stable 64-bit hash of a flow key (same value on every node and run,
    unlike Python's randomised ``hash``): BLAKE2b with an 8-byte digest
    (RFC 7693), read little-endian. Runs once per new flow."""
    hasher = _FLOW_HASHER.copy()
    hasher.update(key)
    return int.from_bytes(hasher.digest(), "little")


def build_table(
    names: Sequence[str],
    weights: Sequence[int] | None = None,
    size: int = DEFAULT_TABLE_SIZE,
    *,
    pause: Callable[[], None] | None = None,
) -> array[int]:
    """Populate a Maglev lookup table.

    ``names``: backend names, unique (``addr:port``). ``weights``: positive
    ints, one per name (default all 1). ``size``: a prime larger than the
    number of backends. Returns an ``array('l')`` of ``size`` slots holding
    indexes into ``names`` (in the caller's order), or an empty array when
    ``names`` is empty.

    ``pause``, when given, is called between chunks of work of well under
    1 ms each (about every 64 slots filled; measured up to ~0.6 ms of CPU
    between calls at 65537 slots), about a thousand times per build. A caller
    building in a background thread passes a callable that releases the GIL
    when it has been held long enough, so the event loop and the relay
    thread are not kept waiting for a whole switch interval (5 ms). It never
    changes the table.

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
    # configuration order; the table holds caller indexes.
    pause = pause or _no_pause
    order = sorted(range(n), key=lambda i: names[i])
    offsets = []
    skips = []
    for k, i in enumerate(order, 1):
        raw = names[i].encode()
        offsets.append(_hash64(raw, b"maglev-offset") % size)
        skips.append(_hash64(raw, b"maglev-skip") % (size - 1) + 1)
        if not k % _BLOCK:
            pause()
    filled = _populate(order, offsets, skips, [weights[i] for i in order], size, pause)
    table = array("l")
    for lo in range(0, size, _WINDOW):
        table.extend(filled[lo:lo + _WINDOW])
        pause()
    return table


def _no_pause() -> None:
    return None


# One step of an end-game scan costs about 3/2 of a probe step (measured on
# CPython 3.11).
_SCAN_COST_NUM, _SCAN_COST_DEN = 3, 2
# Slots filled between two pauses: in the bulk of the build, and in the end
# game, where a slot may cost a scan of a few hundred free slots.
_BLOCK = 64
_ENDGAME_BLOCK = 16
# Slots converted or searched in C between two pauses (about 0.1 ms).
_WINDOW = 8192


def _populate(
    owners: list[int],
    offsets: list[int],
    skips: list[int],
    turns: list[int],
    size: int,
    pause: Callable[[], None],
) -> list[int]:
    """The population loop of the paper's Pseudocode 1, with weights.

    Backend ``k`` (in fill order) owns index ``owners[k]`` and walks slots
    ``(offsets[k] + j * skips[k]) % size`` for j = 0, 1, ...; each round it
    takes its next ``turns[k]`` free slots. Three things make it faster than
    the literal loop and change no slot:

    - ``cur[k]`` is the slot itself, advanced by an addition and a
      conditional subtraction instead of a multiplication and a modulo;
    - whole rounds run without a per-slot "table full?" test while the free
      count is known to stay above one round's worth;
    - the end game. When only ``free`` slots are left, a backend walking its
      permutation needs about (unvisited positions) / ``free`` probes for
      its next slot, which for a large pool is thousands. Every position
      before its current one is filled (it skipped or took each), so its
      next slot is the free slot at the smallest position, found by mapping
      every free slot ``s`` to its position ``(s - offset) * skip^-1 %
      size``: ``free`` steps. The cheaper of the two is used per slot.
    """
    n = len(owners)
    tbl: list[int | None] = [None] * size
    cur = offsets[:]
    free = size
    total = sum(turns)
    endgame = isqrt(size * _SCAN_COST_DEN // _SCAN_COST_NUM)
    rng = range(n)
    # The pause bookkeeping runs once per block of about _BLOCK slots: a
    # block is up to _BLOCK backends of a round, or several whole rounds of a
    # small pool (then the pool is a single block).
    items = list(zip(rng, skips, owners, turns))
    blocks = [(items[i:i + _BLOCK], sum(turns[i:i + _BLOCK])) for i in range(0, n, _BLOCK)]
    for rounds in (max(1, _BLOCK // total), 1):
        repeat = range(rounds)
        while free - total * rounds >= endgame:
            for block, _takes in blocks:
                if total == n:
                    for _ in repeat:
                        for k, skip, owner, _w in block:
                            s = cur[k]
                            while tbl[s] is not None:
                                s += skip
                                if s >= size:
                                    s -= size
                            tbl[s] = owner
                            cur[k] = s
                else:
                    for _ in repeat:
                        for k, skip, owner, weight in block:
                            s = cur[k]
                            for _ in range(weight):
                                while tbl[s] is not None:
                                    s += skip
                                    if s >= size:
                                        s -= size
                                tbl[s] = owner
                            cur[k] = s
                pause()
            free -= total * rounds

    # End game: for each slot taken, probe or scan, whichever is cheaper.
    free_set: set[int] | None = None
    inverses = [0] * n
    budget = _ENDGAME_BLOCK
    while True:
        for k in rng:
            s = cur[k]
            skip = skips[k]
            owner = owners[k]
            for _ in range(turns[k]):
                scan = False
                if free <= endgame:
                    off = offsets[k]
                    inv = inverses[k] or pow(skip, -1, size)
                    inverses[k] = inv
                    unvisited = size - (s - off) * inv % size
                    scan = free * free * _SCAN_COST_NUM < unvisited * _SCAN_COST_DEN
                if scan:
                    if free_set is None:
                        free_set = _free_slots(tbl, pause)
                    j = min([(x - off) * inv % size for x in free_set])
                    s = (off + j * skip) % size
                else:
                    while tbl[s] is not None:
                        s += skip
                        if s >= size:
                            s -= size
                tbl[s] = owner
                if free_set is not None:
                    free_set.discard(s)
                free -= 1
                if not free:
                    return cast("list[int]", tbl)
                budget -= 1
                if not budget:
                    budget = _ENDGAME_BLOCK
                    pause()
            cur[k] = s


def _free_slots(tbl: list[int | None], pause: Callable[[], None]) -> set[int]:
    # list.index runs in C: about 1 ms for 65537 slots, a third of a Python loop.
    found: set[int] = set()
    for lo in range(0, len(tbl), _WINDOW):
        hi = lo + _WINDOW
        i = lo - 1
        try:
            while True:
                i = tbl.index(None, i + 1, hi)
                found.add(i)
        except ValueError:
            pass
        pause()
    return found


def lookup(table: array[int], key_hash: int) -> int:
    """Index of the backend owning ``key_hash``; -1 for an empty table."""
    if not table:
        return -1
    return table[key_hash % len(table)]
