"""Sync forgery tool of the ``sync-forgery`` scenario: a host on the node LAN
sends well-formed cluster sync datagrams (:mod:`anycast_lb.cluster.wire`)
that claim to come from one node to another.

::

    ip netns exec alb-be3 python -m anycast_lb.lab.forger --ns alb-be3 \\
        --plan plan.json --out forged.json

The plan (JSON, written by the scenario) names each target node (LAN
address, sync port) and, for each, the peers to impersonate with their
epoch and delta seq as a host sniffing the LAN would learn them; the
forged flows (``client``, ``ports`` [first, last], ``vip``, ``vip_port``);
``duration`` and ``interval`` (s). The datagrams are raw IPv4/UDP packets
whose source is the impersonated peer's LAN address and sync port (a raw
socket: nothing binds that address here), with no authentication.

Every ``interval`` s, for every (target, impersonated peer):

- a DELTA adding the forged flows (``since_ms`` a day ahead, so they win
  any claim) with a seq far ahead of the real one (a gap: applied anyway);
- a SNAPSHOT holding only the forged flows (replaces the peer's flows);
- a HEARTBEAT with the leaving flag (the peer "stops");
- a HEARTBEAT with a new epoch (the peer "restarted": its flows die);
- a SNAPSHOT_REQUEST (the target sends a snapshot to the real peer).

Prints ``started T0``, writes counts. Refuses to run outside ``--ns`` or
toward addresses outside the lab's prefixes. Bounded: ``MAX_DATAGRAMS``
datagrams and ``MAX_DURATION_S`` s.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import secrets
import socket
import struct
import sys
import time
from typing import Any

from anycast_lb.cluster import wire
from anycast_lb.cluster.keys import key_id
from anycast_lb.errors import UnsafeLab
from anycast_lb.lab.netns import require_namespace
from anycast_lb.lab.topology import in_lab_prefixes

MAX_DATAGRAMS = 50_000
MAX_DURATION_S = 30.0
DAY_MS = 86_400_000
SEQ_AHEAD = 1000
_UDP = struct.Struct("!HHHH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")


FORGER_KEY = secrets.token_bytes(32)
"""The injector's own sync key: well-formed, sealed datagrams that no node
can verify."""


def packet(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 + UDP packet (UDP checksum 0, allowed over IPv4: RFC 768; the
    kernel fills in the IP checksum and length of a raw IP_HDRINCL send)."""
    udp = _UDP.pack(src[1], dst[1], _UDP.size + len(payload), 0) + payload
    header = _IPV4.pack(0x45, 0, _IPV4.size + len(udp), 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                        socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    return header + udp


def forged_flows(plan: dict[str, Any], now_ms: int) -> dict[tuple[str, int, str, int], int]:
    first, last = plan["ports"]
    return {(plan["client"], p, plan["vip"], int(plan["vip_port"])): now_ms + DAY_MS
            for p in range(int(first), int(last) + 1)}


def datagrams(plan: dict[str, Any], peer: dict[str, Any], round_: int, now_ms: int
              ) -> list[bytes]:
    """The payloads of one round impersonating ``peer`` (see module doc)."""
    epoch, seq = int(peer["epoch"]), int(peer["seq"]) + SEQ_AHEAD * (round_ + 1)
    flows = forged_flows(plan, now_ms)
    out = [wire.encode_delta(epoch, seq + i + 1, now_ms, adds, removes)
           for i, (adds, removes) in enumerate(wire.split_changes(flows, [], 1400))]
    out += wire.encode_snapshot(epoch, seq + len(out) + 1, now_ms, 0xF0000000 + round_,
                                flows, 1400)
    out.append(wire.encode_heartbeat(epoch, seq + len(out) + 1, now_ms, receiver=True,
                                     leaving=True, owned=len(flows), name=peer["name"]))
    out.append(wire.encode_heartbeat(secrets.randbits(63) + 1, 0, now_ms, receiver=True,
                                     leaving=False, owned=0, name=peer["name"]))
    out.append(wire.encode_snapshot_request(epoch, now_ms))
    return out


def run(plan: dict[str, Any]) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    t0 = time.monotonic()
    print(f"started {t0:.6f}", flush=True)
    sent: dict[str, int] = {}
    errors = 0
    total = 0
    rounds = 0
    duration = min(float(plan["duration"]), MAX_DURATION_S)
    while time.monotonic() - t0 < duration and total < MAX_DATAGRAMS:
        now_ms = int(time.time() * 1000)
        for target in plan["targets"]:
            dst = (target["address"], int(target["port"]))
            for peer in target["peers"]:
                src = (peer["address"], int(peer["port"]))
                for data in datagrams(plan, peer, rounds, now_ms):
                    if total >= MAX_DATAGRAMS:
                        break
                    # Sealed as a node would seal it, but with a key of the
                    # attacker's own: the nodes' key never leaves their files.
                    data = wire.seal(data, total + 1, FORGER_KEY, key_id(FORGER_KEY), src, dst)
                    try:
                        sock.sendto(packet(src, dst, data), (dst[0], 0))
                        sent[target["name"]] = sent.get(target["name"], 0) + 1
                        total += 1
                    except OSError:
                        errors += 1
        rounds += 1
        time.sleep(max(0.0, t0 + rounds * float(plan["interval"]) - time.monotonic()))
    sock.close()
    return {"t0": t0, "rounds": rounds, "sent": sent, "sent_total": total,
            "errors": errors, "forged_flows": len(forged_flows(plan, 0)),
            "elapsed_s": round(time.monotonic() - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    with open(args.plan) as f:
        plan = json.load(f)
    try:
        require_namespace(args.ns)
        addresses = [plan["client"], plan["vip"]] + [
            a for t in plan["targets"] for a in [t["address"]] + [p["address"] for p in t["peers"]]]
        for address in addresses:
            if not in_lab_prefixes(ipaddress.ip_address(address)):
                raise UnsafeLab(f"{address} is not a lab address")
    except (UnsafeLab, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run(plan)
    with open(args.out, "w") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
