"""The key layout under ``/anycast-lb/<cluster>/`` (pure; docs/consensus.md).

::

    config/current                       {"revision": N}          no lease
    config/revisions/<N, 10 digits>      {"revision", "based_on", "time",
                                          "author", "message", "config"}
    members/<node>                       {"name", "api", "lan", "version",
                                          "started"}               node lease
    votes/<service>/<backend>/<node>     "up" | "down"            node lease
    drain/slots/<i>                      {"node", "since"}         node lease
    owners/...                           reserved (L2 VIP ownership)

``N`` is the config revision: 1 for the first push, +1 for each push or
rollback. It is distinct from etcd's own revision (which counts every
write, votes included). Backends are named ``addr:port`` (``[v6]:port``),
as in the Maglev table.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

ROOT = "/anycast-lb"


def client_target(url: str) -> str:
    """``http://127.0.0.1:2379`` -> ``127.0.0.1:2379``; ValueError for any
    other shape. IPv4 literals only: the client reaches several members
    through one gRPC ``ipv4:`` target (round-robin), which takes no names."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = ipaddress.IPv4Address(parts.hostname or "")
    except ValueError as exc:
        raise ValueError(f"{url!r}: expected http://IPV4:PORT ({exc})") from None
    if (parts.scheme != "http" or port is None or port == 0 or parts.path not in ("", "/")
            or parts.query or parts.fragment or parts.username is not None):
        raise ValueError(f"{url!r}: expected http://IPV4:PORT")
    return f"{host}:{port}"


@dataclass(frozen=True)
class Layout:
    cluster: str

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.cluster}/"

    @property
    def current(self) -> str:
        return f"{self.base}config/current"

    @property
    def revisions(self) -> str:
        return f"{self.base}config/revisions/"

    def revision(self, n: int) -> str:
        return f"{self.revisions}{n:010d}"

    @property
    def members(self) -> str:
        return f"{self.base}members/"

    def member(self, node: str) -> str:
        return f"{self.members}{node}"

    @property
    def votes(self) -> str:
        return f"{self.base}votes/"

    def vote(self, service: str, backend: str, node: str) -> str:
        return f"{self.votes}{service}/{backend}/{node}"

    @property
    def drain_slots(self) -> str:
        return f"{self.base}drain/slots/"

    def drain_slot(self, index: int) -> str:
        return f"{self.drain_slots}{index}"

    @property
    def owners(self) -> str:
        return f"{self.base}owners/"

    def revision_number(self, key: str) -> int | None:
        """``.../config/revisions/0000000007`` -> 7; None for other keys."""
        if not key.startswith(self.revisions):
            return None
        tail = key[len(self.revisions):]
        return int(tail) if tail.isdigit() else None

    def member_name(self, key: str) -> str | None:
        if not key.startswith(self.members):
            return None
        return key[len(self.members):] or None

    def vote_parts(self, key: str) -> tuple[str, str, str] | None:
        """``votes/<service>/<backend>/<node>`` -> (service, backend, node)."""
        if not key.startswith(self.votes):
            return None
        parts = key[len(self.votes):].split("/")
        if len(parts) != 3 or not all(parts):
            return None
        return parts[0], parts[1], parts[2]

    def slot_index(self, key: str) -> int | None:
        if not key.startswith(self.drain_slots):
            return None
        tail = key[len(self.drain_slots):]
        return int(tail) if tail.isdigit() else None


def json_object(value: bytes) -> dict[str, object]:
    """A key's value as a JSON object; ``{}`` for anything else (not JSON,
    or JSON that is not an object): a reader skips what it cannot use."""
    try:
        doc = json.loads(value)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
