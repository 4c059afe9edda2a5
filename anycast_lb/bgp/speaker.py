"""The node side of BGP: the announcer's socket, ExaBGP's supervision, route state.

:class:`BgpSpeaker` owns, inside one TaskGroup:

- the UNIX socket server at ``run_dir/announcer.sock`` that the announcer
  (ExaBGP's API process) connects to (:mod:`anycast_lb.bgp.wire` has the
  protocol);
- the sender: the current route set goes to the announcer on every change
  and at least every 0.2 s. This heartbeat runs on the node's event loop on
  purpose: a hung node stops heartbeating, and the announcer withdraws
  everything after ``bgp.node_timeout`` seconds;
- :class:`~anycast_lb.bgp.exabgp.ExaBGPSupervisor`, running ExaBGP with the
  config generated into ``run_dir/exabgp.conf``.

The node calls :meth:`BgpSpeaker.set_routes` whenever the policy's answer may
have changed (cheap when nothing changed) and reads :meth:`BgpSpeaker.status`.
What it reports is ExaBGP's word within a deadline or ``unknown``
(:mod:`anycast_lb.bgp.liveness`). On a graceful stop the node calls
:meth:`BgpSpeaker.begin_stop` first (ExaBGP is then never restarted) and
:meth:`BgpSpeaker.stop_exabgp` last, once the routes are withdrawn.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from anycast_lb import log
from anycast_lb.bgp import wire
from anycast_lb.bgp.exabgp import (
    CONFIG_NAME,
    SOCKET_NAME,
    ExaBGPSupervisor,
    announcer_argv,
    detect_version,
    exabgp_argv,
    exabgp_env,
    render_config,
)
from anycast_lb.bgp.liveness import (
    CONFIRM_DEADLINE,
    Freshness,
    freshness,
    peer_states,
    route_states,
)
from anycast_lb.bgp.policy import Prefix, Route, sorted_prefixes
from anycast_lb.clock import Clock
from anycast_lb.config import BgpConfig
from anycast_lb.errors import AnnouncerError
from anycast_lb.listeners import close_server

HEARTBEAT = 0.2
"""Seconds between route messages when nothing changes."""
MAX_BUFFERED = 1024 * 1024
"""Bytes queued towards an announcer that does not read before it is dropped."""
_HISTORY = 1024
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Buckets (s) of ``anycast_lb_bgp_announce_ack_seconds``; the announcer
gives ExaBGP 5 s per line (``ACK_TIMEOUT``)."""
PEER_STATES = ("up", "down", "connected", "unknown")
"""Values of the ``state`` label of ``anycast_lb_bgp_peer_state``."""


def resolve_exabgp(exe: str) -> str:
    """Absolute path of ExaBGP: ``exe`` if it has a slash, else PATH, else next
    to this Python (a virtualenv's bin/). Raises AnnouncerError if not found."""
    if "/" in exe:
        return exe
    found = shutil.which(exe)
    if found is None:
        sibling = Path(sys.executable).parent / exe
        if sibling.is_file() and os.access(sibling, os.X_OK):
            found = str(sibling)
    if found is None:
        raise AnnouncerError(f"ExaBGP executable {exe!r} not found on PATH")
    return found


class _Conn:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.acked: dict[Prefix, Route] | None = None


