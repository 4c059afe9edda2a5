"""The kernel engine (``forwarding.engine: kernel``): Maglev in nftables with
direct server return (docs/kernel.md).

- :mod:`.render`: pure rendering of the ``netdev`` table, its diffs, drain
  phases and per-backend counters;
- :mod:`.decide`: pure: what a service's current and previous tables hold,
  from health and drains;
- :mod:`.settings`: pure: the table's settings and seeds from the node config;
- :mod:`.apply`: runs the scripts through ``nft -f -``, checks kernel
  support and that backends are on the L2 segment;
- :mod:`.backend`: the backend-side set-up (VIP on ``lo``, ARP sysctls).
"""
