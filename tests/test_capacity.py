"""Capacity: the stand-in LLM, batched token intake, scheduling order, failure isolation, the
connection pool, and the load benchmark itself."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from aiohttp import web

from miotts_stream.codec import MioCodecDecoder
from miotts_stream.codec.streaming import StreamingOptions, batch_bucket, forward_windows
from miotts_stream.llm import OpenAITokenSource, SamplingOptions
from miotts_stream.llm.standin import StandInPacing, StandInTokenSource
from miotts_stream.llm.standin_server import StandInServer
from miotts_stream.service.scheduler import DecodeFailed, DecodeScheduler

from .conftest import TINY_CODECS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_decoder():
    return MioCodecDecoder.from_pretrained(TINY_CODECS["24khz"], device="cpu")


async def drain(queue: asyncio.Queue) -> list:
    items = []
    while (item := await queue.get()) is not None:
        items.append(item)
        if isinstance(item, DecodeFailed):
            break
    return items


# ---- the stand-in LLM ----------------------------------------------------------------------


async def test_standin_paces_codes_and_hands_them_over_in_batches():
    source = StandInTokenSource(StandInPacing(rate_hz=200, prefill_s=0.0, tokens_per_char=2))
    text = "Twenty characters!!"  # 2 codes a character: more than max_tokens
    stream = source.stream(text, SamplingOptions(max_tokens=30, seed=3))
    loop = asyncio.get_running_loop()
    started = loop.time()
    batches = []
    while codes := await stream.next_codes():
        batches.append(codes)
        await asyncio.sleep(0.03)  # a slow consumer gets what fell due meanwhile, at once
    elapsed = loop.time() - started
    codes = [c for batch in batches for c in batch]
    assert len(codes) == 30 and stream.finish_reason == "length"  # capped by max_tokens
    assert all(0 <= c < 12800 for c in codes)
    assert max(len(b) for b in batches) > 1
    assert elapsed >= 29 / 200  # paced, not all at once
    again = source.stream(text, SamplingOptions(max_tokens=30, seed=3))
    assert [c async for c in again] == codes  # same seed, same codes
    assert source.open_requests == 0


async def test_standin_cancel_releases_the_request():
    source = StandInTokenSource(StandInPacing(rate_hz=50))
    stream = source.stream("A long sentence that would take a while.", SamplingOptions())
    assert await stream.next_codes()
    assert source.open_requests == 1
    await stream.aclose()
    assert source.open_requests == 0 and stream.finish_reason == "cancelled"


async def test_connection_pool_holds_more_than_100_remote_streams(unused_tcp_port):
    """aiohttp's default pool holds 100 connections; stream 101 would wait for another to end."""
    # 2 codes a second: every request is still streaming when the last one starts.
    server = StandInServer(StandInPacing(rate_hz=2, prefill_s=0.0))
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port, backlog=512).start()
    source = OpenAITokenSource(f"http://127.0.0.1:{unused_tcp_port}/v1", max_connections=140)
    streams = [
        source.stream("Hello there, how are you?", SamplingOptions(max_tokens=40))
        for _ in range(120)
    ]
    try:
        firsts = await asyncio.wait_for(
            asyncio.gather(*(s.next_codes() for s in streams)), timeout=60
        )
        assert all(firsts)
        assert server.running == 120  # every request is streaming at once
    finally:
        for stream in streams:
            await stream.aclose()
        await source.close()
        for _ in range(100):
            if server.running == 0:
                break
            await asyncio.sleep(0.05)
        await runner.cleanup()
    assert server.running == 0


# ---- the decode loop ------------------------------------------------------------------------


def ready_stream(decoder, tokens: int, seed: int, options: StreamingOptions | None = None):
    gen = torch.Generator().manual_seed(seed)
    stream = decoder.stream(torch.randn(128, generator=gen), options)
    stream.push_tokens(torch.randint(0, 12800, (tokens,), generator=gen).tolist())
    stream.mark_finished()
    return stream


async def test_a_new_stream_goes_ahead_of_steady_windows(tiny_decoder):
    scheduler = DecodeScheduler(tiny_decoder, max_batch=2)
    scheduler.start()
    try:
        steady = [scheduler.register(ready_stream(tiny_decoder, 400, i)) for i in range(8)]
        while scheduler.steps < 10:  # every steady stream is past its first chunk
            await asyncio.sleep(0.001)
        assert all(e.stream.emitted_tokens > 0 for e in steady)
        registered_at = scheduler.steps
        newcomer = scheduler.register(ready_stream(tiny_decoder, 30, 99))
        first = await asyncio.wait_for(newcomer.output.get(), 30)
        assert first.numel() == 4 * tiny_decoder.samples_per_token
        # At most the step already running when it came, then its own: with 8 steady streams
        # and 2 windows a step, a plain round robin would take up to 4 steps.
        assert scheduler.steps <= registered_at + 2
    finally:
        await scheduler.close()
    assert scheduler.active_streams == 0  # closing let go of the unfinished streams too


