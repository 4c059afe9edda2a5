"""Replay protection for sync datagrams (pure, no I/O).

Every datagram a node sends carries its incarnation ``epoch`` and a
``counter`` that grows by one per datagram sent (any kind, any peer), both
under the MAC. A receiver keeps, per peer, the newest epoch it accepted and
a sliding window over that epoch's counters, as IPsec does (RFC 4303,
section 3.4.3; the bitmap of RFC 6479 without its blocks):

- a counter above the highest seen slides the window and is accepted;
- a counter within the window is accepted once (reordering on the LAN);
- a counter at or below the window's low edge (``highest - WINDOW``) is
  refused, as is one already seen;
- a newer epoch (the peer restarted) starts a new window;
- an older epoch is refused: it can only be a replay of an incarnation the
  peer has left. Epochs grow with the sender's wall clock at start
  (``cluster.Cluster``), so a restarted peer is accepted at once.

The window is moved only by a datagram whose MAC was verified (the caller
checks first), so forged datagrams cannot shift it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

WINDOW = 4096
"""Counters remembered below the highest seen: a snapshot burst may
overtake a few hundred datagrams, never thousands, on one LAN."""


class Verdict(Enum):
    ACCEPT = "accept"
    NEW_EPOCH = "new_epoch"
    """Accepted: the first datagram of a newer incarnation."""
    REPLAY = "replay"
    """Seen already, or older than the window."""
    OLD_EPOCH = "old_epoch"
    """From an incarnation older than the newest accepted one."""

    @property
    def accepted(self) -> bool:
        return self in (Verdict.ACCEPT, Verdict.NEW_EPOCH)


@dataclass(slots=True)
class ReplayWindow:
    """One peer's newest epoch and its counter window.

    ``highest`` is the largest counter accepted in ``epoch``; bit i of
    ``seen`` says counter ``highest - i`` was accepted (i < WINDOW).
    """

    epoch: int | None = None
    highest: int = -1
    seen: int = 0

    def check(self, epoch: int, counter: int) -> Verdict:
        """The verdict on (epoch, counter), without changing the window."""
        if self.epoch is None or epoch > self.epoch:
            return Verdict.NEW_EPOCH
        if epoch < self.epoch:
            return Verdict.OLD_EPOCH
        if counter > self.highest:
            return Verdict.ACCEPT
        age = self.highest - counter
        if age >= WINDOW or self.seen >> age & 1:
            return Verdict.REPLAY
        return Verdict.ACCEPT

    def accept(self, epoch: int, counter: int) -> Verdict:
        """:meth:`check`, then record an accepted datagram."""
        verdict = self.check(epoch, counter)
        if verdict is Verdict.NEW_EPOCH:
            self.epoch, self.highest, self.seen = epoch, counter, 1
        elif verdict is Verdict.ACCEPT:
            if counter > self.highest:
                shift = counter - self.highest
                self.seen = ((self.seen << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
                self.highest = counter
            else:
                self.seen |= 1 << (self.highest - counter)
        return verdict
