"""The TCP connection machine: every rule of one proxied connection, no I/O.

Both TCP engines (``tcp.TcpForwarder`` on asyncio, ``relay.RelayForwarder``
on epoll) feed this machine the events their sockets report and carry out
the actions it returns; it owns no socket, reads no clock and logs nothing
(the model is h11's ``_state.py``: events in, actions out). Time enters only
as events: a connect attempt's deadline passing (``ConnectTimeout``) and one
idle sweep passing (``IdleSweep``).

States and transitions (``phase``); ``ConnectTo(b)`` is the shared
``CONNECT_TO`` with ``backend`` set to b, and the counters' (b) is the
backend the event was about (``backend`` before it: see ``Connection``)::

                 Accepted([])                      CountReject(NO_BACKEND)
        NEW ------------------------------------------------------------> CLOSED
         |                                                                  ^
         | Accepted([b1, b2, ...]) / ConnectTo(b1)                          |
         v                                                                  |
    CONNECTING --ConnectFailed | ConnectTimeout, none left------------------+
      |    ^  \\    / CountFailure(b), CountReject(CONNECT_FAILED)          |
      |    |   `--'  ConnectFailed | ConnectTimeout, more left:             |
      |    |         CountFailure(b), ConnectTo(next)                       |
      |    |                                                                |
      |    | BackendReset while replaying and a candidate is left           |
      |    | (redispatch): CountFailure(b), CountReleased(b),               |
      |    | Close(BACKEND, reset), StopPump, ConnectTo(next)               |
      |    |                                                                |
      | Connected / CountConnected(b), [SendProxyHeader], [Replay(kept)],   |
      |     [ShutdownWrite(BACKEND)], StartPump                             |
      v    |                                                                |
    RELAYING --both EOFs / ClientClosed / BackendClosed: close with FIN-----+
             --ClientReset / BackendError / BackendReset (no redispatch)----+
               / IdleSweep past the limit / Abort: close with reset          |
    CONNECTING --ClientReset / Abort: Close(CLIENT, reset),                  |
                 Close(BACKEND, reset) (abandons the attempt) --------------+

Beside the phase, three smaller machines (as h11 keeps keep-alive apart):

- replay: KEEPING -> OFF. Until the backend's first byte the machine keeps
  a copy of every client byte (``ClientData``), at most ``replay_limit``
  bytes; the first backend byte (``BackendFirstByte``), the backend's EOF or
  the copy passing the limit turn it off for good (``StopReplay``), after
  which a backend reset closes the client instead of being redispatched.
  The rule is HAProxy's ``retry-on conn-failure empty-response`` with
  ``option redispatch``, restricted to resets: a backend that closes
  cleanly is taken at its word.
- client -> backend direction: OPEN -> EOF (``ClientEof``:
  ``ShutdownWrite(BACKEND)``, or remembered until connected).
- backend -> client direction: OPEN -> EOF (``BackendEof``:
  ``ShutdownWrite(CLIENT)``). The second EOF closes both sides with FIN
  (``Close(side, reset=False)``; a close after the first direction's
  shutdown sends the other FIN, so no second shutdown is needed).

Closing: every path out of CONNECTING or RELAYING emits ``Close(CLIENT, ...)``
exactly once, and ends every backend attempt exactly once: by a
``ConnectFailed`` / ``ConnectTimeout`` event (the engine drops the failed
socket) or a ``Close(BACKEND, ...)`` action. A backend counted by
``CountConnected`` is released (``CountReleased``) exactly once. Events that
arrive after CLOSED are ignored (sockets report after the machine closed
them); events that cannot happen in a live phase raise
``ConnectionStateError`` (an engine bug).

Idle timeout: the engine runs one sweep per forwarder every
idle_timeout / ``idle_sweeps`` s and feeds ``IdleSweep(traffic)`` to each
connection, ``traffic`` telling whether a byte (or an EOF) moved either way
since the previous sweep, so the data path pays one attribute store per
read and never calls the machine per chunk. A relaying connection is reset
after ``idle_sweeps + 1`` quiet sweeps: idle_timeout to idle_timeout *
(idle_sweeps + 1) / idle_sweeps s without traffic. Connecting connections
are not swept: each attempt is bounded by ``connect_timeout``.

Entry points: ``handle(event)`` takes any event; ``on_accepted(candidates)``,
``on_connected()``, ``on_client_data(data)``... (one per event type) are
the same transitions without building and dispatching an event object, for
the engines' data path. The common results are shared tuples, ``DO_*``
(``DO_CONNECT``, ``DO_START``, ``DO_NOTHING``, ``DO_STOP_REPLAY``,
``DO_SHUT_CLIENT``, ``DO_SHUT_BACKEND``, ``DO_FINISH``...): the machine
returns those very objects, so an engine may match a result by identity
and carry it out without a loop over its actions. ``ConnectTo`` and
``StartPump`` (the actions after which an engine may feed a nested event,
a failed connect or write) are always last in a result.

Counters: the machine emits ``CountReject``, ``CountFailure``,
``CountConnected`` and ``CountReleased`` (shared instances: no action is
allocated per connection, so they carry no backend); the engine applies them to the
forwarder's ``rejected_*`` counters and the pool's ``Backend`` counters
(``connect_failures``, ``connections_total``, ``active_connections``).
``accepted`` is counted by the engine when it accepts.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

from anycast_lb.errors import ConnectionStateError

REPLAY_LIMIT = 64 * 1024
"""Bytes kept for a replay until the backend's first byte (see replay)."""
SWEEPS_PER_IDLE_TIMEOUT = 8
"""Idle sweeps per idle_timeout (see Idle timeout)."""
RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})
"""Errors of a connected backend socket that the engines feed as
``BackendReset`` (a redispatch before its first byte); any other error is
``BackendError``."""

