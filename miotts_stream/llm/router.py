"""Several OpenAI-compatible LLM servers as one token source (`--llm-base-url` repeated).

Each request goes to the server with the fewest requests in flight (ties: the one that has
started fewer, so idle servers take turns). Least-in-flight rather than round robin because
speech requests differ in length by orders of magnitude: a server holding long utterances
should not get every other request.

A server is taken out when a request to it fails before its first token (connection refused,
timeout, HTTP 429 or 5xx) or when its health check fails (`GET /v1/models`, every
`health_interval_s`). While out it is probed with a doubling delay (`probe_min_s` up to
`probe_max_s`) and put back on its first good answer. A request that fails before its first
token is sent to another server at once: nothing of it reached the client yet. One that fails
after its first token cannot be moved (a second server would sample different codes), so it
ends with `LLMUnavailableError`, which the service reports as UNAVAILABLE: the client retries
the whole request and lands on a server that works. A request refused as invalid
(`LLMRequestError`, HTTP 4xx) is not retried: every server would refuse it.

When every server is out, a request still tries each once (the health state may be seconds
old) before giving up with `LLMUnavailableError`, and the router's state is UNREACHABLE until
one is back: the service reports that as health NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import aiohttp

from .base import (
    EngineState,
    EngineStateListener,
    LLMError,
    LLMRequestError,
    LLMUnavailableError,
    RunawayGuard,
    SamplingOptions,
    TokenStream,
    prepare_request,
    unique_request_id,
)
from .openai_source import OpenAITokenSource, OpenAITokenStream

logger = logging.getLogger(__name__)

NO_SERVER_MESSAGE = "speech LLM unavailable; retry later"
MID_STREAM_MESSAGE = "the speech LLM server went away during this request; retry"


@dataclass(eq=False)
class LLMServer:
    """One server behind the router and what the router knows of it (read by the metrics)."""

    url: str
    source: OpenAITokenSource
    up: bool = True
    in_flight: int = 0  # requests holding this server now
    requests: int = 0  # requests sent to it, ever
    failures: int = 0  # failed requests and failed health checks, ever
    last_error: str = ""
    probe_delay_s: float = 0.0  # while out: the wait before the next probe
    state_changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class LLMRouter:
    """A `TokenSource` over several OpenAI-compatible servers (see the module's docstring).

    base_urls: the servers ("http://host:8000/v1"), at least one, no repeats.
    model, api_key, timeout_s, connect_timeout_s, extra_body: as `OpenAITokenSource`, for every
        server.
    max_connections: per server (each may end up holding every stream).
    health_interval_s: how often a server in service is checked.
    health_timeout_s: longest wait for a health answer.
    probe_min_s, probe_max_s: the delay before probing a server that was taken out, doubling
        after each failed probe up to the maximum.
    """

    def __init__(
        self,
        base_urls: list[str],
        model: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        guard: RunawayGuard | None = None,
        extra_body: dict | None = None,
        max_connections: int = 256,
        health_interval_s: float = 5.0,
        health_timeout_s: float = 2.0,
        probe_min_s: float = 0.5,
        probe_max_s: float = 30.0,
    ) -> None:
        if not base_urls:
            raise ValueError("LLMRouter needs at least one server URL")
        if len(set(base_urls)) != len(base_urls):
            raise ValueError("--llm-base-url: the same server is given twice")
        if not 0 < probe_min_s <= probe_max_s:
            raise ValueError("probe delays: need 0 < probe_min_s <= probe_max_s")
        self.guard = guard or RunawayGuard()
        self.servers = [
            LLMServer(
                url,
                OpenAITokenSource(
                    url,
                    model=model,
                    api_key=api_key,
                    timeout_s=timeout_s,
                    connect_timeout_s=connect_timeout_s,
                    # Failing over to another server beats retrying this one.
                    connect_retries=0,
                    guard=self.guard,
                    extra_body=extra_body,
                    max_connections=max_connections,
                ),
            )
            for url in base_urls
        ]
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.probe_min_s = probe_min_s
        self.probe_max_s = probe_max_s
        self._watchers: list[asyncio.Task] = []
        # SERVING while any server is in service, else UNREACHABLE: the replica's health, so
        # that a load balancer sends streams to replicas whose LLM servers answer.
        self._state = EngineState.SERVING
        self._listeners: list[EngineStateListener] = []

    @property
    def name(self) -> str:
        return f"router over {len(self.servers)} servers: " + ", ".join(
            s.source.api_root for s in self.servers
        )

    def start(self) -> None:
        """Start the health checks (on the running loop); `stream` calls it on first use."""
        if self._watchers:
            return
        loop = asyncio.get_running_loop()
        self._watchers = [
            loop.create_task(self._watch(server), name=f"llm-health {server.url}")
            for server in self.servers
        ]

    def stream(
        self,
        text: str,
        options: SamplingOptions,
        request_id: str | None = None,
        language: str = "auto",
    ) -> RoutedTokenStream:
        self.start()
        normalized = prepare_request(text, options, language)  # a bad request fails here
        max_tokens = self.guard.budget(normalized, options.max_tokens)
        return RoutedTokenStream(
            self, unique_request_id(request_id), normalized, options, max_tokens
        )

    async def close(self) -> None:
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watchers = []
        for server in self.servers:
            await server.source.close()

    @property
    def state(self) -> EngineState:
        return self._state

    def add_state_listener(self, listener: EngineStateListener) -> None:
        """Calls `listener(state)` on every change of `state` (not for the current one)."""
        self._listeners.append(listener)

    def _update_state(self) -> None:
        state = EngineState.SERVING if any(s.up for s in self.servers) else EngineState.UNREACHABLE
        if state is self._state:
            return
        self._state = state
        if state is EngineState.SERVING:
            logger.info("speech LLM: a server is back in service")
        else:
            logger.error("speech LLM: every server is out of service; probing them")
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                logger.exception("speech LLM state listener failed")

    # ---- choosing and judging servers ------------------------------------------------------
    def pick(self, tried: set[LLMServer]) -> LLMServer | None:
        """The server for a request's next attempt: the fewest in flight among those in
        service and not tried yet; if none is in service, any not tried yet."""
        untried = [s for s in self.servers if s not in tried]
        candidates = [s for s in untried if s.up] or untried
        if not candidates:
            return None
        return min(candidates, key=lambda s: (s.in_flight, s.requests))

    def server_failed(self, server: LLMServer, reason: str, *, probe: bool = False) -> None:
        """A request to `server` or a health check (`probe`) failed: take the server out; if
        it is out already, a failed probe doubles the wait before the next one."""
        server.failures += 1
        server.last_error = reason
        if server.up:
            server.up = False
            server.probe_delay_s = self.probe_min_s
            logger.warning("speech LLM server %s taken out: %s", server.url, reason)
            server.state_changed.set()  # its watcher starts probing
            self._update_state()
        elif probe:
            server.probe_delay_s = min(self.probe_max_s, 2 * server.probe_delay_s)

    def server_ok(self, server: LLMServer) -> None:
        """A health check passed, or a request got its first code: the server serves."""
        if not server.up:
            server.up = True
            logger.info("speech LLM server %s back in service", server.url)
            server.state_changed.set()  # its watcher goes back to the health interval
            self._update_state()

    async def _watch(self, server: LLMServer) -> None:
        """Checks a server in service every health_interval_s; probes one that is out with a
        growing delay. A request that takes the server out wakes it to start probing."""
        while True:
            delay = self.health_interval_s if server.up else server.probe_delay_s
            server.state_changed.clear()
            try:
                await asyncio.wait_for(server.state_changed.wait(), delay)
                continue  # its state changed meanwhile: start over with the right delay
            except TimeoutError:
                pass
            problem = await server.source.check_health(self.health_timeout_s)
            if problem is None:
                self.server_ok(server)
            else:
                self.server_failed(server, f"health check: {problem}", probe=True)


class RoutedTokenStream(TokenStream):
    """One request through the router: a stream from one server at a time, moved to another
    while no code has reached the consumer."""

    def __init__(
        self,
        router: LLMRouter,
        request_id: str,
        normalized_text: str,
        options: SamplingOptions,
        max_tokens: int,
    ) -> None:
        super().__init__(request_id, max_tokens)
        self._router = router
        self._text = normalized_text
        self._options = options
        self._tried: set[LLMServer] = set()
        self._inner: TokenStream | None = None
        self.server: LLMServer | None = None  # the one serving it now (or last)
        self._holding = False  # counted in server.in_flight
        self._received_code = False
        self._dropped_before = 0  # by earlier attempts

    async def _receive(self) -> None:
        errors: list[str] = []
        while True:
            if self._inner is None:
                self._attach(errors)
            # Locals: an abort from another task may detach while this one waits.
            inner, server = self._inner, self.server
            assert inner is not None and server is not None
            try:
                codes = await inner.next_codes()
            except LLMRequestError:
                raise  # the request itself is refused: another server would refuse it too
            except LLMError as err:
                self.dropped_tokens = self._dropped_before + inner.dropped_tokens
                await self._detach()
                if self._received_code:
                    if _connection_failure(err):
                        self._router.server_failed(server, str(err))
                    raise LLMUnavailableError(
                        f"{server.url}: {err}", client_message=MID_STREAM_MESSAGE
                    ) from err
                self._router.server_failed(server, str(err))
                errors.append(f"{server.url}: {err}")
                self._dropped_before = self.dropped_tokens
                if self._cancel_requested:
                    self._end("cancelled")
                    return
                continue
            self.dropped_tokens = self._dropped_before + inner.dropped_tokens
            if codes:
                if not self._received_code and not server.up:
                    self._router.server_ok(server)  # tried while out (all were), and it works
                self._received_code = True
                self._pending.extend(codes)
            else:
                self._end(inner.finish_reason or "stop")
                await self._detach()
            return

    def _attach(self, errors: list[str]) -> None:
        server = self._router.pick(self._tried)
        if server is None:
            raise LLMUnavailableError(
                f"no speech LLM server served the request ({len(self._tried)} tried): "
                + "; ".join(errors),
                client_message=NO_SERVER_MESSAGE,
            )
        self._tried.add(server)
        self.server = server
        server.in_flight += 1
        server.requests += 1
        self._holding = True
        # The request was checked, normalized and budgeted once in `LLMRouter.stream`; every
        # attempt sends that same request under the same id.
        self._inner = OpenAITokenStream(
            server.source, self.request_id, self._text, self._options, self.max_tokens
        )

    async def _detach(self) -> None:
        """Let go of the current server's stream (aborting it if it still runs)."""
        inner, self._inner = self._inner, None
        if self._holding and self.server is not None:
            self.server.in_flight -= 1
            self._holding = False
        if inner is not None:
            await inner.aclose()

    async def _abort(self) -> None:
        await self._detach()

    async def _release(self) -> None:
        await self._detach()


def _connection_failure(err: BaseException) -> bool:
    """Whether the server (not just this request) failed: the connection broke or hung."""
    cause = err.__cause__
    return isinstance(cause, aiohttp.ClientError | TimeoutError | ConnectionError)
