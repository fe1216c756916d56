"""Hostile traffic through the public gRPC API: a bad-input matrix, raw wire bytes, time limits
and a seeded request-sequence fuzzer, against a real server on loopback (real vLLM engine with
the tiny demo model, tiny codec checkpoint). Every error case checks the exact status and a
message naming the field, then that the server still serves a normal request."""

from __future__ import annotations

import asyncio
import logging
import random

import grpc
import pytest
import pytest_asyncio

from miotts_stream.bench.fuzz import raw_streaming, run_sequence
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc

from .servers import running_server, vllm_options

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_TEXT_CHARS = 20000
IDLE_S, STALL_S, MAX_STREAM_S = 1.0, 2.0, 8.0
UNARY = "/miotts.v1.TextToSpeech/Synthesize"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory):
    options = vllm_options(
        data_dir=str(tmp_path_factory.mktemp("voices")),  # not the developer's .data/
        max_streams=4,
        metrics_port=None,
        max_text_chars=MAX_TEXT_CHARS,
        idle_timeout_s=IDLE_S,
        stall_timeout_s=STALL_S,
        max_stream_s=MAX_STREAM_S,
        max_receive_message_bytes=4 * MB,  # the default (16 MiB, for reference audio) is larger
    )
    async with running_server(options) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def channel(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest_asyncio.fixture(loop_scope="module")
async def stub(channel):
    return tts_pb2_grpc.TextToSpeechStub(channel)


def config(**kwargs) -> tts_pb2.SynthesisConfig:
    generation = kwargs.pop("generation", tts_pb2.GenerationOptions(seed=1, max_tokens=12))
    return tts_pb2.SynthesisConfig(generation=generation, **kwargs)


def req(**kwargs) -> tts_pb2.StreamingSynthesizeRequest:
    return tts_pb2.StreamingSynthesizeRequest(**kwargs)


def raw_text(data: bytes) -> bytes:
    """A StreamingSynthesizeRequest carrying `data` as its `text` field, byte for byte
    (protobuf itself refuses to build one that is not valid UTF-8)."""
    return b"\x12" + _varint(len(data)) + data


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def raw_config_field(field_number: int, inner: bytes) -> bytes:
    """A config message (field 1 of the request) holding one length-delimited field."""
    body = bytes([(field_number << 3) | 2]) + _varint(len(inner)) + inner
    return b"\x0a" + _varint(len(body)) + body


async def released(server) -> None:
    for _ in range(300):
        if not server.engine.sessions and server.engine.source.num_unfinished_requests() == 0:
            return
        await asyncio.sleep(0.02)
    assert not server.engine.sessions, "a stream slot leaked"
    assert server.engine.source.num_unfinished_requests() == 0, "an engine request leaked"


async def serves_normally(stub, server) -> None:
    await released(server)
    summary = None
    call = stub.Synthesize(tts_pb2.SynthesizeRequest(config=config(), text="Still here."))
    async for response in call:
        if response.WhichOneof("response") == "summary":
            summary = response.summary
    assert summary is not None and summary.generated_tokens > 0
    await released(server)


async def streaming_raw(channel, messages: list[bytes], hold_s: float = 5.0):
    """Send already-serialized messages, keep the stream open, read to the end."""
    call = raw_streaming(channel)

    async def requests():
        for m in messages:
            yield m
        await asyncio.sleep(hold_s)  # the error must come from the server, not a half-close

    responses = call(requests())
    async for _ in responses:
        pass
    return responses


def ser(message) -> bytes:
    return message.SerializeToString()


CFG = ser(req(config=config()))
EMB = tts_pb2.Embedding
MB = 1024 * 1024

# (id, messages (protobuf or raw bytes), expected status, fragment of the message)
CASES = [
    # every message type out of order
    ("text-first", [req(text="hi")], INVALID, "config: the first message must be a config"),
    ("flush-first", [req(flush=tts_pb2.Flush())], INVALID, "config: the first message"),
    ("end-first", [req(end_of_input=tts_pb2.EndOfInput())], INVALID, "config: the first"),
    ("cancel-first", [req(cancel=tts_pb2.Cancel())], INVALID, "config: the first message"),
    ("empty-first", [req()], INVALID, "got an empty message"),
    ("config-twice", [req(config=config()), req(config=config())], INVALID, "config: sent twice"),
    ("empty-after-config", [req(config=config()), req()], INVALID, "request: empty message"),
    (
        "text-after-end",
        [req(config=config()), req(text="a."), req(end_of_input={}), req(text="b")],
        INVALID,
        "request: text after end_of_input",
    ),
    (
        "flush-after-end",
        [req(config=config()), req(text="a."), req(end_of_input={}), req(flush={})],
        INVALID,
        "request: flush after end_of_input",
    ),
    (
        "end-twice",
        [req(config=config()), req(text="a."), req(end_of_input={}), req(end_of_input={})],
        INVALID,
        "request: end_of_input after end_of_input",
    ),
    ("no-text", [req(config=config()), req(end_of_input={})], INVALID, "text: no text"),
    # every field out of range
    ("preset", [req(config=config(voice={"preset": "nobody"}))], grpc.StatusCode.NOT_FOUND,
     "voice.preset: unknown preset 'nobody'"),
    ("emb-short", [req(config=config(voice={"embedding": EMB(values=[1.0] * 5)}))], INVALID,
     "voice.embedding.values: expected 128 floats"),
    ("emb-long", [req(config=config(voice={"embedding": EMB(values=[1.0] * 129)}))], INVALID,
     "voice.embedding.values: expected 128 floats"),
    ("emb-empty", [req(config=config(voice={"embedding": EMB()}))], INVALID,
     "voice.embedding.values: expected 128 floats"),
    ("emb-nan", [req(config=config(voice={"embedding": EMB(values=[float("nan")] * 128)}))],
     INVALID, "voice.embedding.values: holds NaN"),
    ("emb-inf", [req(config=config(voice={"embedding": EMB(values=[float("inf")] * 128)}))],
     INVALID, "voice.embedding.values: holds NaN or infinite"),
    ("emb-1e30", [req(config=config(voice={"embedding": EMB(values=[1e30] * 128)}))], INVALID,
     "voice.embedding.values: values must lie within"),
    ("emb-3e38", [req(config=config(voice={"embedding": EMB(values=[-3e38] + [0.0] * 127)}))],
     INVALID, "voice.embedding.values: values must lie within"),
    ("encoding-99", [req(config=config(audio={"encoding": 99}))], INVALID,
     "audio.encoding: unknown encoding 99"),
    ("rate-negative", [req(config=config(audio={"sample_rate_hz": -1}))], INVALID,
     "audio.sample_rate_hz"),
    ("rate-odd", [req(config=config(audio={"sample_rate_hz": 12345}))], INVALID,
     "audio.sample_rate_hz: 12345 Hz"),
    ("mulaw-16k", [req(config=config(audio={"encoding": tts_pb2.MULAW, "sample_rate_hz": 16000}))],
     INVALID, "audio.sample_rate_hz: 16000 Hz"),
    ("opus-44k", [req(config=config(audio={"encoding": tts_pb2.OPUS, "sample_rate_hz": 44100}))],
     INVALID, "audio.sample_rate_hz: 44100 Hz"),
    ("temp-negative", [req(config=config(generation={"temperature": -1}))], INVALID,
     "generation.temperature must be in [0, 2]"),
    ("temp-2.5", [req(config=config(generation={"temperature": 2.5}))], INVALID,
     "generation.temperature must be in [0, 2], got 2.5"),
    ("temp-1e6", [req(config=config(generation={"temperature": 1e6}))], INVALID,
     "generation.temperature"),
    ("temp-nan", [req(config=config(generation={"temperature": float("nan")}))], INVALID,
     "generation.temperature"),
    ("top-p-0", [req(config=config(generation={"top_p": 0}))], INVALID, "generation.top_p"),
    ("top-p-1.5", [req(config=config(generation={"top_p": 1.5}))], INVALID, "generation.top_p"),
    ("rep-0", [req(config=config(generation={"repetition_penalty": 0}))], INVALID,
     "generation.repetition_penalty"),
    ("rep-3", [req(config=config(generation={"repetition_penalty": 3}))], INVALID,
     "generation.repetition_penalty must be in (0, 2]"),
    ("max-tokens-0", [req(config=config(generation={"max_tokens": 0}))], INVALID,
     "generation.max_tokens"),
    ("max-tokens-neg", [req(config=config(generation={"max_tokens": -5}))], INVALID,
     "generation.max_tokens"),
    ("seed-neg", [req(config=config(generation={"seed": -1}))], INVALID, "generation.seed"),
    ("chunk-neg", [req(config=config(streaming={"chunk_tokens": -3}))], INVALID,
     "streaming.chunk_tokens"),
    ("lookahead-huge", [req(config=config(streaming={"lookahead_tokens": 10000}))], INVALID,
     "streaming.lookahead_tokens"),
    ("left-neg", [req(config=config(streaming={"left_context_tokens": -1}))], INVALID,
     "streaming.left_context_tokens"),
    ("first-251", [req(config=config(streaming={"first_chunk_tokens": 251}))], INVALID,
     "streaming.first_chunk_tokens"),
    ("first-audio-7", [req(config=config(streaming={"first_audio": 7}))], INVALID,
     "streaming.first_audio: unknown value 7"),
    ("language-fr", [req(config=config(language="fr"))], INVALID, "language: 'fr'"),
    ("language-control", [req(config=config(language="\x00\x1b[2J"))], INVALID, "language:"),
    # hostile text
    ("text-one-over", [req(config=config()), req(text="a" * (MAX_TEXT_CHARS + 1))], INVALID,
     f"text: {MAX_TEXT_CHARS + 1} characters exceeds the limit of {MAX_TEXT_CHARS}"),
    ("text-1mb", [req(config=config()), req(text="a" * MB)], INVALID,
     f"text: {MB} characters exceeds the limit of {MAX_TEXT_CHARS}"),
    ("utf8-ff-fe", [CFG, raw_text(b"ok \xff\xfe")], INVALID, "text: not valid UTF-8"),
    ("utf8-surrogate", [CFG, raw_text(b"\xed\xa0\x80")], INVALID, "text: not valid UTF-8"),
    ("utf8-truncated", [CFG, raw_text(b"\xe3\x81")], INVALID, "text: not valid UTF-8"),
    ("utf8-in-preset", [raw_config_field(1, b"\x0a\x02\xff\xfe")], INVALID,
     "config.voice.preset: not valid UTF-8"),
    ("utf8-in-language", [raw_config_field(5, b"\xc0\xaf")], INVALID,
     "config.language: not valid UTF-8"),
    ("garbage-message", [CFG, b"\xff\xff\xff\xff\xff"], INVALID,
     "request: not a valid protobuf message"),
    ("garbage-first", [b"\x0a\xff\xff\xff"], INVALID, "request: not a valid protobuf message"),
    ("message-5mb", [CFG, raw_text(b"a" * (5 * MB))], grpc.StatusCode.RESOURCE_EXHAUSTED,
     "larger than max"),
    # only a config, then nothing: the idle limit
    ("config-then-silence", [req(config=config())], grpc.StatusCode.DEADLINE_EXCEEDED,
     "(the idle limit)"),
]  # fmt: skip


@pytest.mark.parametrize(("messages", "code", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
async def test_bad_input_matrix(channel, stub, server, messages, code, message):
    wire = [m if isinstance(m, bytes) else ser(m) for m in messages]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(streaming_raw(channel, wire), 30)
    assert caught.value.code() == code, caught.value.details()
    assert message in caught.value.details(), caught.value.details()
    await serves_normally(stub, server)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"\xff\xfe", "text: not valid UTF-8"),
        (b"\xed\xa0\x80", "text: not valid UTF-8"),
        (b"\xe3\x81", "text: not valid UTF-8"),
    ],
)
async def test_unary_invalid_utf8_is_invalid_argument(channel, stub, server, text, message):
    call = channel.unary_stream(
        UNARY,
        request_serializer=lambda b: b,
        response_deserializer=tts_pb2.StreamingSynthesizeResponse.FromString,
    )
    wire = ser(tts_pb2.SynthesizeRequest(config=config())) + raw_text(text)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call(wire):
            pass
    assert caught.value.code() == INVALID
    assert message in caught.value.details()
    await serves_normally(stub, server)


