"""/status: the published schema is generated from the models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from anycast_lb.status import Status, json_schema

PUBLISHED = Path(__file__).parents[2] / "docs" / "status.schema.json"


def test_published_status_schema_is_current() -> None:
    assert PUBLISHED.read_text() == json_schema(), \
        "run: anycast-lb status-schema > docs/status.schema.json"


def test_schema_names_every_section() -> None:
    schema = json.loads(json_schema())
    assert set(schema["required"]) == {"node", "services", "bgp", "cluster", "workers", "limits",
                                        "consensus", "config", "vips"}
    assert schema["additionalProperties"] is False


def test_documented_example_validates_and_unknown_fields_do_not() -> None:
    doc = {
        "node": {"name": "lb1", "draining": False, "drain_phase": "none",
                 "drain_state": "serving", "stopping": False, "pid": 4242,
                 "drain_waiting": False},
        "services": [{
            "name": "web", "vip": "198.51.100.10", "port": 80, "protocol": "tcp",
            "balance": "maglev", "listen": "198.51.100.10:80", "listening": True,
            "healthy": True, "min_healthy": 1, "up_backends": 1, "active_connections": 3,
            "refused": {"cap": 0}, "prefix": "198.51.100.10/32", "announcement": "announced",
            "damping": {"penalty": 0.0, "suppressed": False, "reuse_in_s": 0.0},
            "backends": [{"address": "203.0.113.130", "port": 8080, "weight": 1, "state": "up",
                          "admin": "drained", "runtime_override": True,
                          "last_check": "2026-11-21T21:00:00.123Z", "last_latency_ms": 0.41,
                          "last_detail": "status 200", "active_connections": 2,
                          "connections_total": 120, "connect_failures": 0,
                          "bytes_in": 5120, "bytes_out": 81920}],
            "table_digest": "3f2a9c0d41be", "table_revision": 57,
            "kernel": {"seed": "0x07fd47f3", "table_size": 65537, "generation": 3,
                       "digest": "a1b2c3d4e5f6", "draining": ["198.51.100.21:80"],
                       "drained": [], "backends": {"198.51.100.21": {"packets": 12,
                                                                     "bytes": 840}}},
            "table_since": 1795813199.25,
        }],
        "bgp": None, "cluster": None, "workers": None,
        "limits": {"limit": 1024, "reserve": {"base": 16, "listeners": 1, "health": 1, "api": 257,
                                              "bgp": 0, "cluster": 0, "workers": 0, "margin": 64,
                                              "total": 339},
                   "pipes": 85, "tcp_connections": 300, "tcp_connections_per_source": 75, "udp_flows": {},
                   "udp_flows_per_source": {}, "data": 685, "open_descriptors": 12},
        "consensus": {"cluster": "prod-eu1", "state": "synced", "since": 1795813200.5,
                      "since_s": 12.5, "reason": "", "revision": 57, "config_revision": 3,
                      "lease_silent_s": 0.2, "watch_lag_s": 0.004,
                      "members": [{"name": "lb1", "api": "127.0.0.1:9180", "lan": "",
                                   "version": "0.1.0", "started": 1795813188.0}],
                      "pushes_applied": 2, "pushes_refused": 0, "drain_slot": None,
                      "drain_slot_holders": [], "disagreement": {}},
        "config": {"generation": 2, "digest": "0123456789abcdef",
                   "applied_at": "2026-11-21T21:00:00.123Z", "source": "/etc/anycast-lb/node.yaml",
                   "applies": 1, "refusals": 1, "last_refusal": "restart needed: api changed",
                   "last_refusal_at": "2026-11-21T20:59:00.000Z"},
        "vips": [{"vip": "198.51.100.10", "via": "l2", "owner": "lb1", "term": 41,
                  "since": "2026-11-21T20:58:00.000Z", "role": "owner", "has_vip": True,
                  "qualifies": True}],
    }
    status = Status.model_validate(doc)
    assert status.model_dump(mode="json") == doc
    doc["node"] = {**doc["node"], "surprise": 1}  # type: ignore[dict-item]
    with pytest.raises(ValidationError):
        Status.model_validate(doc)
