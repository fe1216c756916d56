"""HTTP and WebSocket beside gRPC, end to end: one real server on loopback (the in-process
stand-in LLM, the tiny codec checkpoint, a tiny random WavLM for cloning), API keys on, driven
by independent clients: the official `openai` package, the `websockets` package, aiohttp, and
grpcio for the limits both transports share."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import struct

import aiohttp
import av
import grpc
import numpy as np
import openai
import pytest
import pytest_asyncio
import websockets

from miotts_stream.audio.decoders import decode_audio
from miotts_stream.audio.encoders import Encoding
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc
from miotts_stream.voices.aliases import OPENAI_VOICE_ALIASES

from .audio_files import encode, voice_like
from .servers import released, running_server, server_log_lines, speak_config, tiny_codec_options

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "http-test-key-1"
RATE = 24000  # the tiny 24 kHz codec; the stand-in writes 25 codes per second of audio
SPT = 960  # samples per token
TOKENS = 25  # max_tokens of most requests: 1.0 s of audio
TEXT = "Hello there, how are you doing today?"  # one segment, longer than TOKENS at 2/char
STANDIN_RATE = 100.0  # stand-in codes per second


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory, tiny_wavlm):
    options = tiny_codec_options(
        ssl_model=str(tiny_wavlm),
        llm_standin_rate=STANDIN_RATE,
        data_dir=str(tmp_path_factory.mktemp("voices")),
        http_port=0,
        metrics_port=0,
        max_streams=3,
        max_text_chars=2000,
        api_keys=[KEY],
    )
    async with running_server(options) as srv:
        yield srv


@pytest.fixture
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest_asyncio.fixture(loop_scope="module")
async def client(base_url):
    """OpenAI's client, closed in this module's loop (left to the garbage collector, its
    connections would be closed in a later module's loop, which logs an error there)."""
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0) as oai:
        yield oai


@pytest.fixture
def ws_url(server) -> str:
    return f"ws://127.0.0.1:{server.http_port}/v1/stream"


AUTH = {"Authorization": f"Bearer {KEY}"}
WRONG_KEY = "not-the-key"


@pytest.fixture(autouse=True)
def keys_never_logged(caplog):
    """After every test: no key, right or wrong, in any line the process logged, at DEBUG,
    whatever logger (aiohttp's own included)."""
    caplog.set_level(logging.DEBUG)
    yield
    for line in server_log_lines(caplog):
        assert KEY not in line and WRONG_KEY not in line, line


# ---- OpenAI's speech API, through OpenAI's own client ------------------------------------------


def decoded_samples(response_format: str, data: bytes) -> tuple[np.ndarray, int]:
    """The file's audio as float32 and its rate."""
    if response_format == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, 24000
    if response_format == "opus":
        return decode_audio(Encoding.OGG_OPUS, RATE, data, []), RATE
    if response_format == "wav":
        # A streaming header: the sizes are unknown (0xFFFFFFFF) when it is written.
        assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
        assert struct.unpack_from("<I", data, 4)[0] == 0xFFFFFFFF
        assert struct.unpack_from("<I", data, 40)[0] == 0xFFFFFFFF
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
    samples = np.concatenate(frames).astype(np.float32)
    if samples.dtype.kind == "i" or np.abs(samples).max() > 2:
        samples = samples / 32768
    return samples, rate


# Lossy encoders add their priming and padding (MP3: up to ~1.4k samples, AAC: 1024 + a frame)
SLACK_SAMPLES = {"mp3": 2400, "aac": 2400}


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
@pytest.mark.parametrize("response_format", ["pcm", "wav", "opus", "mp3", "flac", "aac"])
async def test_openai_client_streams_every_format(client, server, response_format, stream_format):
    events = []
    async with client.audio.speech.with_streaming_response.create(
        model="miotts",
        voice="en_female",
        input=TEXT,
        response_format=response_format,
        stream_format=stream_format,
        extra_body={"max_tokens": TOKENS, "seed": 7},
    ) as response:
        assert response.status_code == 200
        chunks = [chunk async for chunk in response.iter_bytes()]
        content_type = response.headers["content-type"]
    body = b"".join(chunks)
    if stream_format == "sse":
        assert content_type.startswith("text/event-stream")
        for block in body.decode().split("\n\n"):
            if block.strip():
                assert block.startswith("data: ")
                events.append(json.loads(block.removeprefix("data: ")))
        assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
        done = events[-1]
        assert done["type"] == "speech.audio.done"
        assert done["usage"]["output_tokens"] == TOKENS
        assert done["usage"]["total_tokens"] == done["usage"]["input_tokens"] + TOKENS
        data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    else:
        assert content_type.startswith("audio/")
        data = body
    samples, rate = decoded_samples(response_format, data)
    expected = TOKENS * SPT * rate // RATE
    slack = SLACK_SAMPLES.get(response_format, 0)
    assert expected <= len(samples) <= expected + slack, (len(samples), expected)
    assert np.isfinite(samples).all() and np.abs(samples).max() > 0.01  # audio, not silence
    await released(server)


