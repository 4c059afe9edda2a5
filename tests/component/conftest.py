"""Data-path tests run on both event loops a node may use: asyncio's and
uvloop's (the default of ``anycast-lb run``), whose transports differ."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import uvloop

from tests.component.etcd import EtcdMember

_CLUSTER_SEQ = itertools.count(1)

_BOTH_LOOPS = ("test_tcp_forwarder.py", "test_udp_forwarder.py", "test_node.py", "test_api.py")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in _BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="session")
def etcd_member(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    """One real etcd shared by the session's tests; each test keeps to its
    own cluster name (``etcd_cluster``), so their keys never meet."""
    member = EtcdMember(tmp_path_factory.mktemp("etcd") / "data")
    member.start()
    yield member
    member.stop()


@pytest.fixture
def etcd_private(tmp_path: Path) -> Iterator[EtcdMember]:
    """A real etcd of the test's own, for tests that stop or restart it."""
    member = EtcdMember(tmp_path / "etcd")
    member.start()
    yield member
    member.stop()


@pytest.fixture
def etcd_cluster(request: pytest.FixtureRequest) -> str:
    """A cluster name unique to the test (keys under /anycast-lb/<name>/)."""
    return f"t{next(_CLUSTER_SEQ)}-{request.node.name[:24].replace('[', '-').replace(']', '')}"
