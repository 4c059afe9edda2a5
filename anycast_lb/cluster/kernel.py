"""The kernel side of steering: runs the scripts :mod:`.nft` and :mod:`.routing` render.

nftables is driven through ``nft -f -`` (the nft CLI's batch input: one
script, one atomic transaction). No Python binding is used: the official
one (``python3-nftables``) ships only with the distribution's Python, and
the PyPI copies of it are unmaintained forks. Policy routing goes through
``ip`` (iproute2); sysctls through /proc/sys.

Errors become :class:`~anycast_lb.errors.ClusterError` with the tool's own
message. :meth:`KernelDataPath.remove` never raises: it is teardown.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from anycast_lb import log
from anycast_lb.cluster import nft, routing
from anycast_lb.errors import ClusterError
from anycast_lb.flows import FlowKey

if TYPE_CHECKING:
    from anycast_lb.cluster.ownership import MapPlan


async def run(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run one command; its stdout. Raises ClusterError with its stderr."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise ClusterError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode != 0:
        message = " | ".join(line.strip() for line in err.decode(errors="replace").splitlines()[:3])
        raise ClusterError(f"{' '.join(argv[:3])} failed (exit {proc.returncode}): {message}")
    return out.decode(errors="replace")


class KernelDataPath:
    """Steering in the kernel: one nftables table, policy routes and rules, sysctls."""

    def __init__(
        self, nft_settings: nft.NftSettings, routing_settings: routing.RoutingSettings,
        *, proc_sys: Path = Path("/proc/sys"),
    ) -> None:
        self.nft = nft_settings
        self.routing = routing_settings
        self._proc_sys = proc_sys
        self._routed = False
        self._restore: dict[str, int] = {}
        self.transactions = 0
        self.last_apply_s = 0.0

    def unavailable(self) -> str | None:
        """Why steering cannot run here (missing tools), or None."""
        for tool in ("nft", "ip"):
            if shutil.which(tool) is None:
                return f"{tool} not found in PATH"
        return None

    async def _nft(self, script: str) -> None:
        started = time.perf_counter()
        await run(["nft", "-f", "-"], stdin=script)
        self.last_apply_s = time.perf_counter() - started
        self.transactions += 1

    async def _rules(self) -> list[dict[str, object]]:
        rules = json.loads(await run(["ip", "-j", "rule", "show"]) or "[]")
        return [r for r in rules if isinstance(r, dict)]

    def _read_sysctl(self, key: str) -> int:
        try:
            return int((self._proc_sys / key).read_text().strip())
        except (OSError, ValueError) as exc:
            raise ClusterError(f"cannot read sysctl {key.replace('/', '.')}: {exc}") from exc

    def _write_sysctl(self, key: str, value: int) -> None:
        try:
            (self._proc_sys / key).write_text(f"{value}\n")
        except OSError as exc:
            raise ClusterError(f"cannot set sysctl {key.replace('/', '.')}: "
                               f"{exc.strerror or exc}") from exc

    async def install(self, live: Sequence[int], owner: Mapping[FlowKey, int]) -> None:
        """Set up routing (once), then create or replace the whole table
        with ``owner`` as the map. Raises ClusterError."""
        if not self._routed:
            current = {k: self._read_sysctl(k) for k in routing.sysctl_keys(self.routing.interface)}
            for key, value in routing.sysctl_changes(self.routing.interface, current).items():
                self._write_sysctl(key, value)
                self._restore.setdefault(key, current[key])
                log.event("cluster.sysctl", key=key.replace("/", "."), value=value,
                          was=current[key])
            self._routed = True  # from here on, remove() undoes what was done
            for argv in routing.setup_commands(self.routing, await self._rules()):
                await run(argv)
        await self._nft(nft.render_table(self.nft, live, owner))

    async def update(self, live: Sequence[int] | None, plan: MapPlan) -> None:
        """One transaction: the orphan chain (when ``live`` is given) and the
        map changes of ``plan``. Raises ClusterError; the kernel is then
        unchanged (the transaction aborted whole)."""
        script = nft.render_update(self.nft, live, plan)
        if script:
            await self._nft(script)

    async def counters(self) -> dict[str, int]:
        out = await run(["nft", "-j", "list", "counters", "table", "ip", self.nft.table])
        return nft.parse_counters(json.loads(out))

    async def remove(self) -> None:
        """Delete the table, the rules and routes added, restore sysctls."""
        try:
            await run(["nft", "-f", "-"], stdin=nft.render_delete(self.nft))
        except ClusterError as exc:
            log.warning("cluster.teardown_failed", part="nft", error=str(exc))
        if self._routed:
            try:
                commands = routing.teardown_commands(self.routing, await self._rules())
            except ClusterError as exc:
                log.warning("cluster.teardown_failed", part="routing", error=str(exc))
                commands = []
            for argv in commands:
                try:
                    await run(argv)
                except ClusterError as exc:
                    # Flushing a table that holds no route fails (exit 2): nothing to undo.
                    if argv[:3] != ["ip", "route", "flush"]:
                        log.warning("cluster.teardown_failed", part="routing", error=str(exc))
            for key, value in self._restore.items():
                try:
                    self._write_sysctl(key, value)
                except ClusterError as exc:
                    log.warning("cluster.teardown_failed", part="sysctl", error=str(exc))
            self._restore.clear()
            self._routed = False
