"""The node's HTTP API (aiohttp).

=======================  =====================================================
``GET /healthz``         200 while the node's event loop runs (liveness)
``GET /readyz``          200 while at least one service has ``min_healthy``
                         backends up, the node is not draining and (bgp)
                         ExaBGP answered within 3 s; else 503 with the reason
``GET /status``          JSON: node, services, backends, BGP announcement state,
                         cluster (flow survival: peers, flows owned, map size)
``GET /metrics``         Prometheus text exposition
``POST /drain``          admin: start a drain (RFC 8326 GRACEFUL_SHUTDOWN,
                         then withdraw); ``Authorization: Bearer TOKEN``
``POST /undrain``        admin: end a drain and announce again
=======================  =====================================================

Admin endpoints answer 403 when no ``api.admin_token_file`` is configured and
401 when the token is missing or wrong. Every error is a JSON body
``{"error": "..."}`` with a 4xx status; no traceback ever reaches a client.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from anycast_lb import log
from anycast_lb.metrics import CONTENT_TYPE


class NodeControl(Protocol):
    """What the API needs from a node."""

    def status(self) -> dict[str, Any]: ...

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason)."""
        ...

    def metrics_exposition(self) -> bytes: ...

    async def drain(self, reason: str) -> None: ...

    async def undrain(self) -> bool:
        """False when refused (the node is stopping)."""
        ...


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)
    except Exception as exc:  # the API must never leak a traceback
        log.error("api.error", path=request.path, error=repr(exc))
        return _error(500, "internal error")


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        log.warning("api.token_unreadable", path=str(path), error=exc.strerror or str(exc))
        return None
    return token or None


def make_app(node: NodeControl, admin_token_file: Path | None) -> web.Application:
    """Build the aiohttp application for ``node``.

    The token file is read at each admin request, so a rotated token takes
    effect without a restart.
    """

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        ready, reason = node.readiness()
        return web.json_response(
            {"ready": ready, "reason": reason}, status=200 if ready else 503
        )

    async def status(_: web.Request) -> web.Response:
        return web.json_response(node.status())

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=node.metrics_exposition(), headers={"Content-Type": CONTENT_TYPE})

    def authorize(request: web.Request) -> web.Response | None:
        token = _read_token(admin_token_file)
        if token is None:
            return _error(403, "admin endpoints are disabled: no api.admin_token_file configured")
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return _error(401, "missing or wrong bearer token")
        return None

    async def drain(request: web.Request) -> web.Response:
        if (denied := authorize(request)) is not None:
            return denied
        await node.drain("api")
        return web.json_response({"draining": True})

    async def undrain(request: web.Request) -> web.Response:
        if (denied := authorize(request)) is not None:
            return denied
        if not await node.undrain():
            return _error(409, "the node is stopping; it cannot be undrained")
        return web.json_response({"draining": False})

    app = web.Application(middlewares=[_json_errors])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/drain", drain)
    app.router.add_post("/undrain", undrain)
    return app
