"""One decode loop for all streams: each step runs a batch of ready windows in one forward.

Windows are planned and applied on the event loop (where tokens arrive); the forward, the
crossfades and the GroupNorm statistics run on a worker thread (torch releases the GIL), so
token intake and gRPC I/O continue meanwhile.

Which windows share a step:
- a stream's first window (its first audio) goes ahead of everything else, in a step of first
  windows only: they are short, so that step is quick, and a new stream never waits behind a
  step of long steady windows padded to their length;
- steady windows are taken most urgent first (least audio buffered at the client), grouped by
  their padded length, up to `max_batch` windows and `max_batch_tokens` padded tokens per step,
  so a step's latency stays bounded however many streams are open.
Only streams whose state changed (tokens, input ended, room in their queue) are planned again,
plus a poll of playback deadlines while tokens are pending. A stream whose output queue is full
(a slow client) is skipped, so it never stalls the others. A window that fails, or decodes to
non-finite samples, fails its own stream only: a failed step is retried window by window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from miotts_stream.codec import MioCodecDecoder
from miotts_stream.codec.streaming import (
    DecodedWindows,
    DecodeWindow,
    NonFiniteAudio,
    TokenStreamDecoder,
    forward_windows,
)

logger = logging.getLogger(__name__)

# Without new tokens, re-check playback deadlines this often.
DEADLINE_POLL_S = 0.01
# Chunks decoded ahead of a reader before its stream pauses.
MAX_QUEUED_CHUNKS = 32


@dataclass
class DecodeFailed:
    """Put in a stream's output queue instead of audio when its decode failed."""

    message: str


@dataclass(eq=False)
class ScheduledStream:
    """A registered stream and where its audio goes. `None` in the queue marks its end.

    The queue is unbounded so that a wake-up marker can always be put in; the scheduler stops
    decoding for a stream once `MAX_QUEUED_CHUNKS` chunks wait in it.
    """

    stream: TokenStreamDecoder
    output: asyncio.Queue = field(default_factory=asyncio.Queue)
    closed: bool = False
    ended: bool = False

    @property
    def backlogged(self) -> bool:
        return self.output.qsize() >= MAX_QUEUED_CHUNKS


