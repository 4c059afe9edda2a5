"""The lab's etcd cluster: three members in their own namespaces on the
management segment (``lab up --consensus``).

Each member ``etcdK`` runs Debian's ``etcd`` (3.4, installed by
``scripts/install.sh``) inside ``alb-etcdK`` on 198.51.100.(48+K), client
port 2379 and peer port 2380, with ``--heartbeat-interval 50
--election-timeout 500`` (a fast LAN: a new leader within about a second of
a leader's death). Data directories are on disk under ``DATA_DIR`` (each
member preallocates about 123 MB of WAL, too much for a tmpfs such as
/run) and are removed by ``lab down``.

Readiness is waited for with a deadline: every member answers ``etcdctl
endpoint status`` and one of them is the leader. A member restarted on the
same ports waits first until its namespace has no listener on them (a
restart 0.3 s after a kill can otherwise fail with ``bind: address already
in use``). Members are stopped by PID (checked against their start time),
never by name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anycast_lb.errors import LabError
from anycast_lb.lab import netns
from anycast_lb.lab import topology as T
from anycast_lb.lab.state import LabState, Proc
from anycast_lb.lab.topology import EtcdMember, Topology


def _data_dir(prefix: str) -> Path:
    """Where the members' data directories go: ``ANYCAST_LB_LAB_DATA``, else
    ``/var/lib/anycast-lb-lab`` for the default prefix ``alb-`` and
    ``/var/lib/anycast-lb-lab-<prefix without the dash>`` for another one, so
    a second lab's ``lab up`` or ``lab down`` never removes the first one's
    data under its running members."""
    env = os.environ.get("ANYCAST_LB_LAB_DATA")
    if env:
        return Path(env)
    base = "/var/lib/anycast-lb-lab"
    return Path(base if prefix == "alb-" else f"{base}-{prefix.rstrip('-')}")


DATA_DIR = _data_dir(T.NS_PREFIX)
ROLE = "etcd"
HEARTBEAT_MS = 50
ELECTION_MS = 500
READY_TIMEOUT_S = 20.0
ETCDCTL_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class MemberStatus:
    """One member's answer to ``etcdctl endpoint status``."""

    name: str
    endpoint: str
    member_id: int
    leader_id: int
    raft_term: int
    revision: int
    db_size: int
    """Bytes."""

    @property
    def leader(self) -> bool:
        return self.member_id != 0 and self.member_id == self.leader_id


def data_dir(member: EtcdMember) -> Path:
    return DATA_DIR / "etcd" / member.name


def argv(topo: Topology, member: EtcdMember, state: str = "new") -> list[str]:
    """The member's ``etcd`` command line (``state``: ``new`` for the first
    start, ``existing`` for a restart on its data dir)."""
    cluster = ",".join(f"{m.name}={m.peer_url}" for m in topo.etcd)
    return [
        "etcd", "--name", member.name, "--data-dir", str(data_dir(member)),
        "--listen-client-urls", member.client_url,
        "--advertise-client-urls", member.client_url,
        "--listen-peer-urls", member.peer_url,
        "--initial-advertise-peer-urls", member.peer_url,
        "--initial-cluster", cluster, "--initial-cluster-state", state,
        "--initial-cluster-token", "anycast-lb-lab",
        "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
        "--logger", "zap", "--log-outputs", "stderr",
    ]


def link(state: LabState, topo: Topology) -> None:
    """The management bridge (in ``alb-mgmt``), one leg per node (``mgmt0``)
    and per etcd member. Namespaces must exist."""
    netns.run(["ip", "link", "add", "br0", "type", "bridge"], ns=topo.mgmt_ns)
    netns.run(["ip", "link", "set", "br0", "up"], ns=topo.mgmt_ns)
    plen = T.MGMT_PREFIX.prefixlen
    for node in topo.nodes:
        port = f"p-{node.name}"
        netns.veth(node.ns, topo.mgmt_if, topo.mgmt_ns, port)
        netns.run(["ip", "link", "set", port, "master", "br0"], ns=topo.mgmt_ns)
        netns.addr(node.ns, topo.mgmt_if, f"{T.mgmt_address(node)}/{plen}")
    for member in topo.etcd:
        netns.veth(member.ns, member.mgmt_if, topo.mgmt_ns, member.bridge_port)
        netns.run(["ip", "link", "set", member.bridge_port, "master", "br0"], ns=topo.mgmt_ns)
        netns.addr(member.ns, member.mgmt_if, f"{member.address}/{plen}")


def _find(state: LabState, member: EtcdMember) -> Proc | None:
    return state.find(ROLE, member.name)


def pid(state: LabState, member: EtcdMember) -> int | None:
    """PID of the running member, None when it is not running."""
    proc = _find(state, member)
    if proc is None or not proc.same_process() or not netns.pid_alive(proc.pid):
        return None
    return proc.pid


def _ports_free(member: EtcdMember) -> bool:
    out = netns.run(["ss", "-Hltn", f"( sport = :{T.ETCD_CLIENT_PORT} or "
                     f"sport = :{T.ETCD_PEER_PORT} )"], ns=member.ns, check=False)
    return not out.strip()