@pytest.mark.parametrize("bad_first", [True, False])
async def test_early_rejection_with_queued_messages_keeps_its_status(server, stub, bad_first):
    """grpc/grpc#36066: a grpcio asyncio client whose queued writes land after the server's
    status reports INTERNAL "Internal error from Core" instead. The server reads the client's
    remaining messages before it answers, so the real status arrives, on fresh channels too."""
    bad = req(config=config(audio={"sample_rate_hz": -1}))
    if bad_first:
        messages = [bad] + [req(text="queued. ") for _ in range(20)]
        expected = "audio.sample_rate_hz"
    else:
        messages = [req(config=config()), req(text="x" * (MAX_TEXT_CHARS + 1))]
        messages += [req(text="queued. ") for _ in range(20)]
        expected = "text:"
    for _ in range(10):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as fresh:
            call = tts_pb2_grpc.TextToSpeechStub(fresh).StreamingSynthesize(iter(messages))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
        assert caught.value.code() == INVALID, caught.value.details()
        assert expected in caught.value.details()
    await serves_normally(stub, server)


async def test_control_characters_are_spoken_around(stub, server):
    text = "Hello\x00 there\x07.\x1b[31m Bye\u202e\ufeff."
    call = stub.Synthesize(tts_pb2.SynthesizeRequest(config=config(), text=text))
    kinds = [r.WhichOneof("response") async for r in call]
    assert await call.code() == grpc.StatusCode.OK and kinds[-1] == "summary"
    await released(server)


