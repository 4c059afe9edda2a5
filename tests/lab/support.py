"""What every lab test module needs: the skip when the machine cannot run
a lab, and a lab of its own brought up and torn down around its tests."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anycast_lb.lab import builder, netns, state
from anycast_lb.lab.builder import Lab

BASE_NEEDS: tuple[tuple[str, bool], ...] = (
    ("root", os.geteuid() == 0),
    ("FRR (/usr/lib/frr/bgpd)", Path("/usr/lib/frr/bgpd").exists()),
    ("nft", shutil.which("nft") is not None),
)


def require(*extra: tuple[str, bool]) -> None:
    """Skip the calling module unless root, FRR, nft, ExaBGP in the venv and
    each of ``extra`` (what, present) are there."""
    exabgp = ("exabgp", Path(sys.executable).with_name("exabgp").exists())
    missing = [what for what, ok in (*BASE_NEEDS, *extra, exabgp) if not ok]
    if missing:
        pytest.skip(f"lab tests need {', '.join(missing)}", allow_module_level=True)


def fresh_lab(**kwargs: Any) -> Iterator[Lab]:
    """A lab of 3 nodes and 3 backends (``builder.up`` keywords in
    ``kwargs``), torn down afterwards; fails if a lab is already up."""
    if state.load() is not None or netns.lab_namespaces():
        pytest.fail("a lab is already up: run `anycast-lb lab down` first")
    try:
        yield builder.up(3, 3, mode="node", timeout=30.0, **kwargs)
    finally:
        builder.down()
