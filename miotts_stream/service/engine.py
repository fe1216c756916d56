"""The speech engine: text segments -> speech tokens -> streamed, encoded audio.

Transport-agnostic (the gRPC layer in `servicer.py` is one client of it). A `SynthesisSession`
is one conversation turn: text goes in piece by piece, events come out in order:

    SegmentStarted, (WordsOut,) AudioOut..., SegmentFinished, ..., Summary

(WordsOut only with `SessionConfig.word_timestamps`: estimated word times, text/words.py.)

Pipeline per session:
  push_text -> TextSegmenter -> segment queue
  generation task: for each segment, in order, open a decode stream with the shared
      DecodeScheduler (one `DecodeStream` handle per segment) and push the LLM's codes into it;
      the next segment's generation starts as soon as this one's codes are all in, while it is
      still decoding;
  events(): each segment's audio chunks, read from its handle in order, through one
      AudioEncoder (one continuous stream of samples, so Opus frames and Ogg pages run across
      segment boundaries).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from miotts_stream.audio.encoders import EncodedAudio, Encoding, make_encoder
from miotts_stream.codec import MioCodecDecoder, VoiceLibrary
from miotts_stream.codec.streaming import StreamingOptions
from miotts_stream.llm import (
    EmptyTextError,
    LLMError,
    LLMRequestError,
    LLMUnavailableError,
    SamplingOptions,
    TokenSource,
)
from miotts_stream.text.segmenter import SegmenterOptions, TextSegmenter
from miotts_stream.text.words import TimedWord, WordTimeline, split_words

from .scheduler import ClientBuffer, DecodeFailed, DecodeInterrupted, DecodeScheduler, DecodeStream

logger = logging.getLogger(__name__)

LANGUAGES = ("auto", "ja", "en")


class ErrorCode(enum.Enum):
    """Why a session ended, as the engine sees it; each transport maps these to its own
    statuses (gRPC status codes; HTTP statuses later). Values are the gRPC names."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


class SessionError(Exception):
    """A request problem; `code` says which status the transport should use.

    The message goes to the client as it is: it names the field or the limit, never internals.
    `field`, when the problem is one field's, names it as data (OpenAI's `param`).
    """

    def __init__(self, code: ErrorCode | str, message: str, field: str | None = None):
        super().__init__(message)
        self.code = ErrorCode(code)  # a name ("INTERNAL") is accepted and made typed
        self.field = field


@dataclass(frozen=True)
class SessionLimits:
    """Time limits per session (seconds; 0 or less disables one).

    idle: nothing pending (all audio sent, or only a config) and no message from the client.
    max_stream: the whole session, from open to close, generation included.
    stall: the client stopped reading: an event has waited that long to be taken.
    """

    idle_s: float = 20.0
    max_stream_s: float = 600.0
    stall_s: float = 30.0

    def check_interval(self) -> float:
        """How often the watchdog looks: a fraction of the shortest limit, within bounds."""
        limits = [v for v in (self.idle_s, self.max_stream_s, self.stall_s) if v > 0]
        return min(0.5, max(0.02, min(limits, default=1.0) / 10))


@dataclass
class SessionConfig:
    voice: torch.Tensor
    encoding: Encoding = Encoding.PCM_S16LE
    sample_rate_hz: int = 0
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    streaming: StreamingOptions = field(default_factory=StreamingOptions)
    language: str = "auto"
    word_timestamps: bool = False  # WordsOut events (estimated times, text/words.py)


# ---- events -------------------------------------------------------------------------------


@dataclass
class AudioOut:
    audio: EncodedAudio
    start_sample: int
    segment_index: int
    sequence: int


@dataclass
class SegmentStarted:
    segment_index: int
    text: str
    audio_start_sample: int


@dataclass
class SegmentFinished:
    segment_index: int
    text: str
    audio_start_sample: int
    audio_end_sample: int


@dataclass
class WordsOut:
    """Words of a segment with their estimated start and end in the output (sample positions
    at the output rate, from the start of the stream), each word once, in order; sent before
    the audio in which they start (text/words.py says how they are estimated)."""

    segment_index: int
    words: list[TimedWord]


@dataclass
class Summary:
    time_to_first_audio_ms: float
    audio_seconds: float
    generated_tokens: int
    dropped_tokens: int
    real_time_factor: float
    sample_rate_hz: int
    encoding: Encoding
    random_weights: bool
    request_id: str  # the session's id: the request's x-request-id, as logged


