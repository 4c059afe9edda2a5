"""The kernel engine (``forwarding.engine: kernel``): Maglev in nftables with
direct server return (docs/kernel.md).

- :mod:`.render`: pure rendering of the ``netdev`` table, its diffs and drain phases;
- :mod:`.apply`: runs those scripts through ``nft -f -`` and checks kernel support;
- :mod:`.backend`: the backend-side set-up (VIP on ``lo``, ARP sysctls).
"""
