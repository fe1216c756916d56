"""Pipecat against a real server: our `MioTTSService` (the conversation WebSocket) and Pipecat's
own `OpenAITTSService` (`/v1/audio/speech`), in real Pipecat pipelines, no cloud service. The
server: the in-process stand-in LLM and the tiny codec checkpoint, on loopback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import pytest_asyncio
from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame, TTSStoppedFrame, TTSTextFrame
from pipecat.services.openai.tts import OpenAITTSService

from miotts_stream.bench.pipecat_pipeline import ServicePipeline
from miotts_stream.integrations.pipecat import MioTTSService
from miotts_stream.text.words import split_words

from .servers import released, running_server, server_log_lines, tiny_codec_options

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "pipecat-key-1"
REPLY = "Hello there, how are you doing today? I hope the weather is fine where you are."
SECOND = "Sorry, go on."


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory):
    options = tiny_codec_options(
        llm_standin_rate=100.0,
        data_dir=str(tmp_path_factory.mktemp("voices")),
        http_port=0,
        api_keys=[KEY],
    )
    async with running_server(options) as srv:
        yield srv


def base_url(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def audio_of(seen, context_id: str | None = None) -> list[TTSAudioRawFrame]:
    frames = [s.frame for s in seen.of(TTSAudioRawFrame)]
    return [f for f in frames if context_id is None or f.context_id == context_id]


async def test_streamed_text_becomes_8khz_audio_with_word_frames(server):
    """An LLM's reply pushed word by word: PCM at the pipeline's 8 kHz, and every word as a
    TTSTextFrame with its time, in order, as the server timed it."""
    tts = MioTTSService(base_url=base_url(server), voice="en_female", api_key=KEY)
    async with ServicePipeline(tts, sample_rate=8000) as pipe:
        await pipe.reply(REPLY)
        await pipe.down.until(lambda f: isinstance(f, TTSStoppedFrame))
    audio = audio_of(pipe.down)
    assert audio and all(f.sample_rate == 8000 and f.num_channels == 1 for f in audio)
    samples = np.frombuffer(b"".join(f.audio for f in audio), "<i2")
    assert np.abs(samples).max() > 300  # audio, not silence
    words = [s.frame for s in pipe.down.of(TTSTextFrame)]
    assert [w.text for w in words] == [w.text for w in split_words(REPLY)]
    pts = [w.pts for w in words]
    assert pts == sorted(pts) and pts[0] > 0
    assert {w.context_id for w in words} == {audio[0].context_id}
    assert not pipe.up.of(ErrorFrame)
    await released(server)


async def test_an_interruption_cancels_the_turn_and_the_next_turn_uses_the_same_socket(
    server, caplog
):
    caplog.set_level(logging.INFO, logger="miotts_stream.service.admission")
    tts = MioTTSService(base_url=base_url(server), voice="alloy", api_key=KEY)
    async with ServicePipeline(tts, sample_rate=16000) as pipe:
        await pipe.reply(REPLY * 3)
        first = await pipe.down.until(lambda f: isinstance(f, TTSAudioRawFrame))
        first_context = first.frame.context_id
        interrupted_at = await pipe.interrupt()
        await pipe.reply(SECOND)
        await pipe.down.until(
            lambda f: isinstance(f, TTSStoppedFrame) and f.context_id != first_context
        )
    late = [
        s
        for s in pipe.down.of(TTSAudioRawFrame)
        if s.frame.context_id == first_context and s.at > interrupted_at + 0.05
    ]
    assert not late, "audio of the interrupted turn reached the pipeline after the interruption"
    second = [f for f in audio_of(pipe.down) if f.context_id != first_context]
    assert second and not pipe.up.of(ErrorFrame)
    await released(server)  # the interrupted turn's generation stopped on the server
    # One connection for both turns: its contexts are <conversation>.1 and .2; the first one
    # was cancelled (its LLM request aborted), the second finished.
    lines = [line for line in server_log_lines(caplog) if "WS /v1/conversation" in line]
    contexts = [line for line in lines if ".1 WS" in line or ".2 WS" in line]
    assert len(contexts) == 2, lines
    conversation = contexts[0].split()[3].rsplit(".", 1)[0]
    assert all(conversation in line for line in contexts)
    assert ": CANCELLED" in contexts[0] and ": OK" in contexts[1]


@pytest.mark.parametrize(
    ("voice", "key", "port", "cause"),
    [
        ("nobody", KEY, None, "'nobody' is neither a preset"),
        ("en_female", "wrong-key-123", None, "HTTP 401"),
        ("en_female", KEY, "unused", "cannot be reached"),
    ],
)
async def test_errors_surface_as_error_frames_naming_the_cause(
    server, unused_tcp_port, voice, key, port, cause
):
    url = f"http://127.0.0.1:{unused_tcp_port}" if port else base_url(server)
    tts = MioTTSService(base_url=url, voice=voice, api_key=key)
    async with ServicePipeline(tts) as pipe:
        await pipe.reply("Is anyone there?")
        error = await pipe.up.until(lambda f: isinstance(f, ErrorFrame))
    assert cause in error.frame.error, error.frame.error
    if cause == "HTTP 401":
        assert "API key missing or not valid" in error.frame.error  # not masked as a secret
    assert not audio_of(pipe.down)
    await released(server)


async def test_pipecats_openai_service_speaks_with_an_openai_voice_name(server):
    """Pipecat's own OpenAI TTS service, unmodified, pointed at /v1/audio/speech: "alloy" is
    an alias of a preset, so it works against a server with no voice set up for it."""
    tts = OpenAITTSService(
        api_key=KEY,
        base_url=f"{base_url(server)}/v1",
        settings=OpenAITTSService.Settings(voice="alloy"),
    )
    async with ServicePipeline(tts, sample_rate=24000) as pipe:
        await pipe.reply("Hello from the OpenAI path.")
        await pipe.down.until(lambda f: isinstance(f, TTSStoppedFrame))
    audio = audio_of(pipe.down)
    assert audio and all(f.sample_rate == 24000 for f in audio)
    assert sum(len(f.audio) for f in audio) > 24000  # over half a second of 16-bit audio
    assert not pipe.up.of(ErrorFrame)
    await released(server)
