"""A conversation: one connection carrying many utterances ("contexts"), as a voice agent's
turns or a phone call, over the WebSocket (`/v1/conversation`) or gRPC (`Converse`).

Each context is one engine session, opened by its first text with the conversation's config
(resolved once: a stored voice is looked up, reference audio embedded, when the conversation
starts) and run to its end by `run_session`. Contexts are spoken in the order they were opened:
one plays (its events go to the client) while later ones already generate, so the next turn's
audio follows at once. What the conversation adds to the sessions:

- the order: one task plays the contexts in turn;
- per-context flush acknowledgements (`ContextFlushed`, once the audio of the text before the
  flush is out), and cancel acknowledgements (`ContextCancelled`: none of that context's audio
  follows it, and its engine work has stopped);
- a context's failure is that context's (`ContextFailed`); the conversation goes on.

The transport parses the client's messages and calls `text`, `flush`, `end`, `cancel` and
`close`; it delivers what comes out through a `ConversationSink`, which the conversation calls
one event at a time. A context's positions (samples, word times) count from its own start.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from .access import ApiKey
from .admission import Admission, invalid
from .engine import ErrorCode, Event, SegmentFinished, SessionError, SynthesisSession
from .pb.miotts.v1 import tts_pb2
from .runner import run_session

logger = logging.getLogger(__name__)

# The fields of the conversation's config a context may set for itself (with its first text).
CONTEXT_CONFIG_FIELDS = ("voice", "generation", "language")
# Ids of contexts that are over, remembered so that late messages for them are recognised
# (and dropped) rather than opening a new context.
REMEMBERED_IDS = 4096


@dataclass
class ContextFlushed:
    flush_id: Any  # the client's id of the flush


@dataclass
class ContextCancelled:
    pass


@dataclass
class ContextFailed:
    error: SessionError


ConversationEvent = Event | ContextFlushed | ContextCancelled | ContextFailed


class ConversationSink(Protocol):
    """How one transport delivers a conversation's events (called one at a time)."""

    async def send(self, context_id: str, event: ConversationEvent) -> None: ...


@dataclass(eq=False)
class _Context:
    id: str
    session: SynthesisSession
    flushes: deque[tuple[int, Any]] = field(default_factory=deque)  # (segments, client's id)
    segments_finished: int = 0
    playing: bool = False
    ended: bool = False  # end (or close) was received
    cancelled: bool = False  # cancel was received: it is acknowledged, whatever came first


class _ContextSink:
    """One context's session outcome, as the conversation's events."""

    def __init__(self, conversation: Conversation, context: _Context):
        self.conversation = conversation
        self.context = context

    async def send(self, event: Event) -> None:
        await self.conversation._send(self.context.id, event)
        if isinstance(event, SegmentFinished):
            self.context.segments_finished = event.segment_index + 1
            await self.conversation._ack_flushes(self.context)

    async def fail(self, error: SessionError) -> None:
        await self.conversation._send(self.context.id, ContextFailed(error))


