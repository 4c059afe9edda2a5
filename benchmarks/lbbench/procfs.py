"""Resource accounting from /proc (Linux): CPU time, RSS and file descriptors
of a process with all its threads and descendants, and system-wide kernel
memory.

CPU: fields 14 and 15 (utime, stime) of ``/proc/PID/stat``, in clock ticks
(``SC_CLK_TCK``, usually 100 per s). For a process (thread group) they add
up every thread, live or exited (proc(5)), so ``nbthread`` or a relay thread
is counted. Children are added by walking ``/proc/PID/task/*/children``;
a child that exits during a run takes its time with it, so proxies that fork
workers must keep them for the whole run (they do).

Kernel memory: ``Slab`` of /proc/meminfo (bytes; socket, TCP, pipe and
epoll objects live in slab caches), and the TCP line of /proc/net/sockstat
(``mem`` is in pages: socket buffer memory charged to TCP).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def parse_stat_split(text: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from the text of /proc/PID/stat.

    The command name (field 2) is in parentheses and may hold spaces or
    parentheses itself, so fields are counted after its last ``)``.
    Raises ValueError on a malformed line.
    """
    _, sep, rest = text.rpartition(")")
    if not sep:
        raise ValueError("no ')' closing the command name")
    fields = rest.split()
    # rest starts at field 3 (state); utime is field 14, stime field 15.
    try:
        return int(fields[11]), int(fields[12])
    except (IndexError, ValueError) as exc:
        raise ValueError(f"malformed /proc/PID/stat: {text[:80]!r}") from exc


def parse_status_rss(text: str) -> int:
    """VmRSS in bytes from the text of /proc/PID/status (0 for a zombie)."""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected VmRSS unit {unit!r}")
            return int(value) * 1024
    return 0


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per key."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if not parts:
            continue
        scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
        out[key.strip()] = int(parts[0]) * scale
    return out


def parse_sockstat_tcp_pages(text: str) -> int:
    """The ``mem`` field (pages) of the ``TCP:`` line of /proc/net/sockstat."""
    for line in text.splitlines():
        if line.startswith("TCP:"):
            parts = line.split()[1:]
            values = dict(zip(parts[::2], parts[1::2]))
            return int(values["mem"])
    raise ValueError("no TCP line in sockstat")


def process_tree(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """``pid`` and every live descendant (children lists of all its threads)."""
    out: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        out.append(current)
        try:
            tasks = list((proc / str(current) / "task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            stack.extend(int(c) for c in children if int(c) not in out)
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None


def cpu_split(pid: int, proc: Path = Path("/proc")) -> tuple[float, float]:
    """CPU seconds (user, system) used so far by ``pid``, all its threads and
    its live descendants."""
    user = system = 0
    for p in process_tree(pid, proc):
        text = _read(proc / str(p) / "stat")
        if text is not None:
            u, s = parse_stat_split(text)
            user += u
            system += s
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def rss_bytes(pid: int, proc: Path = Path("/proc")) -> int:
    """Resident set size of ``pid`` and its live descendants, bytes."""
    total = 0
    for p in process_tree(pid, proc):
        text = _read(proc / str(p) / "status")
        if text is not None:
            total += parse_status_rss(text)
    return total


def fd_count(pid: int, proc: Path = Path("/proc")) -> int:
    """Open file descriptors of ``pid`` and its live descendants."""
    total = 0
    for p in process_tree(pid, proc):
        try:
            total += len(os.listdir(proc / str(p) / "fd"))
        except FileNotFoundError:
            pass
    return total


@dataclass(frozen=True)
class KernelMemory:
    slab: int
    """/proc/meminfo Slab, bytes."""
    tcp_buffers: int
    """/proc/net/sockstat TCP mem, bytes."""


def kernel_memory(proc: Path = Path("/proc")) -> KernelMemory:
    slab = parse_meminfo((proc / "meminfo").read_text())["Slab"]
    tcp = parse_sockstat_tcp_pages((proc / "net" / "sockstat").read_text()) * PAGE_SIZE
    return KernelMemory(slab=slab, tcp_buffers=tcp)
