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
- ``udp``: send one datagram (``payload`` or ``payload_hex``) from a
  fresh socket connected to the backend; healthy when a reply arrives
  within ``timeout`` and, with ``expect``, contains that regular expression.
  An ICMP port unreachable fails the check at once.
- ``dns``: send a DNS query (RFC 1035 section 4.1: random ID, RD set, one
  question ``query_name``/``query_type``/IN); healthy when a response with
  the same ID, QR set, opcode QUERY and an RCODE in ``expect_rcode``
  arrives within ``timeout``. Datagrams with another ID are ignored (a late
  answer to an earlier check, or a spoof), so only the timeout ends the wait.
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
import re
import secrets
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from anycast_lb import rules
from anycast_lb.config import (
    DNS_TYPES,
    BackendConfig,
    DnsRcode,
    HealthConfig,
    HealthKind,
    format_host_port,
)

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


class _Datagrams(asyncio.DatagramProtocol):
    """Queues every datagram received, and the first ICMP error."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | OSError] = asyncio.Queue(maxsize=64)

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.queue.full():  # a flood cannot grow memory; the check times out
            self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and not self.queue.full():
            self.queue.put_nowait(exc)


class _Exchange:
    """One request datagram, then replies until ``decide`` returns a result.

    ``decide(reply)`` returns True (healthy), False (unhealthy, e.g. a
    mismatch) or None (not ours: keep waiting). The socket (one descriptor)
    lives for the check only.
    """

    def __init__(self, address: str, port: int, timeout: float, timer: Timer) -> None:
        self.address = address
        self.port = port
        self.timeout = timeout
        self._timer = timer

    async def run(
        self, request: bytes, decide: Callable[[bytes], tuple[bool, str] | None]
    ) -> ProbeResult:
        start = self._timer()
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                _Datagrams, remote_addr=(self.address, self.port), family=family
            )
        except OSError as exc:
            return ProbeResult(False, self._timer() - start, _os_error_detail(exc))
        try:
            transport.sendto(request)
            async with asyncio.timeout(self.timeout):
                while True:
                    item = await protocol.queue.get()
                    if isinstance(item, OSError):
                        if isinstance(item, ConnectionRefusedError):
                            detail = "port unreachable"
                        else:
                            detail = _os_error_detail(item)
                        return ProbeResult(False, self._timer() - start, detail)
                    verdict = decide(item)
                    if verdict is not None:
                        return ProbeResult(verdict[0], self._timer() - start, verdict[1])
        except TimeoutError:
            return ProbeResult(False, self._timer() - start, _timeout_detail(self.timeout))
        finally:
            transport.close()


class UdpProbe:
    """Healthy when ``payload`` sent to ``address:port`` gets a reply within
    ``timeout`` s that contains ``expect`` (a regular expression searched in
    the reply read as Latin-1, one character per byte; None: any reply)."""

    def __init__(self, address: str, port: int, timeout: float, payload: bytes,
                 expect: str | None = None, timer: Timer = time.monotonic) -> None:
        """Raises ValueError for an empty ``payload`` (asyncio sends no empty
        datagram) or an ``expect`` that is no regular expression."""
        if not payload:
            raise ValueError("udp probe needs a non-empty payload")
        self.payload = payload
        self.expect = re.compile(expect) if expect is not None else None
        self._exchange = _Exchange(address, port, timeout, timer)

    def _decide(self, reply: bytes) -> tuple[bool, str]:
        if self.expect is None or self.expect.search(reply.decode("latin-1")):
            return True, f"reply {len(reply)} bytes"
        return False, f"reply {len(reply)} bytes does not match expect"

    async def check(self) -> ProbeResult:
        return await self._exchange.run(self.payload, self._decide)


_RCODE_NAMES = {r.code: r.value for r in DnsRcode}


def dns_query(query_id: int, name: str, qtype: int) -> bytes:
    """A DNS query message (RFC 1035 section 4.1): header with ``query_id``
    (0..65535), opcode QUERY, RD set, one question ``name`` ``qtype`` IN.

    ``name`` is a checked DNS name (:func:`anycast_lb.rules.check_dns_name`);
    ValueError otherwise.
    """
    rules.check_dns_name(name)
    labels = [label for label in name.rstrip(".").split(".") if label]
    qname = b"".join(bytes([len(label)]) + label.encode("ascii") for label in labels) + b"\0"
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    return header + qname + struct.pack("!HH", qtype, 1)


def dns_verdict(reply: bytes, query_id: int, allowed: frozenset[int]) -> tuple[bool, str] | None:
    """Judge one datagram as the answer to query ``query_id``.

    None when it is not a response to that query (too short, another ID,
    QR clear: keep waiting); else (healthy, detail), healthy when the opcode
    is QUERY and the RCODE is in ``allowed`` (RFC 1035 section 4.1.1).
    """
    if len(reply) < 12:
        return None
    reply_id, flags = struct.unpack("!HH", reply[:4])
    if reply_id != query_id or not flags & 0x8000:
        return None
    opcode, rcode = (flags >> 11) & 0xF, flags & 0xF
    name = _RCODE_NAMES.get(rcode, f"RCODE {rcode}")
    if opcode != 0:
        return False, f"opcode {opcode} in the response"
    return rcode in allowed, f"rcode {name}"


class DnsProbe:
    """Healthy when a DNS query for ``name``/``qtype`` gets a matching
    response (same ID, QR set) with an RCODE in ``rcodes`` within ``timeout`` s."""

    def __init__(self, address: str, port: int, timeout: float, name: str, qtype: int,
                 rcodes: Sequence[int] = (0,), timer: Timer = time.monotonic) -> None:
        """Raises ValueError for a name :func:`anycast_lb.rules.check_dns_name` refuses."""
        self.name = rules.check_dns_name(name)
        self.qtype = qtype
        self.rcodes = frozenset(rcodes)
        self._exchange = _Exchange(address, port, timeout, timer)

    async def check(self) -> ProbeResult:
        query_id = secrets.randbelow(65536)  # unpredictable: a spoofed answer must guess it
        return await self._exchange.run(
            dns_query(query_id, self.name, self.qtype),
            lambda reply: dns_verdict(reply, query_id, self.rcodes),
        )


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
    if kind is HealthKind.UDP:
        if health.payload_hex is not None:
            payload = bytes.fromhex(health.payload_hex)
        else:
            payload = (health.payload or "").encode()  # one of the two: HealthConfig
        return UdpProbe(address, port, health.timeout, payload, health.expect)
    if kind is HealthKind.DNS:
        rcodes = health.expect_rcode or [DnsRcode.NOERROR]
        return DnsProbe(address, port, health.timeout, health.query_name or ".",
                        DNS_TYPES[health.query_type or "SOA"], [r.code for r in rcodes])
    return NoneProbe()
