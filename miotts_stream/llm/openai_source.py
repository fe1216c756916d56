"""Speech tokens from a server the user already runs: OpenAI-style streaming chat completions.

Works with `vllm serve`, llama.cpp's server, Ollama and the like. The speech tokens arrive as
text (`<|s_N|>`), cut into server-sent events wherever the server likes, so they are parsed
incrementally. A server cannot be told to sample only speech tokens portably, so anything else
the model writes is dropped and counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from .base import (
    LLMError,
    LLMRequestError,
    LLMUnavailableError,
    RunawayGuard,
    SamplingOptions,
    TokenStream,
    chat_messages,
    prepare_request,
    unique_request_id,
)
from .speech_tokens import SpeechTextParser

logger = logging.getLogger(__name__)

# Worth another try: the server is starting, overloaded or behind a restarting proxy.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


def _api_root(base_url: str) -> str:
    """ "http://host:8000", ".../v1" or ".../v1/chat/completions" -> "http://host:8000/v1"."""
    base = base_url.rstrip("/")
    for suffix in ("/chat/completions", "/models"):
        if base.endswith(suffix):
            base = base[: -len(suffix)].rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


def _error_message(body: str) -> str:
    """The server's own words from an error response, else the raw body (shortened)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.strip()[:500]
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)[:500]
        return str(payload.get("message") or error)[:500]
    return body.strip()[:500]


class _RetryableError(Exception):
    """A failure before the first token that a later attempt may not run into."""


