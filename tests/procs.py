"""Whether a process the tests started is still there."""

from __future__ import annotations

from anycast_lb.lab.netns import pid_state


def exited(pid: int) -> bool:
    """No such process, or a zombie not yet reaped (state Z or X): it holds
    no socket and no file any more. ``/proc/PID/stat`` of a process being
    reaped can vanish between its open and its read (ESRCH, not only
    ENOENT); :func:`pid_state` reads both as gone."""
    return pid_state(pid) in (None, "Z", "X")