Event = AudioOut | SegmentStarted | SegmentFinished | WordsOut | Summary


@dataclass(eq=False)
class _Segment:
    index: int
    text: str
    ready_at: float  # when the request that completed this segment arrived
    decode: DecodeStream | None = None  # its audio, once generation has reached it
    started: asyncio.Event = field(default_factory=asyncio.Event)
    samples: int | None = None  # codec-rate samples, once all decoded
    codes_in: int = 0  # speech codes received so far: the audio they make is certain
    codes_total: int | None = None  # once they are all in: the segment's exact length


class SpeechEngine:
    """Owns the token source, the codec, the voices and the decode loop; opens sessions."""

    def __init__(
        self,
        source: TokenSource,
        decoder: MioCodecDecoder,
        voices: VoiceLibrary,
        *,
        max_streams: int = 16,
        max_text_chars: int = 10000,
        max_batch: int = 32,
        random_weights: bool = False,
        model_name: str = "",
        limits: SessionLimits | None = None,
        decode_thread_setup: Callable[[], None] | None = None,
    ):
        self.source = source
        self.decoder = decoder
        self.voices = voices
        self.max_streams = max_streams
        self.max_text_chars = max_text_chars
        self.random_weights = random_weights
        self.model_name = model_name
        self.limits = limits or SessionLimits()
        self.scheduler = DecodeScheduler(
            decoder, max_batch=max_batch, thread_setup=decode_thread_setup
        )
        self.encode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode")
        self.sessions: set[SynthesisSession] = set()
        self._watchdog: asyncio.Task | None = None

    async def start(self) -> None:
        self.scheduler.start()
        self._watchdog = asyncio.get_running_loop().create_task(
            self._watch_sessions(), name="session-watchdog"
        )

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        for session in list(self.sessions):
            await session.close()
        await self.scheduler.close()
        await asyncio.to_thread(self.encode_pool.shutdown, wait=True)
        await self.source.close()

    async def _watch_sessions(self) -> None:
        """End sessions over a time limit: idle ones, stalled readers, too long streams."""
        interval = self.limits.check_interval()
        while True:
            await asyncio.sleep(interval)
            now = time.perf_counter()
            for session in list(self.sessions):
                error = session.over_limit(self.limits, now)
                if error is not None:
                    logger.info("session %s: %s", session.id, error)
                    session.fail(error)

    def open_session(
        self, config: SessionConfig, session_id: str | None = None
    ) -> SynthesisSession:
        """A new session (its id: `session_id`, the transport's request id, or a fresh one);
        RESOURCE_EXHAUSTED beyond `max_streams`."""
        if len(self.sessions) >= self.max_streams:
            raise SessionError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"server busy: {len(self.sessions)} streams open, the most this server takes "
                f"at once is {self.max_streams}; retry later",
            )
        session = SynthesisSession(self, config, session_id)
        self.sessions.add(session)
        return session