B = TypeVar("B")
"""The backend type (``pool.Backend`` in the engines; anything in tests)."""


class Phase(str, Enum):
    """The connection's main state."""

    NEW = "new"
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSED = "closed"


class Side(str, Enum):
    CLIENT = "client"
    BACKEND = "backend"


class Reject(str, Enum):
    """Why a client connection ended without reaching a backend."""

    NO_BACKEND = "no_backend"
    """No backend up: the client is reset at once."""
    CONNECT_FAILED = "connect_failed"
    """Every candidate failed to connect (or reset before answering)."""


# -- events -----------------------------------------------------------------


@dataclass(slots=True)
class Accepted(Generic[B]):
    """The client connection is accepted; ``candidates`` in order of preference
    (``Pool.candidates``), possibly empty."""

    candidates: Sequence[B]


@dataclass(slots=True)
class Connected:
    """The current attempt's connect completed."""


@dataclass(slots=True)
class ConnectFailed:
    """The current attempt failed (refused, unreachable...); ``reason`` for logs."""

    reason: str


@dataclass(slots=True)
class ConnectTimeout:
    """The current attempt did not complete within ``connect_timeout`` s."""


@dataclass(slots=True)
class ClientData:
    """Client bytes read while the machine keeps a copy (``replaying``), or
    before the backend is connected. Not fed per chunk once replay is off."""

    data: bytes


@dataclass(slots=True)
class BackendFirstByte:
    """The backend sent its first byte (fed once)."""


@dataclass(slots=True)
class ClientEof:
    """The client half-closed, and every byte it sent before was written to
    the backend (or kept, while connecting)."""


@dataclass(slots=True)
class BackendEof:
    """The backend half-closed, and every byte it sent before was written to
    the client."""


@dataclass(slots=True)
class ClientReset:
    """The client socket failed (reset or any other error)."""


@dataclass(slots=True)
class BackendReset:
    """The connected backend reset the connection (ECONNRESET, EPIPE,
    ECONNABORTED, ETIMEDOUT): a redispatch if nothing came back yet."""


