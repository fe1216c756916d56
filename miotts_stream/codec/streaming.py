"""Streaming decode, the host side: options, window planning, one stream's state.

MioCodec's decoder is not causal (windowed attention both ways, symmetric convolutions,
utterance-wide GroupNorm), so a chunk decoded early differs from the offline decode. We decode
windows

    [ left context | chunk | lookahead ]

keep the chunk's samples, and crossfade each seam with the previous window's extra samples.
A chunk waits for `lookahead_tokens` of right context (or for the client's buffer to run low);
tokens that are already there when it is planned (an LLM running ahead of real time) widen the
window, up to `max_lookahead_tokens` of right context and `max_chunk_tokens` of chunk.

With a playback clock (a client playing the audio as it comes), planning follows the client:
- the first window waits, while the LLM is fast, until `first_wait_ms` after the first token
  (more tokens: better statistics and a longer first chunk), never for fewer than
  first_chunk_tokens + first_lookahead_tokens;
- later chunks are planned just in time: a chunk whose lookahead is there still waits until
  the client's buffer falls below `plan_buffer_ms`, so an LLM running ahead of real time buys
  right context and longer chunks (fewer, longer windows); a chunk still short of its lookahead
  goes out anyway once the buffer falls below `min_buffer_ms` (the deadline).
The GroupNorm statistics, which offline decoding takes over the whole utterance, are taken
over everything the stream has seen so far: the frames before the window as they were
committed, and the window's own frames as it computes them (`StatisticsMode.RECOMPUTED`), which
closes most of the gap between windowed and offline decoding.

State is explicit and per stream, in the manner of Kyutai's moshi streaming modules, and each
part has one owner:
- a `TokenStreamDecoder` owns its host-side state: tokens received, tokens emitted, whether
  its device slot holds a crossfade tail. It plans its next window (`next_window`) and
  advances when that window has been decoded (`apply`). Planning touches no device state.
- the `StreamBatcher` that opened it (`codec/batcher.py`) owns the device-side state: the
  stream's slot of GroupNorm sums and crossfade tail, taken on its first window and given
  back once, when the stream is done or closed; and the batched forward that decodes windows
  of many streams at once.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .tokens import check_token_list, check_tokens

# How much audio the client has buffered right now, in seconds (playback deadline); infinite
# while nothing plays yet.
PlaybackClock = Callable[[], float]
# Seconds on a monotonic clock (time.perf_counter; a simulated one in benchmarks).
Timer = Callable[[], float]


class StatisticsMode(enum.Enum):
    """Which frames a window's GroupNorm statistics are taken over."""

    # Every chunk decoded so far, as it was decoded, plus this window's new frames.
    ACCUMULATED = "accumulated"
    # The window's own frames only (for comparison).
    WINDOW = "window"
    # The frames before the window as committed, then all of the window's frames as it
    # computes them (its left context has more right context than when it was decoded as a
    # chunk): every frame counted once, at its best estimate so far (the default).
    RECOMPUTED = "recomputed"