@pytest.mark.parametrize("raw", [b"\x00" * 64 + b"\xff" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
async def test_garbage_and_http1_on_the_grpc_port(stub, server, raw):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(raw)
    await writer.drain()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError)):
        await asyncio.wait_for(reader.readexactly(1 << 20), 10)  # the server hangs up
    writer.close()
    await serves_normally(stub, server)


async def test_idle_stream_is_closed_and_its_slot_freed(stub, server):
    """Text without a sentence end is not pending work: the stream idles out too."""

    async def requests():
        yield req(config=config())
        yield req(text="no sentence end")
        await asyncio.sleep(30)

    started = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.StreamingSynthesize(requests()):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"idle, no message for {IDLE_S:g} s" in caught.value.details()
    assert asyncio.get_running_loop().time() - started < 20  # not the client's own 30 s
    await serves_normally(stub, server)


async def test_a_slow_but_steady_client_is_not_idle(stub, server):
    """Messages keep coming, each under the idle limit, for longer than the limit in total."""

    async def requests():
        yield req(config=config())
        for word in ("One", " two", " three", " four."):
            yield req(text=word)
            await asyncio.sleep(IDLE_S * 0.5)
        yield req(end_of_input={})

    kinds = [r.WhichOneof("response") async for r in stub.StreamingSynthesize(requests())]
    assert kinds[-1] == "summary"
    await released(server)


