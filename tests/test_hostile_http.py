"""Hostile traffic on the HTTP port, as tests/test_hostile.py does for gRPC: a bad-request matrix
(each case with its status and the field named), decompression bombs on every way into voice
cloning (memory bounded), slow and idle clients over raw sockets (closed within their time
limits), the connection cap, and keys never in the log. One real server on loopback (in-process
stand-in LLM, tiny codec, tiny random WavLM, keys on); after every case a normal request must
still be served and nothing may be left open."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio
import websockets

from miotts_stream.bench.hostile import flac_bomb, wav_header
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc

from .audio_files import encode, voice_like
from .servers import released, running_server, server_log_lines, tiny_codec_options

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "hostile-http-key-0123456789"
WRONG_KEY = "hostile-wrong-key-9876543210"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEAD_S, BODY_S, KEEPALIVE_S = 1.0, 1.5, 1.5  # this server's HTTP time limits
MAX_CONNECTIONS = 12
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Closed no earlier than the limit (timers may fire a hair early) and well before twice it.
EARLY_S, LATE_S = 0.05, 1.0
MB = 1024 * 1024


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory, tiny_wavlm):
    options = tiny_codec_options(
        ssl_model=str(tiny_wavlm),
        llm_standin_rate=100.0,
        data_dir=str(tmp_path_factory.mktemp("voices")),
        http_port=0,
        max_streams=4,
        max_text_chars=2000,
        api_keys=(KEY,),
        max_receive_message_bytes=MAX_REQUEST_BYTES,
        http_head_timeout_s=HEAD_S,
        http_body_timeout_s=BODY_S,
        http_keepalive_timeout_s=KEEPALIVE_S,
        http_max_connections=MAX_CONNECTIONS,
    )
    async with running_server(options) as srv:
        yield srv


@pytest.fixture(autouse=True)
def keys_never_logged(caplog):
    """After every case: neither key in any line the server logged (at DEBUG), and nothing at
    ERROR: a hostile client is not the server's failure."""
    caplog.set_level(logging.DEBUG)
    yield
    for line in server_log_lines(caplog):
        assert KEY not in line and WRONG_KEY not in line, line
        assert " ERROR " not in line and " CRITICAL " not in line, line


def url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.http_port}{path}"


async def serves_normally(server) -> None:
    """A normal speech request is served in full, and nothing is left open after it."""
    await released(server)
    body = {"model": "m", "input": "Still here.", "response_format": "pcm", "max_tokens": 10}
    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.post(url(server, "/v1/audio/speech"), json=body) as response,
    ):
        assert response.status == 200, await response.text()
        assert len(await response.read()) == 10 * 960 * 2
    await released(server)


# ---- the bad-request matrix --------------------------------------------------------------------


def speech(**fields) -> bytes:
    body = {"model": "m", "input": "Hi there.", "max_tokens": 5} | fields
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as \udc00


