"""The lab's state file: which namespaces and processes it made.

``/run/anycast-lb-lab/state.json``::

    {"topology": {"nodes": 3, "backends": 3, "bfd": false},
     "namespaces": ["alb-client", ...],
     "processes": [{"role": "bgpd", "ns": "alb-router", "node": null,
                    "pid": 1234, "start": 56789, "log": "/run/.../bgpd.log"}]}

``start`` is the process start time (clock ticks since boot, field 22 of
``/proc/PID/stat``): teardown signals a PID only while both match, so a PID
reused by an unrelated process is never touched. Every change is written at
once (write to a temporary file, then rename), so ``lab down`` works after a
crash at any point of ``lab up``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anycast_lb.errors import LabError
from anycast_lb.lab.netns import proc_start

RUN_DIR = Path(os.environ.get("ANYCAST_LB_LAB_DIR", "/run/anycast-lb-lab"))
STATE_FILE = RUN_DIR / "state.json"


@dataclass
class Proc:
    role: str
    ns: str
    pid: int
    start: int | None
    log: str
    node: str | None = None

    def same_process(self) -> bool:
        """True while PID still names the process the lab started."""
        return self.start is not None and proc_start(self.pid) == self.start


@dataclass
class LabState:
    topology: dict[str, Any] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    processes: list[Proc] = field(default_factory=list)
    path: Path = STATE_FILE

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"topology": self.topology, "namespaces": self.namespaces,
                "processes": [asdict(p) for p in self.processes]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path)

    def add_namespace(self, name: str) -> None:
        if name not in self.namespaces:
            self.namespaces.append(name)
            self.save()

    def add_process(self, role: str, ns: str, pid: int, log: Path,
                    node: str | None = None) -> Proc:
        proc = Proc(role=role, ns=ns, pid=pid, start=proc_start(pid), log=str(log), node=node)
        self.processes.append(proc)
        self.save()
        return proc

    def find(self, role: str, node: str | None = None) -> Proc | None:
        """The most recently started process with this role (and node)."""
        for proc in reversed(self.processes):
            if proc.role == role and (node is None or proc.node == node):
                return proc
        return None

    def replace(self, old: Proc, new: Proc) -> None:
        self.processes = [p for p in self.processes if p is not old] + [new]
        self.save()


def load(path: Path = STATE_FILE) -> LabState | None:
    """The saved state, or None when no lab is recorded.

    Raises LabError when the file exists but cannot be read."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read lab state {path}: {exc}") from exc
    return LabState(
        topology=data.get("topology", {}),
        namespaces=list(data.get("namespaces", [])),
        processes=[Proc(**p) for p in data.get("processes", [])],
        path=path,
    )


def remove(path: Path = STATE_FILE) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
