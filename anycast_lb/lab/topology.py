"""The lab's address plan and shape: a pure description, no I/O.

::

    alb-client --- alb-router (FRR) ---+--- alb-lb1 ---+
     .2   203.0.113.0/30   .1          +--- alb-lb2 ---+--- alb-lan (bridge) --- alb-be1..M
                                       +--- alb-lbN ---+    198.51.100.128/25

- client <-> router: 203.0.113.0/30 (router .1, client .2).
- router <-> node i (1-based): 203.0.113.(4i)/30, router 4i+1, node 4i+2, so
  node 1 speaks BGP from 203.0.113.6 to 203.0.113.5 (the issue's example).
  One link per node, so a single node's link can go down.
- VIP 198.51.100.10/32 on ``lo`` of every node namespace (the kernels the
  lab runs on may have no dummy interfaces).
- Backend LAN 198.51.100.128/25 on a bridge in ``alb-lan``: node i at
  198.51.100.(128+i), backend j at 198.51.100.(192+j). It is also the node
  LAN: with flow survival, nodes heartbeat, publish their flows and steer
  packets to each other there, so steered traffic never crosses the router.
- Router AS 65000; every node AS 65100 with the same MED (else ECMP silently
  drops the odd one out).
- With consensus only: a management segment 198.51.100.32/27 on a bridge in
  ``alb-mgmt``: node i at 198.51.100.(32+i) (interface ``mgmt0``), etcd
  member k (namespace ``alb-etcdK``) at 198.51.100.(48+k), client port 2379,
  peer port 2380. The router has no leg on it and no route to it, so the
  client cannot reach etcd; the nodes reach it directly.

- With ``--engine kernel`` only: the router has a leg on the LAN bridge too
  (198.51.100.254, interface ``lan``), the backends' default gateway, so
  the backends answer clients directly (direct server return: replies never
  cross a node). Each backend holds the VIP on ``lo`` with ``arp_ignore=1``
  and ``arp_announce=2`` (:mod:`anycast_lb.kernel.backend`), and serves
  the TCP and UDP echo on the VIP's service ports (DSR cannot translate
  ports: the echo service is on port 9000 of the VIP, not 80). Client
  packets reach a node on its uplink (the nft ingress hook) and leave on
  its LAN leg for the backend.
- With L2 (``lab up --l2``, implies consensus): the backend LAN is also the
  VIPs' segment. An ARP client ``alb-arp`` (198.51.100.190,
  2001:db8:100::be) and a prober ``alb-probe`` (198.51.100.191,
  2001:db8:100::bf) sit on its bridge; node i also has 2001:db8:100::(80+i)
  on ``lan0``. The elected VIPs 198.51.100.140 and 2001:db8:100::10 are on
  no node until the owner adds one.

Every address comes from 198.51.100.0/24 and 203.0.113.0/24 (RFC 5737);
never 192.0.2.0/24, which the machine's uplink may use.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

LAB_PREFIXES: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("198.51.100.0/24"),
    ipaddress.ip_network("203.0.113.0/24"),
    ipaddress.ip_network("2001:db8::/32"),
)
"""Everything the lab may use. The lab refuses to start when any of them
overlaps an address or route of the root namespace."""



def _ns_prefix(value: str) -> str:
    """The namespace name prefix: ``alb-`` unless ``ANYCAST_LB_LAB_NS_PREFIX``
    names another of the form ``alb<up to 4 of a-z0-9>-`` (two labs side by
    side on one machine, each with its own ``ANYCAST_LB_LAB_DIR``). ``albt-``
    is reserved for the tests' scratch namespaces.

    Raises ValueError for any other value."""
    if not re.fullmatch(r"alb[a-z0-9]{0,4}-", value) or value == "albt-":
        raise ValueError(f"ANYCAST_LB_LAB_NS_PREFIX must look like 'alb-' or 'albx-' "
                         f"(not 'albt-'): {value!r}")
    return value


NS_PREFIX = _ns_prefix(os.environ.get("ANYCAST_LB_LAB_NS_PREFIX", "alb-"))
MAX_NODES = 8
ETCD_MEMBERS = 3
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
MGMT_PREFIX = ipaddress.IPv4Network("198.51.100.32/27")
"""The management segment (consensus only): nodes and etcd members, not the
client, not the router."""
CONSENSUS_CLUSTER = "lab"
"""Keys live under ``/anycast-lb/lab/``."""
MAX_BACKENDS = 8
L2_VIP = ipaddress.IPv4Address("198.51.100.140")
"""L2 lab: the elected IPv4 VIP on the backend LAN (moved by gratuitous ARP)."""
L2_PREFIX6 = ipaddress.IPv6Network("2001:db8:100::/64")
L2_VIP6 = ipaddress.IPv6Address("2001:db8:100::10")
"""L2 lab: the elected IPv6 VIP (moved by unsolicited NA)."""
L2_CLIENT = ipaddress.IPv4Address("198.51.100.190")
L2_CLIENT6 = ipaddress.IPv6Address("2001:db8:100::be")
L2_PROBE = ipaddress.IPv4Address("198.51.100.191")
L2_PROBE6 = ipaddress.IPv6Address("2001:db8:100::bf")
ROUTER_AS = 65000
NODE_AS = 65100
VIP = ipaddress.IPv4Address("198.51.100.10")
SERVICE_PORT = 80
"""TCP service on the VIP: backends greet with their name, then echo lines."""
WEB_PORT = 8080
"""TCP service on the VIP forwarding to the backends' HTTP server."""
UDP_PORT = 9000
"""UDP service on the VIP forwarding to the backends' UDP echo."""
BACKEND_ECHO_PORT = 9000
BACKEND_HTTP_PORT = 8080
API_LISTEN = "127.0.0.1:9180"
"""Each node namespace has its own loopback, so every node uses the same."""
ADMIN_TOKEN = "lab-admin-token"
FLOOD_ADDRESS = ipaddress.IPv4Address("203.0.113.65")
"""A second address of the client namespace, the source of the flood
scenarios (the attacker), so the paced stream from ``client_address``
stays the legitimate client; the router routes FLOOD_PREFIX to the client."""
FLOOD_PREFIX = ipaddress.IPv4Network("203.0.113.64/28")
GRACEFUL_SHUTDOWN = "65535:0"
"""RFC 8326 well-known community."""
NODE_COMMUNITY = "65100:1"


