"""Capacity: the stand-in LLM, batched token intake, scheduling order, failure isolation, the
connection pool, and the load benchmark itself."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from aiohttp import web

from miotts_stream.codec import MioCodecDecoder, StreamingOptions, VoiceLibrary, load_voice
from miotts_stream.codec.batcher import batch_bucket
from miotts_stream.llm import OpenAITokenSource, SamplingOptions
from miotts_stream.llm.standin import StandInPacing, StandInTokenSource
from miotts_stream.llm.standin_server import StandInServer
from miotts_stream.service.engine import AudioOut, SessionConfig, SpeechEngine
from miotts_stream.service.scheduler import DecodeFailed, DecodeScheduler, DecodeStream

from .conftest import TINY_CODECS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_decoder():
    return MioCodecDecoder.from_pretrained(TINY_CODECS["24khz"], device="cpu")


async def drain(stream: DecodeStream) -> list:
    """The stream's chunks, then the `DecodeFailed` that ended it, if one did."""
    items = []
    try:
        async for chunk in stream:
            items.append(chunk)
    except DecodeFailed as failure:
        items.append(failure)
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


def random_voice_and_codes(tokens: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    voice = torch.randn(128, generator=gen)
    return voice, torch.randint(0, 12800, (tokens,), generator=gen).tolist()


def ready_stream(open_stream, tokens: int, seed: int, options: StreamingOptions | None = None):
    """A stream whose codes are all in, from `open_stream`: a decoder's `stream` (a stream
    decoded alone) or a batcher's `open` (streams decoded in shared steps)."""
    voice, codes = random_voice_and_codes(tokens, seed)
    stream = open_stream(voice, options)
    stream.push_tokens(codes)
    stream.mark_finished()
    return stream


def open_ready(scheduler: DecodeScheduler, tokens: int, seed: int, options=None) -> DecodeStream:
    """A scheduler's stream whose codes are all in."""
    voice, codes = random_voice_and_codes(tokens, seed)
    stream = scheduler.open(voice, options)
    stream.push(codes)
    stream.finish()
    return stream


async def test_a_new_stream_goes_ahead_of_steady_windows(tiny_decoder):
    scheduler = DecodeScheduler(tiny_decoder, max_batch=2)
    scheduler.start()
    try:
        steady = [open_ready(scheduler, 400, i) for i in range(8)]
        while scheduler.steps < 10:  # every steady stream is past its first chunk
            await asyncio.sleep(0.001)
        assert all(s.queued_chunks > 0 for s in steady)
        registered_at = scheduler.steps
        newcomer = open_ready(scheduler, 30, 99)
        first = await asyncio.wait_for(anext(newcomer), 30)
        assert first.numel() == 4 * tiny_decoder.samples_per_token
        # At most the step already running when it came, then its own: with 8 steady streams
        # and 2 windows a step, a plain round robin would take up to 4 steps.
        assert scheduler.steps <= registered_at + 2
    finally:
        await scheduler.close()
    assert scheduler.active_streams == 0  # closing let go of the unfinished streams too
    assert scheduler.slots_in_use == 0


async def test_a_failing_window_fails_only_its_own_stream(tiny_decoder, monkeypatch):
    """A window whose forward raises, and one that decodes to non-finite samples, fail their own
    streams; the others in their steps go on. The faults are injected into the real model's
    trunk by voice: one voice makes it raise, the other overflows it (as a huge embedding,
    refused at the door, would) into NaN that reaches the slot's statistics and tail."""
    raises, overflows = torch.full((128,), 7.0), torch.full((128,), -7.0)
    real_trunk = tiny_decoder.model.trunk

    def faulty_trunk(tokens, speaker, valid, group_stats=None):
        if (speaker == raises).all(dim=1).any():
            raise RuntimeError("injected device fault")
        speaker = torch.where((speaker == overflows).all(dim=1, keepdim=True), 3e38, speaker)
        return real_trunk(tokens, speaker, valid, group_stats)

    monkeypatch.setattr(tiny_decoder.model, "trunk", faulty_trunk)
    scheduler = DecodeScheduler(tiny_decoder)
    scheduler.start()
    try:
        healthy = [open_ready(scheduler, 60, i) for i in range(3)]
        broken = []
        for voice in (raises, overflows):
            stream = scheduler.open(voice)
            stream.push(random_voice_and_codes(60, 10)[1])
            stream.finish()
            broken.append(stream)
        outputs = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in healthy + broken)), 120)
        for chunks in outputs[:3]:
            assert not any(isinstance(c, DecodeFailed) for c in chunks)
            assert sum(c.numel() for c in chunks) == 60 * tiny_decoder.samples_per_token
            assert all(torch.isfinite(c).all() for c in chunks)
        for chunks in outputs[3:]:
            assert isinstance(chunks[-1], DecodeFailed)
        assert "injected device fault" in str(outputs[3][-1])
        assert "non-finite" in str(outputs[4][-1])
        assert scheduler.active_streams == 0
        assert scheduler.slots_in_use == 0  # every slot given back
        # The NaN stream's slot goes to the next stream, which must not inherit its NaN.
        after = open_ready(scheduler, 30, 12)
        chunks = await asyncio.wait_for(drain(after), 60)
        assert chunks and all(torch.isfinite(c).all() for c in chunks)
    finally:
        await scheduler.close()


