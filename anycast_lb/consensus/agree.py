"""Agreed backend health: one pure function every node runs on the same
etcd revision, so every node builds the same Maglev table.

The rule: a backend is up when **more than half** of the live members that
voted on it observe it up (``2 * up > voters``).

- Live members are the member keys at the revision (each under its node's
  lease, so a node that stops keeping its lease alive leaves by itself).
- Votes of nodes that are not live members are ignored (stale: a vote key
  left under another lease, a node that re-registered under a new name).
- A live member with no vote on a backend abstains: it does not count as
  "down". A node that has just joined and not finished its first checks
  therefore does not shift the majority.
- A tie (2 of 4 up) is **down**. A tie means half the tier cannot reach the
  backend; keeping it would make that half pay a failed connect attempt
  (up to ``connect_timeout``) on every flow Maglev sends there. "Keep the
  previous answer" was rejected: it depends on history, so a node that
  (re)started after the tie began would decide differently from the rest,
  and the tables would differ.
- One member: its own view is the agreed view (a single node behaves as
  standalone).
- No live member has voted on a backend: down (as a backend is down at
  start until it passes ``rise`` checks).
- Only backends of the agreed config count; votes on others are ignored.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

Vote = tuple[str, str, str]
"""(service, backend ``addr:port``, node)."""


def agree(
    services: Mapping[str, Collection[str]],
    members: Collection[str],
    votes: Mapping[Vote, bool],
) -> dict[str, frozenset[str]]:
    """Agreed up set per service.

    ``services`` maps each service of the agreed config to its backend keys;
    ``members`` names the live members; ``votes`` maps (service, backend,
    node) to that node's observation (True: up). Returns every service of
    ``services``, with the backends agreed up.
    """
    live = frozenset(members)
    up: dict[tuple[str, str], int] = {}
    voters: dict[tuple[str, str], int] = {}
    for (service, backend, node), is_up in votes.items():
        if node not in live:
            continue
        key = (service, backend)
        voters[key] = voters.get(key, 0) + 1
        if is_up:
            up[key] = up.get(key, 0) + 1
    return {
        service: frozenset(
            b for b in backends if 2 * up.get((service, b), 0) > voters.get((service, b), 0)
        )
        for service, backends in services.items()
    }


def disagreement(
    agreed: Mapping[str, frozenset[str]], local_up: Mapping[str, Collection[str]]
) -> dict[str, frozenset[str]]:
    """Per service, the backends where this node's own view differs from the
    agreed set (up here and agreed down, or the reverse); for metrics."""
    result = {}
    for service, agreed_up in agreed.items():
        mine = frozenset(local_up.get(service, ()))
        diff = agreed_up ^ mine
        if diff:
            result[service] = diff
    return result


def contested(
    agreed: Mapping[str, frozenset[str]],
    members: Collection[str],
    votes: Mapping[Vote, bool],
) -> dict[str, frozenset[str]]:
    """Per service, the agreed-up backends that at least one live member
    votes down: the ones the next agreement may take out. A node prepares
    the table without each of them ahead of the majority
    (:meth:`anycast_lb.pool.Pool.prepare`), so the table is ready when the
    agreed set moves. Services without one are left out."""
    live = frozenset(members)
    out: dict[str, set[str]] = {}
    for (service, backend, node), is_up in votes.items():
        if not is_up and node in live and backend in agreed.get(service, ()):
            out.setdefault(service, set()).add(backend)
    return {s: frozenset(b) for s, b in out.items()}
