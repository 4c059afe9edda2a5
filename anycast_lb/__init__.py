"""anycast-lb: an active-active BGP anycast L4 load balancer.

One node forwards TCP and UDP for its VIPs to a pool of backends, checks
their health, and announces each VIP's anycast prefix through ExaBGP only
while it can serve it. See docs/ and the README.
"""

__version__ = "0.1.0"
