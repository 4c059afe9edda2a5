"""The shared part of the config, as pushed to etcd (pure).

A cluster shares its services (with their backends and health checks) and
the BGP announce attributes (``bgp.announce``: MED, communities, prepend,
withdraw_on_down, down_med). Everything else stays in each node's own file:
``node``, ``api``, the ``bgp`` session, ``forwarding``, ``cluster``,
``consensus``, ``drain``, ``election``.

The stored document is JSON::

    {"services": [...], "announce": {...} | null}

validated with the same pydantic models as a node file, so a document a
node accepts is one ``anycast-lb check-config`` accepts.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from anycast_lb.config import AnnounceConfig, NodeConfig, ServiceConfig, _format_errors, parse_config
from anycast_lb.errors import ConfigError

SHARED_KEYS = frozenset({"services", "announce"})


class Shared:
    """A validated shared document: ``services`` and ``announce`` (or None)."""

    def __init__(self, services: tuple[ServiceConfig, ...], announce: AnnounceConfig | None) -> None:
        self.services = services
        self.announce = announce

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Shared) and self.to_data() == other.to_data()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def to_data(self) -> dict[str, Any]:
        """The fields as written (``exclude_unset``): a default left out of
        the pushed file stays a default on every node, so settings derived
        when a field is unset (a UDP service's ``max_flows`` from the
        node's descriptor budget, :mod:`anycast_lb.limits`) are derived on
        each node as from its own file."""
        return {
            "services": [s.model_dump(mode="json", exclude_unset=True) for s in self.services],
            "announce": self.announce.model_dump(mode="json", exclude_unset=True)
            if self.announce else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_data(), sort_keys=True, separators=(",", ":"))


def from_data(data: Any, source: str = "<shared>") -> Shared:
    """Validate a shared document, or a whole node file (its shared part is
    taken: ``services`` and ``bgp.announce``). Raises ConfigError naming
    each problem's field path."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping"])
    if set(data) <= SHARED_KEYS:
        announce = data.get("announce")
        node = parse_config({"services": data.get("services")}, source)
        if announce is None:
            return Shared(tuple(node.services), None)
        try:
            return Shared(tuple(node.services), AnnounceConfig.model_validate(announce))
        except ValidationError as exc:
            raise ConfigError(source, [f"announce.{p}" for p in _format_errors(exc)]) from exc
    node = parse_config(data, source)
    return Shared(tuple(node.services), node.bgp.announce if node.bgp else None)


def from_json(text: str | bytes, source: str = "<shared>") -> Shared:
    """Parse a stored document. Raises ConfigError for bad JSON or content."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(source, [f"(top level): not JSON: {exc}"]) from exc
    return from_data(data, source)


def merge(node: NodeConfig, shared: Shared, source: str = "<merged>") -> NodeConfig:
    """The node's config with the shared part replaced, validated whole
    (VIP families against the BGP session, flow survival limits...).
    Announce attributes apply only to a node with a ``bgp`` section.
    Raises ConfigError: the node then refuses the revision whole."""
    # Only the fields set in either file: a default must stay a default
    # (limits derive unset caps per node; an explicit one is checked whole).
    data = node.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    data["services"] = [s.model_dump(mode="json", exclude_unset=True, exclude_none=True)
                        for s in shared.services]
    if shared.announce is not None and "bgp" in data:
        data["bgp"]["announce"] = shared.announce.model_dump(mode="json", exclude_unset=True)
    return parse_config(data, source)
