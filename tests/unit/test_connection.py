"""The TCP connection machine: every transition from a table, and random event
sequences against the machine's promises (no socket, no loop, no clock)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anycast_lb.errors import ConnectionStateError
from anycast_lb.forward.connection import (
    ABORT,
    BACKEND_CLOSED,
    BACKEND_EOF,
    BACKEND_ERROR,
    BACKEND_FIRST_BYTE,
    BACKEND_RESET,
    CLIENT_CLOSED,
    CLIENT_EOF,
    CLIENT_RESET,
    CONNECT_TIMEOUT,
    CONNECT_TO,
    CONNECTED,
    COUNT_CONNECTED,
    COUNT_FAILURE,
    COUNT_RELEASED,
    Accepted,
    Action,
    ClientData,
    Close,
    ConnectFailed,
    Connection,
    ConnectTo,
    CountConnected,
    CountFailure,
    CountReject,
    CountReleased,
    Event,
    IdleSweep,
    Phase,
    Reject,
    Replay,
    Rules,
    SendProxyHeader,
    ShutdownWrite,
    Side,
    StartPump,
    StopPump,
    StopReplay,
)

T = 2.5  # connect timeout (s)
LIMIT = 10  # replay limit (bytes)
SWEEPS = 2  # idle sweeps tolerated
C, BK = Side.CLIENT, Side.BACKEND
Step = Action | tuple[Action, str]
"""An action, or a counter or connect with the backend it is about."""
FIN_BOTH: tuple[Step, ...] = ((COUNT_RELEASED, "b1"), Close(C, False), Close(BK, False))
RST_BOTH: tuple[Step, ...] = ((COUNT_RELEASED, "b1"), Close(C, True), Close(BK, True))
ABANDON: tuple[Step, ...] = (Close(C, True), Close(BK, True))


def machine(proxy: bool = False) -> Connection[str]:
    return Connection(Rules(T, proxy_protocol=proxy, replay_limit=LIMIT, idle_sweeps=SWEEPS))


def step(conn: Connection[str], event: Event[str]) -> tuple[Step, ...]:
    """``conn.handle(event)``, each counter paired with the backend it is
    about (the machine's before the event) and each connect with the
    backend to connect (after it), as an engine applies them."""
    before = conn.backend
    actions = conn.handle(event)
    after = conn.backend
    steps: list[Step] = []
    for action in actions:
        if isinstance(action, ConnectTo):
            assert after is not None
            steps.append((action, after))
        elif isinstance(action, (CountConnected, CountReleased, CountFailure)):
            assert before is not None
            steps.append((action, before))
        else:
            steps.append(action)
    return tuple(steps)


def feed(conn: Connection[str], events: list[Event[str]]) -> list[Step]:
    steps: list[Step] = []
    for event in events:
        steps.extend(step(conn, event))
    return steps


def backend_of(s: Step, kind: type) -> str | None:
    """The backend of ``s`` if it is a ``kind`` action (paired), else None."""
    if isinstance(s, tuple) and isinstance(s[0], kind):
        return s[1]
    return None


ACCEPT: list[Event[str]] = [Accepted(["b1", "b2"])]
RELAY: list[Event[str]] = [*ACCEPT, CONNECTED]
ANSWERED: list[Event[str]] = [*RELAY, BACKEND_FIRST_BYTE]

# (id, events before, the event, its actions, phase after)
CASES: list[tuple[str, list[Event[str]], Event[str], tuple[Step, ...], Phase]] = [
    # NEW
    ("no backend", [], Accepted([]), (CountReject(Reject.NO_BACKEND), Close(C, True)),
     Phase.CLOSED),
    ("accepted", [], Accepted(["b1", "b2"]), ((CONNECT_TO, "b1"),), Phase.CONNECTING),
    # CONNECTING
    ("connected", ACCEPT, CONNECTED, ((COUNT_CONNECTED, "b1"), StartPump(True)), Phase.RELAYING),
    ("refused: next", ACCEPT, ConnectFailed("refused"),
     ((COUNT_FAILURE, "b1"), (CONNECT_TO, "b2")), Phase.CONNECTING),
    ("timeout: next", ACCEPT, CONNECT_TIMEOUT,
     ((COUNT_FAILURE, "b1"), (CONNECT_TO, "b2")), Phase.CONNECTING),
    ("last refused", [*ACCEPT, CONNECT_TIMEOUT], ConnectFailed("refused"),
     ((COUNT_FAILURE, "b2"), CountReject(Reject.CONNECT_FAILED), Close(C, True)), Phase.CLOSED),
    ("data while connecting is kept", ACCEPT, ClientData(b"abc"), (), Phase.CONNECTING),
    ("kept data is sent on connect", [*ACCEPT, ClientData(b"ab"), ClientData(b"c")], CONNECTED,
     ((COUNT_CONNECTED, "b1"), Replay(b"abc"), StartPump(True)), Phase.RELAYING),
    ("held past the limit: sent, not kept", [*ACCEPT, ClientData(b"x" * 11)], CONNECTED,
     ((COUNT_CONNECTED, "b1"), Replay(b"x" * 11), StopReplay(), StartPump(True)), Phase.RELAYING),
    ("eof while connecting is remembered", ACCEPT, CLIENT_EOF, (), Phase.CONNECTING),
    ("remembered eof on connect", [*ACCEPT, ClientData(b"q"), CLIENT_EOF], CONNECTED,
     ((COUNT_CONNECTED, "b1"), Replay(b"q"), ShutdownWrite(BK), StartPump(False)), Phase.RELAYING),
    ("proxy header first", ACCEPT, CONNECTED,
     ((COUNT_CONNECTED, "b1"), SendProxyHeader(), StartPump(True)), Phase.RELAYING),
    ("connecting is not swept", ACCEPT, IdleSweep(False), (), Phase.CONNECTING),
    ("client reset while connecting", ACCEPT, CLIENT_RESET, ABANDON, Phase.CLOSED),
    ("client closed while connecting", ACCEPT, CLIENT_CLOSED,
     (Close(C, False), Close(BK, False)), Phase.CLOSED),
    ("abort while connecting", ACCEPT, ABORT, ABANDON, Phase.CLOSED),
    # RELAYING: replay
    ("client data kept", RELAY, ClientData(b"0123456789"), (), Phase.RELAYING),
    ("copy past the limit", [*RELAY, ClientData(b"0123456789")], ClientData(b"!"),
     (StopReplay(),), Phase.RELAYING),
    ("first byte stops the copy", RELAY, BACKEND_FIRST_BYTE, (StopReplay(),), Phase.RELAYING),
    ("first byte again", ANSWERED, BACKEND_FIRST_BYTE, (), Phase.RELAYING),
    ("data after the copy stopped", ANSWERED, ClientData(b"late"), (), Phase.RELAYING),
    # RELAYING: redispatch
    ("reset before answering: redispatch", [*RELAY, ClientData(b"hi")], BACKEND_RESET,
     ((COUNT_FAILURE, "b1"), (COUNT_RELEASED, "b1"), Close(BK, True), StopPump(), (CONNECT_TO, "b2")),
     Phase.CONNECTING),
    ("redispatch replays the copy", [*RELAY, ClientData(b"hi"), BACKEND_RESET], CONNECTED,
     ((COUNT_CONNECTED, "b2"), Replay(b"hi"), StartPump(True)), Phase.RELAYING),
    ("redispatch: header again, then the copy",
     [*RELAY, ClientData(b"hi"), BACKEND_RESET], CONNECTED,
     ((COUNT_CONNECTED, "b2"), SendProxyHeader(), Replay(b"hi"), StartPump(True)), Phase.RELAYING),
    ("redispatch after client eof", [*RELAY, ClientData(b"hi"), CLIENT_EOF, BACKEND_RESET],
     CONNECTED,
     ((COUNT_CONNECTED, "b2"), Replay(b"hi"), ShutdownWrite(BK), StartPump(False)),
     Phase.RELAYING),
    ("redispatch fails over the rest", [*RELAY, BACKEND_RESET], ConnectFailed("refused"),
     ((COUNT_FAILURE, "b2"), CountReject(Reject.CONNECT_FAILED), Close(C, True)), Phase.CLOSED),
    ("reset after answering", ANSWERED, BACKEND_RESET, RST_BOTH, Phase.CLOSED),
    ("reset past the limit", [*RELAY, ClientData(b"x" * 11)], BACKEND_RESET, RST_BOTH,
     Phase.CLOSED),
    ("reset after backend eof", [*RELAY, BACKEND_EOF], BACKEND_RESET, RST_BOTH, Phase.CLOSED),
    ("reset, no candidate left", [Accepted(["b1"]), CONNECTED], BACKEND_RESET, RST_BOTH,
     Phase.CLOSED),
    ("backend error is no redispatch", RELAY, BACKEND_ERROR, RST_BOTH, Phase.CLOSED),
    # RELAYING: half-close
    ("client eof first", RELAY, CLIENT_EOF, (ShutdownWrite(BK),), Phase.RELAYING),
    ("backend eof first", RELAY, BACKEND_EOF, (StopReplay(), ShutdownWrite(C)), Phase.RELAYING),
    ("backend eof after answering", ANSWERED, BACKEND_EOF, (ShutdownWrite(C),), Phase.RELAYING),
    ("client eof second", [*ANSWERED, BACKEND_EOF], CLIENT_EOF, FIN_BOTH, Phase.CLOSED),
    ("backend eof second", [*RELAY, CLIENT_EOF], BACKEND_EOF, (StopReplay(), *FIN_BOTH),
     Phase.CLOSED),
    ("client closed", RELAY, CLIENT_CLOSED, FIN_BOTH, Phase.CLOSED),
    ("backend closed", RELAY, BACKEND_CLOSED, FIN_BOTH, Phase.CLOSED),
    ("client reset", RELAY, CLIENT_RESET, RST_BOTH, Phase.CLOSED),
    ("abort", RELAY, ABORT, RST_BOTH, Phase.CLOSED),
    # RELAYING: idle sweeps (SWEEPS = 2 tolerated)
    ("quiet sweep 2", [*RELAY, IdleSweep(False)], IdleSweep(False), (), Phase.RELAYING),
    ("quiet sweep 3", [*RELAY, IdleSweep(False), IdleSweep(False)], IdleSweep(False), RST_BOTH,
     Phase.CLOSED),
    ("traffic restarts the count", [*RELAY, IdleSweep(False), IdleSweep(True)],
     IdleSweep(False), (), Phase.RELAYING),
    ("traffic, then two quiet", [*RELAY, IdleSweep(True), IdleSweep(False)], IdleSweep(False),
     RST_BOTH, Phase.CLOSED),
    ("a reconnect restarts the count",
     [*RELAY, IdleSweep(False), IdleSweep(False), BACKEND_RESET, CONNECTED], IdleSweep(False),
     (), Phase.RELAYING),
    # CLOSED: late events are ignored
    ("late connect", [*ACCEPT, ABORT], CONNECTED, (), Phase.CLOSED),
    ("late reset", [*RELAY, ABORT], BACKEND_RESET, (), Phase.CLOSED),
    ("late eof", [*RELAY, CLIENT_RESET], CLIENT_EOF, (), Phase.CLOSED),
    ("late accept", [Accepted([])], Accepted(["b1"]), (), Phase.CLOSED),
]


@pytest.mark.parametrize(("before", "event", "actions", "phase"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_transition(before: list[Event[str]], event: Event[str],
                    actions: tuple[Step, ...], phase: Phase) -> None:
    proxy = SendProxyHeader() in actions
    conn = machine(proxy)
    feed(conn, before)
    assert step(conn, event) == actions
    assert conn.phase is phase


IMPOSSIBLE: list[tuple[str, list[Event[str]], Event[str]]] = [
    ("data before accept", [], ClientData(b"x")),
    ("connected before accept", [], CONNECTED),
    ("abort before accept", [], ABORT),
    ("accepted twice", ACCEPT, Accepted(["b1"])),
    ("backend eof while connecting", ACCEPT, BACKEND_EOF),
    ("backend reset while connecting", ACCEPT, BACKEND_RESET),
    ("first byte while connecting", ACCEPT, BACKEND_FIRST_BYTE),
    ("client eof twice while connecting", [*ACCEPT, CLIENT_EOF], CLIENT_EOF),
    ("connected twice", RELAY, CONNECTED),
    ("connect failed while relaying", RELAY, ConnectFailed("late")),
    ("client eof twice", [*RELAY, CLIENT_EOF], CLIENT_EOF),
    ("backend eof twice", [*RELAY, BACKEND_EOF], BACKEND_EOF),
]


@pytest.mark.parametrize(("before", "event"), [c[1:] for c in IMPOSSIBLE],
                         ids=[c[0] for c in IMPOSSIBLE])
def test_impossible_event_is_an_engine_bug(before: list[Event[str]], event: Event[str]) -> None:
    conn = machine()
    feed(conn, before)
    with pytest.raises(ConnectionStateError, match=type(event).__name__):
        conn.handle(event)


def test_every_phase_and_event_is_in_the_tables() -> None:
    """The tables name every (phase, event type) the machine accepts or refuses."""
    seen: set[tuple[Phase, str]] = set()
    for _, before, event, _, _ in CASES:
        conn = machine()
        feed(conn, before)
        seen.add((conn.phase, type(event).__name__))
    for _, before, event in IMPOSSIBLE:
        conn = machine()
        feed(conn, before)
        seen.add((conn.phase, type(event).__name__))
    live = {
        Phase.CONNECTING: {"Connected", "ConnectFailed", "ConnectTimeout", "ClientData",
                           "ClientEof", "IdleSweep", "ClientClosed", "ClientReset", "Abort"},
        Phase.RELAYING: {"ClientData", "BackendFirstByte", "ClientEof", "BackendEof",
                         "BackendReset", "BackendError", "ClientClosed", "BackendClosed",
                         "ClientReset", "IdleSweep", "Abort"},
    }
    for phase, names in live.items():
        assert {(phase, n) for n in names} <= seen


# -- properties ---------------------------------------------------------------


def _choices(conn: Connection[str], answered: bool) -> list[Event[str]]:
    """Events an engine can feed in the machine's current phase."""
    if conn.phase is Phase.CONNECTING:
        events: list[Event[str]] = [
            CONNECTED, ConnectFailed("refused"), CONNECT_TIMEOUT, ClientData(b"abcd"),
            IdleSweep(False), CLIENT_CLOSED, CLIENT_RESET, ABORT,
        ]
        if not conn.client_eof:
            events.append(CLIENT_EOF)
        return events
    assert conn.phase is Phase.RELAYING
    events = [BACKEND_RESET, BACKEND_ERROR, CLIENT_CLOSED, BACKEND_CLOSED, CLIENT_RESET,
              IdleSweep(False), IdleSweep(True), ABORT]
    if conn.replaying:
        events.append(ClientData(b"abcd"))
    if not answered:
        events.append(BACKEND_FIRST_BYTE)
    if not conn.client_eof:
        events.append(CLIENT_EOF)
    if not conn.backend_eof:
        events.append(BACKEND_EOF)
    return events


@settings(max_examples=400, deadline=None)
@given(candidates=st.integers(min_value=0, max_value=4), data=st.data(),
       proxy=st.booleans())
def test_random_event_sequences_keep_every_promise(candidates: int, data: st.DataObject,
                                                   proxy: bool) -> None:
    backends = [f"b{i}" for i in range(candidates)]
    conn = machine(proxy)
    trace: list[tuple[Event[str], tuple[Step, ...]]] = []
    event: Event[str] = Accepted(backends)
    answered = False
    sent = b""  # every client byte fed, in order
    for _ in range(60):
        trace.append((event, step(conn, event)))
        if isinstance(event, ClientData):
            sent += event.data
        answered = answered or event is BACKEND_FIRST_BYTE
        if conn.closed:
            break
        event = data.draw(st.sampled_from(_choices(conn, answered)))
    else:
        trace.append((ABORT, step(conn, ABORT)))
    assert conn.closed

    steps = [a for _, acts in trace for a in acts]
    every = [a[0] if isinstance(a, tuple) else a for a in steps]
    # Exactly one close of the client.
    assert sum(1 for a in every if isinstance(a, Close) and a.side is C) == 1
    # Every backend attempt ends exactly once: a failure event or a Close(BACKEND).
    attempts = sum(1 for a in every if isinstance(a, ConnectTo))
    ended = (sum(1 for e, _ in trace if isinstance(e, ConnectFailed) or e is CONNECT_TIMEOUT)
             + sum(1 for a in every if isinstance(a, Close) and a.side is BK))
    assert ended == attempts
    # Candidates are tried once each, in order.
    assert [b for a in steps if (b := backend_of(a, ConnectTo))] == backends[:attempts]
    # Counters: at most one reject, for the right reason; per backend connected
    # and released balance, and a release never precedes its connect.
    rejects = [a.reason for a in every if isinstance(a, CountReject)]
    assert len(rejects) <= 1
    assert (rejects == [Reject.NO_BACKEND]) == (candidates == 0)
    if rejects == [Reject.CONNECT_FAILED]:
        assert attempts == candidates
    live: Counter[str] = Counter()
    for a in steps:
        if (b := backend_of(a, CountConnected)) is not None:
            live[b] += 1
        elif (b := backend_of(a, CountReleased)) is not None:
            live[b] -= 1
            assert live[b] >= 0
    assert all(v == 0 for v in live.values())
    failures = sum(1 for a in every if isinstance(a, CountFailure))
    redispatches = sum(1 for a in every if isinstance(a, StopPump))
    connect_failures = sum(1 for e, _ in trace
                           if isinstance(e, ConnectFailed) or e is CONNECT_TIMEOUT)
    assert failures == connect_failures + redispatches
    # No reconnect once the backend answered or the copy stopped; a replay
    # is every client byte so far. A redispatch happens only while the copy
    # is within the limit (bytes read while it reconnects are delivered
    # whatever their size, as on a first connect).
    stopped = seen_first_byte = False
    fed = b""
    for event, acts in trace:
        if isinstance(event, ClientData):
            fed += event.data
        seen_first_byte = seen_first_byte or event is BACKEND_FIRST_BYTE
        for a in (s[0] if isinstance(s, tuple) else s for s in acts):
            if isinstance(a, StopReplay):
                stopped = True
            elif isinstance(a, StopPump):
                assert len(fed) <= LIMIT
            elif isinstance(a, ConnectTo):
                assert not stopped and not seen_first_byte
            elif isinstance(a, Replay):
                assert a.data == fed
    # The header precedes any client byte on every connect.
    for _, acts in trace:
        kinds = [type(a[0] if isinstance(a, tuple) else a) for a in acts]
        if CountConnected in kinds:
            assert (SendProxyHeader in kinds) == proxy
            if proxy and Replay in kinds:
                assert kinds.index(SendProxyHeader) < kinds.index(Replay)
            assert kinds[-1] is StartPump


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([ABORT, CLIENT_RESET, BACKEND_RESET, CLIENT_EOF, CONNECTED,
                                 IdleSweep(False), ClientData(b"z")]), max_size=10))