@dataclass(frozen=True)
class Node:
    index: int
    name: str
    ns: str
    address: ipaddress.IPv4Address
    """Node side of its /30 to the router: BGP local address and router id."""
    router_address: ipaddress.IPv4Address
    """Router side of the same /30: the BGP peer and the node's default gateway."""
    lan_address: ipaddress.IPv4Address
    """On the backend LAN: the source address backends see."""
    uplink_if: str
    """Interface name in the node namespace (toward the router)."""
    router_if: str
    """Interface name in the router namespace (toward this node)."""
    lan_if: str
    """Interface name in the node namespace (toward the LAN bridge)."""
    bridge_port: str
    """Interface name in the LAN namespace (bridge port of this node)."""


@dataclass(frozen=True)
class Backend:
    index: int
    name: str
    ns: str
    address: ipaddress.IPv4Address
    lan_if: str
    bridge_port: str


@dataclass(frozen=True)
class EtcdMember:
    index: int
    name: str
    """etcd member name (``etcd1``...), also its ``--name``."""
    ns: str
    address: ipaddress.IPv4Address
    mgmt_if: str
    bridge_port: str

    @property
    def client_url(self) -> str:
        return f"http://{self.address}:{ETCD_CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{ETCD_PEER_PORT}"


def mgmt_address(node: Node) -> ipaddress.IPv4Address:
    """Node i's address on the management segment (consensus only)."""
    return MGMT_PREFIX.network_address + node.index


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    backends: tuple[Backend, ...]
    bfd: bool = False
    flow_survival: bool = False
    """Nodes get a ``cluster:`` section: they share which flows they own over
    the backend LAN (the node LAN) and steer misdirected packets to the owner."""
    kernel: bool = False
    """Nodes run ``forwarding.engine: kernel`` (direct server return): the
    router has a LAN leg, backends hold the VIP on ``lo``."""
    etcd: tuple[EtcdMember, ...] = ()
    """With consensus: the etcd members on the management segment (empty
    without: the lab is built exactly as before)."""
    l2: bool = False
    """The L2 lab: an ARP client and a prober on the backend LAN, and
    ``via: l2`` services (elected VIPs L2_VIP, L2_VIP6) on every node."""
    mgmt_ns: str = NS_PREFIX + "mgmt"
    mgmt_if: str = "mgmt0"
    """Interface name of a node on the management segment."""
    client_ns: str = NS_PREFIX + "client"
    router_ns: str = NS_PREFIX + "router"
    lan_ns: str = NS_PREFIX + "lan"
    arp_ns: str = NS_PREFIX + "arp"
    """L2 lab: the client on the VIPs' segment (traffic and capture)."""
    probe_ns: str = NS_PREFIX + "probe"
    """L2 lab: asks who has the VIPs (broadcast ARP, NS) and records who answers."""
    client_address: ipaddress.IPv4Address = ipaddress.IPv4Address("203.0.113.2")
    router_client_address: ipaddress.IPv4Address = ipaddress.IPv4Address("203.0.113.1")
    vip: ipaddress.IPv4Address = VIP
    lan_prefixlen: int = 25
    links_prefixlen: int = 30
    router_lan_address: ipaddress.IPv4Address = ipaddress.IPv4Address("198.51.100.254")
    """The router's leg on the LAN (``kernel`` only): the backends' gateway."""
    router_lan_if: str = "lan"
    router_bridge_port: str = "p-router"

    @property
    def service_port(self) -> int:
        """The VIP port of the TCP echo service (the flow scenarios' target):
        SERVICE_PORT, or the backends' own port with the kernel engine
        (direct server return keeps the port)."""
        return BACKEND_ECHO_PORT if self.kernel else SERVICE_PORT

    @property
    def namespaces(self) -> list[str]:
        """Every namespace the lab creates, in creation order."""
        return (
            [self.client_ns, self.router_ns, self.lan_ns]
            + ([self.mgmt_ns] + [m.ns for m in self.etcd] if self.etcd else [])
            + [n.ns for n in self.nodes]
            + [b.ns for b in self.backends]
            + ([self.arp_ns, self.probe_ns] if self.l2 else [])
        )

    @property
    def consensus(self) -> bool:
        return bool(self.etcd)

    def etcd_urls(self) -> list[str]:
        return [m.client_url for m in self.etcd]

    def etcd_member(self, name: str) -> EtcdMember:
        for member in self.etcd:
            if name in (member.name, member.ns):
                return member
        raise KeyError(f"no etcd member {name!r}")

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if name in (node.name, node.ns):
                return node
        raise KeyError(f"no node {name!r} (have {', '.join(n.name for n in self.nodes)})")

    def node_by_lan_address(self) -> dict[str, str]:
        """Backend-side source address -> node name: how a backend's reply
        tells which node forwarded the flow."""
        return {str(n.lan_address): n.name for n in self.nodes}

    def node_by_router_address(self) -> dict[str, str]:
        """Router's next hop address -> node name."""
        return {str(n.address): n.name for n in self.nodes}


