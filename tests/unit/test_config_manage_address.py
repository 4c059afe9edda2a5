"""``services[].manage_address``: which VIPs the node puts on ``lo`` (pure)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from anycast_lb.config import parse_config
from anycast_lb.errors import ConfigError

CONSENSUS = {"endpoints": ["http://127.0.0.1:2379"], "cluster": "c1"}


def service(name: str, vip: str, port: int, **fields: Any) -> dict[str, Any]:
    return {"name": name, "vip": vip, "port": port,
            "backends": [{"address": "203.0.113.130", "port": 8080}], **fields}


def test_off_by_default() -> None:
    cfg = parse_config({"services": [service("web", "192.0.2.10", 80)]})
    assert cfg.services[0].manage_address is False and cfg.managed_vips == []


def test_each_managed_vip_once_in_config_order() -> None:
    cfg = parse_config({"services": [
        service("dns", "2001:db8::53", 53, protocol="udp", manage_address=True),
        service("web", "192.0.2.10", 80, manage_address=True),
        service("tls", "192.0.2.10", 443, manage_address=True),
        service("ntp", "192.0.2.123", 123, protocol="udp"),
    ]})
    assert cfg.managed_vips == [ipaddress.ip_address("2001:db8::53"),
                                ipaddress.ip_address("192.0.2.10")]


def test_one_service_asking_is_enough_for_a_shared_vip() -> None:
    cfg = parse_config({"services": [service("web", "192.0.2.10", 80),
                                     service("tls", "192.0.2.10", 443, manage_address=True)]})
    assert cfg.managed_vips == [ipaddress.ip_address("192.0.2.10")]


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_only_a_boolean(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"services": [service("web", "192.0.2.10", 80, manage_address=value)]})
    assert any(p.startswith("services[0].manage_address:") for p in info.value.problems)


def test_refused_with_l2_announcements() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"services": [service("web", "192.0.2.10", 80, manage_address=True,
                                           announce={"mode": "active_passive", "via": "l2"})],
                      "consensus": CONSENSUS, "election": {"interface": "eth1"}})
    assert any("manage_address cannot be combined with announce.via: l2" in p
               for p in info.value.problems)
