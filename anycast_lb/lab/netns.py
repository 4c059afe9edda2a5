"""Network namespace plumbing and the lab's safety checks.

Everything here shells out to iproute2 (``ip``) or ``nft``; failures become
:class:`~anycast_lb.errors.LabError` naming the command. The safety rules
(the machine's own uplink may use a documentation prefix, and lab traffic
must never leave the lab):

- :func:`check_root_namespace` refuses (``UnsafeLab``) when a lab prefix
  overlaps any address or route of the root namespace;
- :func:`require_namespace` refuses when the calling process is not inside
  the named lab namespace (compares ``/proc/self/ns/net`` with
  ``/run/netns/NAME`` by device and inode);
- :func:`delete` refuses names without the ``alb-`` prefix.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from anycast_lb.errors import LabError, UnsafeLab
from anycast_lb.lab.topology import LAB_PREFIXES, NS_PREFIX

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000


def run(argv: Sequence[str], *, ns: str | None = None, check: bool = True,
        input: str | None = None, timeout: float = 10.0) -> str:
    """Run a command (inside ``ns`` when given); return its stdout.

    Raises LabError when it cannot start, times out, or (with ``check``)
    exits non-zero; the message holds the command and its stderr.
    """
    full = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    try:
        proc = subprocess.run(full, capture_output=True, text=True, input=input,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(full)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(full)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def ip_json(args: Sequence[str], ns: str | None = None) -> list[dict[str, Any]]:
    out = run(["ip", "-j", *args], ns=ns)
    data = json.loads(out) if out.strip() else []
    return data if isinstance(data, list) else []


def require_root() -> None:
    """Raise LabError unless running as root (namespaces, FRR, nft need it)."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, FRR, nftables): "
                       "run it with sudo or as root")


def check_root_namespace() -> None:
    """Refuse (UnsafeLab) when a lab prefix overlaps the root namespace.

    Looks at every address and every route of every table of the root
    namespace, IPv4 and IPv6. Must run in the root namespace.
    """
    problems: list[str] = []
    for entry in ip_json(["addr", "show"]):
        for info in entry.get("addr_info", []):
            net = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network
            for lab in LAB_PREFIXES:
                if net.version == lab.version and net.overlaps(lab):
                    problems.append(f"address {info['local']}/{info['prefixlen']} on "
                                    f"{entry.get('ifname')} overlaps {lab}")
    for family in ("-4", "-6"):
        for route in ip_json([family, "route", "show", "table", "all"]):
            dst = route.get("dst", "")
            if dst in ("default", "") or route.get("type") in ("broadcast", "multicast"):
                continue
            try:
                net = ipaddress.ip_network(dst, strict=False)
            except ValueError:
                continue
            for lab in LAB_PREFIXES:
                if net.version == lab.version and net.overlaps(lab):
                    problems.append(f"route {dst} (table {route.get('table', 'main')}) "
                                    f"overlaps {lab}")
    if problems:
        raise UnsafeLab("refusing to start the lab: " + "; ".join(sorted(set(problems))))


