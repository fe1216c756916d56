"""gRPC transport for the speech engine: `miotts.v1.TextToSpeech`.

Maps protobuf messages to engine sessions and back, and every request problem to a gRPC status
whose message names the field. The engine itself knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from miotts_stream.audio.encoders import output_rate

from .access import ApiKey
from .admission import PROTO_ENCODINGS, Admission, invalid, new_request_id, voice_error
from .conversation import (
    ContextCancelled,
    ContextFailed,
    ContextFlushed,
    Conversation,
    ConversationEnd,
    ConversationEvent,
    run_conversation,
)
from .engine import (
    AudioOut,
    ErrorCode,
    Event,
    SegmentFinished,
    SegmentStarted,
    SessionError,
    Summary,
    SynthesisSession,
    WordsOut,
)
from .pb.miotts.v1 import tts_pb2, tts_pb2_grpc
from .runner import ERROR_DRAIN_S, run_session

logger = logging.getLogger(__name__)

_ENCODING_TO_PROTO = {v: k for k, v in PROTO_ENCODINGS.items() if k != tts_pb2.ENCODING_UNSPECIFIED}


GRPC_STATUS = {code: getattr(grpc.StatusCode, code.value) for code in ErrorCode}


async def _drain(requests) -> None:
    """Read (and drop) what the client is still sending, for up to ERROR_DRAIN_S or until it
    half-closes: grpcio's asyncio client reports INTERNAL "Internal error from Core" instead of
    the status when one of its writes lands after the status arrived (grpc/grpc#36066); the
    messages it had already queued are written within milliseconds."""

    async def consume() -> None:
        async for _ in requests:
            pass

    with contextlib.suppress(Exception):  # includes TimeoutError
        await asyncio.wait_for(consume(), ERROR_DRAIN_S)


# ---- requests that do not parse -----------------------------------------------------------
#
# grpcio runs the request deserializer inside its own machinery: if it raises (protobuf refuses
# a `string` field that is not valid UTF-8), a unary call ends with UNKNOWN and a streaming call
# hangs. So the deserializers below never raise: they hand the servicer an `Undecodable` that
# names the field, and the servicer answers INVALID_ARGUMENT like for any other bad field.


@dataclass
class Undecodable:
    """A request message that did not parse: which field (None: the message as a whole is not
    protobuf), and why."""

    field: str | None
    reason: str

    def error(self) -> SessionError:
        if self.field is None:
            return SessionError(ErrorCode.INVALID_ARGUMENT, f"request: {self.reason}")
        return invalid(self.field, self.reason)


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
                return Undecodable(None, "not a valid protobuf message")
            return Undecodable(bad, "not valid UTF-8")

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


def words_proto(event: WordsOut) -> tts_pb2.WordTimings:
    return tts_pb2.WordTimings(
        segment_index=event.segment_index,
        estimated=True,
        words=[
            tts_pb2.WordTiming(word=w.text, start_sample=w.start_sample, end_sample=w.end_sample)
            for w in event.words
        ],
    )


def context_error(error: SessionError) -> tts_pb2.ContextError:
    return tts_pb2.ContextError(
        code=GRPC_STATUS[error.code].value[0], message=str(error), field=error.field or ""
    )


class GrpcConversationSink:
    """A conversation's events over gRPC: one ConverseResponse each, tagged with its context."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self.context = context

    async def send(self, context_id: str, event: ConversationEvent) -> None:
        response = tts_pb2.ConverseResponse(context_id=context_id)
        if isinstance(event, ContextFlushed):
            response.flushed.id = "" if event.flush_id is None else str(event.flush_id)
        elif isinstance(event, ContextCancelled):
            response.cancelled.SetInParent()
        elif isinstance(event, ContextFailed):
            response.error.CopyFrom(context_error(event.error))
        else:
            one = TextToSpeechServicer.to_proto(event)
            kind = one.WhichOneof("response")
            getattr(response, "done" if kind == "summary" else kind).CopyFrom(getattr(one, kind))
        await self.context.write(response)


class GrpcSink:
    """A session's outcome over gRPC: each event one response message, a failure the call's
    status (the handler ends there)."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self.context = context

    async def send(self, event: Event) -> None:
        await self.context.write(TextToSpeechServicer.to_proto(event))

    async def fail(self, error: SessionError) -> None:
        await abort(self.context, error)


# The trailing metadata key that names the field an error is about (when it is one field's),
# beside the status message that names it in words: as the OpenAI error's `param` over HTTP.
ERROR_FIELD_METADATA = "miotts-error-field"
REQUEST_ID_METADATA = "x-request-id"


async def abort(context: grpc.aio.ServicerContext, error: SessionError) -> None:
    """End the call with the error's status and message, and its field as trailing metadata."""
    trailing = ((ERROR_FIELD_METADATA, error.field),) if error.field else ()
    await context.abort(GRPC_STATUS[error.code], str(error), trailing_metadata=trailing)


async def start_call(context: grpc.aio.ServicerContext) -> str:
    """A new request id, sent to the client at once as the call's initial metadata."""
    request_id = new_request_id()
    await context.send_initial_metadata(((REQUEST_ID_METADATA, request_id),))
    return request_id


async def _first_config(requests) -> tts_pb2.SynthesisConfig:
    """The config that must open a bidirectional call (StreamingSynthesize, Converse)."""
    try:
        first = await requests.__anext__()
    except StopAsyncIteration:
        raise invalid("config", "the stream ended before its first message (a config)") from None
    if isinstance(first, Undecodable):
        raise first.error()
    kind = first.WhichOneof("request")
    if kind != "config":
        raise invalid(
            "config", f"the first message must be a config, got {kind or 'an empty message'}"
        )
    return first.config


class TextToSpeechServicer(tts_pb2_grpc.TextToSpeechServicer):
    """The gRPC face of `Admission` and the engine: what is the same for every transport
    (keys, limits, configs, voices, metrics) is done there."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self.engine = admission.engine

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
        if isinstance(event, WordsOut):
            return tts_pb2.StreamingSynthesizeResponse(words=words_proto(event))
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
                request_id=event.request_id,
            )
        )

    def _authenticate(self, context) -> ApiKey | None:
        """The caller's key (None when the service is open); raises UNAUTHENTICATED."""
        authorization = None
        for entry in context.invocation_metadata() or ():
            if entry.key == "authorization":
                authorization = entry.value
                break
        return self.admission.authenticate(authorization)

    async def _abort(
        self, context, method: str, request_id: str, err: SessionError, key: ApiKey | None = None
    ):
        self.admission.record(method, err.code, key, request_id, f": {err}")
        await abort(context, err)

    # ---- RPCs ----------------------------------------------------------------------------
    async def StreamingSynthesize(self, request_iterator, context):
        method = "StreamingSynthesize"
        key = None
        request_id = await start_call(context)
        requests = request_iterator.__aiter__()
        try:
            key = self._authenticate(context)
            config = await _first_config(requests)
            session = await self.admission.open(config, key, request_id)
        except SessionError as err:
            await _drain(requests)
            await self._abort(context, method, request_id, err, key)
        reader = asyncio.get_running_loop().create_task(self._read(requests, session))
        try:
            await run_session(
                self.admission, session, GrpcSink(context), method=method, key=key, reader=reader
            )
        finally:
            if not reader.done():  # let it drain the client's last messages first
                await asyncio.wait({reader}, timeout=ERROR_DRAIN_S)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _read(self, requests, session: SynthesisSession) -> None:
        """Feed the client's messages into the session; problems fail the session."""
        ended = False
        try:
            async for request in requests:
                if isinstance(request, Undecodable):
                    raise request.error()
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
                    raise invalid("config", "sent twice; only the first message may be a config")
                else:
                    raise SessionError(
                        ErrorCode.INVALID_ARGUMENT,
                        "request: empty message (set one of the request fields)",
                    )
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
        request_id = await start_call(context)
        try:
            key = self._authenticate(context)
            if isinstance(request, Undecodable):
                raise request.error()
            session = await self.admission.open(request.config, key, request_id)
        except SessionError as err:
            await self._abort(context, method, request_id, err, key)
        try:
            if not request.text.strip():
                raise invalid("text", "no text to synthesize")
            session.push_text(request.text)
            session.end_input()
        except SessionError as err:
            session.fail(err)
        await run_session(self.admission, session, GrpcSink(context), method=method, key=key)

    async def Converse(self, request_iterator, context):
        method = "Converse"
        key, conversation = None, None
        code, detail = ErrorCode.OK, ""
        request_id = await start_call(context)
        requests = request_iterator.__aiter__()
        try:
            key = self._authenticate(context)
            config = await _first_config(requests)
            conversation = await Conversation.start(
                self.admission,
                config,
                GrpcConversationSink(context),
                method=method,
                key=key,
                request_id=request_id,
            )
            settings = self.admission.session_config(conversation.config)
            await context.write(
                tts_pb2.ConverseResponse(
                    ready=tts_pb2.ConversationReady(
                        conversation_id=request_id,
                        encoding=_ENCODING_TO_PROTO[settings.encoding],
                        sample_rate_hz=output_rate(
                            settings.encoding,
                            settings.sample_rate_hz,
                            self.engine.decoder.sample_rate,
                        ),
                        word_timestamps=settings.word_timestamps,
                        random_weights=self.engine.random_weights,
                    )
                )
            )
            end = await run_conversation(
                conversation,
                self._converse_read(requests, conversation),
                self.admission.conversation_idle_s,
            )
            if isinstance(end, SessionError):
                raise end
            if end is ConversationEnd.GONE:
                code = ErrorCode.CANCELLED
        except SessionError as err:
            code, detail = err.code, f": {err}"
            await _drain(requests)
            await abort(context, err)
        except asyncio.CancelledError:
            code = ErrorCode.CANCELLED
            raise
        finally:
            if conversation is not None:
                detail += f" ({conversation.contexts_opened} contexts)"
            self.admission.record(method, code, key, request_id, detail)

    @staticmethod
    async def _converse_read(requests, conversation: Conversation) -> None:
        """Feed the client's messages into the conversation. A half-close is a close (the
        contexts open finish); SessionError for a message that ends the conversation."""
        async for request in requests:
            if isinstance(request, Undecodable):
                raise request.error()
            kind = request.WhichOneof("request")
            if kind == "config":
                raise invalid("config", "sent twice; only the first message may be a config")
            if kind is None:
                raise invalid("request", "empty message (set one of the request fields)")
            if request.HasField("context_config") and kind != "text":
                raise invalid("context_config", "only with a context's first text")
            if kind == "close":
                conversation.close()
                continue
            context_id = request.context_id
            if not context_id or len(context_id) > 256:
                raise invalid("context_id", "required: a string of 1 to 256 characters")
            if kind == "text":
                override = request.context_config if request.HasField("context_config") else None
                await conversation.text(context_id, request.text, override)
            elif kind == "flush":
                await conversation.flush(context_id, request.flush.id)
            elif kind == "end_of_input":
                await conversation.end(context_id)
            else:
                await conversation.cancel(context_id)
        conversation.close()
        await asyncio.Event().wait()  # until the player is done: the call ends then

    # ---- voices ----------------------------------------------------------------------------
    async def _voice_rpc(self, method: str, request, context, call):
        """Run one voice RPC, mapping each failure to its status and counting the outcome."""
        error, key = None, None
        request_id = await start_call(context)
        try:
            key = self._authenticate(context)
            if isinstance(request, Undecodable):
                error = request.error()
            else:
                return await call()
        except Exception as err:
            error = voice_error(method, err)
        finally:
            code = error.code if error is not None else ErrorCode.OK
            self.admission.record(method, code, key, request_id, f": {error}" if error else "")
        await abort(context, error)

    async def CreateVoice(self, request, context):
        async def create():
            return await self.admission.create_voice(
                request.voice_id, request.audio, request.display_name, request.language
            )

        return await self._voice_rpc("CreateVoice", request, context, create)

    async def GetVoice(self, request, context):
        async def get():
            return await self.admission.get_voice(request.voice_id)

        return await self._voice_rpc("GetVoice", request, context, get)

    async def DeleteVoice(self, request, context):
        async def delete():
            await self.admission.delete_voice(request.voice_id)
            return tts_pb2.DeleteVoiceResponse()

        return await self._voice_rpc("DeleteVoice", request, context, delete)

    async def ListVoices(self, request, context):
        key = None
        request_id = await start_call(context)
        try:
            key = self._authenticate(context)
            voices = await self.admission.list_voices()
        except SessionError as err:  # UNAUTHENTICATED, or the voice store down (UNAVAILABLE)
            await self._abort(context, "ListVoices", request_id, err, key)
        self.admission.record("ListVoices", ErrorCode.OK, key, request_id)
        return voices
