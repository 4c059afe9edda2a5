"""Whether a process the tests started is still there."""

from __future__ import annotations

import subprocess
from typing import Any

from anycast_lb.lab.netns import pid_state


def exited(pid: int) -> bool:
    """No such process, or a zombie not yet reaped (state Z or X): it holds
    no socket and no file any more. ``/proc/PID/stat`` of a process being
    reaped can vanish between its open and its read (ESRCH, not only
    ENOENT); :func:`pid_state` reads both as gone."""
    return pid_state(pid) in (None, "Z", "X")


def kill(proc: subprocess.Popen[Any]) -> None:
    """End a process a test started (SIGKILL, by its PID) unless it has
    ended, reap it and close its stdout pipe: a test's ``finally``."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
