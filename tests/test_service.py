"""The gRPC service end to end: a real server on loopback, the real vLLM engine (tiny demo
model), the real codec loader (tiny checkpoint), real libopus."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from miotts_stream.audio.decoders import decode_audio
from miotts_stream.audio.encoders import Encoding
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc

from .servers import running_server, tiny_codec_options, vllm_options

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_TOKENS = 24  # per segment: keeps the CPU engine quick
SPT = 960  # samples per token of the 24 kHz codec


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory):
    options = vllm_options(
        data_dir=str(tmp_path_factory.mktemp("voices")),
        max_streams=5,
        metrics_port=0,
    )
    async with running_server(options) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield tts_pb2_grpc.TextToSpeechStub(channel)


def config(encoding=tts_pb2.PCM_S16LE, rate=0, seed=1, max_tokens=MAX_TOKENS, **kwargs):
    return tts_pb2.SynthesisConfig(
        voice=kwargs.pop("voice", tts_pb2.Voice(preset="en_female")),
        audio=tts_pb2.AudioFormat(encoding=encoding, sample_rate_hz=rate),
        generation=tts_pb2.GenerationOptions(seed=seed, max_tokens=max_tokens),
        **kwargs,
    )


def req(**kwargs) -> tts_pb2.StreamingSynthesizeRequest:
    return tts_pb2.StreamingSynthesizeRequest(**kwargs)


async def collect(call) -> dict:
    out = {"audio": [], "segments": [], "summary": None, "data": b"", "packets": []}
    async for response in call:
        kind = response.WhichOneof("response")
        if kind == "audio":
            out["audio"].append(response.audio)
            out["data"] += response.audio.data
            out["packets"] += list(response.audio.opus_packets)
        elif kind == "segment":
            out["segments"].append(response.segment)
        else:
            out["summary"] = response.summary
    return out


async def unfinished(server) -> int:
    return server.engine.source.num_unfinished_requests()


async def released(server, baseline: int = 0) -> None:
    """Wait (bounded) until the server holds no session and no extra engine request: the
    client sees the status before the handler's cleanup has run."""
    for _ in range(200):
        if not server.engine.sessions and await unfinished(server) == baseline:
            break
        await asyncio.sleep(0.02)
    assert not server.engine.sessions
    assert await unfinished(server) == baseline


async def test_bidirectional_text_in_pieces(stub, server):
    pieces = ["Hel", "lo th", "ere. How a", "re you", " today? I am f", "ine"]

    async def requests():
        yield req(config=config())
        for piece in pieces:
            yield req(text=piece)
            await asyncio.sleep(0.01)
        yield req(end_of_input=tts_pb2.EndOfInput())

    result = await collect(stub.StreamingSynthesize(requests()))
    summary = result["summary"]
    started = [s for s in result["segments"] if s.kind == tts_pb2.SegmentEvent.STARTED]
    assert [s.text for s in started] == ["Hello there.", "How are you today?", "I am fine"]
    finished = [s for s in result["segments"] if s.kind == tts_pb2.SegmentEvent.FINISHED]
    assert [s.segment_index for s in finished] == [0, 1, 2]
    assert summary.sample_rate_hz == 24000 and summary.random_weights
    assert 3 <= summary.generated_tokens <= 3 * MAX_TOKENS
    audio = np.frombuffer(result["data"], dtype="<i2")
    assert len(audio) == summary.generated_tokens * SPT
    assert [a.sequence for a in result["audio"]] == list(range(len(result["audio"])))
    starts = [a.start_sample for a in result["audio"]]
    assert starts == list(np.cumsum([0] + [a.num_samples for a in result["audio"]])[:-1])
    assert finished[-1].audio_end_sample == len(audio)
    assert np.abs(audio).max() > 100  # not silence
    assert summary.time_to_first_audio_ms > 0 and summary.real_time_factor > 0


@pytest.mark.parametrize(
    ("encoding", "rate", "out_rate"),
    [
        (tts_pb2.PCM_S16LE, 16000, 16000),
        (tts_pb2.PCM_F32LE, 0, 24000),
        (tts_pb2.OPUS, 48000, 48000),
        (tts_pb2.OGG_OPUS, 0, 24000),
        (tts_pb2.MULAW, 8000, 8000),
        (tts_pb2.ALAW, 0, 8000),
    ],
)
async def test_every_encoding_decodes_back(stub, encoding, rate, out_rate):
    call = stub.Synthesize(
        tts_pb2.SynthesizeRequest(
            config=config(encoding=encoding, rate=rate), text="Testing every encoding."
        )
    )
    result = await collect(call)
    summary = result["summary"]
    assert summary.sample_rate_hz == out_rate and summary.encoding == encoding
    name = tts_pb2.Encoding.Name(encoding)
    audio = decode_audio(Encoding(name), out_rate, result["data"], result["packets"])
    expected = summary.generated_tokens * SPT * out_rate // 24000
    if encoding == tts_pb2.OPUS:  # raw packets: whole 20 ms frames, encoder delay included
        assert all(len(p) > 0 for p in result["packets"])
        assert expected <= len(audio) <= expected + out_rate // 50 + out_rate // 100
    else:
        assert abs(len(audio) - expected) <= 2
    assert np.sqrt(np.mean(audio**2)) > 0.005  # not silence
    assert abs(summary.audio_seconds - expected / out_rate) < 0.01


