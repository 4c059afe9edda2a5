"""The live-apply plan: old config + new config -> actions (pure)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from anycast_lb.config import NodeConfig, parse_config
from anycast_lb.liveapply import (
    Action,
    AddBackend,
    AddService,
    ChangeAnnounce,
    ChangeHealth,
    ChangeServiceSettings,
    NodeLocalChange,
    RemoveBackend,
    RemoveService,
    Reweight,
    plan,
)

BASE: dict[str, Any] = {
    "node": {"name": "lb1"},
    "bgp": {"local_as": 65001, "router_id": "192.0.2.10", "local_address": "192.0.2.10",
            "peers": [{"address": "192.0.2.1", "peer_as": 65000}]},
    "services": [
        {"name": "web", "vip": "198.51.100.10", "port": 80,
         "backends": [{"address": "10.0.0.1", "port": 80}, {"address": "10.0.0.2", "port": 80}]},
        {"name": "dns", "vip": "198.51.100.11", "port": 53, "protocol": "udp",
         "backends": [{"address": "10.0.1.1", "port": 53}]},
    ],
}


def cfg(change: Callable[[dict[str, Any]], None] | None = None) -> NodeConfig:
    data = copy.deepcopy(BASE)
    if change is not None:
        change(data)
    return parse_config(data)


def web(d: dict[str, Any]) -> dict[str, Any]:
    return d["services"][0]  # type: ignore[no-any-return]


def kinds(actions: list[Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_same_config_no_action() -> None:
    assert plan(cfg(), cfg()) == []


def test_add_and_remove_backend_make_before_break() -> None:
    def swap(d: dict[str, Any]) -> None:
        web(d)["backends"] = [{"address": "10.0.0.1", "port": 80}, {"address": "10.0.0.3", "port": 80}]
    actions = plan(cfg(), cfg(swap))
    assert kinds(actions) == ["AddBackend", "RemoveBackend"]
    assert isinstance(actions[0], AddBackend) and actions[0].backend.key == "10.0.0.3:80"
    assert actions[1] == RemoveBackend("web", "10.0.0.2:80")


def test_reweight() -> None:
    def heavier(d: dict[str, Any]) -> None:
        web(d)["backends"][1]["weight"] = 5
    assert plan(cfg(), cfg(heavier)) == [Reweight("web", "10.0.0.2:80", 1, 5)]


def test_add_and_remove_service() -> None:
    def add(d: dict[str, Any]) -> None:
        d["services"].append({"name": "api", "vip": "198.51.100.12", "port": 443,
                              "backends": [{"address": "10.0.2.1", "port": 443}]})
    actions = plan(cfg(), cfg(add))
    assert kinds(actions) == ["AddService"]
    assert isinstance(actions[0], AddService) and actions[0].service.name == "api"
    assert plan(cfg(add), cfg()) == [RemoveService("api")]


@pytest.mark.parametrize("field,value", [("vip", "198.51.100.20"), ("port", 8080)])
def test_listener_change_is_add_then_remove(field: str, value: Any) -> None:
    def move(d: dict[str, Any]) -> None:
        web(d)[field] = value
    actions = plan(cfg(), cfg(move))
    assert kinds(actions) == ["AddService", "RemoveService"]
    assert actions[1] == RemoveService("web")


def test_health_change() -> None:
    def http(d: dict[str, Any]) -> None:
        web(d)["health"] = {"kind": "http", "path": "/ready"}
    actions = plan(cfg(), cfg(http))
    assert len(actions) == 1 and isinstance(actions[0], ChangeHealth)
    assert actions[0].health.path == "/ready"


def test_service_settings_name_the_fields() -> None:
    def tune(d: dict[str, Any]) -> None:
        web(d)["connect_timeout"] = 0.5
        web(d)["proxy_protocol"] = True
    actions = plan(cfg(), cfg(tune))
    assert len(actions) == 1 and isinstance(actions[0], ChangeServiceSettings)
    assert actions[0].fields == ("connect_timeout", "proxy_protocol")


def test_announce_attributes() -> None:
    def med(d: dict[str, Any]) -> None:
        d["bgp"]["announce"] = {"med": 50, "communities": ["65000:1"]}
    actions = plan(cfg(), cfg(med))
    assert len(actions) == 1 and isinstance(actions[0], ChangeAnnounce)
    assert actions[0].announce.med == 50


def test_node_local_sections_are_reported_not_applied() -> None:
    def local(d: dict[str, Any]) -> None:
        d["api"] = {"listen": "127.0.0.1:9999"}
        d["bgp"]["hold_time"] = 9
    assert plan(cfg(), cfg(local)) == [NodeLocalChange(("api", "bgp"))]


def test_everything_at_once_in_order() -> None:
    def many(d: dict[str, Any]) -> None:
        d["services"].pop(1)
        d["services"].append({"name": "api", "vip": "198.51.100.12", "port": 443,
                              "backends": [{"address": "10.0.2.1", "port": 443}]})
        web(d)["backends"] = [{"address": "10.0.0.1", "port": 80, "weight": 3},
                              {"address": "10.0.0.9", "port": 80}]
        web(d)["health"] = {"rise": 1}
        web(d)["min_healthy"] = 2
        d["bgp"]["announce"] = {"med": 7}
        d["drain"] = {"timeout": 5.0}
    assert kinds(plan(cfg(), cfg(many))) == [
        "AddService", "AddBackend", "Reweight", "ChangeHealth", "ChangeServiceSettings",
        "ChangeAnnounce", "RemoveBackend", "RemoveService", "NodeLocalChange"]
