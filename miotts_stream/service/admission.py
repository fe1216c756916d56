"""What every transport (gRPC, HTTP, WebSocket) does the same way before and after a stream.

`Admission` authenticates a caller, refuses new streams while the server drains or a key is at
its own limit, turns a `SynthesisConfig` (the protobuf message is the service's one schema for
a synthesis; the HTTP transport fills it from JSON) into an engine session, and counts every
outcome in the shared metrics. Engine-wide limits (`--max-streams`) live in the engine, so a
stream counts against them whichever transport opened it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter

from google.protobuf.timestamp_pb2 import Timestamp

from miotts_stream.audio.encoders import Encoding, output_rate
from miotts_stream.audio.reference import BadAudio
from miotts_stream.codec.streaming import StreamingOptions
from miotts_stream.codec.voices import BUILTIN_PRESETS_DIR
from miotts_stream.errors import FieldError
from miotts_stream.llm import SamplingOptions
from miotts_stream.voices import VoiceExists, VoiceNotFound, VoiceRecord, VoiceStoreUnavailable
from miotts_stream.voices.aliases import VoiceAliases
from miotts_stream.voices.registry import EncoderUnavailable, PresetVoice, VoiceRegistry
from miotts_stream.voices.store import check_voice_id

from .access import UNAUTHENTICATED_MESSAGE, AccessPolicy, ApiKey
from .engine import (
    LANGUAGES,
    ErrorCode,
    SessionConfig,
    SessionError,
    SpeechEngine,
    Summary,
    SynthesisSession,
)
from .metrics import ServiceMetrics
from .pb.miotts.v1 import tts_pb2

logger = logging.getLogger(__name__)

PROTO_ENCODINGS = {
    tts_pb2.ENCODING_UNSPECIFIED: Encoding.PCM_S16LE,
    tts_pb2.PCM_S16LE: Encoding.PCM_S16LE,
    tts_pb2.PCM_F32LE: Encoding.PCM_F32LE,
    tts_pb2.OPUS: Encoding.OPUS,
    tts_pb2.OGG_OPUS: Encoding.OGG_OPUS,
    tts_pb2.MULAW: Encoding.MULAW,
    tts_pb2.ALAW: Encoding.ALAW,
}

# Upper bound of each window field: windows of all streams share one padded forward, so one
# client's huge windows would slow every other stream down.
MAX_WINDOW_FIELD_TOKENS = 250
# How long a segment's first window may wait for tokens while the LLM is fast, per choice.
FIRST_AUDIO_WAIT_MS = {
    tts_pb2.FIRST_AUDIO_UNSPECIFIED: StreamingOptions.first_wait_ms,
    tts_pb2.FIRST_AUDIO_BALANCED: StreamingOptions.first_wait_ms,
    tts_pb2.FIRST_AUDIO_EARLIEST: 0.0,
}


# How long a failed session's handler may stay blocked on one event before it is stopped.
BLOCKED_WRITE_GRACE_S = 1.0


def stop_blocked_writer(session: SynthesisSession, handler: asyncio.Task | None) -> None:
    """When `session` fails (a limit, a bad message, the drain), its transport handler may be
    blocked handing an event to a client that stopped reading: such a client would never let
    it reach the error. A reading client takes the event within the grace, and the handler
    then ends the stream with the session's error itself; otherwise the handler is cancelled."""

    def on_fail() -> None:
        offered = session.event_offered_at
        if offered is None or handler is None:
            return

        def still_blocked() -> None:
            if session.event_offered_at == offered and not handler.done():
                handler.cancel()

        asyncio.get_running_loop().call_later(BLOCKED_WRITE_GRACE_S, still_blocked)

    session.on_fail(on_fail)


def new_request_id() -> str:
    """An id for one request (an HTTP request, a gRPC call, a WebSocket connection): sent to
    the client (`x-request-id`), named in the server's log line of the request and in its
    summary. A session's id is its request's."""
    return uuid.uuid4().hex[:16]


def invalid(field: str, reason: str) -> SessionError:
    """INVALID_ARGUMENT for one field of the request: "field: reason", the field as data."""
    return SessionError(ErrorCode.INVALID_ARGUMENT, f"{field}: {reason}", field)


# What a client hears when the voice store is down (the database's address stays in the log).
STORE_DOWN = "the voice store is unreachable now; retry later"