def voice_form(voice_id: str, audio: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("voice_id", voice_id)
    form.add_field("audio", audio, filename="clip", content_type="application/octet-stream")
    return form


BOMB_600 = flac_bomb(600, 384000)  # 50 KB declaring 600 s
BOMB_1800_HIDDEN = flac_bomb(1800, 384000, declare=False)  # 150 KB, length not declared
CLIP = encode(voice_like(2.0, 24000), 24000)

# (id, method, path, body (bytes: JSON; FormData: multipart), status, error code, param,
#  fragment of the message)
CASES = [
    ("not-json", "POST", "/v1/audio/speech", b"{not json", 400, "INVALID_ARGUMENT", None,
     "request body: not JSON"),
    ("not-utf8", "POST", "/v1/audio/speech", b'{"input": "\xff\xfe"}', 400, "INVALID_ARGUMENT",
     None, "request body: not JSON"),
    ("array", "POST", "/v1/audio/speech", b"[1, 2]", 400, "INVALID_ARGUMENT", None,
     "must be a JSON object"),
    ("unknown-field", "POST", "/v1/audio/speech", speech(pitch=2), 400, "INVALID_ARGUMENT",
     "pitch", "pitch: unknown field"),
    ("surrogate-voice", "POST", "/v1/audio/speech", speech(voice="\udc00"), 400,
     "INVALID_ARGUMENT", "voice", "voice: not valid Unicode"),
    ("surrogate-voice-id", "POST", "/v1/audio/speech", speech(voice={"id": "\udc00"}), 400,
     "INVALID_ARGUMENT", "voice.id", "voice.id: not valid Unicode"),
    ("surrogate-language", "POST", "/v1/audio/speech", speech(language="e\udc00"), 400,
     "INVALID_ARGUMENT", "language", "language: not valid Unicode"),
    ("surrogate-input", "POST", "/v1/audio/speech", speech(input="Hi \ud800 there."), 400,
     "INVALID_ARGUMENT", "input", "input: not valid Unicode"),
    ("surrogate-key", "POST", "/v1/audio/speech", b'{"\\udc00": 1}', 400, "INVALID_ARGUMENT",
     "request", "field name is not valid Unicode"),
    ("input-too-long", "POST", "/v1/audio/speech", speech(input="a" * 2001), 400,
     "INVALID_ARGUMENT", "input", "input: 2001 characters exceeds the limit of 2000"),
    ("voice-object-no-id", "POST", "/v1/audio/speech", speech(voice={"name": "x"}), 400,
     "INVALID_ARGUMENT", "voice.id", "voice.id: must be a preset name"),
    ("unknown-voice", "POST", "/v1/audio/speech", speech(voice="nobody"), 404, "NOT_FOUND",
     "voice", "voice: 'nobody' is neither a preset"),
    ("temperature", "POST", "/v1/audio/speech", speech(temperature=9), 400, "INVALID_ARGUMENT",
     "generation.temperature", "generation.temperature must be in [0, 2]"),
    ("speech-over-limit", "POST", "/v1/audio/speech", speech(input="a" * (5 * MB)), 413,
     "RESOURCE_EXHAUSTED", None, f"larger than the limit of {MAX_REQUEST_BYTES} bytes"),
    ("voice-id-newline", "POST", "/v1/voices", ("nl2667\n", CLIP), 400, "INVALID_ARGUMENT",
     "voice_id", "voice_id: 'nl2667\\n' is not a valid id"),
    ("voice-over-limit", "POST", "/v1/voices", ("big", bytes(5 * MB)), 413,
     "RESOURCE_EXHAUSTED", None, f"larger than the limit of {MAX_REQUEST_BYTES} bytes"),
    ("voice-bomb-declared", "POST", "/v1/voices", ("bomb", BOMB_600), 400, "INVALID_ARGUMENT",
     "audio", "audio: 600.00 s (as the file declares) is too long"),
    ("voice-bomb-hidden", "POST", "/v1/voices", ("bomb", BOMB_1800_HIDDEN), 400,
     "INVALID_ARGUMENT", "audio", "audio: more than 30 s is too long"),
    ("voice-1-mhz", "POST", "/v1/voices", ("rate", wav_header(1_000_000, 1, bytes(4000))), 400,
     "INVALID_ARGUMENT", "audio", "1000000 Hz is not accepted"),
    ("voice-64-channels", "POST", "/v1/voices", ("chan", wav_header(48000, 64, bytes(12800))),
     400, "INVALID_ARGUMENT", "audio", "64 channels is not accepted"),
    ("voice-garbage", "POST", "/v1/voices", ("junk", b"\x00garbage" * 100), 400,
     "INVALID_ARGUMENT", "audio", "audio: cannot decode it"),
    ("get-voice-surrogate", "GET", "/v1/voices/%ED%B2%80", None, 400, "INVALID_ARGUMENT",
     "voice_id", "is not a valid id"),
    ("delete-voice-newline", "DELETE", "/v1/voices/x%0A", None, 400, "INVALID_ARGUMENT",
     "voice_id", "is not a valid id"),
    ("get-voice-unknown", "GET", "/v1/voices/nobody", None, 404, "NOT_FOUND", "voice_id",
     "no stored voice 'nobody'"),
    ("no-route", "GET", "/v1/nothing", None, 404, "NOT_FOUND", None, "GET /v1/nothing"),
    ("wrong-method", "PUT", "/v1/audio/speech", b"{}", 405, "UNIMPLEMENTED", None,
     "PUT /v1/audio/speech"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "param", "message"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_bad_request_matrix(server, method, path, body, status, code, param, message):
    data = voice_form(*body) if isinstance(body, tuple) else body
    headers = AUTH if isinstance(body, tuple) else {**AUTH, "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url(server, path), data=data, headers=headers) as response,
    ):
        assert response.status == status, (await response.read())[:200]
        error = (await response.json())["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert message in error["message"], error
    await serves_normally(server)


async def test_a_bomb_on_every_way_into_cloning_is_refused_in_bounded_memory(server):
    """HTTP's POST /v1/voices, the WebSocket's voice.reference_audio, gRPC's CreateVoice and
    Voice.reference_audio: a FLAC declaring nothing and holding 1800 s at 384 kHz (as decoded
    whole before: +4.4 GB) is refused, and the server's resident memory rises by less than
    100 MB over all four (the limits imply 2.9 MB of audio at the codec's rate; measured
    here: a few MB to a few tens of MB, the allocator's and the decoder's own)."""
    status = Path("/proc/self/status")

    def rss_mb(name: str) -> float:
        return int(re.search(rf"{name}:\s+(\d+) kB", status.read_text()).group(1)) / 1024

    # Load the speaker encoder first: its weights are not the bomb's doing.
    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.post(url(server, "/v1/voices"), data=voice_form("warm", CLIP)) as r,
    ):
        assert r.status == 201, await r.text()
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_mb("VmRSS")

    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.post(url(server, "/v1/voices"), data=voice_form("bomb", BOMB_1800_HIDDEN)) as r,
    ):
        assert r.status == 400 and "more than 30 s" in (await r.json())["error"]["message"]

    ws_url = f"ws://127.0.0.1:{server.http_port}/v1/stream"
    audio = base64.b64encode(BOMB_1800_HIDDEN).decode()
    async with websockets.connect(ws_url, additional_headers=AUTH, max_size=None) as ws:
        await ws.send(json.dumps({"type": "config", "voice": {"reference_audio": audio}}))
        error = json.loads(await ws.recv())
        assert error["field"] == "voice.reference_audio", error
        assert "more than 30 s is too long" in error["message"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 1008

    metadata = (("authorization", f"Bearer {KEY}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateVoice(
                tts_pb2.CreateVoiceRequest(voice_id="bomb", audio=BOMB_1800_HIDDEN),
                metadata=metadata,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "audio: more than 30 s is too long" in caught.value.details()
        config = tts_pb2.SynthesisConfig(voice=tts_pb2.Voice(reference_audio=BOMB_1800_HIDDEN))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Synthesize(
                tts_pb2.SynthesizeRequest(config=config, text="Hi."), metadata=metadata
            ):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "voice.reference_audio: more than 30 s" in caught.value.details()

    rise = rss_mb("VmHWM") - before
    print(f"peak RSS rise over four 1800 s bombs: {rise:.1f} MB")
    assert rise < 100, f"the bombs raised the server's memory by {rise:.0f} MB"
    await serves_normally(server)


# ---- requests aiohttp cannot parse ------------------------------------------------------------

RAW_CASES = [
    ("bad-header", b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n"),
    ("space-in-name", b"GET /health HTTP/1.1\r\nHo st: x\r\n\r\n"),
    ("line-too-long", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("header-too-long", b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"),
    ("bad-method", b"G\x00T /health HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("second-request-garbage", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
     + b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 4),
    ("negative-length", b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: -1\r\n\r\n"),
    ("length-and-chunked", b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("bad-chunk-size", f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
     f"{KEY}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n".encode()),
]  # fmt: skip


@pytest.mark.parametrize("request_bytes", [c[1] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
async def test_requests_aiohttp_cannot_parse_get_a_4xx_and_no_error_log(server, request_bytes):
    """aiohttp answers these itself (400, or 414 / 431 for sizes), before any handler; it logged
    most of them at ERROR with a traceback, which the server's log turns into one DEBUG line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    writer.write(request_bytes)
    await writer.drain()
    answer = b""
    with contextlib.suppress(ConnectionError):
        answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    statuses = [int(m) for m in re.findall(rb"HTTP/1.[01] (\d{3}) ", answer)]
    assert statuses and 400 <= statuses[-1] < 500, answer[:200]
    await serves_normally(server)


# ---- HTTP/1.0 ----------------------------------------------------------------------------------


async def raw_exchange(server, request: bytes, timeout: float = 30) -> tuple[int, bytes, bytes]:
    """Send raw bytes, read to the end: (status, head, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


def http10(body: bytes, path: str = "/v1/audio/speech") -> bytes:
    return (
        f"POST {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_http10_gets_sse_it_can_read_and_a_clear_505_for_audio(server):
    """HTTP/1.0 has no chunked encoding (it used to be a 500 with a traceback): SSE comes as a
    body that ends with the connection, its errors in its events; an audio stream, whose
    cut-off could not be told from its end, is refused with 505 naming stream_format."""
    status, head, body = await raw_exchange(server, http10(speech(stream_format="sse")))
    assert status == 200 and b"chunked" not in head.lower()
    events = [json.loads(line[6:]) for line in body.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1]["type"] == "speech.audio.done" and len(events) > 1
    status, _, body = await raw_exchange(server, http10(speech()))
    assert status == 505
    error = json.loads(body)["error"]
    assert error["param"] == "stream_format" and "HTTP/1.1" in error["message"]
    status, _, body = await raw_exchange(server, b"GET /health HTTP/1.0\r\n\r\n")
    assert status == 200 and json.loads(body) == {"status": "SERVING"}
    await serves_normally(server)


# ---- WebSocket ---------------------------------------------------------------------------------

WS_CASES = [
    ("surrogate-text", [{"type": "config"}, {"type": "text", "text": "a \udc00 b."}], "text",
     "text: not valid Unicode"),
    ("surrogate-preset", [{"type": "config", "voice": {"preset": "\udc00"}}], "voice.preset",
     "voice.preset: not valid Unicode"),
    ("surrogate-type", [{"type": "\ud800"}], "type", "type: not valid Unicode"),
    ("unknown-preset", [{"type": "config", "voice": {"preset": "nobody"}}], "voice.preset",
     "unknown preset 'nobody'"),
    ("bad-voice-id", [{"type": "config", "voice": {"voice_id": "x\n"}}], "voice.voice_id",
     "is neither a preset, an alias nor a stored voice"),
    ("bomb-declared", [{"type": "config",
                        "voice": {"reference_audio": base64.b64encode(BOMB_600).decode()}}],
     "voice.reference_audio", "600.00 s (as the file declares) is too long"),
    ("second-config", [{"type": "config"}, {"type": "config"}], "config", "config: sent twice"),
]  # fmt: skip


@pytest.mark.parametrize(("messages", "field", "message"), [c[1:] for c in WS_CASES],
                         ids=[c[0] for c in WS_CASES])  # fmt: skip
async def test_websocket_bad_message_matrix(server, messages, field, message):
    ws_url = f"ws://127.0.0.1:{server.http_port}/v1/stream"
    async with websockets.connect(ws_url, additional_headers=AUTH) as ws:
        for m in messages:
            await ws.send(json.dumps(m))
        error = None
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if event["type"] == "error":
                    error = event
    assert error is not None and error.get("field") == field, error
    assert message in error["message"], error
    assert closed.value.rcvd.code in (1008, 1013), closed.value.rcvd
    await serves_normally(server)


# ---- slow and idle clients ---------------------------------------------------------------------


async def open_raw(server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    return reader, writer, time.monotonic()


async def closed_at(reader: asyncio.StreamReader, since: float, limit_s: float) -> float:
    """Read to the end (the server closes; a reset counts too); seconds since `since`. Waits
    at most twice the limit and a bit."""
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(reader.read(), 2 * limit_s + 5)
    return time.monotonic() - since


def within(elapsed: float, limit_s: float) -> bool:
    return limit_s - EARLY_S <= elapsed <= limit_s + LATE_S


async def drip(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    """A slow client: one byte, then a pause, for as long as there are bytes."""
    for byte in data:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(every_s)


HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
POST_HEAD = (
    f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
).encode()


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(server):
    reader, writer, opened = await open_raw(server)
    elapsed = await closed_at(reader, opened, HEAD_S)
    writer.close()
    assert within(elapsed, HEAD_S), elapsed
    await serves_normally(server)


async def test_a_head_sent_a_byte_at_a_time_is_cut_off_after_the_head_timeout(server):
    """Slowloris: a byte every 0.1 s would finish this head after 3 s; the head may take
    HEAD_S from the connection's start."""
    reader, writer, opened = await open_raw(server)
    dripping = asyncio.ensure_future(drip(writer, HEAD[:-2] + b"X-Pad: " + b"a" * 40, 0.1))
    elapsed = await closed_at(reader, opened, HEAD_S)
    dripping.cancel()
    writer.close()
    assert within(elapsed, HEAD_S), elapsed
    await serves_normally(server)


async def test_a_head_in_a_few_pieces_within_the_limit_is_served(server):
    reader, writer, _ = await open_raw(server)
    for piece in (HEAD[:10], HEAD[10:20], HEAD[20:]):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(HEAD_S / 5)
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()


@pytest.mark.parametrize("every_s", [None, 0.1], ids=["stalled", "trickling"])
async def test_a_body_that_stalls_or_trickles_is_cut_off_after_the_body_timeout(server, every_s):
    """Content-Length 1000: 20 bytes and then nothing, or a byte every 0.1 s (100 s in all)."""
    reader, writer, _ = await open_raw(server)
    writer.write(POST_HEAD + b'{"input": "a' + b"a" * 8)
    await writer.drain()
    head_sent = time.monotonic()
    dripping = asyncio.ensure_future(drip(writer, b"a" * 980, every_s)) if every_s else None
    elapsed = await closed_at(reader, head_sent, BODY_S)
    if dripping is not None:
        dripping.cancel()
    writer.close()
    assert within(elapsed, BODY_S), elapsed
    await serves_normally(server)


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(server):
    reader, writer, _ = await open_raw(server)
    writer.write(HEAD)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    await reader.readexactly(length)
    answered = time.monotonic()
    elapsed = await closed_at(reader, answered, KEEPALIVE_S)
    writer.close()
    assert within(elapsed, KEEPALIVE_S), elapsed
    await serves_normally(server)


async def test_streams_longer_than_every_connection_limit_are_not_cut(server):
    """The limits are for waiting on the client: a response that streams for longer than any of
    them, and a WebSocket that pauses longer between messages, go on."""
    longest = max(HEAD_S, BODY_S, KEEPALIVE_S)
    tokens = int((longest + 1.0) * 100)  # the stand-in writes 100 a second
    body = {"model": "m", "input": "A longer one. " * 10, "response_format": "pcm",
            "stream_format": "sse", "max_tokens": tokens}  # fmt: skip
    started = time.monotonic()
    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.post(url(server, "/v1/audio/speech"), json=body) as response,
    ):
        assert response.status == 200
        text = await response.text()
    assert time.monotonic() - started > longest
    assert '"type":"speech.audio.done"' in text
    ws_url = f"ws://127.0.0.1:{server.http_port}/v1/stream"
    async with websockets.connect(ws_url, additional_headers=AUTH) as ws:
        await ws.send(json.dumps({"type": "config", "generation": {"max_tokens": 5}}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await asyncio.sleep(longest + 0.5)  # the pause under test, not a synchronisation
        await ws.send(json.dumps({"type": "text", "text": "Now."}))
        await ws.send(json.dumps({"type": "end"}))
        kinds = []
        async for message in ws:
            if isinstance(message, str):
                kinds.append(json.loads(message)["type"])
        assert kinds[-1] == "summary"
    await serves_normally(server)


async def test_connections_over_the_cap_are_answered_503_at_once(server):
    """MAX_CONNECTIONS idle sockets are taken; the next gets a 503 and is closed; once one
    goes, a new connection is served."""
    held = [await asyncio.open_connection("127.0.0.1", server.http_port)
            for _ in range(MAX_CONNECTIONS)]  # fmt: skip
    reader, writer, opened = await open_raw(server)
    refused = await asyncio.wait_for(reader.read(), 5)
    assert time.monotonic() - opened < HEAD_S  # not the head timeout: refused at once
    assert refused.startswith(b"HTTP/1.1 503 Service Unavailable")
    error = json.loads(refused.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "UNAVAILABLE" and "--http-max-connections" in error["message"]
    writer.close()
    held[0][1].close()
    await held[0][1].wait_closed()
    for _ in range(100):  # the server sees the close: bounded wait on the count
        if server.metrics.http_connections._value.get() < MAX_CONNECTIONS:
            break
        await asyncio.sleep(0.01)
    status, _, _ = await raw_exchange(server, b"GET /health HTTP/1.0\r\n\r\n")
    assert status == 200
    for _, w in held[1:]:
        w.close()
    closed = server.metrics.registry.get_sample_value(
        "miotts_http_connections_closed_total", {"reason": "max_connections"}
    )
    assert closed >= 1
    await serves_normally(server)


async def test_a_wrong_key_is_refused_and_never_logged(server):
    ws_url = f"ws://127.0.0.1:{server.http_port}/v1/stream"
    for headers, subprotocols in (({"Authorization": f"Bearer {WRONG_KEY}"}, None),
                                  ({}, [f"bearer.{WRONG_KEY}"])):  # fmt: skip
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(
                ws_url, additional_headers=headers, subprotocols=subprotocols
            ):
                pass
        assert refused.value.response.status_code == 401
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url(server, "/v1/audio/speech"),
            data=speech(),
            headers={"Authorization": f"Bearer {WRONG_KEY}"},
        ) as response,
    ):
        assert response.status == 401
        assert WRONG_KEY not in await response.text()
    await serves_normally(server)