@dataclass(slots=True)
class BackendError:
    """The connected backend socket failed with an error other than a reset."""


@dataclass(slots=True)
class ClientClosed:
    """The client socket went away without an error, and not by ``Close``."""


@dataclass(slots=True)
class BackendClosed:
    """The backend socket went away without an error, and not by ``Close``."""


@dataclass(slots=True)
class IdleSweep:
    """One idle sweep passed; ``traffic``: a byte or EOF moved either way
    since the previous one."""

    traffic: bool


@dataclass(slots=True)
class Abort:
    """Reset the connection now (abort_all, a stale flow, shutdown)."""


Event = (
    Accepted[B] | Connected | ConnectFailed | ConnectTimeout | ClientData | BackendFirstByte
    | ClientEof | BackendEof | ClientReset | BackendReset | BackendError | ClientClosed
    | BackendClosed | IdleSweep | Abort
)

# -- actions ----------------------------------------------------------------


@dataclass(slots=True)
class ConnectTo:
    """Open a backend socket and connect it to the new ``Connection.backend``
    within ``Rules.connect_timeout`` s; report ``Connected``,
    ``ConnectFailed`` or ``ConnectTimeout``."""


@dataclass(slots=True)
class SendProxyHeader:
    """Write the PROXY v2 header to the backend, before any other byte."""


@dataclass(slots=True)
class Replay:
    """Write ``data`` (client bytes kept from before) to the backend, before
    anything read from the client from now on."""

    data: bytes


@dataclass(slots=True)
class StartPump:
    """Relay bytes both ways; read the client only if ``read_client`` (False
    once the client sent its EOF)."""

    read_client: bool


@dataclass(slots=True)
class StopPump:
    """Stop reading the client until the next ``StartPump`` (reconnecting)."""


@dataclass(slots=True)
class StopReplay:
    """No more ``ClientData``: the copy is dropped, client bytes may take the
    zero-copy path."""


@dataclass(slots=True)
class ShutdownWrite:
    """Half-close: send FIN to ``side`` once every byte handed to it is written."""

    side: Side


@dataclass(slots=True)
class Close:
    """Close ``side``: ``reset`` sends RST and drops buffered bytes (SO_LINGER
    0, ``abort()``); otherwise buffered bytes are flushed and FIN sent. For
    BACKEND while connecting: abandon the attempt."""

    side: Side
    reset: bool


@dataclass(slots=True)
class CountReject:
    reason: Reject


@dataclass(slots=True)
class CountFailure:
    """``backend.connect_failures += 1`` for the event's backend (a failed
    attempt, or a reset before the first byte)."""


@dataclass(slots=True)
class CountConnected:
    """``backend.connections_total += 1`` and ``backend.active_connections += 1``
    for the event's backend."""


@dataclass(slots=True)
class CountReleased:
    """``backend.active_connections -= 1`` for the event's backend."""


Action = (
    ConnectTo | SendProxyHeader | Replay | StartPump | StopPump | StopReplay | ShutdownWrite
    | Close | CountReject | CountFailure | CountConnected | CountReleased
)

