"""Relay worker processes: more than one core for the relay engine.

One Python process moves bytes on one core at most (the GIL). With
``forwarding.workers: N`` (N > 1, relay engine) the node runs N - 1 worker
processes beside its own relay thread. Every process binds each TCP
service's listener with SO_REUSEPORT to the same address, and the kernel
spreads new connections over the N listeners (a hash of the 4-tuple). A
connection stays in the process that accepted it. UDP services stay in the
node process only.

::

    node process: health checks, BGP, API, its own RelayLoop      workers 1..N-1
        WorkerGroup --stdin: state, backend changes, commands--> RelayLoop + RelayForwarders
                    <--stdout: listening, counters every 1 s---- (data path only)

A worker runs no health check, no BGP and no API: the node decides backend
health and tells every worker each change, so all processes choose among
the same up backends (with Maglev, the same backend: the table is a
function of the up set). ``least_conn`` counts each process's own
connections only.

Wire protocol: one JSON object per line, with an ``op`` field.

Node to worker (stdin)::

    {"op": "spec", "index": 1, "log_level": "info", "forwarding": {...},
     "services": [...], "binds": {"web": ["127.0.0.1", 8080]}}     first line
    {"op": "state", "backends": {"web": {"127.0.0.1:9001": true}}}  second line
    {"op": "backend", "service": "web", "backend": "127.0.0.1:9001", "up": false}
    {"op": "stop_accepting"}           close the listeners
    {"op": "drain", "timeout": 30.0}   stop accepting, wait up to timeout s
                                       for the connections to end, exit
    {"op": "stop"}                     reset every connection, exit

Worker to node (stdout; its logs go to stderr, inherited from the node)::

    {"op": "listening", "pid": 4242}   every listener is bound
    {"op": "error", "error": "..."}    could not bind; exits 1
    {"op": "counters", "services": {"web": {"accepted": 10, "rejected": 0,
     "active": 2, "up_backends": 2, "refused": {"cap": 0, ...},
     "accept_pauses": 0, "backends": {"127.0.0.1:9001":
     [active, connections_total, connect_failures, bytes_in, bytes_out]}}}}
                                       every COUNTERS_INTERVAL_S, after each
                                       backend change and before exiting
    {"op": "exit", "idle": true}       last line; idle: no connection was
                                       left to reset

Lifetime: a worker exits when its stdin closes (the node is gone, or closed
it), on ``stop`` or after ``drain``. PR_SET_PDEATHSIG (prctl(2)) sends it
SIGKILL when the node dies, even by SIGKILL. It ignores SIGINT and SIGTERM
(a terminal's Ctrl-C or ``systemctl stop`` signal the whole group): the node
drains it. A worker that exits on its own is started again after 0.5 s,
doubling to 30 s, back to 0.5 s once a run lasted 60 s.

Counters: a worker's counters reach the node every COUNTERS_INTERVAL_S; the
node adds them to its own at read time (``WorkerGroup.counters``), and keeps
the totals of workers that exited. A worker killed by a signal loses up to
one interval of counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, model_validator

from anycast_lb import log
from anycast_lb.clock import Clock, SystemClock, wait_event, wait_for
from anycast_lb.config import ForwardingConfig, NodeConfig, ServiceConfig, Transport
from anycast_lb.errors import BindError, WorkerProtocolError
from anycast_lb.flows import FlowKey
from anycast_lb.forward.reactor import tune_gc
from anycast_lb.forward.relay import RelayForwarder, RelayLoop
from anycast_lb.pool import Backend, Pool

COUNTERS_INTERVAL_S = 1.0
"""Seconds between two counter reports of a worker."""
START_TIMEOUT_S = 30.0
"""Seconds a worker may take to import, bind and report ``listening``."""
EXIT_GRACE_S = 2.0
"""Seconds a worker may take to exit after ``stop`` (or after its drain
timeout) before it is killed."""
RESPAWN_MIN_S = 0.5
RESPAWN_MAX_S = 30.0
STABLE_AFTER_S = 60.0
LINE_LIMIT = 16 * 1024 * 1024
"""Longest protocol line, bytes (a spec with many services and backends)."""
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


# -- the wire format (no I/O) -------------------------------------------------


class BackendCounters(NamedTuple):
    """One backend's data-path counters, as ``pool.Backend`` keeps them."""

    active_connections: int = 0
    connections_total: int = 0
    connect_failures: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    @classmethod
    def of(cls, backend: Backend) -> BackendCounters:
        return cls(backend.active_connections, backend.connections_total,
                   backend.connect_failures, backend.bytes_in, backend.bytes_out)

    def plus(self, other: BackendCounters) -> BackendCounters:
        return BackendCounters(*(a + b for a, b in zip(self, other, strict=True)))


