"""Streaming decode, the device side: one owner of every stream's device state, and the step.

A `StreamBatcher` opens streams (`open`) and decodes their planned windows, several streams'
at once, in one forward (`forward`). It owns everything the streams keep on the decode device:

- `StreamSlots`: per stream, the GroupNorm sums (count, sum, sum of squares per layer and group)
  over everything it has decoded so far, and the crossfade tail (samples past its last chunk),
  preallocated and updated where the decode runs. A stream's slot is taken when its first
  window is packed and given back once, when the stream is done or closed.
- the step: the windows' numbers packed into one tensor (a typed `WindowRecord` per window),
  one upload, the model's trunk with `SlotGroupStats` in place of the GroupNorm statistics,
  the iSTFT head on the frames that reach the chunks, the crossfade, the statistics committed,
  one download (the chunks' samples and a finiteness flag per window);
- `CudaGraphSteps`: on CUDA, the step replayed as captured graphs, one per step shape.

The host side (planning windows, one stream's tokens and position) is `codec/streaming.py`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .model import MioCodecDecoderModel
from .placement import Placement
from .streaming import (
    DecodeWindow,
    PlaybackClock,
    StatisticsMode,
    StreamGeometry,
    StreamingOptions,
    Timer,
    TokenStreamDecoder,
)
from .voices import check_embedding

logger = logging.getLogger(__name__)


# ---- device-side state ------------------------------------------------------------------


class StreamSlots:
    """The device-side state of a batcher's streams, one preallocated slot per stream.

    Per slot: GroupNorm sums (count, sum, sum of squares per layer and group, float64) over
    everything the stream has decoded so far, and the crossfade tail. `take(stream)` hands out
    a slot when the stream's first window is packed, `give_back(stream)` returns it (once; a
    second call does nothing). Both may run on different threads (the decode thread packs, the
    stream's owner closes it), so they hold a lock. The tensors are only read, written and
    grown by whoever runs the forward, so a decode thread needs no lock for them. A slot's
    contents are never read before its stream's first window overwrites them, so a slot given
    back needs no clearing.
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
        self._held: dict[TokenStreamDecoder, int] = {}
        self._issued = 0  # slots ever handed out: ids 0 .. issued - 1
        self.generation = 0  # bumped when the tensors are reallocated (graphs must recapture)
        self.ensure_capacity(capacity)
        # Padding rows of fixed-shape steps read and write this slot, which no stream holds;
        # so does the window of a stream closed before its first step ran.
        self.scratch = self._new_slot()

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        self._issued += 1
        return self._issued - 1

    def take(self, stream: TokenStreamDecoder) -> int:
        """The stream's slot, taken now if it holds none yet."""
        with self._lock:
            slot = self._held.get(stream)
            if slot is None:
                if stream.closed:  # closed while its window was on the way: nothing to keep
                    return self.scratch
                slot = self._held[stream] = self._new_slot()
            return slot

    def give_back(self, stream: TokenStreamDecoder) -> None:
        with self._lock:
            slot = self._held.pop(stream, None)
            if slot is not None:
                self._free.append(slot)

    @property
    def in_use(self) -> int:
        """Slots held by streams."""
        with self._lock:
            return len(self._held)

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


# ---- the per-window numbers of a step ------------------------------------------------------


class WindowRecord(NamedTuple):
    """The numbers the device step needs about one window, in tokens, frames and samples
    relative to the window's first token. Packed as float32 columns after the speaker embedding
    and the tokens (all integers far below 2**24, exact in float32)."""

    length: int  # real tokens in the window
    new_start: int  # first token whose frames are new to the statistics
    commit_end: int  # frames before this token are committed to the slot's sums
    slot: int  # the stream's slot in `StreamSlots`
    use_prior: int  # 1: combine with the slot's sums; 0: the window's frames alone
    frame_count: int  # the iSTFT head's frames for the window
    first_frame: int  # the first head frame that reaches the chunk
    sample_begin: int  # the chunk's first sample in the window's waveform
    chunk_samples: int
    fade_samples: int  # crossfade the chunk's start with the slot's tail over this many
    tail_from: int  # the samples from here on become the slot's next tail

    @classmethod
    def padding(cls, padded_length: int, scratch_slot: int) -> WindowRecord:
        """A padding row of a fixed-shape step: one whole-window chunk that reads no
        statistics and writes only the scratch slot."""
        return cls(padded_length, 0, padded_length, scratch_slot, 0, 0, 0, 0, 0, 0, 0)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(self, dtype=torch.float32)


class WindowColumns(NamedTuple):
    """`WindowRecord`'s fields for a whole step, on the device: one (B,) int64 tensor each."""

    length: torch.Tensor
    new_start: torch.Tensor
    commit_end: torch.Tensor
    slot: torch.Tensor
    use_prior: torch.Tensor
    frame_count: torch.Tensor
    first_frame: torch.Tensor
    sample_begin: torch.Tensor
    chunk_samples: torch.Tensor
    fade_samples: torch.Tensor
    tail_from: torch.Tensor

    @classmethod
    def unpack(cls, block: torch.Tensor) -> WindowColumns:
        """From the packed record columns, (B, len(WindowRecord._fields)) float32."""
        return cls(*block.long().unbind(dim=1))


assert WindowColumns._fields == WindowRecord._fields
RECORD_COLUMNS = len(WindowRecord._fields)


class StatisticsSpan(NamedTuple):
    """Which of a window's frames its GroupNorm statistics take, in tokens from its start."""

    new_start: int  # frames from here on are added to the slot's sums
    commit_end: int  # frames in [new_start, commit_end) are committed to the slot's sums
    use_prior: int  # 1: with the slot's sums; 0: this window's frames alone


def statistics_span(mode: StatisticsMode, window: DecodeWindow) -> StatisticsSpan:
    """A window's `StatisticsSpan` under a statistics mode."""
    if mode is StatisticsMode.ACCUMULATED:
        # The slot holds the frames of every chunk emitted; the window adds its chunk and
        # lookahead, and commits its chunk.
        new = window.chunk_start - window.start
        return StatisticsSpan(new, window.chunk_end - window.start, int(window.chunk_start > 0))
    if mode is StatisticsMode.RECOMPUTED:
        # The slot holds the frames before this window; all of the window's frames are taken
        # as this window computes them (its left context has more right context now than when
        # it was a chunk), and it commits the frames the next window will not cover again.
        left = window.stream.options.left_context_tokens
        commit = max(0, window.chunk_end - left - window.start)
        return StatisticsSpan(0, commit, int(window.start > 0))
    return StatisticsSpan(0, window.chunk_end - window.start, 0)  # StatisticsMode.WINDOW


class StepShape(NamedTuple):
    """The shape of one step's tensors (a CUDA graph is captured per shape)."""

    rows: int
    padded_length: int  # window tokens, padded to the bucket
    width: int  # output samples per row
    frames: int  # head frames computed per row


def batch_bucket(count: int) -> int:
    """Batch sizes of fixed-shape steps: powers of two."""
    return 1 << max(0, count - 1).bit_length()


# ---- a decoded step --------------------------------------------------------------------------


class NonFiniteAudio(ValueError):
    """A window decoded to NaN or infinite samples."""


@dataclass
class DecodedWindows:
    """The result of one batched forward, to be applied to the windows' streams in order."""

    batcher: StreamBatcher
    windows: list[DecodeWindow]
    chunks: list[torch.Tensor]  # each window's chunk, crossfaded, on the CPU
    finite: list[bool]

    def apply(self) -> list[torch.Tensor]:
        """Hand each window's chunk to its stream; returns the chunks, in order.

        Raises `NonFiniteAudio` for a window whose samples are not all finite (apply the
        others with `apply_one` to keep them going)."""
        return [self.apply_one(i) for i in range(len(self.windows))]

    def apply_one(self, index: int) -> torch.Tensor:
        """Advance the window's stream past its chunk (a stream now done gives its slot back);
        returns the chunk."""
        if not self.finite[index]:
            raise NonFiniteAudio("decoding produced non-finite samples")
        window = self.windows[index]
        window.stream.apply(window)
        if window.stream.done:
            self.batcher.release(window.stream)
        return self.chunks[index]


# ---- CUDA graphs of the step ---------------------------------------------------------------


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    packed: torch.Tensor  # static input
    chunks: torch.Tensor  # static outputs
    finite: torch.Tensor


StepRunner = Callable[[torch.Tensor, StepShape], tuple[torch.Tensor, torch.Tensor]]


class CudaGraphSteps:
    """The step, captured as CUDA graphs: one per step shape, on first use.

    An eager step of this decoder is a few hundred small kernels, and on a GPU their launches,
    not the arithmetic, set its time. A graph replays them all with one launch. Fixed-shape
    steps (batch a power of two, window length a multiple of the bucket, fixed output width)
    come in few shapes, so each is captured once and replayed after. Graphs read their input
    from, and write their outputs to, static tensors, and they hold the addresses of the slots'
    tensors, so all are captured again when the slots grow. A shape whose capture fails runs
    eagerly from then on (logged once).
    """

    def __init__(self, run_step: StepRunner, slots: StreamSlots):
        if slots.device.type != "cuda":
            raise ValueError("CUDA graphs need a decoder on a CUDA device")
        self._run_step = run_step
        self._slots = slots
        self._graphs: dict[StepShape, _Captured] = {}
        self._eager: set[StepShape] = set()
        self._generation = slots.generation
        self._pool = torch.cuda.graph_pool_handle()
        self.captures = 0
        self.replays = 0

    @property
    def shapes(self) -> list[StepShape]:
        return sorted(self._graphs)

    def run(self, packed: torch.Tensor, shape: StepShape) -> tuple[torch.Tensor, torch.Tensor]:
        if self._slots.generation != self._generation:  # the slot tensors moved: recapture
            self._graphs.clear()
            self._generation = self._slots.generation
        captured = self._graphs.get(shape)
        if captured is None and shape not in self._eager:
            captured = self._capture(shape, packed)
        if captured is None:
            return self._run_step(packed, shape)
        captured.packed.copy_(packed)
        captured.graph.replay()
        self.replays += 1
        return captured.chunks, captured.finite

    def _capture(self, shape: StepShape, example: torch.Tensor) -> _Captured | None:
        # Warm-up and capture run on rows that touch only the scratch slot.
        static = example.clone()
        padding = WindowRecord.padding(shape.padded_length, self._slots.scratch).as_tensor()
        static[:, static.shape[1] - RECORD_COLUMNS :] = padding.to(static)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisations (RoPE tables, cuBLAS) happen here
                    self._run_step(static, shape)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                chunks, finite = self._run_step(static, shape)
        except Exception:  # an op that cannot be captured: this shape stays eager
            logger.exception("capturing a CUDA graph for step shape %s failed; eager", shape)
            self._eager.add(shape)
            return None
        self.captures += 1
        captured = _Captured(graph, static, chunks, finite)
        self._graphs[shape] = captured
        return captured


# ---- the batcher -----------------------------------------------------------------------------


class StreamBatcher:
    """Opens streams of one decoder model and decodes their windows, batched across streams.

    Owns the streams' device state (`StreamSlots`), the step, and on CUDA its graphs
    (`cuda_graphs`: default on when the model runs on CUDA). Windows are planned by their
    streams; `forward` decodes them (on any thread: the service's decode thread, while the
    streams keep receiving tokens); `DecodedWindows.apply` hands the chunks back to the
    streams, on the streams' owner's thread.
    """

    def __init__(
        self,
        model: MioCodecDecoderModel,
        placement: Placement,
        *,
        cuda_graphs: bool | None = None,
        capacity: int = 64,
    ):
        self.model = model
        self.placement = placement
        cfg = model.cfg
        self.geometry = StreamGeometry(cfg.sample_rate, cfg.samples_per_token, cfg.codebook_size)
        self.embedding_dim = cfg.global_embedding_dim
        counts = [norm.num_groups for norm in model.group_norms]
        self.slots = StreamSlots(counts, cfg.samples_per_token, placement.device, capacity)
        if cuda_graphs is None:
            cuda_graphs = placement.device.type == "cuda"
        self.cuda_graphs = (
            CudaGraphSteps(self._run_step, self.slots)
            if cuda_graphs and placement.device.type == "cuda"
            else None
        )

    # ---- streams -----------------------------------------------------------------------
    def open(
        self,
        global_embedding: object,
        options: StreamingOptions | None = None,
        clock: PlaybackClock | None = None,
        timer: Timer = time.perf_counter,
    ) -> TokenStreamDecoder:
        """A new stream whose windows this batcher decodes (see `TokenStreamDecoder`).

        `clock` returns how many seconds of audio the client has buffered; with it, planning
        follows the client (the first window, just-in-time chunks, and a chunk that goes out
        early when playback would otherwise run dry). `timer` is the time those plans read.
        """
        embedding = check_embedding(global_embedding, self.embedding_dim)
        return TokenStreamDecoder(self, self.geometry, embedding, options, clock, timer)

    def release(self, stream: TokenStreamDecoder) -> None:
        """Give back the stream's slot, if it holds one (idempotent)."""
        self.slots.give_back(stream)

    @property
    def slots_in_use(self) -> int:
        return self.slots.in_use

    # ---- decoding ----------------------------------------------------------------------
    def decode(self, windows: Sequence[DecodeWindow]) -> list[torch.Tensor]:
        """Decode windows of different streams in one forward and apply each to its stream.

        Returns each window's audio chunk, in the order given.
        """
        if not windows:
            return []
        return self.forward(windows).apply()

    def step(self, streams: Sequence[TokenStreamDecoder]) -> dict[int, torch.Tensor]:
        """One batched step over many streams: the next ready window of each, in one forward.

        Returns {index in `streams`: audio chunk} for the streams that produced audio.
        """
        planned = [(i, s.next_window()) for i, s in enumerate(streams)]
        ready = [(i, w) for i, w in planned if w is not None]
        chunks = self.decode([w for _, w in ready])
        return {i: chunk for (i, _), chunk in zip(ready, chunks, strict=True)}

    def forward(
        self, windows: Sequence[DecodeWindow], fixed_shapes: bool | None = None
    ) -> DecodedWindows:
        """Decode windows of different streams in one forward, crossfade their chunks and
        commit their statistics into the streams' slots; the streams' host state is left to
        `DecodedWindows.apply`.

        At most one window per stream (a stream's next window needs this one's statistics).
        Windows are padded to their bucket length, so shapes repeat from step to step. With
        `fixed_shapes` (default: when CUDA graphs replay the step) the batch is padded to a
        power of two with rows that write only the scratch slot, and the output width is fixed
        by the chunk sizes the streams may use, so a few shapes cover every step. Nothing is
        changed if the forward raises, so a failed step can be retried with fewer windows.
        """
        if len({id(w.stream) for w in windows}) != len(windows):
            raise ValueError("forward: at most one window per stream per step")
        if any(w.stream.batcher is not self for w in windows):
            raise ValueError("forward: a window of a stream this batcher did not open")
        if fixed_shapes is None:
            fixed_shapes = self.cuda_graphs is not None
        packed, shape = self._pack(windows, fixed_shapes)
        packed = packed.to(self.placement.device)
        if self.cuda_graphs is not None and fixed_shapes:
            chunks, finite = self.cuda_graphs.run(packed, shape)
        else:
            chunks, finite = self._run_step(packed, shape)
        host = torch.cat((chunks, finite[:, None].float()), dim=1).cpu()  # the one download
        return DecodedWindows(
            self,
            list(windows),
            [host[i, : w.chunk_samples] for i, w in enumerate(windows)],
            [bool(flag) for flag in host[: len(windows), -1]],
        )

    def _pack(
        self, windows: Sequence[DecodeWindow], fixed_shapes: bool
    ) -> tuple[torch.Tensor, StepShape]:
        """One float32 tensor for the one upload, a row per window: the speaker embedding, the
        tokens (padded), the `WindowRecord`. Streams take their slots here."""
        head = self.model.istft_head
        spt = self.geometry.samples_per_token
        head_rate = self.model.head_frames_per_token
        padded_length = max(w.padded_length for w in windows)
        if fixed_shapes:
            # Room for the longest chunk any of these streams may emit, plus its crossfade tail,
            # in steps of 8 tokens.
            longest = max(w.stream.options.longest_chunk for w in windows)
            width = 8 * math.ceil((longest + 1) / 8) * spt
            rows = batch_bucket(len(windows))
        else:
            width = max(w.chunk_samples + w.stream.crossfade_samples for w in windows)
            rows = len(windows)
        ranges = [head.frames_for_range((w.chunk_start - w.start) * spt, width) for w in windows]
        shape = StepShape(rows, padded_length, width, max(count for _, count in ranges))

        dim = self.embedding_dim
        packed = torch.zeros(rows, dim + padded_length + RECORD_COLUMNS)
        largest_slot = self.slots.scratch
        for i, (w, (first_frame, _)) in enumerate(zip(windows, ranges, strict=True)):
            stream = w.stream
            slot = self.slots.take(stream)
            largest_slot = max(largest_slot, slot)
            span = statistics_span(stream.options.groupnorm_stats, w)
            record = WindowRecord(
                length=w.length,
                new_start=span.new_start,
                commit_end=span.commit_end,
                slot=slot,
                use_prior=span.use_prior,
                frame_count=w.length * head_rate,
                first_frame=first_frame,
                sample_begin=(w.chunk_start - w.start) * spt,
                chunk_samples=w.chunk_samples,
                fade_samples=w.fade_samples,
                tail_from=w.chunk_samples,
            )
            packed[i, :dim] = stream.embedding
            packed[i, dim : dim + w.length] = torch.tensor(stream.tokens[w.start : w.stop])
            packed[i, dim + padded_length :] = record.as_tensor()
        padding = WindowRecord.padding(padded_length, self.slots.scratch)
        packed[len(windows) :, dim + padded_length :] = padding.as_tensor()
        self.slots.ensure_capacity(largest_slot + 1)
        return packed, shape

    @torch.inference_mode()
    def _run_step(
        self, packed: torch.Tensor, shape: StepShape
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The device part of a step: (chunks (B, width), finite (B,)), slots updated."""
        slots = self.slots
        dim = self.embedding_dim
        padded_length, width = shape.padded_length, shape.width
        speaker = packed[:, :dim]
        tokens = packed[:, dim : dim + padded_length].long()
        record = WindowColumns.unpack(packed[:, dim + padded_length :])
        positions = torch.arange(padded_length, device=packed.device)[None, :]
        valid = positions < record.length[:, None]
        stats = SlotGroupStats(
            slots, record.slot, record.new_start, record.commit_end, record.use_prior
        )
        self.placement.prepare_thread()
        with self.placement.autocast():
            x, _ = self.model.trunk(tokens, speaker, valid, stats)
            samples = self.model.istft_head.forward_ranges(
                x, record.frame_count, record.first_frame, record.sample_begin, width, shape.frames
            ).float()

        # Crossfade each chunk's start with the tail its stream's previous window left.
        n = torch.arange(width, device=packed.device)[None, :]
        fade_len = record.fade_samples[:, None]
        in_fade = n < fade_len
        fade_in = 0.5 - 0.5 * torch.cos(math.pi * (n + 0.5) / fade_len.clamp_min(1))
        tail_positions = n.clamp(max=slots.tail_samples - 1).expand(len(packed), -1)
        previous = slots.tails[record.slot].gather(1, tail_positions)
        chunks = torch.where(in_fade, previous * (1 - fade_in) + samples * fade_in, samples)
        in_chunk = n < record.chunk_samples[:, None]
        finite = torch.where(in_chunk, torch.isfinite(chunks), True).all(dim=1)

        # The samples past the chunk become the stream's next tail; statistics are committed.
        tail_index = record.tail_from[:, None] + torch.arange(slots.tail_samples, device=n.device)
        slots.tails[record.slot] = samples.gather(1, tail_index.clamp(max=width - 1))
        stats.commit()
        return chunks, finite
