"""One decode loop for all streams: each step runs every ready window in one batched forward.

Windows are planned and applied on the event loop (where tokens arrive), and the forward runs on
a worker thread (torch releases the GIL), so token intake and gRPC I/O continue meanwhile.
A stream whose output queue is full (a slow client) is skipped, so it never stalls the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from miotts_stream.codec import MioCodecDecoder
from miotts_stream.codec.streaming import TokenStreamDecoder, forward_windows

logger = logging.getLogger(__name__)

# Without new tokens, re-check playback deadlines this often.
DEADLINE_POLL_S = 0.01


@dataclass
class DecodeFailed:
    """Put in a stream's output queue instead of audio when its decode failed."""

    message: str


@dataclass(eq=False)
class ScheduledStream:
    """A registered stream and where its audio goes. `None` in the queue marks its end."""

    stream: TokenStreamDecoder
    output: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=32))
    closed: bool = False
    ended: bool = False


class DecodeScheduler:
    """Batches the ready windows of all registered streams, step after step."""

    def __init__(self, decoder: MioCodecDecoder, max_batch: int = 32):
        self.decoder = decoder
        self.max_batch = max_batch
        self._streams: list[ScheduledStream] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self._task: asyncio.Task | None = None
        self._next_first = 0  # round-robin start of planning
        self.step_seconds_ema = 0.0  # recent batched-step time: the decode latency to plan for
        self.steps = 0
        self.windows_decoded = 0

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

    # ---- streams -------------------------------------------------------------------------
    def register(self, stream: TokenStreamDecoder) -> ScheduledStream:
        entry = ScheduledStream(stream)
        self._streams.append(entry)
        self.wake()
        return entry

    def unregister(self, entry: ScheduledStream) -> None:
        entry.closed = True
        if entry in self._streams:
            self._streams.remove(entry)

    def wake(self) -> None:
        """New tokens or a finished stream: plan again now."""
        self._wake.set()

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    # ---- the loop ------------------------------------------------------------------------
    def _plan(self):
        """The next window of each stream with room for output, at most `max_batch`, starting
        after the stream served first last time (so no stream starves when many are ready)."""
        planned = []
        count = len(self._streams)
        for offset in range(count):
            entry = self._streams[(self._next_first + offset) % count]
            if entry.output.full():
                continue  # slow reader: let it catch up, decode the others
            try:
                if entry.stream.done:
                    self._end(entry)
                    continue
                window = entry.stream.next_window()
            except Exception as err:  # a broken clock or stream fails that stream only
                logger.exception("planning a window failed")
                self._fail(entry, err)
                continue
            if window is not None:
                planned.append((entry, window))
            if len(planned) == self.max_batch:
                break
        self._next_first = (self._next_first + 1) % max(count, 1)
        return planned

    def _end(self, entry: ScheduledStream) -> None:
        if not entry.ended and not entry.output.full():
            entry.ended = True
            entry.output.put_nowait(None)
            self.unregister(entry)

    def _fail(self, entry: ScheduledStream, error: Exception) -> None:
        """The stream's reader gets the error instead of more audio."""
        entry.ended = True
        self.unregister(entry)
        with contextlib.suppress(asyncio.QueueFull):
            entry.output.put_nowait(DecodeFailed(str(error)))

    def _has_pending_tokens(self) -> bool:
        return any(e.stream.emitted_tokens < len(e.stream.tokens) for e in self._streams)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            planned = self._plan()
            if not planned:
                self._wake.clear()
                timeout = DEADLINE_POLL_S if self._has_pending_tokens() else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            windows = [w for _, w in planned]
            started = time.perf_counter()
            try:
                decoded = await loop.run_in_executor(self._executor, self._forward, windows)
                chunks = decoded.apply()
            except Exception as err:
                logger.exception("decode step failed; failing the %d streams in it", len(planned))
                for entry, _ in planned:
                    self._fail(entry, err)
                continue
            elapsed = time.perf_counter() - started
            self.step_seconds_ema = (
                elapsed if self.steps == 0 else 0.8 * self.step_seconds_ema + 0.2 * elapsed
            )
            self.steps += 1
            self.windows_decoded += len(windows)
            for (entry, _), chunk in zip(planned, chunks, strict=True):
                if not entry.closed:
                    entry.output.put_nowait(chunk)
                if entry.stream.done:
                    self._end(entry)

    def _forward(self, windows):
        return forward_windows(self.decoder, windows)
