"""``anycast-lb cluster ...``: the cluster's shared config and members on etcd.

::

    anycast-lb cluster push FILE [-m MESSAGE] [--based-on N]
    anycast-lb cluster show [REV]
    anycast-lb cluster history [--json]
    anycast-lb cluster diff REV [REV]
    anycast-lb cluster rollback REV [-m MESSAGE]
    anycast-lb cluster members [--json]

etcd is named by ``--endpoints URL,URL --cluster NAME`` or read from the
``consensus:`` section of a node file (``--config FILE``). Exit codes: 0
success, 1 etcd trouble or a refused push, 2 invalid file or usage.
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import click

from anycast_lb.config import load_config
from anycast_lb.consensus import document
from anycast_lb.consensus.keys import Layout, client_target
from anycast_lb.errors import ConfigError, ConsensusConflict, ConsensusError
from anycast_lb.yamlload import load_yaml

if TYPE_CHECKING:
    # The gRPC client costs ~0.2 s to import: only `cluster` commands pay it.
    from anycast_lb.consensus.history import ConfigHistory, Revision
    from anycast_lb.consensus.members import ClusterView
    from anycast_lb.consensus.store import Store

T = TypeVar("T")
EXIT_ERROR = 1
EXIT_CONFIG = 2


@dataclass(frozen=True)
class Target:
    endpoints: list[str]
    cluster: str
    request_timeout: float


def _target(ctx: click.Context) -> Target:
    obj: dict[str, object] = ctx.obj
    endpoints, cluster, config = obj["endpoints"], obj["cluster"], obj["config"]
    timeout = obj["request_timeout"]
    if config is not None:
        assert isinstance(config, Path)
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            _fail(f"invalid config {exc}", EXIT_CONFIG)
        if cfg.consensus is None:
            _fail(f"{config}: no consensus section", EXIT_CONFIG)
        endpoints = endpoints or ",".join(cfg.consensus.endpoints)
        cluster = cluster or cfg.consensus.cluster
        timeout = timeout or max(cfg.consensus.request_timeout, 2.0)
    if not endpoints or not cluster:
        _fail("name etcd with --endpoints and --cluster, or --config NODE_FILE", EXIT_CONFIG)
    assert isinstance(endpoints, str) and isinstance(cluster, str)
    urls = [u.strip() for u in endpoints.split(",") if u.strip()]
    for url in urls:
        try:
            client_target(url)
        except ValueError as exc:
            _fail(f"--endpoints: {exc}", EXIT_CONFIG)
    return Target(urls, cluster, float(timeout) if isinstance(timeout, (int, float)) else 2.0)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"anycast-lb: {message}", err=True)
    sys.exit(code)


def _run(ctx: click.Context, body: Callable[[ConfigHistory, Store, Layout], Awaitable[T]]) -> T:
    from anycast_lb.consensus.history import ConfigHistory
    from anycast_lb.consensus.store import Store

    target = _target(ctx)
    layout = Layout(target.cluster)

    async def main() -> T:
        async with Store(target.endpoints, target.request_timeout) as store:
            return await body(ConfigHistory(store, layout), store, layout)

    try:
        return asyncio.run(main())
    except ConsensusConflict as exc:
        _fail(f"push refused: {exc}", EXIT_ERROR)
    except ConsensusError as exc:
        _fail(f"etcd: {exc}", EXIT_ERROR)


def _author() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _when(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def _summary(rev: Revision) -> dict[str, object]:
    return {"revision": rev.number, "based_on": rev.based_on, "time": rev.time,
            "author": rev.author, "message": rev.message, "etcd_revision": rev.etcd_revision,
            "services": [s.name for s in rev.shared.services]}


def etcd_target(group: Callable[[click.Context], None]) -> Callable[..., None]:
    """Decorate a command group with the options that name an etcd cluster
    (``--endpoints`` and ``--cluster``, or ``--config``; ``--request-timeout``)
    and keep their values in ``ctx.obj`` for :func:`_run`. The group's own
    body runs after (it takes the context only)."""
    @functools.wraps(group)
    def stored(ctx: click.Context, endpoints: str | None, cluster_name: str | None,
               config: Path | None, request_timeout: float | None) -> None:
        ctx.obj = {"endpoints": endpoints, "cluster": cluster_name, "config": config,
                   "request_timeout": request_timeout}
        group(ctx)
    decorated: Callable[..., None] = click.pass_context(stored)
    for option in reversed(_TARGET_OPTIONS):
        decorated = option(decorated)
    return decorated


_TARGET_OPTIONS = (
    click.option("--endpoints", help="etcd client URLs, comma-separated (http://IPV4:PORT)"),
    click.option("--cluster", "cluster_name", help="cluster name (keys under /anycast-lb/NAME/)"),
    click.option("--config", type=click.Path(path_type=Path),
                 help="node file with a consensus section"),
    click.option("--request-timeout", type=float, help="seconds per etcd call (default 2)"),
)


@click.group()
@etcd_target
def cluster(ctx: click.Context) -> None:
    """The cluster's shared config, its history and its members (etcd)."""


