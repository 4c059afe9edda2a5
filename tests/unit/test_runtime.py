"""Runtime control, pure parts: the config edit, node-local overrides kept
over a file (record, prune, overlay), the live-apply action of a drain, the
pool leaving drained backends out, and the status table and drain progress
of the CLI."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from anycast_lb import liveapply, runtime, statusview
from anycast_lb.config import NodeConfig, parse_config
from anycast_lb.errors import UnknownBackend
from anycast_lb.pool import Pool

A, B = "203.0.113.130:8080", "203.0.113.131:8080"


def data() -> dict[str, Any]:
    return {"services": [{
        "name": "web", "vip": "198.51.100.10", "port": 80,
        "backends": [{"address": "203.0.113.130", "port": 8080},
                     {"address": "203.0.113.131", "port": 8080, "weight": 3}]}]}


def cfg(edit: Any = None) -> NodeConfig:
    d = data()
    if edit is not None:
        edit(d)
    return parse_config(d)


def backend(config: NodeConfig, key: str) -> Any:
    [found] = [b for b in config.services[0].backends if b.key == key]
    return found


def test_edit_changes_only_the_named_backend() -> None:
    base = cfg()
    services = runtime.edit_services(base.services, runtime.Change("web", A, drain=True))
    assert [b.drain for b in services[0].backends] == [True, False]
    services = runtime.edit_services(services, runtime.Change("web", B, weight=7))
    assert [(b.drain, b.weight) for b in services[0].backends] == [(True, 1), (False, 7)]
    assert base.services[0].backends[0].drain is False  # the input is untouched


@pytest.mark.parametrize(("service", "key", "message"), [
    ("api", A, "no service 'api'"),
    ("web", "203.0.113.1:8080", "service 'web' has no backend '203.0.113.1:8080'"),
])
def test_edit_of_an_unknown_backend(service: str, key: str, message: str) -> None:
    with pytest.raises(UnknownBackend, match=message):
        runtime.edit_services(cfg().services, runtime.Change(service, key, drain=True))


@pytest.mark.parametrize("weight", [0, 1001])
def test_edit_keeps_the_weight_bounds(weight: int) -> None:
    with pytest.raises(ValueError):
        runtime.edit_services(cfg().services, runtime.Change("web", A, weight=weight))


def test_overrides_are_relative_to_the_file() -> None:
    base = cfg()
    o = runtime.record({}, base, runtime.Change("web", A, drain=True))
    assert o == {("web", A): runtime.Override(drain=True)}
    o = runtime.record(o, base, runtime.Change("web", A, weight=5))
    assert o == {("web", A): runtime.Override(drain=True, weight=5)}
    # Back to the file's values: no override left.
    o = runtime.record(o, base, runtime.Change("web", A, drain=False))
    assert o == {("web", A): runtime.Override(weight=5)}
    assert runtime.record(o, base, runtime.Change("web", A, weight=1)) == {}
    # The file's own value is no override at all.
    assert runtime.record({}, base, runtime.Change("web", B, weight=3)) == {}
    with pytest.raises(UnknownBackend):
        runtime.record({}, base, runtime.Change("web", "203.0.113.1:1", drain=True))


def test_overlay_and_prune_over_a_reloaded_file() -> None:
    base = cfg()
    overrides = {("web", A): runtime.Override(drain=True), ("web", B): runtime.Override(weight=9)}
    effective = runtime.overlay(base, overrides)
    assert (backend(effective, A).drain, backend(effective, B).weight) == (True, 9)
    assert runtime.overlay(base, {}) is base
    # The new file drops A and sets B's weight to 9 itself: nothing is left.
    def edit(d: dict[str, Any]) -> None:
        d["services"][0]["backends"] = [{"address": "203.0.113.131", "port": 8080, "weight": 9}]

    assert runtime.prune(overrides, cfg(edit)) == {}
    assert runtime.prune(overrides, base) == overrides


def test_drain_is_a_live_apply_action() -> None:
    old = cfg()
    new = runtime.overlay(old, {("web", A): runtime.Override(drain=True, weight=2)})
    actions = liveapply.plan(old, new)
    assert actions == [liveapply.Reweight("web", A, 1, 2), liveapply.SetDrain("web", A, True)]
    assert [liveapply.describe(a) for a in actions] == [
        f"reweight {A} of web 1->2", f"drain backend {A} of web"]
    assert liveapply.refusal(old, actions) is None
    assert "relay workers" in (liveapply.refusal(old, actions, workers=True) or "")
    assert liveapply.describe(liveapply.plan(new, old)[1]) == f"undrain backend {A} of web"


def test_pool_leaves_a_drained_backend_out_keeping_its_state() -> None:
    base = cfg()
    pool = Pool(base.services[0], run_build=lambda job: job())
    pool.set_up_set({A, B})
    assert pool.up_count == 2
    drained = runtime.overlay(base, {("web", A): runtime.Override(drain=True)})
    added, removed = pool.update(drained.services[0])
    assert (added, removed) == ([], [])
    a = pool.get(A)
    assert a.up and a.drained and pool.up_count == 1
    clients = [("198.51.100.77", p) for p in range(40000, 40200)]
    assert {pool.candidates(c, ("198.51.100.10", 80))[0].key for c in clients} == {B}
    assert all(A not in [b.key for b in pool.candidates(c, ("198.51.100.10", 80))]
               for c in clients)
    # Health changes while drained do not bring it back; undrain does.
    pool.set_up(A, False)
    pool.set_up(A, True)
    assert pool.up_count == 1
    pool.update(base.services[0])
    assert pool.up_count == 2 and not a.drained
    assert {pool.candidates(c, ("198.51.100.10", 80))[0].key for c in clients} == {A, B}


def test_min_healthy_counts_no_drained_backend() -> None:
    base = cfg()
    pool = Pool(base.services[0], run_build=lambda job: job())
    pool.set_up_set({A, B})
    both = {("web", A): runtime.Override(drain=True), ("web", B): runtime.Override(drain=True)}
    pool.update(runtime.overlay(base, both).services[0])
    assert not pool.healthy and pool.candidates(("198.51.100.77", 1), ("198.51.100.10", 80)) == []


STATUS: dict[str, Any] = {
    "node": {"name": "n1", "draining": False, "drain_state": "serving", "stopping": False,
             "drain_waiting": False},
    "config": {"generation": 2},
    "services": [{
        "name": "web", "vip": "198.51.100.10", "port": 80, "protocol": "tcp",
        "announcement": "announced", "healthy": True, "up_backends": 1, "active_connections": 3,
        "backends": [
            {"address": "203.0.113.130", "port": 8080, "state": "up", "weight": 1,
             "admin": "drained", "runtime_override": True, "active_connections": 2,
             "last_detail": "connected"},
            {"address": "2001:db8::1", "port": 8080, "state": "down", "weight": 10,
             "admin": "active", "runtime_override": False, "active_connections": 1,
             "last_detail": ""},
        ]}],
}


def test_status_table() -> None:
    assert statusview.render(STATUS) == """\
