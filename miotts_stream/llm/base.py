"""What every source of speech tokens shares: options, the budget, the stream, the errors."""

from __future__ import annotations

import asyncio
import enum
import itertools
import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from miotts_stream.errors import FieldError
from miotts_stream.text import normalize_text


class LLMError(Exception):
    """The speech LLM failed this request."""


class LLMUnavailableError(LLMError):
    """The LLM could not be reached or did not answer in time, before any token came; or
    (`LLMRouter`) the server serving a request went away mid-stream, so the client should
    retry the whole request (it will be sent to another server).

    `client_message`, when set, says why in words fit for a client (no addresses, no engine
    internals); otherwise transports use a generic message.
    """

    def __init__(self, message: str, client_message: str | None = None) -> None:
        super().__init__(message)
        self.client_message = client_message


class LLMRequestError(LLMError):
    """The LLM refused the request as invalid (bad options, text too long, unknown model)."""


class EmptyTextError(LLMRequestError):
    """The text normalizes to nothing (punctuation alone, "...", "—"): there is nothing to say.
    Raised by `TokenSource.stream` before any request is made."""


class EngineState(enum.Enum):
    """Whether a source's engine can take requests (sources that run one in process)."""

    SERVING = "serving"
    RESTARTING = "restarting"  # it died; a new one is starting
    DEAD = "dead"  # it died and will not be restarted
    UNREACHABLE = "unreachable"  # remote servers: none is in service now; they are probed
    CLOSED = "closed"  # shut down on purpose


EngineStateListener = Callable[[EngineState], None]


@dataclass(frozen=True)
class Range:
    """An allowed interval for one sampling field; the one place its bounds are written."""

    low: float
    high: float
    low_open: bool = False  # (low, ...] instead of [low, ...]

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


@dataclass
class SamplingOptions:
    """Per-request sampling, defaults as upstream MioTTS-Inference.

    `RANGES` is the one source of truth for what a request may ask: the transports check it
    when a stream is configured, and the token sources check it again before a request goes to
    the LLM (vLLM itself refuses a temperature above 2, for one).
    """

    temperature: float = 0.8
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 700  # 28 s of audio
    seed: int | None = None  # same seed, same text, same engine: same tokens

    RANGES: ClassVar[dict[str, Range]] = {
        "temperature": Range(0.0, 2.0),
        "top_p": Range(0.0, 1.0, low_open=True),
        "repetition_penalty": Range(0.0, 2.0, low_open=True),
        "max_tokens": Range(1, 2**31 - 1),
        "seed": Range(0, 2**63 - 1),
    }

    def validate(self) -> None:
        """Raises FieldError (a ValueError) naming the first field out of range ("temperature
        must be ...")."""
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise FieldError(name, f"must be a number, got {value!r}", sep=" ")
            if not self.RANGES[name].contains(float(value)):
                raise FieldError(name, f"must be in {self.RANGES[name]}, got {value}", sep=" ")
        for name in ("max_tokens", "seed"):
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise FieldError(name, f"must be an integer, got {value!r}", sep=" ")
            if not self.RANGES[name].contains(value):
                raise FieldError(name, f"must be in {self.RANGES[name]}, got {value}", sep=" ")


@dataclass(frozen=True)
class RunawayGuard:
    """Bounds the tokens of one text by its length, because LLM TTS can loop.

    A looping model repeats a syllable or hums until max_tokens: 28 s of noise for "Yes.".
    Speech runs at most a few tokens per character (Japanese kana ~3 at 25 Hz, kanji and
    digits read out more; English ~2), so `tokens_per_char` = 10 leaves room for slow speech
    and long readings such as "$1,234,567" while cutting a loop early. Short texts get at
    least `min_tokens` (3 s).
    """

    tokens_per_char: float = 10.0
    min_tokens: int = 75

    def budget(self, text: str, requested_max_tokens: int) -> int:
        return token_budget(text, requested_max_tokens, self.tokens_per_char, self.min_tokens)


def token_budget(
    text: str, requested_max_tokens: int, tokens_per_char: float = 10.0, min_tokens: int = 75
) -> int:
    """max_tokens for `text`: the request's, lowered to `tokens_per_char` per character of the
    (normalized) text but not below `min_tokens`. tokens_per_char <= 0 disables the guard."""
    if tokens_per_char <= 0:
        return requested_max_tokens
    by_length = max(min_tokens, math.ceil(tokens_per_char * len(text)))
    return max(1, min(requested_max_tokens, by_length))


def chat_messages(normalized_text: str) -> list[dict[str, str]]:
    """The prompt as upstream sends it: one user message with the text, no system prompt."""
    return [{"role": "user", "content": normalized_text}]


_request_counter = itertools.count()


def unique_request_id(request_id: str | None) -> str:
    """The caller's id (for logs) made unique: an engine aborts every request sharing an id."""
    return f"{request_id or 'miotts'}.{next(_request_counter)}"