def _ns_ident(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def in_namespace(name: str) -> bool:
    """True when this process's network namespace is /run/netns/NAME."""
    try:
        return _ns_ident("/proc/self/ns/net") == _ns_ident(str(NETNS_DIR / name))
    except OSError:
        return False


def require_namespace(name: str) -> None:
    """Refuse (UnsafeLab) unless this process runs inside lab namespace NAME."""
    if not name.startswith(NS_PREFIX):
        raise UnsafeLab(f"{name!r} is not a lab namespace (must start with {NS_PREFIX!r})")
    if not in_namespace(name):
        raise UnsafeLab(f"refusing to send lab traffic: this process is not inside "
                        f"network namespace {name!r} (run it with ip netns exec {name} ...)")


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def lab_namespaces() -> list[str]:
    """Names of every existing namespace with the lab prefix."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(NS_PREFIX))
    except FileNotFoundError:
        return []


def create(name: str) -> None:
    """Create namespace NAME with ``lo`` up. Raises LabError if it exists."""
    if not name.startswith(NS_PREFIX):
        raise UnsafeLab(f"lab namespaces must start with {NS_PREFIX!r}: {name!r}")
    if exists(name):
        raise LabError(f"namespace {name} already exists: run `anycast-lb lab down` first")
    run(["ip", "netns", "add", name])
    run(["ip", "link", "set", "lo", "up"], ns=name)


def delete(name: str) -> None:
    """Delete lab namespace NAME (its veths go with it); absent is fine."""
    if not name.startswith(NS_PREFIX):
        raise UnsafeLab(f"refusing to delete non-lab namespace {name!r}")
    if exists(name):
        run(["ip", "netns", "delete", name], check=False)


def veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """A veth pair with one end in each namespace, both up.

    Created inside ``ns_a`` directly, so no interface ever appears in the
    root namespace."""
    run(["ip", "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b],
        ns=ns_a)
    run(["ip", "link", "set", if_a, "up"], ns=ns_a)
    run(["ip", "link", "set", if_b, "up"], ns=ns_b)


def addr(ns: str, ifname: str, cidr: str) -> None:
    run(["ip", "addr", "add", cidr, "dev", ifname], ns=ns)


def sysctls(ns: str, values: dict[str, str | int]) -> None:
    for key, value in values.items():
        run(["sysctl", "-qw", f"{key}={value}"], ns=ns)


class Spawned:
    """A daemon the lab started: only its PID is kept (the lab's processes
    outlive the command that started them, so no Popen object is left to
    complain). ``poll`` reaps it when this process is still its parent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1 if not pid_alive(self.pid) else None
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def spawn(ns: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None
          ) -> Spawned:
    """Start ``argv`` inside ``ns`` in its own session, output to ``log``.

    ``ip netns exec`` execs the command in place, so the PID is the
    command's own. Raises LabError when it cannot start.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    full = ["ip", "netns", "exec", ns, *argv]
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        pid = os.posix_spawnp(
            full[0], full, {**os.environ, **(env or {})},
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)],
            setsid=True)
    except OSError as exc:
        raise LabError(f"cannot start {' '.join(full)}: {exc}") from exc
    finally:
        os.close(fd)
    return Spawned(pid)


def pid_alive(pid: int) -> bool:
    """True while PID exists and is not a zombie (reaping our own exited
    children first).

    ``kill -0`` alone is not enough: PID 1 here reaps orphans only every ~2 s
    so a dead daemon lingers as state Z.
    """
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesised command name, which may hold spaces.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def pid_netns_is(pid: int, name: str) -> bool:
    """True when PID runs inside lab namespace NAME (guards kill by PID
    against a PID reused by an unrelated process)."""
    try:
        return _ns_ident(f"/proc/{pid}/ns/net") == _ns_ident(str(NETNS_DIR / name))
    except OSError:
        return False


def pid_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate()`` until truthy; return its value.

    Raises LabError naming ``what`` when ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except LabError as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            raise LabError(f"timed out after {timeout:.1f} s waiting for {what}{detail}")
        time.sleep(interval)


def proc_start(pid: int) -> int | None:
    """Start time of PID in clock ticks since boot (field 22 of
    ``/proc/PID/stat``), or None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def terminate(pid: int, start: int | None, grace: float = 2.0) -> bool:
    """Stop the process PID that started at ``start`` (see :func:`proc_start`).

    See :func:`terminate_all`. Returns True when it is gone at the end."""
    return not terminate_all([(pid, start)], grace)


def terminate_all(procs: Sequence[tuple[int, int | None]], grace: float = 2.0
                  ) -> list[int]:
    """Stop processes given as (PID, start time): SIGCONT (a scenario may have
    stopped one), SIGTERM, and SIGKILL for those still alive after ``grace``
    seconds. A PID that is gone or now names another process (PID reuse) is
    never signalled; nothing is ever looked up by name. Returns the PIDs still
    alive at the end (a zombie counts as gone: PID 1 may reap it late)."""
    ours = [pid for pid, start in procs
            if start is not None and proc_start(pid) == start and pid_alive(pid)]
    for pid in ours:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
    for limit, kill in ((grace, True), (2.0, False)):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and any(pid_alive(p) for p in ours):
            time.sleep(0.01)
        ours = [p for p in ours if pid_alive(p)]
        if not kill:
            break
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return ours


def pids_in(name: str) -> list[int]:
    """PIDs whose network namespace is lab namespace NAME (``ip netns pids``
    compares namespace identity, not names)."""
    if not exists(name):
        return []
    out = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Switch this thread into namespace NAME for the block, then back.

    Sockets created inside stay in NAME afterwards: that is how the FIB
    watcher holds a netlink socket of the router namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as home, open(NETNS_DIR / name, "rb") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns({name}): {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise LabError(f"setns back to the original namespace: {os.strerror(err)}")


def netlink_socket(ns: str) -> socket.socket:
    """A NETLINK_ROUTE socket living in namespace ``ns``."""
    with entered(ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    return sock
