import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    PCM_S16LE: _ClassVar[Encoding]
    PCM_F32LE: _ClassVar[Encoding]
    OPUS: _ClassVar[Encoding]
    OGG_OPUS: _ClassVar[Encoding]
    MULAW: _ClassVar[Encoding]
    ALAW: _ClassVar[Encoding]

class FirstAudio(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIRST_AUDIO_UNSPECIFIED: _ClassVar[FirstAudio]
    FIRST_AUDIO_BALANCED: _ClassVar[FirstAudio]
    FIRST_AUDIO_EARLIEST: _ClassVar[FirstAudio]

class VoiceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VOICE_KIND_UNSPECIFIED: _ClassVar[VoiceKind]
    VOICE_KIND_PRESET: _ClassVar[VoiceKind]
    VOICE_KIND_STORED: _ClassVar[VoiceKind]
    VOICE_KIND_ALIAS: _ClassVar[VoiceKind]
ENCODING_UNSPECIFIED: Encoding
PCM_S16LE: Encoding
PCM_F32LE: Encoding
OPUS: Encoding
OGG_OPUS: Encoding
MULAW: Encoding
ALAW: Encoding
FIRST_AUDIO_UNSPECIFIED: FirstAudio
FIRST_AUDIO_BALANCED: FirstAudio
FIRST_AUDIO_EARLIEST: FirstAudio
VOICE_KIND_UNSPECIFIED: VoiceKind
VOICE_KIND_PRESET: VoiceKind
VOICE_KIND_STORED: VoiceKind
VOICE_KIND_ALIAS: VoiceKind

class StreamingSynthesizeRequest(_message.Message):
    __slots__ = ("config", "text", "flush", "end_of_input", "cancel")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    END_OF_INPUT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    config: SynthesisConfig
    text: str
    flush: Flush
    end_of_input: EndOfInput
    cancel: Cancel
    def __init__(self, config: _Optional[_Union[SynthesisConfig, _Mapping]] = ..., text: _Optional[str] = ..., flush: _Optional[_Union[Flush, _Mapping]] = ..., end_of_input: _Optional[_Union[EndOfInput, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ...) -> None: ...

class Flush(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class EndOfInput(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Cancel(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SynthesizeRequest(_message.Message):
    __slots__ = ("config", "text")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    config: SynthesisConfig
    text: str
    def __init__(self, config: _Optional[_Union[SynthesisConfig, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class SynthesisConfig(_message.Message):
    __slots__ = ("voice", "audio", "generation", "streaming", "language", "word_timestamps")
    VOICE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    WORD_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    voice: Voice
    audio: AudioFormat
    generation: GenerationOptions
    streaming: StreamingOptions
    language: str
    word_timestamps: bool
    def __init__(self, voice: _Optional[_Union[Voice, _Mapping]] = ..., audio: _Optional[_Union[AudioFormat, _Mapping]] = ..., generation: _Optional[_Union[GenerationOptions, _Mapping]] = ..., streaming: _Optional[_Union[StreamingOptions, _Mapping]] = ..., language: _Optional[str] = ..., word_timestamps: _Optional[bool] = ...) -> None: ...

class Voice(_message.Message):
    __slots__ = ("preset", "embedding", "voice_id", "reference_audio")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_AUDIO_FIELD_NUMBER: _ClassVar[int]
    preset: str
    embedding: Embedding
    voice_id: str
    reference_audio: bytes
    def __init__(self, preset: _Optional[str] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., voice_id: _Optional[str] = ..., reference_audio: _Optional[bytes] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class AudioFormat(_message.Message):
    __slots__ = ("encoding", "sample_rate_hz")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    encoding: Encoding
    sample_rate_hz: int
    def __init__(self, encoding: _Optional[_Union[Encoding, str]] = ..., sample_rate_hz: _Optional[int] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("temperature", "top_p", "repetition_penalty", "max_tokens", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    repetition_penalty: float
    max_tokens: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class StreamingOptions(_message.Message):
    __slots__ = ("first_chunk_tokens", "chunk_tokens", "lookahead_tokens", "left_context_tokens", "first_audio")
    FIRST_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEFT_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_AUDIO_FIELD_NUMBER: _ClassVar[int]
    first_chunk_tokens: int
    chunk_tokens: int
    lookahead_tokens: int
    left_context_tokens: int
    first_audio: FirstAudio
    def __init__(self, first_chunk_tokens: _Optional[int] = ..., chunk_tokens: _Optional[int] = ..., lookahead_tokens: _Optional[int] = ..., left_context_tokens: _Optional[int] = ..., first_audio: _Optional[_Union[FirstAudio, str]] = ...) -> None: ...

class StreamingSynthesizeResponse(_message.Message):
    __slots__ = ("audio", "segment", "summary", "words")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    audio: AudioChunk
    segment: SegmentEvent
    summary: SynthesisSummary
    words: WordTimings
    def __init__(self, audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., segment: _Optional[_Union[SegmentEvent, _Mapping]] = ..., summary: _Optional[_Union[SynthesisSummary, _Mapping]] = ..., words: _Optional[_Union[WordTimings, _Mapping]] = ...) -> None: ...

class WordTimings(_message.Message):
    __slots__ = ("segment_index", "words", "estimated")
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    segment_index: int
    words: _containers.RepeatedCompositeFieldContainer[WordTiming]
    estimated: bool
    def __init__(self, segment_index: _Optional[int] = ..., words: _Optional[_Iterable[_Union[WordTiming, _Mapping]]] = ..., estimated: _Optional[bool] = ...) -> None: ...

class WordTiming(_message.Message):
    __slots__ = ("word", "start_sample", "end_sample")
    WORD_FIELD_NUMBER: _ClassVar[int]
    START_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    END_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    word: str
    start_sample: int
    end_sample: int
    def __init__(self, word: _Optional[str] = ..., start_sample: _Optional[int] = ..., end_sample: _Optional[int] = ...) -> None: ...

class ConverseRequest(_message.Message):
    __slots__ = ("context_id", "config", "text", "flush", "end_of_input", "cancel", "close", "context_config")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    END_OF_INPUT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CONFIG_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    config: SynthesisConfig
    text: str
    flush: Flush
    end_of_input: EndOfInput
    cancel: Cancel
    close: CloseConversation
    context_config: SynthesisConfig
    def __init__(self, context_id: _Optional[str] = ..., config: _Optional[_Union[SynthesisConfig, _Mapping]] = ..., text: _Optional[str] = ..., flush: _Optional[_Union[Flush, _Mapping]] = ..., end_of_input: _Optional[_Union[EndOfInput, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., close: _Optional[_Union[CloseConversation, _Mapping]] = ..., context_config: _Optional[_Union[SynthesisConfig, _Mapping]] = ...) -> None: ...

class CloseConversation(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConverseResponse(_message.Message):
    __slots__ = ("context_id", "ready", "audio", "segment", "words", "flushed", "done", "cancelled", "error")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    FLUSHED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    context_id: str
    ready: ConversationReady
    audio: AudioChunk
    segment: SegmentEvent
    words: WordTimings
    flushed: ContextFlushed
    done: SynthesisSummary
    cancelled: ContextCancelled
    error: ContextError
    def __init__(self, context_id: _Optional[str] = ..., ready: _Optional[_Union[ConversationReady, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., segment: _Optional[_Union[SegmentEvent, _Mapping]] = ..., words: _Optional[_Union[WordTimings, _Mapping]] = ..., flushed: _Optional[_Union[ContextFlushed, _Mapping]] = ..., done: _Optional[_Union[SynthesisSummary, _Mapping]] = ..., cancelled: _Optional[_Union[ContextCancelled, _Mapping]] = ..., error: _Optional[_Union[ContextError, _Mapping]] = ...) -> None: ...

class ConversationReady(_message.Message):
    __slots__ = ("conversation_id", "encoding", "sample_rate_hz", "word_timestamps", "random_weights")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    WORD_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    encoding: Encoding
    sample_rate_hz: int
    word_timestamps: bool
    random_weights: bool
    def __init__(self, conversation_id: _Optional[str] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., sample_rate_hz: _Optional[int] = ..., word_timestamps: _Optional[bool] = ..., random_weights: _Optional[bool] = ...) -> None: ...

class ContextFlushed(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ContextCancelled(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ContextError(_message.Message):
    __slots__ = ("code", "message", "field")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[ContextError.Code]
        CANCELLED: _ClassVar[ContextError.Code]
        UNKNOWN: _ClassVar[ContextError.Code]
        INVALID_ARGUMENT: _ClassVar[ContextError.Code]
        DEADLINE_EXCEEDED: _ClassVar[ContextError.Code]
        NOT_FOUND: _ClassVar[ContextError.Code]
        ALREADY_EXISTS: _ClassVar[ContextError.Code]
        PERMISSION_DENIED: _ClassVar[ContextError.Code]
        RESOURCE_EXHAUSTED: _ClassVar[ContextError.Code]
        FAILED_PRECONDITION: _ClassVar[ContextError.Code]
        ABORTED: _ClassVar[ContextError.Code]
        OUT_OF_RANGE: _ClassVar[ContextError.Code]
        UNIMPLEMENTED: _ClassVar[ContextError.Code]
        INTERNAL: _ClassVar[ContextError.Code]
        UNAVAILABLE: _ClassVar[ContextError.Code]
        DATA_LOSS: _ClassVar[ContextError.Code]
        UNAUTHENTICATED: _ClassVar[ContextError.Code]
    OK: ContextError.Code
    CANCELLED: ContextError.Code
    UNKNOWN: ContextError.Code
    INVALID_ARGUMENT: ContextError.Code
    DEADLINE_EXCEEDED: ContextError.Code
    NOT_FOUND: ContextError.Code
    ALREADY_EXISTS: ContextError.Code
    PERMISSION_DENIED: ContextError.Code
    RESOURCE_EXHAUSTED: ContextError.Code
    FAILED_PRECONDITION: ContextError.Code
    ABORTED: ContextError.Code
    OUT_OF_RANGE: ContextError.Code
    UNIMPLEMENTED: ContextError.Code
    INTERNAL: ContextError.Code
    UNAVAILABLE: ContextError.Code
    DATA_LOSS: ContextError.Code
    UNAUTHENTICATED: ContextError.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: ContextError.Code
    message: str
    field: str
    def __init__(self, code: _Optional[_Union[ContextError.Code, str]] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("data", "opus_packets", "start_sample", "num_samples", "segment_index", "sequence")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OPUS_PACKETS_FIELD_NUMBER: _ClassVar[int]
    START_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    opus_packets: _containers.RepeatedScalarFieldContainer[bytes]
    start_sample: int
    num_samples: int
    segment_index: int
    sequence: int
    def __init__(self, data: _Optional[bytes] = ..., opus_packets: _Optional[_Iterable[bytes]] = ..., start_sample: _Optional[int] = ..., num_samples: _Optional[int] = ..., segment_index: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class SegmentEvent(_message.Message):
    __slots__ = ("segment_index", "text", "kind", "audio_start_sample", "audio_end_sample")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[SegmentEvent.Kind]
        STARTED: _ClassVar[SegmentEvent.Kind]
        FINISHED: _ClassVar[SegmentEvent.Kind]
    KIND_UNSPECIFIED: SegmentEvent.Kind
    STARTED: SegmentEvent.Kind
    FINISHED: SegmentEvent.Kind
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AUDIO_START_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_END_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    segment_index: int
    text: str
    kind: SegmentEvent.Kind
    audio_start_sample: int
    audio_end_sample: int
    def __init__(self, segment_index: _Optional[int] = ..., text: _Optional[str] = ..., kind: _Optional[_Union[SegmentEvent.Kind, str]] = ..., audio_start_sample: _Optional[int] = ..., audio_end_sample: _Optional[int] = ...) -> None: ...

class SynthesisSummary(_message.Message):
    __slots__ = ("time_to_first_audio_ms", "audio_seconds", "generated_tokens", "dropped_tokens", "real_time_factor", "sample_rate_hz", "encoding", "random_weights", "request_id")
    TIME_TO_FIRST_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REAL_TIME_FACTOR_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    time_to_first_audio_ms: float
    audio_seconds: float
    generated_tokens: int
    dropped_tokens: int
    real_time_factor: float
    sample_rate_hz: int
    encoding: Encoding
    random_weights: bool
    request_id: str
    def __init__(self, time_to_first_audio_ms: _Optional[float] = ..., audio_seconds: _Optional[float] = ..., generated_tokens: _Optional[int] = ..., dropped_tokens: _Optional[int] = ..., real_time_factor: _Optional[float] = ..., sample_rate_hz: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., random_weights: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListVoicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VoiceInfo(_message.Message):
    __slots__ = ("name", "notice", "kind", "display_name", "language", "duration_seconds", "created_at", "alias_of")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ALIAS_OF_FIELD_NUMBER: _ClassVar[int]
    name: str
    notice: str
    kind: VoiceKind
    display_name: str
    language: str
    duration_seconds: float
    created_at: _timestamp_pb2.Timestamp
    alias_of: str
    def __init__(self, name: _Optional[str] = ..., notice: _Optional[str] = ..., kind: _Optional[_Union[VoiceKind, str]] = ..., display_name: _Optional[str] = ..., language: _Optional[str] = ..., duration_seconds: _Optional[float] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., alias_of: _Optional[str] = ...) -> None: ...

class CreateVoiceRequest(_message.Message):
    __slots__ = ("voice_id", "display_name", "language", "audio")
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    display_name: str
    language: str
    audio: bytes
    def __init__(self, voice_id: _Optional[str] = ..., display_name: _Optional[str] = ..., language: _Optional[str] = ..., audio: _Optional[bytes] = ...) -> None: ...

class GetVoiceRequest(_message.Message):
    __slots__ = ("voice_id",)
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    def __init__(self, voice_id: _Optional[str] = ...) -> None: ...

class DeleteVoiceRequest(_message.Message):
    __slots__ = ("voice_id",)
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    def __init__(self, voice_id: _Optional[str] = ...) -> None: ...

class DeleteVoiceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVoicesResponse(_message.Message):
    __slots__ = ("voices", "sample_rate_hz", "model", "codec", "random_weights")
    VOICES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    voices: _containers.RepeatedCompositeFieldContainer[VoiceInfo]
    sample_rate_hz: int
    model: str
    codec: str
    random_weights: bool
    def __init__(self, voices: _Optional[_Iterable[_Union[VoiceInfo, _Mapping]]] = ..., sample_rate_hz: _Optional[int] = ..., model: _Optional[str] = ..., codec: _Optional[str] = ..., random_weights: _Optional[bool] = ...) -> None: ...
