"""``anycast-lb vip owners``: who owns each elected VIP, read from etcd.

::

    anycast-lb vip owners [--json]   (--config NODE_FILE | --endpoints URL,URL --cluster NAME)

One read of ``/anycast-lb/<cluster>/owners/`` at one etcd revision
(docs/l2.md): per VIP the owner, its term (the owner key's create revision),
since when (wall clock of the take, written by the owner), whether the
owner has announced, and the candidates. Exit codes: 0 success, 1 etcd
trouble, 2 invalid file or usage.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import click

from anycast_lb.consensus.cli import etcd_target
from anycast_lb.consensus.keys import Layout, json_object


@dataclass
class VipOwners:
    vip: str
    owner: str | None = None
    term: int | None = None
    since: float | None = None
    """Wall-clock s (epoch) the owner took the VIP."""
    announced: bool = False
    candidates: list[str] = field(default_factory=list)


def owners_from(items: list[tuple[str, bytes, int]], layout: Layout) -> list[VipOwners]:
    """(key, value, create revision) under ``layout.owners`` -> per VIP,
    sorted by VIP text. Pure."""
    vips: dict[str, VipOwners] = {}
    for key, value, created in items:
        rest = key[len(layout.owners):]
        vip, _, leaf = rest.partition("/")
        row = vips.setdefault(vip, VipOwners(vip))
        doc = json_object(value)
        if leaf == "owner":
            node, since = doc.get("node"), doc.get("since")
            row.owner = node if isinstance(node, str) else None
            row.term = created
            row.since = float(since) if isinstance(since, (int, float)) else None
            row.announced = doc.get("announced") is True
        elif leaf.startswith("candidates/"):
            row.candidates.append(leaf[len("candidates/"):])
    return [vips[v] for v in sorted(vips)]


def _when(wall: float | None) -> str:
    if wall is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


@click.group()
@etcd_target
def vip(ctx: click.Context) -> None:
    """Elected VIPs (announce.mode: active_passive) on etcd."""


@vip.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def owners(ctx: click.Context, as_json: bool) -> None:
    """Each elected VIP's owner, term and since when, and its candidates."""
    from anycast_lb.consensus.cli import _run

    async def body(_h: object, store: object, layout: Layout) -> list[VipOwners]:
        from anycast_lb.consensus.store import Store

        assert isinstance(store, Store)
        snap = await store.get_prefix(layout.owners)
        return owners_from([(kv.key, kv.value, kv.create_revision) for kv in snap.items], layout)

    rows = _run(ctx, body)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    if not rows:
        click.echo("no elected VIP has an owner or a candidate")
    for r in rows:
        state = "" if r.owner is None or r.announced else "  (not yet announced)"
        click.echo(f"{r.vip}  owner={r.owner or '-'}  term={r.term if r.term is not None else '-'}"
                   f"  since={_when(r.since)}  candidates={','.join(r.candidates) or '-'}{state}")
