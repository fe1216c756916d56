"""FROZEN: `miotts_stream/codec/streaming.py` as of commit 68f7d4f, before the decode path's
redesign (issue 19), kept unchanged except this paragraph and the type-only import of the
decoder. `tests/test_stream_identity.py` decodes the same tokens with it and with the current
code, in one process, and requires the audio to be bit-identical. It reads what it needs from
the decoder through `LegacyDecoder` there (the decoder held the stream slots then).

Streaming decode: overlapping 25 Hz token windows with causal context, batched across streams.

MioCodec's decoder is not causal (windowed attention both ways, symmetric convolutions,
utterance-wide GroupNorm), so a chunk decoded early differs from the offline decode. We decode
windows

    [ left context | chunk | lookahead ]

keep the chunk's samples, and crossfade each seam with the previous window's extra samples.
A chunk waits for `lookahead_tokens` of right context (or for the client's buffer to run low);
tokens that are already there when it is planned (an LLM running ahead of real time) widen the
window, up to `max_lookahead_tokens` of right context and `max_chunk_tokens` of chunk.
The GroupNorm statistics, which offline decoding takes over the whole utterance, are
accumulated over everything decoded so far (see `SlotGroupStats`), which closes most of the gap
between windowed and offline decoding.

State is explicit and per stream, in the manner of Kyutai's moshi streaming modules. Each
stream (`TokenStreamDecoder`) owns its host-side state (tokens received, samples emitted) and one
slot of `StreamSlots`, the decoder's device-side state: the GroupNorm sums and the crossfade
tail, preallocated per stream and updated where the decode runs. A window is planned by its
stream (`next_window`), decoded by anyone (alone, or batched with other streams' windows by
`forward_windows`, which also does the numeric part of applying it: crossfade, statistics), and
applied back to its stream (`apply`, host bookkeeping only). A batched step uploads one tensor
and downloads one: the chunks' samples and a finiteness flag per window.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from miotts_stream.codec.decoder import MioCodecDecoder

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


# ---- device-side streaming state ------------------------------------------------------------


class StreamSlots:
    """The streaming state of all streams of one decoder that lives on the decode device.

    Per slot: GroupNorm sums (count, sum, sum of squares per layer and group, float64) over
    everything the stream has decoded so far, and the crossfade tail (samples past the last
    chunk). Slots are handed out on the caller's thread (`acquire` / `release`); the tensors are
    only read, written and grown by whoever runs the forward (`forward_windows`), so a decode
    thread needs no lock for them. A slot's contents are never read before its stream's first
    window overwrites them, so a released slot needs no clearing.
    """

    def __init__(self, group_counts: Sequence[int], tail_samples: int, device, capacity: int = 64):
        self.group_counts = list(group_counts)
        self.max_groups = max(self.group_counts, default=1)
        self.tail_samples = tail_samples
        self.device = torch.device(device)
        self.capacity = 0
        self.norm_sums = torch.zeros(0, len(self.group_counts), 3, self.max_groups)
        self.tails = torch.zeros(0, tail_samples)
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._issued = 0  # slots ever handed out: ids 0 .. issued - 1
        self.generation = 0  # bumped when the tensors are reallocated (graphs must recapture)
        self.ensure_capacity(capacity)
        # Padding rows of fixed-shape steps read and write this slot, which no stream owns.
        self.scratch = self.acquire()

    @classmethod
    def for_decoder(cls, decoder: MioCodecDecoder) -> StreamSlots:
        counts = [norm.num_groups for norm in decoder.model.group_norms]
        return cls(counts, decoder.samples_per_token, decoder.device)

    def acquire(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            self._issued += 1
            return self._issued - 1

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    @property
    def in_use(self) -> int:
        """Slots held by streams."""
        with self._lock:
            return self._issued - len(self._free) - 1

    def ensure_capacity(self, slots: int) -> None:
        """Grows the tensors to hold `slots` slots (doubling); decode side only."""
        if slots <= self.capacity:
            return
        capacity = max(slots, 2 * self.capacity)
        sums = torch.zeros(
            capacity, len(self.group_counts), 3, self.max_groups, dtype=torch.float64
        ).to(self.device)
        tails = torch.zeros(capacity, self.tail_samples).to(self.device)
        sums[: self.capacity] = self.norm_sums
        tails[: self.capacity] = self.tails
        self.norm_sums, self.tails, self.capacity = sums, tails, capacity
        self.generation += 1


def _region_sums(x: torch.Tensor, weights: torch.Tensor, groups: int) -> torch.Tensor:
    """(count, sum, sum of squares) per item, region and group over weighted frames.

    x: (B, C, T); weights: (B, R, T), one row per region -> (B, R, 3, G) in float64.
    """
    batch, channels, length = x.shape
    per_group = channels // groups
    grouped = x.float().reshape(batch, groups, per_group, length)
    total = torch.einsum("bgt,brt->brg", grouped.sum(dim=2), weights)
    squares = torch.einsum("bgt,brt->brg", grouped.square().sum(dim=2), weights)
    count = (weights.sum(dim=2, keepdim=True) * per_group).expand_as(total)
    return torch.stack((count, total, squares), dim=2).double()


class SlotGroupStats:
    """GroupNorm statistics for a batch of streaming windows, from and into `StreamSlots`.

    For item i, frames from `new_start[i]` (token offset in its window) to the window's end are
    combined with its slot's sums (unless it is its stream's first window); the frames in
    [new_start[i], commit_end[i]) are summed to be committed once the step succeeds. So each
    window normalises with the statistics of the whole utterance decoded so far, and every frame
    is counted once, from the window whose chunk it belongs to.
    """

    def __init__(
        self,
        slots: StreamSlots,
        slot_index: torch.Tensor,
        new_start: torch.Tensor,
        commit_end: torch.Tensor,
        use_prior: torch.Tensor,
    ):
        self.slots = slots
        self.slot_index = slot_index
        self.new_start = new_start
        self.commit_end = commit_end
        self.use_prior = use_prior.bool()
        self.pending = torch.zeros(
            len(slot_index),
            len(slots.group_counts),
            3,
            slots.max_groups,
            dtype=torch.float64,
            device=slot_index.device,
        )

    def __call__(
        self, layer: int, x: torch.Tensor, valid: torch.Tensor, frames_per_token: int, groups: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        frame = torch.arange(x.shape[-1], device=x.device)[None, :]
        new_region = valid & (frame >= (self.new_start * frames_per_token)[:, None])
        commit_region = new_region & (frame < (self.commit_end * frames_per_token)[:, None])
        weights = torch.stack((new_region, commit_region), dim=1).float()
        window_sums, commit_sums = _region_sums(x, weights, groups).unbind(dim=1)
        self.pending[:, layer, :, :groups] = commit_sums
        # `where`, not a product: a slot's previous owner may have left NaN in it.
        prior = self.slots.norm_sums[self.slot_index, layer, :, :groups]
        prior = torch.where(self.use_prior[:, None, None], prior, 0.0)
        count, total, squares = (prior + window_sums).unbind(dim=1)
        mean = total / count
        variance = (squares / count - mean.square()).clamp_min(0)
        return mean.float(), variance.float()

    def commit(self) -> None:
        sums = self.slots.norm_sums
        keep = self.use_prior[:, None, None, None]
        sums[self.slot_index] = torch.where(
            keep, sums[self.slot_index] + self.pending, self.pending
        )


# ---- one stream --------------------------------------------------------------------------


@dataclass
class DecodeWindow:
    """A planned window: tokens[start:stop] of its stream, of which [chunk_start, chunk_end)
    is emitted."""

    stream: TokenStreamDecoder
    start: int
    chunk_start: int
    chunk_end: int
    stop: int
    slot: int  # the stream's device slot, as of planning
    fade_samples: int  # crossfade with the slot's tail over this many samples (0: none)

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def chunk_samples(self) -> int:
        return (self.chunk_end - self.chunk_start) * self.stream.samples_per_token

    @property
    def keeps_tail(self) -> bool:
        """Whether the window reaches past its chunk far enough to crossfade the next seam."""
        return self.stop > self.chunk_end and self.stream.crossfade_samples > 0


class TokenStreamDecoder:
    """Streaming decode of one utterance. Not thread-safe; one owner at a time.

    `push(tokens)` returns the audio chunks ready now (possibly none); `finish()` returns the
    rest. Together they emit exactly samples_per_token * len(all tokens) samples, in order.
    The stream holds a slot of the decoder's `StreamSlots` from its first window until it is
    done or `close()`d.
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
        # --- streaming state (host side; the device side is in slot `slot`) ---
        self.tokens: list[int] = []
        self.emitted_tokens = 0  # tokens whose samples have been emitted
        self.finished = False
        self.has_tail = False  # the slot holds a crossfade tail for the next chunk
        self.slot: int | None = None

    # ---- input ---------------------------------------------------------------------------
    def push_tokens(self, tokens: Sequence[int] | torch.Tensor) -> None:
        """Append tokens without decoding (for callers that batch windows themselves)."""
        if self.finished:
            raise RuntimeError("stream: push after finish()")
        if len(tokens) == 0:
            return
        if type(tokens) is list and all(type(t) is int for t in tokens):
            # The fast path for what token sources hand over: plain ints, range-checked here.
            low, high = min(tokens), max(tokens)
            if low < 0 or high >= self.decoder.codebook_size:
                bad = low if low < 0 else high
                limit = self.decoder.codebook_size - 1
                raise ValueError(f"tokens: token id {bad} is outside 0..{limit}")
            self.tokens.extend(tokens)
            return
        self.tokens.extend(self.decoder.validate_tokens(tokens, "tokens").tolist())

    def mark_finished(self) -> None:
        self.finished = True

    @property
    def emitted_samples(self) -> int:
        return self.emitted_tokens * self.samples_per_token

    @property
    def done(self) -> bool:
        return self.finished and self.emitted_tokens == len(self.tokens)

    def close(self) -> None:
        """Gives the device slot back (idempotent; done streams give it back by themselves)."""
        if self.slot is not None:
            self.decoder.stream_slots.release(self.slot)
            self.slot = None

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
        # time, or the end of the utterance) make a longer chunk after the first. What is there
        # is split between the chunk and its right context in the caps' proportion (80 : 128),
        # so extra context always comes with a longer chunk: the decode cost per second of
        # audio stays below the fixed window's. Never waits for them.
        if first:
            chunk_end = start + chunk
        else:
            surplus = available - start
            grow_to = opts.chunk_cap
            if not self.finished:
                grow_to = surplus * opts.chunk_cap // (opts.chunk_cap + opts.lookahead_cap)
            chunk_end = start + max(chunk, min(opts.chunk_cap, grow_to))
        if self.finished:
            chunk_end = min(chunk_end, available)
        elif available < chunk_end + wanted_lookahead:
            if first or not self._deadline_near():
                return None
            # The client is about to run dry: go out now, splitting the tokens we have between
            # the chunk and its right context: at most half of them as context, so that the
            # chunk carries enough audio to cover the next window's decode (a string of tiny
            # chunks, each decoded with its full left context, costs more than real time).
            surplus = available - start
            context = min(opts.lookahead_tokens, surplus // 2)
            chunk = min(chunk, max(surplus - context, opts.first_chunk_tokens))
            chunk_end = start + min(chunk, surplus)
        # Right context: whatever is there, up to the cap (more context, closer to offline).
        stop = min(available, chunk_end + opts.lookahead_cap)
        if self.slot is None:
            self.slot = self.decoder.stream_slots.acquire()
        return DecodeWindow(
            stream=self,
            start=max(0, start - opts.left_context_tokens),
            chunk_start=start,
            chunk_end=chunk_end,
            stop=stop,
            slot=self.slot,
            fade_samples=self.crossfade_samples if self.has_tail else 0,
        )

    # ---- applying a decoded window -------------------------------------------------------
    def apply(self, window: DecodeWindow, audio: torch.Tensor) -> torch.Tensor:
        """Accept a decoded window's chunk (already crossfaded, statistics already committed
        by `forward_windows`): advance the stream. Returns the chunk."""
        assert window.chunk_start == self.emitted_tokens, "windows must be applied in order"
        self.emitted_tokens = window.chunk_end
        self.has_tail = window.keeps_tail
        if self.done:
            self.close()
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


# ---- batching across streams ------------------------------------------------------------


class NonFiniteAudio(ValueError):
    """A window decoded to NaN or infinite samples."""


@dataclass
class DecodedWindows:
    """The result of one batched forward, to be applied to the windows' streams in order."""

    windows: list[DecodeWindow]
    chunks: list[torch.Tensor]  # each window's chunk, crossfaded, on the CPU
    finite: list[bool]

    def apply(self) -> list[torch.Tensor]:
        """Hand each window's chunk to its stream; returns the chunks, in order.

        Raises `NonFiniteAudio` for a window whose samples are not all finite (apply the
        others with `apply_one` to keep them going)."""
        return [self.apply_one(i) for i in range(len(self.windows))]

    def apply_one(self, index: int) -> torch.Tensor:
        if not self.finite[index]:
            raise NonFiniteAudio("decoding produced non-finite samples")
        window = self.windows[index]
        return window.stream.apply(window, self.chunks[index])


# Input columns after the tokens and the speaker embedding, one row per window.
_META = ("length", "new_start", "commit_end", "slot", "use_prior", "frame_count", "first_frame")
_META += ("sample_begin", "chunk_samples", "fade_samples", "tail_from")


def batch_bucket(count: int) -> int:
    """Batch sizes of fixed-shape steps: powers of two."""
    return 1 << max(0, count - 1).bit_length()


def forward_windows(
    decoder: MioCodecDecoder, windows: Sequence[DecodeWindow], fixed_shapes: bool | None = None
) -> DecodedWindows:
    """Decode windows of different streams in one forward, crossfade their chunks and commit
    their statistics into the streams' slots; the streams' host state is left to `apply`.

    Runs on any thread (the service's decode thread), while the streams keep receiving tokens.
    At most one window per stream (a stream's next window needs this one's statistics).
    Windows are padded to a fixed bucket length, so shapes repeat from step to step. With
    `fixed_shapes` (default: when the decoder replays CUDA graphs) the batch is padded to a
    power of two with rows that write only the scratch slot, and the output width is fixed by
    the chunk sizes the streams may use, so a few shapes cover every step. Nothing is changed if
    the forward raises, so a failed step can be retried with fewer windows.
    """
    if len({id(w.stream) for w in windows}) != len(windows):
        raise ValueError("forward_windows: at most one window per stream per step")
    graphs = decoder.cuda_graphs
    if fixed_shapes is None:
        fixed_shapes = graphs is not None
    slots = decoder.stream_slots
    model = decoder.model
    head = model.istft_head
    spt = decoder.samples_per_token
    head_rate = model.head_frames_per_token
    bucket = windows[0].stream.options.window_bucket_tokens
    padded_length = bucket * math.ceil(max(w.length for w in windows) / bucket)
    if fixed_shapes:
        # Room for the longest chunk any of these streams may emit, plus its crossfade tail,
        # in steps of 8 tokens.
        longest = max(
            max(w.stream.options.chunk_cap, w.stream.options.first_chunk_tokens) for w in windows
        )
        width = 8 * math.ceil((longest + 1) / 8) * spt
        rows = batch_bucket(len(windows))
    else:
        width = max(w.chunk_samples + w.stream.crossfade_samples for w in windows)
        rows = len(windows)
    ranges = [head.frames_for_range((w.chunk_start - w.start) * spt, width) for w in windows]
    frames = max(count for _, count in ranges)

    # One upload: speaker embeddings, tokens and the per-window numbers in one float32 tensor
    # (token ids and offsets are integers far below 2**24, exact in float32).
    dim = decoder.embedding_dim
    packed = torch.zeros(rows, dim + padded_length + len(_META))
    for i, (w, (first_frame, _)) in enumerate(zip(windows, ranges, strict=True)):
        stream = w.stream
        accumulate = stream.options.groupnorm_stats == "accumulated"
        packed[i, :dim] = stream.embedding
        packed[i, dim : dim + w.length] = torch.tensor(stream.tokens[w.start : w.stop])
        packed[i, dim + padded_length :] = torch.tensor(
            (
                w.length,
                w.chunk_start - w.start if accumulate else 0,
                w.chunk_end - w.start,
                w.slot,
                1 if accumulate and w.chunk_start > 0 else 0,
                w.length * head_rate,
                first_frame,
                (w.chunk_start - w.start) * spt,
                w.chunk_samples,
                w.fade_samples,
                w.chunk_samples,
            ),
            dtype=torch.float32,
        )
    packed[len(windows) :, dim + padded_length :] = scratch_row(slots, padded_length)
    slots.ensure_capacity(max(w.slot for w in windows) + 1)
    packed = packed.to(decoder.device)
    if graphs is not None and fixed_shapes:
        chunks, finite = graphs.run(packed, padded_length, width, frames)
    else:
        chunks, finite = _run_windows(decoder, packed, padded_length, width, frames)
    host = torch.cat((chunks, finite[:, None].float()), dim=1).cpu()  # the one download
    return DecodedWindows(
        list(windows),
        [host[i, : w.chunk_samples] for i, w in enumerate(windows)],
        [bool(flag) for flag in host[: len(windows), -1]],
    )


def scratch_row(slots: StreamSlots, padded_length: int) -> torch.Tensor:
    """The per-window numbers of a padding row: one whole-window chunk that reads no statistics
    and writes only the scratch slot."""
    values = dict.fromkeys(_META, 0)
    values.update(length=padded_length, commit_end=padded_length, slot=slots.scratch)
    return torch.tensor([values[name] for name in _META], dtype=torch.float32)


@torch.inference_mode()
def _run_windows(
    decoder: MioCodecDecoder, packed: torch.Tensor, padded_length: int, width: int, frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The device part of a step: (chunks (B, width), finite (B,)), slots updated."""
    slots = decoder.stream_slots
    dim = decoder.embedding_dim
    speaker = packed[:, :dim]
    tokens = packed[:, dim : dim + padded_length].long()
    meta = dict(zip(_META, packed[:, dim + padded_length :].long().unbind(dim=1), strict=True))
    positions = torch.arange(padded_length, device=packed.device)[None, :]
    valid = positions < meta["length"][:, None]
    stats = SlotGroupStats(
        slots, meta["slot"], meta["new_start"], meta["commit_end"], meta["use_prior"]
    )
    if decoder.device.type == "cpu":
        torch.set_flush_denormal(True)  # see MioCodecDecoder.run_batch
    with decoder.autocast():
        x, _ = decoder.model.trunk(tokens, speaker, valid, stats)
        samples = decoder.model.istft_head.forward_ranges(
            x, meta["frame_count"], meta["first_frame"], meta["sample_begin"], width, frames
        ).float()

    # Crossfade each chunk's start with the tail its stream's previous window left.
    n = torch.arange(width, device=packed.device)[None, :]
    fade_len = meta["fade_samples"][:, None]
    in_fade = n < fade_len
    fade_in = 0.5 - 0.5 * torch.cos(math.pi * (n + 0.5) / fade_len.clamp_min(1))
    tail_positions = n.clamp(max=slots.tail_samples - 1).expand(len(packed), -1)
    previous = slots.tails[meta["slot"]].gather(1, tail_positions)
    chunks = torch.where(in_fade, previous * (1 - fade_in) + samples * fade_in, samples)
    in_chunk = n < meta["chunk_samples"][:, None]
    finite = torch.where(in_chunk, torch.isfinite(chunks), True).all(dim=1)

    # The samples past the chunk become the stream's next tail; statistics are committed.
    tail_index = meta["tail_from"][:, None] + torch.arange(slots.tail_samples, device=n.device)
    slots.tails[meta["slot"]] = samples.gather(1, tail_index.clamp(max=width - 1))
    stats.commit()
    return chunks, finite


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
