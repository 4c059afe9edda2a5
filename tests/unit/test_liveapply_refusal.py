"""Live apply: which plans are refused and why, the config digest, action
descriptions (pure), and Pool.update (backends added, removed, reweighted)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from anycast_lb.config import parse_config
from anycast_lb.liveapply import LIVE_SERVICE_FIELDS, describe, digest, plan, refusal
from anycast_lb.pool import Pool
from tests.unit.test_liveapply import BASE, cfg, web


def _with(**fields: Any) -> Any:
    def change(d: dict[str, Any]) -> None:
        web(d).update(fields)
    return change


def test_digest_names_the_validated_config() -> None:
    assert digest(cfg()) == digest(cfg()) and len(digest(cfg())) == 16
    assert digest(cfg()) != digest(cfg(_with(min_healthy=2)))
    data = copy.deepcopy(BASE)
    data["services"][0]["balance"] = "maglev"  # the default, written out
    assert digest(parse_config(data)) == digest(cfg())


@pytest.mark.parametrize("change, refused", [
    (_with(min_healthy=2), None),
    (_with(balance="round_robin", connect_timeout=2.0, proxy_protocol=True), None),
    (_with(idle_timeout=60), "idle_timeout cannot change on a running listener"),
    (lambda d: d["drain"].update(timeout=5) if "drain" in d else d.update(drain={"timeout": 5}),
     "restart needed: drain changed"),
    (lambda d: d["bgp"].update(local_as=65002), "restart needed: bgp changed"),
    (lambda d: d["bgp"].update(announce={"med": 5}), None),
])
def test_refusal_of_node_local_and_fixed_settings(change: Any, refused: str | None) -> None:
    old = cfg()
    reason = refusal(old, plan(old, cfg(change)))
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def _backends(d: dict[str, Any]) -> None:
    web(d)["backends"] = [{"address": "10.0.0.1", "port": 80}, {"address": "10.0.0.3", "port": 80}]


def _udp_backends(d: dict[str, Any]) -> None:
    d["services"][1]["backends"].append({"address": "10.0.1.2", "port": 53})


def _add_tcp(d: dict[str, Any]) -> None:
    d["services"].append({"name": "api", "vip": "198.51.100.12", "port": 443,
                          "backends": [{"address": "10.0.2.1", "port": 443}]})


@pytest.mark.parametrize("change, workers, cluster, refused", [
    (_backends, True, False, "TCP backends cannot change live with relay workers"),
    (_udp_backends, True, False, None),  # UDP stays in the node process
    (_backends, False, True, None),
    (_add_tcp, True, False, "TCP services cannot be added live with relay workers"),
    (_add_tcp, False, True, "cannot be added or removed live with flow survival"),
    (_add_tcp, False, False, None),
    (_with(health={"kind": "tcp", "interval": 1.0}), True, True, None),
])
def test_refusal_with_workers_and_flow_survival(change: Any, workers: bool, cluster: bool,
                                                refused: str | None) -> None:
    old = cfg()
    reason = refusal(old, plan(old, cfg(change)), workers=workers, cluster=cluster)
    assert (reason is None) if refused is None else (reason is not None and refused in reason)


def test_every_action_is_described() -> None:
    def many(d: dict[str, Any]) -> None:
        _backends(d)
        web(d)["backends"][0]["weight"] = 3
        web(d)["health"] = {"kind": "tcp", "interval": 1.0}
        web(d)["min_healthy"] = 2
        d["bgp"]["announce"] = {"med": 5}
        d["services"].pop(1)
        _add_tcp(d)
        d["api"] = {"listen": "127.0.0.1:9999"}
    lines = [describe(a) for a in plan(cfg(), cfg(many))]
    assert lines == ["add service api", "add backend 10.0.0.3:80 to web",
                     "reweight 10.0.0.1:80 of web 1->3", "change health checks of web",
                     "change min_healthy of web", "change announce attributes",
                     "remove backend 10.0.0.2:80 from web", "remove service dns",
                     "restart needed: api changed"]
    assert "min_healthy" in LIVE_SERVICE_FIELDS


def _held_builds() -> tuple[list[Any], Any]:
    jobs: list[Any] = []
    return jobs, jobs.append


def test_pool_update_adds_down_removes_and_reweights() -> None:
    jobs, runner = _held_builds()
    old = cfg().services[0]
    pool = Pool(old, run_build=runner)
    for b in pool.backends:
        pool.set_up(b.key, True)
    for job in jobs:
        job()
    kept = pool.get("10.0.0.1:80")
    kept.connections_total = 7
    removed_backend = pool.get("10.0.0.2:80")
    new = cfg(lambda d: (_backends(d), web(d)["backends"][0].update(weight=5))).services[0]
    added, removed = pool.update(new)
    assert [b.key for b in added] == ["10.0.0.3:80"] and not added[0].up
    assert removed == [removed_backend]
    assert pool.get("10.0.0.1:80") is kept and kept.connections_total == 7
    assert kept.config.weight == 5 and pool.service is new
    with pytest.raises(KeyError):
        pool.get("10.0.0.2:80")
    # Before and after the new table lands, no flow goes to the removed backend.
    flows = [(f"192.0.2.{i % 250}", 1000 + i) for i in range(500)]
    local = ("198.51.100.10", 80)
    assert {pool.candidates(c, local)[0].key for c in flows} == {"10.0.0.1:80"}
    for job in jobs:
        job()
    assert pool.table_ready
    pool.set_up("10.0.0.3:80", True)
    for job in jobs:
        job()
    chosen = {pool.candidates(c, local)[0].key for c in flows}
    assert chosen == {"10.0.0.1:80", "10.0.0.3:80"}
    assert all("10.0.0.2:80" not in {b.key for b in pool.candidates(c, local)} for c in flows)


def test_pool_update_refuses_another_service() -> None:
    pool = Pool(cfg().services[0])
    with pytest.raises(ValueError):
        pool.update(cfg().services[1])


@pytest.mark.parametrize("mode, refused", [("active_active", False), ("active_passive", True)])
def test_an_active_passive_service_is_not_added_live(mode: str, refused: bool) -> None:
    def add(d: dict[str, Any]) -> None:
        d["services"].append({**copy.deepcopy(web(d)), "name": "ntp", "vip": "192.0.2.53",
                              "announce": {"mode": mode}})
    old = cfg()
    reason = refusal(old, plan(old, cfg(add)))
    assert (reason is not None and "active_passive services cannot be added live" in reason) \
        is refused
    assert refused or reason is None


@pytest.mark.parametrize("manage, refused", [(False, False), (True, True)])
def test_a_service_managing_its_address_is_not_added_live(manage: bool, refused: bool) -> None:
    def add(d: dict[str, Any]) -> None:
        d["services"].append({**copy.deepcopy(web(d)), "name": "ntp", "vip": "192.0.2.53",
                              "manage_address": manage})
    old = cfg()
    reason = refusal(old, plan(old, cfg(add)))
    assert (reason is not None and "manage_address cannot be added live" in reason) is refused
    assert refused or reason is None


def test_manage_address_cannot_change_on_a_running_service() -> None:
    old = cfg()
    reason = refusal(old, plan(old, cfg(_with(manage_address=True))))
    assert reason is not None and "manage_address cannot change on a running listener" in reason


@pytest.mark.parametrize("change, refused", [
    (_add_tcp, "cannot be added or removed live with forwarding.engine: kernel"),
    (lambda d: d["services"].pop(1), "cannot be added or removed live with forwarding.engine: kernel"),
    (_with(maglev_table_size=257), "maglev_table_size is part of the kernel engine's jhash seed"),
    (_backends, None),  # backends, weights and drains become table diffs
    (_with(min_healthy=2), None),
])
def test_refusal_with_the_kernel_engine(change: Any, refused: str | None) -> None:
    old = cfg()
    reason = refusal(old, plan(old, cfg(change)), kernel=True)
    assert (reason is None) if refused is None else (reason is not None and refused in reason)
    if refused is not None:
        assert refusal(old, plan(old, cfg(change))) is None or "kernel" not in (
            refusal(old, plan(old, cfg(change))) or "")