class ServiceCounters(BaseModel):
    """One service's counters in one worker (a ``counters`` line)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accepted: int = 0
    rejected: int = 0
    active: int = 0
    up_backends: int = 0
    refused: dict[str, int] = {}
    """Connections refused by reason (``limits.REFUSAL_REASONS``)."""
    accept_pauses: int = 0
    backends: dict[str, BackendCounters] = {}


class WorkerSpec(BaseModel):
    """The first line a worker reads: its part of the node config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str = "spec"
    index: int
    log_level: str = "info"
    forwarding: ForwardingConfig
    services: list[ServiceConfig]
    binds: dict[str, tuple[str, int]]
    """Service name -> (address, port) to bind, read back from the node's
    own listener (so a port 0 in tests is the same port everywhere)."""
    max_tcp_connections: int | None = None
    """The process's connection cap (the node's, from its descriptor budget)."""
    max_tcp_connections_per_source: int | None = None
    """Of those, what one source may hold (the node's figure)."""
    max_pipes: int | None = None
    """Splice pipes the worker's relay loop may hold."""


def encode(message: Mapping[str, Any]) -> bytes:
    """One protocol line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class Command(BaseModel):
    """A node -> worker line after the spec, checked field by field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["state", "backend", "stop_accepting", "drain", "stop"]
    backends: dict[str, dict[str, StrictBool]] | None = None
    """``state``: service -> backend key -> up."""
    service: StrictStr | None = None
    backend: StrictStr | None = None
    up: StrictBool | None = None
    """``backend``: one backend of one service goes up or down."""
    timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    """``drain``: seconds to wait for connections to end."""

    @model_validator(mode="after")
    def _fields_of_op(self) -> Command:
        needed = {"state": ("backends",), "backend": ("service", "backend", "up"),
                  "drain": ("timeout",)}.get(self.op, ())
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{self.op} needs {', '.join(missing)}")
        return self


class Report(BaseModel):
    """A worker -> node line, checked field by field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["listening", "error", "counters", "exit"]
    pid: int | None = None
    error: StrictStr | None = None
    services: dict[str, ServiceCounters] | None = None
    idle: StrictBool = False

    @model_validator(mode="after")
    def _fields_of_op(self) -> Report:
        if self.op == "counters" and self.services is None:
            raise ValueError("counters line without services")
        return self


_M = TypeVar("_M", bound=BaseModel)


def _parse(model: type[_M], line: bytes) -> _M:
    try:
        return model.model_validate_json(line)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"msg": str(exc), "loc": ()}
        where = ".".join(str(part) for part in first["loc"]) or "line"
        raise WorkerProtocolError(f"bad {model.__name__.lower()} line: {where}: "
                                  f"{first['msg']}: {line[:80]!r}") from None


def parse_command(line: bytes) -> Command:
    """One node -> worker line. Raises WorkerProtocolError."""
    return _parse(Command, line)


def parse_report(line: bytes) -> Report:
    """One worker -> node line. Raises WorkerProtocolError."""
    return _parse(Report, line)


def parse_spec(line: bytes) -> WorkerSpec:
    """The first node -> worker line. Raises WorkerProtocolError."""
    return _parse(WorkerSpec, line)


def state_message(pools: Mapping[str, Pool]) -> dict[str, Any]:
    """The full up/down state of ``pools`` (the ``state`` line)."""
    return {"op": "state",
            "backends": {name: {b.key: b.up for b in pool.backends} for name, pool in pools.items()}}


def counters_message(forwarders: Mapping[str, RelayForwarder]) -> dict[str, Any]:
    """A ``counters`` line from this process's forwarders and their pools."""
    return {"op": "counters", "services": {
        name: ServiceCounters(
            accepted=f.accepted, rejected=f.rejected, active=f.active, up_backends=f.pool.up_count,
            refused=f.refused(), accept_pauses=f.refusals.accept_pauses,
            backends={b.key: BackendCounters.of(b) for b in f.pool.backends},
        ).model_dump(mode="json")
        for name, f in forwarders.items()
    }}


