"""LiveKit Agents against a real server, its `tts.TTS` API driven directly (as LiveKit's own
plugin tests do; no room, no cloud service): our `TTS` (the conversation WebSocket) and
LiveKit's OpenAI plugin (`/v1/audio/speech`). The server: the in-process stand-in LLM and the
tiny codec checkpoint, on loopback."""

from __future__ import annotations

import asyncio
import logging

import pytest
import pytest_asyncio
from livekit.agents import APIConnectOptions, APIError, APIStatusError
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT
from livekit.plugins import openai as livekit_openai

from miotts_stream.integrations.livekit import TTS
from miotts_stream.service.engine import ErrorCode, SessionError
from miotts_stream.text.words import split_words

from .servers import released, running_server, server_log_lines, tiny_codec_options

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "livekit-key-1"
REPLY = "Hello there, how are you doing today? I hope the weather is fine where you are."
NO_RETRY = APIConnectOptions(max_retry=0)


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


async def push_words(stream, text: str, gap_s: float = 0.04, end: bool = True) -> None:
    """Text as an LLM streams it, a word at a time."""
    for word in text.split(" "):
        stream.push_text(word + " ")
        await asyncio.sleep(gap_s)
    if end:
        stream.end_input()


def transcript(events) -> list:
    return [t for ev in events for t in ev.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])]


async def test_stream_pushes_text_as_it_comes_with_aligned_transcripts(server):
    """`push_text` reaches the server as it is pushed: audio starts long before the last word
    (no StreamAdapter waiting for sentences); timed transcripts cover every word in order."""
    tts = TTS(base_url=base_url(server), api_key=KEY, sample_rate=16000)
    assert tts.capabilities.streaming and tts.capabilities.aligned_transcript
    try:
        stream = tts.stream()
        pusher = asyncio.create_task(push_words(stream, REPLY * 2))
        events = []
        async for event in stream:
            if not events:
                audio_before_the_text_ended = not pusher.done()
            events.append(event)
        await pusher
        await stream.aclose()
    finally:
        await tts.aclose()
    assert audio_before_the_text_ended
    assert all(e.frame.sample_rate == 16000 and e.frame.num_channels == 1 for e in events)
    assert [e.is_final for e in events] == [False] * (len(events) - 1) + [True]
    assert len({e.segment_id for e in events}) == 1 and events[0].request_id
    words = transcript(events)
    assert [w.strip() for w in words] == [w.text for w in split_words(REPLY * 2)]
    starts = [w.start_time for w in words]
    assert starts == sorted(starts) and all(w.end_time >= w.start_time for w in words)
    await released(server)


async def test_flush_speaks_what_was_pushed_and_end_input_ends_the_stream(server):
    tts = TTS(base_url=base_url(server), api_key=KEY)
    try:
        stream = tts.stream()
        stream.push_text("No sentence end yet")
        stream.flush()  # speak it now
        first = await asyncio.wait_for(anext(stream), 10)  # before any more text
        stream.push_text(", and then the rest.")
        stream.end_input()
        rest = [event async for event in stream]
        await stream.aclose()
    finally:
        await tts.aclose()
    assert first.frame.samples_per_channel > 0 and rest[-1].is_final
    await released(server)


async def test_aclose_cancels_the_context_and_the_next_stream_uses_the_same_socket(server, caplog):
    caplog.set_level(logging.INFO, logger="miotts_stream.service.admission")
    tts = TTS(base_url=base_url(server), api_key=KEY)
    try:
        stream = tts.stream()
        stream.push_text(REPLY * 4)
        stream.flush()
        await anext(stream)
        await stream.aclose()  # the user barged in
        await released(server)  # its LLM request and decoding stopped on the server
        second = tts.synthesize("A second turn.")
        frames = [event async for event in second]
        await second.aclose()
    finally:
        await tts.aclose()
    assert frames
    lines = [line for line in server_log_lines(caplog) if "WS /v1/conversation" in line]
    contexts = [line for line in lines if ".1 WS" in line or ".2 WS" in line]
    assert len(contexts) == 2, lines
    conversation = contexts[0].split()[3].rsplit(".", 1)[0]
    assert all(conversation in line for line in contexts)  # one connection, two contexts
    assert ": CANCELLED" in contexts[0] and ": OK" in contexts[1]


@pytest.mark.parametrize(
    ("voice", "key", "status", "words"),
    [
        ("nobody", KEY, 404, "'nobody' is neither a preset"),
        ("en_female", "wrong-key-123", 401, "refused the connection"),
    ],
)
async def test_wrong_voice_and_wrong_key(server, voice, key, status, words):
    tts = TTS(base_url=base_url(server), api_key=key, voice=voice)
    try:
        with pytest.raises(APIStatusError) as caught:
            async for _ in tts.synthesize("Hello?", conn_options=NO_RETRY):
                pass
    finally:
        await tts.aclose()
    assert caught.value.status_code == status and words in str(caught.value)
    assert key not in str(caught.value)
    await released(server)


async def test_livekits_openai_plugin_gets_request_ids_and_sees_a_cut_stream(server):
    """LiveKit's OpenAI TTS, unmodified, against /v1/audio/speech: an OpenAI voice name works,
    each request has its id (no "unknown"), and a failure after the first audio is an error,
    not a short success (its SSE path ignores error events; the cut body shows)."""
    tts = livekit_openai.TTS(base_url=f"{base_url(server)}/v1", api_key=KEY, voice="alloy")
    try:
        events = [event async for event in tts.synthesize("Hello from the OpenAI path.")]
        assert events and events[-1].is_final
        assert len(events[0].request_id) == 16  # the server's x-request-id
        assert events[0].frame.sample_rate == 24000

        long_text = "A long sentence that the server will fail halfway, as a drain would. " * 3
        cut = tts.synthesize(long_text, conn_options=NO_RETRY)
        with pytest.raises(APIError):
            async for _ in cut:
                for session in list(server.engine.sessions):
                    session.fail(SessionError(ErrorCode.UNAVAILABLE, "server: shut down"))
        await cut.aclose()
    finally:
        await tts.aclose()
    await released(server)