def l2_node_address6(node: Node) -> ipaddress.IPv6Address:
    """L2 lab: node i's IPv6 address on the backend LAN."""
    return L2_PREFIX6.network_address + 0x80 + node.index


def plan(nodes: int = 3, backends: int = 3, bfd: bool = False,
         flow_survival: bool = False, consensus: bool = False,
         kernel: bool = False, l2: bool = False) -> Topology:
    """The address plan for ``nodes`` nodes and ``backends`` backends
    (``consensus``: plus ETCD_MEMBERS etcd members on the management segment;
    ``kernel``: the kernel engine's direct server return, see above;
    ``l2`` implies ``consensus``).

    Raises ValueError outside 1..MAX_NODES / 1..MAX_BACKENDS.
    """
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"nodes must be 1..{MAX_NODES}, not {nodes}")
    if not 1 <= backends <= MAX_BACKENDS:
        raise ValueError(f"backends must be 1..{MAX_BACKENDS}, not {backends}")
    base = ipaddress.IPv4Address("203.0.113.0")
    lan = ipaddress.IPv4Address("198.51.100.128")
    node_list = tuple(
        Node(
            index=i,
            name=f"lb{i}",
            ns=f"{NS_PREFIX}lb{i}",
            address=base + 4 * i + 2,
            router_address=base + 4 * i + 1,
            lan_address=lan + i,
            uplink_if="up0",
            router_if=f"lb{i}",
            lan_if="lan0",
            bridge_port=f"p-lb{i}",
        )
        for i in range(1, nodes + 1)
    )
    backend_list = tuple(
        Backend(
            index=j,
            name=f"be{j}",
            ns=f"{NS_PREFIX}be{j}",
            address=lan + 64 + j,
            lan_if="lan0",
            bridge_port=f"p-be{j}",
        )
        for j in range(1, backends + 1)
    )
    etcd = tuple(
        EtcdMember(index=k, name=f"etcd{k}", ns=f"{NS_PREFIX}etcd{k}",
                   address=MGMT_PREFIX.network_address + 16 + k,
                   mgmt_if="mgmt0", bridge_port=f"p-etcd{k}")
        for k in range(1, ETCD_MEMBERS + 1)
    ) if consensus or l2 else ()
    if kernel and flow_survival:
        raise ValueError("the kernel engine needs no flow survival (every node hashes a flow "
                         "to the same backend)")
    return Topology(nodes=node_list, backends=backend_list, bfd=bfd,
                    flow_survival=flow_survival, etcd=etcd, kernel=kernel, l2=l2)


def all_addresses(topo: Topology) -> list[ipaddress.IPv4Address]:
    """Every address the lab assigns (for the overlap check and tests)."""
    out = [topo.client_address, topo.router_client_address, topo.vip, FLOOD_ADDRESS]
    for n in topo.nodes:
        out += [n.address, n.router_address, n.lan_address]
    out += [b.address for b in topo.backends]
    if topo.kernel:
        out.append(topo.router_lan_address)
    if topo.consensus:
        out += [mgmt_address(n) for n in topo.nodes] + [m.address for m in topo.etcd]
    if topo.l2:
        out += [L2_VIP, L2_CLIENT, L2_PROBE]
    return out


def in_lab_prefixes(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(address in p for p in LAB_PREFIXES)