class DecodeScheduler:
    """Batches the ready windows of all registered streams, step after step."""

    def __init__(
        self, decoder: MioCodecDecoder, max_batch: int = 32, max_batch_tokens: int | None = None
    ):
        self.decoder = decoder
        self.max_batch = max_batch
        # Default: room for max_batch steady windows of the default geometry (112 tokens).
        self.max_batch_tokens = max_batch_tokens or 112 * max_batch
        self._streams: list[ScheduledStream] = []
        self._dirty: set[ScheduledStream] = set()  # to plan again
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self._task: asyncio.Task | None = None
        self._last_poll = 0.0
        self.step_seconds_ema = 0.0  # recent batched-step time: the decode latency to plan for
        self.steps = 0
        self.windows_decoded = 0
        self.failed_windows = 0

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="decode-loop")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        for entry in list(self._streams):  # their device slots go back too
            self.unregister(entry)

    # ---- streams -------------------------------------------------------------------------
    def register(self, stream: TokenStreamDecoder) -> ScheduledStream:
        entry = ScheduledStream(stream)
        self._streams.append(entry)
        self.wake(entry)
        return entry

    def unregister(self, entry: ScheduledStream) -> None:
        entry.closed = True
        self._dirty.discard(entry)
        if entry in self._streams:
            self._streams.remove(entry)
        entry.stream.close()

    def wake(self, entry: ScheduledStream | None = None) -> None:
        """`entry` changed (new tokens, input ended, room in its queue): plan it again now."""
        if entry is not None and not entry.closed:
            self._dirty.add(entry)
        self._wake.set()

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    # ---- planning ------------------------------------------------------------------------
    def _candidates(self) -> list[ScheduledStream]:
        """Streams to plan: those that changed, and on each deadline poll every stream with
        tokens pending (a chunk may have to go out early for its client)."""
        now = time.perf_counter()
        if now - self._last_poll >= DEADLINE_POLL_S:
            self._last_poll = now
            pending = [e for e in self._streams if e.stream.emitted_tokens < len(e.stream.tokens)]
            self._dirty.update(pending)
        candidates, self._dirty = list(self._dirty), set()
        return candidates

    def _plan(self) -> list[tuple[ScheduledStream, DecodeWindow]]:
        first: list[tuple[ScheduledStream, DecodeWindow]] = []
        steady: list[tuple[float, int, ScheduledStream, DecodeWindow]] = []
        for entry in self._candidates():
            if entry.closed or entry.ended:
                continue
            if entry.backlogged:
                continue  # slow reader: it wakes us when it has taken a chunk
            try:
                if entry.stream.done:
                    self._end(entry)
                    continue
                window = entry.stream.next_window()
                if window is None:
                    continue
                if window.chunk_start == 0:
                    first.append((entry, window))
                else:
                    clock = entry.stream.clock
                    urgency = clock() if clock is not None else math.inf
                    steady.append((urgency, self._bucket(window), entry, window))
            except Exception as err:  # a broken clock or stream fails that stream only
                logger.exception("planning a window failed")
                self._fail(entry, err)
        if first:
            chosen = first[: self.max_batch]
            rest = [(e, w) for e, w in first[self.max_batch :]] + [(e, w) for *_, e, w in steady]
        else:
            chosen, rest = self._choose_steady(steady)
        # Windows not chosen are planned again next time (their streams are unchanged).
        self._dirty.update(entry for entry, _ in rest)
        return chosen

    def _bucket(self, window: DecodeWindow) -> int:
        bucket = window.stream.options.window_bucket_tokens
        return bucket * math.ceil(window.length / bucket)

    def _choose_steady(self, steady):
        """The most urgent window, then others of its padded length, then shorter ones, within
        the step's window and token budgets."""
        if not steady:
            return [], []
        steady.sort(key=lambda item: item[0])
        length = steady[0][1]
        same = [item for item in steady if item[1] == length]
        shorter = [item for item in steady if item[1] < length]
        longer = [item for item in steady if item[1] > length]
        chosen, rest = [], longer
        for item in same + shorter:
            if len(chosen) < self.max_batch and (len(chosen) + 1) * length <= max(
                self.max_batch_tokens, length
            ):
                chosen.append(item)
            else:
                rest.append(item)
        return [(e, w) for *_, e, w in chosen], [(e, w) for *_, e, w in rest]

    def _end(self, entry: ScheduledStream) -> None:
        if not entry.ended:
            entry.ended = True
            entry.output.put_nowait(None)
            self.unregister(entry)

    def _fail(self, entry: ScheduledStream, error: Exception) -> None:
        """The stream's reader gets the error instead of more audio."""
        if entry.ended:
            return
        entry.ended = True
        self.failed_windows += 1
        self.unregister(entry)
        entry.output.put_nowait(DecodeFailed(str(error)))

    # ---- the loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            planned = self._plan()
            if not planned:
                self._wake.clear()
                if self._dirty:
                    continue
                timeout = DEADLINE_POLL_S if self._has_pending_tokens() else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            started = time.perf_counter()
            results = await loop.run_in_executor(self._executor, self._forward, planned)
            elapsed = time.perf_counter() - started
            self.step_seconds_ema = (
                elapsed if self.steps == 0 else 0.8 * self.step_seconds_ema + 0.2 * elapsed
            )
            self.steps += 1
            self.windows_decoded += len(planned)
            for entry, outcome in results:
                self._deliver(entry, outcome)

    def _forward(self, planned):
        """Worker thread: one batched forward; on failure, each window alone (isolation)."""
        windows = [w for _, w in planned]
        try:
            decoded = forward_windows(self.decoder, windows)
            return [(entry, (decoded, i)) for i, (entry, _) in enumerate(planned)]
        except Exception as err:
            if len(planned) == 1:
                logger.exception("decoding a window failed")
                return [(planned[0][0], err)]
            logger.warning(
                "a decode step of %d windows failed (%s); retrying one by one", len(planned), err
            )
        return [outcome for item in planned for outcome in self._forward([item])]

    def _deliver(self, entry: ScheduledStream, outcome: tuple[DecodedWindows, int] | Exception):
        if entry.closed or entry.ended:
            return
        if isinstance(outcome, Exception):
            self._fail(entry, outcome)
            return
        decoded, index = outcome
        try:
            chunk = decoded.apply_one(index)
        except NonFiniteAudio as err:
            logger.error("stream decoded to non-finite audio; failing it")
            self._fail(entry, err)
            return
        entry.output.put_nowait(chunk)
        if entry.stream.done:
            self._end(entry)
        else:
            self._dirty.add(entry)

    def _has_pending_tokens(self) -> bool:
        return any(e.stream.emitted_tokens < len(e.stream.tokens) for e in self._streams)
