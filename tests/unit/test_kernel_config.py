"""``forwarding.engine: kernel``: what the config accepts, refuses, and draws."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest

from anycast_lb.config import parse_config
from anycast_lb.errors import ConfigError
from anycast_lb.kernel import render
from anycast_lb.kernel.apply import off_link
from anycast_lb.kernel.settings import kernel_settings, table_marks, up_backends

GOOD: dict[str, Any] = {
    "forwarding": {"engine": "kernel", "kernel": {"interface": "lan0"}},
    "services": [
        {"name": "web", "vip": "192.0.2.10", "port": 80,
         "backends": [{"address": "198.51.100.1", "port": 80},
                      {"address": "198.51.100.2", "port": 80, "weight": 2}]},
        {"name": "dns", "vip": "192.0.2.10", "port": 53, "protocol": "udp",
         "maglev_table_size": 251, "backends": [{"address": "198.51.100.3", "port": 53}]},
    ],
}


def _with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    for path, value in changes.items():
        target = data
        keys = path.split("__")
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[keys[-1]] = value
    return data


def test_good_config_draws_settings() -> None:
    cfg = parse_config(copy.deepcopy(GOOD))
    s = kernel_settings(cfg)
    assert (s.table, s.interface) == ("anycast_lb_fwd", "lan0")
    web, dns = s.services
    assert (web.index, web.port, web.protocol, web.size) == (0, 80, "tcp", 65537)
    assert (dns.index, dns.port, dns.protocol, dns.size) == (1, 53, "udp", 251)
    assert web.seed == render.derive_seed(ipaddress.IPv4Address("192.0.2.10"), 80, "tcp", 65537)
    assert (web.flow_timeout, web.flow_map_size) == (300, 262144)
    # Weights count: backend .2 has twice the slots of .1 (within Maglev's rounding).
    marks = table_marks(up_backends(cfg.services[0], {"198.51.100.1:80", "198.51.100.2:80"}), 65537)
    one = marks.count(int(ipaddress.IPv4Address("198.51.100.1")))
    assert len(marks) == 65537 and 0.3 < one / 65537 < 0.37
    assert table_marks([], 65537) == ()


@pytest.mark.parametrize(("data", "message"), [
    (_with(forwarding={"engine": "kernel"}), "needs a forwarding.kernel section"),
    (_with(forwarding__workers=2), "forwarding.workers: 2 cannot be combined"),
    (_with(services__0__proxy_protocol=True), "'web': proxy_protocol cannot be sent"),
    (_with(services__0__backends=[{"address": "198.51.100.1", "port": 8080}]),
     "backend 198.51.100.1:8080: forwarding.engine: kernel forwards at L2"),
    (_with(services__0__vip="2001:db8::10"), "supports IPv4 VIPs only"),
    (_with(services__0__backends=[{"address": "2001:db8::1", "port": 80}]),
     "supports IPv4 backends only"),
    (_with(forwarding={"engine": "relay", "kernel": {"interface": "lan0"}}),
     "forwarding.kernel is only read with forwarding.engine: kernel"),
    (_with(forwarding__kernel={"interface": "lan 0"}), "forwarding.kernel.interface"),
    (_with(forwarding__kernel={"interface": "lan0", "table": "bad-name"}),
     "forwarding.kernel.table"),
])
def test_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert message in str(info.value)


def test_settings_need_the_kernel_engine() -> None:
    with pytest.raises(ValueError, match="not kernel"):
        kernel_settings(parse_config(_with(forwarding={"engine": "relay"})))


@pytest.mark.parametrize(("route", "expected"), [
    ({"dst": "198.51.100.1", "dev": "lan0", "prefsrc": "198.51.100.9"}, None),
    ({"dst": "198.51.100.1", "dev": "eth1"}, "routed via 'eth1', not 'lan0'"),
    ({"dst": "198.51.100.1", "dev": "lan0", "gateway": "198.51.100.254"},
     "behind gateway 198.51.100.254 (not on the L2 segment)"),
])
def test_off_link(route: dict[str, object], expected: str | None) -> None:
    assert off_link("lan0", route) == expected


def test_backend_setup_prints_the_direct_server_return_set_up() -> None:
    from click.testing import CliRunner

    from anycast_lb.cli import main

    result = CliRunner().invoke(main, ["backend-setup", "--vip", "192.0.2.10",
                                       "--vip", "192.0.2.11"])
    assert result.exit_code == 0
    assert result.output.splitlines()[1:] == [
        "ip address replace 192.0.2.10/32 dev lo",
        "ip address replace 192.0.2.11/32 dev lo",
        "sysctl -w net.ipv4.conf.all.arp_ignore=1",
        "sysctl -w net.ipv4.conf.all.arp_announce=2",
    ]
    refused = CliRunner().invoke(main, ["backend-setup", "--vip", "2001:db8::1"])
    assert refused.exit_code == 2 and "an IPv4 address" in refused.output