def add_counters(total: ServiceCounters, more: ServiceCounters) -> ServiceCounters:
    """Cumulative counters of both (for a worker that exited: active and
    up_backends are not carried over)."""
    keys = total.backends.keys() | more.backends.keys()
    zero = BackendCounters()
    return ServiceCounters(
        accepted=total.accepted + more.accepted,
        rejected=total.rejected + more.rejected,
        refused=add_refused(total.refused, more.refused),
        accept_pauses=total.accept_pauses + more.accept_pauses,
        backends={k: total.backends.get(k, zero).plus(more.backends.get(k, zero))._replace(
            active_connections=0) for k in keys},
    )


def add_refused(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    """Refusal counts of both, reason by reason."""
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


# -- the worker process ---------------------------------------------------------


def _send(message: Mapping[str, Any]) -> None:
    """Write one line to the node (blocking: lines are small and the node
    reads all the time). Raises BrokenPipeError once the node is gone."""
    data = encode(message)
    while data:
        data = data[os.write(1, data):]


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies (Linux prctl(2))."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: stdin's EOF still ends the worker
    # The node may have died before prctl: then no signal will come.
    if os.getppid() != parent:
        os._exit(0)


class _Worker:
    """The running side of one worker process.

    ``clock`` times the counter reports (one every COUNTERS_INTERVAL_S s);
    ``send`` writes one line to the node (``_send``: stdout; raises
    BrokenPipeError once the node is gone).
    """

    def __init__(self, spec: WorkerSpec, reader: asyncio.StreamReader,
                 clock: Clock | None = None,
                 send: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        self.spec = spec
        self.reader = reader
        self.clock: Clock = clock or SystemClock()
        self.send = send or _send
        self.relay = RelayLoop(spec.forwarding, max_connections=spec.max_tcp_connections,
                               max_connections_per_source=spec.max_tcp_connections_per_source,
                               max_pipes=spec.max_pipes)
        self.pools = {s.name: Pool(s) for s in spec.services}
        self.forwarders: dict[str, RelayForwarder] = {}
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.draining: asyncio.Task[None] | None = None

    async def run(self) -> int:
        """Bind, serve until told to end; the exit status."""
        self.relay.start()
        try:
            for s in self.spec.services:
                host, port = self.spec.binds[s.name]
                forwarder = RelayForwarder(s, self.pools[s.name], self.relay, host, port,
                                           reuse_port=True)
                try:
                    await forwarder.start()
                except BindError as exc:
                    self.send({"op": "error", "error": str(exc)})
                    return 1
                self.forwarders[s.name] = forwarder
            self.send({"op": "listening", "pid": os.getpid()})
            log.event("forward.worker_started", worker=self.spec.index, pid=os.getpid(),
                      services=len(self.forwarders))
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._commands()), tg.create_task(self._report())]
                idle = await self.done
                for task in tasks:
                    task.cancel()
                if self.draining is not None:
                    self.draining.cancel()
            active = sum(f.active for f in self.forwarders.values())
            self.send(counters_message(self.forwarders))
            self.send({"op": "exit", "idle": idle and active == 0})
            return 0
        except BrokenPipeError:
            return 0  # the node is gone
        finally:
            self.relay.stop()

    def _finish(self, idle: bool) -> None:
        if not self.done.done():
            self.done.set_result(idle)

    async def _commands(self) -> None:
        try:
            while line := await self.reader.readline():
                try:
                    self._command(parse_command(line))
                except WorkerProtocolError as exc:
                    log.error("forward.worker_bad_command", worker=self.spec.index, error=str(exc))
                except KeyError as exc:  # a service or backend this worker does not have
                    log.error("forward.worker_bad_command", worker=self.spec.index,
                              error=f"unknown {exc}")
        except BrokenPipeError:
            pass  # stdout closed: the node is gone
        self._finish(False)  # stdin closed: the node is gone

    def _command(self, command: Command) -> None:
        """Carry out one command. Raises KeyError for an unknown service or backend."""
        op = command.op
        if op == "backend":
            assert command.service is not None and command.backend is not None
            self.pools[command.service].set_up(command.backend, bool(command.up))
            self.send(counters_message(self.forwarders))
        elif op == "state":
            apply_state(self.pools, command)
            self.send(counters_message(self.forwarders))
        elif op == "stop_accepting":
            for forwarder in self.forwarders.values():
                forwarder.stop_accepting()
            self.send(counters_message(self.forwarders))
        elif op == "drain":
            if self.draining is None:
                self.draining = asyncio.create_task(self._drain(command.timeout or 0.0))
        else:  # stop
            self._finish(False)

    async def _drain(self, timeout: float) -> None:
        for forwarder in self.forwarders.values():
            forwarder.stop_accepting()
        results = await asyncio.gather(*(f.wait_idle(timeout) for f in self.forwarders.values()))
        self._finish(all(results))

    async def _report(self) -> None:
        """A ``counters`` line every COUNTERS_INTERVAL_S s of ``clock``."""
        try:
            while True:
                await self.clock.sleep(COUNTERS_INTERVAL_S)
                self.send(counters_message(self.forwarders))
        except BrokenPipeError:
            self._finish(False)  # the node is gone