class Conversation:
    """The contexts of one connection (see the module docstring). `play()` runs until the
    conversation is closed and its last context is over; `abort()` ends it at once."""

    def __init__(
        self,
        admission: Admission,
        config: tts_pb2.SynthesisConfig,
        sink: ConversationSink,
        *,
        method: str,
        key: ApiKey | None,
        request_id: str,
    ):
        self.admission = admission
        self.config = config  # resolved (`start`): every context opens without a lookup
        self.sink = sink
        self.method = method
        self.key = key
        self.request_id = request_id
        self._contexts: OrderedDict[str, _Context] = OrderedDict()  # open, in play order
        self._over: OrderedDict[str, None] = OrderedDict()  # ids of contexts that are over
        self._opened = 0
        self._closed = False
        self._changed = asyncio.Event()  # a context was opened, or the conversation closed
        self._send_lock = asyncio.Lock()
        self._active_at = time.perf_counter()  # the last message, or the last context's end

    @classmethod
    async def start(
        cls,
        admission: Admission,
        config: tts_pb2.SynthesisConfig,
        sink: ConversationSink,
        *,
        method: str,
        key: ApiKey | None,
        request_id: str,
    ) -> Conversation:
        """A conversation whose config is checked (SessionError naming the field) and whose
        voice is resolved once, for all of its contexts."""
        if admission.draining:
            raise SessionError(
                ErrorCode.UNAVAILABLE, "server: shutting down; retry on another instance"
            )
        resolved = await admission.resolve_voice(config)
        admission.session_config(resolved)  # every field checked now, not at the first text
        return cls(admission, resolved, sink, method=method, key=key, request_id=request_id)

    @property
    def idle(self) -> bool:
        """No context is open."""
        return not self._contexts

    @property
    def contexts_opened(self) -> int:
        return self._opened

    def touch(self) -> None:
        """A message came from the client (the idle limit counts from the last)."""
        self._active_at = time.perf_counter()

    async def idle_too_long(self, limit_s: float) -> SessionError:
        """Returns, as the error to end the conversation with, once no context has been open
        and no message has come for `limit_s`."""
        while True:
            wait = limit_s
            if self.idle:
                wait = self._active_at + limit_s - time.perf_counter()
                if wait <= 0:
                    return SessionError(
                        ErrorCode.DEADLINE_EXCEEDED,
                        f"conversation: no context open and no message for {limit_s:g} s, the "
                        "limit for an idle conversation; reconnect when there is more to say",
                    )
            await asyncio.sleep(max(wait, 0.01))

    # ---- the client's messages ------------------------------------------------------------
    async def text(
        self, context_id: str, text: str, config: tts_pb2.SynthesisConfig | None = None
    ) -> None:
        """Append text to a context; an id not seen before opens one (with `config`'s fields
        over the conversation's: voice, generation, language)."""
        self.touch()
        context = self._contexts.get(context_id)
        if context is None:
            if context_id in self._over:
                return  # a late message for a context that is over (cancelled, failed, done)
            context = await self._open(context_id, config)
            if context is None:
                return
        elif config is not None:
            self._fail(context, invalid("config", "only a context's first text may carry one"))
            return
        try:
            context.session.push_text(text)
        except SessionError as err:
            self._fail(context, err)

    async def flush(self, context_id: str, flush_id: Any = None) -> None:
        """Speak the context's pending text now; `ContextFlushed` once its audio is out."""
        self.touch()
        context = await self._known(context_id)
        if context is None:
            return
        try:
            context.session.flush()
        except SessionError as err:
            self._fail(context, err)
            return
        context.flushes.append((context.session.segment_count, flush_id))
        await self._ack_flushes(context)

    async def end(self, context_id: str) -> None:
        """The context's text is complete: its audio finishes, then its Summary (done)."""
        self.touch()
        context = await self._known(context_id)
        if context is None:
            return
        context.ended = True
        try:
            context.session.end_input()
        except SessionError as err:
            self._fail(context, err)

    async def cancel(self, context_id: str) -> None:
        """Stop the context now. `ContextCancelled` follows the last of its audio (at once
        for a context that has not played yet, or is over or unknown)."""
        self.touch()
        context = self._contexts.get(context_id)
        if context is None:
            await self._send(context_id, ContextCancelled())
            return
        context.cancelled = True
        context.session.cancel()  # its generation and decoding stop now
        if not context.playing:  # the player would only find it cancelled: end it here
            del self._contexts[context_id]
            self._remember(context_id)
            await self._finish_unplayed(context, ErrorCode.CANCELLED)
            await self._send(context_id, ContextCancelled())

    def close(self) -> None:
        """No more contexts: those open finish what they were sent (a context that was sent
        no text is dropped), then `play()` returns."""
        self._closed = True
        for context in list(self._contexts.values()):
            if context.ended:
                continue
            context.ended = True
            if context.session.text_chars == 0:
                context.session.cancel()
                continue
            try:
                context.session.end_input()
            except SessionError as err:  # only whitespace: it fails, as an end would
                self._fail(context, err)
        self.touch()
        self._changed.set()

    # ---- playing --------------------------------------------------------------------------
    async def play(self) -> None:
        """Play the contexts in order until the conversation is closed and none is left."""
        while True:
            while not self._contexts:
                if self._closed:
                    return
                self._changed.clear()
                await self._changed.wait()
            context = next(iter(self._contexts.values()))
            context.playing = True
            try:
                code = await run_session(
                    self.admission,
                    context.session,
                    _ContextSink(self, context),
                    method=self.method,
                    key=self.key,
                )
            finally:
                self._contexts.pop(context.id, None)
                self._remember(context.id)
                self.touch()  # the idle limit counts from the last context's end too
            if code is ErrorCode.CANCELLED or context.cancelled:  # (a cancel may come just
                await self._send(context.id, ContextCancelled())  # after its last audio)

    async def abort(self) -> None:
        """The connection is over: every context not played yet is closed (the one playing is
        closed by its runner, when the player is cancelled)."""
        self._closed = True
        for context in list(self._contexts.values()):
            if context.playing:
                continue
            del self._contexts[context.id]
            context.session.cancel()
            await self._finish_unplayed(context, ErrorCode.CANCELLED)
        self._changed.set()

    # ---- inside ---------------------------------------------------------------------------
    async def _open(
        self, context_id: str, override: tts_pb2.SynthesisConfig | None
    ) -> _Context | None:
        self._opened += 1
        session_id = f"{self.request_id}.{self._opened}"
        config = self.config
        try:
            if self._closed:
                raise invalid("context_id", "the conversation was closed; no new context opens")
            if override is not None:
                config = self._with_override(override)
            session = await self.admission.open(config, self.key, session_id)
        except SessionError as err:
            self._remember(context_id)
            self.admission.record(self.method, err.code, self.key, session_id, f": {err}")
            await self._send(context_id, ContextFailed(err))
            return None
        context = _Context(context_id, session)
        self._contexts[context_id] = context
        self._changed.set()
        return context

    def _with_override(self, override: tts_pb2.SynthesisConfig) -> tts_pb2.SynthesisConfig:
        for descriptor, _ in override.ListFields():
            if descriptor.name not in CONTEXT_CONFIG_FIELDS:
                raise invalid(
                    f"config.{descriptor.name}",
                    f"is the conversation's; a context may set only "
                    f"{', '.join(CONTEXT_CONFIG_FIELDS)}",
                )
        merged = tts_pb2.SynthesisConfig()
        merged.CopyFrom(self.config)
        merged.MergeFrom(override)
        return merged

    async def _known(self, context_id: str) -> _Context | None:
        """The open context `context_id`; None for one that is over (its late messages are
        dropped) or one never opened (reported to the client as that context's error)."""
        context = self._contexts.get(context_id)
        if context is None and context_id not in self._over:
            error = invalid("context_id", f"no context {context_id!r} is open; text opens one")
            await self._send(context_id, ContextFailed(error))
        return context

    def _fail(self, context: _Context, error: SessionError) -> None:
        """The context fails: reported in its turn, when the player reaches it."""
        context.session.fail(error)

    async def _finish_unplayed(self, context: _Context, code: ErrorCode) -> None:
        await context.session.close()
        self.admission.release(self.key)
        self.admission.record(self.method, code, self.key, context.session.id)

    def _remember(self, context_id: str) -> None:
        self._over[context_id] = None
        while len(self._over) > REMEMBERED_IDS:
            self._over.popitem(last=False)

    async def _ack_flushes(self, context: _Context) -> None:
        while context.flushes and context.flushes[0][0] <= context.segments_finished:
            _, flush_id = context.flushes.popleft()
            await self._send(context.id, ContextFlushed(flush_id))

    async def _send(self, context_id: str, event: ConversationEvent) -> None:
        async with self._send_lock:  # the player and the reader both send
            await self.sink.send(context_id, event)


