"""Property tests of every wire format a peer, a worker or ExaBGP feeds us:
arbitrary input raises only the module's own error (never a traceback),
and what we encode decodes to what we meant.

Bounded (``max_examples``) so the file runs in a few seconds; hypothesis
keeps failing examples in its database and replays them first.
"""

from __future__ import annotations

import ipaddress
import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from anycast_lb.bgp import wire as bgp_wire
from anycast_lb.cluster import wire as cluster_wire
from anycast_lb.cluster.keys import KeyRing, key_id
from anycast_lb.errors import AnnouncerError, ClusterWireError, WorkerProtocolError
from anycast_lb.forward import proxy_protocol as pp
from anycast_lb.forward import workers

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=100, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])
DEEP = "[" * 5_000  # past json's recursion limit: RecursionError is no ValueError

# JSON documents of any shape, for the JSON line protocols.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def json_object_with(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects that use the protocol's own keys, so parsing gets past the
    first check."""
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), json_values, max_size=6)


# -- PROXY protocol v2 --------------------------------------------------------

ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)


@ROUND_TRIP
@given(family=st.sampled_from([4, 6]), data=st.data(), sport=ports, dport=ports,
       protocol=st.sampled_from(["tcp", "udp"]), payload=st.binary(max_size=64))
def test_proxy_v2_round_trip(family: int, data: st.DataObject, sport: int, dport: int,
                             protocol: pp.Transport, payload: bytes) -> None:
    addresses = v4 if family == 4 else v6
    src, dst = data.draw(addresses), data.draw(addresses)
    header = pp.v2_header((src, sport), (dst, dport), protocol)
    parsed = pp.parse_v2_header(header + payload)
    assert parsed.length == len(header) and (header + payload)[parsed.length:] == payload
    assert parsed.protocol == protocol
    assert parsed.client is not None and parsed.local is not None
    # An IPv4-mapped IPv6 address goes on the wire as IPv4.
    def plain(a: str) -> str:
        ip = ipaddress.ip_address(a)
        mapped = getattr(ip, "ipv4_mapped", None)
        return str(mapped or ip)
    assert (plain(parsed.client[0]), parsed.client[1]) == (plain(src), sport)
    assert (plain(parsed.local[0]), parsed.local[1]) == (plain(dst), dport)
    for cut in range(len(header)):
        with pytest.raises(pp.IncompleteHeader):
            pp.parse_v2_header(header[:cut])


@FUZZ
@given(st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: pp.SIGNATURE + b)
       | st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 300),
                   st.binary(max_size=300)).map(
           lambda t: pp.SIGNATURE + bytes(t[:2]) + t[2].to_bytes(2, "big") + t[3]))
@example(pp.SIGNATURE[:5])
@example(pp.SIGNATURE + b"\x21\x11\x00\x00")
def test_proxy_v2_arbitrary_bytes_raise_only_its_error(data: bytes) -> None:
    try:
        parsed = pp.parse_v2_header(data)
    except pp.ProxyHeaderError:
        return
    assert 16 <= parsed.length <= len(data)


@pytest.mark.parametrize(("client", "local", "protocol"), [
    (("not an address", 1), ("127.0.0.1", 2), "tcp"),
    (("127.0.0.1", 70000), ("127.0.0.1", 2), "tcp"),
    (("127.0.0.1", -1), ("127.0.0.1", 2), "udp"),
    (("127.0.0.1", 1), ("127.0.0.1", 2), "sctp"),
])
def test_proxy_v2_bad_arguments_raise_its_error(client: tuple[str, int], local: tuple[str, int],
                                                protocol: Any) -> None:
    with pytest.raises(pp.ProxyHeaderError):
        pp.v2_header(client, local, protocol)


# -- cluster sync -------------------------------------------------------------

KEY = bytes(range(32))
RING = KeyRing(KEY, (KEY,))
A, B = ("203.0.113.1", 7946), ("203.0.113.2", 7946)
HEAD = cluster_wire.MAGIC + bytes([cluster_wire.VERSION])


def signed(body: bytes) -> bytes:
    """``body`` with a valid tag, so decoding gets past the MAC."""
    return body + cluster_wire.tag(KEY, A, B, body)


@FUZZ
@given(st.binary(max_size=200)
       | st.binary(max_size=200).map(lambda b: signed(HEAD + b))
       | st.tuples(st.integers(1, 4), st.integers(0, 255), st.binary(min_size=34, max_size=34),
                   st.binary(max_size=120)).map(
           lambda t: signed(HEAD + bytes([t[0], t[1], key_id(KEY)]) + t[2] + t[3])))
@example(signed(HEAD + bytes([2, 0, key_id(KEY)]) + bytes(34) + b"\xff\xff\xff\xff"))
def test_cluster_wire_arbitrary_bytes_raise_only_its_error(data: bytes) -> None:
    try:
        message = cluster_wire.decode(data, RING, A, B)
    except ClusterWireError:
        return
    assert message.header.key_id == key_id(KEY)


flow_keys = st.tuples(v4, ports, v4, ports)


@ROUND_TRIP
@given(added=st.dictionaries(flow_keys, st.integers(0, 2**64 - 1), max_size=80),
       removed=st.lists(flow_keys, max_size=40, unique=True),
       epoch=st.integers(0, 2**64 - 1), counter=st.integers(0, 2**64 - 1))
def test_cluster_delta_round_trip(added: dict[Any, int], removed: list[Any], epoch: int,
                                  counter: int) -> None:
    removed = [k for k in removed if k not in added]
    got_added: dict[Any, int] = {}
    got_removed: list[Any] = []
    for seq, (adds, removes) in enumerate(cluster_wire.split_changes(added, removed, 1400), 1):
        data = cluster_wire.seal(cluster_wire.encode_delta(epoch, seq, 0, adds, removes),
                                 counter, KEY, key_id(KEY), A, B)
        assert len(data) <= 1400
        message = cluster_wire.decode(data, RING, A, B)
        assert isinstance(message, cluster_wire.DeltaMessage)
        assert (message.header.epoch, message.header.counter) == (epoch, counter)
        got_added.update(message.added)
        got_removed += message.removed
    assert got_added == added and got_removed == removed


# -- relay worker pipe --------------------------------------------------------

WORKER_KEYS = ["op", "backends", "service", "backend", "up", "timeout", "services", "pid",
               "error", "idle", "accepted", "rejected", "active", "up_backends"]
WORKER_OPS = ["state", "backend", "stop_accepting", "drain", "stop", "counters", "listening",
              "error", "exit", "spec"]


def worker_lines() -> st.SearchStrategy[bytes]:
    with_op = st.tuples(st.sampled_from(WORKER_OPS), json_object_with(WORKER_KEYS)).map(
        lambda t: {**t[1], "op": t[0]})
    return (st.binary(max_size=200)
            | st.text(max_size=200).map(str.encode)
            | (json_values | with_op).map(lambda v: json.dumps(v).encode() + b"\n"))


@FUZZ
@given(worker_lines())
@example(DEEP.encode())
@example(b'{"op": "counters", "services": {"web": {"backends": {"x": [1, 2]}}}}')
@example(b'{"op": "state", "backends": {"web": []}}')
@example(b'{"op": "backend", "service": "web", "backend": 5, "up": true}')
@example(b'{"op": "drain", "timeout": "soon"}')
@example(b'{"op": "drain", "timeout": NaN}')
def test_worker_lines_raise_only_its_error(line: bytes) -> None:
    try:
        command = workers.parse_command(line)
    except WorkerProtocolError:
        pass
    else:
        assert command.op in WORKER_OPS
    try:
        report = workers.parse_report(line)
    except WorkerProtocolError:
        pass
    else:
        assert report.op in WORKER_OPS


def test_worker_messages_round_trip() -> None:
    state = {"op": "state", "backends": {"web": {"127.0.0.1:9001": True}}}
    command = workers.parse_command(workers.encode(state))
    assert command == workers.Command(op="state", backends={"web": {"127.0.0.1:9001": True}})
    drain = workers.parse_command(workers.encode({"op": "drain", "timeout": 2.5}))
    assert drain.timeout == 2.5
    counters = {"op": "counters", "services": {"web": {"accepted": 3, "backends": {
        "127.0.0.1:9001": [1, 2, 0, 10, 20]}}}}
    report = workers.parse_report(workers.encode(counters))
    assert report.services is not None and report.services["web"].accepted == 3


# -- ExaBGP API lines and the announcer socket -------------------------------

BGP_KEYS = ["type", "seq", "routes", "withdrawn", "prefix", "med", "communities",
            "as_path_prepend", "local_as", "address", "state", "ok", "answer", "neighbor",
            "peer", "notification"]


def bgp_lines() -> st.SearchStrategy[str]:
    route = json_object_with(["prefix", "med", "communities", "as_path_prepend", "local_as"])
    routes = st.fixed_dictionaries({
        "type": st.just("routes"), "seq": st.integers(-5, 2**70),
        "routes": st.lists(route | json_values, max_size=3),
    }, optional={"withdrawn": st.lists(json_values | st.sampled_from(
        ["198.51.100.0/24", "2001:db8::/32", "10.0.0.1/8"]), max_size=3)})
    other = st.tuples(st.sampled_from(["ack", "peer", "state", "routes"]),
                      json_object_with(BGP_KEYS)).map(lambda t: {**t[1], "type": t[0]})
    return (st.text(max_size=200)
            | st.sampled_from(["done", "error", "shutdown", " done\n", "{", "}"])
            | (routes | other | json_values).map(json.dumps))


@FUZZ
@given(bgp_lines())
@example(DEEP)
@example("{" + '"a":[' * 5_000)
@example('{"type":"routes","seq":1,"routes":[{"prefix":"198.51.100.0/24","med":1,'
         '"communities":["65100:1\\n"],"as_path_prepend":0,"local_as":65000}]}')
@example('{"type":"routes","seq":1,"routes":[],"withdrawn":["198.51.100.1/24"]}')
@example('{"address":"","state":[],"type":"peer"}')  # an unhashable state (found by a soak)
@example('{"type":"state","neighbor":{"address":{"peer":"198.51.100.1"},"state":[]}}')
def test_bgp_lines_raise_only_its_error(line: str) -> None:
    assert bgp_wire.classify_exabgp_line(line) is None or True  # never raises
    for decode in (bgp_wire.decode_node_message, bgp_wire.decode_announcer_message):
        for form in (line, line.encode("utf-8", "surrogatepass")):
            try:
                decode(form)
            except AnnouncerError:
                pass


@FUZZ
@given(st.binary(max_size=200))
@example(b"\xff\xfe{}")
@example(DEEP.encode())
def test_bgp_bytes_raise_only_its_error(line: bytes) -> None:
    for decode in (bgp_wire.decode_node_message, bgp_wire.decode_announcer_message):
        try:
            decode(line)
        except AnnouncerError:
            pass


networks = (st.tuples(st.ip_addresses(v=4), st.integers(0, 32))
            | st.tuples(st.ip_addresses(v=6), st.integers(0, 128))).map(
    lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False))


@ROUND_TRIP
@given(st.lists(st.tuples(networks,
                          st.integers(0, 2**32 - 1),
                          st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
                                   max_size=3),
                          st.integers(0, 8), st.integers(1, 2**32 - 1)), max_size=4,
                unique_by=lambda t: t[0]),
       st.integers(0, 2**63))
def test_bgp_routes_round_trip(raw: list[Any], seq: int) -> None:
    from anycast_lb.bgp.policy import Route

    routes = {net: Route(net, med, tuple(f"{a}:{b}" for a, b in comms), prepend, local_as)
              for net, med, comms, prepend, local_as in raw}
    message = bgp_wire.decode_node_message(bgp_wire.encode_routes(seq, routes))
    assert message.seq == seq and message.routes == routes


def test_classify_is_total_on_printable_noise() -> None:
    for ch in string.printable:
        bgp_wire.classify_exabgp_line(ch * 3)
