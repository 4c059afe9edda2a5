"""UDP forwarder: a flow table from client (address, port) to a backend.

One listening datagram endpoint on the VIP:port receives every client
datagram. The first datagram of a flow picks a backend with
``pool.candidates`` and opens a connected UDP socket towards it; the flow's
later datagrams go out on that socket, and the backend's replies, read from
it, are sent back to the client through the listening socket, so they come
from the VIP:port the client talked to.

Backend sockets are plain non-blocking sockets watched with
``loop.add_reader`` rather than datagram transports: opening a flow is then
synchronous (no task, no queue for datagrams that arrive while an endpoint
is being created), and a full kernel send buffer drops the datagram, which
is what UDP promises, instead of growing a user-space buffer.

Flows end after service.effective_idle_timeout s without a datagram either
way (one periodic sweep per forwarder, every idle_timeout/8 s, only while
flows exist; a flow ends between idle_timeout and idle_timeout * 9/8 s after
its last datagram), when a new flow needs the place of an idle one (below),
or when their backend is down at the next client datagram (the flow is then
re-picked).

Load shedding (docs/limits.md). Each flow costs a descriptor, and new
flows are cheap to make (one datagram from a new source port, which can be
spoofed), so the table is bounded twice:

- ``max_flows`` (the service's share of the descriptor budget): past it, a
  new flow takes the place of the least recently used flow only if that
  one has been quiet for at least one sweep interval (idle_timeout/8 s);
  otherwise the datagram is dropped and counted (``cap``). A flood thus
  replaces only flows that have gone quiet, never active ones, and costs no
  socket churn while every flow is active.
- ``max_flows_per_source``: flows one source may hold, a source being the
  client address or its prefix (``source_prefix_v4``/``_v6``); past it the
  source's new flows are dropped and counted (``source_cap``), so one
  client cannot take the table from the others.

A flow socket that cannot be opened (EMFILE, ENFILE) drops the datagram,
counted (``descriptors``), with a rate-limited log line.

During a drain (after ``stop_accepting``) a flow counts as finished once it
has been idle for :data:`DRAIN_IDLE` s (at most the idle timeout): UDP has no
end-of-flow, and a request/response exchange (DNS, a health probe) is over
long before its 30 s idle timeout, so one quiet client must not hold a stop
for the whole ``drain.timeout``. A flow still exchanging datagrams keeps
being served until the drain timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from anycast_lb import log
from anycast_lb.config import ServiceConfig, format_host_port
from anycast_lb.errors import BindError
from anycast_lb.flows import FlowKey
from anycast_lb.limits import SOURCE_SHARE, Refusals, SourceCounts, source_key
from anycast_lb.pool import Backend, Pool

MAX_DATAGRAM = 65535
"""Bytes read per recv from a backend socket (the largest UDP payload)."""
READS_PER_WAKEUP = 64
"""Datagrams read from one backend socket per readiness callback, so a busy
flow cannot starve the others."""
LISTENER_HIGH_WATER = 256 * 1024
"""Bytes of replies buffered on the listening socket before replies are
dropped (the kernel's send buffer is full)."""
SWEEPS_PER_IDLE_TIMEOUT = 8
DRAIN_IDLE = 1.0
"""Seconds without a datagram after which a flow ends during a drain (it
ends between DRAIN_IDLE and DRAIN_IDLE * 3/2 s after its last datagram)."""
_DRAIN_SWEEPS = 2

ClientAddr = tuple[Any, ...]
"""A socket address as asyncio reports it: (host, port) or, for IPv6,
(host, port, flowinfo, scope_id)."""


class UdpForwarder:
    """Relays UDP datagrams between clients of the service's VIP:port and backends.

    ``bind_host`` / ``bind_port`` override the address bound (tests bind
    127.0.0.1 port 0); backend choice still hashes the service's VIP and port.

    ``max_flows`` and ``max_flows_per_source`` (from the descriptor budget)
    default to the service's ``max_flows`` and ``max_flows_per_source`` (or
    a quarter of the flow cap).

    Counters (plain ints, read at scrape time): ``flows_total``,
    ``rejected`` (datagrams that could not start a flow: no backend up or
    none reachable), ``refusals`` (shed load: ``cap``, ``source_cap``,
    ``descriptors``; ``refused()`` has every reason), ``evicted`` (quiet
    flows replaced by new ones in a full table), ``dropped`` (datagrams
    lost to a full buffer, an ICMP error, or arriving for a new flow after
    ``stop_accepting``).
    """

    def __init__(
        self,
        service: ServiceConfig,
        pool: Pool,
        bind_host: str | None = None,
        bind_port: int | None = None,
        *,
        max_flows: int | None = None,
        max_flows_per_source: int | None = None,
    ) -> None:
        self.service = service
        self.pool = pool
        self._bind = (
            bind_host if bind_host is not None else str(service.vip),
            bind_port if bind_port is not None else service.port,
        )
        self._vip = (str(service.vip), service.port)
        self._listener: asyncio.DatagramTransport | None = None
        self._listener_paused = False
        self._accepting = False
        self._flows: OrderedDict[ClientAddr, _Flow] = OrderedDict()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sweep_interval = service.effective_idle_timeout / SWEEPS_PER_IDLE_TIMEOUT
        self._idle_sweeps_limit = SWEEPS_PER_IDLE_TIMEOUT
        self._sweep_handle: asyncio.TimerHandle | None = None
        self.max_flows = max_flows if max_flows is not None else service.max_flows
        if max_flows_per_source is None:
            max_flows_per_source = service.max_flows_per_source or max(
                1, self.max_flows // SOURCE_SHARE)
        self._sources = SourceCounts(min(max_flows_per_source, self.max_flows))
        self._prefix_v4 = service.source_prefix_v4
        self._prefix_v6 = service.source_prefix_v6
        self.flows_total = 0
        self.rejected = 0
        self.dropped = 0
        self.refusals = Refusals()
        self._shed_log = log.RateLimitedLog(1.0)

    @property
    def evicted(self) -> int:
        """Quiet flows replaced by new ones in a full table."""
        return self.refusals.evicted

    @property
    def max_flows_per_source(self) -> int:
        return self._sources.cap

    def refused(self) -> dict[str, int]:
        """New flows refused so far, by reason (``limits.REFUSAL_REASONS``)."""
        return self.refusals.by_reason(no_backend=self.rejected)

    def _refuse(self, reason: str, detail: str = "") -> None:
        self.refusals.count(reason)
        self._shed_log("forward.refused", key=reason, service=self.service.name,
                       protocol="udp", reason=reason, **({"error": detail} if detail else {}))

    @property
    def listening(self) -> bool:
        """True between a successful ``start`` and ``stop_accepting``."""
        return self._accepting and self._listener is not None

    @property
    def active(self) -> int:
        """Flows in the table."""
        return len(self._flows)

    async def start(self) -> tuple[str, int]:
        """Bind the listening socket. Returns the bound (address, port).

        Raises BindError naming the address when the OS refuses, and
        RuntimeError if already started.
        """
        if self._listener is not None:
            raise RuntimeError("forwarder already started")
        host, port = self._bind
        loop = asyncio.get_running_loop()
        # Bound here rather than by create_datagram_endpoint(local_addr=...):
        # uvloop leaks its transport when that bind fails.
        try:
            sock = _bound_socket(host, port)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise BindError(
                f"service {self.service.name}: cannot bind udp "
                f"{format_host_port(host, port)}: {reason}"
            ) from exc
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Listener(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        # asyncio's and uvloop's datagram transports both have it; typeshed omits it.
        transport.set_write_buffer_limits(high=LISTENER_HIGH_WATER)  # type: ignore[attr-defined]
        self._listener = transport
        self._accepting = True
        bound = transport.get_extra_info("sockname")
        address = (str(bound[0]), int(bound[1]))
        log.event("forward.listen", service=self.service.name, protocol="udp",
                  address=format_host_port(*address))
        return address

    def stop_accepting(self) -> None:
        """Start no new flow; existing flows continue (their datagrams still
        arrive on, and their replies leave from, the listening socket, which
        closes once the last flow has ended)."""
        if not self._accepting:
            return
        self._accepting = False
        log.event("forward.stop_accepting", service=self.service.name, protocol="udp",
                  active=self.active)
        # Drain: sweep often enough to end flows idle for DRAIN_IDLE s.
        drain_interval = min(DRAIN_IDLE, self.service.effective_idle_timeout) / _DRAIN_SWEEPS
        if drain_interval < self._sweep_interval:
            self._sweep_interval = drain_interval
            self._idle_sweeps_limit = _DRAIN_SWEEPS
            if self._sweep_handle is not None:
                self._sweep_handle.cancel()
                self._sweep_handle = asyncio.get_running_loop().call_later(
                    self._sweep_interval, self._sweep)
        self._close_listener_if_done()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the flow table to empty.

        Returns True if no flow remains, False on timeout.
        """
        if not self._flows:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def abort_all(self) -> None:
        """End every flow now (and close the listener if stop_accepting was called)."""
        for flow in list(self._flows.values()):
            self._close_flow(flow)

    def abort_backend(self, backend: Backend) -> int:
        """End the flows towards ``backend`` (a backend removed by live
        apply, past ``drain.timeout``); how many there were."""
        doomed = [f for f in self._flows.values() if f.backend is backend]
        for flow in doomed:
            self._close_flow(flow)
        return len(doomed)

    def abort_flows(self, keys: Iterable[FlowKey]) -> int:
        """UDP flows are not TCP flow keys: none to abort; 0."""
        return 0

    # -- data path ----------------------------------------------------------

    def _from_client(self, data: bytes, addr: ClientAddr) -> None:
        flow = self._flows.get(addr)
        if flow is not None and flow.backend.up:
            self._flows.move_to_end(addr)
        else:
            if flow is not None:
                self._close_flow(flow)  # backend went down: pick again
            if not self._accepting:
                self.dropped += 1
                return
            flow = self._open_flow(addr)
            if flow is None:
                return  # counted by _open_flow
        flow.idle_sweeps = 0
        backend = flow.backend
        try:
            flow.sock.send(data)
        except OSError:
            # BlockingIOError: kernel buffer full; ConnectionRefusedError: an
            # ICMP port unreachable from an earlier datagram. UDP may drop.
            self.dropped += 1
            return
        backend.packets_in += 1
        backend.bytes_in += len(data)

    def _to_client(self, data: bytes, addr: ClientAddr) -> None:
        listener = self._listener
        if listener is None or self._listener_paused:
            self.dropped += 1
            return
        listener.sendto(data, addr)

    def _source(self, host: str) -> str:
        if self._prefix_v4 == 32 and ":" not in host:
            return host  # the common case, without parsing the address
        return source_key(host, self._prefix_v4, self._prefix_v6)

    def _open_flow(self, addr: ClientAddr) -> _Flow | None:
        """A new flow for ``addr``, or None (counted: rejected or refused)."""
        candidates = self.pool.candidates((str(addr[0]), int(addr[1])), self._vip)
        if not candidates:
            self.rejected += 1
            return None
        source = self._source(str(addr[0]))
        if not self._sources.take(source):
            self._refuse("source_cap")
            return None
        flow = self._open_socket(addr, source, candidates)
        if flow is None:
            self._sources.give(source)
        return flow

    def _open_socket(self, addr: ClientAddr, source: str, candidates: list[Backend]
                     ) -> _Flow | None:
        if len(self._flows) >= self.max_flows:
            oldest = next(iter(self._flows.values()))
            if oldest.idle_sweeps == 0:
                # Every flow had a datagram since the last sweep: none is
                # pushed out for a newcomer.
                self._refuse("cap")
                return None
            self._close_flow(oldest)
            self.refusals.evicted += 1
        loop = asyncio.get_running_loop()
        for backend in candidates:
            family = (
                socket.AF_INET6 if ipaddress.ip_address(backend.sockaddr[0]).version == 6
                else socket.AF_INET
            )
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM)
            except OSError as exc:  # out of descriptors: no other backend will do better
                self._refuse("descriptors", exc.strerror or str(exc))
                return None
            try:
                sock.setblocking(False)
                sock.connect(backend.sockaddr)  # UDP: no handshake, only a route lookup
            except OSError as exc:
                sock.close()
                backend.connect_failures += 1
                log.debug("forward.connect_failed", service=self.service.name,
                          backend=backend.key, error=exc.strerror or str(exc))
                continue
            flow = _Flow(self, addr, backend, sock, source)
            loop.add_reader(sock.fileno(), flow.readable)
            self._flows[addr] = flow
            self.flows_total += 1
            backend.active_connections += 1
            backend.connections_total += 1
            self._idle.clear()
            if self._sweep_handle is None:
                self._sweep_handle = loop.call_later(self._sweep_interval, self._sweep)
            return flow
        self.rejected += 1  # no backend reachable
        return None

    def _close_flow(self, flow: _Flow) -> None:
        if self._flows.get(flow.client) is flow:
            del self._flows[flow.client]
        if flow.sock.fileno() < 0:
            return
        asyncio.get_running_loop().remove_reader(flow.sock.fileno())
        flow.sock.close()
        self._sources.give(flow.source)
        flow.backend.active_connections -= 1
        if not self._flows:
            self._idle.set()
            self._close_listener_if_done()

    def _close_listener_if_done(self) -> None:
        if not self._accepting and not self._flows and self._listener is not None:
            self._listener.close()
            self._listener = None
            if self._sweep_handle is not None:
                self._sweep_handle.cancel()
                self._sweep_handle = None

    def _sweep(self) -> None:
        limit = self._idle_sweeps_limit
        for flow in list(self._flows.values()):
            flow.idle_sweeps += 1
            if flow.idle_sweeps > limit:
                self._close_flow(flow)
        self._sweep_handle = None
        if self._flows:
            self._sweep_handle = asyncio.get_running_loop().call_later(
                self._sweep_interval, self._sweep
            )


def _bound_socket(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to ``host`` (an IP literal) and ``port``;
    IPv6 sockets are IPv6-only, as the TCP listeners are. Raises OSError, or
    ValueError if ``host`` is not an IP address."""
    version = ipaddress.ip_address(host).version
    sock = socket.socket(socket.AF_INET6 if version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Flow:
    """One client's flow: its connected socket towards the chosen backend."""

    __slots__ = ("fwd", "client", "backend", "sock", "idle_sweeps", "source")

    def __init__(
        self, fwd: UdpForwarder, client: ClientAddr, backend: Backend, sock: socket.socket,
        source: str,
    ) -> None:
        self.fwd = fwd
        self.client = client
        self.backend = backend
        self.sock = sock
        self.idle_sweeps = 0
        self.source = source
        """The client's group for the per-source cap."""

    def readable(self) -> None:
        """Replies from the backend: relay them to the client (level-triggered,
        so what is left after READS_PER_WAKEUP datagrams is read next time)."""
        sock, fwd, backend = self.sock, self.fwd, self.backend
        for _ in range(READS_PER_WAKEUP):
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                fwd.dropped += 1  # an ICMP error for an earlier datagram
                return
            self.idle_sweeps = 0
            backend.packets_out += 1
            backend.bytes_out += len(data)
            fwd._to_client(data, self.client)


class _Listener(asyncio.DatagramProtocol):
    """The listening socket's protocol: hands datagrams to the forwarder."""

    def __init__(self, fwd: UdpForwarder) -> None:
        self.fwd = fwd
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        fwd = self.fwd
        if fwd._listener is not None and fwd._listener is self.transport:
            # Closed under us (not by _close_listener_if_done): no longer
            # listening, so the node stops announcing the VIP.
            log.error("forward.listener_lost", service=fwd.service.name, protocol="udp",
                      error=str(exc))
            fwd._listener = None

    def datagram_received(self, data: bytes, addr: ClientAddr) -> None:
        self.fwd._from_client(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for replies to clients that went away: nothing to do.
        self.fwd.dropped += 1

    def pause_writing(self) -> None:
        self.fwd._listener_paused = True

    def resume_writing(self) -> None:
        self.fwd._listener_paused = False
