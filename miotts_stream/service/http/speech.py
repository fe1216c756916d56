"""`POST /v1/audio/speech`, as OpenAI's API has it: one text in, one audio file out, streamed.

`stream_format: "audio"` sends the file as a chunked body whose first bytes leave with the
first decoded chunk; `"sse"` sends it in `speech.audio.delta` events (base64) and ends with
`speech.audio.done` and its usage. Errors before the first byte are OpenAI error objects with
their HTTP status; after it, an SSE stream gets an `error` event and an audio stream is cut
off (no final chunk), so a client never takes a truncated file for a whole one.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import enum
import json
import logging
import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import HttpVersion11, web

from miotts_stream.audio.containers import (
    ContainerFormat,
    StreamingFileEncoder,
    wav_stream_header,
)
from miotts_stream.service.admission import Admission, invalid
from miotts_stream.service.engine import (
    AudioOut,
    ErrorCode,
    Event,
    SessionError,
    Summary,
    SynthesisSession,
)
from miotts_stream.service.pb.miotts.v1 import tts_pb2
from miotts_stream.service.runner import run_session

from .errors import error_object, error_response
from .json_input import check_strings, parse_json
from .request_ids import request_id_of

logger = logging.getLogger(__name__)

METHOD = "POST /v1/audio/speech"


class ResponseFormat(enum.Enum):
    PCM = "pcm"  # raw 16-bit little-endian mono, 24 kHz unless `sample_rate` says otherwise
    WAV = "wav"
    OPUS = "opus"  # Ogg Opus
    MP3 = "mp3"
    FLAC = "flac"
    AAC = "aac"  # ADTS


class StreamFormat(enum.Enum):
    AUDIO = "audio"
    SSE = "sse"


CONTENT_TYPES = {
    ResponseFormat.PCM: "audio/pcm",
    ResponseFormat.WAV: "audio/wav",
    ResponseFormat.OPUS: "audio/ogg",
    ResponseFormat.MP3: "audio/mpeg",
    ResponseFormat.FLAC: "audio/flac",
    ResponseFormat.AAC: "audio/aac",
}
_CONTAINERS = {
    ResponseFormat.MP3: ContainerFormat.MP3,
    ResponseFormat.FLAC: ContainerFormat.FLAC,
    ResponseFormat.AAC: ContainerFormat.AAC,
}
# OpenAI's `pcm` is 24 kHz; the codec's own rate (24 or 44.1 kHz) for the others.
OPENAI_PCM_RATE = 24000

# OpenAI's fields, then this server's extras (the `extra_body` of OpenAI's clients).
OPENAI_FIELDS = ("model", "input", "voice", "instructions", "response_format", "speed")
STREAM_FIELD = "stream_format"
EXTRA_FIELDS = (
    "sample_rate",
    "language",
    "seed",
    "max_tokens",
    "temperature",
    "top_p",
    "repetition_penalty",
)


@dataclass
class SpeechRequest:
    text: str
    response_format: ResponseFormat
    stream_format: StreamFormat
    config: tts_pb2.SynthesisConfig


def _string(body: dict[str, Any], name: str, default: str | None = None) -> str:
    value = body.get(name, default)
    if value is None:
        raise invalid(name, "required")
    if not isinstance(value, str):
        raise invalid(name, f"must be a string, got {type(value).__name__}")
    return value


def _number(body: dict[str, Any], name: str, integer: bool = False) -> float | int | None:
    value = body.get(name)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise invalid(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise invalid(name, "must be finite")
    return value


def _choice(body: dict[str, Any], name: str, kind: type[enum.Enum], default: str) -> Any:
    value = _string(body, name, default)
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise invalid(name, f"{value!r} is not one of {allowed}") from None


def parse_speech_request(body: Any, presets, max_text_chars: int) -> SpeechRequest:
    """The request's JSON body, checked field by field; SessionError naming the field."""
    if not isinstance(body, dict):
        raise SessionError(ErrorCode.INVALID_ARGUMENT, "request body: must be a JSON object")
    check_strings(body)
    unknown = sorted(set(body) - {*OPENAI_FIELDS, STREAM_FIELD, *EXTRA_FIELDS})
    if unknown:
        raise invalid(unknown[0], "unknown field")
    _string(body, "model")  # one model is served: any name is taken (OpenAI's clients need one)
    text = _string(body, "input")
    if not text.strip():
        raise invalid("input", "no text to synthesize")
    if len(text) > max_text_chars:
        raise invalid(
            "input", f"{len(text)} characters exceeds the limit of {max_text_chars} per request"
        )
    _string(body, "instructions", "")  # accepted and ignored: MioTTS takes no style prompt
    voice = body.get("voice")
    voice_field = "voice"
    if isinstance(voice, dict):  # OpenAI's custom voice reference: {"id": ...}
        voice, voice_field = voice.get("id", ""), "voice.id"
    if voice is not None and (not isinstance(voice, str) or not voice):
        raise invalid(voice_field, "must be a preset name or a stored voice id")
    speed = _number(body, "speed")
    if speed is not None and speed != 1.0:
        raise invalid("speed", f"only 1.0 is supported, got {speed}")
    response_format = _choice(body, "response_format", ResponseFormat, "mp3")
    stream_format = _choice(body, STREAM_FIELD, StreamFormat, "audio")

    config = tts_pb2.SynthesisConfig()
    if voice is None:
        pass  # the server's --default-voice (OpenAI requires a voice; this server does not)
    elif voice in presets:
        config.voice.preset = voice
    else:
        config.voice.voice_id = voice
    if response_format is ResponseFormat.OPUS:
        config.audio.encoding = tts_pb2.OGG_OPUS
    else:
        config.audio.encoding = tts_pb2.PCM_S16LE
    rate = _number(body, "sample_rate", integer=True)
    if rate is None and response_format is ResponseFormat.PCM:
        rate = OPENAI_PCM_RATE
    config.audio.sample_rate_hz = rate or 0
    if rate is not None and rate <= 0:
        raise invalid("sample_rate", f"must be a positive rate in Hz, got {rate}")
    config.language = _string(body, "language", "auto")
    generation = config.generation
    for name in ("seed", "max_tokens"):
        value = _number(body, name, integer=True)
        if value is not None:
            if name == "seed" and not -(2**63) <= value < 2**63:
                raise invalid("seed", "must fit in 64 bits")
            if name == "max_tokens" and not 0 < value < 2**31:
                raise invalid("max_tokens", f"must be positive, got {value}")
            setattr(generation, name, value)
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = _number(body, name)
        if value is not None:
            setattr(generation, name, value)
    return SpeechRequest(text, response_format, stream_format, config)


