"""In-process test servers: ServerOptions for the two small engines the tests use, a server
started on loopback for the length of a `with` block, and a short seeded utterance to compare
the audio of two voices or two replicas by."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager

import numpy as np

from miotts_stream.service.pb.miotts.v1 import tts_pb2
from miotts_stream.service.server import MioTTSServer, ServerOptions, build_engine

from .conftest import TINY_CODECS


def vllm_options(**options) -> ServerOptions:
    """The real vLLM engine with the tiny demo model and the tiny 24 kHz codec, on loopback
    (gRPC only, unless `http_port` or `metrics_port` is given: 0 for a free port); `options`
    add to or replace these, by their flat names (ServerOptions.with_values)."""
    from miotts_stream.demo_model import ensure_demo_model

    defaults = dict(
        model=str(ensure_demo_model("tiny")),
        codec=str(TINY_CODECS["24khz"]),
        device="cpu",
        host="127.0.0.1",
        port=0,
        max_model_len=512,
        kv_cache_gib=0.5,
        enforce_eager=True,
        http_port=None,
        metrics_port=None,
    )
    return ServerOptions().with_values(**(defaults | options))


def tiny_codec_options(**options) -> ServerOptions:
    """The tiny 24 kHz codec on loopback (gRPC only, unless `http_port` or `metrics_port` is
    given), with the LLM the options name (llm_standin_rate for the in-process stand-in, or
    llm_base_url); `options` add to or replace these."""
    defaults = dict(
        codec=str(TINY_CODECS["24khz"]),
        device="cpu",
        host="127.0.0.1",
        port=0,
        http_port=None,
        metrics_port=None,
    )
    return ServerOptions().with_values(**(defaults | options))


@asynccontextmanager
async def running_server(options: ServerOptions, grace: float = 0.5) -> AsyncIterator[MioTTSServer]:
    """A started server with its own engine, stopped (engine included) on leaving."""
    engine = await build_engine(options)
    server = MioTTSServer(engine, options)
    try:
        await server.start()
    except BaseException:
        await engine.close()  # a server that did not start leaves no engine workers behind
        raise
    try:
        yield server
    finally:
        await server.stop(grace=grace)


@asynccontextmanager
async def running_servers(
    options: Iterable[ServerOptions], grace: float = 0.5
) -> AsyncIterator[list[MioTTSServer]]:
    """Replicas: one started server per options, each with its own engine, all stopped on
    leaving (those started so far, when one fails to start)."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_server(o, grace)) for o in options]


def speak_config(voice: tts_pb2.Voice, seed: int = 3) -> tts_pb2.SynthesisConfig:
    """One sentence, seeded, decoded in one window once all its tokens are in (a first chunk
    longer than max_tokens): the audio depends on the tokens and the voice, not on timing."""
    return tts_pb2.SynthesisConfig(
        voice=voice,
        audio=tts_pb2.AudioFormat(encoding=tts_pb2.PCM_F32LE),
        generation=tts_pb2.GenerationOptions(seed=seed, max_tokens=16),
        streaming=tts_pb2.StreamingOptions(
            first_chunk_tokens=32, chunk_tokens=32, lookahead_tokens=1
        ),
    )


async def speak(stub, voice: tts_pb2.Voice, seed: int = 3) -> np.ndarray:
    """Stream one short sentence with `voice` (see speak_config); the audio as float32."""

    async def requests():
        yield tts_pb2.StreamingSynthesizeRequest(config=speak_config(voice, seed))
        yield tts_pb2.StreamingSynthesizeRequest(text="Hello there.")
        yield tts_pb2.StreamingSynthesizeRequest(end_of_input=tts_pb2.EndOfInput())

    data = b""
    async for response in stub.StreamingSynthesize(requests()):
        if response.WhichOneof("response") == "audio":
            data += response.audio.data
    return np.frombuffer(data, dtype="<f4")


# The tests' own clients, which may log what they send (websockets logs its handshake's
# headers at DEBUG): their lines are not the server's.
CLIENT_LOGGERS = ("websockets.client",)


def server_log_lines(caplog) -> list[str]:
    """Every line the server logged during a test's setup and call (tracebacks included),
    at the level `caplog` was set to, from any logger but the clients'."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [
        formatter.format(record)
        for when in ("setup", "call")
        for record in caplog.get_records(when)
        if not record.name.startswith(CLIENT_LOGGERS)
    ]


async def released(server: MioTTSServer) -> None:
    """Wait (bounded, 6 s) until the server holds no session, no LLM request and no stream
    slot; then assert it, naming what leaked."""
    for _ in range(300):
        idle = not server.engine.sessions and server.engine.source.open_requests == 0
        if idle and server.admission.metrics.active_streams._value.get() == 0:
            return
        await asyncio.sleep(0.02)
    assert not server.engine.sessions, "a stream's session leaked"
    assert server.engine.source.open_requests == 0, "an LLM request leaked"
    assert server.admission.metrics.active_streams._value.get() == 0, "a stream slot leaked"
