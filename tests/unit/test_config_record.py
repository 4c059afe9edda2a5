"""The config generation and the applies offered (live apply's record), on a fake clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anycast_lb.applier import ConfigRecord
from anycast_lb.clock import FakeClock
from anycast_lb.config import NodeConfig, parse_config
from anycast_lb.liveapply import digest


def cfg(port: int = 80) -> NodeConfig:
    data: dict[str, Any] = {
        "node": {"name": "lb1"},
        "services": [{"name": "web", "vip": "198.51.100.10", "port": 80,
                      "backends": [{"address": "10.0.0.1", "port": port}]}],
    }
    return parse_config(data)


async def test_a_new_generation_only_for_a_different_config() -> None:
    clock = FakeClock()
    record = ConfigRecord(cfg(), clock)
    started = record.status(None)
    assert (record.generation, record.digest) == (1, digest(cfg()))
    await clock.advance(5)
    same = record.applied(cfg(), (), "a.yaml")
    assert same.applied and same.generation == 1 and record.status(None).applied_at == started.applied_at
    changed = record.applied(cfg(8080), ("add backend",), "a.yaml")
    assert (changed.generation, changed.digest, changed.actions) == (2, digest(cfg(8080)),
                                                                     ("add backend",))
    status = record.status(Path("/etc/anycast-lb/node.yaml"))
    assert status.applied_at != started.applied_at and status.applies == 2
    assert status.source == "/etc/anycast-lb/node.yaml"


def test_a_refusal_is_counted_and_keeps_the_generation() -> None:
    clock = FakeClock()
    record = ConfigRecord(cfg(), clock)
    refused = record.refused("restart needed: drain changed", ("restart needed",), "push")
    assert not refused.applied and refused.reason == "restart needed: drain changed"
    assert (refused.generation, refused.digest) == (1, digest(cfg()))
    status = record.status(None)
    assert (status.refusals, status.applies, status.last_refusal) == (
        1, 0, "restart needed: drain changed")
    assert status.last_refusal_at is not None and status.source is None


def test_metric_families_count_by_result() -> None:
    record = ConfigRecord(cfg(), FakeClock())
    record.applied(cfg(8080), (), "")
    record.refused("no", ())
    record.refused("no", ())
    samples = {(s.name, tuple(s.labels.values())): s.value
               for family in record.metric_families() for s in family.samples}
    assert samples[("anycast_lb_config_applies_total", ("applied",))] == 1
    assert samples[("anycast_lb_config_applies_total", ("refused",))] == 2
    assert samples[("anycast_lb_config_generation", ())] == 2
