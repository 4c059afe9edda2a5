"""The connection machine's shared results, which the relay engine matches
by identity (``DO_*``), and the order promise that lets it carry out any
result without checking for a nested event: ``ConnectTo`` and ``StartPump``
come last."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from anycast_lb.forward.connection import (
    ABORT,
    CONNECTED,
    DO_CONNECT,
    DO_FINISH,
    DO_NOTHING,
    DO_SHUT_BACKEND,
    DO_SHUT_CLIENT,
    DO_START,
    DO_STOP_REPLAY,
    DO_STOP_REPLAY_SHUT_CLIENT,
    Accepted,
    ClientData,
    Connection,
    ConnectTo,
    Event,
    Rules,
    StartPump,
)
from tests.unit.test_connection import _choices


def test_a_short_connection_takes_the_shared_results() -> None:
    """accept, connect, the request, the answer's first byte, the answer's
    end, the client's end: every result a shared tuple."""
    conn: Connection[str] = Connection(Rules(2.0))
    assert conn.on_accepted(["b1", "b2"]) is DO_CONNECT
    assert conn.on_connected() is DO_START
    assert conn.on_client_data(b"GET / HTTP/1.0\r\n") is DO_NOTHING
    assert conn.on_backend_first_byte() is DO_STOP_REPLAY
    assert conn.on_backend_eof() is DO_SHUT_CLIENT
    assert conn.on_client_eof() is DO_FINISH
    assert conn.closed


def test_the_other_orders_take_the_shared_results_too() -> None:
    conn: Connection[str] = Connection(Rules(2.0))
    conn.on_accepted(["b1"])
    conn.on_connected()
    assert conn.on_client_eof() is DO_SHUT_BACKEND
    assert conn.on_backend_eof() == (DO_STOP_REPLAY[0], *DO_FINISH)  # no byte came back
    assert conn.closed
    other: Connection[str] = Connection(Rules(2.0))
    other.on_accepted(["b1"])
    other.on_connected()
    assert other.on_backend_eof() is DO_STOP_REPLAY_SHUT_CLIENT


def test_on_methods_are_handle() -> None:
    """Each ``on_`` method gives what ``handle`` gives for its event (the
    table tests drive ``handle``)."""
    a: Connection[str] = Connection(Rules(2.0))
    b: Connection[str] = Connection(Rules(2.0))
    assert a.handle(Accepted(["b1"])) == b.on_accepted(["b1"])
    assert a.handle(CONNECTED) == b.on_connected()
    assert a.handle(ClientData(b"x")) == b.on_client_data(b"x")
    assert a.handle(ABORT) == b.on_abort()
    assert a.phase is b.phase and a.closed


@settings(max_examples=300, deadline=None)
@given(candidates=st.integers(min_value=0, max_value=3), data=st.data(), proxy=st.booleans())
def test_connect_and_start_pump_come_last(candidates: int, data: st.DataObject,
                                          proxy: bool) -> None:
    conn: Connection[str] = Connection(Rules(2.0, proxy_protocol=proxy, replay_limit=10,
                                             idle_sweeps=2))
    event: Event[str] = Accepted([f"b{i}" for i in range(candidates)])
    answered = False
    for _ in range(40):
        actions = conn.handle(event)
        for action in actions[:-1]:
            assert not isinstance(action, (ConnectTo, StartPump)), actions
        answered = answered or type(event).__name__ == "BackendFirstByte"
        if conn.closed:
            break
        event = data.draw(st.sampled_from(_choices(conn, answered)))
