"""Origin-side flap damping (pure): hold down a VIP whose health keeps flapping.

The idea of RFC 2439 (route flap damping) section 4.2, applied at the origin
instead of at a receiving router:

- every up -> down transition of a prefix adds ``penalty``;
- the penalty decays exponentially, halving every ``half_life`` seconds:
  ``p(t) = p(t0) * 2 ** (-(t - t0) / half_life)``;
- the prefix is suppressed (withdrawn whatever its health) as soon as its
  penalty reaches ``suppress``, and reused once the penalty decays below
  ``reuse`` (hysteresis: ``reuse < suppress``);
- the penalty is capped at the RFC 2439 ceiling
  ``reuse * 2 ** (max_suppress / half_life)``, so a prefix is never held
  down longer than ``max_suppress`` seconds after its last flap. If that
  ceiling is below ``suppress`` the prefix can never be suppressed (the
  config then disables damping in effect).

The first state observed for a prefix is not a flap (a node starting with a
backend still rising is not flapping). Times are monotonic seconds passed in
by the caller; nothing here reads a clock. A clock that seems to go
backwards is treated as no time passing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from anycast_lb.bgp.policy import Prefix, sorted_prefixes
from anycast_lb.config import DampingConfig


@dataclass
class _Entry:
    up: bool
    penalty: float
    """Penalty as of ``at``."""
    at: float
    """Monotonic seconds of the last update."""
    reuse_at: float | None
    """Monotonic seconds the suppression ends; None when not suppressed."""


class FlapDamper:
    """Per-prefix flap penalty and suppression state."""

    def __init__(self, cfg: DampingConfig) -> None:
        self._cfg = cfg
        self._entries: dict[Prefix, _Entry] = {}
        self._ceiling = cfg.reuse * math.pow(2.0, cfg.max_suppress / cfg.half_life)

    def _decayed(self, entry: _Entry, now: float) -> float:
        elapsed = max(0.0, now - entry.at)
        return entry.penalty * math.pow(2.0, -elapsed / self._cfg.half_life)

    def _reuse_delay(self, penalty: float) -> float:
        """Seconds until ``penalty`` decays to ``reuse``: half_life * log2(p / reuse)."""
        if penalty <= self._cfg.reuse:
            return 0.0
        return self._cfg.half_life * math.log2(penalty / self._cfg.reuse)

    def observe(self, prefix: Prefix, up: bool, now: float) -> None:
        """Record the current health of ``prefix`` at ``now`` (monotonic s).

        Safe to call on every evaluation: only an up -> down transition adds
        the penalty. Does nothing when damping is disabled.
        """
        if not self._cfg.enabled:
            return
        entry = self._entries.get(prefix)
        if entry is None:
            self._entries[prefix] = _Entry(up=up, penalty=0.0, at=now, reuse_at=None)
            return
        now = max(now, entry.at)
        if entry.reuse_at is not None and now >= entry.reuse_at:
            entry.reuse_at = None
        flapped = entry.up and not up
        entry.up = up
        if not flapped:
            return
        penalty = min(self._decayed(entry, now) + self._cfg.penalty, self._ceiling)
        entry.penalty, entry.at = penalty, now
        if entry.reuse_at is not None or penalty >= self._cfg.suppress:
            entry.reuse_at = now + self._reuse_delay(penalty)

    def is_suppressed(self, prefix: Prefix, now: float) -> bool:
        entry = self._entries.get(prefix)
        return entry is not None and entry.reuse_at is not None and now < entry.reuse_at

    def suppressed(self, now: float) -> frozenset[Prefix]:
        """Prefixes held down at ``now`` (monotonic s)."""
        return frozenset(p for p in self._entries if self.is_suppressed(p, now))

    def status(self, prefix: Prefix, now: float) -> dict[str, float | bool]:
        """For /status: ``penalty`` (decayed to ``now``), ``suppressed``,
        ``reuse_in_s`` (seconds until reuse; 0.0 when not suppressed)."""
        entry = self._entries.get(prefix)
        if entry is None:
            return {"penalty": 0.0, "suppressed": False, "reuse_in_s": 0.0}
        suppressed = self.is_suppressed(prefix, now)
        reuse_in = 0.0
        if suppressed and entry.reuse_at is not None:
            reuse_in = max(0.0, entry.reuse_at - now)
        return {
            "penalty": self._decayed(entry, now),
            "suppressed": suppressed,
            "reuse_in_s": reuse_in,
        }

    def next_change(self, now: float) -> float | None:
        """Monotonic seconds of the next reuse (the node must re-evaluate its
        routes then, so it can schedule a wakeup), or None if nothing is
        suppressed at ``now``."""
        times = [
            e.reuse_at for p, e in self._entries.items()
            if e.reuse_at is not None and self.is_suppressed(p, now)
        ]
        return min(times) if times else None

    def prefixes(self) -> list[Prefix]:
        """Every prefix observed so far, in a stable order."""
        return sorted_prefixes(self._entries)
