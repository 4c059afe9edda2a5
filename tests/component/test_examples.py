"""Every file in examples/ passes `anycast-lb check-config`, run as users
run it. Files the examples name under /etc/anycast-lb/ (admin token, cluster
key) are made in a temporary copy with mode 0600, since check-config reads
them; between them the examples use every feature this build has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anycast_lb.cluster.keys import new_key_line, write_key_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
ETC = "/etc/anycast-lb/"


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "anycast_lb", "check-config", "--nofile", "65536",
                           str(path)], capture_output=True, text=True, timeout=60, check=False)


def _copy(example: Path, tmp: Path, token_mode: int = 0o600) -> Path:
    etc = tmp / "etc"
    etc.mkdir(exist_ok=True)
    token = etc / "token"
    token.write_text("example-admin-token\n")
    token.chmod(token_mode)
    write_key_file(etc / "cluster.key", [new_key_line()])
    copy = tmp / example.name
    copy.write_text(example.read_text().replace(ETC, f"{etc}/"))
    return copy


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_passes_check_config(example: Path, tmp_path: Path) -> None:
    result = _check(_copy(example, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": ok (node " in result.stdout


def test_every_referenced_file_is_one_the_test_makes() -> None:
    for example in EXAMPLES:
        for word in example.read_text().split():
            if word.startswith(ETC) and not word.startswith("#"):
                assert word.rstrip(",]") in (ETC + "token", ETC + "cluster.key"), (example, word)


def test_a_token_others_can_read_is_refused(tmp_path: Path) -> None:
    """The check above can fail: the same copy with a 0644 token exits 2."""
    result = _check(_copy(ROOT / "examples" / "bgp.yaml", tmp_path, token_mode=0o644))
    assert result.returncode == 2
    assert "admin_token_file" in result.stderr


def _keys(value: object, prefix: str = "") -> set[str]:
    """Every key path in ``value``: ``a.b``, ``services[].vip``."""
    out: set[str] = set()
    if isinstance(value, dict):
        for key, sub in value.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.add(path)
            out |= _keys(sub, path)
    elif isinstance(value, list):
        for item in value:
            out |= _keys(item, prefix + "[]")
    return out


def test_the_examples_cover_every_feature() -> None:
    used: set[str] = set()
    vips: set[str] = set()
    for example in EXAMPLES:
        doc = yaml.safe_load(example.read_text())
        used |= _keys(doc)
        vips |= {str(s["vip"]) for s in doc["services"]}
    for feature in ("bgp", "bgp.announce.communities", "bgp.damping", "cluster",
                    "cluster.key_file", "consensus", "api.admin_token_file",
                    "services[].proxy_protocol", "forwarding.workers",
                    "forwarding.max_tcp_connections", "services[].max_flows_per_source",
                    "bgp.next_hop_v6", "bgp.announce.large_communities",
                    "bgp.announce.extended_communities", "services[].health.query_name",
                    "services[].health.payload", "services[].manage_address",
                    "services[].announce.via", "election.interface", "forwarding.engine",
                    "forwarding.kernel.interface"):
        assert feature in used, f"no example uses {feature}"
    assert any(":" in v for v in vips), "no IPv6 VIP in the examples"
    docs = [yaml.safe_load(example.read_text()) for example in EXAMPLES]
    assert any(s.get("announce", {}).get("via") == "l2" for d in docs for s in d["services"]), \
        "no example announces over l2"
    assert any(d.get("forwarding", {}).get("engine") == "kernel" for d in docs), \
        "no example uses the kernel engine"