class ConversationEnd(enum.Enum):
    DONE = "done"  # closed by the client, every context over
    GONE = "gone"  # the client went away, or stopped reading


async def run_conversation(
    conversation: Conversation, reader, idle_timeout_s: float
) -> ConversationEnd | SessionError:
    """Play `conversation` while `reader` (a coroutine: the transport's loop over the client's
    messages; it returns when the client goes away, raises SessionError for a message that
    ends the conversation) feeds it, and the idle limit watches it. Returns how it ended: DONE,
    GONE, or the error to send the client; every context is over when it returns."""
    player = asyncio.ensure_future(conversation.play())
    tasks = {player, asyncio.ensure_future(reader)}
    if idle_timeout_s > 0:
        tasks.add(asyncio.ensure_future(conversation.idle_too_long(idle_timeout_s)))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finished = done.pop()
        if finished is player:
            if player.cancelled() or player.exception() is not None:
                return ConversationEnd.GONE  # a writer blocked on a client that stopped reading
            return ConversationEnd.DONE
        if finished.cancelled():
            return ConversationEnd.GONE
        error = finished.exception()
        if isinstance(error, SessionError):
            return error
        if error is not None:
            logger.error("conversation %s: %r", conversation.request_id, error)
            return SessionError(ErrorCode.INTERNAL, "internal error")
        result = finished.result()
        return result if isinstance(result, SessionError) else ConversationEnd.GONE
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await conversation.abort()