@cluster.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-m", "--message", default="", help="why (kept in the history)")
@click.option("--based-on", type=int, help="refuse unless this revision is still current")
@click.option("--author", default=None, help="default USER@HOST")
@click.pass_context
def push(ctx: click.Context, file: Path, message: str, based_on: int | None,
         author: str | None) -> None:
    """Validate FILE (a node file or a services/announce document) and make
    its shared part the cluster's next config revision."""
    try:
        shared = document.from_data(load_yaml(file), str(file))
    except ConfigError as exc:
        _fail(f"invalid config {exc}", EXIT_CONFIG)
    rev = _run(ctx, lambda h, _s, _l: h.push(shared, author=author or _author(),
                                               message=message, based_on=based_on))
    click.echo(f"revision {rev.number} (based on {rev.based_on}, etcd revision {rev.etcd_revision})")


@cluster.command()
@click.argument("rev", type=int, required=False)
@click.pass_context
def show(ctx: click.Context, rev: int | None) -> None:
    """The current shared config (or revision REV) as YAML."""
    async def body(h: ConfigHistory, _s: Store, _l: Layout) -> Revision | None:
        return await h.get(rev) if rev is not None else await h.current()

    found = _run(ctx, body)
    if found is None:
        _fail("nothing pushed yet", EXIT_ERROR)
    click.echo(f"# revision {found.number} by {found.author} at {_when(found.time)}: {found.message}")
    from anycast_lb.consensus.history import render

    click.echo(render(found.shared), nl=False)


@cluster.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx: click.Context, as_json: bool) -> None:
    """Every config revision: number, time, author, message."""
    revs = _run(ctx, lambda h, _s, _l: h.history())
    if as_json:
        click.echo(json.dumps([_summary(r) for r in revs], indent=2))
        return
    for r in revs:
        click.echo(f"{r.number:>5}  {_when(r.time)}  {r.author}  {r.message}")


@cluster.command()
@click.argument("a", type=int)
@click.argument("b", type=int, required=False)
@click.pass_context
def diff(ctx: click.Context, a: int, b: int | None) -> None:
    """Unified diff of revision A against B (default: the current one)."""
    click.echo(_run(ctx, lambda h, _s, _l: h.diff(a, b)), nl=False)


@cluster.command()
@click.argument("rev", type=int)
@click.option("-m", "--message", default="")
@click.option("--author", default=None)
@click.pass_context
def rollback(ctx: click.Context, rev: int, message: str, author: str | None) -> None:
    """Push revision REV's config again, as a new revision."""
    new = _run(ctx, lambda h, _s, _l: h.rollback(rev, author=author or _author(), message=message))
    click.echo(f"revision {new.number}: {new.message}")


@cluster.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def members(ctx: click.Context, as_json: bool) -> None:
    """Live members (nodes keeping their lease), read at one etcd revision."""
    from anycast_lb.consensus.members import read_view

    async def body(_h: ConfigHistory, s: Store, layout: Layout) -> ClusterView:
        return await read_view(s, layout)

    view = _run(ctx, body)
    rows = [m.__dict__ for _, m in sorted(view.members.items())]
    if as_json:
        click.echo(json.dumps({"revision": view.revision, "members": rows}, indent=2))
        return
    for m in sorted(view.members.values(), key=lambda m: m.name):
        click.echo(f"{m.name}  api={m.api}  lan={m.lan or '-'}  version={m.version}  "
                   f"started={_when(m.started)}")
