"""Flow survival: established connections outlive drains and ECMP changes.

Nodes share which flows they own over a node LAN and steer packets of a
peer's flows to it in the kernel (docs/cluster.md). One concern per module:

- ``ownership``: pure state: own flows, peers' claims, sequence and
  snapshot rules, peer expiry, the steering map and its diff.
- ``wire``: the sync datagrams (pure encode/decode).
- ``nft``: the nftables ruleset and its updates (pure rendering).
- ``routing``: policy rules, routes and sysctls (pure plans).
- ``kernel``: runs ``nft -f -`` and ``ip`` (the only I/O on the kernel).
- ``sync``: the UDP endpoint on the node LAN.
- ``cluster``: the ``Cluster`` facade the node wires in.
"""

from __future__ import annotations

from anycast_lb.cluster.cluster import Cluster, DataPath

__all__ = ["Cluster", "DataPath"]
