"""Health-gated BGP announcements through ExaBGP.

::

    node (policy + damping, pure)          ExaBGP child (supervised)
        | set_routes()                         ^ stdin: announce/withdraw lines
        v                                      | stdout: done acks, neighbor-changes
    speaker  <== UNIX socket, JSON lines ==>  announcer (ExaBGP's API process)

- :mod:`.policy`   which routes to announce (pure)
- :mod:`.damping`  origin-side flap damping, RFC 2439 section 4.2 idea (pure)
- :mod:`.render`   ExaBGP API lines, attribute safety (pure)
- :mod:`.wire`     the node <-> announcer protocol, ExaBGP's stdin lines (pure)
- :mod:`.exabgp`   ExaBGP config, environment, version, supervisor
- :mod:`.announcer` the API process ExaBGP runs
- :mod:`.speaker`  the node side: socket server, heartbeat, status
"""