# Shared instances of the events and actions without a varying field: the
# engines feed and test them without allocating.
CONNECTED = Connected()
CONNECT_TIMEOUT = ConnectTimeout()
BACKEND_FIRST_BYTE = BackendFirstByte()
CLIENT_EOF = ClientEof()
BACKEND_EOF = BackendEof()
CLIENT_RESET = ClientReset()
BACKEND_RESET = BackendReset()
BACKEND_ERROR = BackendError()
CLIENT_CLOSED = ClientClosed()
BACKEND_CLOSED = BackendClosed()
ABORT = Abort()
CONNECT_TO = ConnectTo()
COUNT_FAILURE = CountFailure()
COUNT_CONNECTED = CountConnected()
COUNT_RELEASED = CountReleased()
SEND_PROXY_HEADER = SendProxyHeader()
STOP_PUMP = StopPump()
STOP_REPLAY = StopReplay()
_PUMP_BOTH = StartPump(read_client=True)
_PUMP_BACKEND_ONLY = StartPump(read_client=False)
_SHUT_BACKEND = ShutdownWrite(Side.BACKEND)
_SHUT_CLIENT = ShutdownWrite(Side.CLIENT)
_CLOSE = {
    (side, reset): Close(side, reset) for side in Side for reset in (False, True)
}
_NO_BACKEND = CountReject(Reject.NO_BACKEND)
_CONNECT_FAILED = CountReject(Reject.CONNECT_FAILED)
# The results of the transitions, built once: no action and no tuple is
# allocated per connection. The common ones are public: the machine returns
# these very tuples, so an engine may match them by identity and carry them
# out without a loop over their actions.
DO_NOTHING: tuple[()] = ()
DO_CONNECT = (CONNECT_TO,)
"""``Accepted`` with a candidate: connect to ``backend``."""
DO_START = (COUNT_CONNECTED, _PUMP_BOTH)
"""``Connected`` with no header, no kept bytes and no client EOF to send."""
DO_STOP_REPLAY = (STOP_REPLAY,)
"""The backend's first byte, or the copy past the limit."""
DO_SHUT_BACKEND = (_SHUT_BACKEND,)
"""The client's EOF, the backend's still open."""
DO_SHUT_CLIENT = (_SHUT_CLIENT,)
"""The backend's EOF after its first byte, the client's still open."""
DO_STOP_REPLAY_SHUT_CLIENT = (STOP_REPLAY, _SHUT_CLIENT)
"""The backend's EOF before any byte of its own, the client's still open."""
_ABANDON = {  # closing while connecting
    reset: (_CLOSE[Side.CLIENT, reset], _CLOSE[Side.BACKEND, reset]) for reset in (False, True)
}
_RELEASE = {  # closing while relaying
    reset: (COUNT_RELEASED, *_ABANDON[reset]) for reset in (False, True)
}
DO_FINISH = _RELEASE[False]
"""The second EOF (or a clean close while relaying): release the backend,
close both sides with FIN."""
_STOP_REPLAY_FINISH = (STOP_REPLAY, *DO_FINISH)
_FAIL_THEN_CONNECT = (COUNT_FAILURE, CONNECT_TO)
_REJECT_NO_BACKEND = (_NO_BACKEND, _CLOSE[Side.CLIENT, True])
_REJECT_CONNECT_FAILED = (_CONNECT_FAILED, _CLOSE[Side.CLIENT, True])
_FAIL_THEN_REJECT = (COUNT_FAILURE, *_REJECT_CONNECT_FAILED)
_REDISPATCH = (COUNT_FAILURE, COUNT_RELEASED, _CLOSE[Side.BACKEND, True], STOP_PUMP, CONNECT_TO)
# Enum members as module constants: reading a member through its class
# costs about 70 ns on CPython 3.11, and the machine runs per connection.
_NEW, _CONNECTING, _RELAYING, _CLOSED = Phase.NEW, Phase.CONNECTING, Phase.RELAYING, Phase.CLOSED


@dataclass(frozen=True, slots=True)
class Rules:
    """One service's settings for its connections, built once per forwarder
    and shared by every ``Connection`` it runs (one reference each instead
    of four fields: 24 bytes less per connection).

    ``connect_timeout``: s per attempt (for ``ConnectTo``);
    ``proxy_protocol``: send a PROXY v2 header first on every attempt;
    ``replay_limit``: bytes kept for a redispatch; ``idle_sweeps``: quiet
    sweeps tolerated (the next resets the connection).
    """

    connect_timeout: float
    proxy_protocol: bool = False
    replay_limit: int = REPLAY_LIMIT
    idle_sweeps: int = SWEEPS_PER_IDLE_TIMEOUT

    @classmethod
    def of(cls, service: ServiceSettings) -> Rules:
        """The rules of ``service`` (a ``config.ServiceConfig``): what an
        engine builds at start and ``applier.retune`` on a live apply."""
        return cls(service.connect_timeout, service.proxy_protocol)