def apply_state(pools: Mapping[str, Pool], command: Command) -> None:
    """Set each backend up or down as a ``state`` line says. Raises KeyError
    for a service or backend not in ``pools``."""
    for service, backends in (command.backends or {}).items():
        pool = pools[service]
        for key, up in backends.items():
            pool.set_up(key, up)


async def _worker_main() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec_line = await reader.readline()
    state_line = await reader.readline()
    if not state_line:
        return 0  # the node went away before sending the state
    try:
        spec = parse_spec(spec_line)
        log.setup(spec.log_level)
        worker = _Worker(spec, reader)
        state = parse_command(state_line)
        if state.op != "state":
            raise WorkerProtocolError(f"second line is {state.op}, not state")
        apply_state(worker.pools, state)
    except (WorkerProtocolError, KeyError) as exc:
        log.error("forward.worker_bad_start", error=str(exc))
        return 2
    return await worker.run()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m anycast_lb.forward.workers --parent PID``: run one worker."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "--parent" or not args[1].isdigit():
        print("usage: python -m anycast_lb.forward.workers --parent PID "
              "(started by the node, see the module docstring)", file=sys.stderr)
        return 2
    _die_with_parent(int(args[1]))
    tune_gc()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return asyncio.run(_worker_main())


# -- the node side ------------------------------------------------------------------


class WorkerProcess:
    """The node's handle on one worker slot (the process in it may be
    replaced after a crash)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.services: dict[str, ServiceCounters] = {}
        """The last ``counters`` line of the current process."""
        self.listening = False
        self.idle: bool | None = None
        """The ``exit`` line's idle flag, None until it came."""
        self.restarts = 0
        self.started_at = 0.0
        self.ready: asyncio.Future[str | None] | None = None
        """Resolves to None on ``listening``, to the reason on failure."""
        self.exited = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and not self.exited.is_set()

    def accepted(self, service: str) -> int:
        counters = self.services.get(service)
        return counters.accepted if counters is not None else 0

    def active(self, service: str | None = None) -> int:
        if service is not None:
            counters = self.services.get(service)
            return counters.active if counters is not None else 0
        return sum(c.active for c in self.services.values())

    def send(self, message: Mapping[str, Any]) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None or not self.alive or proc.stdin.is_closing():
            return
        proc.stdin.write(encode(message))

    def _settle(self, reason: str | None) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(reason)