async def test_a_segment_with_nothing_to_say_is_skipped(stub):
    """A lone "。" normalizes to nothing: its segment is silent, the stream still succeeds."""

    async def requests():
        yield req(config=config(language="ja"))
        yield req(text="。\n")
        yield req(text="こんにちは。")
        yield req(end_of_input=tts_pb2.EndOfInput())

    result = await collect(stub.StreamingSynthesize(requests()))
    finished = [s for s in result["segments"] if s.kind == tts_pb2.SegmentEvent.FINISHED]
    assert [s.text for s in finished] == ["。", "こんにちは。"]
    assert finished[0].audio_end_sample == finished[0].audio_start_sample == 0
    assert result["summary"].generated_tokens > 0


async def test_same_seed_same_audio(stub):
    texts = []
    for _ in range(2):
        result = await collect(
            stub.Synthesize(tts_pb2.SynthesizeRequest(config=config(seed=7), text="Reproducible."))
        )
        texts.append(result["data"])
    assert texts[0] == texts[1]


async def test_cancel_mid_stream_ends_promptly_and_frees_the_engine(stub, server):
    baseline = await unfinished(server)
    cancel_now = asyncio.Event()

    async def requests():
        yield req(config=config(max_tokens=400))
        yield req(text="A long sentence that would take a while to say. ")
        yield req(flush=tts_pb2.Flush())
        await cancel_now.wait()
        yield req(cancel=tts_pb2.Cancel())

    call = stub.StreamingSynthesize(requests())
    chunks_after_cancel = 0
    cancelled_at = None
    async for response in call:
        if response.WhichOneof("response") == "audio":
            if cancelled_at is None:
                cancelled_at = time.perf_counter()
                cancel_now.set()
            else:
                chunks_after_cancel += 1
    assert await call.code() == grpc.StatusCode.OK
    assert time.perf_counter() - cancelled_at < 2.0
    assert chunks_after_cancel <= 2  # what was already in flight
    for _ in range(100):
        if await unfinished(server) == baseline and not server.engine.sessions:
            break
        await asyncio.sleep(0.02)
    assert await unfinished(server) == baseline
    assert not server.engine.sessions


async def test_client_disconnect_aborts_the_engine_request(stub, server):
    baseline = await unfinished(server)
    call = stub.Synthesize(
        tts_pb2.SynthesizeRequest(
            config=config(max_tokens=400), text="Disconnect while this is being spoken."
        )
    )
    async for response in call:
        if response.WhichOneof("response") == "audio":
            break
    call.cancel()
    for _ in range(100):
        if await unfinished(server) == baseline and not server.engine.sessions:
            break
        await asyncio.sleep(0.02)
    assert await unfinished(server) == baseline
    assert not server.engine.sessions


async def test_four_concurrent_streams(stub):
    async def one(i):
        return await collect(
            stub.Synthesize(
                tts_pb2.SynthesizeRequest(
                    config=config(seed=i), text=f"Concurrent stream number {i}."
                )
            )
        )

    results = await asyncio.gather(*(one(i) for i in range(4)))
    for result in results:
        summary = result["summary"]
        assert summary.generated_tokens > 0
        assert len(result["data"]) == 2 * summary.generated_tokens * SPT


def _expect_error(code, message_part):
    def check(err: grpc.aio.AioRpcError):
        assert err.code() == code, err.details()
        assert message_part in err.details(), err.details()

    return check


async def test_calls_carry_their_request_id_and_errors_their_field(stub, server, caplog):
    """x-request-id in every call's initial metadata, the same id in the summary and in the
    server's log line of the call; an error about one field names it in trailing metadata."""
    caplog.set_level("INFO", logger="miotts_stream.service.admission")
    call = stub.Synthesize(tts_pb2.SynthesizeRequest(config=config(), text="Who am I?"))
    summary = (await collect(call))["summary"]
    request_id = dict(await call.initial_metadata())["x-request-id"]
    assert summary.request_id == request_id and len(request_id) == 16
    assert f"request {request_id} Synthesize: OK" in caplog.text

    bad = tts_pb2.SynthesisConfig(generation=tts_pb2.GenerationOptions(top_p=7))
    call = stub.Synthesize(tts_pb2.SynthesizeRequest(config=bad, text="Hi."))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(call)
    assert dict(caught.value.trailing_metadata())["miotts-error-field"] == "generation.top_p"
    bad_id = dict(await call.initial_metadata())["x-request-id"]
    assert f"request {bad_id} Synthesize: INVALID_ARGUMENT: generation.top_p" in caplog.text
    voices_call = stub.ListVoices(tts_pb2.ListVoicesRequest())
    voices = await voices_call
    assert dict(await voices_call.initial_metadata())["x-request-id"]
    assert {v.name for v in voices.voices if v.kind == tts_pb2.VOICE_KIND_ALIAS} >= {"alloy"}
    await released(server)