class OpenAITokenSource:
    """Speech codes from an OpenAI-compatible server (streamed chat completions).

    base_url: the server ("http://host:8000", with or without "/v1").
    model: the model name; None asks the server (`/v1/models`, the first one) once.
    timeout_s: longest wait for the server to answer, for the first token and between tokens.
    connect_timeout_s: longest wait to open a connection.
    connect_retries: further attempts after a failure before the first token (connection
        refused, timeout, 429/502/503/504), with a doubling delay. After the first token a
        failure is an error: the codes already sent cannot be taken back.
    extra_body: more fields for every request (e.g. {"top_k": 50} for servers that know it).
    max_connections: concurrent connections to the server, i.e. requests in flight (each
        streamed completion holds one); size it from the streams served. aiohttp's default
        of 100 would make stream 101 wait silently for another to finish.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        connect_retries: int = 2,
        retry_delay_s: float = 0.5,
        guard: RunawayGuard | None = None,
        extra_body: dict[str, Any] | None = None,
        max_connections: int = 256,
    ) -> None:
        if connect_retries < 0:
            raise ValueError(f"connect_retries must be >= 0, got {connect_retries}")
        self.base_url = base_url
        self.api_root = _api_root(base_url)
        self.chat_url = f"{self.api_root}/chat/completions"
        self.models_url = f"{self.api_root}/models"
        self.model = model
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.connect_retries = connect_retries
        self.retry_delay_s = retry_delay_s
        self.guard = guard or RunawayGuard()
        self.extra_body = dict(extra_body or {})
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.max_connections = max_connections
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._model_lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return f"openai:{self.api_root}" + (f" ({self.model})" if self.model else "")

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, inside the event loop that will use it.
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self.connect_timeout_s, sock_read=self.timeout_s
            )
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(
                timeout=timeout, headers=self._headers, connector=connector
            )
        return self._session

    async def _with_retries(self, url: str, attempt_once):
        """Runs `attempt_once()` until it succeeds, retrying what is worth retrying."""
        attempts = self.connect_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return await attempt_once()
            except (aiohttp.ClientConnectionError, TimeoutError, _RetryableError) as err:
                detail = str(err) or type(err).__name__
                if attempt == attempts:
                    raise LLMUnavailableError(
                        f"cannot reach the speech LLM server at {url} "
                        f"({attempts} attempt{'s' if attempts > 1 else ''}): {detail}"
                    ) from err
                logger.warning("%s failed (attempt %d/%d): %s", url, attempt, attempts, detail)
                await asyncio.sleep(self.retry_delay_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def resolve_model(self) -> str:
        """The configured model, else the first one the server lists (asked once)."""
        if self.model:
            return self.model
        async with self._model_lock:
            if self.model:
                return self.model

            async def list_models() -> list[str]:
                async with self._client().get(self.models_url) as response:
                    body = await response.text()
                    if response.status in RETRYABLE_STATUSES:
                        raise _RetryableError(f"HTTP {response.status}: {_error_message(body)}")
                    if response.status != 200:
                        raise LLMRequestError(
                            f"{self.models_url} answered HTTP {response.status}: "
                            f"{_error_message(body)}"
                        )
                try:
                    payload = json.loads(body)
                    return [str(m.get("id") or m.get("name")) for m in payload.get("data", [])]
                except (ValueError, AttributeError) as err:
                    raise LLMError(f"{self.models_url} sent no model list: {body[:200]}") from err

            models = await self._with_retries(self.models_url, list_models)
            if not models:
                raise LLMRequestError(f"{self.models_url} lists no models")
            self.model = models[0]
            logger.info("speech LLM model from %s: %s", self.models_url, self.model)
            return self.model

    async def check_health(self, timeout_s: float = 2.0) -> str | None:
        """Asks the server whether it serves (`GET /v1/models`, which vLLM, llama.cpp, Ollama
        and the stand-in all answer once a model is loaded): None if it does, else why not."""
        try:
            async with self._client().get(
                self.models_url, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                if response.status == 200:
                    return None
                return f"HTTP {response.status}: {_error_message(await response.text())}"
        except (aiohttp.ClientError, TimeoutError) as err:
            return str(err) or type(err).__name__

    def request_body(
        self, model: str, normalized_text: str, options: SamplingOptions, max_tokens: int
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": chat_messages(normalized_text),
            "stream": True,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "max_tokens": max_tokens,
            "repetition_penalty": options.repetition_penalty,  # vLLM's name
            "repeat_penalty": options.repetition_penalty,  # llama.cpp's and Ollama's
            # vLLM (and others) strip special tokens from the text by default, and the speech
            # tokens are special tokens in MioTTS's tokenizer: nothing would be left.
            "skip_special_tokens": False,
        }
        if options.seed is not None:
            body["seed"] = options.seed
        body.update(self.extra_body)
        return body

    def stream(
        self,
        text: str,
        options: SamplingOptions,
        request_id: str | None = None,
        language: str = "auto",
    ) -> OpenAITokenStream:
        normalized = prepare_request(text, options, language)
        max_tokens = self.guard.budget(normalized, options.max_tokens)
        return OpenAITokenStream(
            self, unique_request_id(request_id), normalized, options, max_tokens
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class OpenAITokenStream(TokenStream):
    """One streamed chat completion.

    Non-speech output is dropped and counted per server-sent event, as servers send about one
    token per event: an event with stray text counts once, each special token other than the
    stop tokens once, and an empty event inside the stream (vLLM's for a token that ends mid
    character) once. A server that packs several tokens into one event (when the client reads
    slowly) makes this an undercount; it is exact in process (`VLLMTokenSource`).
    """

    def __init__(
        self,
        source: OpenAITokenSource,
        request_id: str,
        normalized_text: str,
        options: SamplingOptions,
        max_tokens: int,
    ) -> None:
        super().__init__(request_id, max_tokens)
        self._source = source
        self._text = normalized_text
        self._options = options
        self._response: aiohttp.ClientResponse | None = None
        self._parser = SpeechTextParser()
        self._buffer = b""  # received bytes after the last complete line
        self._received_code = False  # from then on, no retry
        self._after_empty_event = False
        self._failures = 0

    async def _open(self) -> None:
        """One attempt at starting the completion."""
        source = self._source
        model = await source.resolve_model()
        body = source.request_body(model, self._text, self._options, self.max_tokens)
        response = await source._client().post(
            source.chat_url, json=body, headers={"X-Request-Id": self.request_id}
        )
        if response.status != 200:
            detail = _error_message(await response.text())
            response.release()
            if response.status in RETRYABLE_STATUSES:
                raise _RetryableError(f"HTTP {response.status}: {detail}")
            if response.status >= 500:  # the server's fault, not the request's
                raise LLMError(
                    f"{source.chat_url} failed on the request (HTTP {response.status}): {detail}"
                )
            raise LLMRequestError(
                f"{source.chat_url} refused the request (HTTP {response.status}): {detail}"
            )
        self._response = response

    async def _receive(self) -> None:
        source = self._source
        while True:
            try:
                if self._response is None:
                    await self._open()
                await self._read_events()
                return
            except (aiohttp.ClientError, TimeoutError, _RetryableError) as err:
                self._close_response()
                if self._cancel_requested:
                    self._end("cancelled")
                    return
                detail = str(err) or type(err).__name__
                if self._received_code:
                    # Codes already went out; a second attempt would sample different ones.
                    raise LLMError(
                        f"the stream from the speech LLM server at {source.chat_url} broke "
                        f"after {self.generated_tokens + len(self._pending)} tokens: {detail}"
                    ) from err
                self._failures += 1
                if self._failures > source.connect_retries:
                    raise LLMUnavailableError(
                        f"no speech tokens from the LLM server at {source.chat_url} "
                        f"({self._failures} attempt{'s' if self._failures > 1 else ''}): "
                        f"{detail}"
                    ) from err
                logger.warning(
                    "speech LLM at %s, attempt %d/%d failed before the first token: %s",
                    source.chat_url,
                    self._failures,
                    source.connect_retries + 1,
                    detail,
                )
                self._parser = SpeechTextParser()
                self._buffer = b""
                self._after_empty_event = False
                await asyncio.sleep(source.retry_delay_s * 2 ** (self._failures - 1))

    async def _read_events(self) -> None:
        """Waits for the server's next bytes and applies every complete event in them.

        A fast server (or a reader that fell behind) packs many events into one read; taking
        them all at once costs one wake-up instead of one per event.
        """
        assert self._response is not None
        content = self._response.content
        while True:
            cut = self._buffer.rfind(b"\n")
            if cut >= 0:
                lines, self._buffer = self._buffer[:cut].split(b"\n"), self._buffer[cut + 1 :]
                if self._apply_lines(lines):
                    return
            data = await content.readany()
            if not data:  # the connection ended, maybe mid-line
                if self._cancel_requested:
                    self._end("cancelled")
                    return
                raise aiohttp.ClientPayloadError("the stream ended without [DONE]")
            self._buffer += data

    def _apply_lines(self, lines: list[bytes]) -> bool:
        """Applies the data events among `lines`; True once any was applied."""
        applied = False
        for raw in lines:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, "event:" lines
            data = line[len(b"data:") :].strip()
            if data == b"[DONE]":
                self._finish("stop")
                return True
            try:
                event = json.loads(data)
            except ValueError as err:
                raise LLMError(
                    f"malformed event from the speech LLM server: {data[:200]!r}"
                ) from err
            self._apply(event)
            applied = True
            if self._exhausted:
                return True
        return applied

    def _apply(self, event: dict[str, Any]) -> None:
        if "error" in event:
            error = event["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise LLMError(f"the speech LLM server failed mid-stream: {message}")
        choices = event.get("choices") or []
        if not choices:
            return  # e.g. a usage-only event
        choice = choices[0]
        delta = choice.get("delta") or {}
        content = delta.get("content")
        reason = choice.get("finish_reason")
        if content:
            parsed = self._parser.feed(content)
            if parsed.codes:
                self._received_code = True
                self._pending.extend(parsed.codes)
            stray = parsed.stray
            if self._after_empty_event:
                # The bytes an empty event held back come out now, as U+FFFD if they never
                # made a character: the same token, already counted.
                stray = stray.lstrip("\ufffd")
            self.dropped_tokens += len(parsed.specials) + (1 if stray else 0)
            self._after_empty_event = False
        elif content == "" and "role" not in delta and not reason:
            # A token whose text is not complete yet (part of a multi-byte character): vLLM
            # still sends its event, empty. Speech tokens are never held back like this.
            self.dropped_tokens += 1
            self._after_empty_event = True
        if reason:
            self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self._parser.finish():
            self.dropped_tokens += 1  # an unfinished "<|s_12" at the very end
        self._end(reason)
        self._close_response()

    def _close_response(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    async def _abort(self) -> None:
        # Closing the connection is how a client aborts: servers stop generating on it.
        self._close_response()

    async def _release(self) -> None:
        self._close_response()