class AudioFile:
    """The response's file, built from the session's audio bytes as they come."""

    def __init__(self, fmt: ResponseFormat, sample_rate: int, pool):
        self.format = fmt
        self._pool = pool
        self._prefix = wav_stream_header(sample_rate) if fmt is ResponseFormat.WAV else b""
        container = _CONTAINERS.get(fmt)
        self._encoder = StreamingFileEncoder(container, sample_rate) if container else None
        self._pending: concurrent.futures.Future | None = None  # the encoder's current call

    async def _run(self, call, *args) -> bytes:
        self._pending = self._pool.submit(call, *args)
        return await asyncio.wrap_future(self._pending)

    async def feed(self, data: bytes) -> bytes:
        if self._encoder is not None:
            return await self._run(self._encoder.encode, data)
        out, self._prefix = self._prefix + data, b""
        return out

    async def finish(self) -> bytes:
        if self._encoder is not None:
            return await self._run(self._encoder.finish)
        out, self._prefix = self._prefix, b""
        return out

    def close(self) -> None:
        encoder = self._encoder
        if encoder is None:
            return
        if self._pending is not None and not self._pending.done():
            # A cancelled stream's last call still runs on the encode thread: close after it.
            self._pending.add_done_callback(lambda _: encoder.close())
        else:
            encoder.close()


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


