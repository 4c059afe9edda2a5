"""The backend side of direct server return. Pure: what to run, not running it.

With ``forwarding.engine: kernel`` a packet reaches the backend unchanged,
addressed to the VIP, and the backend answers the client directly from the
VIP. So each backend must:

- hold the VIP on ``lo`` (a /32: it accepts packets for it, and answers
  from it, without claiming the VIP on its LAN);
- never answer ARP for it (``arp_ignore=1``: answer only for addresses of
  the interface the request came in on, and the VIP is on ``lo``), or it
  would draw the VIP's traffic away from the load balancer;
- never source ARP from it (``arp_announce=2``: use the best local address
  of the outgoing interface), or neighbours would learn the VIP at the
  backend's MAC.

These are the Linux Virtual Server's "direct routing" settings (the
kernel's Documentation/networking/ip-sysctl.rst describes both sysctls).
The kernel takes the larger of ``conf.all`` and ``conf.<interface>``, so
setting ``all`` covers every interface.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

SYSCTLS = (("net/ipv4/conf/all/arp_ignore", 1), ("net/ipv4/conf/all/arp_announce", 2))
"""(key under /proc/sys, value) the backend needs."""


def vip_argv(vip: ipaddress.IPv4Address) -> list[str]:
    """``ip`` command putting the VIP on ``lo`` (``replace``: no error when present)."""
    return ["ip", "address", "replace", f"{vip}/32", "dev", "lo"]


def script(vips: Sequence[ipaddress.IPv4Address]) -> str:
    """The set-up as shell lines, for a backend's provisioning (run as root;
    persist the sysctls in /etc/sysctl.d and the addresses in the network
    configuration to survive a reboot)."""
    lines = [f"# anycast-lb backend set-up for VIP {', '.join(map(str, vips))} "
             "(direct server return)"]
    lines += [" ".join(vip_argv(vip)) for vip in vips]
    lines += [f"sysctl -w {key.replace('/', '.')}={value}" for key, value in SYSCTLS]
    return "\n".join(lines) + "\n"
