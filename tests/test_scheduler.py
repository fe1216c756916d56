"""The service's decode loop: batching across streams, a slow reader stalls only itself."""

from __future__ import annotations

import asyncio

import pytest
import torch

from miotts_stream.codec import MioCodecDecoder
from miotts_stream.codec.streaming import StreamingOptions
from miotts_stream.service.scheduler import DecodeScheduler

from .conftest import TINY_CODECS


async def drain(queue: asyncio.Queue) -> list[torch.Tensor]:
    chunks = []
    while (chunk := await queue.get()) is not None:
        chunks.append(chunk)
    return chunks


@pytest.mark.asyncio
async def test_a_slow_reader_stalls_only_itself():
    decoder = MioCodecDecoder.from_pretrained(TINY_CODECS["24khz"], device="cpu")
    scheduler = DecodeScheduler(decoder)
    scheduler.start()
    # Many small chunks: no growth of the window from tokens already there.
    options = StreamingOptions(
        chunk_tokens=4, lookahead_tokens=8, max_chunk_tokens=0, max_lookahead_tokens=0
    )
    gen = torch.Generator().manual_seed(0)
    try:
        entries = []
        for _ in range(2):
            stream = decoder.stream(torch.randn(128, generator=gen), options)
            stream.push_tokens(torch.randint(0, 12800, (200,), generator=gen))
            stream.mark_finished()
            entries.append(scheduler.register(stream))
        slow, fast = entries
        fast_chunks = await asyncio.wait_for(drain(fast.output), 120)
        assert sum(c.numel() for c in fast_chunks) == 200 * decoder.samples_per_token
        # The slow reader's queue is full and its stream paused, not dropped.
        assert slow.backlogged and not slow.stream.done
        slow_chunks = await asyncio.wait_for(drain(slow.output), 120)
        assert sum(c.numel() for c in slow_chunks) == 200 * decoder.samples_per_token
        assert scheduler.windows_decoded > scheduler.steps  # windows shared forwards
        assert scheduler.active_streams == 0
    finally:
        await scheduler.close()
