"""Stateless replicas: two real gRPC servers sharing one PostgreSQL voice store (Debian's
PostgreSQL, started by the tests; stand-in LLM, tiny codec, tiny random WavLM).

What must hold: racing creates of one voice id on both replicas leave exactly one voice (the
loser gets ALREADY_EXISTS); a voice created on replica A speaks on replica B with the same
embedding; deleted on A, it is refused on B at once (no stale cache); a database that cannot
be reached is UNAVAILABLE and the replica keeps serving presets."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import pytest_asyncio

from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc
from miotts_stream.service.server import MioTTSServer, ServerOptions, build_engine

from .audio_files import encode, voice_like
from .servers import running_servers, tiny_codec_options
from .servers import speak as speak_seeded

pytestmark = pytest.mark.asyncio(loop_scope="module")

CLIPS = [
    encode(voice_like(2.0, 24000, seed=30 + i, f0=120.0 + 30 * i), 24000, "wav") for i in range(2)
]


def replica_options(voice_store: str, data_dir: str, wavlm: str) -> ServerOptions:
    return tiny_codec_options(
        ssl_model=wavlm,
        data_dir=data_dir,  # unused with a --voice-store; each replica has its own anyway
        voice_store=voice_store,
        llm_standin_rate=400.0,
        llm_standin_prefill_ms=1.0,
        max_streams=4,
        metrics_port=None,
    )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def replicas(postgres_server, tmp_path_factory, tiny_wavlm):
    # A call waits at most 1 s for a connection (the default is 5 s) when the database is gone.
    url = postgres_server.create_database() + "&connect_timeout=1"
    options = (
        replica_options(url, str(tmp_path_factory.mktemp(name)), str(tiny_wavlm))
        for name in ("a", "b")
    )
    async with running_servers(options) as servers:
        yield servers


@pytest_asyncio.fixture(loop_scope="module")
async def stubs(replicas):
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{r.port}") for r in replicas]
    try:
        yield [tts_pb2_grpc.TextToSpeechStub(c) for c in channels]
    finally:
        for channel in channels:
            await channel.close()


async def speak(stub, voice: tts_pb2.Voice) -> np.ndarray:
    """Seeded and decoded in one window: two replicas with the same voice give the same samples."""
    return await speak_seeded(stub, voice, seed=5)


async def status_of(awaitable) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(awaitable, 60)
    return info.value.code()


async def test_racing_creates_on_two_replicas_leave_exactly_one(stubs):
    for round_number in range(3):
        voice_id = f"race-{round_number}"
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    stub.CreateVoice(tts_pb2.CreateVoiceRequest(voice_id=voice_id, audio=clip))
                    for stub, clip in zip(stubs, CLIPS, strict=True)
                ),
                return_exceptions=True,
            ),
            120,
        )
        created = [r for r in results if isinstance(r, tts_pb2.VoiceInfo)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(created) == 1 and len(refused) == 1, results
        assert refused[0].code() == grpc.StatusCode.ALREADY_EXISTS
        for stub in stubs:  # both replicas see the one voice
            listed = await stub.ListVoices(tts_pb2.ListVoicesRequest())
            assert [v.name for v in listed.voices].count(voice_id) == 1


async def test_created_on_a_speaks_on_b_deleted_on_a_refused_on_b(stubs, replicas):
    a, b = stubs
    info = await a.CreateVoice(tts_pb2.CreateVoiceRequest(voice_id="shared", audio=CLIPS[0]))
    assert (await b.GetVoice(tts_pb2.GetVoiceRequest(voice_id="shared"))) == info

    stored = replicas[0].voices.store.get("shared").embedding
    explicit = tts_pb2.Voice(embedding=tts_pb2.Embedding(values=stored.tolist()))
    on_b = await asyncio.wait_for(speak(b, tts_pb2.Voice(voice_id="shared")), 60)
    assert len(on_b) > 0 and np.abs(on_b).max() > 1e-3
    np.testing.assert_allclose(on_b, await asyncio.wait_for(speak(b, explicit), 60), atol=1e-5)

    await a.DeleteVoice(tts_pb2.DeleteVoiceRequest(voice_id="shared"))
    # Refused on B as soon as A's delete returned: no replica keeps a copy.
    assert await status_of(b.GetVoice(tts_pb2.GetVoiceRequest(voice_id="shared"))) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert await status_of(speak(b, tts_pb2.Voice(voice_id="shared"))) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert await status_of(b.DeleteVoice(tts_pb2.DeleteVoiceRequest(voice_id="shared"))) == (
        grpc.StatusCode.NOT_FOUND
    )
    listed = await b.ListVoices(tts_pb2.ListVoicesRequest())
    assert "shared" not in [v.name for v in listed.voices]


async def test_an_unreachable_store_is_unavailable_and_presets_still_speak(
    stubs, replicas, postgres_server
):
    """The database drops every connection of replica B and refuses new ones for a moment."""
    import psycopg

    b = stubs[1]
    dbname = psycopg.conninfo.conninfo_to_dict(replicas[1].options.voices.voice_store)["dbname"]
    with psycopg.connect(postgres_server.url("postgres"), autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS false")
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (dbname,),
        )
        try:
            for call in (
                b.GetVoice(tts_pb2.GetVoiceRequest(voice_id="anyone")),
                b.ListVoices(tts_pb2.ListVoicesRequest()),
                speak(b, tts_pb2.Voice(voice_id="anyone")),
            ):
                assert await status_of(call) == grpc.StatusCode.UNAVAILABLE
            preset = await asyncio.wait_for(speak(b, tts_pb2.Voice(preset="en_female")), 60)
            assert len(preset) > 0
        finally:
            admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS true")
    # Back: the pool connects again (its retries stop after 5 s; the next call starts anew).
    for _ in range(30):
        code = await status_of(b.GetVoice(tts_pb2.GetVoiceRequest(voice_id="anyone")))
        if code != grpc.StatusCode.UNAVAILABLE:
            break
        await asyncio.sleep(0.5)
    assert code == grpc.StatusCode.NOT_FOUND


async def test_a_replica_whose_database_is_unreachable_does_not_start(tmp_path, tiny_wavlm):
    from miotts_stream.voices import VoiceStoreUnavailable

    missing = f"postgresql://miotts@/voices?host={tmp_path}&connect_timeout=1"  # no socket
    options = replica_options(missing, str(tmp_path), str(tiny_wavlm))
    engine = await build_engine(options)
    server = MioTTSServer(engine, options)
    try:
        with pytest.raises(VoiceStoreUnavailable, match="cannot reach"):
            await server.start()
        assert server.port == 0  # it never bound its port
    finally:
        await engine.close()
