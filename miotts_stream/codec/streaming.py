"""Streaming decode: overlapping 25 Hz token windows with causal context, batched across streams.

MioCodec's decoder is not causal (windowed attention both ways, symmetric convolutions,
utterance-wide GroupNorm), so a chunk decoded early differs from the offline decode. We decode
windows

    [ left context | chunk | lookahead ]

keep the chunk's samples, and crossfade each seam with the previous window's extra samples.
A chunk waits for `lookahead_tokens` of right context (or for the client's buffer to run low);
tokens that are already there when it is planned (an LLM running ahead of real time) widen the
window, up to `max_lookahead_tokens` of right context and `max_chunk_tokens` of chunk.
The GroupNorm statistics, which offline decoding takes over the whole utterance, are
accumulated over everything decoded so far (see `GroupNormAccumulator`), which closes most of
the gap between windowed and offline decoding.

State is explicit and per stream (`TokenStreamDecoder`), in the manner of Kyutai's moshi
streaming modules: tokens received, samples emitted, the crossfade tail, the GroupNorm sums.
A window is planned by the stream (`next_window`), decoded by anyone (alone, or batched with
other streams' windows by `decode_windows`), and applied back to its stream (`apply`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .layers import masked_group_stats

if TYPE_CHECKING:
    from .decoder import MioCodecDecoder

# How much audio the client has buffered right now, in seconds (playback deadline).
PlaybackClock = Callable[[], float]


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
    # falls below this much audio. It must cover one window's decode time plus transport.
    min_buffer_ms: float = 150.0
    # Windows are padded to a multiple of this many tokens (fixed shapes for batching and,
    # later, CUDA graphs).
    window_bucket_tokens: int = 16
    # "accumulated": GroupNorm statistics over everything decoded so far (default);
    # "window": each window's own frames only (for comparison).
    groupnorm_stats: str = "accumulated"

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
        if self.crossfade_ms < 0 or self.min_buffer_ms < 0:
            raise ValueError("streaming options: crossfade_ms and min_buffer_ms must be >= 0")
        if self.window_bucket_tokens < 1:
            raise ValueError("streaming options: window_bucket_tokens must be >= 1")
        if self.groupnorm_stats not in ("accumulated", "window"):
            raise ValueError("streaming options: groupnorm_stats must be accumulated or window")
        return self

    @property
    def lookahead_cap(self) -> int:
        return max(self.lookahead_tokens, self.max_lookahead_tokens)

    @property
    def chunk_cap(self) -> int:
        return max(self.chunk_tokens, self.max_chunk_tokens)

    @property
    def max_window_tokens(self) -> int:
        chunk = max(self.first_chunk_tokens, self.chunk_cap)
        return self.left_context_tokens + chunk + self.lookahead_cap


# ---- GroupNorm statistics while streaming ----------------------------------------------------


class GroupNormAccumulator:
    """Per-layer running sums (count, sum, sum of squares) per group, in float64.

    A window's statistics combine the sums committed by earlier windows (every frame before the
    chunk, each counted once) with the window's own frames from the chunk start to its end.
    So each window normalises with the statistics of the whole utterance decoded so far.
    """

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}  # layer -> (3, G): count, sum, sum of squares

    def prior(self, layer: int, groups: int, device: torch.device) -> torch.Tensor:
        value = self.sums.get(layer)
        if value is None:
            return torch.zeros(3, groups, dtype=torch.float64, device=device)
        return value.to(device)

    def commit(self, layer: int, sums: torch.Tensor) -> None:
        sums = sums.detach().to("cpu", torch.float64)
        self.sums[layer] = self.sums[layer] + sums if layer in self.sums else sums


def _region_sums(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(count, sum, sum of squares) per item and group over weighted frames -> (B, 3, G)."""
    batch, channels, _ = x.shape
    grouped = x.float().reshape(batch, groups, channels // groups, -1)
    w = weight[:, None, None, :].to(grouped.dtype)
    count = (w.sum(dim=(2, 3)) * (channels // groups)).expand(-1, groups)
    total = (grouped * w).sum(dim=(2, 3))
    squares = (grouped.square() * w).sum(dim=(2, 3))
    return torch.stack((count, total, squares), dim=1).double()


class WindowGroupStats:
    """GroupNorm statistics provider for a batch of streaming windows.

    For item i, frames in [new_start[i], end) (token offsets in its window) are combined with
    the accumulator's prior sums; frames in [new_start[i], commit_end[i]) are recorded to be
    committed once the window's chunk is accepted. Items without an accumulator use their own
    valid frames, as offline decoding does.
    """

    def __init__(
        self,
        accumulators: Sequence[GroupNormAccumulator | None],
        new_start: Sequence[int],
        commit_end: Sequence[int],
    ):
        self.accumulators = list(accumulators)
        self.new_start = torch.tensor(list(new_start))
        self.commit_end = torch.tensor(list(commit_end))
        self.pending: dict[int, torch.Tensor] = {}  # layer -> (B, 3, G) sums to commit

    def __call__(
        self, layer: int, x: torch.Tensor, valid: torch.Tensor, frames_per_token: int, groups: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        length = x.shape[-1]
        frame = torch.arange(length, device=x.device)[None, :]
        start = (self.new_start.to(x.device) * frames_per_token)[:, None]
        stop = (self.commit_end.to(x.device) * frames_per_token)[:, None]
        new_region = valid & (frame >= start)
        commit_region = new_region & (frame < stop)
        window_sums = _region_sums(x, new_region, groups)
        self.pending[layer] = _region_sums(x, commit_region, groups)
        priors = torch.stack(
            [
                acc.prior(layer, groups, x.device)
                if acc is not None
                else torch.zeros(3, groups, dtype=torch.float64, device=x.device)
                for acc in self.accumulators
            ]
        )
        count, total, squares = (priors + window_sums).unbind(dim=1)
        mean = total / count
        means = mean.float()
        variances = (squares / count - mean.square()).clamp_min(0).float()
        if any(acc is None for acc in self.accumulators):
            # Window-only items: their own valid frames, as offline decoding does.
            own_mean, own_var = masked_group_stats(x, valid, groups)
            for i, acc in enumerate(self.accumulators):
                if acc is None:
                    means[i], variances[i] = own_mean[i], own_var[i]
        return means, variances


# ---- one stream --------------------------------------------------------------------------


@dataclass
class DecodeWindow:
    """A planned window: tokens[start:stop] of its stream, of which [chunk_start, chunk_end)
    is emitted."""

    stream: TokenStreamDecoder
    tokens: torch.Tensor
    start: int
    chunk_start: int
    chunk_end: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


class TokenStreamDecoder:
    """Streaming decode of one utterance. Not thread-safe; one owner at a time.

    `push(tokens)` returns the audio chunks ready now (possibly none); `finish()` returns the
    rest. Together they emit exactly samples_per_token * len(all tokens) samples, in order.
    """

    def __init__(
        self,
        decoder: MioCodecDecoder,
        global_embedding: torch.Tensor,
        options: StreamingOptions | None = None,
        clock: PlaybackClock | None = None,
    ):
        self.decoder = decoder
        self.embedding = global_embedding
        self.options = (options or StreamingOptions()).validated()
        self.clock = clock
        self.samples_per_token = decoder.samples_per_token
        self.crossfade_samples = min(
            self.samples_per_token,
            round(self.options.crossfade_ms * decoder.sample_rate / 1000),
        )
        # --- streaming state ---
        self.tokens: list[int] = []
        self.emitted_tokens = 0  # tokens whose samples have been emitted
        self.finished = False
        self.tail: torch.Tensor | None = None  # previous window's samples past its chunk
        self.norm_stats = GroupNormAccumulator()

    # ---- input ---------------------------------------------------------------------------
    def push_tokens(self, tokens: Sequence[int] | torch.Tensor) -> None:
        """Append tokens without decoding (for callers that batch windows themselves)."""
        if self.finished:
            raise RuntimeError("stream: push after finish()")
        if len(tokens) == 0:
            return
        checked = self.decoder.validate_tokens(tokens, "tokens")
        self.tokens.extend(checked.tolist())

    def mark_finished(self) -> None:
        self.finished = True

    @property
    def emitted_samples(self) -> int:
        return self.emitted_tokens * self.samples_per_token

    @property
    def done(self) -> bool:
        return self.finished and self.emitted_tokens == len(self.tokens)

    # ---- planning ------------------------------------------------------------------------
    def _deadline_near(self) -> bool:
        if self.clock is None:
            return False
        return self.clock() * 1000.0 < self.options.min_buffer_ms

    def next_window(self) -> DecodeWindow | None:
        """The next window to decode, or None if the next chunk must wait for tokens."""
        opts = self.options
        available = len(self.tokens)
        start = self.emitted_tokens
        if start >= available:
            return None
        first = start == 0
        chunk = opts.first_chunk_tokens if first else opts.chunk_tokens
        wanted_lookahead = opts.first_lookahead_tokens if first else opts.lookahead_tokens
        # Tokens already there beyond what this chunk waits for (an LLM running ahead of real
        # time, or the end of the utterance): a longer chunk after the first, as long as the
        # largest right context (or the end) stays within reach. Never waits for them.
        grown = start + opts.chunk_cap
        grown = min(grown, available if self.finished else available - opts.lookahead_cap)
        chunk_end = start + chunk if first else max(start + chunk, grown)
        if self.finished:
            chunk_end = min(chunk_end, available)
        elif available < chunk_end + wanted_lookahead:
            if first or not self._deadline_near():
                return None
            # The client is about to run dry: go out now, splitting the tokens we have between
            # the chunk and its right context (at least a first-chunk's worth of audio, so
            # that the next deadline is not immediate).
            surplus = available - start
            chunk = min(chunk, max(surplus - opts.lookahead_tokens, opts.first_chunk_tokens))
            chunk_end = start + min(chunk, surplus)
        # Right context: whatever is there, up to the cap (more context, closer to offline).
        stop = min(available, chunk_end + opts.lookahead_cap)
        window_start = max(0, start - opts.left_context_tokens)
        return DecodeWindow(
            stream=self,
            tokens=torch.tensor(self.tokens[window_start:stop], dtype=torch.long),
            start=window_start,
            chunk_start=start,
            chunk_end=chunk_end,
            stop=stop,
        )

    # ---- applying a decoded window -------------------------------------------------------
    def apply(
        self, window: DecodeWindow, samples: torch.Tensor, stats: torch.Tensor
    ) -> torch.Tensor:
        """Accept a decoded window: commit its GroupNorm sums and return its chunk's audio.

        samples: the window's waveform; stats: {layer: (3, G)} sums of the chunk's frames.
        """
        assert window.chunk_start == self.emitted_tokens, "windows must be applied in order"
        spt = self.samples_per_token
        begin = (window.chunk_start - window.start) * spt
        end = (window.chunk_end - window.start) * spt
        audio = samples[begin:end].clone()
        if self.tail is not None:
            overlap = min(self.tail.numel(), audio.numel())
            fade_in = _fade_in(overlap)
            audio[:overlap] = self.tail[:overlap] * (1 - fade_in) + audio[:overlap] * fade_in
        extra = samples[end : end + self.crossfade_samples]
        self.tail = extra.clone() if extra.numel() == self.crossfade_samples > 0 else None
        for layer, sums in stats.items():
            self.norm_stats.commit(layer, sums)
        self.emitted_tokens = window.chunk_end
        return audio

    # ---- convenience: decode alone -------------------------------------------------------
    def _drain(self) -> list[torch.Tensor]:
        chunks = []
        while (window := self.next_window()) is not None:
            chunks.extend(decode_windows(self.decoder, [window]))
        return chunks

    def push(self, tokens: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """Add tokens; return the audio chunks now ready (possibly none)."""
        self.push_tokens(tokens)
        return self._drain()

    def finish(self) -> list[torch.Tensor]:
        """No more tokens: return the rest of the audio. Further pushes raise."""
        self.mark_finished()
        return self._drain()


_FADES: dict[int, torch.Tensor] = {}


def _fade_in(length: int) -> torch.Tensor:
    """Raised-cosine ramp; with its complement it sums to one (correlated signals)."""
    if length not in _FADES:
        n = torch.arange(length, dtype=torch.float32)
        _FADES[length] = 0.5 - 0.5 * torch.cos(math.pi * (n + 0.5) / max(length, 1))
    return _FADES[length]


# ---- batching across streams ------------------------------------------------------------


@dataclass
class DecodedWindows:
    """The result of one batched forward, to be applied to the windows' streams in order."""

    windows: list[DecodeWindow]
    waves: list[torch.Tensor]
    norm_sums: dict[int, torch.Tensor]  # layer -> (B, 3, G) GroupNorm sums of each chunk

    def apply(self) -> list[torch.Tensor]:
        """Hand each window's output to its stream; returns the audio chunks, in order."""
        return [
            w.stream.apply(w, wave, {layer: sums[i] for layer, sums in self.norm_sums.items()})
            for i, (w, wave) in enumerate(zip(self.windows, self.waves, strict=True))
        ]


def forward_windows(decoder: MioCodecDecoder, windows: Sequence[DecodeWindow]) -> DecodedWindows:
    """Decode windows of different streams in one forward, without touching stream state
    (so it can run on a worker thread while the streams keep receiving tokens).

    At most one window per stream (a stream's next window needs this one's statistics).
    Windows are padded to a fixed bucket length, so shapes repeat from step to step.
    """
    if len({id(w.stream) for w in windows}) != len(windows):
        raise ValueError("forward_windows: at most one window per stream per step")
    bucket = windows[0].stream.options.window_bucket_tokens
    longest = max(w.length for w in windows)
    padded_length = bucket * math.ceil(longest / bucket)
    tokens = []
    for w in windows:
        pad = torch.zeros(padded_length - w.length, dtype=torch.long)
        tokens.append(torch.cat((w.tokens, pad)))
    provider = WindowGroupStats(
        [
            w.stream.norm_stats if w.stream.options.groupnorm_stats == "accumulated" else None
            for w in windows
        ],
        [w.chunk_start - w.start for w in windows],
        [w.chunk_end - w.start for w in windows],
    )
    waves = decoder.run_batch(
        tokens,
        [w.stream.embedding for w in windows],
        group_stats=provider,
        lengths=[w.length for w in windows],
    )
    return DecodedWindows(list(windows), waves, provider.pending)


def decode_windows(decoder: MioCodecDecoder, windows: Sequence[DecodeWindow]) -> list[torch.Tensor]:
    """Decode windows of different streams in one forward and apply each to its stream.

    Returns each window's audio chunk, in the order given.
    """
    if not windows:
        return []
    return forward_windows(decoder, windows).apply()


def decode_step(
    decoder: MioCodecDecoder, streams: Sequence[TokenStreamDecoder]
) -> dict[int, torch.Tensor]:
    """One batched step over many streams: the next ready window of each, in one forward.

    Returns {index in `streams`: audio chunk} for the streams that produced audio.
    """
    planned = [(i, s.next_window()) for i, s in enumerate(streams)]
    ready = [(i, w) for i, w in planned if w is not None]
    chunks = decode_windows(decoder, [w for _, w in ready])
    return {i: chunk for (i, _), chunk in zip(ready, chunks, strict=True)}