node n1  drain: serving  config generation 2

SERVICE  VIP               PROTO  ANNOUNCEMENT  HEALTHY  BACKENDS  CONNECTIONS
web      198.51.100.10:80  tcp    announced     yes      1/2       3

web:
  BACKEND              STATE  WEIGHT  ADMIN    CONNECTIONS  LAST CHECK
  203.0.113.130:8080*  up     1       drained  2            connected
  [2001:db8::1]:8080   down   10      active   1            -

* drain or weight set at runtime on this node, not in its file
"""


@pytest.mark.parametrize(("state", "draining", "active", "done", "line"), [
    ("graceful", True, 0, False, "graceful: 0 connection(s) left"),
    ("withdrawn", True, 3, False, "withdrawn: 3 connection(s) left"),
    ("withdrawn", True, 0, True, "withdrawn: 0 connection(s) left"),
    ("drained", True, 2, True, "drained: 2 connection(s) left"),
])
def test_drain_progress(state: str, draining: bool, active: int, done: bool, line: str) -> None:
    status = copy.deepcopy(STATUS)
    status["node"].update(drain_state=state, draining=draining)
    status["services"][0]["active_connections"] = active
    assert statusview.drain_progress(status) == (done, line)


def test_drain_progress_of_a_node_not_draining() -> None:
    with pytest.raises(ValueError, match="not draining"):
        statusview.drain_progress(STATUS)
    waiting = copy.deepcopy(STATUS)
    waiting["node"]["drain_waiting"] = True
    assert statusview.drain_progress(waiting) == (False, "waiting for a drain slot")


def test_holds() -> None:
    base = cfg()
    drained = runtime.overlay(base, {("web", A): runtime.Override(drain=True)})
    assert runtime.holds(drained, runtime.Change("web", A, drain=True))
    assert not runtime.holds(base, runtime.Change("web", A, drain=True))
    assert runtime.holds(base, runtime.Change("web", B, weight=3))
    assert not runtime.holds(base, runtime.Change("web", "203.0.113.1:1", weight=3))


def test_an_undrained_backend_dumps_as_before_the_field_existed() -> None:
    base = cfg()
    assert "drain" not in base.services[0].backends[0].model_dump(mode="json")
    drained = runtime.overlay(base, {("web", A): runtime.Override(drain=True)})
    assert drained.services[0].backends[0].model_dump(mode="json")["drain"] is True
    # A drained config survives a dump and a load (the pushed shared document).
    assert parse_config(drained.model_dump(mode="json", exclude_none=True)) == drained
    assert liveapply.digest(base) != liveapply.digest(drained)
