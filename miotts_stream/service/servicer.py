"""gRPC transport for the speech engine: `miotts.v1.TextToSpeech`.

Maps protobuf messages to engine sessions and back, and every request problem to a gRPC status
whose message names the field. The engine itself knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from miotts_stream.audio.encoders import Encoding, output_rate
from miotts_stream.codec.streaming import StreamingOptions
from miotts_stream.codec.voices import BUILTIN_PRESETS_DIR
from miotts_stream.llm import SamplingOptions
from miotts_stream.voices import VoiceExists, VoiceNotFound, VoiceRecord, VoiceStoreUnavailable
from miotts_stream.voices.registry import EncoderUnavailable, PresetVoice, VoiceRegistry

from .access import UNAUTHENTICATED_MESSAGE, AccessPolicy, ApiKey
from .engine import (
    LANGUAGES,
    AudioOut,
    ErrorCode,
    Event,
    SegmentFinished,
    SegmentStarted,
    SessionConfig,
    SessionError,
    SpeechEngine,
    Summary,
    SynthesisSession,
)
from .metrics import ServiceMetrics
from .pb.miotts.v1 import tts_pb2, tts_pb2_grpc

logger = logging.getLogger(__name__)

_PROTO_ENCODINGS = {
    tts_pb2.ENCODING_UNSPECIFIED: Encoding.PCM_S16LE,
    tts_pb2.PCM_S16LE: Encoding.PCM_S16LE,
    tts_pb2.PCM_F32LE: Encoding.PCM_F32LE,
    tts_pb2.OPUS: Encoding.OPUS,
    tts_pb2.OGG_OPUS: Encoding.OGG_OPUS,
    tts_pb2.MULAW: Encoding.MULAW,
    tts_pb2.ALAW: Encoding.ALAW,
}
_ENCODING_TO_PROTO = {
    v: k for k, v in _PROTO_ENCODINGS.items() if k != tts_pb2.ENCODING_UNSPECIFIED
}


# Upper bound of each window field: windows of all streams share one padded forward, so one
# client's huge windows would slow every other stream down.
MAX_WINDOW_FIELD_TOKENS = 250


GRPC_STATUS = {code: getattr(grpc.StatusCode, code.value) for code in ErrorCode}

# Before ending a stream with an error, read (and drop) what the client is still sending, for up
# to this long or until it half-closes. grpcio's asyncio client reports INTERNAL "Internal error
# from Core" instead of our status when one of its writes lands after the status arrived
# (grpc/grpc#36066); messages it had already queued are written within milliseconds.
ERROR_DRAIN_S = 0.25


# How long a failed session's handler may stay blocked on one response before it is stopped.
BLOCKED_WRITE_GRACE_S = 1.0


async def _drain(requests) -> None:
    async def consume() -> None:
        async for _ in requests:
            pass

    with contextlib.suppress(Exception):  # includes TimeoutError
        await asyncio.wait_for(consume(), ERROR_DRAIN_S)


def _invalid(message: str) -> SessionError:
    return SessionError(ErrorCode.INVALID_ARGUMENT, message)


# ---- requests that do not parse -----------------------------------------------------------
#
# grpcio runs the request deserializer inside its own machinery: if it raises (protobuf refuses
# a `string` field that is not valid UTF-8), a unary call ends with UNKNOWN and a streaming call
# hangs. So the deserializers below never raise: they hand the servicer an `Undecodable` that
# names the field, and the servicer answers INVALID_ARGUMENT like for any other bad field.


@dataclass
class Undecodable:
    """A request message that did not parse; `message` names the field and the problem."""

    message: str


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def find_bad_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The dotted name of the first `string` field in `data` that is not valid UTF-8 (searching
    nested messages), "<message>" if the bytes are not protobuf at all, None if neither."""
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
                continue
            if wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                continue
            if wire_type != 2:
                return prefix.rstrip(".") or "<message>"
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
            if pos > len(data):
                return prefix.rstrip(".") or "<message>"
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    return prefix + field.name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                bad = find_bad_field(field.message_type, value, f"{prefix}{field.name}.")
                if bad is not None:
                    return bad
    except DecodeError:
        return prefix.rstrip(".") or "<message>"
    return None


