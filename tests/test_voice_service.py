"""Voices over gRPC, end to end: a real server on loopback (vLLM with the tiny demo model, the
tiny codec checkpoint, a tiny random WavLM), CreateVoice / GetVoice / DeleteVoice / ListVoices,
cloned voices and reference audio used in StreamingSynthesize, every error to its status, a
restart of the serving layer, and the command line on the same store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from miotts_stream.audio.reference import AudioLimits
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc
from miotts_stream.service.server import MioTTSServer
from miotts_stream.voices.registry import embed_reference_audio

from .audio_files import encode, voice_like
from .conftest import TINY_CODECS
from .servers import running_server, speak, vllm_options

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[1]
CLIP = encode(voice_like(2.5, 48000, seed=11), 48000, "wav")
OTHER_CLIP = encode(voice_like(2.0, 24000, seed=12, f0=220.0), 24000, "flac")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory, tiny_wavlm):
    options = vllm_options(
        ssl_model=str(tiny_wavlm),
        data_dir=str(tmp_path_factory.mktemp("voice-store")),
        max_streams=4,
        metrics_port=None,
        voice_aliases={"narrator": "alice"},  # a stored voice (made by the first test)
    )
    async with running_server(options) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield tts_pb2_grpc.TextToSpeechStub(channel)


def by_embedding(values) -> tts_pb2.Voice:
    return tts_pb2.Voice(embedding=tts_pb2.Embedding(values=[float(v) for v in values]))


async def status_of(awaitable) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value.code(), info.value.details()


async def test_clone_then_stream_with_the_voice_by_id(stub, server, tiny_encoder):
    before = time.time()
    info = await stub.CreateVoice(
        tts_pb2.CreateVoiceRequest(
            voice_id="alice", display_name="Alice", language="en", audio=CLIP
        )
    )
    assert (info.name, info.display_name, info.language) == ("alice", "Alice", "en")
    assert info.kind == tts_pb2.VOICE_KIND_STORED
    assert info.duration_seconds == pytest.approx(2.5)
    assert before - 1 <= info.created_at.ToNanoseconds() / 1e9 <= time.time() + 1
    assert await stub.GetVoice(tts_pb2.GetVoiceRequest(voice_id="alice")) == info

    listed = await stub.ListVoices(tts_pb2.ListVoicesRequest())
    kinds = {v.name: v.kind for v in listed.voices}
    assert kinds["alice"] == tts_pb2.VOICE_KIND_STORED
    assert kinds["en_female"] == tts_pb2.VOICE_KIND_PRESET

    # The stored embedding is the encoder's embedding of the clip...
    expected, _ = embed_reference_audio(tiny_encoder, CLIP, AudioLimits())
    stored = server.voices.store.get("alice").embedding
    np.testing.assert_allclose(stored.numpy(), expected.numpy(), atol=1e-5)
    # ... and a stream by id speaks with exactly that embedding.
    by_id = await speak(stub, tts_pb2.Voice(voice_id="alice"))
    explicit = await speak(stub, by_embedding(stored))
    assert len(by_id) > 0 and np.abs(by_id).max() > 1e-3
    np.testing.assert_allclose(by_id, explicit, atol=1e-5)
    preset = await speak(stub, tts_pb2.Voice(preset="en_female"))
    assert len(preset) != len(by_id) or np.abs(preset - by_id).max() > 1e-3
    # --voice-alias narrator=alice: the alias speaks as the stored voice, by either field.
    for voice in (tts_pb2.Voice(preset="narrator"), tts_pb2.Voice(voice_id="narrator")):
        np.testing.assert_allclose(await speak(stub, voice), by_id, atol=1e-5)
    listed = await stub.ListVoices(tts_pb2.ListVoicesRequest())
    (narrator,) = [v for v in listed.voices if v.name == "narrator"]
    assert (narrator.kind, narrator.alias_of) == (tts_pb2.VOICE_KIND_ALIAS, "alice")
    request = tts_pb2.CreateVoiceRequest(voice_id="narrator", audio=CLIP)
    code, details = await status_of(stub.CreateVoice(request))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "alias of 'alice'" in details


async def test_reference_audio_in_the_config_is_cloned_once(stub, server, tiny_encoder):
    expected, _ = embed_reference_audio(tiny_encoder, OTHER_CLIP, AudioLimits())
    computed = server.voices.embeddings_computed
    first = await speak(stub, tts_pb2.Voice(reference_audio=OTHER_CLIP))
    assert server.voices.embeddings_computed == computed + 1
    again = await speak(stub, tts_pb2.Voice(reference_audio=OTHER_CLIP))
    assert server.voices.embeddings_computed == computed + 1  # same content: from the cache
    explicit = await speak(stub, by_embedding(expected))
    np.testing.assert_allclose(first, explicit, atol=1e-5)
    np.testing.assert_allclose(again, first, atol=0)


@pytest.mark.parametrize(
    ("request_fields", "code", "words"),
    [
        ({"voice_id": "taken"}, grpc.StatusCode.ALREADY_EXISTS, "exists already"),
        ({"voice_id": "en_male"}, grpc.StatusCode.ALREADY_EXISTS, "preset"),
        ({"voice_id": "Not Valid"}, grpc.StatusCode.INVALID_ARGUMENT, "voice_id"),
        ({"voice_id": "x" * 65}, grpc.StatusCode.INVALID_ARGUMENT, "voice_id"),
        (
            {"voice_id": "n", "display_name": "a\nb"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "display_name",
        ),
        ({"voice_id": "l", "language": "e n"}, grpc.StatusCode.INVALID_ARGUMENT, "language"),
        ({"voice_id": "a", "audio": b""}, grpc.StatusCode.INVALID_ARGUMENT, "no bytes"),
        (
            {"voice_id": "a", "audio": b"RIFF" + b"\0" * 400},
            grpc.StatusCode.INVALID_ARGUMENT,
            "decode",
        ),
        (
            {"voice_id": "a", "audio": encode(voice_like(0.4, 24000), 24000)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "too short",
        ),
        (
            {"voice_id": "a", "audio": encode(voice_like(31, 8000), 8000, "ogg_opus")},
            grpc.StatusCode.INVALID_ARGUMENT,
            "too long",
        ),
        (
            {"voice_id": "a", "audio": encode(np.zeros(48000, np.float32), 24000)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "silent",
        ),
        (
            {"voice_id": "a", "audio": encode(np.sign(voice_like(2.0, 24000)), 24000, "flac")},
            grpc.StatusCode.INVALID_ARGUMENT,
            "clipped",
        ),
    ],
    ids=[
        "duplicate",
        "preset-name",
        "bad-id",
        "long-id",
        "bad-name",
        "bad-language",
        "empty-audio",
        "garbage-audio",
        "short",
        "long",
        "silent",
        "clipped",
    ],
)
async def test_create_voice_errors(stub, request_fields, code, words):
    if request_fields["voice_id"] == "taken":  # the duplicate case makes its own first voice
        with contextlib.suppress(grpc.aio.AioRpcError):  # made already (another parameter)
            await stub.CreateVoice(tts_pb2.CreateVoiceRequest(voice_id="taken", audio=CLIP))
    fields = {"audio": CLIP} | request_fields
    got, details = await status_of(stub.CreateVoice(tts_pb2.CreateVoiceRequest(**fields)))
    assert got == code and words in details, details


async def test_get_delete_and_stream_errors_and_the_server_keeps_serving(stub):
    cases = [
        (stub.GetVoice(tts_pb2.GetVoiceRequest(voice_id="nobody")), grpc.StatusCode.NOT_FOUND),
        (
            stub.DeleteVoice(tts_pb2.DeleteVoiceRequest(voice_id="nobody")),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            stub.DeleteVoice(tts_pb2.DeleteVoiceRequest(voice_id="en_female")),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (speak(stub, tts_pb2.Voice(voice_id="nobody")), grpc.StatusCode.NOT_FOUND),
        (
            speak(stub, tts_pb2.Voice(reference_audio=b"not audio" * 50)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for call, code in cases:
        got, details = await status_of(call)
        assert got == code, details
    _, details = await status_of(speak(stub, tts_pb2.Voice(reference_audio=b"")))
    assert details.startswith("voice.reference_audio: no bytes")
    preset = await stub.GetVoice(tts_pb2.GetVoiceRequest(voice_id="en_female"))
    assert preset.kind == tts_pb2.VOICE_KIND_PRESET and "commercial" in preset.notice
    assert len(await speak(stub, tts_pb2.Voice(preset="en_male"))) > 0


async def test_concurrent_creates_of_one_id_leave_one_and_delete_works(stub, server):
    calls = [
        stub.CreateVoice(tts_pb2.CreateVoiceRequest(voice_id="race", audio=clip))
        for clip in (CLIP, OTHER_CLIP, CLIP, OTHER_CLIP)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    created = [r for r in results if isinstance(r, tts_pb2.VoiceInfo)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 1 and len(refused) == 3
    assert all(r.code() == grpc.StatusCode.ALREADY_EXISTS for r in refused)
    names = [v.name for v in (await stub.ListVoices(tts_pb2.ListVoicesRequest())).voices]
    assert names.count("race") == 1
    await stub.DeleteVoice(tts_pb2.DeleteVoiceRequest(voice_id="race"))
    got, _ = await status_of(stub.GetVoice(tts_pb2.GetVoiceRequest(voice_id="race")))
    assert got == grpc.StatusCode.NOT_FOUND


async def test_voices_survive_a_restart(stub, server):
    """A new serving layer on the same --data-dir (sharing the already running engine, to save
    starting vLLM again) finds the voice and speaks with it."""
    await stub.CreateVoice(tts_pb2.CreateVoiceRequest(voice_id="keeper", audio=OTHER_CLIP))
    options = server.options.with_values(port=0)
    restarted = MioTTSServer(server.engine, options)
    await restarted.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.port}") as channel:
            fresh = tts_pb2_grpc.TextToSpeechStub(channel)
            info = await fresh.GetVoice(tts_pb2.GetVoiceRequest(voice_id="keeper"))
            assert info.kind == tts_pb2.VOICE_KIND_STORED
            assert len(await speak(fresh, tts_pb2.Voice(voice_id="keeper"))) > 0
    finally:
        await restarted.grpc.stop(0.5)  # the engine belongs to the first server
        restarted.voices.close()


def cli(data_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "miotts_stream.voices", "--data-dir", data_dir, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


async def test_cli_and_server_share_the_store(stub, server, tiny_wavlm, tmp_path):
    data_dir = server.options.voices.data_dir
    audio = tmp_path / "bob.wav"
    audio.write_bytes(encode(voice_like(3.0, 16000, seed=21, f0=110.0), 16000))
    made = await asyncio.to_thread(
        cli,
        data_dir,
        "create",
        "--audio",
        str(audio),
        "--id",
        "bob",
        "--codec",
        str(TINY_CODECS["24khz"]),
        "--ssl-model",
        str(tiny_wavlm),
    )
    assert made.returncode == 0, made.stderr
    info = await stub.GetVoice(tts_pb2.GetVoiceRequest(voice_id="bob"))
    assert info.duration_seconds == pytest.approx(3.0)
    assert len(await speak(stub, tts_pb2.Voice(voice_id="bob"))) > 0

    await stub.CreateVoice(tts_pb2.CreateVoiceRequest(voice_id="carol", audio=CLIP))
    listed = await asyncio.to_thread(cli, data_dir, "list")
    assert {"bob", "carol"} <= {line.split("\t")[0] for line in listed.stdout.splitlines()}
    assert (await asyncio.to_thread(cli, data_dir, "delete", "--id", "bob")).returncode == 0
    got, _ = await status_of(stub.GetVoice(tts_pb2.GetVoiceRequest(voice_id="bob")))
    assert got == grpc.StatusCode.NOT_FOUND
