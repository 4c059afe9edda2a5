"""The node <-> announcer protocol and ExaBGP's stdin lines."""

from __future__ import annotations

import ipaddress
import json

import pytest

from anycast_lb.bgp.policy import Route
from anycast_lb.bgp.wire import (
    AckMessage,
    ExaAnswer,
    ExaShutdown,
    PeerMessage,
    WireError,
    classify_exabgp_line,
    decode_announcer_message,
    decode_node_message,
    encode_ack,
    encode_peer,
    encode_routes,
)
from anycast_lb.errors import AnnouncerError

V4 = ipaddress.ip_network("198.51.100.10/32")
V6 = ipaddress.ip_network("2001:db8::10/128")
ROUTES = {V4: Route(V4, 100, ("65100:1",), 0, 65100), V6: Route(V6, 5, (), 2, 65100)}


def test_routes_round_trip_and_exact_shape() -> None:
    other = ipaddress.ip_network("198.51.100.11/32")
    data = encode_routes(7, ROUTES, {V4, other})
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data) == {
        "type": "routes", "seq": 7,
        "routes": [
            {"prefix": "198.51.100.10/32", "med": 100, "communities": ["65100:1"],
             "as_path_prepend": 0, "local_as": 65100},
            {"prefix": "2001:db8::10/128", "med": 5, "communities": [],
             "as_path_prepend": 2, "local_as": 65100},
        ],
        "withdrawn": ["198.51.100.11/32"],
    }
    message = decode_node_message(data)
    assert (message.seq, message.routes, message.withdrawn) == (7, ROUTES, frozenset({other}))


@pytest.mark.parametrize("line", [
    b"not json", b"[]", b'{"type": "hello"}', b'{"type": "routes", "seq": "1", "routes": []}',
    b'{"type": "routes", "seq": 1, "routes": {}}',
    b'{"type": "routes", "seq": 1, "routes": [{"prefix": "198.51.100.10/24", "med": 1, '
    b'"as_path_prepend": 0, "local_as": 1}]}',  # host bits set
    b'{"type": "routes", "seq": 1, "routes": [{"prefix": "198.51.100.10/32", "med": true, '
    b'"as_path_prepend": 0, "local_as": 1}]}',
    b'{"type": "routes", "seq": 1, "routes": [{"prefix": "198.51.100.10/32", "med": 1, '
    b'"communities": ["1:1]\\nannounce route 0.0.0.0/0"], "as_path_prepend": 0, "local_as": 1}]}',
    b'{"type": "routes", "seq": 1, "routes": [{"prefix": "198.51.100.10/32", "med": 1, '
    b'"as_path_prepend": 0, "local_as": 1}, {"prefix": "198.51.100.10/32", "med": 2, '
    b'"as_path_prepend": 0, "local_as": 1}]}',
])
def test_bad_node_messages_raise(line: bytes) -> None:
    with pytest.raises(AnnouncerError):
        decode_node_message(line)


def test_announcer_messages() -> None:
    assert decode_announcer_message(encode_ack(3, True)) == AckMessage(3, True)
    assert decode_announcer_message(encode_ack(4, False)) == AckMessage(4, False)
    assert decode_announcer_message(encode_peer("203.0.113.5", "up")) == PeerMessage(
        "203.0.113.5", "up")
    with pytest.raises(WireError):
        decode_announcer_message(encode_peer("203.0.113.5", "sideways"))


# Lines as ExaBGP 5.0.15 writes them (its JSON encoder, text acks).
UP = ('{ "exabgp": "5.0.0", "time": 1.5, "host" : "vm", "pid" : 1, "ppid" : 1, "counter": 1, '
      '"type": "state", "neighbor": { "address": { "local": "203.0.113.10", "peer": '
      '"203.0.113.5" }, "asn": { "local": 65100, "peer": 65000 }, "router-id": '
      '"203.0.113.10" , "state": "up" } }')


@pytest.mark.parametrize(("line", "meaning"), [
    ("done\n", ExaAnswer(True)),
    ("error\n", ExaAnswer(False)),
    ("shutdown", ExaShutdown()),
    ('{ "answer": "done", "message": "command completed" }', ExaAnswer(True)),
    ('{ "answer": "error", "message": "x" }', ExaAnswer(False)),
    (UP, PeerMessage("203.0.113.5", "up")),
    (UP.replace('"up"', '"down", "reason": "peer reset"'), PeerMessage("203.0.113.5", "down")),
    (UP.replace('"up"', '"connected"'), PeerMessage("203.0.113.5", "connected")),
    ('{ "exabgp": "5.0.0", "type": "notification", "notification": "shutdown" }', ExaShutdown()),
    ('{ "exabgp": "5.0.0", "type": "update", "neighbor": {} }', None),
    ('{ "type": "state", "neighbor": { "state": "up" } }', None),
    ("{ broken", None),
    ("", None),
    ("something else", None),
])
def test_classify_exabgp_lines(line: str, meaning: object) -> None:
    assert classify_exabgp_line(line) == meaning
