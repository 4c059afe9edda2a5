"""The flow key: how a TCP flow is named between the data path and the cluster.

A bottom-layer module (it imports nothing of this project), so that
:mod:`anycast_lb.cluster` and :mod:`anycast_lb.forward` both depend on it and
not on each other.
"""

from __future__ import annotations

from collections.abc import Callable

FlowKey = tuple[str, int, str, int]
"""A TCP flow as its owner publishes it: (client address, client port, VIP,
VIP port), addresses as text."""

FlowHook = Callable[[bool, FlowKey], None]
"""Called with (True, key) when a client connection is accepted and
(False, key) when it closes; the relay engine calls it on its own thread."""

__all__ = ["FlowHook", "FlowKey"]
