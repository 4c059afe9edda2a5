"""Rules for values that reach a wire, a header or a command line (pure).

Each rule is one function, used both by the config model
(:mod:`anycast_lb.config`, so ``check-config`` refuses what the runtime
would) and by the code that writes the value out (:mod:`anycast_lb.bgp.render`
for ExaBGP API lines, :mod:`anycast_lb.bgp.exabgp` for the ``process``
name, :mod:`anycast_lb.health.probes` for HTTP checks). There is no second
copy to drift: a value the config accepts is a value the writer accepts.

Every rule returns its input unchanged or raises ValueError naming the
value (``repr``, so a control character shows as ``\\n``, never raw).
Digits are ASCII ``[0-9]`` only (``str.isdigit`` and ``int`` accept
``"٦٥١٠٠"``); patterns are matched whole with :func:`re.fullmatch` (``$``
also matches before a trailing newline).
"""

from __future__ import annotations

import re

MAX_U32 = 2**32 - 1
"""Largest MED (RFC 4271 section 5.1.4) and 4-octet AS number (RFC 6793)."""
MAX_AS_PATH_PREPEND = 10
"""Most times ``local_as`` is prepended to the AS path."""
MAX_COMMUNITY_HALF = 65535
"""Each half of an RFC 1997 community ``ASN:VALUE`` is 16 bits."""

MAX_COMMUNITIES = 32
"""Most communities of each kind per announcement (a whole UPDATE is at
most 4096 bytes, RFC 4271 section 4; 32 large communities take 384)."""

NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
"""Node and service names: they name the ExaBGP ``process``, metrics labels
and log fields, so only characters that need no quoting anywhere."""

_COMMUNITY = re.compile(r"([0-9]{1,5}):([0-9]{1,5})")
_LARGE_COMMUNITY = re.compile(r"([0-9]{1,10}):([0-9]{1,10}):([0-9]{1,10})")
_EXTENDED_COMMUNITY = re.compile(
    r"(target|origin):([0-9]{1,10}|[0-9]{1,3}(?:\.[0-9]{1,3}){3}):([0-9]{1,10})"
)
LARGE_COMMUNITY_PATTERN = "^[0-9]{1,10}:[0-9]{1,10}:[0-9]{1,10}$"
EXTENDED_COMMUNITY_PATTERN = (
    "^(target|origin):([0-9]{1,10}|[0-9]{1,3}(\\.[0-9]{1,3}){3}):[0-9]{1,10}$"
)
_NAME = re.compile(NAME_PATTERN)
_DNS_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
# RFC 3986 section 3.2.2: IP-literal or reg-name (unreserved, pct-encoded,
# sub-delims), then an optional port; the Host header is uri-host [":" port]
# (RFC 9110 section 7.2).
_HTTP_HOST = re.compile(
    r"(?:\[[0-9A-Fa-f:.]{2,45}\]|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2}){1,255})"
    r"(?::[0-9]{1,5})?"
)
# An origin-form request target (RFC 9110 section 7.1): "/" then visible
# ASCII; anything else must be percent-encoded by the operator.
_HTTP_PATH = re.compile(r"/[\x21-\x7e]{0,2047}")
# C0, DEL, C1 and the Unicode line and paragraph separators: each can end a
# line in a protocol, a log or a terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def has_control(text: str) -> bool:
    """True if ``text`` holds a control character (C0, DEL, C1, U+2028/9)."""
    return _CONTROL.search(text) is not None


def check_uint(name: str, value: object, low: int, high: int) -> int:
    """Return ``value`` if it is an int in ``low..high``; ValueError otherwise.

    ``bool`` is refused although it is an ``int`` subclass: ``true`` as a MED
    or a port is a mistake, not 1.
    """
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer {low}..{high}, got {value!r}")
    return value


def check_community(value: object) -> str:
    """Return ``value`` if it is an RFC 1997 community ``ASN:VALUE`` (0-65535 each).

    Raises ValueError otherwise: non-ASCII digits, any whitespace, control
    character, bracket or trailing newline (each could break or inject an
    ExaBGP API command).
    """
    if not isinstance(value, str):
        raise ValueError(f"community must be a string, got {value!r}")
    match = _COMMUNITY.fullmatch(value)
    if not match or any(int(part) > MAX_COMMUNITY_HALF for part in match.groups()):
        raise ValueError(f"{value!r} is not a community ASN:VALUE (0-65535 each)")
    return value


