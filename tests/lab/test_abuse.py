"""udp-flood in a real lab: one client floods the VIP's UDP service from ten
times the nodes' flow cap of source ports while the paced stream runs; no
node may withdraw, fail a health check or flood its log (about 35 s: lab
up, a node restart at 1,024 open files, the 10 s stream, a restart after).

Needs root, FRR and ExaBGP; skipped otherwise. Every wait is a condition
with a deadline.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from anycast_lb.lab import abuse
from anycast_lb.lab.builder import Lab
from tests.lab.support import fresh_lab, require

pytestmark = pytest.mark.lab

require(("prlimit", shutil.which("prlimit") is not None))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from fresh_lab(bfd=False)


def test_udp_flood_at_ten_times_the_cap_takes_no_vip_down(lab: Lab, tmp_path: Path) -> None:
    from anycast_lb.lab import scenarios

    result = scenarios.run_scenario(lab, "udp-flood", tmp_path,
                                    scenario=abuse.ABUSE_SCENARIOS["udp-flood"])
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["flood"]["sent"] >= 10 * written["flood_cap"]["per_node"] * 3
    assert all(abuse.node_nofile(p.pid) == abuse.NOFILE
               for p in lab.state.processes if p.role == "anycast-lb")
    assert result["withdraws"] == 0, result["route_count_timeline"]
    assert result["log_lines_per_s"] and all(
        v["peak"] <= abuse.LOG_PEAK_MAX for v in result["log_lines_per_s"].values()), \
        result["node_logs"]
    assert result["checks"]["no_failed_health_checks"], result["node_logs"]
    assert result["new_success_pct"] >= 99.0
    assert result["pass"], result["checks"]
