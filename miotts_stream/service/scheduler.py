"""One decode loop for all streams: each step runs a batch of ready windows in one forward.

The engine opens a stream (`DecodeScheduler.open`) and gets one handle, a `DecodeStream`:
it pushes codes in, says when they are all in, reads the audio chunks out by async iteration,
and interrupts or closes it. Everything else is the scheduler's own: the output queue and its
end marker, waking the loop, back-pressure, the decode latency a playback deadline allows for.

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
- streams plan just in time (`StreamingOptions.plan_buffer_ms`): a window is due when its
  client's buffer, less the decode latency, runs down. When a step runs anyway, windows that
  would fall due before the next step could start (within one step's time) join it, so streams
  share fewer, longer steps instead of each waking the loop on its own.
Only streams whose state changed (tokens, input ended, room in their queue) are planned again,
plus a poll of playback deadlines while tokens are pending. A stream with `MAX_QUEUED_CHUNKS`
chunks unread (a slow client) is skipped, so it never stalls the others. A window that fails,
or decodes to non-finite samples, fails its own stream only: a failed step is retried window
by window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from miotts_stream.codec import MioCodecDecoder
from miotts_stream.codec.batcher import DecodedWindows, NonFiniteAudio
from miotts_stream.codec.streaming import DecodeWindow, StreamingOptions, TokenStreamDecoder

__all__ = [
    "ClientBuffer",
    "DecodeFailed",
    "DecodeInterrupted",
    "DecodeScheduler",
    "DecodeStream",
]

logger = logging.getLogger(__name__)

# Without new tokens, re-check playback deadlines this often.
DEADLINE_POLL_S = 0.01
# Chunks decoded ahead of a reader before its stream pauses.
MAX_QUEUED_CHUNKS = 32

# Given the samples a stream has decoded so far: the seconds of audio its client holds ahead of
# playback (infinite while playback has not reached the stream).
ClientBuffer = Callable[[int], float]


class DecodeFailed(Exception):
    """The stream's decode failed (a fault, or non-finite samples): its audio ends here.
    The message says why, for the server's log."""


class DecodeInterrupted(Exception):
    """The stream was interrupted: its remaining audio was dropped."""


_END = object()  # in an output queue: the stream's audio is complete


@dataclass(eq=False)
class _Entry:
    """A stream the scheduler decodes, and where its audio goes.

    The queue is unbounded so that the last item (the end, a failure, an interruption) can
    always be put in; the scheduler stops decoding for a stream once `MAX_QUEUED_CHUNKS` chunks
    wait in it.
    """

    stream: TokenStreamDecoder
    output: asyncio.Queue = field(default_factory=asyncio.Queue)
    unread: int = 0  # chunks in `output`
    dropped: bool = False  # no more decoding: ended, failed, interrupted or closed
    interrupted: bool = False

    @property
    def backlogged(self) -> bool:
        return self.output.qsize() >= MAX_QUEUED_CHUNKS


class DecodeStream:
    """The one handle to a stream being decoded: codes in, audio chunks out.

    `push` and `finish` feed it; `async for chunk in stream` reads the chunks (float32 tensors
    at the codec's rate) until the audio is complete. A decode failure is raised from the
    iteration as `DecodeFailed`; after `interrupt()` the iteration raises `DecodeInterrupted`.
    `close()` when done with it (idempotent): decoding stops and the device slot goes back.
    """

    def __init__(self, scheduler: DecodeScheduler, entry: _Entry):
        self._scheduler = scheduler
        self._entry = entry

    def push(self, codes: Sequence[int] | torch.Tensor) -> None:
        """More codes (checked here: a code outside the codebook raises ValueError). Ignored
        once the stream is interrupted or closed."""
        if self._entry.dropped:
            return
        self._entry.stream.push_tokens(codes)
        self._scheduler._wake(self._entry)

    def finish(self) -> None:
        """All codes are in: the rest of the audio follows."""
        if self._entry.dropped:
            return
        self._entry.stream.mark_finished()
        self._scheduler._wake(self._entry)

    def interrupt(self) -> None:
        """Barge-in: stop decoding and drop the audio not read yet. A reader waiting for a
        chunk (or the next to ask) gets `DecodeInterrupted`."""
        self._scheduler._interrupt(self._entry)

    def close(self) -> None:
        """Stop decoding and give the device slot back; chunks already decoded can still be
        read, then the iteration ends."""
        self._scheduler._close(self._entry)

    @property
    def queued_chunks(self) -> int:
        """Chunks decoded and not read yet."""
        return self._entry.unread

    def __aiter__(self) -> DecodeStream:
        return self

    async def __anext__(self) -> torch.Tensor:
        output = self._entry.output
        item = await output.get()
        if item is _END:
            output.put_nowait(_END)  # the end stays the end for a later read
            raise StopAsyncIteration
        if isinstance(item, Exception):
            output.put_nowait(item)
            raise item
        self._entry.unread -= 1
        if output.qsize() + 1 >= MAX_QUEUED_CHUNKS:
            # The stream may have paused on a full queue: there is room again.
            self._scheduler._wake(self._entry)
        return item