@dataclass(frozen=True)
class StreamingOptions:
    """Window geometry in 25 Hz tokens (0 or None fields take the defaults)."""

    first_chunk_tokens: int = 4
    first_lookahead_tokens: int = 2
    chunk_tokens: int = 20
    lookahead_tokens: int = 32
    left_context_tokens: int = 50
    # Adaptive window: when tokens are already there (an LLM running ahead of real time), a
    # window takes up to `max_lookahead_tokens` of right context, and a chunk after the first
    # grows up to `max_chunk_tokens` while keeping it; nothing waits for them. Right context is
    # what brings a chunk's GroupNorm statistics and edges close to the offline decode. Values
    # below lookahead_tokens / chunk_tokens mean no growth.
    max_lookahead_tokens: int = 128
    max_chunk_tokens: int = 80
    crossfade_ms: float = 20.0
    # With a clock: a chunk waiting for lookahead goes out anyway once the client's buffer
    # falls below this much audio (the deadline), keeping `early_lookahead_share` of the tokens
    # there as right context. The service's clock already has the decode latency (the step in
    # flight and the window's own) taken off, so this covers what is left: the scheduler's
    # poll (10 ms), event-loop lag and encoding (~20 ms at p99 under load), times 2 for safety.
    min_buffer_ms: float = 60.0
    early_lookahead_share: float = 2 / 3
    # With a clock, just in time: a chunk whose lookahead is there waits until the client's
    # buffer is below this, and takes every token there by then; 0: plan as soon as the
    # lookahead is there. The room above `min_buffer_ms` (140 ms) is for a step larger than
    # the latency estimate (just-in-time windows are long, and batched), so that a chunk with
    # its lookahead goes out before the deadline has to cut it short.
    plan_buffer_ms: float = 200.0
    # With a clock, the first audio: the first window waits until this long after the first
    # token has passed (6 tokens at 2x real time), taking the tokens there by then, up to
    # `max_first_window_tokens`, of which a third is lookahead. Never fewer than
    # first_chunk_tokens + first_lookahead_tokens. 0: plan from exactly that many.
    first_wait_ms: float = 100.0
    max_first_window_tokens: int = 12
    # Windows are padded to a multiple of this many tokens (fixed shapes for batching and
    # CUDA graphs).
    window_bucket_tokens: int = 16
    groupnorm_stats: StatisticsMode = StatisticsMode.RECOMPUTED

    def validated(self) -> StreamingOptions:
        for name in ("first_chunk_tokens", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"streaming options: {name} must be >= 1")
        for name in (
            "first_lookahead_tokens",
            "lookahead_tokens",
            "left_context_tokens",
            "max_lookahead_tokens",
            "max_chunk_tokens",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"streaming options: {name} must be >= 0")
        if self.first_lookahead_tokens > self.lookahead_tokens:
            raise ValueError("streaming options: first_lookahead_tokens exceeds lookahead_tokens")
        for name in ("crossfade_ms", "min_buffer_ms", "plan_buffer_ms", "first_wait_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"streaming options: {name} must be >= 0")
        if not 0 <= self.early_lookahead_share < 1:
            raise ValueError("streaming options: early_lookahead_share must be in [0, 1)")
        if self.max_first_window_tokens < 0:
            raise ValueError("streaming options: max_first_window_tokens must be >= 0")
        if self.window_bucket_tokens < 1:
            raise ValueError("streaming options: window_bucket_tokens must be >= 1")
        if not isinstance(self.groupnorm_stats, StatisticsMode):
            modes = ", ".join(f"StatisticsMode.{mode.name}" for mode in StatisticsMode)
            raise ValueError(f"streaming options: groupnorm_stats must be one of {modes}")
        return self

    @property
    def lookahead_cap(self) -> int:
        return max(self.lookahead_tokens, self.max_lookahead_tokens)

    @property
    def chunk_cap(self) -> int:
        return max(self.chunk_tokens, self.max_chunk_tokens)

    @property
    def least_first_window(self) -> int:
        """Tokens the first window never goes without (unless the utterance is shorter)."""
        return self.first_chunk_tokens + self.first_lookahead_tokens

    @property
    def first_window_cap(self) -> int:
        """The most tokens a first window is planned from (more are right context only)."""
        if self.first_wait_ms <= 0:
            return self.least_first_window
        return max(self.least_first_window, self.max_first_window_tokens)

    def first_chunk_tokens_of(self, tokens: int) -> int:
        """The first chunk when the first window is planned from `tokens` tokens: a third of
        them (at least `first_lookahead_tokens`) stay as right context."""
        lookahead = max(self.first_lookahead_tokens, tokens // 3)
        return max(self.first_chunk_tokens, tokens - lookahead)

    @property
    def longest_chunk(self) -> int:
        """The longest chunk a stream with these options may emit."""
        return max(self.first_chunk_tokens_of(self.first_window_cap), self.chunk_cap)

    @property
    def max_window_tokens(self) -> int:
        return self.left_context_tokens + self.longest_chunk + self.lookahead_cap

    @property
    def steady_window_tokens(self) -> int:
        """A steady window as decoded (padded): full left context, one chunk, the lookahead a
        chunk waits for. What a decode step's token budget is counted in."""
        return self.padded(self.left_context_tokens + self.chunk_tokens + self.lookahead_tokens)

    def padded(self, tokens: int) -> int:
        """`tokens` rounded up to the window bucket: a window's length as decoded."""
        return self.window_bucket_tokens * math.ceil(tokens / self.window_bucket_tokens)


@dataclass
class DecodeWindow:
    """A planned window: tokens[start:stop] of its stream, of which [chunk_start, chunk_end)
    is emitted."""

    stream: TokenStreamDecoder
    start: int
    chunk_start: int
    chunk_end: int
    stop: int
    fade_samples: int  # crossfade with the stream's previous tail over this many samples

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def padded_length(self) -> int:
        return self.stream.options.padded(self.length)

    @property
    def first(self) -> bool:
        """The stream's first window (its first audio)."""
        return self.chunk_start == 0

    @property
    def chunk_samples(self) -> int:
        return (self.chunk_end - self.chunk_start) * self.stream.samples_per_token

    @property
    def keeps_tail(self) -> bool:
        """Whether the window reaches past its chunk far enough to crossfade the next seam."""
        return self.stop > self.chunk_end and self.stream.crossfade_samples > 0


class WindowDecoder(Protocol):
    """What a stream needs from the batcher that opened it (`codec.batcher.StreamBatcher`)."""

    def decode(self, windows: Sequence[DecodeWindow]) -> list[torch.Tensor]:
        """Decode the windows in one forward and apply each to its stream; their chunks."""
        ...

    def release(self, stream: TokenStreamDecoder) -> None:
        """Give back the stream's device slot, if it holds one (idempotent)."""
        ...


@dataclass(frozen=True)
class StreamGeometry:
    """The codec's facts a stream plans with."""

    sample_rate: int
    samples_per_token: int
    codebook_size: int


class TokenStreamDecoder:
    """Streaming decode of one utterance. Not thread-safe; one owner at a time.

    `push(tokens)` returns the audio chunks ready now (possibly none); `finish()` returns the
    rest. Together they emit exactly samples_per_token * len(all tokens) samples, in order.
    `emitted_samples` is what the stream has sent so far (playback clocks are built on it).
    Made by `MioCodecDecoder.stream` or `StreamBatcher.open`; the batcher decodes its windows
    and holds its device slot from its first window until it is done or `close()`d.
    """

    def __init__(
        self,
        batcher: WindowDecoder,
        geometry: StreamGeometry,
        global_embedding: torch.Tensor,
        options: StreamingOptions | None = None,
        clock: PlaybackClock | None = None,
        timer: Timer = time.perf_counter,
    ):
        self.batcher = batcher
        self.embedding = global_embedding
        self.options = (options or StreamingOptions()).validated()
        self.clock = clock
        self.timer = timer
        self.codebook_size = geometry.codebook_size
        self.samples_per_token = geometry.samples_per_token
        self.seconds_per_token = geometry.samples_per_token / geometry.sample_rate
        self.crossfade_samples = min(
            self.samples_per_token,
            round(self.options.crossfade_ms * geometry.sample_rate / 1000),
        )
        # --- streaming state (host side; the device side is the batcher's) ---
        self.tokens: list[int] = []
        self.first_token_at: float | None = None  # timer() when the first token came
        self.emitted_tokens = 0  # tokens whose samples have been emitted
        self.finished = False
        self.has_tail = False  # the device slot holds a crossfade tail for the next chunk
        self.closed = False

    # ---- input ---------------------------------------------------------------------------
    def push_tokens(self, tokens: Sequence[int] | torch.Tensor) -> None:
        """Append tokens without decoding (for callers that batch windows themselves)."""
        if self.finished:
            raise RuntimeError("stream: push after finish()")
        if len(tokens) == 0:
            return
        if self.first_token_at is None:
            self.first_token_at = self.timer()
        if type(tokens) is list and all(type(t) is int for t in tokens):
            self.tokens.extend(check_token_list(tokens, self.codebook_size))
            return
        self.tokens.extend(check_tokens(tokens, self.codebook_size).tolist())

    def mark_finished(self) -> None:
        self.finished = True

    @property
    def emitted_samples(self) -> int:
        return self.emitted_tokens * self.samples_per_token

    @property
    def pending_tokens(self) -> int:
        """Tokens received and not yet emitted."""
        return len(self.tokens) - self.emitted_tokens

    @property
    def done(self) -> bool:
        return self.finished and self.emitted_tokens == len(self.tokens)

    def close(self) -> None:
        """No more decoding: the device slot goes back (idempotent; a stream that is done
        has given it back already)."""
        self.closed = True
        self.batcher.release(self)

    # ---- planning ------------------------------------------------------------------------
    def buffered_seconds(self) -> float:
        """The client's buffer as the clock tells it (infinite without a clock, or while
        nothing plays yet)."""
        return math.inf if self.clock is None else self.clock()

    def deadline_near(self) -> bool:
        """Whether the client's buffer is below `min_buffer_ms` (never, without a clock)."""
        return self.buffered_seconds() * 1000.0 < self.options.min_buffer_ms

    @property
    def _just_in_time(self) -> bool:
        return self.clock is not None and self.options.plan_buffer_ms > 0

    def next_window(self, slack_s: float = 0.0) -> DecodeWindow | None:
        """The next window to decode, or None if the next chunk must wait (for tokens, or,
        just in time, for the client's buffer to run down).

        `slack_s`: plan a window that would be due within this many seconds now (a scheduler
        that runs a step anyway batches it in, instead of running another step soon after)."""
        opts = self.options
        available = len(self.tokens)
        start = self.emitted_tokens
        if start >= available:
            return None
        buffered = self.buffered_seconds()
        if start == 0 and (math.isinf(buffered) or opts.plan_buffer_ms <= 0):
            return self._first_window(available)
        # From here on audio plays: a later chunk, or the first of a later segment of a session
        # (whose client still plays the earlier ones), planned like any later chunk.
        chunk_end = self._grown_chunk_end(start)
        if self.finished:
            chunk_end = min(chunk_end, available)
        elif available < chunk_end + opts.lookahead_tokens:
            if buffered * 1000.0 >= opts.min_buffer_ms + 1000.0 * slack_s:
                return None
            chunk_end = self._early_chunk_end(start, buffered)
        elif self._just_in_time and buffered * 1000.0 >= opts.plan_buffer_ms + 1000.0 * slack_s:
            return None  # the client holds enough: tokens that come meanwhile widen the window
        return self._window(start, chunk_end)

    def _first_window(self, available: int) -> DecodeWindow | None:
        """The first audio (nothing plays yet): see `StreamingOptions.first_wait_ms`."""
        opts = self.options
        least = opts.least_first_window
        # Without a clock nobody listens as it comes: the first window is the least one.
        cap = opts.first_window_cap if self.clock is not None else least
        if not self.finished and available < cap:
            if available < least:
                return None
            if self.clock is not None:
                waited = self.timer() - self.first_token_at
                if waited * 1000.0 < opts.first_wait_ms:
                    return None
        chunk_end = opts.first_chunk_tokens_of(min(available, cap))
        if self.finished:
            chunk_end = min(chunk_end, available)
        return self._window(0, chunk_end)

    def _window(self, start: int, chunk_end: int) -> DecodeWindow:
        # Right context: whatever is there, up to the cap (more context, closer to offline).
        opts = self.options
        stop = min(len(self.tokens), chunk_end + opts.lookahead_cap)
        return DecodeWindow(
            stream=self,
            start=max(0, start - opts.left_context_tokens),
            chunk_start=start,
            chunk_end=chunk_end,
            stop=stop,
            fade_samples=self.crossfade_samples if self.has_tail else 0,
        )

    def _grown_chunk_end(self, start: int) -> int:
        """A chunk after the first. Tokens already there beyond what it waits for (an LLM
        running ahead of real time, or the end of the utterance) make it longer: what is there
        is split between the chunk and its right context in the caps' proportion (80 : 128),
        so extra context always comes with a longer chunk and the decode cost per second of
        audio stays below the fixed window's. Never waits for them."""
        opts = self.options
        grow_to = opts.chunk_cap
        if not self.finished:
            surplus = len(self.tokens) - start
            grow_to = surplus * opts.chunk_cap // (opts.chunk_cap + opts.lookahead_cap)
        return start + max(opts.chunk_tokens, min(opts.chunk_cap, grow_to))

    def _early_chunk_end(self, start: int, buffered: float) -> int:
        """The client is about to run dry: a chunk goes out now, the tokens there split between
        the chunk and its right context, `early_lookahead_share` of them as context (right
        context is what the early chunks lack most), the rest as the chunk.

        A client already short (the clock below the deadline: the decoder is behind) gets at
        least the audio that brings its buffer back to the deadline, context or not: a string
        of tiny chunks, each a window decoded with its full left context, would keep the
        decoder behind."""
        opts = self.options
        surplus = len(self.tokens) - start
        context = min(opts.lookahead_tokens, int(surplus * opts.early_lookahead_share))
        short_s = opts.min_buffer_ms / 1000.0 - buffered
        catch_up = math.ceil(short_s / self.seconds_per_token) if short_s > 0 else 0
        chunk = min(opts.chunk_tokens, max(surplus - context, opts.first_chunk_tokens, catch_up))
        return start + min(chunk, surplus)

    # ---- a decoded window ----------------------------------------------------------------
    def apply(self, window: DecodeWindow) -> None:
        """Its window was decoded (the batcher already crossfaded the chunk and committed the
        statistics): advance past the chunk."""
        assert window.chunk_start == self.emitted_tokens, "windows must be applied in order"
        self.emitted_tokens = window.chunk_end
        self.has_tail = window.keeps_tail

    # ---- convenience: decode alone -------------------------------------------------------
    def _drain(self) -> list[torch.Tensor]:
        chunks = []
        while (window := self.next_window()) is not None:
            chunks.extend(self.batcher.decode([window]))
        return chunks

    def push(self, tokens: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """Add tokens; return the audio chunks now ready (possibly none)."""
        self.push_tokens(tokens)
        return self._drain()

    def finish(self) -> list[torch.Tensor]:
        """No more tokens: return the rest of the audio. Further pushes raise."""
        self.mark_finished()
        return self._drain()