def start(state: LabState, topo: Topology, member: EtcdMember, run_dir: Path,
          restart: bool = False) -> int:
    """Start one member (``restart``: on its existing data dir, after
    waiting up to 5 s for its ports to be free); returns its PID.
    Raises LabError."""
    old = _find(state, member)
    if old is not None:
        if old.same_process() and netns.pid_alive(old.pid):
            raise LabError(f"{member.name} is already running (pid {old.pid})")
        state.processes.remove(old)
        state.save()
    if restart:
        netns.wait_for(lambda: _ports_free(member), 5.0,
                       f"{member.name}'s ports {T.ETCD_CLIENT_PORT}/{T.ETCD_PEER_PORT} free")
    else:
        shutil.rmtree(data_dir(member), ignore_errors=True)
    data_dir(member).mkdir(parents=True, exist_ok=True)
    data_dir(member).chmod(0o700)
    log = run_dir / "logs" / f"{member.name}.log"
    proc = netns.spawn(member.ns, argv(topo, member, "existing" if restart else "new"), log)
    state.add_process(ROLE, member.ns, proc.pid, log, node=member.name)
    return proc.pid


def kill(state: LabState, member: EtcdMember, sig: signal.Signals = signal.SIGKILL) -> int:
    """Signal the running member by PID (checked against its start time);
    returns the PID. Raises LabError when it is not running."""
    proc = _find(state, member)
    if proc is None or not proc.same_process() or not netns.pid_alive(proc.pid):
        raise LabError(f"{member.name} is not running")
    os.kill(proc.pid, sig)
    return proc.pid


def wait_gone(state: LabState, member: EtcdMember, timeout: float = 5.0) -> None:
    """Wait until the member's process has exited (a zombie counts as gone)."""
    proc = _find(state, member)
    if proc is None:
        return
    netns.wait_for(lambda: not (proc.same_process() and netns.pid_alive(proc.pid)),
                   timeout, f"{member.name} (pid {proc.pid}) to exit")


def status(topo: Topology, members: list[EtcdMember] | None = None,
           timeout: float = ETCDCTL_TIMEOUT_S) -> dict[str, MemberStatus]:
    """``etcdctl endpoint status`` of each member that answers within
    ``timeout`` s, by member name (run from the first member's namespace,
    which reaches every member over the management segment)."""
    targets = members if members is not None else list(topo.etcd)
    by_url = {m.client_url: m for m in targets}
    out = netns.run(["etcdctl", "--endpoints", ",".join(by_url),
                     f"--command-timeout={timeout}s", f"--dial-timeout={timeout}s",
                     "endpoint", "status", "-w", "json"],
                    ns=topo.etcd[0].ns, check=False, timeout=timeout * len(by_url) + 5)
    result: dict[str, MemberStatus] = {}
    try:
        data: list[dict[str, Any]] = json.loads(out) if out.strip() else []
    except ValueError:
        return result
    for entry in data:
        member = by_url.get(str(entry.get("Endpoint", "")))
        st = entry.get("Status") or {}
        header = st.get("header") or {}
        if member is None or not header:
            continue
        result[member.name] = MemberStatus(
            name=member.name, endpoint=member.client_url,
            member_id=int(header.get("member_id", 0)), leader_id=int(st.get("leader", 0)),
            raft_term=int(st.get("raftTerm", header.get("raft_term", 0))),
            revision=int(header.get("revision", 0)), db_size=int(st.get("dbSize", 0)))
    return result


def leader(topo: Topology, members: list[EtcdMember] | None = None) -> EtcdMember | None:
    """The member that reports itself leader, None when none does."""
    for name, st in status(topo, members).items():
        if st.leader:
            return topo.etcd_member(name)
    return None


def healthy(topo: Topology, members: list[EtcdMember] | None = None) -> bool:
    """True when every member of ``members`` (all by default) answers and
    they agree on one leader."""
    targets = members if members is not None else list(topo.etcd)
    st = status(topo, targets)
    leaders = {s.leader_id for s in st.values()}
    return (len(st) == len(targets) and len(leaders) == 1 and 0 not in leaders
            and any(s.leader for s in st.values()))


def wait_ready(topo: Topology, timeout: float = READY_TIMEOUT_S) -> float:
    """Wait until every member answers and a leader exists; returns when
    (monotonic s). Raises LabError at the deadline."""
    netns.wait_for(lambda: healthy(topo), timeout,
                   f"etcd members {', '.join(m.name for m in topo.etcd)} with a leader",
                   interval=0.1)
    return time.monotonic()


def start_all(state: LabState, topo: Topology, run_dir: Path,
              timeout: float = READY_TIMEOUT_S) -> None:
    """Start every member (fresh data dirs) and wait until ready."""
    for member in topo.etcd:
        start(state, topo, member, run_dir)
    wait_ready(topo, timeout)


def remove_data() -> None:
    """Delete the members' data directories (``lab down``)."""
    shutil.rmtree(DATA_DIR / "etcd", ignore_errors=True)


def members_status(state: LabState, topo: Topology) -> list[dict[str, Any]]:
    """``lab status --json`` ``etcd.members[]``: name, namespace, pid,
    client_url, leader (bool), plus answering, revision and raft_term."""
    st = status(topo) if topo.etcd else {}
    return [{"name": m.name, "namespace": m.ns, "pid": pid(state, m),
             "client_url": m.client_url, "leader": bool(st.get(m.name) and st[m.name].leader),
             "answering": m.name in st,
             "revision": st[m.name].revision if m.name in st else None,
             "raft_term": st[m.name].raft_term if m.name in st else None,
             "data_dir": str(data_dir(m))}
            for m in topo.etcd]
