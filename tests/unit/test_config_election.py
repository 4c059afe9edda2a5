"""Per-service announce mode and transport, per-node election settings."""

from __future__ import annotations

from typing import Any

import pytest

from anycast_lb.config import AnnounceMode, AnnounceVia, StandbyMode, parse_config
from anycast_lb.errors import ConfigError

CONSENSUS = {"endpoints": ["http://127.0.0.1:2379"], "cluster": "c1", "lease_ttl": 2.0,
             "request_timeout": 0.5}


def doc(announce: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    service: dict[str, Any] = {"name": "web", "vip": "192.0.2.10", "port": 80,
                               "backends": [{"address": "203.0.113.130", "port": 8080}]}
    if announce is not None:
        service["announce"] = announce
    return {"services": [service], **top}


def problems(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return "\n".join(info.value.problems)


def test_existing_configs_keep_active_active_over_bgp() -> None:
    cfg = parse_config(doc())
    assert cfg.services[0].announce.mode is AnnounceMode.ACTIVE_ACTIVE
    assert cfg.services[0].announce.via is AnnounceVia.BGP
    assert cfg.election.priority == 100 and cfg.election.preempt is False
    assert cfg.election.standby is StandbyMode.WITHDRAW and cfg.election.safety_margin == 0.25


def test_l2_with_consensus_and_an_interface_is_accepted() -> None:
    cfg = parse_config(doc({"mode": "active_passive", "via": "l2"}, consensus=CONSENSUS,
                           election={"priority": 200, "preempt": True, "interface": "eth1"}))
    assert cfg.services[0].announce.via is AnnounceVia.L2 and cfg.election.preempt


def test_l2_without_consensus_is_refused_with_the_reason() -> None:
    text = problems(doc({"mode": "active_passive", "via": "l2"}, election={"interface": "eth1"}))
    assert "announce.via: l2 needs a consensus section" in text and "no safe election" in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (doc({"via": "l2"}, consensus=CONSENSUS, election={"interface": "eth1"}),
         "set mode: active_passive"),
        (doc({"mode": "active_passive", "via": "l2"}, consensus=CONSENSUS),
         "needs election.interface"),
        (doc({"mode": "active_passive"}, consensus=CONSENSUS, election={"safety_margin": 0.5}),
         "election.safety_margin (0.5 s) must be below"),
        (doc({"mode": "passive"}), "announce.mode"),
        (doc({"via": "arp"}), "announce.via"),
        (doc(election={"priority": True}), "election.priority"),
        (doc(election={"preempt": "yes"}), "election.preempt"),
        (doc(election={"safety_margin": "1"}), "election.safety_margin"),
        (doc(election={"standby": "hot"}), "election.standby"),
        (doc(election={"interface": "eth 1"}), "election.interface"),
    ],
)
def test_bad_election_settings_are_refused(data: dict[str, Any], message: str) -> None:
    assert message in problems(data)


def test_active_passive_over_bgp_without_consensus_is_prepend_only_and_accepted() -> None:
    cfg = parse_config(doc({"mode": "active_passive"}, election={"standby": "prepend"}))
    assert cfg.consensus is None and cfg.election.standby is StandbyMode.PREPEND