async def test_streams_batched_through_the_scheduler_equal_streams_alone(tiny_decoder):
    options = StreamingOptions(chunk_tokens=8, lookahead_tokens=12)
    alone = []
    for i in range(4):
        stream = ready_stream(tiny_decoder.stream, 70 + 13 * i, i, options)
        alone.append(torch.cat(stream.finish()))
    scheduler = DecodeScheduler(tiny_decoder, max_batch=4)
    scheduler.start()
    try:
        streams = [open_ready(scheduler, 70 + 13 * i, i, options) for i in range(4)]
        outputs = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), 60)
        assert scheduler.windows_decoded > scheduler.steps  # windows did share steps
    finally:
        await scheduler.close()
    for solo, chunks in zip(alone, outputs, strict=True):
        batched = torch.cat(chunks)
        assert batched.shape == solo.shape
        assert (batched - solo).abs().max() <= 1e-5


def test_a_stream_holds_one_slot_from_its_first_window_until_done_or_closed(tiny_decoder):
    batcher = tiny_decoder.batcher()
    voice, codes = random_voice_and_codes(60, 3)
    closing, finishing = batcher.open(voice), batcher.open(voice)
    for stream in (closing, finishing):
        stream.push_tokens(codes[:5])
        assert stream.next_window() is None
        stream.push_tokens(codes[5:])
        assert stream.next_window() is not None
    assert batcher.slots_in_use == 0  # planning takes no slot
    batcher.step([closing, finishing])
    assert batcher.slots_in_use == 2  # the first windows took them
    closing.close()
    closing.close()  # the slot goes back once
    assert batcher.slots_in_use == 1
    finishing.mark_finished()
    while batcher.step([finishing]):
        pass
    assert finishing.done and batcher.slots_in_use == 0
    finishing.close()
    # Had a slot gone back twice, two new streams would now share it and mix their statistics.
    fresh = [ready_stream(batcher.open, 60, 20 + i) for i in range(2)]
    outputs: list[list[torch.Tensor]] = [[], []]
    while produced := batcher.step(fresh):
        for i, chunk in produced.items():
            outputs[i].append(chunk)
    for i, chunks in enumerate(outputs):
        solo = torch.cat(ready_stream(tiny_decoder.stream, 60, 20 + i).finish())
        assert (torch.cat(chunks) - solo).abs().max() <= 1e-5


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


def decode_all(batcher, count: int, fixed_shapes: bool) -> list[torch.Tensor]:
    """Streams of different lengths decoded in shared steps; each stream's whole audio."""
    options = StreamingOptions(chunk_tokens=8, lookahead_tokens=12)
    streams = [ready_stream(batcher.open, 50 + 11 * i, i, options) for i in range(count)]
    outputs: list[list[torch.Tensor]] = [[] for _ in streams]
    while True:
        planned = [(i, s.next_window()) for i, s in enumerate(streams)]
        ready = [(i, w) for i, w in planned if w is not None]
        if not ready:
            break
        decoded = batcher.forward([w for _, w in ready], fixed_shapes=fixed_shapes)
        for (i, _), chunk in zip(ready, decoded.apply(), strict=True):
            outputs[i].append(chunk)
    assert all(s.done for s in streams)
    return [torch.cat(chunks) for chunks in outputs]


def test_fixed_step_shapes_change_nothing(tiny_decoder):
    """Steps padded to a power-of-two batch (with rows that only touch the scratch slot) and a
    fixed output width, as CUDA graphs replay them, give the same audio as exact shapes."""
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
    exact = decode_all(tiny_decoder.batcher(), 3, fixed_shapes=False)
    fixed = decode_all(tiny_decoder.batcher(), 3, fixed_shapes=True)
    for a, b in zip(exact, fixed, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_steps_match_eager_steps():
    decoder = MioCodecDecoder.from_pretrained(TINY_CODECS["24khz"], device="cuda")
    eager = decode_all(decoder.batcher(cuda_graphs=False), 5, fixed_shapes=True)
    graphs = decoder.batcher(cuda_graphs=True)
    graphed = decode_all(graphs, 5, fixed_shapes=True)
    assert graphs.cuda_graphs.replays > 0 and graphs.cuda_graphs.captures > 0
    for a, b in zip(eager, graphed, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-3  # bf16 autocast: same kernels, same order


async def test_a_later_segment_is_planned_just_in_time(tiny_decoder):
    """A session's first audio is a short first window (nothing plays yet). The client still
    holds the first sentence's audio when the second one's codes come (the service counts it
    from the codes), so the second sentence's first window waits for them and comes out long."""
    engine = SpeechEngine(
        StandInTokenSource(StandInPacing(rate_hz=400, prefill_s=0.0)), tiny_decoder, VoiceLibrary()
    )
    await engine.start()
    session = engine.open_session(
        SessionConfig(voice=load_voice("en_female"), sampling=SamplingOptions(max_tokens=50))
    )
    try:
        session.push_text("The first sentence is said here. And then the second one follows it.")
        session.end_input()
        firsts: dict[int, int] = {}
        async with contextlib.aclosing(session.events()) as events:
            async for event in events:
                if isinstance(event, AudioOut) and event.segment_index not in firsts:
                    firsts[event.segment_index] = event.audio.num_samples
        per_token = tiny_decoder.samples_per_token
        assert firsts[0] <= 8 * per_token  # the first window: at most 12 tokens, 8 emitted
        assert firsts[1] >= 20 * per_token  # just in time: a full chunk
    finally:
        await session.close()
        await engine.close()
