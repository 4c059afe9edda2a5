"""The kernel side of the kernel engine: runs the scripts :mod:`.render` writes.

Like the cluster's steering table, scripts go through ``nft -f -`` (one
script, one atomic transaction: packets see the old maps or the new ones).
A shadow copy of what each service's maps hold lets :meth:`NftForwarder.update`
send only the changed elements.

Errors become :class:`~anycast_lb.errors.KernelEngineError` with nft's own
message; the kernel is then unchanged (the transaction aborted whole).
:meth:`NftForwarder.remove` never raises: it is teardown.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from anycast_lb import log
from anycast_lb.cluster.kernel import run
from anycast_lb.errors import ClusterError, KernelEngineError
from anycast_lb.kernel import render

PROBE_TABLE = "anycast_lb_probe"


class NftRunner(Protocol):
    """Runs one command (argv, optional stdin); its stdout. Raises ClusterError."""

    async def __call__(self, argv: Sequence[str], stdin: str | None = None) -> str: ...


async def check_support(interface: str, runner: NftRunner = run) -> None:
    """Refuse, with a clear error, a host that cannot run the engine: no
    ``nft``, or a kernel without netdev ingress, jhash, dynamic maps with
    timeouts, counter maps or ``fwd`` (``nft --check`` of a table using all of them on
    ``interface``: the kernel validates it and commits nothing).
    Raises KernelEngineError."""
    if shutil.which("nft") is None:
        raise KernelEngineError("forwarding.engine: kernel needs nft (nftables) in PATH")
    try:
        await runner(["nft", "--check", "-f", "-"], render.render_probe(PROBE_TABLE, interface))
    except ClusterError as exc:
        raise KernelEngineError(
            f"forwarding.engine: kernel: this kernel or nft cannot run the engine's table on "
            f"{interface!r} (needs nftables netdev ingress, jhash, dynamic maps and fwd): {exc}"
        ) from exc


def off_link(interface: str, routes: Mapping[str, object]) -> str | None:
    """Why one ``ip -j route get ADDR`` answer (its first entry) does not
    reach ADDR directly on ``interface``, or None when it does. Pure."""
    dev = routes.get("dev")
    if dev != interface:
        return f"routed via {dev!r}, not {interface!r}"
    if "gateway" in routes:
        return f"behind gateway {routes['gateway']} (not on the L2 segment)"
    return None


async def check_on_link(
    interface: str, backends: Iterable[ipaddress.IPv4Address], runner: NftRunner = run,
) -> None:
    """Refuse backends the node cannot reach at L2 on ``interface``: direct
    server return forwards by the backend's MAC on that segment. Raises
    KernelEngineError naming every such backend."""
    async def problem(address: ipaddress.IPv4Address) -> str | None:
        try:
            answer = json.loads(await runner(["ip", "-j", "route", "get", str(address)]) or "[]")
        except (ClusterError, ValueError) as exc:
            return f"{address}: no route ({exc})"
        first = answer[0] if isinstance(answer, list) and answer else {}
        why = off_link(interface, first if isinstance(first, dict) else {})
        return None if why is None else f"{address}: {why}"

    # One lookup per backend, side by side (a node starts faster).
    answers = await asyncio.gather(*(problem(a) for a in sorted(set(backends))))
    problems = [p for p in answers if p is not None]
    if problems:
        raise KernelEngineError("forwarding.engine: kernel needs backends on the L2 segment of "
                                f"{interface!r}: " + "; ".join(problems))


class NftForwarder:
    """One ``netdev`` table of the node, and the shadow of its maps."""

    def __init__(self, settings: render.KernelSettings, runner: NftRunner = run) -> None:
        self.settings = settings
        self._run = runner
        self._shadow: dict[int, render.Tables] = {}
        self._by_index = {svc.index: svc for svc in settings.services}
        self.transactions = 0
        """``nft -f`` transactions the kernel applied."""
        self.refused = 0
        """``nft -f`` transactions the kernel (or ``nft``) refused; the
        table and the shadow stay as they were."""
        self.last_apply_s = 0.0
        """Seconds the last transaction took (render excluded)."""

    def tables(self, index: int) -> render.Tables:
        """What service ``index``'s maps hold now (empty before install)."""
        return self._shadow.get(index, render.Tables())

    async def _nft(self, script: str) -> None:
        started = time.perf_counter()
        try:
            await self._run(["nft", "-f", "-"], script)
        except ClusterError as exc:
            self.refused += 1
            raise KernelEngineError(str(exc)) from exc
        self.last_apply_s = time.perf_counter() - started
        self.transactions += 1

    async def install(self, tables: Mapping[int, render.Tables]) -> None:
        """Create or replace the whole table (flow maps start empty).
        Raises KernelEngineError."""
        await self._nft(render.render_table(self.settings, tables))
        self._shadow = {i: tables.get(i, render.Tables()) for i in self._by_index}

    async def update(self, index: int, new: render.Tables) -> int:
        """Take service ``index``'s maps to ``new`` in one transaction of the
        changed elements; the number of script lines sent (0: nothing to do).
        Raises KernelEngineError (the kernel and the shadow are unchanged)."""
        script = render.render_diff(self.settings, self._by_index[index], self.tables(index), new)
        if script:
            await self._nft(script)
        self._shadow[index] = new
        return script.count("\n")

    async def counters(self) -> dict[tuple[int, ipaddress.IPv4Address], tuple[int, int]]:
        """(packets, bytes) forwarded by this node per (service index,
        backend address). Raises KernelEngineError."""
        try:
            out = await self._run(["nft", "-j", "list", "counters", "table", "netdev",
                                   self.settings.table])
            return render.parse_counters(json.loads(out), self.settings)
        except (ClusterError, ValueError) as exc:
            raise KernelEngineError(f"cannot read the kernel engine's counters: {exc}") from exc

    async def remove(self) -> None:
        """Delete the table (no error when it is missing)."""
        try:
            await self._run(["nft", "-f", "-"], render.render_delete(self.settings))
        except ClusterError as exc:
            log.warning("kernel.teardown_failed", error=str(exc))
        self._shadow.clear()

