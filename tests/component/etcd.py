"""A real single-member etcd for component tests (Debian's ``etcd-server``).

etcd cannot listen on port 0 and tell us the port (its advertised URLs must
be known before it starts), so ports come from a random draw in 20000-32767,
below the kernel's ephemeral range (32768-60999 by default) where the
kernel hands out ports to outgoing connections. If another process holds a
drawn port, etcd logs ``address already in use`` and exits: the member is
started again on a fresh draw, at most ``ATTEMPTS`` times. Readiness is its
``/health`` answering ``"health":"true"`` (a leader elected), waited for
with a deadline. Stopped by PID (SIGTERM, then SIGKILL after 5 s).

Heartbeat 50 ms and election timeout 500 ms (the figures of a fast LAN)
bring etcd's minimum lease TTL down to 1 s, so lease expiry tests run fast.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ATTEMPTS = 5
READY_TIMEOUT = 15.0
PORT_RANGE = (20000, 32767)


class EtcdUnavailable(RuntimeError):
    """etcd could not be started (not installed, or no free ports)."""


class EtcdMember:
    """One etcd process on 127.0.0.1. ``client_url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, data_dir: Path, name: str = "t1") -> None:
        self.data_dir = data_dir
        self.name = name
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.client_port = 0
        self.peer_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> None:
        """Start on fresh ports (or on the ports of a previous start, to
        restart the same member). Raises EtcdUnavailable."""
        if shutil.which("etcd") is None:
            raise EtcdUnavailable("etcd not installed (scripts/install.sh installs etcd-server)")
        rng = random.Random()
        for _ in range(ATTEMPTS):
            if not self.client_port:
                self.client_port, self.peer_port = rng.sample(range(*PORT_RANGE), 2)
            if self._spawn():
                return
            if not self._port_clash():
                raise EtcdUnavailable(f"etcd did not start: {self._log_tail()}")
            self.client_port = self.peer_port = 0
        raise EtcdUnavailable(f"no free port pair after {ATTEMPTS} draws")

    def _spawn(self) -> bool:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            "etcd", "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-outputs", "stderr",
        ]
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if self.healthy():
                return True
            time.sleep(0.02)
        self.stop()
        raise EtcdUnavailable(f"etcd not healthy after {READY_TIMEOUT} s: {self._log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=0.5) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _port_clash(self) -> bool:
        return "address already in use" in self.log_path.read_text(errors="replace")[-4000:]

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-1500:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process by PID; keeps its data dir and ports for a restart."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
