"""Whether the node's view of BGP is confirmed (pure): ExaBGP's word, or nothing.

The node never knows a BGP session or a route by itself: ExaBGP holds them,
and only what ExaBGP answered recently is true. ExaBGP answers every API
line (``done``/``error``, ``exabgp_api_ack=true``); the announcer writes a
harmless line (``version``) every :data:`~anycast_lb.bgp.announcer.PROBE_INTERVAL`
second when it has nothing else to write, and tells the node ``alive`` after
each answer; an ``ack`` of a route set (every line answered ``done``) counts
too. The node records when the last such word arrived (``confirmed_at``,
monotonic seconds); :func:`freshness` turns that into confirmed or stale.

A stopped (SIGSTOP), hung or dead ExaBGP answers nothing, a hung announcer
relays nothing: either way the view goes stale :data:`CONFIRM_DEADLINE`
seconds after the last answer, and then every peer reads ``unknown`` and
every route ``unconfirmed`` (:func:`peer_states`, :func:`route_states`),
whatever ExaBGP said before. Routers drop a silent ExaBGP's sessions after
their hold time (3 s or more, RFC 4271 section 4.2); the node cannot see
that, so it must not claim anything past the deadline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

CONFIRM_DEADLINE = 3.0
"""Seconds after ExaBGP's last answer that the node still trusts what it
said: three probe intervals (1 s each), so one slow answer is no alarm."""

UNKNOWN = "unknown"
"""A peer's state while the view is stale."""
UNCONFIRMED = "unconfirmed"
"""A route's state while the view is stale."""


class Freshness(NamedTuple):
    confirmed: bool
    """True while the last answer is at most ``deadline`` s old."""
    age: float
    """Seconds since the last answer, or since ``since`` when there was none."""


def freshness(
    now: float, confirmed_at: float | None, since: float, deadline: float = CONFIRM_DEADLINE
) -> Freshness:
    """Confirmed or stale at ``now`` (all monotonic seconds).

    ``confirmed_at``: when ExaBGP's last answer reached the node, None if it
    never answered (ExaBGP starting, or restarted: answers of a previous
    ExaBGP say nothing about this one); ``since``: when the node started
    waiting (the age reported while ``confirmed_at`` is None). Never
    confirmed is stale; at exactly ``deadline`` s it is still confirmed.
    """
    if confirmed_at is None:
        return Freshness(False, max(now - since, 0.0))
    age = max(now - confirmed_at, 0.0)
    return Freshness(age <= deadline, age)


def peer_states(reported: Mapping[str, str], confirmed: bool) -> dict[str, str]:
    """Each peer's state as ExaBGP reported it, or ``unknown`` for all when stale."""
    return dict(reported) if confirmed else {address: UNKNOWN for address in reported}


def route_states(reported: Mapping[str, str], confirmed: bool) -> dict[str, str]:
    """Each route's state (``announced``, ``withdrawn``, ``pending``) as
    acknowledged, or ``unconfirmed`` for all when stale."""
    return dict(reported) if confirmed else {prefix: UNCONFIRMED for prefix in reported}