async def test_empty_synthesize_text(stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub.Synthesize(tts_pb2.SynthesizeRequest(config=config(), text="  ")))
    _expect_error(grpc.StatusCode.INVALID_ARGUMENT, "text: no text")(caught.value)


async def test_over_max_streams_is_resource_exhausted(stub, server):
    release = asyncio.Event()

    async def held():
        yield req(config=config())
        await release.wait()
        yield req(cancel=tts_pb2.Cancel())

    calls = [stub.StreamingSynthesize(held()) for _ in range(server.options.limits.max_streams)]
    readers = [asyncio.ensure_future(collect(c)) for c in calls]
    for _ in range(200):
        if len(server.engine.sessions) == server.options.limits.max_streams:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub.Synthesize(tts_pb2.SynthesizeRequest(config=config(), text="One more.")))
    limit = f"the most this server takes at once is {server.options.limits.max_streams}"
    _expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, limit)(caught.value)
    release.set()
    await asyncio.gather(*readers)
    ok = await collect(stub.Synthesize(tts_pb2.SynthesizeRequest(config=config(), text="Room.")))
    assert ok["summary"].generated_tokens > 0


async def test_unreachable_llm_is_unavailable(unused_tcp_port, tmp_path):
    options = tiny_codec_options(
        data_dir=str(tmp_path),
        metrics_port=None,
        llm_base_url=[f"http://127.0.0.1:{unused_tcp_port}/v1"],
        llm_model="nothing-listens-here",
    )
    async with running_server(options, grace=0.2) as srv:
        engine = srv.engine
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = tts_pb2_grpc.TextToSpeechStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(
                    stub.Synthesize(
                        tts_pb2.SynthesizeRequest(config=config(), text="Anyone there?")
                    )
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "speech LLM unavailable" in caught.value.details()
            for _ in range(100):
                if not engine.sessions:
                    break
                await asyncio.sleep(0.02)
            assert not engine.sessions


async def expect_internal(stub, server, text: str, message: str) -> None:
    """A Synthesize that must end, promptly, with INTERNAL naming `message`, leaving no session."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        call = stub.Synthesize(tts_pb2.SynthesizeRequest(config=config(), text=text))
        await asyncio.wait_for(collect(call), 30)
    _expect_error(grpc.StatusCode.INTERNAL, message)(caught.value)
    assert "simulated" not in caught.value.details()  # internals stay in the log
    await released(server)


async def test_a_decode_failure_ends_the_stream_with_internal(stub, server, monkeypatch):
    def broken_trunk(*args, **kwargs):
        raise RuntimeError("simulated decoder fault")

    monkeypatch.setattr(server.engine.decoder.model, "trunk", broken_trunk)
    await expect_internal(stub, server, "Boom.", "decoding failed")
    monkeypatch.undo()
    ok = await collect(stub.Synthesize(tts_pb2.SynthesizeRequest(config=config(), text="Fine.")))
    assert ok["summary"].generated_tokens > 0


async def test_non_finite_audio_is_never_sent(stub, server, monkeypatch):
    """A decode that yields NaN (a codec fault, an embedding that slipped through) ends its
    stream with INTERNAL instead of sending the NaN samples."""
    real_trunk = server.engine.decoder.model.trunk

    def nan_trunk(*args, **kwargs):
        x, valid = real_trunk(*args, **kwargs)
        return torch.full_like(x, float("nan")), valid

    monkeypatch.setattr(server.engine.decoder.model, "trunk", nan_trunk)
    await expect_internal(stub, server, "Not a number.", "decoding failed")
    monkeypatch.undo()
    ok = await collect(stub.Synthesize(tts_pb2.SynthesizeRequest(config=config(), text="Fine.")))
    assert ok["summary"].generated_tokens > 0


async def test_a_generation_bug_ends_the_stream_with_internal(stub, server, monkeypatch):
    def broken_stream(*args, **kwargs):
        raise RuntimeError("simulated generation bug")

    monkeypatch.setattr(server.engine.source, "stream", broken_stream)
    await expect_internal(stub, server, "Bug.", "speech generation failed")


async def test_list_voices_health_reflection_and_metrics(stub, server):
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(stub.Synthesize(tts_pb2.SynthesizeRequest(config=config(), text="")))
    voices = await stub.ListVoices(tts_pb2.ListVoicesRequest())
    assert {"en_female", "en_male", "jp_female", "jp_male"} <= {v.name for v in voices.voices}
    assert all("commercial" in v.notice for v in voices.voices)
    assert voices.random_weights and voices.sample_rate_hz == 24000
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="miotts.v1.TextToSpeech"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert "miotts.v1.TextToSpeech" in names
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read()
    )
    text = body.decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("miotts_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["miotts_active_streams"] == 0  # every stream of the module was released
    assert values['miotts_requests_total{code="OK",method="Synthesize"}'] >= 5
    assert values['miotts_requests_total{code="INVALID_ARGUMENT",method="Synthesize"}'] >= 1
    assert values["miotts_time_to_first_audio_seconds_count"] >= 5
    assert values["miotts_generated_tokens_total"] > 0
    assert values["miotts_audio_seconds_total"] > 0