class ServiceSettings(Protocol):
    """The service settings ``Rules.of`` reads (``config.ServiceConfig`` has
    them; the machine does not import the config)."""

    @property
    def connect_timeout(self) -> float: ...
    @property
    def proxy_protocol(self) -> bool: ...


class Connection(Generic[B]):
    """One proxied TCP connection's rules (see the module docstring), with
    its service's settings in ``rules``.

    ``handle(event)`` returns the actions to carry out, in order. Raises
    ConnectionStateError for an event that cannot happen in the current
    phase; events after CLOSED return no action.

    Backends: the actions are shared instances and name no backend. The
    counters (``CountFailure``, ``CountConnected``, ``CountReleased``) are
    about the event's backend: ``backend`` as it was before ``handle``;
    ``ConnectTo`` is about the next attempt's: ``backend`` after it. An
    engine reads ``backend`` before feeding an event when it applies
    counters.
    """

    __slots__ = (
        "rules", "phase", "backend", "candidates", "tried", "replaying", "kept", "kept_len",
        "client_eof", "backend_eof", "quiet",
    )

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.phase = _NEW
        self.backend: B | None = None
        """The backend of the current attempt or connection."""
        self.candidates: Sequence[B] = ()
        """The candidates, in order (``Accepted``; not copied: the engine
        hands over the sequence)."""
        self.tried = 0
        """Candidates tried so far (for a failed attempt or a redispatch)."""
        self.replaying = True
        """True until the backend's first byte, its EOF or the copy passing
        ``replay_limit``: ``ClientData`` is wanted."""
        self.kept: list[bytes] | None = None
        """Client bytes to (re)send on the next connect: the replay copy, and
        bytes read while connecting (None for none: a connection holds no
        list once its replay ends, about 72 bytes of an idle connection)."""
        self.kept_len = 0
        self.client_eof = False
        self.backend_eof = False
        self.quiet = 0
        """Idle sweeps in a row without traffic."""

    @property
    def closed(self) -> bool:
        return self.phase is _CLOSED

    def handle(self, event: Event[B]) -> tuple[Action, ...]:
        """Apply ``event``; the actions to carry out, in order."""
        on = _ON.get(type(event))
        if on is None:
            raise ConnectionStateError(f"{type(event).__name__} is no connection event")
        return on(self, event)

    # -- one method per event ------------------------------------------------
    # ``on_x(...)`` is ``handle(X(...))`` without building or dispatching the
    # event: the engines call them on the data path (each runs about once per
    # short connection). The common transitions come first and return the
    # shared ``DO_*`` results.

    def on_accepted(self, candidates: Sequence[B]) -> tuple[Action, ...]:
        """``Accepted(candidates)``."""
        if self.phase is not _NEW:
            return self._refuse("Accepted")
        if not candidates:
            self.phase = _CLOSED
            return _REJECT_NO_BACKEND
        self.candidates = candidates
        self.backend = candidates[0]
        self.tried = 1
        self.phase = _CONNECTING
        return DO_CONNECT

    def on_connected(self) -> tuple[Action, ...]:
        """``Connected``."""
        if self.phase is not _CONNECTING:
            return self._refuse("Connected")
        self.phase = _RELAYING
        self.quiet = 0
        if not (self.rules.proxy_protocol or self.kept or self.client_eof):
            return DO_START  # the common case
        return self._connected()

    def on_connect_failed(self, reason: str = "") -> tuple[Action, ...]:
        """``ConnectFailed(reason)`` (``reason`` is for the engine's logs)."""
        return self._attempt_failed("ConnectFailed")

    def on_connect_timeout(self) -> tuple[Action, ...]:
        """``ConnectTimeout``."""
        return self._attempt_failed("ConnectTimeout")

    def on_client_data(self, data: bytes) -> tuple[Action, ...]:
        """``ClientData(data)``."""
        phase = self.phase
        if phase is _RELAYING:
            if not self.replaying:
                return DO_NOTHING  # fed before the engine saw StopReplay
            kept = self.kept
            if kept is None:
                self.kept = [data]
            else:
                kept.append(data)
            self.kept_len += len(data)
            if self.kept_len > self.rules.replay_limit:
                return self._stop_replay()
            return DO_NOTHING
        if phase is _CONNECTING:
            # Read while connecting: always delivered on connect, and a
            # replay copy only within the limit.
            kept = self.kept
            if kept is None:
                self.kept = [data]
            else:
                kept.append(data)
            self.kept_len += len(data)
            if self.kept_len > self.rules.replay_limit:
                self.replaying = False
            return DO_NOTHING
        return self._refuse("ClientData")

    def on_backend_first_byte(self) -> tuple[Action, ...]:
        """``BackendFirstByte``."""
        if self.phase is not _RELAYING:
            return self._refuse("BackendFirstByte")
        if self.replaying:
            self.replaying = False  # _stop_replay, inline
            self.kept = None
            self.kept_len = 0
            return DO_STOP_REPLAY
        return DO_NOTHING

    def on_client_eof(self) -> tuple[Action, ...]:
        """``ClientEof``."""
        phase = self.phase
        if phase is _RELAYING and not self.client_eof:
            self.client_eof = True
            if self.backend_eof:
                self.phase = _CLOSED
                return DO_FINISH
            return DO_SHUT_BACKEND
        if phase is _CONNECTING and not self.client_eof:
            self.client_eof = True
            return DO_NOTHING
        return self._refuse("ClientEof")

    def on_backend_eof(self) -> tuple[Action, ...]:
        """``BackendEof``."""
        if self.phase is not _RELAYING or self.backend_eof:
            return self._refuse("BackendEof")
        self.backend_eof = True
        if self.replaying:
            self.replaying = False
            self.kept = None
            self.kept_len = 0
            if self.client_eof:
                self.phase = _CLOSED
                return _STOP_REPLAY_FINISH
            return DO_STOP_REPLAY_SHUT_CLIENT
        if self.client_eof:
            self.phase = _CLOSED
            return DO_FINISH
        return DO_SHUT_CLIENT

    def on_client_reset(self) -> tuple[Action, ...]:
        """``ClientReset``."""
        return self._close_live("ClientReset", reset=True)

    def on_abort(self) -> tuple[Action, ...]:
        """``Abort``."""
        return self._close_live("Abort", reset=True)

    def on_client_closed(self) -> tuple[Action, ...]:
        """``ClientClosed``."""
        return self._close_live("ClientClosed", reset=False)

    def on_backend_reset(self) -> tuple[Action, ...]:
        """``BackendReset``: a redispatch if nothing came back yet."""
        if self.phase is not _RELAYING:
            return self._refuse("BackendReset")
        return self._redispatch()

    def on_backend_error(self) -> tuple[Action, ...]:
        """``BackendError``."""
        if self.phase is not _RELAYING:
            return self._refuse("BackendError")
        return self._close(reset=True)

    def on_backend_closed(self) -> tuple[Action, ...]:
        """``BackendClosed``."""
        if self.phase is not _RELAYING:
            return self._refuse("BackendClosed")
        return self._close(reset=False)

    def on_idle_sweep(self, traffic: bool) -> tuple[Action, ...]:
        """``IdleSweep(traffic)``."""
        phase = self.phase
        if phase is _RELAYING:
            self.quiet = 1 if traffic else self.quiet + 1
            if self.quiet > self.rules.idle_sweeps:
                return self._close(reset=True)
            return DO_NOTHING
        if phase is _CONNECTING:
            return DO_NOTHING  # bounded by connect_timeout per attempt
        return self._refuse("IdleSweep")

    # -- transitions ---------------------------------------------------------

    def _refuse(self, event: str) -> tuple[Action, ...]:
        """An event the phase does not take: ignored once closed, else an
        engine bug."""
        if self.phase is _CLOSED:
            return DO_NOTHING
        raise ConnectionStateError(f"{event} cannot happen in phase {self.phase.value}")

    def _attempt_failed(self, event: str) -> tuple[Action, ...]:
        """The current attempt failed: the next candidate, or reject."""
        if self.phase is not _CONNECTING:
            return self._refuse(event)
        tried = self.tried
        if tried >= len(self.candidates):
            self.phase = _CLOSED
            self.backend = None
            return _FAIL_THEN_REJECT
        self.backend = self.candidates[tried]
        self.tried = tried + 1
        return _FAIL_THEN_CONNECT

    def _close_live(self, event: str, reset: bool) -> tuple[Action, ...]:
        """A close that may come while connecting or relaying."""
        phase = self.phase
        if phase is _RELAYING or phase is _CONNECTING:
            return self._close(reset)
        return self._refuse(event)

    def _connected(self) -> tuple[Action, ...]:
        """Connected with a header, kept bytes or the client's EOF to send."""
        actions: list[Action] = [COUNT_CONNECTED]
        if self.rules.proxy_protocol:
            actions.append(SEND_PROXY_HEADER)
        if self.kept:
            data = b"".join(self.kept)
            actions.append(Replay(data))
            if self.replaying:
                self.kept = [data]
            else:
                self.kept = None
                self.kept_len = 0
                actions.append(STOP_REPLAY)
        if self.client_eof:
            actions.append(_SHUT_BACKEND)
        actions.append(_PUMP_BACKEND_ONLY if self.client_eof else _PUMP_BOTH)
        return tuple(actions)

    def _stop_replay(self) -> tuple[Action, ...]:
        self.replaying = False
        self.kept = None
        self.kept_len = 0
        return DO_STOP_REPLAY

    def _redispatch(self) -> tuple[Action, ...]:
        """The backend reset the connection: connect to the next candidate and
        replay the copy, if nothing came back yet; else reset the client."""
        tried = self.tried
        if not (self.replaying and tried < len(self.candidates)):
            return self._close(reset=True)
        self.backend = self.candidates[tried]
        self.tried = tried + 1
        self.phase = _CONNECTING
        return _REDISPATCH

    def _close(self, reset: bool) -> tuple[Action, ...]:
        """Close both sides (and abandon a connect attempt)."""
        was = self.phase
        self.phase = _CLOSED
        if self.kept:
            self.kept = None
            self.kept_len = 0
        if was is _RELAYING:
            return _RELEASE[reset]
        return _ABANDON[reset]


# ``handle``'s dispatch: each event type to its ``on_`` method.
_ON: dict[type, Callable[[Connection[Any], Any], tuple[Action, ...]]] = {
    Accepted: lambda c, e: c.on_accepted(e.candidates),
    Connected: lambda c, e: c.on_connected(),
    ConnectFailed: lambda c, e: c.on_connect_failed(e.reason),
    ConnectTimeout: lambda c, e: c.on_connect_timeout(),
    ClientData: lambda c, e: c.on_client_data(e.data),
    BackendFirstByte: lambda c, e: c.on_backend_first_byte(),
    ClientEof: lambda c, e: c.on_client_eof(),
    BackendEof: lambda c, e: c.on_backend_eof(),
    ClientReset: lambda c, e: c.on_client_reset(),
    BackendReset: lambda c, e: c.on_backend_reset(),
    BackendError: lambda c, e: c.on_backend_error(),
    ClientClosed: lambda c, e: c.on_client_closed(),
    BackendClosed: lambda c, e: c.on_backend_closed(),
    IdleSweep: lambda c, e: c.on_idle_sweep(e.traffic),
    Abort: lambda c, e: c.on_abort(),
}