class SpeechResponse:
    """A session's outcome as the response: the file as a chunked body or as SSE events. The
    response starts with its first bytes, so that an error before them can still be a JSON
    error with its status (`response` is what the handler returns)."""

    def __init__(self, request: web.Request, speech: SpeechRequest, audio: AudioFile):
        self.request = request
        self.speech = speech
        self.audio = audio
        self.response: web.StreamResponse | None = None

    async def _start(self) -> web.StreamResponse:
        if self.response is None:
            sse = self.speech.stream_format is StreamFormat.SSE
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream"
                    if sse
                    else CONTENT_TYPES[self.speech.response_format],
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",  # proxies: pass each chunk on at once
                }
            )
            # No length: HTTP/1.1 gets a chunked body, HTTP/1.0 one that ends with the
            # connection (aiohttp chooses by the request's version).
            await response.prepare(self.request)
            self.response = response
        return self.response

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        response = await self._start()
        if self.speech.stream_format is StreamFormat.SSE:
            delta = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
            await response.write(_sse(delta))
        else:
            await response.write(data)

    async def send(self, event: Event) -> None:
        if isinstance(event, AudioOut):
            await self._write(await self.audio.feed(event.audio.data))
        elif isinstance(event, Summary):
            await self._write(await self.audio.finish())
            await self._done(event)

    async def _done(self, summary: Summary) -> None:
        response = await self._start()
        if self.speech.stream_format is StreamFormat.SSE:
            # Usage as OpenAI reports it; here input tokens are the text's characters and output
            # tokens the speech tokens generated.
            chars = len(self.speech.text)
            usage = {
                "input_tokens": chars,
                "output_tokens": summary.generated_tokens,
                "total_tokens": chars + summary.generated_tokens,
            }
            await response.write(_sse({"type": "speech.audio.done", "usage": usage}))
        await response.write_eof()

    async def fail(self, error: SessionError) -> None:
        if self.response is None:
            self.response = error_response(error)
            return
        if self.speech.stream_format is StreamFormat.SSE:
            with contextlib.suppress(ConnectionError):
                await self.response.write(_sse({"type": "error", **error_object(error)}))
        # Both formats end without the body's terminating chunk, so the client's HTTP library
        # reports a cut body: an SSE client that ignores `error` events (LiveKit's OpenAI TTS
        # does) cannot take the audio so far for the whole of it either.
        if self.request.transport is not None:
            self.request.transport.close()


async def handle_speech(request: web.Request, admission: Admission) -> web.StreamResponse:
    key = None
    request_id = request_id_of(request)
    try:
        key = admission.authenticate(request.headers.get("Authorization"))
        body = parse_json(await request.read(), "request body")
        engine = admission.engine
        speech = parse_speech_request(body, engine.voices, engine.max_text_chars)
        if request.version < HttpVersion11 and speech.stream_format is StreamFormat.AUDIO:
            # HTTP/1.0 has no chunks: its body ends with the connection, and a stream cut off
            # by an error would look whole. SSE says so in its events; audio cannot.
            err = SessionError(
                ErrorCode.UNIMPLEMENTED,
                "stream_format: audio streams need HTTP/1.1 (a chunked body, so that a stream "
                "cut off shows); use HTTP/1.1, or stream_format sse",
                "stream_format",
            )
            admission.record(METHOD, err.code, key, request_id, f": {err}")
            return error_response(err, HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
        try:
            session = await admission.open(speech.config, key, request_id)
        except SessionError as err:
            if err.code is ErrorCode.NOT_FOUND and speech.config.voice.voice_id:
                known = ", ".join(engine.voices.names())
                raise SessionError(
                    ErrorCode.NOT_FOUND,
                    f"voice: {speech.config.voice.voice_id!r} is neither a preset ({known}) "
                    "nor a stored voice (GET /v1/voices lists them)",
                    "voice",
                ) from None
            raise
    except SessionError as err:
        admission.record(METHOD, err.code, key, request_id, f": {err}")
        return error_response(err)
    try:
        session.push_text(speech.text)
        session.end_input()
    except SessionError as err:
        session.fail(err)
    return await _stream(request, admission, session, speech, key)


async def _stream(
    request: web.Request,
    admission: Admission,
    session: SynthesisSession,
    speech: SpeechRequest,
    key,
) -> web.StreamResponse:
    audio = AudioFile(
        speech.response_format, session.encoder.out_rate, admission.engine.encode_pool
    )
    out = SpeechResponse(request, speech, audio)
    try:
        await run_session(admission, session, out, method=METHOD, key=key)
    finally:
        audio.close()
    if out.response is None:  # neither a summary nor an error: never expected
        logger.error("session %s ended without a summary", session.id)
        return error_response(SessionError(ErrorCode.INTERNAL, "internal error"))
    return out.response