class WorkerGroup:
    """The node's worker processes as one ``Forwarder``: listening, active,
    start, stop_accepting, wait_idle, abort_all; plus ``close`` (reap them),
    ``backend_changed`` and the counters of ``/status`` and ``/metrics``.

    ``binds`` maps each TCP service to the address its node-side listener
    is bound to (with SO_REUSEPORT); workers bind the same.
    """

    def __init__(
        self,
        services: Sequence[ServiceConfig],
        forwarding: ForwardingConfig,
        pools: Mapping[str, Pool],
        binds: Mapping[str, tuple[str, int]],
        count: int,
        *,
        start_timeout: float = START_TIMEOUT_S,
        max_tcp_connections: int | None = None,
        max_tcp_connections_per_source: int | None = None,
        max_pipes: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._clock: Clock = clock or SystemClock()
        """Times the node side reads (exit grace, respawn back-off, stability);
        the workers' own loops run on real time in their processes."""
        self.services = [s for s in services if s.protocol is Transport.TCP]
        self.forwarding = forwarding
        self.pools = {s.name: pools[s.name] for s in self.services}
        self.binds = {s.name: binds[s.name] for s in self.services}
        self.workers = [WorkerProcess(i + 1) for i in range(count)]
        self.start_timeout = start_timeout
        self.max_tcp_connections = max_tcp_connections
        self.max_tcp_connections_per_source = max_tcp_connections_per_source
        self.max_pipes = max_pipes
        self._retired: dict[str, ServiceCounters] = {}
        """Cumulative counters of worker processes that exited."""
        self._tasks: list[asyncio.Task[None]] = []
        self._accepting = False
        self._stopping = False
        level = logging.getLogger("anycast_lb").getEffectiveLevel()
        self._log_level = logging.getLevelName(level).lower()

    # -- the Forwarder surface ----------------------------------------------

    @property
    def listening(self) -> bool:
        return self._accepting and any(w.alive and w.listening for w in self.workers)

    @property
    def active(self) -> int:
        """Connections open in the workers, as of their last report (<= 1 s old)."""
        return sum(w.active() for w in self.workers if w.alive)

    async def start(self) -> tuple[str, int]:
        """Start every worker and wait until each listens; returns the first
        service's address. Raises BindError (after stopping the others) if a
        worker cannot bind or start within ``start_timeout`` s;
        RuntimeError if already started."""
        if self._tasks:
            raise RuntimeError("workers already started")
        try:
            for worker in self.workers:
                await self._spawn(worker)
                self._tasks.append(asyncio.create_task(self._supervise(worker),
                                                       name=f"relay-worker-{worker.index}"))
            for worker in self.workers:
                assert worker.ready is not None
                try:
                    reason = await wait_for(self._clock, asyncio.shield(worker.ready),
                                            self.start_timeout)
                except TimeoutError:
                    reason = f"not listening after {self.start_timeout} s"
                if reason is not None:
                    raise BindError(f"relay worker {worker.index}: {reason}")
        except BaseException:
            await self.close()
            raise
        self._accepting = True
        return next(iter(self.binds.values()), ("", 0))

    def stop_accepting(self) -> None:
        self._accepting = False
        self._stopping = True
        for worker in self.workers:
            worker.send({"op": "stop_accepting"})

    async def wait_idle(self, timeout: float) -> bool:
        """Drain every worker: each stops accepting, waits up to ``timeout``
        s for its connections to end, then exits. True if all ended idle.
        The last step of a graceful stop: no worker runs afterwards."""
        self._accepting = False
        self._stopping = True
        live = [w for w in self.workers if w.alive]
        for worker in live:
            worker.send({"op": "drain", "timeout": timeout})
        deadline = self._clock.monotonic() + timeout + EXIT_GRACE_S
        for worker in live:
            left = max(0.0, deadline - self._clock.monotonic())
            if not await wait_event(self._clock, worker.exited, left):
                return False
        return all(w.idle for w in live)

    def abort_all(self) -> None:
        """Reset every worker's connections; the workers exit."""
        self._accepting = False
        self._stopping = True
        for worker in self.workers:
            worker.send({"op": "stop"})

    def abort_flows(self, keys: Iterable[FlowKey]) -> int:
        """Flow survival is refused with relay workers (config check), so
        workers publish no flow keys: 0."""
        return 0

    async def close(self) -> None:
        """Stop every worker (``stop``, SIGKILL after EXIT_GRACE_S) and reap it."""
        self.abort_all()
        deadline = self._clock.monotonic() + EXIT_GRACE_S
        for worker in self.workers:
            if worker.alive:
                await wait_event(self._clock, worker.exited,
                                 max(0.0, deadline - self._clock.monotonic()))
            proc = worker.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- node side inputs and outputs ----------------------------------------

    def backend_changed(self, service: str, key: str, up: bool) -> None:
        """Tell every worker of a health transition the node decided."""
        if service not in self.pools:
            return
        for worker in self.workers:
            worker.send({"op": "backend", "service": service, "backend": key, "up": up})

    def counters(self, service: str, backend: Backend) -> BackendCounters:
        """``backend``'s counters in the node process plus in every worker
        (live ones as of their last report, and those that exited)."""
        total = BackendCounters.of(backend)
        retired = self._retired.get(service)
        if retired is not None and backend.key in retired.backends:
            total = total.plus(retired.backends[backend.key])
        for worker in self.workers:
            counters = worker.services.get(service)
            if counters is not None and backend.key in counters.backends:
                total = total.plus(counters.backends[backend.key])
        return total

    def accepted(self, service: str) -> int:
        """``service``'s connections accepted in every worker (live ones as
        of their last report, and those that exited)."""
        retired = self._retired.get(service)
        return ((retired.accepted if retired is not None else 0)
                + sum(w.accepted(service) for w in self.workers))

    def refused(self, service: str) -> tuple[dict[str, int], int]:
        """``service``'s refusals by reason and accept pauses in every worker
        (live ones as of their last report, and those that exited)."""
        refused: dict[str, int] = {}
        pauses = 0
        retired = self._retired.get(service)
        for counters in [retired, *(w.services.get(service) for w in self.workers)]:
            if counters is not None:
                refused = add_refused(refused, counters.refused)
                pauses += counters.accept_pauses
        return refused, pauses

    def service_active(self, service: str) -> int:
        """Connections of ``service`` open in the workers (last reports)."""
        return sum(w.active(service) for w in self.workers if w.alive)

    def status(self) -> list[dict[str, Any]]:
        """One entry per worker process for ``/status``."""
        return [
            {
                "worker": w.index,
                "pid": w.pid,
                "alive": w.alive,
                "listening": w.alive and w.listening,
                "restarts": w.restarts,
                "accepted": sum(c.accepted for c in w.services.values()),
                "active_connections": w.active() if w.alive else 0,
            }
            for w in self.workers
        ]

    # -- processes -------------------------------------------------------------

    async def _spawn(self, worker: WorkerProcess) -> None:
        worker.services = {}
        worker.listening = False
        worker.idle = None
        worker.exited = asyncio.Event()
        worker.ready = asyncio.get_running_loop().create_future()
        worker.started_at = self._clock.monotonic()
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "anycast_lb.forward.workers", "--parent", str(os.getpid()),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=LINE_LIMIT,
            )
        except OSError as exc:
            worker.proc = None
            worker.exited.set()
            worker._settle(f"cannot start {sys.executable}: {exc.strerror or exc}")
            return
        spec = WorkerSpec(index=worker.index, log_level=self._log_level, forwarding=self.forwarding,
                          services=self.services, binds=self.binds,
                          max_tcp_connections=self.max_tcp_connections,
                          max_tcp_connections_per_source=self.max_tcp_connections_per_source,
                          max_pipes=self.max_pipes)
        assert worker.proc.stdin is not None
        worker.proc.stdin.write(spec.model_dump_json().encode() + b"\n")
        worker.proc.stdin.write(encode(state_message(self.pools)))

    async def _supervise(self, worker: WorkerProcess) -> None:
        """Read the worker's reports until it exits; start it again unless
        the group is stopping."""
        backoff = RESPAWN_MIN_S
        while True:
            if worker.proc is not None:
                await self._read(worker)
                code = await worker.proc.wait()
                self._retire(worker)
                if not self._stopping:
                    log.error("forward.worker_exit", worker=worker.index, pid=worker.proc.pid,
                              code=code)
            worker.exited.set()
            worker._settle(f"exited with status {worker.proc.returncode}"
                           if worker.proc is not None else "not started")
            if self._stopping or not self._accepting:
                return  # stopping, or still starting: start() reports the failure
            if self._clock.monotonic() - worker.started_at >= STABLE_AFTER_S:
                backoff = RESPAWN_MIN_S
            await self._clock.sleep(backoff)
            backoff = min(backoff * 2, RESPAWN_MAX_S)
            if self._stopping:
                return
            worker.restarts += 1
            log.event("forward.worker_restart", worker=worker.index, restarts=worker.restarts)
            await self._spawn(worker)

    async def _read(self, worker: WorkerProcess) -> None:
        proc = worker.proc
        assert proc is not None and proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError as exc:  # a line over LINE_LIMIT: the worker is broken
                log.error("forward.worker_bad_report", worker=worker.index, error=repr(exc))
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return
            if not line:
                return
            try:
                report = parse_report(line)
            except WorkerProtocolError as exc:
                log.error("forward.worker_bad_report", worker=worker.index, error=str(exc))
                continue
            if report.op == "counters":
                worker.services = report.services or {}
            elif report.op == "listening":
                worker.listening = True
                worker._settle(None)
            elif report.op == "error":
                worker._settle(str(report.error))
            else:  # exit
                worker.idle = report.idle

    def _retire(self, worker: WorkerProcess) -> None:
        """Keep an exited process's cumulative counters in the totals."""
        for name, counters in worker.services.items():
            self._retired[name] = add_counters(self._retired.get(name, ServiceCounters()), counters)
        worker.services = {}
        worker.listening = False


