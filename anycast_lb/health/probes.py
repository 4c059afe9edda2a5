"""Health probes: one check of one backend, returning a ``ProbeResult``.

Kinds (``health.kind`` in the config):

- ``tcp``: connect within ``timeout`` seconds, then close.
- ``http``: ``GET http://ADDR:PORT/PATH`` (IPv6 bracketed) with the
  configured Host header; healthy when the status is in ``expect_status``.
  Every check is a fresh connection (the shared session's connector uses
  ``force_close``), so a half-dead backend cannot hide behind a kept-alive
  socket.
- ``exec``: run ``command`` (argv, no shell) with the environment plus
  ``BACKEND_ADDRESS`` and ``BACKEND_PORT``; exit 0 is healthy. On timeout
  the command's whole process group is killed and reaped.
- ``none``: always healthy.

A probe never raises for a failed check: it returns ``ok=False`` with a
short ``detail`` ("connect refused", "timeout after 1.0 s", "status 500",
"exit 1"). ``CancelledError`` still propagates (after an exec probe has
killed its command).
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from anycast_lb import rules
from anycast_lb.config import BackendConfig, HealthConfig, HealthKind, format_host_port

Timer = Callable[[], float]
"""Monotonic seconds, used only to measure a check's latency."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    latency_s: float
    """Seconds from the start of the check to its result (also on failure)."""
    detail: str
    """Short human text: "status 200", "connect refused", "timeout after 1.0 s"."""


class Probe(Protocol):
    async def check(self) -> ProbeResult:
        """Run one check. Never raises for an unhealthy backend."""
        ...


class ProbeFactory(Protocol):
    def __call__(
        self,
        health: HealthConfig,
        backend: BackendConfig,
        session: aiohttp.ClientSession | None,
    ) -> Probe: ...


def make_session() -> aiohttp.ClientSession:
    """The HTTP session shared by all HTTP probes of a monitor.

    No connection reuse (each check is a fresh connect), no cookies, no
    proxy from the environment, no session-wide timeout (each probe applies
    its own). Must be created inside a running event loop; the caller closes it.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
        trust_env=False,
    )


def _timeout_detail(seconds: float) -> str:
    return f"timeout after {seconds:g} s"


def _os_error_detail(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return "connect refused"
    reason = exc.strerror or type(exc).__name__
    return f"connect error: {reason}"


class TcpProbe:
    """Healthy when a TCP connect to ``address:port`` completes within ``timeout`` s."""

    def __init__(self, address: str, port: int, timeout: float, timer: Timer = time.monotonic) -> None:
        self.address = address
        self.port = port
        self.timeout = timeout
        self._timer = timer

    async def check(self) -> ProbeResult:
        start = self._timer()
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.address, self.port)
        except TimeoutError:
            return ProbeResult(False, self._timer() - start, _timeout_detail(self.timeout))
        except OSError as exc:
            return ProbeResult(False, self._timer() - start, _os_error_detail(exc))
        latency = self._timer() - start
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass  # the connect succeeded; a reset on close does not matter
        return ProbeResult(True, latency, "connected")


class HttpProbe:
    """Healthy when ``GET url`` answers, within ``timeout`` s, with a status in ``expect_status``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        address: str,
        port: int,
        path: str,
        timeout: float,
        expect_status: Sequence[int],
        host: str | None = None,
        timer: Timer = time.monotonic,
    ) -> None:
        """``host``: Host header; None lets aiohttp send ``address[:port]``.

        Raises ValueError for a ``path`` or ``host`` the config would refuse
        (:func:`anycast_lb.rules.check_http_path`, :func:`~anycast_lb.rules.check_http_host`).
        """
        self.url = f"http://{format_host_port(address, port)}{rules.check_http_path(path)}"
        self.timeout = timeout
        self.expect_status = frozenset(expect_status)
        self.headers = {"Host": rules.check_http_host(host)} if host is not None else {}
        self._session = session
        self._timer = timer

    async def check(self) -> ProbeResult:
        start = self._timer()
        try:
            async with asyncio.timeout(self.timeout):
                async with self._session.get(
                    self.url, headers=self.headers, allow_redirects=False
                ) as response:
                    status = response.status
                    # Read the body so a backend that stalls mid-response fails the check.
                    await response.read()
        except TimeoutError:
            return ProbeResult(False, self._timer() - start, _timeout_detail(self.timeout))
        except aiohttp.ClientConnectorError as exc:
            return ProbeResult(False, self._timer() - start, _os_error_detail(exc.os_error))
        except aiohttp.ClientError as exc:
            return ProbeResult(False, self._timer() - start, f"http error: {type(exc).__name__}")
        except OSError as exc:
            return ProbeResult(False, self._timer() - start, _os_error_detail(exc))
        latency = self._timer() - start
        return ProbeResult(status in self.expect_status, latency, f"status {status}")


class ExecProbe:
    """Healthy when ``argv`` exits 0 within ``timeout`` s.

    The command runs in its own session (process group) with stdin, stdout
    and stderr on /dev/null, and the environment of this process plus
    ``BACKEND_ADDRESS`` and ``BACKEND_PORT``. On timeout or cancellation
    the whole group gets SIGKILL and the command is reaped.
    """

    def __init__(
        self,
        argv: Sequence[str],
        address: str,
        port: int,
        timeout: float,
        timer: Timer = time.monotonic,
    ) -> None:
        if not argv:
            raise ValueError("exec probe needs a non-empty argv")
        self.argv = list(argv)
        self.address = address
        self.port = port
        self.timeout = timeout
        self._timer = timer

    async def check(self) -> ProbeResult:
        start = self._timer()
        env = dict(os.environ, BACKEND_ADDRESS=self.address, BACKEND_PORT=str(self.port))
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return ProbeResult(False, self._timer() - start, f"cannot run: {reason}")
        try:
            async with asyncio.timeout(self.timeout):
                code = await proc.wait()
        except TimeoutError:
            return ProbeResult(False, self._timer() - start, _timeout_detail(self.timeout))
        finally:
            if proc.returncode is None:
                _kill_group(proc.pid)
                await proc.wait()
        latency = self._timer() - start
        if code == 0:
            return ProbeResult(True, latency, "exit 0")
        if code < 0:
            return ProbeResult(False, latency, f"killed by signal {-code}")
        return ProbeResult(False, latency, f"exit {code}")


def _kill_group(pid: int) -> None:
    # start_new_session made the command a group leader: its pgid is its pid.
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class NoneProbe:
    """``kind: none``: always healthy, zero latency."""

    async def check(self) -> ProbeResult:
        return ProbeResult(True, 0.0, "no check")


def make_probe(
    health: HealthConfig,
    backend: BackendConfig,
    session: aiohttp.ClientSession | None,
) -> Probe:
    """Build the probe ``health`` describes for ``backend``.

    The probed port is ``health.port``, else the backend's port (also passed
    to exec commands as ``BACKEND_PORT``). Raises ValueError for kind http
    without a ``session`` (see :func:`make_session`).
    """
    address = str(backend.address)
    port = health.port if health.port is not None else backend.port
    kind = health.kind
    if kind is HealthKind.TCP:
        return TcpProbe(address, port, health.timeout)
    if kind is HealthKind.HTTP:
        if session is None:
            raise ValueError("http probes need an aiohttp session (make_session())")
        return HttpProbe(
            session, address, port, health.path, health.timeout, health.expect_status, health.host
        )
    if kind is HealthKind.EXEC:
        assert health.command  # guaranteed by HealthConfig validation
        return ExecProbe(health.command, address, port, health.timeout)
    return NoneProbe()
