"""docs/openapi.yaml against the node: the same routes, and a bounded
schemathesis run against a live node on 127.0.0.1 with no failure."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

import hypothesis
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings

from anycast_lb.api import NodeControl, make_app
from anycast_lb.config import ApiConfig, parse_config
from anycast_lb.node import Node
from tests.component.backends import TcpNameEcho
from tests.component.nodes import node_running

SPEC = Path(__file__).parents[2] / "docs" / "openapi.yaml"
EXAMPLES_PER_OPERATION = 20
RUN_BUDGET_S = 60.0


def test_the_document_lists_exactly_the_node_routes() -> None:
    app = make_app(cast(NodeControl, None), ApiConfig())  # handlers are never called here
    served = set()
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info["formatter"]  # plain or with {parameters}
        served |= {(path, route.method.lower()) for route in resource}
    spec = yaml.safe_load(SPEC.read_text())
    documented = {(path, method) for path, operations in spec["paths"].items()
                  for method in operations}
    assert documented == served


def _fuzz(base_url: str) -> int:
    """Run every operation's strategy against ``base_url``; the number of
    cases sent. Raises the first failed check."""
    schema = schemathesis.openapi.from_path(str(SPEC))
    sent = 0
    deadline = time.monotonic() + RUN_BUDGET_S
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                  database=None, suppress_health_check=list(HealthCheck),
                  phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            nonlocal sent
            assert time.monotonic() < deadline, "schemathesis run over its time budget"
            case.call_and_validate(base_url=base_url, timeout=5)
            sent += 1

        check()
    return sent


async def test_schemathesis_finds_no_failure_on_a_live_node(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("never-given-to-the-fuzzer\n")
    token.chmod(0o600)
    backend = TcpNameEcho("be")
    await backend.start()
    config: dict[str, Any] = {
        "api": {"listen": "127.0.0.1:0", "admin_token_file": str(token)},
        "services": [{
            "name": "web", "vip": "127.0.0.1", "port": 1, "protocol": "tcp",
            "backends": [{"address": "127.0.0.1", "port": backend.port}],
            "health": {"kind": "tcp", "interval": 0.2, "fast_interval": 0.05, "timeout": 0.2,
                       "rise": 1, "fall": 2},
        }],
    }
    node = Node(parse_config(config), bind_overrides={"web": ("127.0.0.1", 0)},
                check_jitter=False)
    try:
        async with node_running(node):
            assert node.api_address is not None
            sent = await asyncio.to_thread(_fuzz, f"http://127.0.0.1:{node.api_address[1]}")
            print(f"schemathesis: {sent} cases")
            assert sent >= 10
            assert not node.draining
    finally:
        await backend.stop()
