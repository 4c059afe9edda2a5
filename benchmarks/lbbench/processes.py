"""Start processes pinned to CPUs, wait for readiness with deadlines, and
end every process started, by PID.

Long-lived servers start in their own session, so a Ctrl-C typed at the
benchmark reaches the benchmark alone, which then stops them in order from
its ``finally``. Nothing here ever signals a process it did not start
(except the live descendants of one it did, found under /proc before it is
stopped).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.lbbench.procfs import process_tree

POLL_INTERVAL = 0.01
"""Seconds between two looks at a condition being waited on."""


class BenchError(Exception):
    """A process did not start, answer or finish as the benchmark needs."""


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               alive: Callable[[], bool] | None = None) -> None:
    """Poll ``predicate`` every ``POLL_INTERVAL`` s until it is true.

    Raises BenchError after ``timeout`` s, or as soon as ``alive()`` (when
    given) turns false: a server that exited will never become ready.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if alive is not None and not alive():
            raise BenchError(f"exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def tcp_listening(host: str, port: int) -> bool:
    """A LISTEN socket on IPv4 host:port in /proc/net/tcp. Looks without
    connecting: a probe connection through a proxy would reach the backend,
    and iperf3's server takes a stray connection for a broken test."""
    wanted = f"{int.from_bytes(bytes(map(int, host.split('.'))), 'little'):08X}:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":
            return True
    return False


def udp_echoes(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(b"ping", (host, port))
            return s.recv(64) == b"ping"
        except OSError:
            return False


def log_value(path: Path, pattern: str) -> str | None:
    """The first group of the first match of ``pattern`` in the file, if any."""
    try:
        match = re.search(pattern, path.read_text(errors="replace"))
    except FileNotFoundError:
        return None
    return match.group(1) if match else None


class Supervisor:
    """Owns every process the benchmark starts; ``close()`` ends them all."""

    def __init__(self, workdir: Path, nice: int = 0) -> None:
        self.workdir = workdir
        self.nice = nice
        """Niceness of every process started (-20..19; below 0 wins the CPU
        from other work on a shared machine)."""
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], cpus: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` pinned to ``cpus`` (taskset list, e.g. "0"), its
        stdout and stderr in ``workdir/NAME.log``."""
        with open(self.workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(self._prefix(cpus) + list(argv), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        self._procs.append((name, proc))
        return proc

    def _prefix(self, cpus: str) -> list[str]:
        """taskset (and nice) exec the command: the PID is the command's own."""
        nice = ["nice", "-n", str(self.nice)] if self.nice else []
        return ["taskset", "-c", cpus, *nice]

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; descendants found before
        the signal are killed too if they outlive it."""
        if proc.poll() is None:
            descendants = process_tree(proc.pid)[1:]
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            for pid in descendants:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def close(self) -> None:
        """Stop every process still owned, the last started first."""
        while self._procs:
            _, proc = self._procs[-1]
            try:
                self.stop(proc, timeout=5.0)
            except Exception:
                proc.kill()
                self._procs = self._procs[:-1]

    def run(self, name: str, argv: Sequence[str], cpus: str, timeout: float) -> str:
        """Run a bounded command pinned to ``cpus``; return its stdout.

        Raises BenchError if it runs past ``timeout`` s (it is killed) or
        exits non-zero (with the tail of its stderr)."""
        proc = subprocess.Popen(self._prefix(cpus) + list(argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BenchError(f"{name}: still running after {timeout} s, killed") from None
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C): never leave it running
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise BenchError(f"{name}: exit {proc.returncode}: "
                             f"{err.decode(errors='replace').strip()[-500:]}")
        return out.decode(errors="replace")
