"""A stand-in speech LLM for load tests: random speech codes at a fixed rate per request.

It takes the LLM's speed out of a measurement of the service (decode, scheduling, transport):
every request gets its first code after `prefill_s`, then one code every 1/`rate_hz` seconds,
whatever the load. The codes are uniform random (seeded per request), so the audio is noise of
the right length, not speech. The same pacing is served over HTTP by `standin_server`, so that
the OpenAI-compatible path (SSE parsing, connection pool) can be measured too.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass

from miotts_stream.speech_codes import NUM_SPEECH_CODES

from .base import (
    SamplingOptions,
    TokenStream,
    prepare_request,
    unique_request_id,
)


@dataclass(frozen=True)
class StandInPacing:
    """How the stand-in speaks: `rate_hz` codes per second per request after `prefill_s`, and
    `tokens_per_char` codes per character of normalized text (capped by max_tokens)."""

    rate_hz: float = 50.0
    prefill_s: float = 0.015
    tokens_per_char: float = 2.0  # about English speech at 25 Hz codes

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_hz) and self.rate_hz > 0):
            raise ValueError(f"stand-in rate_hz must be > 0, got {self.rate_hz}")
        if not (math.isfinite(self.prefill_s) and self.prefill_s >= 0):
            raise ValueError(f"stand-in prefill_s must be >= 0, got {self.prefill_s}")
        if self.tokens_per_char <= 0:
            raise ValueError(f"stand-in tokens_per_char must be > 0, got {self.tokens_per_char}")

    def length(self, normalized_text: str, max_tokens: int) -> tuple[int, str]:
        """Codes for this text and the finish reason ("stop", or "length" when capped)."""
        natural = max(1, math.ceil(self.tokens_per_char * len(normalized_text)))
        return (natural, "stop") if natural <= max_tokens else (max_tokens, "length")

    def codes(self, count: int, seed: int | None) -> list[int]:
        rng = random.Random(seed)
        return [rng.randrange(NUM_SPEECH_CODES) for _ in range(count)]

    def due(self, index: int) -> float:
        """Seconds after the request started at which code `index` is out."""
        return self.prefill_s + index / self.rate_hz

    async def next_batch(self, started: float, sent: int, count: int) -> int:
        """Sleeps until code `sent` of `count` is due (the request started at
        `time.perf_counter()` = `started`), then returns the end of every code due by now: a
        loop that fell behind catches up in one batch, as a real engine's output does."""
        delay = started + self.due(sent) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elapsed = time.perf_counter() - started
        due = math.floor((elapsed - self.prefill_s) * self.rate_hz) + 1
        return min(count, max(due, sent + 1))


class StandInTokenSource:
    """In-process stand-in `TokenSource` (see the module docstring)."""

    def __init__(self, pacing: StandInPacing | None = None) -> None:
        self.pacing = pacing or StandInPacing()
        self.open_requests = 0  # streams started and not yet over: leak checks in tests
        self._seed_counter = 0

    @property
    def name(self) -> str:
        p = self.pacing
        return f"stand-in ({p.rate_hz:g} codes/s per request, prefill {p.prefill_s * 1000:g} ms)"

    def stream(
        self,
        text: str,
        options: SamplingOptions,
        request_id: str | None = None,
        language: str = "auto",
    ) -> StandInTokenStream:
        normalized = prepare_request(text, options, language)
        count, reason = self.pacing.length(normalized, options.max_tokens)
        if options.seed is None:
            self._seed_counter += 1
            seed = self._seed_counter
        else:
            seed = options.seed
        return StandInTokenStream(
            self, unique_request_id(request_id), self.pacing.codes(count, seed), reason
        )

    async def close(self) -> None:
        pass


class StandInTokenStream(TokenStream):
    def __init__(
        self, source: StandInTokenSource, request_id: str, codes: list[int], reason: str
    ) -> None:
        super().__init__(request_id, len(codes))
        self._source = source
        self._codes = codes
        self._reason = reason
        self._sent = 0
        self._started_at: float | None = None
        self._open = False

    async def _receive(self) -> None:
        if self._started_at is None:
            self._started_at = time.perf_counter()
            self._open = True
            self._source.open_requests += 1
        due = await self._source.pacing.next_batch(self._started_at, self._sent, len(self._codes))
        self._pending.extend(self._codes[self._sent : due])
        self._sent = due
        if self._sent == len(self._codes):
            self._end(self._reason)
            self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._source.open_requests -= 1

    async def _abort(self) -> None:
        self._close()

    async def _release(self) -> None:
        self._close()