class BgpSpeaker:
    """Drives ExaBGP through the announcer (see the module docstring)."""

    def __init__(
        self,
        bgp: BgpConfig,
        node_name: str,
        run_dir: Path,
        clock: Clock,
        log_file: Path | None = None,
    ) -> None:
        """``log_file``: where ExaBGP's output goes (appended; the node's
        stderr when None)."""
        self._bgp = bgp
        self._families = frozenset(bgp.families())
        self._node_name = node_name
        self._run_dir = run_dir
        self._clock = clock
        self._log_file = log_file
        self._routes: dict[Prefix, Route] = {}
        self._known: set[Prefix] = set()
        self._wanted: set[Prefix] = set()
        self._unsendable: set[Prefix] = set()
        self._seq = 0
        self._history: dict[int, dict[Prefix, Route]] = {0: {}}
        self._changed = asyncio.Event()
        self._conns: list[_Conn] = []
        self._peers: dict[str, str] = {str(p.address): "down" for p in bgp.peers}
        self._supervisor: ExaBGPSupervisor | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._synced = asyncio.Event()
        self._last_pid: int | None = None
        self._exabgp_errors = 0
        self._confirmed_at: float | None = None
        self._waiting_since = clock.monotonic()
        self._stopping = False
        self._was_confirmed = False
        self._peer_up_since: dict[str, float] = {}
        """Monotonic s each peer's session was last reported up (up peers only)."""
        self._peer_updates: dict[str, int] = {a: 0 for a in self._peers}
        self._sent_at: dict[int, float] = {}
        """Monotonic s each route set (seq) was first sent, until it is acked."""
        self.ack_latency = Histogram(
            "anycast_lb_bgp_announce_ack_seconds",
            "Seconds from sending a route set to the announcer to ExaBGP's ack of every line",
            buckets=ACK_BUCKETS, registry=None)

    @property
    def socket_path(self) -> Path:
        return self._run_dir / SOCKET_NAME

    @property
    def config_path(self) -> Path:
        return self._run_dir / CONFIG_NAME

    # ---------------------------------------------------------------- API

    def set_routes(self, routes: Mapping[Prefix, Route]) -> None:
        """Make ``routes`` the complete set to announce (others are withdrawn).

        Non-blocking; a no-op when nothing changed. The announcer gets it at
        once if connected; :meth:`status` says ``pending`` until it acks.
        A route of a family the sessions do not negotiate
        (:meth:`BgpConfig.families <anycast_lb.config.BgpConfig.families>`:
        the family of ``bgp.local_address``, plus the other one when its
        ``next_hop_v4``/``next_hop_v6`` is set) is never sent (ExaBGP 5.0.15
        would accept it and send it nowhere), logged as
        ``route.family_mismatch``, and stays ``pending``.
        """
        new: dict[Prefix, Route] = {}
        for prefix, route in routes.items():
            if prefix.version in self._families:
                new[prefix] = route
            elif prefix not in self._unsendable:
                self._unsendable.add(prefix)
                log.error("route.family_mismatch", prefix=str(prefix),
                          local_address=str(self._bgp.local_address))
        self._wanted = set(routes)
        self._known.update(routes)
        if new == self._routes:
            return
        self._seq += 1
        self._routes = new
        self._history[self._seq] = new
        for old in [s for s in self._history if s < self._seq - _HISTORY]:
            del self._history[old]
        self._synced.clear()
        self._changed.set()

    def synced(self) -> bool:
        """True when the announcer acked the current route set."""
        conn = self._conns[-1] if self._conns else None
        return conn is not None and conn.acked == self._routes

    async def wait_synced(self) -> None:
        """Wait until :meth:`synced` (use with a timeout)."""
        while not self.synced():
            self._synced.clear()
            await self._synced.wait()

    def freshness(self) -> Freshness:
        """Whether ExaBGP answered within :data:`CONFIRM_DEADLINE` s, and how
        long ago (s)."""
        return freshness(self._clock.monotonic(), self._confirmed_at, self._waiting_since)

    def _confirm(self) -> None:
        self._confirmed_at = self._clock.monotonic()

    def status(self) -> dict[str, object]:
        """``peers`` {address: up|down|connected, or unknown when not
        confirmed}, ``routes`` {prefix: announced|withdrawn|pending, or
        unconfirmed when not confirmed} for every prefix ever set,
        ``confirmed`` (ExaBGP answered within ``confirm_deadline_s``),
        ``confirmed_age_s`` (s since its last answer, or since the node
        started waiting for a first one), ``exabgp_pid`` (None when not
        running), ``exabgp_restarts``, ``announcer_connected``, ``seq`` (of
        the current set), ``exabgp_errors`` (route sets ExaBGP answered
        ``error`` to, or did not answer in time)."""
        fresh = self.freshness()
        return {
            "confirmed": fresh.confirmed,
            "confirmed_age_s": round(fresh.age, 3),
            "confirm_deadline_s": CONFIRM_DEADLINE,
            "peers": peer_states(self._peers, fresh.confirmed),
            "routes": route_states(self._acked_routes(), fresh.confirmed),
            "exabgp_pid": self._supervisor.pid if self._supervisor is not None else None,
            "exabgp_restarts": self._supervisor.restarts if self._supervisor is not None else 0,
            "announcer_connected": bool(self._conns),
            "seq": self._seq,
            "exabgp_errors": self._exabgp_errors,
        }

    def metric_families(self) -> Iterator[Metric]:
        """``anycast_lb_bgp_*`` families for the node's /metrics (see docs/api.md)."""
        fresh = self.freshness()
        confirmed = GaugeMetricFamily(
            "anycast_lb_bgp_confirmed", "1 while ExaBGP answered within the confirm deadline")
        confirmed.add_metric([], 1.0 if fresh.confirmed else 0.0)
        age = GaugeMetricFamily(
            "anycast_lb_bgp_confirmed_age_seconds",
            "Seconds since ExaBGP last answered (since start while it never did)")
        age.add_metric([], fresh.age)
        peer_up = GaugeMetricFamily(
            "anycast_lb_bgp_peer_up", "1 while ExaBGP confirms the session established",
            labels=["peer"])
        for address, state in peer_states(self._peers, fresh.confirmed).items():
            peer_up.add_metric([address], 1.0 if state == "up" else 0.0)
        announced = GaugeMetricFamily(
            "anycast_lb_bgp_route_announced", "1 while ExaBGP confirms the route announced",
            labels=["prefix"])
        for prefix, state in route_states(self._acked_routes(), fresh.confirmed).items():
            announced.add_metric([prefix], 1.0 if state == "announced" else 0.0)
        restarts = CounterMetricFamily(
            "anycast_lb_bgp_exabgp_restarts", "ExaBGP restarts by the node")
        restarts.add_metric([], float(self._supervisor.restarts if self._supervisor else 0))
        errors = CounterMetricFamily(
            "anycast_lb_bgp_exabgp_errors",
            "Route sets ExaBGP answered error to, or did not answer in time")
        errors.add_metric([], float(self._exabgp_errors))
        yield from (confirmed, age, peer_up, announced, restarts, errors)
        yield from self._more_families(fresh.confirmed)

    def _more_families(self, confirmed: bool) -> Iterator[Metric]:
        states = peer_states(self._peers, confirmed)
        state = GaugeMetricFamily(
            "anycast_lb_bgp_peer_state",
            "1 for the session state ExaBGP confirms (unknown while unconfirmed)",
            labels=["peer", "state"])
        uptime = GaugeMetricFamily(
            "anycast_lb_bgp_peer_uptime_seconds",
            "Seconds since the session was reported up (0 while it is not confirmed up)",
            labels=["peer"])
        updates = CounterMetricFamily(
            "anycast_lb_bgp_peer_updates_sent",
            "Prefix announcements and withdrawals ExaBGP acked while the session was up",
            labels=["peer"])
        now = self._clock.monotonic()
        for address, current in states.items():
            for name in PEER_STATES:
                state.add_metric([address, name], 1.0 if current == name else 0.0)
            since = self._peer_up_since.get(address)
            up_for = now - since if current == "up" and since is not None else 0.0
            uptime.add_metric([address], max(up_for, 0.0))
            updates.add_metric([address], float(self._peer_updates.get(address, 0)))
        running = GaugeMetricFamily(
            "anycast_lb_bgp_exabgp_running", "1 while the ExaBGP child process runs")
        running.add_metric([], 1.0 if self._supervisor is not None
                           and self._supervisor.pid is not None else 0.0)
        connected = GaugeMetricFamily(
            "anycast_lb_bgp_announcer_connected",
            "1 while ExaBGP's API process (the announcer) is connected to the node")
        connected.add_metric([], 1.0 if self._conns else 0.0)
        yield from (state, uptime, updates, running, connected)
        yield from self.ack_latency.collect()

    def _set_peer(self, address: str, state: str) -> None:
        if state == "up" and self._peers.get(address) != "up":
            self._peer_up_since[address] = self._clock.monotonic()
        elif state != "up":
            self._peer_up_since.pop(address, None)
        self._peers[address] = state
        self._peer_updates.setdefault(address, 0)

    def _on_ack(self, seq: int, before: Mapping[Prefix, Route] | None,
                after: Mapping[Prefix, Route] | None, ok: bool) -> None:
        """Account one ack: its latency, and the route changes it carried to
        every peer up now (what ExaBGP sent them in UPDATE messages)."""
        sent = self._sent_at.pop(seq, None)
        for superseded in [s for s in self._sent_at if s < seq]:  # never acked on their own
            del self._sent_at[superseded]
        if sent is not None:
            self.ack_latency.observe(max(self._clock.monotonic() - sent, 0.0))
        if not ok or after is None:
            return
        old = before or {}
        changes = sum(1 for p in old.keys() | after.keys() if old.get(p) != after.get(p))
        if changes:
            for address, state in self._peers.items():
                if state == "up":
                    self._peer_updates[address] = self._peer_updates.get(address, 0) + changes

    def _acked_routes(self) -> dict[str, str]:
        conn = self._conns[-1] if self._conns else None
        acked: Mapping[Prefix, Route] = conn.acked if conn is not None and conn.acked else {}
        routes: dict[str, str] = {}
        for prefix in sorted_prefixes(self._known):
            want = self._routes.get(prefix)
            if prefix in self._wanted and want is None:  # family mismatch
                routes[str(prefix)] = "pending"
            elif acked.get(prefix) != want:
                routes[str(prefix)] = "pending"
            else:
                routes[str(prefix)] = "announced" if want is not None else "withdrawn"
        return routes

    def begin_stop(self) -> None:
        """The node is stopping: ExaBGP is not restarted from now on."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.begin_stop()

    async def stop_exabgp(self) -> None:
        """Stop ExaBGP now, for good (call once the routes are withdrawn:
        its sessions close). Returns once it has exited."""
        self.begin_stop()
        if self._supervisor is not None:
            await self._supervisor.stop()

    # ---------------------------------------------------------------- run

    def _message(self) -> bytes:
        sendable = {p for p in self._known if p.version in self._families}
        return wire.encode_routes(self._seq, self._routes, sendable)

    def _send(self, conn: _Conn, data: bytes) -> None:
        transport = conn.writer.transport
        if transport.get_write_buffer_size() > MAX_BUFFERED:
            log.warning("announcer.not_reading", buffered=transport.get_write_buffer_size())
            conn.writer.close()
            return
        if not conn.writer.is_closing():
            self._sent_at.setdefault(self._seq, self._clock.monotonic())
            for old in [s for s in self._sent_at if s < self._seq - _HISTORY]:
                del self._sent_at[old]
            conn.writer.write(data)

    async def _heartbeat(self) -> None:
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()
            pid = self._supervisor.pid if self._supervisor is not None else None
            if pid != self._last_pid:  # a new ExaBGP knows no session yet
                self._last_pid = pid
                self._peers = {a: "down" for a in self._peers}
                self._peer_up_since.clear()
                # ... and has confirmed nothing: the old one's answers say
                # nothing about it.
                self._confirmed_at = None
                self._waiting_since = self._clock.monotonic()
            self._log_freshness()
            data = self._message()
            for conn in list(self._conns):
                self._send(conn, data)

    def _log_freshness(self) -> None:
        fresh = self.freshness()
        if fresh.confirmed == self._was_confirmed:
            return
        self._was_confirmed = fresh.confirmed
        if fresh.confirmed:
            log.event("bgp.confirmed")
        else:
            log.warning("bgp.unconfirmed", age_s=round(fresh.age, 3),
                        deadline_s=CONFIRM_DEADLINE, exabgp_pid=self._last_pid)

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        coro = self._serve(reader, writer)
        try:
            if self._tg is None:
                raise RuntimeError("not running")
            task = self._tg.create_task(coro)
            # A callback, not only _serve's finally: a task cancelled before
            # its first step never runs its body (the node stopping just
            # as the announcer connects) and would leave the socket open.
            task.add_done_callback(lambda _: writer.close())
        except RuntimeError:  # shutting down
            coro.close()
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        self._conns.append(conn)
        log.event("announcer.connected", connections=len(self._conns))
        self._send(conn, self._message())
        reason = "closed"
        try:
            while line := await reader.readline():
                message = wire.decode_announcer_message(line)
                if isinstance(message, wire.AliveMessage):
                    self._confirm()
                elif isinstance(message, wire.PeerMessage):
                    if self._peers.get(message.address) != message.state:
                        log.event("bgp.peer", log.INFO if message.state == "up" else log.WARNING,
                                  address=message.address, state=message.state)
                    self._set_peer(message.address, message.state)
                else:
                    before = conn.acked
                    conn.acked = self._history.get(message.seq, conn.acked)
                    self._on_ack(message.seq, before, conn.acked, message.ok)
                    if message.ok:
                        self._confirm()
                    else:
                        self._exabgp_errors += 1
                        log.warning("announcer.exabgp_error", seq=message.seq)
                    if self.synced():
                        self._synced.set()
        except (AnnouncerError, OSError, ValueError) as exc:
            reason = str(exc)
        finally:
            self._conns.remove(conn)
            writer.close()
            log.warning("announcer.disconnected", reason=reason)

    async def run(self, started: asyncio.Event) -> None:
        """Serve the announcer and supervise ExaBGP until cancelled.

        ``started`` is set once the socket listens and ExaBGP was started.
        Raises AnnouncerError if ExaBGP is missing, too old, or the socket
        cannot be created (path over ~107 bytes, permissions).
        """
        self._run_dir.mkdir(parents=True, exist_ok=True)
        exe = resolve_exabgp(self._bgp.exabgp)
        version = await asyncio.to_thread(detect_version, exe)
        argv = announcer_argv(self.socket_path, self._bgp.node_timeout, self._bgp.refresh_interval)
        self.config_path.write_text(
            render_config(self._bgp, self._node_name, argv), encoding="utf-8"
        )
        self.socket_path.unlink(missing_ok=True)
        try:
            server = await asyncio.start_unix_server(
                self._on_connect, path=str(self.socket_path), limit=16 * 1024 * 1024
            )
        except OSError as exc:
            raise AnnouncerError(f"cannot listen on {self.socket_path}: {exc}") from exc
        self._supervisor = ExaBGPSupervisor(
            exabgp_argv(exe, version, self.config_path),
            exabgp_env(self._run_dir),
            self._clock,
            cwd=self._run_dir,
            log_file=self._log_file,
        )
        if self._stopping:
            self._supervisor.begin_stop()
        log.event("bgp.speaker_start", exabgp=exe, version=f"{version[0]}.{version[1]}",
                  config=str(self.config_path), socket=str(self.socket_path))
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                exabgp_started = asyncio.Event()
                tg.create_task(self._supervisor.run(exabgp_started))
                tg.create_task(self._heartbeat())
                await exabgp_started.wait()
                self._last_pid = self._supervisor.pid  # the first ExaBGP is no restart
                started.set()
        finally:
            self._tg = None
            await close_server(server)
            for conn in list(self._conns):
                conn.writer.close()
            self.socket_path.unlink(missing_ok=True)