def tolerant_deserializer(message_type):
    """`message_type.FromString`, returning an `Undecodable` instead of raising."""

    def deserialize(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError:
            bad = find_bad_field(message_type.DESCRIPTOR, data)
            if bad is None or bad == "<message>":
                return Undecodable("request: not a valid protobuf message")
            return Undecodable(f"{bad}: not valid UTF-8")

    return deserialize


# grpcio's handler factory for each (client streaming, server streaming) kind of method.
_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer: TextToSpeechServicer, server: grpc.aio.Server) -> None:
    """Register the service like the generated `add_TextToSpeechServicer_to_server`, with
    deserializers that report bad requests to the servicer instead of failing inside grpcio.

    The handlers are made from the service's descriptor, so every RPC in the proto is served.
    """
    service = tts_pb2.DESCRIPTOR.services_by_name["TextToSpeech"]
    handlers = {}
    for method in service.methods:
        factory = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        request_type = getattr(tts_pb2, method.input_type.name)
        response_type = getattr(tts_pb2, method.output_type.name)
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=tolerant_deserializer(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


_STORE_DOWN = "the voice store is unreachable now; retry later"


class TextToSpeechServicer(tts_pb2_grpc.TextToSpeechServicer):
    def __init__(
        self,
        engine: SpeechEngine,
        metrics: ServiceMetrics,
        default_voice: str,
        voices: VoiceRegistry | None = None,
        access: AccessPolicy | None = None,
    ):
        self.engine = engine
        self.metrics = metrics
        self.default_voice = default_voice
        self.voices = voices  # stored voices and cloning; None: presets and embeddings only
        self.access = access or AccessPolicy()
        self.draining = False  # set on shutdown: new streams are refused, open ones finish
        self._streams_by_key: Counter[str] = Counter()

    # ---- config --------------------------------------------------------------------------
    def session_config(self, config: tts_pb2.SynthesisConfig) -> SessionConfig:
        engine = self.engine
        which = config.voice.WhichOneof("voice")
        if which == "embedding":
            try:
                voice = engine.decoder.validate_embedding(
                    list(config.voice.embedding.values), "voice.embedding.values"
                )
            except ValueError as err:
                raise _invalid(str(err)) from None
        else:
            name = config.voice.preset if which == "preset" else self.default_voice
            if name not in engine.voices:
                known = ", ".join(engine.voices.names())
                raise SessionError(
                    ErrorCode.NOT_FOUND, f"voice.preset: unknown preset {name!r} (known: {known})"
                )
            voice = engine.voices.get(name)

        if config.audio.encoding not in _PROTO_ENCODINGS:
            raise _invalid(f"audio.encoding: unknown encoding {config.audio.encoding}")
        encoding = _PROTO_ENCODINGS[config.audio.encoding]
        if config.audio.sample_rate_hz < 0:
            raise _invalid("audio.sample_rate_hz: must be 0 (codec rate) or a positive rate")
        try:
            output_rate(encoding, config.audio.sample_rate_hz, engine.decoder.sample_rate)
        except ValueError as err:
            raise _invalid(str(err)) from None

        gen = config.generation
        defaults = SamplingOptions()
        sampling = SamplingOptions(
            temperature=gen.temperature if gen.HasField("temperature") else defaults.temperature,
            top_p=gen.top_p if gen.HasField("top_p") else defaults.top_p,
            repetition_penalty=(
                gen.repetition_penalty
                if gen.HasField("repetition_penalty")
                else defaults.repetition_penalty
            ),
            max_tokens=gen.max_tokens if gen.HasField("max_tokens") else defaults.max_tokens,
            seed=gen.seed if gen.HasField("seed") else None,
        )
        try:
            sampling.validate()
        except ValueError as err:
            raise _invalid(f"generation.{err}") from None

        base = StreamingOptions()
        fields = {}
        for name in (
            "first_chunk_tokens",
            "chunk_tokens",
            "lookahead_tokens",
            "left_context_tokens",
        ):
            value = getattr(config.streaming, name)
            if not 0 <= value <= MAX_WINDOW_FIELD_TOKENS:
                raise _invalid(
                    f"streaming.{name}: must be between 0 (the default) and "
                    f"{MAX_WINDOW_FIELD_TOKENS} tokens, got {value}"
                )
            fields[name] = value or getattr(base, name)
        if fields["lookahead_tokens"] < base.first_lookahead_tokens:
            fields["first_lookahead_tokens"] = fields["lookahead_tokens"]
        try:
            streaming = StreamingOptions(**fields).validated()
        except ValueError as err:
            raise _invalid(str(err).replace("streaming options: ", "streaming.")) from None

        language = config.language or "auto"
        if language not in LANGUAGES:
            raise _invalid(f"language: {language!r} is not one of {', '.join(LANGUAGES)}")
        return SessionConfig(
            voice, encoding, config.audio.sample_rate_hz, sampling, streaming, language
        )

    # ---- events --------------------------------------------------------------------------
    @staticmethod
    def to_proto(event: Event) -> tts_pb2.StreamingSynthesizeResponse:
        if isinstance(event, AudioOut):
            return tts_pb2.StreamingSynthesizeResponse(
                audio=tts_pb2.AudioChunk(
                    data=event.audio.data,
                    opus_packets=event.audio.packets,
                    start_sample=event.start_sample,
                    num_samples=event.audio.num_samples,
                    segment_index=event.segment_index,
                    sequence=event.sequence,
                )
            )
        if isinstance(event, SegmentStarted | SegmentFinished):
            finished = isinstance(event, SegmentFinished)
            return tts_pb2.StreamingSynthesizeResponse(
                segment=tts_pb2.SegmentEvent(
                    segment_index=event.segment_index,
                    text=event.text,
                    kind=tts_pb2.SegmentEvent.FINISHED
                    if finished
                    else tts_pb2.SegmentEvent.STARTED,
                    audio_start_sample=event.audio_start_sample,
                    audio_end_sample=event.audio_end_sample if finished else 0,
                )
            )
        assert isinstance(event, Summary)
        return tts_pb2.StreamingSynthesizeResponse(
            summary=tts_pb2.SynthesisSummary(
                time_to_first_audio_ms=event.time_to_first_audio_ms,
                audio_seconds=event.audio_seconds,
                generated_tokens=event.generated_tokens,
                dropped_tokens=event.dropped_tokens,
                real_time_factor=event.real_time_factor,
                sample_rate_hz=event.sample_rate_hz,
                encoding=_ENCODING_TO_PROTO[event.encoding],
                random_weights=event.random_weights,
            )
        )

    async def _run_session(
        self, session: SynthesisSession, method: str, context, key: ApiKey | None, reader=None
    ):
        """Stream a session's events to the client; always cleans up."""
        code = ErrorCode.OK
        handler = asyncio.current_task()

        def interrupt() -> None:
            # The session failed (a limit, a bad message, the drain) while this handler may be
            # blocked handing a response to a client that stopped reading: such a client would
            # never let it reach the error. A reading client takes the response within the
            # grace, and the handler then ends the call with the session's status itself.
            offered = session.event_offered_at
            if offered is None or handler is None:
                return

            def still_blocked() -> None:
                if session.event_offered_at == offered and not handler.done():
                    handler.cancel()

            asyncio.get_running_loop().call_later(BLOCKED_WRITE_GRACE_S, still_blocked)

        session.on_fail(interrupt)
        try:
            async with contextlib.aclosing(session.events()) as events:
                async for event in events:
                    if isinstance(event, Summary):
                        self.metrics.time_to_first_audio.observe(
                            event.time_to_first_audio_ms / 1000
                        )
                        self.metrics.audio_seconds.inc(event.audio_seconds)
                        self.metrics.generated_tokens.inc(event.generated_tokens)
                    yield self.to_proto(event)
        except SessionError as err:
            code = err.code
            if reader is not None:  # it drains the client's messages once the session failed
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(reader), ERROR_DRAIN_S)
            await context.abort(GRPC_STATUS[err.code], str(err))
        except (asyncio.CancelledError, GeneratorExit):
            code = session.error.code if session.error is not None else ErrorCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = ErrorCode.INTERNAL
            logger.exception("session %s failed", session.id)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            if reader is not None:
                if not reader.done():  # let it drain the client's last messages first
                    await asyncio.wait({reader}, timeout=ERROR_DRAIN_S)
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            await session.close()
            self._release(key)
            self._count(method, code, key)

    def _count(self, method: str, code: ErrorCode, key: ApiKey | None) -> None:
        self.metrics.requests.labels(method=method, code=code.value).inc()
        if key is not None:
            self.metrics.requests_by_key.labels(key=key.name, code=code.value).inc()

    def _authenticate(self, context) -> ApiKey | None:
        """The caller's key (None when the service is open); raises UNAUTHENTICATED."""
        if not self.access.enabled:
            return None
        authorization = None
        for entry in context.invocation_metadata() or ():
            if entry.key == "authorization":
                authorization = entry.value
                break
        key = self.access.authenticate(authorization)
        if key is None:
            raise SessionError(ErrorCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        return key

    def _release(self, key: ApiKey | None) -> None:
        self.metrics.active_streams.dec()
        if key is not None:
            self._streams_by_key[key.name] -= 1

    async def _open(self, config: tts_pb2.SynthesisConfig, key: ApiKey | None) -> SynthesisSession:
        if self.draining:
            raise SessionError(
                ErrorCode.UNAVAILABLE, "server: shutting down; retry on another instance"
            )
        limit = key.max_streams if key is not None else None
        if limit is not None and self._streams_by_key[key.name] >= limit:
            raise SessionError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"api key {key.name}: {limit} streams open, its max_streams; retry later",
            )
        config = await self._with_voice_embedding(config)
        session = self.engine.open_session(self.session_config(config))
        self.metrics.active_streams.inc()
        if key is not None:
            self._streams_by_key[key.name] += 1
        return session

    async def _abort(self, context, method: str, err: SessionError, key: ApiKey | None = None):
        self._count(method, err.code, key)
        await context.abort(GRPC_STATUS[err.code], str(err))

    # ---- RPCs ----------------------------------------------------------------------------
    async def StreamingSynthesize(self, request_iterator, context):
        method = "StreamingSynthesize"
        key = None
        requests = request_iterator.__aiter__()
        try:
            key = self._authenticate(context)
            try:
                first = await requests.__anext__()
            except StopAsyncIteration:
                raise _invalid(
                    "config: the stream ended before its first message (a config)"
                ) from None
            if isinstance(first, Undecodable):
                raise _invalid(first.message)
            kind = first.WhichOneof("request")
            if kind != "config":
                raise _invalid(
                    f"config: the first message must be a config, got {kind or 'an empty message'}"
                )
            session = await self._open(first.config, key)
        except SessionError as err:
            await _drain(requests)
            await self._abort(context, method, err, key)
        reader = asyncio.get_running_loop().create_task(self._read(requests, session))
        async with contextlib.aclosing(
            self._run_session(session, method, context, key, reader)
        ) as responses:
            async for response in responses:
                yield response

    async def _read(self, requests, session: SynthesisSession) -> None:
        """Feed the client's messages into the session; problems fail the session."""
        ended = False
        try:
            async for request in requests:
                if isinstance(request, Undecodable):
                    raise _invalid(request.message)
                kind = request.WhichOneof("request")
                if kind == "text":
                    session.push_text(request.text)
                elif kind == "flush":
                    session.flush()
                elif kind == "end_of_input":
                    session.end_input()
                    ended = True
                elif kind == "cancel":
                    session.cancel()
                    break
                elif kind == "config":
                    raise _invalid("config: sent twice; only the first message may be a config")
                else:
                    raise _invalid("request: empty message (set one of the request fields)")
            if not ended and not session.cancelled:
                session.end_input()  # half-close without end_of_input: finish what was sent
        except SessionError as err:
            session.fail(err)
        # After a cancel or an error the client may still be sending: read and drop that
        # until it half-closes (see ERROR_DRAIN_S; the handler stops this soon).
        async for _ in requests:
            pass

    async def Synthesize(self, request, context):
        method = "Synthesize"
        key = None
        try:
            key = self._authenticate(context)
            if isinstance(request, Undecodable):
                raise _invalid(request.message)
            session = await self._open(request.config, key)
        except SessionError as err:
            await self._abort(context, method, err, key)
        try:
            if not request.text.strip():
                raise _invalid("text: no text to synthesize")
            session.push_text(request.text)
            session.end_input()
        except SessionError as err:
            session.fail(err)
        async with contextlib.aclosing(
            self._run_session(session, method, context, key)
        ) as responses:
            async for response in responses:
                yield response

    # ---- voices ----------------------------------------------------------------------------
    async def _with_voice_embedding(
        self, config: tts_pb2.SynthesisConfig
    ) -> tts_pb2.SynthesisConfig:
        """A stored voice or reference audio becomes its embedding, found or computed off the
        event loop; other configs pass through unchanged."""
        which = config.voice.WhichOneof("voice")
        if which not in ("voice_id", "reference_audio"):
            return config
        if self.voices is None:
            raise SessionError(
                ErrorCode.UNIMPLEMENTED, f"voice.{which}: this server stores no voices"
            )
        try:
            if which == "voice_id":
                embedding = (await self.voices.get(config.voice.voice_id)).embedding
            else:
                embedding = await self.voices.reference_embedding(config.voice.reference_audio)
        except VoiceNotFound as err:
            raise SessionError(ErrorCode.NOT_FOUND, f"voice.{err}") from None
        except EncoderUnavailable as err:
            raise SessionError(ErrorCode.UNAVAILABLE, f"voice.reference_audio: {err}") from None
        except VoiceStoreUnavailable as err:
            logger.warning("voice store: %s", err)
            raise SessionError(ErrorCode.UNAVAILABLE, "voice.voice_id: " + _STORE_DOWN) from None
        except ValueError as err:  # BadAudio
            reason = str(err).removeprefix("audio: ")
            raise _invalid(f"voice.reference_audio: {reason}") from None
        resolved = tts_pb2.SynthesisConfig()
        resolved.CopyFrom(config)
        resolved.voice.embedding.values[:] = embedding.tolist()  # replaces the oneof's choice
        return resolved

    @staticmethod
    def _voice_info(record: VoiceRecord) -> tts_pb2.VoiceInfo:
        created = Timestamp()
        created.FromNanoseconds(int(record.created_at * 1e9))
        return tts_pb2.VoiceInfo(
            name=record.voice_id,
            kind=tts_pb2.VOICE_KIND_STORED,
            display_name=record.display_name,
            language=record.language,
            duration_seconds=record.duration_seconds,
            created_at=created,
        )

    def _preset_info(self, name: str) -> tts_pb2.VoiceInfo:
        notice = ""
        if self.engine.voices.path(name).parent == BUILTIN_PRESETS_DIR:
            notice = "not for commercial use (see NOTICE.md of the presets)"
        return tts_pb2.VoiceInfo(name=name, notice=notice, kind=tts_pb2.VOICE_KIND_PRESET)

    async def _voice_rpc(self, method: str, request, context, call):
        """Run one voice RPC, mapping each failure to its status and counting the outcome."""
        code, message, key = grpc.StatusCode.OK, "", None
        try:
            key = self._authenticate(context)
            if isinstance(request, Undecodable):
                code, message = grpc.StatusCode.INVALID_ARGUMENT, request.message
            elif self.voices is None:
                code, message = grpc.StatusCode.UNIMPLEMENTED, "this server stores no voices"
            else:
                return await call()
        except SessionError as err:  # UNAUTHENTICATED
            code, message = GRPC_STATUS[err.code], str(err)
        except VoiceExists as err:
            code, message = grpc.StatusCode.ALREADY_EXISTS, str(err)
        except VoiceNotFound as err:
            code, message = grpc.StatusCode.NOT_FOUND, str(err)
        except PresetVoice as err:
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(err)
        except EncoderUnavailable as err:
            code, message = grpc.StatusCode.UNAVAILABLE, str(err)
        except VoiceStoreUnavailable as err:
            logger.warning("%s: %s", method, err)  # the database's address stays in the log
            code, message = grpc.StatusCode.UNAVAILABLE, _STORE_DOWN
        except ValueError as err:  # a bad id, name or language, or unusable audio (BadAudio)
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(err)
        except Exception:
            logger.exception("%s failed", method)
            code, message = grpc.StatusCode.INTERNAL, "internal error"
        finally:
            self._count(method, ErrorCode(code.name), key)
        await context.abort(code, message)

    async def CreateVoice(self, request, context):
        async def create():
            record = await self.voices.create(
                request.voice_id, request.audio, request.display_name, request.language
            )
            return self._voice_info(record)

        return await self._voice_rpc("CreateVoice", request, context, create)

    async def GetVoice(self, request, context):
        async def get():
            if request.voice_id in self.engine.voices:
                return self._preset_info(request.voice_id)
            return self._voice_info(await self.voices.get(request.voice_id))

        return await self._voice_rpc("GetVoice", request, context, get)

    async def DeleteVoice(self, request, context):
        async def delete():
            await self.voices.delete(request.voice_id)
            return tts_pb2.DeleteVoiceResponse()

        return await self._voice_rpc("DeleteVoice", request, context, delete)

    async def ListVoices(self, request, context):
        try:
            key = self._authenticate(context)
        except SessionError as err:
            await self._abort(context, "ListVoices", err)
        voices = [self._preset_info(name) for name in self.engine.voices.names()]
        if self.voices is not None:
            try:
                stored = await self.voices.list()
            except VoiceStoreUnavailable as err:
                logger.warning("ListVoices: %s", err)
                await self._abort(
                    context, "ListVoices", SessionError(ErrorCode.UNAVAILABLE, _STORE_DOWN), key
                )
            voices += [self._voice_info(record) for record in stored]
        self._count("ListVoices", ErrorCode.OK, key)
        return tts_pb2.ListVoicesResponse(
            voices=voices,
            sample_rate_hz=self.engine.decoder.sample_rate,
            model=self.engine.model_name,
            codec=self.engine.decoder.describe(),
            random_weights=self.engine.random_weights,
        )
