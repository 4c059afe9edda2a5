"""deploy/: the Prometheus alert rules pass ``promtool check rules`` and their
unit tests (``promtool test rules``), the Grafana dashboard is
provisioning-ready JSON whose every query is valid PromQL (checked by
promtool as recording rules), and every anycast-lb family the rules and the
dashboard use is documented in docs/metrics.md.

promtool comes with Debian's ``prometheus`` package (scripts/install.sh)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/anycast-lb.rules.yml"
RULES_TEST = ROOT / "deploy/prometheus/anycast-lb.rules.test.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/anycast-lb.json"
PROVISIONING = ROOT / "deploy/grafana/provisioning/dashboards/anycast-lb.yml"
METRICS_DOC = ROOT / "docs/metrics.md"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

REQUIRED_ALERTS = {
    "AnycastLBNodeDown",  # scrape fails
    "AnycastLBNodesAbsent",  # no target at all
    "AnycastLBVIPWithdrawn",
    "AnycastLBBGPPeerDown",
    "AnycastLBVIPWithdrawnEverywhere",
    "AnycastLBVIPDamped",
    "AnycastLBBackendsDown",
    "AnycastLBConsensusIsolated",
    "AnycastLBElectedVIPNoOwner",  # elected VIP unserved
    "AnycastLBElectedVIPSplitBrain",  # two nodes hold an elected VIP
    "AnycastLBElectedVIPFlapping",
    "AnycastLBKernelTransactionsRefused",
    "AnycastLBSteeringTransactionsRefused",
    "AnycastLBFenceWritesRefused",
}
_FAMILY = re.compile(r"\b(anycast_lb_[a-z0-9_]+)")
_SUFFIXES = ("_bucket", "_count", "_sum")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True,
                          timeout=60, check=False)


def families(text: str) -> set[str]:
    """anycast_lb_* family names in PromQL (histogram series -> family)."""
    out = set()
    for name in _FAMILY.findall(text):
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name = name.removesuffix(suffix)
                break
        out.add(name)
    return out


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def test_rules_pass_promtool_check() -> None:
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in checked.stdout


def test_rules_unit_tests_pass() -> None:
    tested = promtool("test", "rules", RULES_TEST)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def alert_names() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["alert"] for g in doc["groups"] for r in g["rules"]]


def test_rules_alert_on_every_failure_and_each_is_unit_tested() -> None:
    names = alert_names()
    assert len(names) == len(set(names))
    assert REQUIRED_ALERTS <= set(names)
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing = {case["alertname"] for t in tests for case in t["alert_rule_test"]
              if case["exp_alerts"]}
    assert firing == set(names), "every alert has a test where it fires"


def test_a_failing_rules_test_fails(tmp_path: Path) -> None:
    """promtool test rules exits non-zero when an expectation is wrong (so the
    test above can fail)."""
    (tmp_path / RULES.name).write_text(RULES.read_text())
    wrong = RULES_TEST.read_text().replace('summary: "BGP session to 203.0.113.1',
                                           'summary: "BGP session to 203.0.113.9')
    assert wrong != RULES_TEST.read_text()
    (tmp_path / "wrong.test.yml").write_text(wrong)
    assert promtool("test", "rules", tmp_path / "wrong.test.yml").returncode != 0


def test_dashboard_is_provisioning_ready() -> None:
    dash = dashboard()
    assert dash["uid"] == "anycast-lb" and dash["title"]
    assert "__inputs" not in dash and "id" not in dash  # import-only fields
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    provider = yaml.safe_load(PROVISIONING.read_text())
    assert provider["apiVersion"] == 1
    assert provider["providers"][0]["type"] == "file"


def test_dashboard_has_the_operator_panels() -> None:
    used = families(" ".join(dashboard_exprs()))
    assert {"anycast_lb_bgp_route_announced", "anycast_lb_bgp_peer_up", "anycast_lb_backend_up",
            "anycast_lb_backend_active_connections", "anycast_lb_flows_refused_total",
            "anycast_lb_health_check_duration_seconds",
            "anycast_lb_consensus_state", "anycast_lb_vip_is_owner", "anycast_lb_vip_owner",
            "anycast_lb_kernel_transaction_failures_total"} <= used


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query, Grafana's variables filled in, as a recording rule that
    ``promtool check rules`` parses."""
    subst = {"$__rate_interval": "5m", "$instance": ".*", "$service": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for var, text in subst.items():
            expr = expr.replace(var, text)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = promtool("check", "rules", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = tmp_path / "broken.rules.yml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "b", "rules": [
        {"record": "b:q", "expr": "sum by (instance (anycast_lb_backend_up)"}]}]}))
    assert promtool("check", "rules", broken).returncode != 0


def test_every_family_used_is_documented() -> None:
    documented = set(_FAMILY.findall(METRICS_DOC.read_text()))
    used = families(RULES.read_text()) | families(" ".join(dashboard_exprs()))
    assert used <= documented, used - documented