class DecodeScheduler:
    """Batches the ready windows of all open streams, step after step.

    `options` is the window geometry streams use unless they ask otherwise; the step's token
    budget, `max_batch_tokens`, defaults to `max_batch` of its steady windows. `thread_setup`
    prepares the decode thread (service/placement.py).
    """

    def __init__(
        self,
        decoder: MioCodecDecoder,
        max_batch: int = 32,
        max_batch_tokens: int | None = None,
        options: StreamingOptions | None = None,
        thread_setup: Callable[[], None] | None = None,
    ):
        self.options = (options or StreamingOptions()).validated()
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens or max_batch * self.options.steady_window_tokens
        self._batcher = decoder.batcher()
        self._streams: list[_Entry] = []
        self._dirty: set[_Entry] = set()  # to plan again
        self._wakeup = asyncio.Event()
        # `thread_setup` runs on the decode thread first (its cores and OpenMP threads).
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="decode", initializer=thread_setup
        )
        self._task: asyncio.Task | None = None
        self._last_poll = 0.0
        self._step_seconds_ema = 0.0  # recent batched-step time
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
            self._close(entry)

    # ---- streams -------------------------------------------------------------------------
    def open(
        self,
        global_embedding: torch.Tensor,
        options: StreamingOptions | None = None,
        client_buffer: ClientBuffer | None = None,
    ) -> DecodeStream:
        """A new stream to decode (call on the event loop). With `client_buffer`, a chunk
        waiting for right context goes out early when the client's buffer, less the decode
        latency to expect, would run dry; and steady windows go most urgent first."""
        clock = None
        if client_buffer is not None:

            def clock() -> float:  # `stream` is the one opened below
                return client_buffer(stream.emitted_samples) - self._decode_latency_s()

        stream = self._batcher.open(global_embedding, options or self.options, clock)
        entry = _Entry(stream)
        self._streams.append(entry)
        self._wake(entry)
        return DecodeStream(self, entry)

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def slots_in_use(self) -> int:
        """Device slots held by streams (each gives its slot back when done or closed)."""
        return self._batcher.slots_in_use

    def _decode_latency_s(self) -> float:
        """How long a window planned now takes to come out: the step in flight, then its own."""
        return 2 * self._step_seconds_ema

    def _wake(self, entry: _Entry | None = None) -> None:
        """`entry` changed (new tokens, input ended, room in its queue): plan it again now."""
        if entry is not None and not entry.dropped:
            self._dirty.add(entry)
        self._wakeup.set()

    def _drop(self, entry: _Entry) -> None:
        """No more decoding for `entry`; its stream gives its device slot back."""
        if entry.dropped:
            return
        entry.dropped = True
        self._dirty.discard(entry)
        if entry in self._streams:
            self._streams.remove(entry)
        entry.stream.close()

    def _close(self, entry: _Entry) -> None:
        if not entry.dropped:
            self._drop(entry)
            entry.output.put_nowait(_END)

    def _interrupt(self, entry: _Entry) -> None:
        if entry.interrupted:
            return
        entry.interrupted = True
        self._drop(entry)
        while not entry.output.empty():  # the audio not read yet, and its end
            entry.output.get_nowait()
        entry.unread = 0
        entry.output.put_nowait(DecodeInterrupted("the stream was interrupted"))

    def _end(self, entry: _Entry) -> None:
        if not entry.dropped:
            self._drop(entry)
            entry.output.put_nowait(_END)

    def _fail(self, entry: _Entry, error: Exception) -> None:
        """The stream's reader gets the error instead of more audio."""
        if entry.dropped:
            return
        self.failed_windows += 1
        self._drop(entry)
        entry.output.put_nowait(DecodeFailed(str(error)))

    # ---- planning ------------------------------------------------------------------------
    def _candidates(self) -> list[_Entry]:
        """Streams to plan: those that changed, and on each deadline poll every stream with
        tokens pending (a chunk may have to go out early for its client)."""
        now = time.perf_counter()
        if now - self._last_poll >= DEADLINE_POLL_S:
            self._last_poll = now
            self._dirty.update(e for e in self._streams if e.stream.pending_tokens > 0)
        candidates, self._dirty = list(self._dirty), set()
        return candidates

    def _plan(self) -> list[tuple[_Entry, DecodeWindow]]:
        first: list[tuple[_Entry, DecodeWindow]] = []
        steady: list[tuple[float, int, _Entry, DecodeWindow]] = []
        for entry in self._candidates():
            if entry.dropped:
                continue
            if entry.backlogged:
                continue  # slow reader: reading a chunk wakes us
            try:
                if entry.stream.done:
                    self._end(entry)
                    continue
                window = entry.stream.next_window()
                if window is None:
                    continue
                if window.first:
                    first.append((entry, window))
                else:
                    urgency = entry.stream.buffered_seconds()
                    steady.append((urgency, window.padded_length, entry, window))
            except Exception as err:  # a broken clock or stream fails that stream only
                logger.exception("planning a window failed")
                self._fail(entry, err)
        if steady and not first:
            steady += self._nearly_due({id(e) for *_, e, _ in steady})
        if first:
            chosen = first[: self.max_batch]
            rest = [(e, w) for e, w in first[self.max_batch :]] + [(e, w) for *_, e, w in steady]
        else:
            chosen, rest = self._choose_steady(steady)
        # Windows not chosen are planned again next time (their streams are unchanged).
        self._dirty.update(entry for entry, _ in rest)
        return chosen

    def _nearly_due(self, planned: set[int]) -> list[tuple[float, int, _Entry, DecodeWindow]]:
        """Windows of other streams that would fall due within one step: they join this step."""
        slack = self._step_seconds_ema
        joining = []
        for entry in self._streams:
            if id(entry) in planned or entry.dropped or entry.backlogged:
                continue
            stream = entry.stream
            if stream.pending_tokens == 0 or stream.emitted_tokens == 0:
                continue
            try:
                window = stream.next_window(slack_s=slack)
            except Exception as err:  # a broken clock or stream fails that stream only
                logger.exception("planning a window failed")
                self._fail(entry, err)
                continue
            if window is not None:
                joining.append((stream.buffered_seconds(), window.padded_length, entry, window))
        return joining

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
        count = min(self.max_batch, max(1, self.max_batch_tokens // length))
        for item in same + shorter:
            if len(chosen) < count:
                chosen.append(item)
            else:
                rest.append(item)
        return [(e, w) for *_, e, w in chosen], [(e, w) for *_, e, w in rest]

    # ---- the loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            planned = self._plan()
            if not planned:
                self._wakeup.clear()
                if self._dirty:
                    continue
                timeout = DEADLINE_POLL_S if self._has_pending_tokens() else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                continue
            started = time.perf_counter()
            results = await loop.run_in_executor(self._executor, self._forward, planned)
            elapsed = time.perf_counter() - started
            self._step_seconds_ema = (
                elapsed if self.steps == 0 else 0.8 * self._step_seconds_ema + 0.2 * elapsed
            )
            self.steps += 1
            self.windows_decoded += len(planned)
            for entry, outcome in results:
                self._deliver(entry, outcome)

    def _forward(self, planned):
        """Worker thread: one batched forward; on failure, each window alone (isolation)."""
        windows = [w for _, w in planned]
        try:
            decoded = self._batcher.forward(windows)
            return [(entry, (decoded, i)) for i, (entry, _) in enumerate(planned)]
        except Exception as err:
            if len(planned) == 1:
                logger.exception("decoding a window failed")
                return [(planned[0][0], err)]
            logger.warning(
                "a decode step of %d windows failed (%s); retrying one by one", len(planned), err
            )
        return [outcome for item in planned for outcome in self._forward([item])]

    def _deliver(self, entry: _Entry, outcome: tuple[DecodedWindows, int] | Exception):
        if entry.dropped:
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
        entry.unread += 1
        if entry.stream.done:
            self._end(entry)
        else:
            self._dirty.add(entry)

    def _has_pending_tokens(self) -> bool:
        return any(e.stream.pending_tokens > 0 for e in self._streams)
