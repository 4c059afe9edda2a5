"""UDP and DNS probes against real datagram servers on 127.0.0.1 (port 0,
read back after bind), including a tiny DNS responder built here."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import ip_address

import pytest

from anycast_lb.config import DNS_TYPES, BackendConfig, HealthConfig, HealthKind
from anycast_lb.health import DnsProbe, UdpProbe, make_probe
from anycast_lb.health.probes import dns_query
from tests.waiting import wait_until

LOCAL = "127.0.0.1"

Answer = Callable[[bytes], list[bytes]]
"""Given a request datagram, the datagrams to send back (in order)."""


class _Server(asyncio.DatagramProtocol):
    def __init__(self, answer: Answer, seen: list[bytes]) -> None:
        self.answer = answer
        self.seen = seen
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen.append(data)
        assert self.transport is not None
        for reply in self.answer(data):
            self.transport.sendto(reply, addr)


@pytest.fixture
async def udp_server() -> AsyncIterator[Callable[[Answer], asyncio.Future[tuple[int, list[bytes]]]]]:
    transports: list[asyncio.DatagramTransport] = []

    async def start(answer: Answer) -> tuple[int, list[bytes]]:
        seen: list[bytes] = []
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Server(answer, seen), local_addr=(LOCAL, 0))
        transports.append(transport)
        return transport.get_extra_info("sockname")[1], seen

    yield start  # type: ignore[misc]
    for transport in transports:
        transport.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A UDP port whose datagrams get ICMP port unreachable, held for the
    test: its socket is connected to itself, so no datagram from another
    port is delivered to it, and the kernel answers as if nothing were
    bound (while nobody else can take the port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOCAL, 0))
        sock.connect(sock.getsockname())
        yield int(sock.getsockname()[1])


# --- UDP ---------------------------------------------------------------------


async def test_udp_reply_matching_expect_is_healthy(udp_server) -> None:  # type: ignore[no-untyped-def]
    port, seen = await udp_server(lambda data: [b"PONG " + data])
    result = await UdpProbe(LOCAL, port, 1.0, b"PING", expect=r"^PONG PING$").check()
    assert result.ok, result
    assert result.detail == "reply 9 bytes"
    assert seen == [b"PING"]


async def test_udp_any_reply_is_healthy_without_expect(udp_server) -> None:  # type: ignore[no-untyped-def]
    port, _ = await udp_server(lambda data: [b"\x00\x01"])
    assert (await UdpProbe(LOCAL, port, 1.0, b"\x00").check()).ok
    with pytest.raises(ValueError):
        UdpProbe(LOCAL, port, 1.0, b"")  # asyncio would silently send nothing


async def test_udp_reply_not_matching_is_unhealthy(udp_server) -> None:  # type: ignore[no-untyped-def]
    port, _ = await udp_server(lambda data: [b"ERR"])
    result = await UdpProbe(LOCAL, port, 1.0, b"PING", expect="^PONG").check()
    assert not result.ok and result.detail == "reply 3 bytes does not match expect"


async def test_udp_expect_matches_bytes_through_latin1(udp_server) -> None:  # type: ignore[no-untyped-def]
    port, _ = await udp_server(lambda data: [b"\xff\x00ok"])
    assert (await UdpProbe(LOCAL, port, 1.0, b"x", expect=r"^\xff\x00").check()).ok
    assert not (await UdpProbe(LOCAL, port, 1.0, b"x", expect=r"^\x00").check()).ok


async def test_udp_silence_times_out(udp_server) -> None:  # type: ignore[no-untyped-def]
    port, seen = await udp_server(lambda data: [])
    result = await UdpProbe(LOCAL, port, 0.2, b"PING").check()
    assert not result.ok and result.detail == "timeout after 0.2 s"
    assert 0.15 <= result.latency_s < 2.0
    assert seen == [b"PING"]


async def test_udp_closed_port_fails_fast(closed_port: int) -> None:
    result = await UdpProbe(LOCAL, closed_port, 5.0, b"PING").check()
    assert not result.ok and result.detail == "port unreachable"
    assert result.latency_s < 2.0  # the ICMP error, not the 5 s timeout


async def test_make_probe_builds_udp_from_config(udp_server) -> None:  # type: ignore[no-untyped-def]
    port, seen = await udp_server(lambda data: [b"ok"])
    health = HealthConfig(kind=HealthKind.UDP, payload_hex="00ff", expect="ok")
    probe = make_probe(health, BackendConfig(address=ip_address(LOCAL), port=port), None)
    assert (await probe.check()).ok
    assert seen == [b"\x00\xff"]


# --- DNS ---------------------------------------------------------------------


def parse_query(data: bytes) -> tuple[int, int, str, int]:
    """(id, flags, name, qtype) of a one-question query."""
    query_id, flags, qdcount = struct.unpack("!HHH", data[:6])
    assert qdcount == 1
    labels, i = [], 12
    while data[i]:
        labels.append(data[i + 1:i + 1 + data[i]].decode())
        i += 1 + data[i]
    qtype, qclass = struct.unpack("!HH", data[i + 1:i + 5])
    assert qclass == 1 and i + 5 == len(data)
    return query_id, flags, ".".join(labels) + ".", qtype


def responder(rcode: int = 0, id_delta: int = 0, qr: bool = True,
              before: tuple[bytes, ...] = ()) -> Answer:
    """A tiny DNS server: echoes the question with ``rcode`` (and no answers)."""

    def answer(data: bytes) -> list[bytes]:
        query_id, flags, _, _ = parse_query(data)
        out_flags = (0x8000 if qr else 0) | (flags & 0x0100) | 0x0080 | rcode
        header = struct.pack("!HHHHHH", (query_id + id_delta) % 65536, out_flags, 1, 0, 0, 0)
        return [*before, header + data[12:]]

    return answer


async def test_dns_noerror_response_is_healthy(udp_server) -> None:  # type: ignore[no-untyped-def]
    port, seen = await udp_server(responder())
    result = await DnsProbe(LOCAL, port, 1.0, "www.example.com", DNS_TYPES["AAAA"]).check()
    assert result.ok and result.detail == "rcode NOERROR", result
    _, flags, name, qtype = parse_query(seen[0])
    assert (name, qtype, flags) == ("www.example.com.", 28, 0x0100)


async def test_dns_query_ids_vary(udp_server) -> None:  # type: ignore[no-untyped-def]
    port, seen = await udp_server(responder())
    probe = DnsProbe(LOCAL, port, 1.0, ".", DNS_TYPES["SOA"])
    for _ in range(8):
        assert (await probe.check()).ok
    assert len({parse_query(d)[0] for d in seen}) > 1


async def test_dns_rcode_outside_the_allowed_set_is_unhealthy(udp_server) -> None:  # type: ignore[no-untyped-def]
    port, _ = await udp_server(responder(rcode=2))
    result = await DnsProbe(LOCAL, port, 1.0, "example.com", 1).check()
    assert not result.ok and result.detail == "rcode SERVFAIL"
    port, _ = await udp_server(responder(rcode=3))
    assert (await DnsProbe(LOCAL, port, 1.0, "nope.example", 1, rcodes=(0, 3)).check()).ok


async def test_dns_wrong_id_or_no_qr_is_ignored(udp_server) -> None:  # type: ignore[no-untyped-def]
    port, _ = await udp_server(responder(id_delta=1))
    result = await DnsProbe(LOCAL, port, 0.2, "example.com", 1).check()
    assert not result.ok and result.detail == "timeout after 0.2 s"
    port, _ = await udp_server(responder(qr=False))
    assert not (await DnsProbe(LOCAL, port, 0.2, "example.com", 1).check()).ok


async def test_dns_answer_after_noise_is_still_taken(udp_server) -> None:  # type: ignore[no-untyped-def]
    # A short datagram and a stray response first: ignored, the real answer counts.
    port, _ = await udp_server(responder(before=(b"junk", b"\x00\x00\x80\x00" + b"\x00" * 8)))
    assert (await DnsProbe(LOCAL, port, 1.0, "example.com", 1).check()).ok


async def test_dns_closed_port_fails_fast(closed_port: int) -> None:
    result = await DnsProbe(LOCAL, closed_port, 5.0, "example.com", 1).check()
    assert not result.ok and result.detail == "port unreachable"


async def test_make_probe_builds_dns_from_config(udp_server) -> None:  # type: ignore[no-untyped-def]
    port, seen = await udp_server(responder(rcode=3))
    health = HealthConfig(kind=HealthKind.DNS, query_name="_sip._udp.example.com.",
                          query_type="SRV", expect_rcode=["NXDOMAIN"])  # type: ignore[list-item]
    probe = make_probe(health, BackendConfig(address=ip_address(LOCAL), port=port), None)
    assert (await probe.check()).ok
    assert parse_query(seen[0])[2:] == ("_sip._udp.example.com.", 33)


def test_dns_query_bytes() -> None:
    assert dns_query(0x1234, "a.bc", 1) == (
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x01a\x02bc\x00" + b"\x00\x01\x00\x01")
    assert dns_query(1, ".", 6)[12:] == b"\x00\x00\x06\x00\x01"
    with pytest.raises(ValueError):
        dns_query(1, "a..b", 1)


@pytest.mark.parametrize("kind", [HealthKind.UDP, HealthKind.DNS])
async def test_a_check_in_flight_holds_probe_fds_descriptors(udp_server, kind: HealthKind) -> None:  # type: ignore[no-untyped-def]
    import os

    from anycast_lb.limits import PROBE_FDS

    port, seen = await udp_server(lambda data: [])  # silent: the check stays in flight
    health = (HealthConfig(kind=kind, payload="x", timeout=1.0) if kind is HealthKind.UDP
              else HealthConfig(kind=kind, timeout=1.0))
    probe = make_probe(health, BackendConfig(address=ip_address(LOCAL), port=port), None)
    before = len(os.listdir("/proc/self/fd"))
    task = asyncio.create_task(probe.check())
    try:
        await wait_until(lambda: bool(seen), timeout=2, what="the request datagram")
        assert len(os.listdir("/proc/self/fd")) - before == PROBE_FDS[kind]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(os.listdir("/proc/self/fd")) == before  # closed on cancel too