def voice_error(method: str, err: Exception) -> SessionError:
    """A voice store / cloning failure as the error the client gets; an unexpected exception
    (a bug) is logged with its traceback and answered INTERNAL. Call it in the `except`."""
    if isinstance(err, SessionError):
        return err
    if isinstance(err, VoiceStoreUnavailable):
        logger.warning("voice store: %s", err)
        return SessionError(ErrorCode.UNAVAILABLE, STORE_DOWN)
    codes = (
        (VoiceExists, ErrorCode.ALREADY_EXISTS),
        (VoiceNotFound, ErrorCode.NOT_FOUND),
        (PresetVoice, ErrorCode.FAILED_PRECONDITION),
        (EncoderUnavailable, ErrorCode.UNAVAILABLE),
        # a bad id, name or language, or unusable audio (BadAudio)
        (ValueError, ErrorCode.INVALID_ARGUMENT),
    )
    for kind, code in codes:
        if isinstance(err, kind):
            return SessionError(code, str(err), getattr(err, "field", None))
    logger.exception("%s failed", method)
    return SessionError(ErrorCode.INTERNAL, "internal error")


class Admission:
    def __init__(
        self,
        engine: SpeechEngine,
        metrics: ServiceMetrics,
        default_voice: str,
        voices: VoiceRegistry | None = None,
        access: AccessPolicy | None = None,
        aliases: VoiceAliases | None = None,
        conversation_idle_s: float = 300.0,
    ):
        self.engine = engine
        # A conversation with no context open and no message for this long is closed.
        self.conversation_idle_s = conversation_idle_s
        self.metrics = metrics
        self.default_voice = default_voice
        self.voices = voices  # stored voices and cloning; None: presets and embeddings only
        self.access = access or AccessPolicy()
        self.aliases = aliases or VoiceAliases.build({}, engine.voices)
        # After a signal: health NOT_SERVING from then on (during --drain-notice-s new streams
        # are still taken); then draining: new streams are refused, open ones finish.
        self.stopping = False
        self.draining = False
        self.engine_serving = True  # False while an in-process engine restarts (health)
        self.streams_by_key: Counter[str] = Counter()

    @property
    def serving(self) -> bool:
        """What health checks report: taking new streams (not draining, the engine up)."""
        return self.engine_serving and not self.stopping and not self.draining

    # ---- who -------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key from its `authorization` value (None when the service is open);
        raises UNAUTHENTICATED."""
        if not self.access.enabled:
            return None
        key = self.access.authenticate(authorization)
        if key is None:
            raise SessionError(ErrorCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        return key

    # ---- config ----------------------------------------------------------------------------
    def session_config(self, config: tts_pb2.SynthesisConfig) -> SessionConfig:
        """A validated engine config; SessionError naming the field otherwise. Stored voices and
        reference audio must have been resolved to an embedding first (`open` does that)."""
        engine = self.engine
        which = config.voice.WhichOneof("voice")
        if which == "embedding":
            try:
                voice = engine.decoder.validate_embedding(
                    list(config.voice.embedding.values), "voice.embedding.values"
                )
            except ValueError as err:  # the message names voice.embedding.values
                raise SessionError(
                    ErrorCode.INVALID_ARGUMENT, str(err), "voice.embedding.values"
                ) from None
        else:
            name = config.voice.preset if which == "preset" else self.default_voice
            if name not in engine.voices:
                known = ", ".join(engine.voices.names())
                raise SessionError(
                    ErrorCode.NOT_FOUND,
                    f"voice.preset: unknown preset {name!r} (known: {known})",
                    "voice.preset",
                )
            voice = engine.voices.get(name)

        if config.audio.encoding not in PROTO_ENCODINGS:
            raise invalid("audio.encoding", f"unknown encoding {config.audio.encoding}")
        encoding = PROTO_ENCODINGS[config.audio.encoding]
        if config.audio.sample_rate_hz < 0:
            raise invalid("audio.sample_rate_hz", "must be 0 (codec rate) or a positive rate")
        try:
            output_rate(encoding, config.audio.sample_rate_hz, engine.decoder.sample_rate)
        except ValueError as err:  # the message names audio.sample_rate_hz
            raise SessionError(
                ErrorCode.INVALID_ARGUMENT, str(err), "audio.sample_rate_hz"
            ) from None

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
        except FieldError as err:
            raise SessionError(
                ErrorCode.INVALID_ARGUMENT, f"generation.{err}", f"generation.{err.field}"
            ) from None

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
                raise invalid(
                    f"streaming.{name}",
                    f"must be between 0 (the default) and {MAX_WINDOW_FIELD_TOKENS} tokens, "
                    f"got {value}",
                )
            fields[name] = value or getattr(base, name)
        if fields["lookahead_tokens"] < base.first_lookahead_tokens:
            fields["first_lookahead_tokens"] = fields["lookahead_tokens"]
        first_audio = config.streaming.first_audio
        if first_audio not in FIRST_AUDIO_WAIT_MS:
            raise invalid(
                "streaming.first_audio",
                f"unknown value {first_audio}; one of "
                + ", ".join(tts_pb2.FirstAudio.Name(v) for v in sorted(FIRST_AUDIO_WAIT_MS)),
            )
        fields["first_wait_ms"] = FIRST_AUDIO_WAIT_MS[first_audio]
        try:
            streaming = StreamingOptions(**fields).validated()
        except ValueError as err:  # a combination of the fields: the group is named
            message = str(err).replace("streaming options: ", "streaming.")
            raise SessionError(ErrorCode.INVALID_ARGUMENT, message, "streaming") from None

        language = config.language or "auto"
        if language not in LANGUAGES:
            raise invalid("language", f"{language!r} is not one of {', '.join(LANGUAGES)}")
        return SessionConfig(
            voice,
            encoding,
            config.audio.sample_rate_hz,
            sampling,
            streaming,
            language,
            word_timestamps=config.word_timestamps,
        )

    def _by_name(self, config: tts_pb2.SynthesisConfig) -> tts_pb2.SynthesisConfig:
        """The config with a voice named by a name that is not its kind's made plain: an alias
        (as a preset's name or a voice id) becomes the voice it names, and a preset's name
        given as a voice id the preset (a client that takes "a voice" as one string sends
        it as a voice id)."""
        which = config.voice.WhichOneof("voice")
        if which not in ("preset", "voice_id"):
            return config
        name = getattr(config.voice, which)
        if name in self.aliases:
            target = self.aliases.target(name)
        elif which == "voice_id" and name in self.engine.voices:
            target = name
        else:
            return config
        resolved = tts_pb2.SynthesisConfig()
        resolved.CopyFrom(config)
        if target in self.engine.voices:
            resolved.voice.preset = target
        else:
            resolved.voice.voice_id = target
        return resolved

    async def resolve_voice(self, config: tts_pb2.SynthesisConfig) -> tts_pb2.SynthesisConfig:
        """An alias becomes the voice it names; a stored voice or reference audio becomes its
        embedding, found or computed off the event loop; other configs pass through
        unchanged."""
        config = self._by_name(config)
        which = config.voice.WhichOneof("voice")
        if which not in ("voice_id", "reference_audio"):
            return config
        if self.voices is None:
            raise SessionError(
                ErrorCode.UNIMPLEMENTED,
                f"voice.{which}: this server stores no voices",
                f"voice.{which}",
            )
        try:
            if which == "voice_id":
                embedding = (await self.voices.get(config.voice.voice_id)).embedding
            else:
                embedding = await self.voices.reference_embedding(config.voice.reference_audio)
        except VoiceNotFound:
            raise SessionError(
                ErrorCode.NOT_FOUND,
                f"voice.voice_id: {config.voice.voice_id!r} is neither a preset, an alias nor a "
                "stored voice (ListVoices and GET /v1/voices list them)",
                "voice.voice_id",
            ) from None
        except EncoderUnavailable as err:
            raise SessionError(ErrorCode.UNAVAILABLE, f"voice.reference_audio: {err}") from None
        except VoiceStoreUnavailable as err:
            logger.warning("voice store: %s", err)
            raise SessionError(ErrorCode.UNAVAILABLE, f"voice.voice_id: {STORE_DOWN}") from None
        except BadAudio as err:
            raise invalid("voice.reference_audio", err.reason) from None
        except ValueError as err:  # an embedding that came out unusable
            raise invalid("voice.reference_audio", str(err)) from None
        resolved = tts_pb2.SynthesisConfig()
        resolved.CopyFrom(config)
        resolved.voice.embedding.values[:] = embedding.tolist()  # replaces the oneof's choice
        return resolved

    # ---- streams ---------------------------------------------------------------------------
    async def open(
        self, config: tts_pb2.SynthesisConfig, key: ApiKey | None, request_id: str | None = None
    ) -> SynthesisSession:
        """A new session (its id the request's), or SessionError: draining, the key's limit, a
        bad config, the engine's --max-streams. Every session opened here must be
        `release`d."""
        if self.draining:
            raise SessionError(
                ErrorCode.UNAVAILABLE, "server: shutting down; retry on another instance"
            )
        limit = key.max_streams if key is not None else None
        if limit is not None and self.streams_by_key[key.name] >= limit:
            raise SessionError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"api key {key.name}: {limit} streams open, its max_streams; retry later",
            )
        config = await self.resolve_voice(config)
        session = self.engine.open_session(self.session_config(config), request_id)
        self.metrics.active_streams.inc()
        if key is not None:
            self.streams_by_key[key.name] += 1
        return session

    def release(self, key: ApiKey | None) -> None:
        self.metrics.active_streams.dec()
        if key is not None:
            self.streams_by_key[key.name] -= 1

    def record(
        self,
        method: str,
        code: ErrorCode,
        key: ApiKey | None,
        request_id: str,
        detail: str = "",
    ) -> None:
        """A finished request: counted in the metrics, and one log line naming its id (the
        client's x-request-id), method, outcome and key name (never the key)."""
        self.metrics.requests.labels(method=method, code=code.value).inc()
        if key is not None:
            self.metrics.requests_by_key.labels(key=key.name, code=code.value).inc()
        who = f" key {key.name}" if key is not None else ""
        logger.info("request %s %s: %s%s%s", request_id, method, code.value, who, detail)

    def observe(self, summary: Summary) -> None:
        self.metrics.time_to_first_audio.observe(summary.time_to_first_audio_ms / 1000)
        self.metrics.generated_tokens.inc(summary.generated_tokens)

    def sent_audio(self, seconds: float) -> None:
        """Audio delivered to a client, as it goes: a stream cancelled or failed half way
        counts what it sent."""
        self.metrics.audio_seconds.inc(seconds)

    # ---- voices ----------------------------------------------------------------------------
    @staticmethod
    def voice_info(record: VoiceRecord) -> tts_pb2.VoiceInfo:
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

    def preset_info(self, name: str) -> tts_pb2.VoiceInfo:
        notice = ""
        if self.engine.voices.path(name).parent == BUILTIN_PRESETS_DIR:
            notice = "not for commercial use (see NOTICE.md of the presets)"
        return tts_pb2.VoiceInfo(name=name, notice=notice, kind=tts_pb2.VOICE_KIND_PRESET)

    def _stored_voices(self) -> VoiceRegistry:
        if self.voices is None:
            raise SessionError(ErrorCode.UNIMPLEMENTED, "this server stores no voices")
        return self.voices

    def alias_info(self, name: str) -> tts_pb2.VoiceInfo:
        target = self.aliases.target(name)
        notice = self.preset_info(target).notice if target in self.engine.voices else ""
        return tts_pb2.VoiceInfo(
            name=name, kind=tts_pb2.VOICE_KIND_ALIAS, alias_of=target, notice=notice
        )

    async def list_voices(self) -> tts_pb2.ListVoicesResponse:
        voices = [self.preset_info(name) for name in self.engine.voices.names()]
        voices += [self.alias_info(name) for name in self.aliases.names()]
        if self.voices is not None:
            try:
                stored = await self.voices.list()
            except VoiceStoreUnavailable as err:
                logger.warning("listing voices: %s", err)
                raise SessionError(ErrorCode.UNAVAILABLE, STORE_DOWN) from None
            voices += [self.voice_info(record) for record in stored]
        return tts_pb2.ListVoicesResponse(
            voices=voices,
            sample_rate_hz=self.engine.decoder.sample_rate,
            model=self.engine.model_name,
            codec=self.engine.decoder.describe(),
            random_weights=self.engine.random_weights,
        )

    def _refuse_alias(self, voice_id: str, code: ErrorCode, doing: str) -> None:
        if voice_id in self.aliases:
            raise SessionError(
                code,
                f"voice_id: {voice_id!r} is an alias of {self.aliases.target(voice_id)!r}; "
                f"{doing} (aliases come from OpenAI's voice names and --voice-alias)",
                "voice_id",
            )

    async def create_voice(
        self, voice_id: str, audio: bytes, display_name: str = "", language: str = ""
    ) -> tts_pb2.VoiceInfo:
        self._refuse_alias(voice_id, ErrorCode.ALREADY_EXISTS, "choose another id")
        record = await self._stored_voices().create(voice_id, audio, display_name, language)
        return self.voice_info(record)

    async def get_voice(self, voice_id: str) -> tts_pb2.VoiceInfo:
        if voice_id in self.engine.voices:
            return self.preset_info(voice_id)
        if voice_id in self.aliases:
            return self.alias_info(voice_id)
        check_voice_id(voice_id)  # a malformed id is a bad request, not a store lookup
        return self.voice_info(await self._stored_voices().get(voice_id))

    async def delete_voice(self, voice_id: str) -> None:
        self._refuse_alias(voice_id, ErrorCode.FAILED_PRECONDITION, "it cannot be deleted")
        if voice_id not in self.engine.voices:  # a preset's name: PresetVoice says why not
            check_voice_id(voice_id)
        await self._stored_voices().delete(voice_id)
