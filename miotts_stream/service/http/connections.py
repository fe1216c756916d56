"""Time limits and a cap for HTTP connections, which aiohttp does not give.

aiohttp waits for a request's head as long as its keep-alive timer allows (an hour by
default), never times out a request body, and takes every connection the kernel hands it: an
idle socket, a head sent a byte a second or a body that never comes each hold a file descriptor
for as long as the client likes, and none needs a key, since authentication runs only once a
request is in. `ConnectionGuard` bounds them from outside aiohttp: the listening socket's
protocol factory wraps aiohttp's protocol for each connection in a `GuardedConnection`, which
sees every byte arrive and holds one deadline at a time, by phase:

    phase  from                                               deadline
    HEAD   connecting; the first byte after a response        --http-head-timeout-s
    BODY   the head parsed, for a request with a body          --http-body-timeout-s
    BUSY   the body in full (or none): the handler runs        none (the stream's own limits)
    IDLE   the handler returned                                --http-keepalive-timeout-s

A connection past its deadline is closed; one over --http-max-connections is answered 503 and
closed at once. Where a request stands (head parsed, body complete, handler done) comes from the
`watch_requests` middleware; the bytes themselves are aiohttp's to parse.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import ssl
from http import HTTPStatus

from aiohttp import web

from miotts_stream.service.admission import new_request_id
from miotts_stream.service.engine import ErrorCode, SessionError
from miotts_stream.service.metrics import ServiceMetrics
from miotts_stream.service.options import HttpConnectionOptions

from .errors import error_object

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    HEAD = "head"
    BODY = "body"
    BUSY = "busy"
    IDLE = "idle"


class CloseReason(enum.Enum):
    """Why the guard closed a connection (the `reason` label of the metric)."""

    HEAD_TIMEOUT = "head_timeout"
    BODY_TIMEOUT = "body_timeout"
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    TOO_MANY = "max_connections"


EXPIRED = {
    Phase.HEAD: CloseReason.HEAD_TIMEOUT,
    Phase.BODY: CloseReason.BODY_TIMEOUT,
    Phase.IDLE: CloseReason.KEEPALIVE_TIMEOUT,
}


def _refusal(limit: int, request_id: str) -> bytes:
    """The whole 503 response for a connection over the cap (sent before any request)."""
    error = SessionError(
        ErrorCode.UNAVAILABLE,
        f"server: {limit} HTTP connections open, its limit (--http-max-connections); retry later",
    )
    body = json.dumps(error_object(error)).encode()
    status = HTTPStatus.SERVICE_UNAVAILABLE
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nX-Request-Id: {request_id}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionGuard:
    """The open connections of one HTTP port, their deadlines and their count."""

    def __init__(self, limits: HttpConnectionOptions, metrics: ServiceMetrics | None = None):
        self.limits = limits
        self.metrics = metrics
        self.connections: dict[asyncio.BaseTransport, GuardedConnection] = {}

    def deadline_s(self, phase: Phase) -> float:
        """How long a connection may stay in `phase`; 0: as long as it likes."""
        return {
            Phase.HEAD: self.limits.http_head_timeout_s,
            Phase.BODY: self.limits.http_body_timeout_s,
            Phase.IDLE: self.limits.http_keepalive_timeout_s,
        }.get(phase, 0.0)

    def protocol_factory(self, aiohttp_server: web.Server):
        """For `loop.create_server`: aiohttp's protocol for each connection, guarded."""
        return lambda: GuardedConnection(aiohttp_server(), self)

    def admit(self, connection: GuardedConnection) -> bool:
        limit = self.limits.http_max_connections
        if 0 < limit <= len(self.connections):
            self.closed(CloseReason.TOO_MANY)
            return False
        self.connections[connection.transport] = connection
        if self.metrics is not None:
            self.metrics.http_connections.inc()
        return True

    def discard(self, connection: GuardedConnection) -> None:
        if self.connections.pop(connection.transport, None) is not None and self.metrics:
            self.metrics.http_connections.dec()

    def refusal(self) -> bytes:
        """The 503 for one connection over the cap, with a request id of its own."""
        request_id = new_request_id()
        logger.debug("request %s: refused, over --http-max-connections", request_id)
        return _refusal(self.limits.http_max_connections, request_id)

    def closed(self, reason: CloseReason) -> None:
        if self.metrics is not None:
            self.metrics.http_connections_closed.labels(reason=reason.value).inc()

    def middleware(self):
        """Tells each request's connection where the request stands: the handler starts once
        the head is parsed; the body's end; the handler's return."""

        @web.middleware
        async def watch_requests(request: web.Request, handler):
            connection = self.connections.get(request.transport)
            if connection is None:
                return await handler(request)
            connection.request_started(request)
            try:
                return await handler(request)
            finally:
                connection.request_finished()

        return watch_requests


class GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the guard's deadline on it."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard):
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.phase = Phase.HEAD
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    # ---- the transport's calls, passed on to aiohttp ----------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.guard.admit(self):
            self._refused = True
            transport.write(self.guard.refusal())  # type: ignore[attr-defined]
            transport.close()  # after the 503 is out
            return
        self.inner.connection_made(transport)
        self._enter(Phase.HEAD)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self.phase is Phase.IDLE:  # the next request begins
            self._enter(Phase.HEAD)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._refused else self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._refused:
            return
        self.guard.discard(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self._refused:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            self.inner.resume_writing()

    # ---- where the request stands (the middleware) ------------------------------------------
    def request_started(self, request: web.Request) -> None:
        if request.body_exists and not request.content.is_eof():
            self._enter(Phase.BODY)
            request.content.on_eof(self._body_received)
        else:
            self._enter(Phase.BUSY)

    def _body_received(self) -> None:
        if self.phase is Phase.BODY:
            self._enter(Phase.BUSY)

    def request_finished(self) -> None:
        self._enter(Phase.IDLE)

    # ---- deadlines --------------------------------------------------------------------------
    def _enter(self, phase: Phase) -> None:
        self._cancel_timer()
        self.phase = phase
        limit = self.guard.deadline_s(phase)
        if limit > 0 and self.transport is not None:
            self._timer = asyncio.get_running_loop().call_later(limit, self._expired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        reason = EXPIRED[self.phase]
        logger.debug("HTTP connection %s closed: %s", self._peer(), reason.value)
        self.guard.closed(reason)
        if self.phase is Phase.IDLE:
            transport.close()  # an idle kept-alive connection: a polite close
        else:
            transport.abort()  # a client sending nothing or too slowly: nothing to finish

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with each connection under a `ConnectionGuard`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        ssl_context: ssl.SSLContext | None = None,
    ):
        super().__init__(runner, ssl_context=ssl_context)
        self._host, self._port, self._guard = host, port, guard

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        # A TLS handshake comes before the guard sees the connection: it gets the head's time.
        handshake_s = self._guard.limits.http_head_timeout_s or None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=handshake_s if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=True,
        )