class SynthesisSession:
    """One synthesis: feed text, read events. Always `close()` it (idempotent)."""

    def __init__(self, engine: SpeechEngine, config: SessionConfig, session_id: str | None = None):
        self.engine = engine
        self.config = config
        self.id = session_id or uuid.uuid4().hex[:16]
        self.codec_rate = engine.decoder.sample_rate
        self.encoder = make_encoder(config.encoding, self.codec_rate, config.sample_rate_hz)
        self.segmenter = TextSegmenter(SegmenterOptions())
        self.text_chars = 0
        self._segments: asyncio.Queue[_Segment | None] = asyncio.Queue()
        self._segment_list: list[_Segment] = []
        self._input_ended = False
        self._input_changed = asyncio.Event()  # a segment was added, or input ended
        self._cancelled = asyncio.Event()
        self._error: SessionError | None = None
        self._failed = asyncio.Event()
        self._on_fail: list = []  # callbacks: a transport stops a reader it cannot reach
        # For the watchdog: when input last came, since when events() has waited for input
        # (None while it has work), since when an event has waited to be taken by the client.
        self.last_input_at = time.perf_counter()
        self.waiting_for_input_since: float | None = None
        self.event_offered_at: float | None = None
        self._generation = asyncio.get_running_loop().create_task(
            self._generate(), name=f"generate-{self.id}"
        )
        self.generated_tokens = 0
        self.dropped_tokens = 0
        self.started_at = time.perf_counter()
        self.first_audio_at: float | None = None
        self._closed = False

    # ---- input ---------------------------------------------------------------------------
    def _check_open(self, kind: str) -> None:
        if self._input_ended:
            raise SessionError(ErrorCode.INVALID_ARGUMENT, f"request: {kind} after end_of_input")
        self.last_input_at = time.perf_counter()

    def push_text(self, text: str) -> None:
        self._check_open("text")
        self.text_chars += len(text)
        if self.text_chars > self.engine.max_text_chars:
            raise SessionError(
                ErrorCode.INVALID_ARGUMENT,
                f"text: {self.text_chars} characters exceeds the limit of "
                f"{self.engine.max_text_chars} per stream",
                field="text",
            )
        for segment in self.segmenter.push(text):
            self._add_segment(segment)

    def flush(self) -> None:
        self._check_open("flush")
        for segment in self.segmenter.flush():
            self._add_segment(segment)

    def end_input(self) -> None:
        self._check_open("end_of_input")
        for segment in self.segmenter.flush():
            self._add_segment(segment)
        self._input_ended = True
        self._input_changed.set()
        if not self._segment_list:
            raise SessionError(ErrorCode.INVALID_ARGUMENT, "text: no text to synthesize", "text")
        self._segments.put_nowait(None)

    def cancel(self) -> None:
        """Barge-in: stop generating and sending now."""
        self._cancelled.set()
        self._generation.cancel()
        self._interrupt_decoding()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def segment_count(self) -> int:
        """Segments made so far: after `flush()`, every text sent is in one of them (a
        transport acknowledges a flush once this many segments have finished)."""
        return len(self._segment_list)

    def _add_segment(self, text: str) -> None:
        segment = _Segment(len(self._segment_list), text, time.perf_counter())
        self._segment_list.append(segment)
        self._segments.put_nowait(segment)
        self._input_changed.set()

    def fail(self, error: SessionError) -> None:
        if self._error is None:
            self._error = error
        self._failed.set()
        self._generation.cancel()
        self._interrupt_decoding()
        for callback in self._on_fail:
            callback()
        self._on_fail.clear()

    def _interrupt_decoding(self) -> None:
        """Stops every segment's decoding; `events()`, if it waits for a chunk, wakes and sees
        the cancel or the failure."""
        for segment in self._segment_list:
            if segment.decode is not None:
                segment.decode.interrupt()

    def on_fail(self, callback) -> None:
        """Call `callback()` (no arguments) once, when the session fails."""
        if self._failed.is_set():
            callback()
        else:
            self._on_fail.append(callback)

    @property
    def error(self) -> SessionError | None:
        return self._error

    def over_limit(self, limits: SessionLimits, now: float) -> SessionError | None:
        """The time limit this session has passed, as the error to end it with, or None."""
        if self._closed or self._failed.is_set() or self.cancelled:
            return None
        if 0 < limits.max_stream_s < now - self.started_at:
            return SessionError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"stream: open longer than the limit of {limits.max_stream_s:g} s for one "
                "stream; split long texts into several streams",
            )
        offered = self.event_offered_at
        if offered is not None and 0 < limits.stall_s < now - offered:
            return SessionError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"stream: the client read nothing for {limits.stall_s:g} s, the limit for a "
                "stream whose audio waits",
            )
        waiting = self.waiting_for_input_since
        if waiting is not None and 0 < limits.idle_s < now - max(waiting, self.last_input_at):
            return SessionError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"stream: idle, no message for {limits.idle_s:g} s while nothing was pending "
                "(the idle limit)",
            )
        return None

    # ---- generation ----------------------------------------------------------------------
    def _client_buffer(self, segment: _Segment) -> ClientBuffer:
        """Seconds of audio the client holds ahead of playback when this segment's stream has
        decoded a given number of samples: audio of earlier segments plus this one's, minus what
        has played since the first chunk went out (infinite before that).

        Segments are generated one after another, so when this segment's stream opens (when
        this is called), the earlier ones' codes are all in and their audio is known to the
        sample (a code is `samples_per_token` samples): it is counted once, here. Their streams
        send it on their own deadlines."""
        per_code = self.engine.decoder.samples_per_token
        before = per_code * sum(e.codes_in for e in self._segment_list[: segment.index])

        def buffered_seconds(decoded_samples: int) -> float:
            if self.first_audio_at is None:
                return float("inf")
            played = time.perf_counter() - self.first_audio_at
            return (before + decoded_samples) / self.codec_rate - played

        return buffered_seconds

    async def _generate(self) -> None:
        engine = self.engine
        try:
            while (segment := await self._segments.get()) is not None:
                decode = engine.scheduler.open(
                    self.config.voice, self.config.streaming, self._client_buffer(segment)
                )
                segment.decode = decode
                segment.started.set()
                try:
                    tokens = engine.source.stream(
                        segment.text,
                        self.config.sampling,
                        request_id=f"{self.id}-{segment.index}",
                        language=self.config.language,
                    )
                except EmptyTextError:
                    # Punctuation alone ("...", "—"): nothing to say, and no reason to fail.
                    segment.codes_total = 0
                    decode.finish()
                    continue
                try:
                    # Codes in batches: whatever arrived since the last step, checked at once.
                    while codes := await tokens.next_codes():
                        decode.push(codes)
                        segment.codes_in += len(codes)
                finally:
                    await tokens.aclose()
                    self.generated_tokens += tokens.generated_tokens
                    self.dropped_tokens += tokens.dropped_tokens
                segment.codes_total = segment.codes_in
                decode.finish()
        except LLMUnavailableError as err:
            logger.warning("session %s: speech LLM unavailable: %s", self.id, err)
            message = err.client_message or "speech LLM unavailable; retry later"
            self.fail(SessionError(ErrorCode.UNAVAILABLE, message))
        except LLMRequestError as err:
            self.fail(
                SessionError(ErrorCode.INVALID_ARGUMENT, f"speech LLM rejected the request: {err}")
            )
        except LLMError as err:
            logger.error("session %s: speech LLM failed: %s", self.id, err)
            self.fail(SessionError(ErrorCode.INTERNAL, "speech LLM failed on this request"))
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug must end the stream with an error, not hang it
            logger.exception("session %s: generation failed", self.id)
            self.fail(SessionError(ErrorCode.INTERNAL, "speech generation failed"))

    # ---- output --------------------------------------------------------------------------
    async def _next_segment(self, index: int) -> _Segment | None:
        """Wait until segment `index` exists (None once input ended without it)."""
        while index >= len(self._segment_list):
            if self._input_ended:
                return None
            self._input_changed.clear()
            self.waiting_for_input_since = time.perf_counter()
            try:
                await self._wait_any(self._input_changed.wait())
            finally:
                self.waiting_for_input_since = None
        segment = self._segment_list[index]
        await self._wait_any(segment.started.wait())
        return segment

    async def _wait_any(self, awaitable):
        """Await `awaitable`, but stop early on cancel or failure."""
        task = asyncio.ensure_future(awaitable)
        cancel = asyncio.ensure_future(self._cancelled.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({task, cancel, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for other in (cancel, failed):
                other.cancel()
            if not task.done():
                task.cancel()
        self._raise_if_stopped()
        return task.result()

    def _raise_if_stopped(self) -> None:
        if self._error is not None:
            raise self._error
        if self.cancelled:
            raise asyncio.CancelledError

    async def _audio_of(self, segment: _Segment) -> AsyncIterator[torch.Tensor]:
        """The segment's audio chunks, in order, until its audio is complete."""
        try:
            async for chunk in segment.decode:
                yield chunk
        except DecodeInterrupted:
            self._raise_if_stopped()  # interrupted only on cancel or failure: one of them
            raise
        except DecodeFailed as err:
            logger.error("session %s: decoding failed: %s", self.id, err)
            # Non-finite samples arrive as DecodeFailed too: the batched forward flags them on
            # the device, so no chunk here holds any.
            raise SessionError(ErrorCode.INTERNAL, "decoding failed") from None

    async def _encode(self, chunk: torch.Tensor) -> EncodedAudio:
        """Encodes a chunk; resampling and Opus run on the engine's encode threads (they take
        milliseconds per chunk and release the GIL), PCM at the codec's rate inline."""
        if not self.encoder.costly:
            return self.encoder.encode(chunk.numpy())
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.engine.encode_pool, self.encoder.encode, chunk.numpy()
        )

    def _audio_event(self, encoded: EncodedAudio, segment_index: int, sequence: int) -> AudioOut:
        start = self.encoder.samples_out - encoded.num_samples
        return AudioOut(encoded, start, segment_index, sequence)

    async def events(self) -> AsyncIterator[Event]:
        """Events in order; ends after the Summary, or quietly after cancel.

        Iterate with `contextlib.aclosing(session.events())`, or the generator's cleanup runs
        whenever the garbage collector gets to it. The time each event waits to be taken is
        what the stall limit measures.
        """
        async with contextlib.aclosing(self._events()) as events:
            async for event in events:
                self.event_offered_at = time.perf_counter()
                try:
                    yield event
                finally:
                    self.event_offered_at = None

    def _out_position(self, codec_sample: int) -> int:
        """A position in the codec's samples as a position in the output stream. The
        resampler's output is aligned in time with its input (it holds back its last samples
        until more come, it does not delay them), so this is where that instant is sent."""
        return round(codec_sample * self.encoder.out_rate / self.codec_rate)

    def _words_due(
        self, timeline: WordTimeline, segment: _Segment, start: int, before: int
    ) -> WordsOut | None:
        """The words of `segment` that start before `before` (codec samples from the segment's
        start `start`), timed, in output positions; all of them once its length is known."""
        spt = self.engine.decoder.samples_per_token
        total = None if segment.codes_total is None else segment.codes_total * spt
        if segment.samples is not None:  # all decoded: the length as counted
            total = segment.samples
        words = timeline.due(before, segment.codes_in * spt, total)
        if not words:
            return None
        return WordsOut(
            segment.index,
            [
                TimedWord(
                    w.text,
                    self._out_position(start + w.start_sample),
                    self._out_position(start + w.end_sample),
                )
                for w in words
            ],
        )

    async def _events(self) -> AsyncIterator[Event]:
        sequence = 0
        pending_header = self.encoder.stream_header()  # Ogg headers ride on the first chunk
        codec_samples = 0  # the stream's audio so far, in the codec's samples
        index = 0
        try:
            while (segment := await self._next_segment(index)) is not None:
                start = codec_samples
                yield SegmentStarted(segment.index, segment.text, self._out_position(start))
                timeline = None
                if self.config.word_timestamps:
                    timeline = WordTimeline(
                        split_words(segment.text), self.engine.decoder.samples_per_token
                    )
                samples = 0
                async with contextlib.aclosing(self._audio_of(segment)) as chunks:
                    async for chunk in chunks:
                        if self.first_audio_at is None:
                            self.first_audio_at = time.perf_counter()
                        samples += chunk.numel()
                        encoded = await self._encode(chunk)
                        if pending_header:
                            encoded.data = pending_header + encoded.data
                            pending_header = b""
                        if timeline is not None:  # no word reaches the client after its audio
                            words = self._words_due(timeline, segment, start, samples)
                            if words is not None:
                                yield words
                        if not encoded.empty:
                            yield self._audio_event(encoded, segment.index, sequence)
                            sequence += 1
                segment.samples = samples
                codec_samples += samples
                if timeline is not None:
                    words = self._words_due(timeline, segment, start, samples)
                    if words is not None:
                        yield words
                yield SegmentFinished(
                    segment.index,
                    segment.text,
                    self._out_position(start),
                    self._out_position(codec_samples),
                )
                index += 1
            if self._error is not None:
                raise self._error
            tail = self.encoder.finish()
            if pending_header:
                tail.data = pending_header + tail.data
            if not tail.empty:
                yield self._audio_event(tail, max(index - 1, 0), sequence)
            yield self._summary()
        except asyncio.CancelledError:
            if not self.cancelled:
                raise
            return

    def time_to_first_audio_ms(self) -> float:
        """From the request that completed the first segment to its first audio (0 before
        any audio)."""
        if self.first_audio_at is None:
            return 0.0
        first = self._segment_list[0].ready_at if self._segment_list else self.started_at
        return (self.first_audio_at - first) * 1000

    def _summary(self) -> Summary:
        elapsed = time.perf_counter() - self.started_at
        audio_seconds = self.encoder.samples_out / self.encoder.out_rate
        return Summary(
            time_to_first_audio_ms=self.time_to_first_audio_ms(),
            audio_seconds=audio_seconds,
            generated_tokens=self.generated_tokens,
            dropped_tokens=self.dropped_tokens,
            real_time_factor=elapsed / audio_seconds if audio_seconds else 0.0,
            sample_rate_hz=self.encoder.out_rate,
            encoding=self.config.encoding,
            random_weights=self.engine.random_weights,
            request_id=self.id,
        )

    # ---- cleanup -------------------------------------------------------------------------
    async def close(self) -> None:
        """Abort generation, release decode streams; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._error is None:  # a reader still waiting in events() must not hang
            self._error = SessionError(
                ErrorCode.UNAVAILABLE, "the server is shutting down this stream"
            )
        self._failed.set()
        self._interrupt_decoding()
        self._generation.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._generation
        for segment in self._segment_list:
            if segment.decode is not None:
                segment.decode.close()
        self.engine.sessions.discard(self)
