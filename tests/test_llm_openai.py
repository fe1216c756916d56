"""Speech tokens from a real `vllm serve` (OpenAI-compatible server) on the tiny demo model.

The module starts one server subprocess and, beside it, one in-process engine on the same model
sampling from the whole vocabulary as the server does: with the same seed both must give the
same codes, which checks the text path (SSE, `<|s_N|>` parsing) against the token-id path.
Network faults are injected by a small TCP relay in front of the real server.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import pytest_asyncio

from miotts_stream.demo_model import ensure_demo_model
from miotts_stream.llm import (
    NUM_SPEECH_CODES,
    LLMError,
    LLMRequestError,
    LLMUnavailableError,
    OpenAITokenSource,
    RunawayGuard,
    SamplingOptions,
    TokenSource,
    VLLMEngineOptions,
    VLLMTokenSource,
)
from miotts_stream.llm.vllm_server import VLLMServer, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

TEXT = "こんにちは、今日はいい天気ですね。"
# The tiny model's whole context.
OPTIONS = VLLMEngineOptions(max_model_len=4096, kv_cache_gib=0.25)
# The served copy gets a context far beyond what it can generate in the abort test's time
# limit (RoPE has no length limit; the demo config merely says 4096), so that a request
# there can only end by the client's abort within that limit.
LONG_CONTEXT = 131072
SERVER_OPTIONS = VLLMEngineOptions(max_model_len=LONG_CONTEXT, kv_cache_gib=0.25)
SERVER_ARGS = ["--hf-overrides", json.dumps({"max_position_embeddings": LONG_CONTEXT})]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines():
    """(the `vllm serve` subprocess, an in-process source on the same model, unrestricted)."""
    model = ensure_demo_model("tiny")
    # The server boots while the local engine starts.
    server = VLLMServer(model, SERVER_OPTIONS, extra_args=SERVER_ARGS).start()
    local = None
    try:
        local = VLLMTokenSource.from_model(model, OPTIONS, restrict_to_speech=False)
        server.wait_ready(timeout_s=240)
        yield server, local
    finally:
        if local is not None:
            await local.close()
        server.stop()


@pytest.fixture(scope="module")
def server(engines) -> VLLMServer:
    return engines[0]


@pytest.fixture(scope="module")
def local(engines) -> VLLMTokenSource:
    return engines[1]


@pytest_asyncio.fixture(loop_scope="module")
async def source(server: VLLMServer):
    src = OpenAITokenSource(server.base_url)
    yield src
    await src.close()


async def collect(src, text: str = TEXT, **options):
    stream = src.stream(text, SamplingOptions(**options))
    codes = [code async for code in stream]
    return codes, stream


async def server_metric(server: VLLMServer, name: str, **labels: str) -> float:
    """A Prometheus metric of the server, summed over its label sets (those with `labels`)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.base_url}/metrics") as response,
    ):
        text = await response.text()
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " ")) and all(w in line for w in wanted)
    ]
    assert values, f"the server exports no {name} {labels or ''}"
    return sum(values)


