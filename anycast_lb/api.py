"""The node's HTTP API (aiohttp), with its connection limits.

=======================  =====================================================
``GET /healthz``         200 while the node's event loop runs (liveness)
``GET /readyz``          200 while at least one service has ``min_healthy``
                         backends up, the node is not draining and (bgp)
                         ExaBGP answered within 3 s; else 503 with the reason
``GET /status``          JSON: node, services, backends, BGP announcement state,
                         cluster (flow survival: peers, flows owned, map size)
``GET /metrics``         Prometheus text exposition
``POST /drain``          admin: start a drain (RFC 8326 GRACEFUL_SHUTDOWN,
                         then withdraw); ``Authorization: Bearer TOKEN``.
                         With consensus, once a drain slot is held: 202
                         ``{"draining": false, "waiting": true, "holders"}``
                         while queued for one; ``?no_wait=1``: 409 naming the
                         holders instead of queueing, 503 if etcd cannot say
``POST /undrain``        admin: end a drain and announce again
``POST /reload``         admin: re-read the node's config file and apply it
                         live; 200 applied, 409 refused (with the reason)
``POST /backends/{service}/{backend}/drain``
                         admin: no new flows to backend ``addr:port`` (``[v6]:port``)
                         of ``service``, established ones kept; ``.../undrain``
                         ends it; ``.../weight`` with ``{"weight": N}`` (1..1000)
                         reweights it. Standalone node-local, with consensus a
                         pushed revision. 200 applied, 202 pushed but not yet
                         applied here, 404 unknown, 409 refused or lost a push
                         race, 503 etcd cannot take it
=======================  =====================================================

Every ``GET`` route also answers ``HEAD``. ``docs/openapi.yaml`` is the
OpenAPI 3 description of these routes; a test keeps the two in step.

Admin endpoints answer 403 when no ``api.admin_token_file`` is configured (or
it has become unusable) and 401 when the token is missing or wrong; the token
is compared in constant time (:func:`hmac.compare_digest`). Every error is a
JSON body ``{"error": "..."}`` with a 4xx status (405 keeps its ``Allow``
header); no traceback ever reaches a client.

Limits (``api.*`` in the config, :class:`~anycast_lb.config.ApiConfig`), all
enforced per connection by :class:`_Connection`, which wraps aiohttp's own
per-connection protocol:

- ``max_connections``: past it, a new connection gets a best-effort 503 and
  is closed at once, so a flood costs one accept and one close per
  connection, never a descriptor held. While the cap is reached every new
  connection is refused, ``/healthz`` included: idle or half-sent requests
  hold their slot until ``header_timeout`` closes them, which bounds such an
  outage of the API (never of the data path) to that many seconds.
- ``header_timeout``: a connection with no request in progress for that long
  (a request line and headers not complete within it after connecting or
  after the previous answer, or an idle keep-alive) is aborted.
- ``body_timeout``: the whole body must arrive within it once the headers are
  in; 408 otherwise. ``max_body_size``: larger bodies get 413.
- A client that half-closes (``shutdown(SHUT_WR)``) after a whole request
  gets its answer, then the connection is closed; one that half-closes with
  no whole request sent is closed at once.
- aiohttp's parser limits stay at their defaults: request line and each
  header field at most 8190 bytes, at most 128 header fields (400 past them).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from aiohttp import hdrs, web
from aiohttp.web import RequestHandler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from anycast_lb import log, runtime
from anycast_lb.config import ApiConfig, format_host_port
from anycast_lb.errors import (
    BindError,
    ConfigError,
    ConsensusConflict,
    ConsensusError,
    UnknownBackend,
)
from anycast_lb.listeners import close_server
from anycast_lb.liveapply import ApplyResult
from anycast_lb.metrics import CONTENT_TYPE

LINGER_S = 1.0
"""After an answer sent before the whole body arrived (408, 413), seconds the
rest of the body is read and discarded before the connection is closed, so
the client can read the answer instead of a reset."""

TOKEN_MAX_BYTES = 4096
"""A token file longer than this is refused (it is not a token)."""

_FULL_BODY = b'{"error": "too many API connections; try again soon"}'
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_FULL_BODY), _FULL_BODY)
)


@dataclass(frozen=True)
class DrainAnswer:
    """What ``POST /drain`` did: ``draining`` now, or ``waiting`` (queued)
    for a drain slot held by ``holders``, or neither (refused, no wait)."""

    draining: bool
    waiting: bool = False
    holders: tuple[str, ...] = ()


class NodeControl(Protocol):
    """What the API needs from a node."""

    def status(self) -> dict[str, Any]: ...

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason)."""
        ...

    def metrics_exposition(self) -> bytes: ...

    async def drain(self, reason: str) -> DrainAnswer | None:
        """None or ``draining``: the node drains. A node with drain slots
        also takes ``wait=False`` (``?no_wait=1``)."""
        ...

    async def undrain(self) -> bool:
        """False when refused (the node is stopping)."""
        ...

    async def reload(self) -> ApplyResult:
        """Re-read the node's config file and apply it live."""
        ...

    async def change_backend(self, change: runtime.Change) -> runtime.BackendAnswer:
        """Drain, undrain or reweight one backend. Raises UnknownBackend,
        ConsensusError."""
        ...