class TokenStream(ABC):
    """Speech codes (0..12799) of one request, as the LLM writes them.

    Iterate with ``async for`` (the request starts on the first step). After the loop,
    `finish_reason` says why it ended: "stop" (the model ended the utterance), "length" (max
    tokens or the runaway guard), "cancelled", "error" (the loop raised an LLMError), or
    another reason the LLM gave (e.g. "abort" when it dropped the request by itself).
    `generated_tokens` counts the codes yielded, `dropped_tokens` the non-speech tokens skipped.

    Stopping early aborts the request in the LLM: `aclose()` (also after breaking out of the
    loop; ``async with stream:`` calls it), `cancel()` (from any task, without awaiting), or
    cancelling the task that awaits the next code. All are idempotent.
    """

    def __init__(self, request_id: str, max_tokens: int) -> None:
        self.request_id = request_id
        self.max_tokens = max_tokens  # after the runaway guard
        self.generated_tokens = 0
        self.dropped_tokens = 0
        self.finish_reason: str | None = None
        self._pending: deque[int] = deque()
        self._exhausted = False  # the LLM is done with this request
        self._cancel_requested = False
        self._abort_task: asyncio.Task | None = None

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> int:
        if not await self._wait_pending():
            raise StopAsyncIteration
        self.generated_tokens += 1
        return self._pending.popleft()

    async def next_codes(self) -> list[int]:
        """Every code that has arrived by now (at least one), or [] once the stream is over.

        For consumers that take codes in batches: a fast engine delivers several per step, and
        handling them one at a time costs a task switch and a validation each.
        """
        if not await self._wait_pending():
            return []
        codes = list(self._pending)
        self._pending.clear()
        self.generated_tokens += len(codes)
        return codes

    async def _wait_pending(self) -> bool:
        """Waits until codes are pending (True) or the stream is over (False)."""
        while True:
            if self._cancel_requested:
                self.finish_reason = "cancelled"
                return False
            if self._pending:
                return True
            if self._exhausted:
                return False
            try:
                await self._receive()
            except asyncio.CancelledError:
                # The consumer's task was cancelled mid-wait: the request must not live on.
                self._cancel_requested = True
                self.finish_reason = "cancelled"
                await self._abort()
                raise
            except BaseException:
                self.finish_reason = "error"
                await self._abort()
                self._exhausted = True
                raise

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def cancel(self) -> None:
        """Aborts the request without waiting; a loop over the stream ends at its next step."""
        if self._cancel_requested or self._exhausted:
            return
        self._cancel_requested = True
        self.finish_reason = "cancelled"
        self._abort_task = asyncio.get_running_loop().create_task(self._abort())

    async def aclose(self) -> None:
        """Aborts the request if it still runs and waits until the LLM has let go of it."""
        if not self._exhausted and not self._cancel_requested:
            self._cancel_requested = True
            self.finish_reason = "cancelled"
        if self._abort_task is not None:
            await self._abort_task
        elif not self._exhausted:
            await self._abort()
        self._exhausted = True
        await self._release()

    def _end(self, finish_reason: str) -> None:
        """Called by a source when the LLM has ended the request."""
        self._exhausted = True
        self.finish_reason = "cancelled" if self._cancel_requested else finish_reason

    @abstractmethod
    async def _receive(self) -> None:
        """Waits for the next output of the LLM: appends its codes to `_pending`, counts
        dropped tokens, and calls `_end` when the request is over."""

    @abstractmethod
    async def _abort(self) -> None:
        """Stops the request in the LLM; safe to call more than once, and before it started."""

    async def _release(self) -> None:  # noqa: B027 (optional hook)
        """Frees what the stream holds once it is over (connections, generators)."""


@runtime_checkable
class TokenSource(Protocol):
    """Something that turns text into streams of speech codes."""

    @property
    def name(self) -> str: ...

    def stream(
        self,
        text: str,
        options: SamplingOptions,
        request_id: str | None = None,
        language: str = "auto",
    ) -> TokenStream:
        """Starts (lazily, on first iteration) generating speech for one piece of raw text:
        the source normalizes it (`normalize_text(text, language)`, the one place text is
        normalized) and builds the prompt. Text that normalizes to nothing raises
        `EmptyTextError` here, as do other bad requests (`LLMRequestError`)."""
        ...

    async def close(self) -> None: ...


def prepare_request(text: str, options: SamplingOptions, language: str) -> str:
    """What every source checks first: the sampling options (a request error when out of
    range) and the normalized text (`prepare_text`)."""
    try:
        options.validate()
    except ValueError as err:
        raise LLMRequestError(str(err)) from err
    return prepare_text(text, language)


def prepare_text(text: str, language: str) -> str:
    """Normalized text for the prompt; an empty result is a request error, not a silent no-op."""
    try:
        normalized = normalize_text(text, language)
    except ValueError as err:  # an unknown language
        raise LLMRequestError(str(err)) from err
    if not normalized:
        raise EmptyTextError("text is empty after normalization")
    return normalized