async def no_request_running(server: VLLMServer, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await server_metric(server, "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, f"requests still running after {timeout_s} s"
        await asyncio.sleep(0.1)


async def test_model_found_through_v1_models(server: VLLMServer, source) -> None:
    assert isinstance(source, TokenSource)
    assert source.model is None
    codes, stream = await collect(source, seed=1, max_tokens=10)
    assert source.model == str(ensure_demo_model("tiny"))  # vLLM serves it under its path
    assert 0 < len(codes) <= 10 and stream.finish_reason in ("stop", "length")


async def test_same_codes_as_the_engine_in_process(source, local: VLLMTokenSource) -> None:
    dropped_somewhere = False
    for seed in range(8):
        local_codes, local_stream = await collect(local, seed=seed)
        remote_codes, remote_stream = await collect(source, seed=seed)
        assert remote_codes == local_codes, seed
        assert all(0 <= c < NUM_SPEECH_CODES for c in remote_codes)
        assert remote_stream.finish_reason == local_stream.finish_reason
        assert remote_stream.generated_tokens == len(remote_codes)
        # Text tokens are dropped on both paths; the server's count is per event, which can
        # pack tokens together, so it may come out lower but never hides them all.
        assert (remote_stream.dropped_tokens > 0) == (local_stream.dropped_tokens > 0), seed
        assert remote_stream.dropped_tokens <= local_stream.dropped_tokens
        dropped_somewhere |= local_stream.dropped_tokens > 0
    assert dropped_somewhere  # the comparison covered dropped tokens


async def test_same_seed_same_tokens(source) -> None:
    first, _ = await collect(source, seed=99)
    again, _ = await collect(source, seed=99)
    other, _ = await collect(source, seed=98)
    assert first == again and first != other


async def test_without_skip_special_tokens_false_nothing_arrives(server: VLLMServer) -> None:
    # What the flag is for: vLLM strips special tokens, the speech tokens among them.
    stripped = OpenAITokenSource(server.base_url, extra_body={"skip_special_tokens": True})
    try:
        codes, stream = await collect(stripped, seed=1, max_tokens=20)
    finally:
        await stripped.close()
    assert codes == []
    assert stream.dropped_tokens > 0


async def test_cancel_aborts_the_server_request(server: VLLMServer) -> None:
    """Closing the stream aborts the request in the server: it stops running without reaching
    its length (with ignore_eos, the only other way it can end).

    The server's own bookkeeping says so whatever the timing. A budget the engine could reach
    before the API-server process noticed the disconnect made this a race: on a loaded
    machine that process waits for CPU while the engine-core process keeps generating (950
    tokens of 1800, and once all of 4000, were seen before the abort landed). So the budget is
    a context the tiny model cannot fill within the time the abort is given to land (it
    generates a few hundred tokens a second here, slower as its context grows); an abort that
    takes longer than that fails as too slow, not by chance. (vLLM counts client aborts in no
    finished_reason, so "length" unchanged is the check.)
    """
    # ignore_eos and no runaway guard: unaborted, the request can only end by its length.
    endless = OpenAITokenSource(
        server.base_url, extra_body={"ignore_eos": True}, guard=RunawayGuard(tokens_per_char=0)
    )
    success = "vllm:request_success_total"
    generated = "vllm:generation_tokens_total"
    budget = LONG_CONTEXT - 1024  # the prompt is far shorter
    try:
        await no_request_running(server)  # nothing left over from earlier tests
        by_length = await server_metric(server, success, finished_reason="length")
        tokens_before = await server_metric(server, generated)
        stream = endless.stream(TEXT, SamplingOptions(seed=5, max_tokens=budget))
        async for _ in stream:
            if stream.generated_tokens == 3:
                break
        await stream.aclose()
        assert stream.finish_reason == "cancelled"
        await no_request_running(server, timeout_s=60)
        tokens = await server_metric(server, generated) - tokens_before
        assert tokens < budget
        ended_by_length = await server_metric(server, success, finished_reason="length")
        assert ended_by_length == by_length, f"a request ended by its length ({tokens} tokens)"
    finally:
        await endless.close()


async def test_unreachable_server_is_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    src = OpenAITokenSource(
        f"http://127.0.0.1:{port}", model="m", connect_retries=2, retry_delay_s=0.05
    )
    started = time.monotonic()
    try:
        with pytest.raises(LLMUnavailableError) as info:
            await collect(src)
    finally:
        await src.close()
    message = str(info.value)
    assert f"127.0.0.1:{port}/v1/chat/completions" in message
    assert "3 attempts" in message and "connect" in message.lower()
    assert time.monotonic() - started < 5


async def test_unreachable_server_without_a_model_name() -> None:
    src = OpenAITokenSource(f"http://127.0.0.1:{free_port()}", connect_retries=0)
    try:
        with pytest.raises(LLMUnavailableError, match="/v1/models"):
            await collect(src)
    finally:
        await src.close()


async def test_unknown_model_is_a_request_error(server: VLLMServer) -> None:
    # A retry would first wait 30 s: finishing sooner shows there was none, on any machine.
    src = OpenAITokenSource(server.base_url, model="no-such-model", retry_delay_s=30)
    started = time.monotonic()
    try:
        with pytest.raises(LLMRequestError, match="no-such-model"):
            await collect(src)
    finally:
        await src.close()
    assert time.monotonic() - started < 30  # not retried


# ---- network faults, injected between the source and the real server ------------------------


class FaultyRelay:
    """A loopback TCP relay to the server that injects one fault.

    "reset": drops the first `failures` connections before answering; "cut": relays, then
    drops the connection after `cut_after` bytes of response; "silent": accepts, never answers.
    """

    def __init__(self, target_port: int, mode: str, failures: int = 1, cut_after: int = 0):
        self.target_port = target_port
        self.mode = mode
        self.failures = failures
        self.cut_after = cut_after
        self.connections = 0
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> FaultyRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            if self.mode == "reset" and self.connections <= self.failures:
                await reader.read(1)  # the request has started
                writer.transport.abort()
                return
            if self.mode == "silent":
                await asyncio.sleep(3600)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            limit = self.cut_after if self.mode == "cut" else None
            await asyncio.gather(
                self._pipe(reader, up_writer, None), self._pipe(up_reader, writer, limit)
            )
            up_writer.transport.abort()
        finally:
            writer.transport.abort()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None):
        sent = 0
        while data := await src.read(4096):
            if limit is not None and sent + len(data) >= limit:
                dst.write(data[: limit - sent])
                await dst.drain()
                dst.transport.abort()
                return
            dst.write(data)
            await dst.drain()
            sent += len(data)
        dst.transport.abort()


async def test_retried_before_the_first_token(server: VLLMServer, source) -> None:
    expected, _ = await collect(source, seed=21)
    async with FaultyRelay(server.port, "reset", failures=2) as relay:
        src = OpenAITokenSource(
            relay.url, model=source.model, connect_retries=2, retry_delay_s=0.05
        )
        try:
            codes, stream = await collect(src, seed=21)
        finally:
            await src.close()
    assert relay.connections == 3
    assert codes == expected and stream.finish_reason in ("stop", "length")


async def test_too_many_failures_before_the_first_token(server: VLLMServer, source) -> None:
    await collect(source, seed=1, max_tokens=1)  # the model name is known
    async with FaultyRelay(server.port, "reset", failures=10) as relay:
        src = OpenAITokenSource(
            relay.url, model=source.model, connect_retries=1, retry_delay_s=0.05
        )
        try:
            with pytest.raises(LLMUnavailableError, match="2 attempts"):
                await collect(src, seed=1)
        finally:
            await src.close()
    assert relay.connections == 2


async def test_broken_after_the_first_token_is_an_error(server: VLLMServer, source) -> None:
    await collect(source, seed=1, max_tokens=1)
    # Headers plus a handful of events (~250 bytes each), then the connection drops.
    async with FaultyRelay(server.port, "cut", cut_after=3000) as relay:
        src = OpenAITokenSource(relay.url, model=source.model, extra_body={"ignore_eos": True})
        stream = src.stream(TEXT, SamplingOptions(seed=2, max_tokens=200))
        codes = []
        try:
            with pytest.raises(LLMError, match="broke after") as info:
                async for code in stream:
                    codes.append(code)
        finally:
            await src.close()
    assert not isinstance(info.value, LLMUnavailableError)  # not retried, not "unavailable"
    assert 0 < len(codes) < 200 and relay.connections == 1
    assert stream.finish_reason == "error"


async def test_no_answer_times_out(server: VLLMServer) -> None:
    async with FaultyRelay(server.port, "silent") as relay:
        src = OpenAITokenSource(relay.url, model="m", timeout_s=0.5, connect_retries=0)
        started = time.monotonic()
        try:
            with pytest.raises(LLMUnavailableError, match=r"(?i)timeout"):
                await collect(src)
        finally:
            await src.close()
    assert time.monotonic() - started < 3