def test_events_after_close_do_nothing(events: list[Event[str]]) -> None:
    conn = machine()
    feed(conn, [*RELAY, ABORT])
    assert feed(conn, events) == []
    assert conn.closed


def test_no_reconnect_after_the_first_byte() -> None:
    conn = machine()
    feed(conn, [Accepted(["b1", "b2", "b3"]), CONNECTED, ClientData(b"x"), BACKEND_FIRST_BYTE])
    actions = conn.handle(BACKEND_RESET)
    assert not any(isinstance(a, ConnectTo) for a in actions)
    assert conn.closed


def test_a_replay_is_resent_to_every_redispatch() -> None:
    """Two backends reset in a row: the third gets the same bytes, then more."""
    conn = machine()
    actions = feed(conn, [Accepted(["b1", "b2", "b3"]), CONNECTED, ClientData(b"first"),
                          BACKEND_RESET, CONNECTED, ClientData(b"+"), BACKEND_RESET, CONNECTED])
    assert [a for a in actions if isinstance(a, Replay)] == [Replay(b"first"), Replay(b"first+")]
    assert [b for a in actions if (b := backend_of(a, CountFailure))] == ["b1", "b2"]


def test_bytes_read_while_redispatching_are_delivered_past_the_limit() -> None:
    """A redispatch replays a copy within the limit; what the client sends
    while the next backend connects is delivered whatever its size, and once
    the copy is past the limit a further reset closes instead."""
    conn = machine()
    actions = feed(conn, [Accepted(["b1", "b2", "b3"]), CONNECTED, BACKEND_RESET,
                          ClientData(b"abcd"), ClientData(b"abcd"), ClientData(b"abcd"),
                          CONNECTED])
    assert [a for a in actions if isinstance(a, Replay)] == [Replay(b"abcd" * 3)]
    actions = feed(conn, [BACKEND_RESET])
    assert not any(isinstance(a, tuple) and isinstance(a[0], ConnectTo) for a in actions)
    assert conn.closed


def test_a_short_connection_allocates_no_action() -> None:
    """Two short connections get the very same action tuples: the machine
    builds nothing per connection on its common path (the relay's CPU per
    connection, docs/performance.md)."""
    short: list[Event[str]] = [Accepted(["b1", "b2"]), CONNECTED, ClientData(b"GET"),
                               BACKEND_FIRST_BYTE, BACKEND_EOF, CLIENT_EOF]
    first, second = machine(), machine()
    for event in short:
        assert first.handle(event) is second.handle(event)
    assert first.closed and second.closed


@pytest.mark.parametrize("end", [BACKEND_FIRST_BYTE, BACKEND_EOF, ClientData(b"x" * (LIMIT + 1))])
def test_a_connection_past_its_replay_holds_no_copy(end: Event[str]) -> None:
    """Once the replay ends (the backend's first byte or EOF, or the copy
    past the limit) the machine keeps no list: an idle connection's memory
    (RSS per idle connection, docs/performance.md) holds no client bytes and
    no empty list."""
    conn = machine()
    assert conn.kept is None
    feed(conn, [*RELAY, ClientData(b"GET")])
    assert conn.kept == [b"GET"]
    feed(conn, [end])
    assert conn.kept is None and conn.kept_len == 0