def check_large_community(value: object) -> str:
    """Return ``value`` if it is an RFC 8092 large community ``ASN:DATA1:DATA2``.

    Each part is 0..4294967295 (RFC 8092 section 3), ASCII digits only.
    Raises ValueError otherwise (whitespace, brackets, control characters or
    a trailing newline would break or inject an ExaBGP API command).
    """
    if not isinstance(value, str):
        raise ValueError(f"large community must be a string, got {value!r}")
    match = _LARGE_COMMUNITY.fullmatch(value)
    if not match or any(int(part) > MAX_U32 for part in match.groups()):
        raise ValueError(
            f"{value!r} is not a large community ASN:DATA1:DATA2 (0-4294967295 each)"
        )
    return value


def check_extended_community(value: object) -> str:
    """Return ``value`` if it is a route target or route origin extended community.

    ``target:ADMIN:N`` or ``origin:ADMIN:N``, as ExaBGP writes them, one of
    the three RFC 4360 / RFC 5668 layouts (type then 6 octets):

    - ADMIN an AS number 0..65535, N 0..4294967295 (two-octet AS specific,
      RFC 4360 section 3.1);
    - ADMIN an AS number 65536..4294967295, N 0..65535 (four-octet AS
      specific, RFC 5668 section 2);
    - ADMIN an IPv4 address, N 0..65535 (IPv4 address specific, RFC 4360
      section 3.2).

    Raises ValueError otherwise (other types, ExaBGP's ``L`` suffix or hex
    forms, whitespace or any character that could break an API line).
    """
    if not isinstance(value, str):
        raise ValueError(f"extended community must be a string, got {value!r}")
    match = _EXTENDED_COMMUNITY.fullmatch(value)
    bad = ValueError(
        f"{value!r} is not an extended community target:ADMIN:N or origin:ADMIN:N "
        "(ADMIN an AS 0-65535 with N 0-4294967295, or an AS 65536-4294967295 or an "
        "IPv4 address with N 0-65535)"
    )
    if not match:
        raise bad
    admin, number = match.group(2), int(match.group(3))
    if "." in admin:
        if any(int(octet) > 255 or (len(octet) > 1 and octet[0] == "0")
               for octet in admin.split(".")):
            raise bad
        limit = MAX_COMMUNITY_HALF
    elif int(admin) <= MAX_COMMUNITY_HALF:
        limit = MAX_U32
    elif int(admin) <= MAX_U32:
        limit = MAX_COMMUNITY_HALF
    else:
        raise bad
    if number > limit:
        raise bad
    return value


def check_dns_name(value: str) -> str:
    """Return ``value`` if it can be sent as a DNS query name; ValueError otherwise.

    Dot-separated labels of 1-63 ASCII letters, digits, ``-`` or ``_``
    (``_`` for SRV-style names), at most 253 characters without the
    optional trailing dot (RFC 1035 section 2.3.4); ``.`` alone is the root.
    """
    name = value[:-1] if value.endswith(".") else value
    if value == ".":
        return value
    if not name or len(name) > 253 or not all(
        _DNS_LABEL.fullmatch(label) for label in name.split(".")
    ):
        raise ValueError(
            f"{value!r} is not a DNS name: labels of 1-63 of A-Z a-z 0-9 - _, "
            "separated by dots, 253 characters at most"
        )
    return value


def check_name(value: str) -> str:
    """Return ``value`` if it matches :data:`NAME_PATTERN` whole; ValueError otherwise."""
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a name: 1-63 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
        )
    return value


def check_http_host(value: str) -> str:
    """Return ``value`` if it can be sent as a Host header; ValueError otherwise.

    ``host`` or ``host:port``, host an RFC 3986 reg-name or ``[IPv6]``
    (RFC 9110 section 7.2). CR, LF and every other control character are
    refused: they would end the header and inject another.
    """
    if not _HTTP_HOST.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a Host header value: host or host:port "
            "(RFC 3986 reg-name or [IPv6], no spaces or control characters)"
        )
    return value


def check_http_path(value: str) -> str:
    """Return ``value`` if it is a request path: ``/`` then visible ASCII.

    Raises ValueError for spaces, control characters or non-ASCII (which
    must be percent-encoded), or a path over 2048 characters.
    """
    if not _HTTP_PATH.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a request path: '/' then at most 2047 visible ASCII "
            "characters (percent-encode spaces and anything else)"
        )
    return value


def check_argument(value: str) -> str:
    """Return ``value`` if it can be one argv word or file path; ValueError otherwise.

    Empty words and control characters are refused (NUL cannot reach
    ``execve`` or ``open`` at all; the others would forge log lines).
    """
    if not value or has_control(value):
        raise ValueError(f"{value!r} must be non-empty and hold no control characters")
    return value
