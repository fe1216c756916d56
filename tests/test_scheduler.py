"""The service's decode loop through its handle: batching across streams, a slow reader stalls
only itself, interrupting and closing a stream."""

from __future__ import annotations

import asyncio

import pytest
import torch

from miotts_stream.codec import MioCodecDecoder, StreamingOptions
from miotts_stream.service.scheduler import (
    MAX_QUEUED_CHUNKS,
    DecodeInterrupted,
    DecodeScheduler,
    DecodeStream,
)

from .conftest import TINY_CODECS

# Many small chunks: no growth of the window from tokens already there.
SMALL_CHUNKS = StreamingOptions(
    chunk_tokens=4, lookahead_tokens=8, max_chunk_tokens=0, max_lookahead_tokens=0
)


@pytest.fixture(scope="module")
def decoder() -> MioCodecDecoder:
    return MioCodecDecoder.from_pretrained(TINY_CODECS["24khz"], device="cpu")


def open_ready(scheduler: DecodeScheduler, tokens: int, gen: torch.Generator) -> DecodeStream:
    """A stream whose codes are all in."""
    stream = scheduler.open(torch.randn(128, generator=gen), SMALL_CHUNKS)
    stream.push(torch.randint(0, 12800, (tokens,), generator=gen).tolist())
    stream.finish()
    return stream


async def test_a_slow_reader_stalls_only_itself(decoder):
    scheduler = DecodeScheduler(decoder)
    scheduler.start()
    gen = torch.Generator().manual_seed(0)
    try:
        slow, fast = open_ready(scheduler, 200, gen), open_ready(scheduler, 200, gen)
        fast_chunks = await asyncio.wait_for(collect(fast), 120)
        assert sum(c.numel() for c in fast_chunks) == 200 * decoder.samples_per_token
        # The slow reader's stream paused at the limit of unread chunks, and was not dropped.
        assert slow.queued_chunks == MAX_QUEUED_CHUNKS
        assert scheduler.active_streams == 1
        slow_chunks = await asyncio.wait_for(collect(slow), 120)
        assert sum(c.numel() for c in slow_chunks) == 200 * decoder.samples_per_token
        assert scheduler.windows_decoded > scheduler.steps  # windows shared forwards
        assert scheduler.active_streams == 0 and scheduler.slots_in_use == 0
    finally:
        await scheduler.close()


async def test_interrupt_drops_the_unread_audio_and_close_ends_the_reading(decoder):
    scheduler = DecodeScheduler(decoder)
    scheduler.start()
    gen = torch.Generator().manual_seed(1)
    try:
        cut, closed = open_ready(scheduler, 200, gen), open_ready(scheduler, 200, gen)
        assert (await anext(cut)).numel() > 0 and (await anext(closed)).numel() > 0
        cut.interrupt()
        cut.push([1, 2, 3])  # a producer still winding down is ignored
        with pytest.raises(DecodeInterrupted):
            await anext(cut)
        with pytest.raises(DecodeInterrupted):  # and stays interrupted
            await anext(cut)
        assert cut.queued_chunks == 0
        left = closed.queued_chunks
        closed.close()
        closed.close()  # idempotent
        # What was decoded before close can still be read; then the reading ends.
        assert len(await asyncio.wait_for(collect(closed), 30)) == left
        assert scheduler.active_streams == 0 and scheduler.slots_in_use == 0
    finally:
        await scheduler.close()


async def collect(stream: DecodeStream) -> list[torch.Tensor]:
    return [chunk async for chunk in stream]