def read_token_file(path: Path) -> str:
    """The admin bearer token held in ``path`` (surrounding whitespace
    stripped).

    Raises ConfigError when the file is missing or unreadable, is not a
    regular file, grants any permission to group or others (``mode & 0o077``:
    a token others can read is no secret), is larger than
    ``TOKEN_MAX_BYTES`` bytes, is not UTF-8, or holds no token.
    """
    field = "api.admin_token_file"

    def refuse(reason: str) -> ConfigError:
        return ConfigError(str(path), [f"{field}: {reason}"])

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise refuse(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise refuse(f"{path} is accessible by group or others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
        data = os.read(fd, TOKEN_MAX_BYTES + 1)
    except OSError as exc:
        raise refuse(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > TOKEN_MAX_BYTES:
        raise refuse(f"{path} is larger than {TOKEN_MAX_BYTES} bytes")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise refuse(f"{path} is not UTF-8") from exc
    if not token:
        raise refuse(f"{path} is empty")
    return token


def _error(status: int, message: str, headers: dict[str, str] | None = None,
           close: bool = False) -> web.Response:
    response = web.json_response({"error": message}, status=status, headers=headers)
    if close:
        response.force_close()
    return response


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # Keep what the status needs (Allow on 405), not the text body's headers.
        kept = {name: value for name, value in exc.headers.items()
                if name not in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH)}
        return _error(exc.status, exc.reason, kept, close=exc.status in (408, 413))
    except Exception as exc:  # the API must never leak a traceback
        log.error("api.error", path=request.path, error=repr(exc))
        return _error(500, "internal error")


@dataclass(eq=False)
class ConnectionStats:
    """Counters of the API's connection limits, exported in ``/metrics``."""

    active: int = 0
    refused: int = 0
    header_timeouts: int = 0
    body_timeouts: int = 0
    too_large: int = 0
    malformed: int = 0

    def collect(self) -> Iterator[Metric]:
        """prometheus-client collector protocol."""
        yield GaugeMetricFamily("anycast_lb_api_connections", "Open API connections",
                                value=self.active)
        refused = CounterMetricFamily(
            "anycast_lb_api_connections_refused", "API connections refused at api.max_connections")
        refused.add_metric([], self.refused)
        yield refused
        rejected = CounterMetricFamily(
            "anycast_lb_api_requests_rejected",
            "API connections or requests ended by a limit", labels=["reason"])
        rejected.add_metric(["header_timeout"], self.header_timeouts)
        rejected.add_metric(["body_timeout"], self.body_timeouts)
        rejected.add_metric(["body_too_large"], self.too_large)
        rejected.add_metric(["malformed"], self.malformed)
        yield rejected


class _CountClientErrors(logging.Filter):
    """aiohttp logs every malformed request (400) with a traceback, so garbage
    on the API port would flood the log: count those instead. Anything else
    aiohttp logs (its own failures) goes through."""

    def __init__(self, stats: ConnectionStats) -> None:
        super().__init__()
        self._stats = stats

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Error handling request"):
            self._stats.malformed += 1
            return False
        # The logger itself passes every level (so each client error above is
        # counted, even those aiohttp logs at debug); the node's level applies here.
        return record.levelno >= logging.getLogger("anycast_lb").getEffectiveLevel()


def _aiohttp_logger(stats: ConnectionStats) -> logging.Logger:
    """A logger for one server's aiohttp protocol, below ``anycast_lb`` (so
    it uses the node's log format) and outside the logger registry (so each
    server has its own filter)."""
    logger = logging.Logger("anycast_lb.api.http")
    logger.parent = logging.getLogger("anycast_lb")
    logger.setLevel(logging.DEBUG)
    logger.addFilter(_CountClientErrors(stats))
    return logger


class _Connection(asyncio.Protocol):
    """One accepted API connection: admits it under ``max_connections``,
    runs aiohttp's protocol for it, and enforces the header timeout and the
    half-close rule (see the module docstring)."""

    def __init__(self, server: ApiServer) -> None:
        self._server = server
        self._handler: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.half_closed = False
        """True once the client has shut down its sending side."""

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's is no asyncio.Transport subclass
        server = self._server
        stats = server.stats
        if stats.active >= server.config.max_connections:
            stats.refused += 1
            transport.write(_FULL)
            transport.close()
            return
        handler = server.make_handler()
        if handler is None:  # stopping
            transport.abort()
            return
        stats.active += 1
        self._handler = handler
        self._transport = transport
        server.connections[transport] = self
        self._arm()
        handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> bool:
        handler = self._handler
        if handler is None:
            return False
        self.half_closed = True
        # aiohttp's own idle test (its keep-alive check): waiting for a request
        # that is not whole yet, so none can come now: close at once.
        waiter: asyncio.Future[None] | None = getattr(handler, "_waiter", None)
        if waiter is not None and not waiter.done():
            return False
        # A whole request is in: keep our sending side open, answer it, then
        # aiohttp closes the connection.
        handler.close()
        return True

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        handler, self._handler = self._handler, None
        if handler is None:
            return
        self._server.stats.active -= 1
        if self._transport is not None:
            self._server.connections.pop(self._transport, None)
            self._transport = None
        handler.connection_lost(exc)

    def request_started(self) -> None:
        self._disarm()

    def request_finished(self) -> None:
        if self._handler is not None:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._server.config.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._server.stats.header_timeouts += 1
            # abort, not close: a client that does not read would hold a
            # closing transport with unsent data forever.
            self._transport.abort()


class ApiServer:
    """The HTTP API of ``node`` under ``config``'s limits.

    ``start`` binds and returns the bound ``(host, port)``; ``cleanup``
    closes the listener and every connection.
    """

    def __init__(self, node: NodeControl, config: ApiConfig) -> None:
        self.node = node
        self.config = config
        self.stats = ConnectionStats()
        self.connections: dict[asyncio.Transport, _Connection] = {}
        self._runner = web.AppRunner(make_app(node, config, self), access_log=None,
                                     handle_signals=False, lingering_time=LINGER_S,
                                     logger=_aiohttp_logger(self.stats))
        self._listener: asyncio.AbstractServer | None = None

    @property
    def app(self) -> web.Application:
        return self._runner.app

    def make_handler(self) -> RequestHandler | None:
        """aiohttp's protocol for one new connection; None once stopped."""
        server = self._runner.server
        return None if server is None else server()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Check the admin token file, then listen on ``host:port`` (port 0:
        any free port). Raises ConfigError for an unusable token file (see
        :func:`read_token_file`) and BindError when the address cannot be
        bound."""
        if self.config.admin_token_file is not None:
            read_token_file(self.config.admin_token_file)
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        try:
            self._listener = await loop.create_server(
                lambda: _Connection(self), host, port, reuse_address=True,
                backlog=min(self.config.max_connections, 1024))
        except OSError as exc:
            await self._runner.cleanup()
            raise BindError(f"API cannot listen on {format_host_port(host, port)}: "
                            f"{exc.strerror or exc}") from exc
        bound = self._listener.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def cleanup(self) -> None:
        """Stop listening, then let aiohttp finish and close every connection."""
        if self._listener is not None:
            await close_server(self._listener)
        await self._runner.cleanup()
        for transport in list(self.connections):
            transport.abort()

    def request_started(self, request: web.BaseRequest) -> _Connection | None:
        transport = request.transport
        connection = None if transport is None else self.connections.get(transport)
        if connection is not None:
            connection.request_started()
        return connection


def make_app(node: NodeControl, config: ApiConfig, server: ApiServer | None = None
             ) -> web.Application:
    """Build the aiohttp application for ``node``.

    The token file is read (and its mode checked) at each admin request, so a
    rotated token takes effect without a restart. With ``server``, each
    request pauses its connection's header timer while it runs.
    """
    token_file = config.admin_token_file

    @web.middleware
    async def limits(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        connection = server.request_started(request) if server is not None else None
        try:
            length = request.content_length
            if length is not None and length > config.max_body_size:
                if server is not None:
                    server.stats.too_large += 1
                raise web.HTTPRequestEntityTooLarge(max_size=config.max_body_size,
                                                    actual_size=length)
            try:
                async with asyncio.timeout(config.body_timeout):
                    await request.read()  # bounded by client_max_size (413)
            except TimeoutError:
                if server is not None:
                    server.stats.body_timeouts += 1
                raise web.HTTPRequestTimeout(
                    reason=f"request body not received within {config.body_timeout} s") from None
            except web.HTTPRequestEntityTooLarge:
                if server is not None:
                    server.stats.too_large += 1
                raise
            return await handler(request)
        finally:
            if connection is not None:
                connection.request_finished()

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
        if token_file is None:
            return _error(403, "admin endpoints are disabled: no api.admin_token_file configured")
        try:
            token = read_token_file(token_file)
        except ConfigError as exc:
            log.warning("api.token_unusable", problem="; ".join(exc.problems))
            return _error(403, "admin endpoints are disabled: api.admin_token_file is unusable")
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
        if request.query.get("no_wait", "") in ("1", "true"):
            try:
                answer = await cast(Any, node).drain("api", wait=False)
            except ConsensusError as exc:
                return _error(503, f"cannot take a drain slot: {exc}")
        else:
            answer = await node.drain("api")
        if answer is None or answer.draining:
            return web.json_response({"draining": True})
        body = {"draining": False, "waiting": answer.waiting, "holders": list(answer.holders)}
        if answer.waiting:
            return web.json_response(body, status=202)
        holders = ", ".join(answer.holders) or "other nodes"
        return web.json_response({**body, "error": f"every drain slot is held (by {holders})"},
                                 status=409)

    async def undrain(request: web.Request) -> web.Response:
        if (denied := authorize(request)) is not None:
            return denied
        if not await node.undrain():
            return _error(409, "the node is stopping; it cannot be undrained")
        return web.json_response({"draining": False})

    async def reload(request: web.Request) -> web.Response:
        if (denied := authorize(request)) is not None:
            return denied
        result = await node.reload()
        return web.json_response(result.as_dict(), status=200 if result.applied else 409)

    async def backend_change(request: web.Request) -> web.Response:
        if (denied := authorize(request)) is not None:
            return denied
        action = request.path.rsplit("/", 1)[1]
        service, backend = request.match_info["service"], request.match_info["backend"]
        if action == "weight":
            try:
                body = await request.json()
            except ValueError:
                return _error(400, 'body must be JSON: {"weight": N}')
            weight = body.get("weight") if isinstance(body, dict) else None
            if (not isinstance(weight, int) or isinstance(weight, bool)
                    or not 1 <= weight <= 1000 or set(body) != {"weight"}):
                return _error(400, 'body must be {"weight": N} with N an integer 1..1000')
            change = runtime.Change(service, backend, weight=weight)
        else:
            change = runtime.Change(service, backend, drain=action == "drain")
        try:
            answer = await node.change_backend(change)
        except UnknownBackend as exc:
            return _error(404, str(exc))
        except ConsensusConflict as exc:
            return _error(409, f"another config push won: {exc}; try again")
        except ConsensusError as exc:
            return _error(503, f"etcd cannot take the change: {exc}")
        status = 200 if answer.applied else 202 if answer.pending else 409
        return web.json_response({"change": change.describe(), **answer.as_dict()}, status=status)

    app = web.Application(middlewares=[_json_errors, limits],
                          client_max_size=config.max_body_size)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/drain", drain)
    app.router.add_post("/undrain", undrain)
    app.router.add_post("/reload", reload)
    for action in ("drain", "undrain", "weight"):
        app.router.add_post(f"/backends/{{service}}/{{backend}}/{action}", backend_change)
    return app
