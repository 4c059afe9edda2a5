"""The two proxies under test, each started as a real process pinned to the
proxy CPU, with a readiness wait (deadline, no sleep) and a stop by PID.

- ``Haproxy``: ``haproxy -db -f haproxy.cfg`` (foreground, one process,
  ``nbthread 1``); ready when both TCP VIP ports listen.
- ``AnycastLb``: ``.venv/bin/anycast-lb run --config node.yaml``; ready when
  its API (port read from its ``api.listening`` log line) shows every
  backend of every service up and listening, and both TCP VIP ports listen.
"""

from __future__ import annotations

import functools
import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.lbbench import configs
from benchmarks.lbbench.processes import (
    BenchError,
    Supervisor,
    log_value,
    tcp_listening,
    wait_until,
)

START_TIMEOUT = 20.0
"""Seconds a proxy may take to become ready."""


class Proxy:
    label: str
    udp: bool = False

    def __init__(self, sup: Supervisor, topo: configs.Topology, cpus: str) -> None:
        self.sup = sup
        self.topo = topo
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _wait_vip(self) -> None:
        for port in (self.topo.web_port, self.topo.bulk_port):
            wait_until(functools.partial(tcp_listening, self.topo.vip, port), START_TIMEOUT,
                       f"{self.label} on {self.topo.vip}:{port}", alive=self._alive)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.sup.stop(self.proc)
            self.proc = None

    def _fail(self, exc: BenchError) -> BenchError:
        return BenchError(f"{self.label}: {exc}\n{self.sup.log_tail(self.label)}")


class Haproxy(Proxy):
    label = "haproxy"

    def __init__(self, sup: Supervisor, topo: configs.Topology, cpus: str,
                 options: configs.HaproxyOptions) -> None:
        super().__init__(sup, topo, cpus)
        self.options = options

    def start(self) -> None:
        path = self.sup.workdir / "haproxy.cfg"
        path.write_text(configs.haproxy_config(self.topo, self.options))
        self.proc = self.sup.start(self.label, ["haproxy", "-db", "-f", str(path)], self.cpus)
        try:
            self._wait_vip()
        except BenchError as exc:
            raise self._fail(exc) from None


class AnycastLb(Proxy):
    udp = True

    def __init__(self, sup: Supervisor, topo: configs.Topology, cpus: str,
                 forwarding: configs.Forwarding, executable: Path) -> None:
        super().__init__(sup, topo, cpus)
        self.forwarding = forwarding
        self.executable = executable
        self.label = f"anycast-lb {forwarding.engine}"
        self.api: str | None = None

    def start(self) -> None:
        name = self.label.replace(" ", "-")
        path = self.sup.workdir / f"{name}.yaml"
        path.write_text(configs.anycast_lb_yaml(self.topo, self.forwarding))
        log = self.sup.log_path(self.label)
        log.unlink(missing_ok=True)
        self.proc = self.sup.start(self.label, [str(self.executable), "run", "--config", str(path),
                                                "--log-level", "info"], self.cpus)
        try:
            wait_until(lambda: log_value(log, r"event=api\.listening address=(\S+)") is not None,
                       START_TIMEOUT, f"{self.label} API", alive=self._alive)
            self.api = log_value(log, r"event=api\.listening address=(\S+)")
            wait_until(self._all_up, START_TIMEOUT, f"{self.label}: every backend up",
                       alive=self._alive)
            self._wait_vip()
        except BenchError as exc:
            raise self._fail(exc) from None

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.api}/status", timeout=2.0) as response:
            result: dict[str, Any] = json.load(response)
            return result

    def _all_up(self) -> bool:
        try:
            services = self.status()["services"]
        except OSError:
            return False
        return all(s["listening"] and s["up_backends"] == len(s["backends"]) for s in services)
