"""``manage_address: true`` on a real ``lo`` (root, a scratch namespace).

Each test makes a network namespace of its own (``albt-ma-<pid>-<n>``, so
two runs never collide), brings its ``lo`` up and runs
``manage_address_child.py`` inside it with ``ip netns exec``: a real node
puts an IPv4 and an IPv6 VIP (documentation prefixes) on ``lo`` before its
listeners bind, serves through them, and takes them off at stop, but only
those it added. The namespace is deleted by name at teardown.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and ip (network namespaces)",
)

ROOT = Path(__file__).resolve().parents[2]
VIP4, VIP6 = "198.51.100.10", "2001:db8:5::10"
BASE = ["127.0.0.1", "::1"]
_SEQ = itertools.count(1)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"albt-ma-{os.getpid()}-{next(_SEQ)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def child(ns: str, case: str) -> dict[str, Any]:
    result = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.component.manage_address_child",
         case], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-4000:]
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def test_the_node_adds_its_vips_serves_on_them_and_removes_them(netns: str) -> None:
    got = child(netns, "absent")
    assert sorted(got["before"]) == sorted(BASE)
    assert got["added"] == sorted([VIP4, VIP6])
    assert sorted(got["running"]) == sorted(BASE + [VIP4, VIP6])
    assert got["answers"] == ["be1", "be1"]
    assert sorted(got["after"]) == sorted(BASE)


def test_vips_already_on_lo_are_left_there(netns: str) -> None:
    sh("ip", "netns", "exec", netns, "ip", "addr", "add", f"{VIP4}/32", "dev", "lo")
    sh("ip", "netns", "exec", netns, "ip", "addr", "add", f"{VIP6}/128", "dev", "lo", "nodad")
    got = child(netns, "absent")
    assert got["added"] == [] and got["answers"] == ["be1", "be1"]
    assert sorted(got["after"]) == sorted(BASE + [VIP4, VIP6])


def test_vips_added_are_removed_when_the_node_fails_to_start(netns: str) -> None:
    got = child(netns, "bind_fails")
    # "in use", not "cannot assign": the VIP was on lo when the bind failed.
    assert "in use" in got["error"], got["error"]
    assert sorted(got["after"]) == sorted(BASE)
