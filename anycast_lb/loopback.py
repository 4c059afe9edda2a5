"""The VIPs a node puts on ``lo`` itself (``manage_address: true``).

A VIP on ``lo`` is local to the node (it accepts and answers from it)
whatever the node's interfaces; routers reach it by BGP. The node adds them
before its listeners bind and takes off, after the listeners closed, only
the ones it added: a VIP already on ``lo`` at start is left there.

Log events: ``vip.address_added``, ``vip.address_present``,
``vip.address_removed``, ``vip.address_remove_failed`` (error), each with
``interface`` and ``vip``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Protocol

from anycast_lb import log
from anycast_lb.errors import AnycastLBError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LOOPBACK = "lo"
"""Where ``manage_address`` puts a VIP."""


class AddressTable(Protocol):
    """The addresses of one interface (:class:`anycast_lb.election.l2.VipAddresses`)."""

    async def add(self, vip: IPAddress) -> bool:
        """Add ``vip``; False when it was already there. Raises L2Error."""
        ...

    async def remove(self, vip: IPAddress) -> bool:
        """Remove ``vip``; False when it was already gone. Raises L2Error."""
        ...


class LoopbackVips:
    """``vips`` on ``lo``. ``table`` defaults to rtnetlink on ``lo``
    (pyroute2, Linux only), made at the first use."""

    def __init__(self, vips: Sequence[IPAddress], table: AddressTable | None = None) -> None:
        self._vips = tuple(vips)
        self._table = table
        self.added: list[IPAddress] = []
        """VIPs this node put on ``lo`` (the only ones :meth:`remove` takes off)."""

    def _lo(self) -> AddressTable:
        if self._table is None:
            from anycast_lb.election.l2 import VipAddresses  # pyroute2: Linux only

            self._table = VipAddresses(LOOPBACK)
        return self._table

    async def add(self) -> None:
        """Put each VIP on ``lo``; one that is already there is left alone
        (and left at :meth:`remove`). Raises L2Error (no ``CAP_NET_ADMIN``,
        say); the ones added before it are in :attr:`added`, for
        :meth:`remove`."""
        if not self._vips:
            return
        lo = self._lo()
        for vip in self._vips:
            if await lo.add(vip):
                self.added.append(vip)
                log.event("vip.address_added", interface=LOOPBACK, vip=str(vip))
            else:
                log.event("vip.address_present", interface=LOOPBACK, vip=str(vip))

    async def remove(self) -> None:
        """Take off ``lo`` the VIPs :meth:`add` put there, last added first.
        A failure is logged, never raised (the node is stopping, and another
        error may be on its way out)."""
        if not self.added:
            return
        lo = self._lo()
        while self.added:
            vip = self.added.pop()
            try:
                await lo.remove(vip)
            except AnycastLBError as exc:
                log.warning("vip.address_remove_failed", error=str(exc), interface=LOOPBACK,
                            vip=str(vip))
            else:
                log.event("vip.address_removed", interface=LOOPBACK, vip=str(vip))