def long_speech(client: openai.AsyncOpenAI, text: str, response_format: str = "pcm", **fields):
    """A streamed speech request of 120 tokens (4.8 s of audio) in a preset voice."""
    return client.audio.speech.with_streaming_response.create(
        model="miotts",
        voice="en_female",
        input=text,
        response_format=response_format,
        extra_body={"max_tokens": 120},
        **fields,
    )


async def test_the_first_bytes_leave_while_the_rest_is_still_generated(client, server):
    """Streaming, not buffering: the first audio reaches the client while the server's session
    is still generating (4.8 s of audio at 100 codes/s takes 1.2 s)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with long_speech(
        client,
        "A longer sentence, so that generating it takes a while before the end.",
    ) as response:
        chunks = response.iter_bytes()
        first = await anext(chunks)
        first_at = loop.time()
        open_at_first_byte = len(server.engine.sessions)
        rest = [chunk async for chunk in chunks]
    last_at = loop.time()
    assert first and rest
    assert open_at_first_byte == 1
    assert len(first + b"".join(rest)) == 120 * SPT * 2
    await released(server)

    # The same request over gRPC, for the figures side by side (printed, not asserted).
    request = tts_pb2.SynthesizeRequest(
        config=tts_pb2.SynthesisConfig(generation=tts_pb2.GenerationOptions(max_tokens=120)),
        text="A longer sentence, so that generating it takes a while before the end.",
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        grpc_started = loop.time()
        grpc_first = None
        call = tts_pb2_grpc.TextToSpeechStub(channel).Synthesize(
            request, metadata=(("authorization", f"Bearer {KEY}"),)
        )
        async for response in call:
            if grpc_first is None and response.WhichOneof("response") == "audio":
                grpc_first = loop.time()
        grpc_last = loop.time()
    print(
        f"\n4.8 s of audio, stand-in at {STANDIN_RATE:g} codes/s: HTTP first byte "
        f"{1000 * (first_at - started):.0f} ms, last {1000 * (last_at - started):.0f} ms; "
        f"gRPC first audio {1000 * (grpc_first - grpc_started):.0f} ms, "
        f"last {1000 * (grpc_last - grpc_started):.0f} ms"
    )
    await released(server)


async def test_a_client_that_goes_away_leaves_nothing_running(client, ws_url, server):
    async with long_speech(
        client,
        "A sentence that will not be heard to its end, because the client leaves.",
    ) as response:
        assert await anext(response.iter_bytes())
    await released(server)  # closed after its first chunk: session and LLM request ended

    async with ws_connect(ws_url) as ws:
        await ws.send(config(generation={"max_tokens": 120}))
        await ws.send(json.dumps({"type": "text", "text": "Gone before the end of it."}))
        await ws.send(json.dumps({"type": "flush"}))
        while not isinstance(await ws.recv(), bytes):
            pass
    await released(server)  # closed without `end` or `cancel`


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
async def test_a_failure_after_the_first_byte(client, server, stream_format):
    """The status has gone out with the first byte: the body is cut off before its final chunk
    (never a short file that looks whole), and SSE sends an error event before the cut."""
    from miotts_stream.service.engine import ErrorCode, SessionError

    async with long_speech(
        client,
        "A sentence that the server will fail halfway, as a drain would.",
        response_format="wav",
        stream_format=stream_format,
    ) as response:
        chunks = response.iter_bytes()
        received = [await anext(chunks)]
        (session,) = server.engine.sessions
        session.fail(SessionError(ErrorCode.UNAVAILABLE, "server: shut down; retry"))
        # The client's HTTP library (httpx, or httpx2 in newer openai) reports it as such.
        with pytest.raises(Exception, match="without sending complete message body"):
            async for chunk in chunks:
                received.append(chunk)
    if stream_format == "sse":
        body = b"".join(received).decode()
        last = json.loads(body.strip().split("\n\n")[-1].removeprefix("data: "))
        assert last["type"] == "error"
        assert last["error"]["code"] == "UNAVAILABLE"
    await released(server)


async def test_health(base_url, server):
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/health") as response:
        assert response.status == 200  # open, like gRPC health
        assert await response.json() == {"status": "SERVING"}


@pytest.mark.parametrize(
    ("fields", "error", "param", "words"),
    [
        ({"voice": "nobody"}, openai.NotFoundError, "voice", "'nobody' is neither a preset"),
        ({"speed": 1.5}, openai.BadRequestError, "speed", "only 1.0"),
        ({"response_format": "ogg"}, openai.BadRequestError, "response_format", "'ogg'"),
        ({"input": "  "}, openai.BadRequestError, "input", "no text"),
        ({"extra_body": {"tempo": 2}}, openai.BadRequestError, "tempo", "unknown field"),
        ({"extra_body": {"sample_rate": 12345}}, openai.BadRequestError, "audio", "12345"),
        ({"extra_body": {"max_tokens": "many"}}, openai.BadRequestError, "max_tokens", "integer"),
        ({"extra_body": {"temperature": 9}}, openai.BadRequestError, "generation", "temperature"),
    ],
)
async def test_openai_errors_name_the_field(client, server, fields, error, param, words):
    request = {"model": "miotts", "voice": "en_female", "input": TEXT, **fields}
    with pytest.raises(error) as caught:
        async with client.audio.speech.with_streaming_response.create(**request) as response:
            await response.read()
    body = caught.value.body
    assert body["param"].startswith(param)
    assert words in body["message"]
    assert body["code"] in ("INVALID_ARGUMENT", "NOT_FOUND")
    await released(server)


async def test_keys_are_required_on_every_route(base_url, ws_url, server):
    wrong = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=WRONG_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        await wrong.audio.speech.create(model="m", voice="en_female", input=TEXT)
    assert caught.value.body["code"] == "UNAUTHENTICATED"
    assert KEY not in str(caught.value.body)
    with pytest.raises(openai.AuthenticationError):
        await wrong.models.list()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base_url}/v1/voices") as response:
            assert response.status == 401
        # The demo page and its script are open: a browser sends no key for them.
        async with http.get(f"{base_url}/") as response:
            assert response.status == 200 and response.content_type == "text/html"
            assert '<script src="/static/demo.js">' in await response.text()
        async with http.get(f"{base_url}/static/demo.js") as response:
            assert response.status == 200
            assert "AudioWorklet" in await response.text()
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url):
            pass
    assert refused.value.response.status_code == 401
    # A browser cannot set headers on a WebSocket: the key as a subprotocol works too, beside
    # miotts.v1 or alone (then no subprotocol is chosen; aiohttp would have logged the key).
    for offered, chosen in (["miotts.v1", f"bearer.{KEY}"], "miotts.v1"), ([f"bearer.{KEY}"], None):
        async with websockets.connect(ws_url, subprotocols=offered) as ws:
            assert ws.subprotocol == chosen  # the key is never echoed back
            await ws.send(json.dumps({"type": "config", "generation": {"max_tokens": 5}}))
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(json.dumps({"type": "cancel"}))
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url, subprotocols=[f"bearer.{WRONG_KEY}"]):
            pass
    assert refused.value.response.status_code == 401
    await released(server)


async def test_models_and_voices_and_cloning_over_http(client, base_url, server):
    models = await client.models.list()
    assert [m.id for m in models.data] == [server.engine.model_name]
    assert models.data[0].model_extra["random_weights"] is True

    clip = encode(voice_like(2.5, 48000, seed=21), 48000, "wav")
    async with aiohttp.ClientSession(headers=AUTH) as http:
        form = aiohttp.FormData()
        form.add_field("voice_id", "http_voice")
        form.add_field("display_name", "Over HTTP")
        form.add_field("audio", clip, filename="me.wav", content_type="audio/wav")
        async with http.post(f"{base_url}/v1/voices", data=form) as response:
            assert response.status == 201, await response.text()
            info = await response.json()
        assert info["name"] == "http_voice" and info["kind"] == "VOICE_KIND_STORED"
        assert info["duration_seconds"] == pytest.approx(2.5, abs=0.01)

        form = aiohttp.FormData()
        form.add_field("voice_id", "http_voice")
        form.add_field("audio", clip, filename="me.wav")
        async with http.post(f"{base_url}/v1/voices", data=form) as response:
            assert response.status == 409
            assert (await response.json())["error"]["code"] == "ALREADY_EXISTS"
        async with http.post(f"{base_url}/v1/voices", json={"voice_id": "x"}) as response:
            assert response.status == 400
            assert "multipart" in (await response.json())["error"]["message"]
        form = aiohttp.FormData()
        form.add_field("voice_id", "Bad Id!")
        form.add_field("audio", clip, filename="me.wav")
        async with http.post(f"{base_url}/v1/voices", data=form) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "voice_id"

        async with http.get(f"{base_url}/v1/voices") as response:
            listing = await response.json()
        names = {v["name"]: v["kind"] for v in listing["voices"]}
        assert names["en_female"] == "VOICE_KIND_PRESET"
        assert names["http_voice"] == "VOICE_KIND_STORED"
        assert listing["random_weights"] is True and listing["sample_rate_hz"] == RATE

        # The stored voice speaks through the OpenAI endpoint, by id.
        speech = await client.audio.speech.create(
            model="miotts",
            voice="http_voice",
            input=TEXT,
            response_format="pcm",
            extra_body={"max_tokens": 10},
        )
        assert len(speech.content) == 10 * SPT * 2

        async with http.get(f"{base_url}/v1/voices/http_voice") as response:
            assert (await response.json())["display_name"] == "Over HTTP"
        async with http.delete(f"{base_url}/v1/voices/en_female") as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "FAILED_PRECONDITION"
        async with http.delete(f"{base_url}/v1/voices/http_voice") as response:
            assert response.status == 200
        async with http.get(f"{base_url}/v1/voices/http_voice") as response:
            assert response.status == 404
        async with http.get(f"{base_url}/v1/nowhere") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "NOT_FOUND"
    await released(server)


async def test_openai_voice_names_are_aliases_of_presets(client, base_url, server):
    """OpenAI's clients accept only OpenAI's voice names: each is an alias of a preset (listed
    with the voices), and speaks exactly as that preset does."""
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(f"{base_url}/v1/voices") as response:
            listing = {v["name"]: v for v in (await response.json())["voices"]}
        async with http.delete(f"{base_url}/v1/voices/alloy") as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "voice_id"
    aliases = {name for name, v in listing.items() if v["kind"] == "VOICE_KIND_ALIAS"}
    assert aliases == set(OPENAI_VOICE_ALIASES)
    assert listing["alloy"]["alias_of"] == "en_female" and listing["onyx"]["alias_of"] == "en_male"
    speech = await client.audio.speech.create(
        model="m", voice="alloy", input=TEXT, response_format="pcm", extra_body={"max_tokens": 8}
    )
    assert len(speech.content) == 8 * SPT * 2

    # The same voice: the same audio for the same tokens (decoded in one window, see speak).
    async def spoken(voice: str) -> bytes:
        request = tts_pb2.SynthesizeRequest(
            config=speak_config(tts_pb2.Voice(preset=voice)), text="Hello there."
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = tts_pb2_grpc.TextToSpeechStub(channel).Synthesize(
                request, metadata=(("authorization", f"Bearer {KEY}"),)
            )
            return b"".join([r.audio.data async for r in call])

    assert await spoken("alloy") == await spoken("en_female") != await spoken("onyx")
    await released(server)


async def test_every_response_names_its_request_and_the_log_line_too(
    client, base_url, ws_url, server, caplog
):
    """x-request-id on every response (audio, errors, lists, unknown routes, the WebSocket
    handshake), the same id in the WebSocket's summary and in the server's log line."""
    caplog.set_level(logging.INFO, logger="miotts_stream.service.admission")
    raw = await client.audio.speech.with_raw_response.create(
        model="m", voice="en_female", input=TEXT, response_format="pcm",
        extra_body={"max_tokens": 4},
    )  # fmt: skip
    speech_id = raw.headers["x-request-id"]
    ids = [speech_id]
    async with aiohttp.ClientSession() as http:
        for path, headers, status in (
            ("/v1/voices", AUTH, 200),
            ("/v1/voices", {}, 401),
            ("/v1/nowhere", AUTH, 404),
            ("/health", {}, 200),
        ):
            async with http.get(f"{base_url}{path}", headers=headers) as response:
                assert response.status == status
                ids.append(response.headers["X-Request-Id"])
    async with ws_connect(ws_url) as ws:
        ids.append(ws.response.headers["X-Request-Id"])
        await ws.send(config(generation={"max_tokens": 4}))
        await ws.send(json.dumps({"type": "text", "text": "Hi."}))
        await ws.send(json.dumps({"type": "end"}))
        summary = (await read_until_closed(ws))[-1]
    assert summary["type"] == "summary" and summary["request_id"] == ids[-1]
    assert len(set(ids)) == len(ids) and all(len(i) == 16 for i in ids)
    await released(server)
    logged = "\n".join(server_log_lines(caplog))
    assert f"request {speech_id} POST /v1/audio/speech: OK key cli-1" in logged
    assert f"request {ids[-1]} WS /v1/stream: OK" in logged
    assert f"request {ids[2]} GET /v1/voices: UNAUTHENTICATED" in logged


async def test_a_cancelled_stream_counts_the_audio_it_sent(ws_url, server):
    """miotts_audio_seconds_total is the audio sent, whether the stream finished or not."""

    async def audio_seconds() -> float:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            for line in (await response.text()).splitlines():
                if line.startswith("miotts_audio_seconds_total "):
                    return float(line.split()[1])
        raise AssertionError("no miotts_audio_seconds_total")

    before = await audio_seconds()
    received = 0
    async with ws_connect(ws_url) as ws:
        await ws.send(config(generation={"max_tokens": 200}))
        await ws.send(json.dumps({"type": "text", "text": "A long sentence to cut short. " * 4}))
        await ws.send(json.dumps({"type": "end"}))
        while received < RATE:  # a second of audio, then barge in
            message = await ws.recv()
            if isinstance(message, bytes):
                received += len(message) // 2
        await ws.send(json.dumps({"type": "cancel"}))
        for message in await read_until_closed(ws):
            if isinstance(message, bytes):
                received += len(message) // 2
    await released(server)
    assert await audio_seconds() - before == pytest.approx(received / RATE, abs=1e-6)


# ---- the WebSocket stream ----------------------------------------------------------------------


def ws_connect(url: str):
    return websockets.connect(url, additional_headers=AUTH, max_size=None)


async def read_until_closed(ws) -> list:
    """Every message until the server closes: JSON as dicts, audio frames as bytes."""
    messages = []
    try:
        async for message in ws:
            messages.append(message if isinstance(message, bytes) else json.loads(message))
    except websockets.ConnectionClosedError:  # closed with an error code: see ws.close_code
        pass
    return messages


def config(**fields) -> str:
    base = {
        "type": "config",
        "voice": {"preset": "en_female"},
        "audio": {"encoding": "PCM_S16LE"},
        "generation": {"max_tokens": 10, "seed": 3},
    }
    return json.dumps({**base, **fields})


async def test_websocket_stream_with_flush_acks(ws_url, server):
    async with ws_connect(ws_url) as ws:
        await ws.send(config())
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready" and ready["sample_rate_hz"] == RATE
        assert ready["random_weights"] is True
        for piece in ["Hel", "lo th", "ere. How a", "re you"]:
            await ws.send(json.dumps({"type": "text", "text": piece}))
        await ws.send(json.dumps({"type": "flush", "id": "first"}))
        before_ack = []
        while True:
            message = await ws.recv()
            if isinstance(message, str) and json.loads(message)["type"] == "flushed":
                assert json.loads(message)["id"] == "first"
                break
            before_ack.append(message if isinstance(message, bytes) else json.loads(message))
        # The ack comes once all audio of the text sent before the flush is out.
        finished = [m for m in before_ack if isinstance(m, dict) and m.get("kind") == "finished"]
        assert [m["text"] for m in finished] == ["Hello there.", "How are you"]
        # A flush with nothing pending is acknowledged at once.
        await ws.send(json.dumps({"type": "flush", "id": 2}))
        assert json.loads(await ws.recv()) == {"type": "flushed", "id": 2}
        await ws.send(json.dumps({"type": "text", "text": " today? Fine."}))
        await ws.send(json.dumps({"type": "flush", "id": 3}))
        await ws.send(json.dumps({"type": "end"}))
        after = await read_until_closed(ws)
        assert ws.close_code == 1000
    messages = before_ack + after
    headers = [m for m in messages if isinstance(m, dict) and m["type"] == "audio"]
    frames = [m for m in messages if isinstance(m, bytes)]
    assert len(headers) == len(frames) > 0
    position = 0
    for i, message in enumerate(messages):  # each header comes right before its frame
        if isinstance(message, dict) and message["type"] == "audio":
            assert len(messages[i + 1]) == message["bytes"] == 2 * message["num_samples"]
            assert message["start_sample"] == position
            position += message["num_samples"]
    acks = [m for m in after if isinstance(m, dict) and m["type"] == "flushed"]
    assert [a["id"] for a in acks] == [3]
    summary = after[-1]
    assert summary["type"] == "summary"
    assert summary["audio_seconds"] * RATE == position == 4 * 10 * SPT  # four segments
    assert summary["encoding"] == "PCM_S16LE" and summary["random_weights"] is True
    await released(server)


async def test_first_audio_earliest_goes_out_from_the_sixth_token(ws_url, server):
    """streaming.first_audio = EARLIEST: the first window is planned from the 6th token, a
    chunk of 4 tokens (2 kept as right context), whatever the timing. By default, with the
    stand-in at 4x real time, it would wait up to 100 ms for up to 12 tokens (a chunk of up to
    8): how long it waits depends on timing, so that side is tested on a simulated clock
    (tests/test_streaming.py)."""
    async with ws_connect(ws_url) as ws:
        streaming = {"first_audio": "FIRST_AUDIO_EARLIEST"}
        await ws.send(config(generation={"max_tokens": 40, "seed": 3}, streaming=streaming))
        await ws.send(json.dumps({"type": "text", "text": TEXT}))
        await ws.send(json.dumps({"type": "end"}))
        frames = [m for m in await read_until_closed(ws) if isinstance(m, bytes)]
        assert ws.close_code == 1000
    assert len(frames[0]) == 2 * 4 * SPT
    await released(server)


async def test_websocket_opus_packets_and_cancel(ws_url, server):
    async with ws_connect(ws_url) as ws:
        await ws.send(config(audio={"encoding": "OPUS"}, generation={"max_tokens": 200}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"type": "text", "text": "A long sentence to cut short. " * 4}))
        await ws.send(json.dumps({"type": "end"}))
        header = None
        while header is None:
            message = json.loads(await ws.recv())
            if message["type"] == "audio":
                header = message
        frame = await ws.recv()
        assert sum(header["packets"]) == len(frame) == header["bytes"]
        await ws.send(json.dumps({"type": "cancel"}))  # barge-in
        rest = await read_until_closed(ws)
        assert ws.close_code == 1000 and ws.close_reason == "cancelled"
        assert not any(isinstance(m, dict) and m["type"] == "summary" for m in rest)
    await released(server)  # the stand-in's request was aborted too


@pytest.mark.parametrize(
    ("messages", "code", "close", "words"),
    [
        (["{not json"], "INVALID_ARGUMENT", 1008, "message: not JSON"),
        ([b"\x00\x01"], "INVALID_ARGUMENT", 1008, "binary frames"),
        (['{"text": "hi"}'], "INVALID_ARGUMENT", 1008, "type: missing"),
        (['{"type": "speak"}'], "INVALID_ARGUMENT", 1008, "'speak'"),
        (['{"type": "text", "text": "hi"}'], "INVALID_ARGUMENT", 1008, "first message"),
        ([config(voicee={})], "INVALID_ARGUMENT", 1008, "voicee"),
        ([config(audio={"sample_rate_hz": 12345})], "INVALID_ARGUMENT", 1008, "sample_rate_hz"),
        ([config(voice={"preset": "nobody"})], "NOT_FOUND", 1008, "voice.preset"),
        ([config(), '{"type": "text", "text": 5}'], "INVALID_ARGUMENT", 1008, "text: must be"),
        ([config(), config()], "INVALID_ARGUMENT", 1008, "config: sent twice"),
        ([config(), '{"type": "end"}'], "INVALID_ARGUMENT", 1008, "no text"),
    ],
)
async def test_websocket_bad_messages(ws_url, server, messages, code, close, words):
    async with ws_connect(ws_url) as ws:
        for message in messages:
            await ws.send(message)
        received = await read_until_closed(ws)
    error = received[-1]
    assert error["type"] == "error" and error["code"] == code
    assert words in error["message"]
    assert ws.close_code == close
    await released(server)
    # The server keeps serving.
    async with ws_connect(ws_url) as ws:
        await ws.send(config(generation={"max_tokens": 4}))
        await ws.send(json.dumps({"type": "text", "text": "Still here."}))
        await ws.send(json.dumps({"type": "end"}))
        assert (await read_until_closed(ws))[-1]["type"] == "summary"
    await released(server)


async def test_http_and_grpc_share_max_streams_and_metrics(ws_url, base_url, client, server):
    """--max-streams 3: two gRPC streams and one WebSocket fill it; then every transport is
    refused with its own form of RESOURCE_EXHAUSTED, and a slot that frees serves again."""
    await released(server)
    metadata = (("authorization", f"Bearer {KEY}"),)
    release = asyncio.Event()

    async def held():
        yield tts_pb2.StreamingSynthesizeRequest(config=tts_pb2.SynthesisConfig())
        await release.wait()
        yield tts_pb2.StreamingSynthesizeRequest(cancel=tts_pb2.Cancel())

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        calls = [stub.StreamingSynthesize(held(), metadata=metadata) for _ in range(2)]
        codes = [asyncio.ensure_future(call.code()) for call in calls]
        async with ws_connect(ws_url) as holder:
            await holder.send(config())
            assert json.loads(await holder.recv())["type"] == "ready"
            for _ in range(200):
                if len(server.engine.sessions) == 3:
                    break
                await asyncio.sleep(0.01)
            assert len(server.engine.sessions) == 3

            with pytest.raises(openai.RateLimitError) as caught:
                await client.audio.speech.create(model="m", voice="en_female", input=TEXT)
            assert "takes at once is 3" in caught.value.body["message"]
            async with ws_connect(ws_url) as ws:
                await ws.send(config())
                refused = await read_until_closed(ws)
            assert refused[-1]["code"] == "RESOURCE_EXHAUSTED"
            assert ws.close_code == 1013  # try again later
            with pytest.raises(grpc.aio.AioRpcError) as grpc_refused:
                await stub.Synthesize(
                    tts_pb2.SynthesizeRequest(config=tts_pb2.SynthesisConfig(), text="Hi."),
                    metadata=metadata,
                ).read()
            assert grpc_refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            await holder.send(json.dumps({"type": "cancel"}))
            await read_until_closed(holder)
        for _ in range(200):
            if len(server.engine.sessions) == 2:
                break
            await asyncio.sleep(0.01)
        speech = await client.audio.speech.create(
            model="m", voice="en_female", input=TEXT, response_format="pcm",
            extra_body={"max_tokens": 5},
        )  # fmt: skip
        assert len(speech.content) == 5 * SPT * 2
        release.set()
        assert [await code for code in codes] == [grpc.StatusCode.OK] * 2
    await released(server)

    # One metrics endpoint counts both transports.
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{server.metrics_port}/metrics") as response,
    ):
        text = await response.text()
    for line in (
        'method="POST /v1/audio/speech"',
        'method="WS /v1/stream"',
        'method="StreamingSynthesize"',
        'code="RESOURCE_EXHAUSTED"',
    ):
        assert line in text