async def start_workers(
    config: NodeConfig,
    pools: Mapping[str, Pool],
    binds: Mapping[str, tuple[str, int]],
    relay: bool,
    *,
    max_tcp_connections: int | None = None,
    max_tcp_connections_per_source: int | None = None,
    max_pipes: int | None = None,
    clock: Clock | None = None,
) -> WorkerGroup | None:
    """The node's ``forwarding.workers - 1`` worker processes, started and
    listening; None when there are none to run (workers: 1, no TCP service,
    or no relay engine running: ``relay`` False, which is logged).
    Raises BindError as ``WorkerGroup.start``."""
    extra = config.forwarding.workers - 1
    tcp = [s for s in config.services if s.protocol is Transport.TCP]
    if extra < 1 or not tcp:
        return None
    if not relay:
        log.warning("forward.workers_unavailable", workers=config.forwarding.workers,
                    reason="the relay engine is not running", using=1)
        return None
    group = WorkerGroup(tcp, config.forwarding, pools, binds, extra,
                        max_tcp_connections=max_tcp_connections,
                        max_tcp_connections_per_source=max_tcp_connections_per_source,
                        max_pipes=max_pipes, clock=clock)
    await group.start()
    log.event("forward.workers", processes=extra + 1,
              pids=",".join(str(w.pid) for w in group.workers))
    return group


if __name__ == "__main__":
    sys.exit(main())
