"""The kernel half of the L2 fence: nftables set elements with timeouts.

The process fence (``election/machine.py``) drops a VIP at its fencing
deadline, but only a running process can do that: an owner that is killed
(SIGKILL, OOM) or hangs (SIGSTOP, a stuck event loop) leaves the VIP on its
interface, and its kernel keeps answering ARP and Neighbor Solicitations for
it while another node owns it: a split brain.

So the kernel answers for an elected VIP only while an nftables set element
for it is alive, and the element's timeout is the owner's fencing deadline:

- ``table arp anycast_lb_l2``: drop ARP requests for an elected IPv4 VIP
  unless it is in set ``alive4``;
- ``table ip6 anycast_lb_l2``: drop Neighbor Solicitations whose target
  (ICMPv6 bytes 8-23, RFC 4861 section 4.3) is an elected IPv6 VIP unless
  it is in set ``alive6``.

:meth:`KernelFence.hold` sets an element to expire at a monotonic deadline
(ms precision); the owner calls it at every take and while it holds the VIP
(so each renewed lease moves the expiry), :meth:`release` deletes it. A
process that stops calling leaves elements that expire by themselves at the
deadline, before any other node can be elected.

Rules go through libnftables (``libnftables.so.1``, the library behind
``nft``) in this process: no tool is spawned, a call takes about 0.1 ms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import threading
import time
from collections.abc import Iterable

from anycast_lb.errors import L2Error

TABLE = "anycast_lb_l2"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _v6_int(vip: ipaddress.IPv6Address) -> str:
    return f"0x{int(vip):032x}"


def _element(vip: IPAddress) -> tuple[str, str]:
    """(family set, element literal) for ``vip``."""
    if isinstance(vip, ipaddress.IPv4Address):
        return f"arp {TABLE} alive4", str(vip)
    return f"ip6 {TABLE} alive6", _v6_int(vip)


def ruleset(vips: Iterable[IPAddress]) -> str:
    """The fence's tables for ``vips`` (an nft script; replaces any earlier
    ones, so a restarted node starts with no element: it answers for none)."""
    v4 = sorted(str(v) for v in vips if v.version == 4)
    v6 = sorted(_v6_int(v) for v in vips if isinstance(v, ipaddress.IPv6Address))
    out = [f"table arp {TABLE} {{}}", f"delete table arp {TABLE}",
           f"table ip6 {TABLE} {{}}", f"delete table ip6 {TABLE}"]
    if v4:
        out.append(f"""table arp {TABLE} {{
  set alive4 {{
    type ipv4_addr
    flags timeout
  }}
  chain in {{
    type filter hook input priority 0; policy accept;
    arp operation request arp daddr ip {{ {", ".join(v4)} }} arp daddr ip != @alive4 drop
  }}
}}""")
    if v6:
        out.append(f"""table ip6 {TABLE} {{
  set alive6 {{
    typeof @th,64,128
    flags timeout
  }}
  chain in {{
    type filter hook input priority 0; policy accept;
    icmpv6 type nd-neighbor-solicit @th,64,128 {{ {", ".join(v6)} }} @th,64,128 != @alive6 drop
  }}
}}""")
    return "\n".join(out) + "\n"


class KernelFence:
    """See the module docstring. Every method raises :class:`L2Error` when
    libnftables is missing or refuses a command (root or ``CAP_NET_ADMIN``)."""

    def __init__(self) -> None:
        self._lib: ctypes.CDLL | None = None
        self._ctx: int | None = None
        self._lock = threading.Lock()
        self._vips: list[IPAddress] = []

    def _open(self) -> tuple[ctypes.CDLL, int]:
        if self._lib is None or self._ctx is None:
            name = ctypes.util.find_library("nftables") or "libnftables.so.1"
            try:
                lib = ctypes.CDLL(name)
            except OSError as exc:
                raise L2Error(f"via: l2 needs libnftables ({name}): {exc}") from exc
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            ctx = lib.nft_ctx_new(0)
            if not ctx:
                raise L2Error("libnftables: nft_ctx_new failed")
            self._lib, self._ctx = lib, ctx
        return self._lib, self._ctx

    def run(self, script: str) -> None:
        """Run an nft script in one transaction. Raises L2Error."""
        with self._lock:
            lib, ctx = self._open()
            # Fresh buffers per command: libnftables appends otherwise.
            lib.nft_ctx_buffer_error(ctx)
            lib.nft_ctx_buffer_output(ctx)
            rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
            error = lib.nft_ctx_get_error_buffer(ctx) or b""
        if rc != 0:
            raise L2Error(f"nftables: {error.decode(errors='replace').strip()[:500]}")

    def setup(self, vips: Iterable[IPAddress]) -> None:
        """Create (or replace) the fence tables for ``vips``, with no element."""
        self._vips = list(vips)
        self.run(ruleset(self._vips))

    def hold(self, vip: IPAddress, until: float, now: float | None = None) -> bool:
        """Let the kernel answer for ``vip`` until the monotonic time
        ``until`` (s). False (and the element removed) when ``until`` has
        passed."""
        now = time.monotonic() if now is None else now
        left_ms = int((until - now) * 1000)
        where, element = _element(vip)
        if left_ms < 1:
            self.release(vip)
            return False
        # Delete and add in one transaction: an add does not move the
        # timeout of an element that exists.
        self.run(f"add element {where} {{ {element} timeout 1h }}\n"
                 f"delete element {where} {{ {element} }}\n"
                 f"add element {where} {{ {element} timeout {left_ms}ms }}\n")
        return True

    def release(self, vip: IPAddress) -> None:
        """Stop the kernel answering for ``vip`` (idempotent)."""
        where, element = _element(vip)
        self.run(f"add element {where} {{ {element} timeout 1ms }}\n"
                 f"delete element {where} {{ {element} }}\n")

    def close(self) -> None:
        """Free the library context. The tables stay: a stopped node keeps
        answering for no elected VIP; the next start replaces them."""
        with self._lock:
            if self._lib is not None and self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
            self._lib = self._ctx = None
