"""The L2 lab's measuring client: run inside the ARP client namespace
(``python -m anycast_lb.lab.l2probe ...``, started by the L2 scenarios).

For ``--duration`` s it runs, each in a thread:

- a UDP stream to VIP:port, one datagram every ``--interval-ms`` (1 ms),
  each carrying its sequence number; the UDP echo behind the VIP returns
  it (after a "name peer " prefix). Per datagram: send time and first reply time (None: lost);
- ``--flows`` long-lived TCP flows to VIP:port (the lab's echo: a greeting
  line, then every line echoed), one line every 100 ms each. A flow that
  fails (error, EOF, no echo within 1 s) is recorded as broken and
  reconnected every 50 ms until one connect succeeds;
- a capture (``AF_PACKET`` raw socket on ``--interface``) of every ARP
  frame whose sender protocol address is the VIP (replies and gratuitous
  ARP) and every Neighbor Advertisement whose target is the VIP, with the
  Ethernet source MAC and the time;
- a prober in ``--probe-ns`` (a second host on the segment, so that no
  answer to it touches the client's own neighbour table): every
  ``--probe-ms`` (10 ms) a broadcast ARP request for the VIP (IPv4) or a
  Neighbor Solicitation to its solicited-node multicast address (IPv6,
  RFC 4861 section 7.2.2), recording every answer's source MAC and time.
  Two MACs answering one probe is a split brain seen directly.

Traffic goes only to the VIP, which the caller checks is inside the lab's
prefixes; the process refuses any other address. Every loop is bounded by
the duration. Times are ``time.monotonic()`` (the same clock as the lab's
scenario runner on the same machine). It writes ``--ready`` once the first
UDP reply came back, and the JSON record to ``--out`` at the end.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from anycast_lb.election.l2 import ETH_P_ARP, ETH_P_IPV6, icmpv6_checksum
from anycast_lb.lab.netns import entered
from anycast_lb.lab.topology import in_lab_prefixes

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
TCP_LINE_S = 0.1
TCP_TIMEOUT_S = 1.0
RECONNECT_S = 0.05

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_answer(frame: bytes, vip: IPAddress) -> tuple[str, str] | None:
    """(source MAC, kind) when ``frame`` (Ethernet) answers for ``vip``:
    an ARP frame with sender protocol address ``vip`` (kind ``reply``,
    ``garp`` for a request whose target is the VIP too, else ``request``)
    or a Neighbor Advertisement with target ``vip`` (``na``, ``na-o`` with
    the Override flag). None for anything else."""
    if len(frame) < 42:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    src = mac_text(frame[6:12])
    if ethertype == ETH_P_ARP and vip.version == 4:
        op = struct.unpack("!H", frame[20:22])[0]
        spa, tpa = frame[28:32], frame[38:42]
        if spa != vip.packed:
            return None
        if op == 2:
            return src, "reply"
        return src, "garp" if tpa == spa else "request"
    if ethertype == ETH_P_IPV6 and vip.version == 6 and len(frame) >= 78:
        if frame[20] != 58 or frame[54] != ND_NEIGHBOR_ADVERT:
            return None
        if frame[62:78] != vip.packed:
            return None
        return src, "na-o" if frame[58] & 0x20 else "na"
    return None


def parse_question(frame: bytes, vip: IPAddress) -> str | None:
    """The destination MAC when ``frame`` asks who has ``vip`` (an ARP
    request for it, or a Neighbor Solicitation with it as target)."""
    if len(frame) < 42:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype == ETH_P_ARP and vip.version == 4:
        if struct.unpack("!H", frame[20:22])[0] == 1 and frame[38:42] == vip.packed \
                and frame[28:32] != vip.packed:
            return mac_text(frame[0:6])
    if ethertype == ETH_P_IPV6 and vip.version == 6 and len(frame) >= 78:
        if frame[20] == 58 and frame[54] == ND_NEIGHBOR_SOLICIT and frame[62:78] == vip.packed:
            return mac_text(frame[0:6])
    return None


def arp_request(mac: bytes, sender: ipaddress.IPv4Address, vip: ipaddress.IPv4Address) -> bytes:
    """A broadcast ARP request (RFC 826) for ``vip`` from ``sender``/``mac``."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, sender.packed,
                      b"\x00" * 6, vip.packed)
    return b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + arp