async def test_a_failing_window_fails_only_its_own_stream(tiny_decoder):
    slots_before = tiny_decoder.stream_slots.in_use
    scheduler = DecodeScheduler(tiny_decoder)
    scheduler.start()
    try:
        healthy = [scheduler.register(ready_stream(tiny_decoder, 60, i)) for i in range(3)]
        broken_shape = ready_stream(tiny_decoder, 60, 10)
        broken_shape.embedding = torch.zeros(64)  # the forward raises for this window
        nan_voice = ready_stream(tiny_decoder, 60, 11)
        nan_voice.embedding = torch.full((128,), 3e38)  # decodes to non-finite samples
        broken = [scheduler.register(broken_shape), scheduler.register(nan_voice)]
        outputs = await asyncio.wait_for(
            asyncio.gather(*(drain(e.output) for e in healthy + broken)), 120
        )
        for chunks in outputs[:3]:
            assert not any(isinstance(c, DecodeFailed) for c in chunks)
            assert sum(c.numel() for c in chunks) == 60 * tiny_decoder.samples_per_token
            assert all(torch.isfinite(c).all() for c in chunks)
        for chunks in outputs[3:]:
            assert isinstance(chunks[-1], DecodeFailed)
        assert "non-finite" in outputs[4][-1].message
        assert scheduler.active_streams == 0
        assert tiny_decoder.stream_slots.in_use == slots_before  # every slot given back
        # The NaN stream's slot goes to the next stream, which must not inherit its NaN.
        after = scheduler.register(ready_stream(tiny_decoder, 30, 12))
        chunks = await asyncio.wait_for(drain(after.output), 60)
        assert chunks and all(torch.isfinite(c).all() for c in chunks)
    finally:
        await scheduler.close()


async def test_streams_batched_through_the_scheduler_equal_streams_alone(tiny_decoder):
    options = StreamingOptions(chunk_tokens=8, lookahead_tokens=12)
    alone = []
    for i in range(4):
        stream = ready_stream(tiny_decoder, 70 + 13 * i, i, options)
        alone.append(torch.cat(stream.finish()))
    scheduler = DecodeScheduler(tiny_decoder, max_batch=4)
    scheduler.start()
    try:
        entries = [
            scheduler.register(ready_stream(tiny_decoder, 70 + 13 * i, i, options))
            for i in range(4)
        ]
        outputs = await asyncio.wait_for(asyncio.gather(*(drain(e.output) for e in entries)), 60)
        assert scheduler.windows_decoded > scheduler.steps  # windows did share steps
    finally:
        await scheduler.close()
    for solo, chunks in zip(alone, outputs, strict=True):
        batched = torch.cat(chunks)
        assert batched.shape == solo.shape
        assert (batched - solo).abs().max() <= 1e-5


# ---- the benchmark --------------------------------------------------------------------------


def test_load_benchmark_runs_end_to_end():
    """A short run of `bench.load`, both stand-in paths: the table is printed, no errors."""
    for source in ("inprocess", "openai"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "miotts_stream.bench.load",
                "--levels",
                "3",
                "--seconds",
                "2",
                "--rate",
                "100",
                "--source",
                source,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        rows = [line.split() for line in result.stdout.splitlines() if line.startswith("      3")]
        assert rows, result.stdout
        assert rows[-1][-1] == "0"  # no stream failed
        assert "first audio p50/p95/p99 ms" in result.stdout


async def test_openai_source_reads_packed_events(unused_tcp_port):
    """A server that packs many events into one read (a reader behind) loses no code."""
    server = StandInServer(StandInPacing(rate_hz=400, prefill_s=0.0))
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    source = OpenAITokenSource(f"http://127.0.0.1:{unused_tcp_port}")
    try:
        stream = source.stream("Some text to speak here.", SamplingOptions(max_tokens=30, seed=1))
        codes = []
        while batch := await stream.next_codes():
            codes += batch
            await asyncio.sleep(0.02)
        assert stream.finish_reason == "length"
        assert codes == StandInPacing().codes(30, 1)
    finally:
        await source.close()
        await runner.cleanup()


# ---- fixed step shapes and CUDA graphs --------------------------------------------------------


def decode_all(decoder, count: int, fixed_shapes: bool) -> list[torch.Tensor]:
    """Streams of different lengths decoded in shared steps; each stream's whole audio."""
    options = StreamingOptions(chunk_tokens=8, lookahead_tokens=12)
    streams = [ready_stream(decoder, 50 + 11 * i, i, options) for i in range(count)]
    outputs: list[list[torch.Tensor]] = [[] for _ in streams]
    while True:
        planned = [(i, s.next_window()) for i, s in enumerate(streams)]
        ready = [(i, w) for i, w in planned if w is not None]
        if not ready:
            break
        decoded = forward_windows(decoder, [w for _, w in ready], fixed_shapes=fixed_shapes)
        for (i, _), chunk in zip(ready, decoded.apply(), strict=True):
            outputs[i].append(chunk)
    assert all(s.done for s in streams)
    return [torch.cat(chunks) for chunks in outputs]


def test_fixed_step_shapes_change_nothing(tiny_decoder):
    """Steps padded to a power-of-two batch (with rows that only touch the scratch slot) and a
    fixed output width, as CUDA graphs replay them, give the same audio as exact shapes."""
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
    exact = decode_all(tiny_decoder, 3, fixed_shapes=False)
    fixed = decode_all(tiny_decoder, 3, fixed_shapes=True)
    for a, b in zip(exact, fixed, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_steps_match_eager_steps():
    decoder = MioCodecDecoder.from_pretrained(TINY_CODECS["24khz"], device="cuda")
    decoder.use_cuda_graphs = False
    eager = decode_all(decoder, 5, fixed_shapes=True)
    decoder.use_cuda_graphs = True
    graphed = decode_all(decoder, 5, fixed_shapes=True)
    assert decoder.cuda_graphs.replays > 0 and decoder.cuda_graphs.captures > 0
    for a, b in zip(eager, graphed, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-3  # bf16 autocast: same kernels, same order