async def test_ten_thousand_one_character_pieces_respect_max_stream_s(stub, server):
    async def requests():
        yield req(config=config())
        for i in range(10000):
            yield req(text="ab. "[i % 4])

    started = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.StreamingSynthesize(requests()):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"open longer than the limit of {MAX_STREAM_S:g} s" in caught.value.details()
    assert asyncio.get_running_loop().time() - started < MAX_STREAM_S + 20
    await serves_normally(stub, server)


async def test_the_clients_deadline_is_honoured(stub, server):
    text = "A long text that takes a while. " * 20
    generation = tts_pb2.GenerationOptions(seed=1, max_tokens=300)
    call = stub.Synthesize(
        tts_pb2.SynthesizeRequest(config=config(generation=generation), text=text), timeout=1.0
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await serves_normally(stub, server)


async def test_a_client_that_stops_reading_is_cancelled(server, caplog):
    """The bounded queues pause the stream; after --stall-timeout-s it is cancelled and its
    LLM request aborted, although the client never reads again."""
    # No BDP probing: the HTTP/2 window stays at 64 KiB, well under a second of float audio,
    # so the server is blocked on the client however early the demo model ends its speech.
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.http2.bdp_probe", 0)]
    )
    stub = tts_pb2_grpc.TextToSpeechStub(channel)
    text = "Nobody reads this. " * 30
    generation = tts_pb2.GenerationOptions(seed=1, max_tokens=400)
    pcm_f32 = tts_pb2.AudioFormat(encoding=tts_pb2.PCM_F32LE)
    call = stub.Synthesize(
        tts_pb2.SynthesizeRequest(config=config(generation=generation, audio=pcm_f32), text=text)
    )
    caplog.set_level(logging.INFO, logger="miotts_stream.service.engine")
    await call.read()  # the stream is open; from now on the client reads nothing
    for _ in range(600):
        if not server.engine.sessions:
            break
        await asyncio.sleep(0.05)
    assert not server.engine.sessions, "the stalled stream still holds its slot"
    assert "the client read nothing for 2 s, the limit" in caplog.text
    await released(server)
    call.cancel()
    await channel.close()


async def test_fuzzed_request_sequences(channel, stub, server):
    """Seeded random sequences (valid and broken messages, raw bytes, cancels, hang-ups): each
    ends within its bound, nothing leaks, and the server still serves."""
    rng = random.Random(20261126)
    for _ in range(12):
        await asyncio.wait_for(run_sequence(channel, rng, max_text_chars=MAX_TEXT_CHARS), 40)
        await released(server)
    await serves_normally(stub, server)