def neighbor_solicitation(mac: bytes, sender: ipaddress.IPv6Address,
                          vip: ipaddress.IPv6Address) -> bytes:
    """A Neighbor Solicitation (RFC 4861 section 4.3) for ``vip`` to its
    solicited-node multicast address (RFC 4291 section 2.7.1), hop limit
    255, with a Source Link-Layer Address option."""
    group = ipaddress.IPv6Address(b"\xff\x02" + b"\x00" * 9 + b"\x01\xff" + vip.packed[13:])
    dst_mac = b"\x33\x33" + group.packed[12:]
    body = struct.pack("!BBH4x16s", ND_NEIGHBOR_SOLICIT, 0, 0, vip.packed) \
        + struct.pack("!BB6s", 1, 1, mac)
    checksum = icmpv6_checksum(sender, group, body)
    body = body[:2] + struct.pack("!H", checksum) + body[4:]
    ipv6 = struct.pack("!IHBB16s16s", 6 << 28, len(body), 58, 255, sender.packed, group.packed)
    return dst_mac + mac + struct.pack("!H", ETH_P_IPV6) + ipv6 + body


class Measure:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.vip: IPAddress = ipaddress.ip_address(args.vip)
        if not in_lab_prefixes(self.vip):
            raise SystemExit(f"refusing {self.vip}: not inside the lab's prefixes")
        self.start = time.monotonic()
        self.end = self.start + args.duration
        self.count = int(args.duration * 1000 / args.interval_ms)
        self.sent: list[float | None] = [None] * self.count
        self.recv: list[float | None] = [None] * self.count
        self.udp_errors: list[list[Any]] = []
        self.capture: list[list[Any]] = []
        self.probes: list[float] = []
        self.answers: list[list[Any]] = []
        self.flows: list[dict[str, Any]] = []
        self.first_reply = threading.Event()
        self.lock = threading.Lock()

    # -- UDP ---------------------------------------------------------------
    def udp(self) -> None:
        family = socket.AF_INET6 if self.vip.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.connect((str(self.vip), self.args.udp_port))
        sock.settimeout(0.1)
        receiver = threading.Thread(target=self._udp_recv, args=(sock,), daemon=True)
        receiver.start()
        step = self.args.interval_ms / 1000
        for i in range(self.count):
            due = self.start + i * step
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self.sent[i] = time.monotonic()
            try:
                sock.send(struct.pack("!Q", i))
            except OSError as exc:
                self.udp_errors.append([time.monotonic(), str(exc)])
        receiver.join()
        sock.close()

    def _udp_recv(self, sock: socket.socket) -> None:
        stop = self.end + 0.3
        while time.monotonic() < stop:
            try:
                data = sock.recv(64)
            except TimeoutError:
                continue
            except OSError as exc:
                self.udp_errors.append([time.monotonic(), str(exc)])
                continue
            now = time.monotonic()
            if len(data) >= 8:
                # The lab's UDP echo puts "name peer " before the datagram.
                seq = struct.unpack("!Q", data[-8:])[0]
                if seq < self.count and self.recv[seq] is None:
                    self.recv[seq] = now
                    self.first_reply.set()

    # -- TCP ---------------------------------------------------------------
    def tcp(self, index: int) -> None:
        flow: dict[str, Any] = {"flow": index, "connected_at": None, "broken": [],
                                "reconnected": [], "lines": 0}
        with self.lock:
            self.flows.append(flow)
        family = socket.AF_INET6 if self.vip.version == 6 else socket.AF_INET
        sock: socket.socket | None = None
        while time.monotonic() < self.end:
            if sock is None:
                try:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.settimeout(TCP_TIMEOUT_S)
                    sock.connect((str(self.vip), self.args.tcp_port))
                    reader = sock.makefile("rb")
                    if not reader.readline():
                        raise ConnectionError("no greeting")
                    if flow["connected_at"] is None:
                        flow["connected_at"] = time.monotonic()
                    else:
                        flow["reconnected"].append(time.monotonic())
                except OSError:
                    if sock is not None:
                        sock.close()
                    sock = None
                    time.sleep(RECONNECT_S)
                    continue
            try:
                sock.sendall(f"line {flow['lines']}\n".encode())
                if not reader.readline():
                    raise ConnectionError("EOF")
                flow["lines"] += 1
            except OSError as exc:
                flow["broken"].append([time.monotonic(), type(exc).__name__])
                sock.close()
                sock = None
                continue
            time.sleep(TCP_LINE_S)
        if sock is not None:
            sock.close()

    # -- capture and probe ---------------------------------------------------
    def _raw(self, interface: str) -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((interface, 0))
        sock.settimeout(0.05)
        return sock

    def capture_loop(self, sock: socket.socket, into: list[list[Any]]) -> None:
        stop = self.end + 0.3
        while time.monotonic() < stop:
            try:
                frame, addr = sock.recvfrom(2048)
            except TimeoutError:
                continue
            if addr[2] == PACKET_OUTGOING:
                if into is self.capture and (asked := parse_question(frame, self.vip)):
                    into.append([time.monotonic(), asked, "client-asks"])
                continue
            found = parse_answer(frame, self.vip)
            if found is not None:
                into.append([time.monotonic(), found[0], found[1]])
        sock.close()

    def probe(self, sock: socket.socket) -> None:
        mac = bytes(sock.getsockname()[4])[:6]
        sender = ipaddress.ip_address(self.args.probe_address)
        if isinstance(self.vip, ipaddress.IPv4Address):
            assert isinstance(sender, ipaddress.IPv4Address)
            frame = arp_request(mac, sender, self.vip)
        else:
            assert isinstance(sender, ipaddress.IPv6Address)
            frame = neighbor_solicitation(mac, sender, self.vip)
        step = self.args.probe_ms / 1000
        i = 0
        while True:
            due = self.start + i * step
            if due >= self.end:
                break
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self.probes.append(time.monotonic())
            try:
                sock.send(frame)
            except OSError:
                pass
            i += 1

    def run(self) -> dict[str, Any]:
        capture = self._raw(self.args.interface)
        with entered(self.args.probe_ns):
            probe_sock = self._raw(self.args.probe_interface)
        threads = [
            threading.Thread(target=self.capture_loop, args=(capture, self.capture), daemon=True),
            threading.Thread(target=self.capture_loop, args=(probe_sock, self.answers),
                             daemon=True),
            threading.Thread(target=self.probe, args=(probe_sock,), daemon=True),
            threading.Thread(target=self.udp, daemon=True),
            *[threading.Thread(target=self.tcp, args=(i,), daemon=True)
              for i in range(self.args.flows)],
        ]
        for t in threads:
            t.start()
        if self.first_reply.wait(max(0.1, self.end - time.monotonic())):
            # Written whole, then renamed: the runner polls for the file.
            tmp = Path(self.args.ready + ".tmp")
            tmp.write_text(f"{time.monotonic()}\n")
            tmp.replace(self.args.ready)
        for t in threads:
            t.join(max(0.1, self.end + 2.0 - time.monotonic()))
        return {
            "vip": str(self.vip), "start": self.start, "end": self.end,
            "udp": {"interval_ms": self.args.interval_ms, "sent": self.sent,
                    "recv": self.recv, "errors": self.udp_errors[:100]},
            "tcp": sorted(self.flows, key=lambda f: int(f["flow"])),
            "capture": self.capture,
            "probe": {"interval_ms": self.args.probe_ms, "sent": self.probes,
                      "answers": self.answers},
        }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vip", required=True)
    p.add_argument("--udp-port", type=int, required=True)
    p.add_argument("--tcp-port", type=int, required=True)
    p.add_argument("--flows", type=int, default=10)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--interval-ms", type=float, default=1.0)
    p.add_argument("--probe-ms", type=float, default=10.0)
    p.add_argument("--interface", default="lan0")
    p.add_argument("--probe-ns", required=True)
    p.add_argument("--probe-interface", default="lan0")
    p.add_argument("--probe-address", required=True)
    p.add_argument("--ready", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not 1 <= args.duration <= 60 or args.flows > 50 or args.interval_ms < 0.5 \
            or args.probe_ms < 5:
        raise SystemExit("bounds: duration 1..60 s, flows <= 50, interval >= 0.5 ms, "
                         "probe >= 5 ms")
    result = Measure(args).run()
    Path(args.out).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
