"""The VIPs a node puts on lo (manage_address), on a small address table."""

from __future__ import annotations

import ipaddress

import pytest

from anycast_lb.errors import L2Error
from anycast_lb.loopback import IPAddress, LoopbackVips

A = ipaddress.ip_address("203.0.113.10")
B = ipaddress.ip_address("2001:db8::10")
C = ipaddress.ip_address("203.0.113.11")


class Table:
    """A complete AddressTable: a set of addresses, with failures on demand."""

    def __init__(self, present: set[IPAddress], fail_add: IPAddress | None = None,
                 fail_remove: IPAddress | None = None) -> None:
        self.present = set(present)
        self.fail_add, self.fail_remove = fail_add, fail_remove
        self.removed: list[IPAddress] = []

    async def add(self, vip: IPAddress) -> bool:
        if vip == self.fail_add:
            raise L2Error(f"add {vip} on lo: operation not permitted")
        if vip in self.present:
            return False
        self.present.add(vip)
        return True

    async def remove(self, vip: IPAddress) -> bool:
        if vip == self.fail_remove:
            raise L2Error(f"del {vip} on lo: operation not permitted")
        self.removed.append(vip)
        if vip not in self.present:
            return False
        self.present.discard(vip)
        return True


async def test_only_the_vips_it_added_are_taken_off_last_first() -> None:
    table = Table({B})  # B was on lo before the node started
    vips = LoopbackVips([A, B, C], table)
    await vips.add()
    assert vips.added == [A, C] and table.present == {A, B, C}
    await vips.remove()
    assert table.removed == [C, A] and table.present == {B} and vips.added == []


async def test_a_failed_add_leaves_the_earlier_ones_for_remove() -> None:
    table = Table(set(), fail_add=C)
    vips = LoopbackVips([A, B, C], table)
    with pytest.raises(L2Error):
        await vips.add()
    assert vips.added == [A, B]
    await vips.remove()
    assert table.present == set()


async def test_a_failed_remove_is_logged_and_the_rest_still_go() -> None:
    table = Table(set(), fail_remove=B)
    vips = LoopbackVips([A, B, C], table)
    await vips.add()
    await vips.remove()  # never raises
    assert table.present == {B} and table.removed == [C, A] and vips.added == []

