"""`/v1/conversation`: one WebSocket carrying many utterances ("contexts"), for voice agents
and phone calls (protocol `miotts.conversation.v1`, docs/http.md).

The client sends a `config` first (the gRPC `SynthesisConfig` fields, every context's
defaults), then messages that name their `context_id`: `text` (an id not seen before opens a
context), `flush` (with an `id`, acknowledged by `flushed`), `end`, `cancel` (acknowledged by
`cancelled`, after which nothing of that context comes), and `close` to end the conversation.
The server sends `ready`, then per context `segment`, `words`, `audio` headers each followed by
one binary frame, `flushed`, `done` (its summary), `cancelled` or `error`; an `error` without a
`context_id` ends the conversation, with a close code from the shared table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import web

from miotts_stream.audio.encoders import output_rate
from miotts_stream.conversation_protocol import (
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    ClientMessage,
    ServerMessage,
)
from miotts_stream.service.access import ApiKey
from miotts_stream.service.admission import Admission, invalid
from miotts_stream.service.conversation import (
    ContextCancelled,
    ContextFailed,
    ContextFlushed,
    Conversation,
    ConversationEnd,
    ConversationEvent,
    run_conversation,
)
from miotts_stream.service.engine import (
    AudioOut,
    ErrorCode,
    SegmentFinished,
    SegmentStarted,
    SessionError,
    Summary,
    WordsOut,
)

from .errors import HTTP_ERRORS, CloseCode
from .websocket import (
    AcceptedSocket,
    ClientGone,
    accept_socket,
    audio_header,
    parse_config,
    parse_message,
    segment_message,
    summary_message,
    words_message,
)

METHOD = "WS /v1/conversation"


def _context_id(fields: dict[str, Any]) -> str:
    context_id = fields.get("context_id")
    if not isinstance(context_id, str) or not context_id or len(context_id) > 256:
        raise invalid("context_id", "required: a string of 1 to 256 characters")
    return context_id


def _known_fields(fields: dict[str, Any], *names: str) -> None:
    unknown = sorted(set(fields) - {"context_id", *names})
    if unknown:
        raise invalid(unknown[0], "unknown field")


class ConversationSocket:
    """One WebSocket, one conversation: a reader feeds it, its player sends the contexts."""

    def __init__(
        self, ws: web.WebSocketResponse, admission: Admission, key: ApiKey | None, request_id: str
    ):
        self.ws = ws
        self.admission = admission
        self.key = key
        self.request_id = request_id
        self._sending: asyncio.Future | None = None  # the message going out now

    # ---- out ------------------------------------------------------------------------------
    async def _send(self, message: dict[str, Any], data: bytes | None = None) -> None:
        """One message (an audio header with its frame) out whole: the conversation sends one
        at a time, and a player cancelled half way (the conversation ended) still finishes the
        one it started, so that no header goes without its frame (`fail` waits for it)."""

        async def send() -> None:
            await self.ws.send_str(json.dumps(message, separators=(",", ":")))
            if data is not None:
                await self.ws.send_bytes(data)

        self._sending = asyncio.ensure_future(send())
        # Its failure (a client gone) is its awaiter's; if the awaiter was cancelled, nobody's.
        self._sending.add_done_callback(lambda sent: sent.cancelled() or sent.exception())
        await asyncio.shield(self._sending)

    async def send(self, context_id: str, event: ConversationEvent) -> None:
        """The conversation's events (a ConversationSink)."""
        tag = {"context_id": context_id}
        if isinstance(event, AudioOut):
            data = event.audio.data or b"".join(event.audio.packets)
            await self._send(audio_header(event, len(data)) | tag, data)
        elif isinstance(event, SegmentStarted | SegmentFinished):
            await self._send(segment_message(event) | tag)
        elif isinstance(event, WordsOut):
            await self._send(words_message(event) | tag)
        elif isinstance(event, Summary):
            await self._send(summary_message(event, ServerMessage.DONE.value) | tag)
        elif isinstance(event, ContextFlushed):
            flushed = ServerMessage.FLUSHED.value
            await self._send({"type": flushed, **tag, "id": event.flush_id})
        elif isinstance(event, ContextCancelled):
            await self._send({"type": ServerMessage.CANCELLED.value, **tag})
        elif isinstance(event, ContextFailed):
            await self._send(self._error(event.error) | tag)

    @staticmethod
    def _error(err: SessionError) -> dict[str, Any]:
        error = {
            "type": ServerMessage.ERROR.value,
            "code": err.code.value,
            "message": str(err),
        }
        if err.field is not None:
            error["field"] = err.field
        return error

    async def fail(self, err: SessionError) -> None:
        """The conversation ends with `err`: the error, then the close code of the table."""
        with contextlib.suppress(ConnectionError, RuntimeError):  # the client may be gone
            if self._sending is not None:
                await self._sending  # an audio frame half sent goes out first
            await self._send(self._error(err))
        reason = str(err).encode()[:120].decode(errors="ignore")  # a close reason: <= 123 bytes
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=HTTP_ERRORS[err.code].close_code, message=reason.encode())

    # ---- in -------------------------------------------------------------------------------
    async def run(self) -> None:
        engine = self.admission.engine
        code, detail = ErrorCode.OK, ""
        conversation = None
        try:
            try:
                first = await self.ws.receive(timeout=engine.limits.idle_s or None)
            except TimeoutError:
                raise SessionError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"config: none received within {engine.limits.idle_s:g} s (--idle-timeout-s)",
                    "config",
                ) from None
            kind, fields = parse_message(first, ClientMessage)
            if kind is not ClientMessage.CONFIG:
                raise invalid("config", f"the first message must be a config, got {kind.value}")
            version = fields.pop("version", PROTOCOL_VERSION)
            if version != PROTOCOL_VERSION:
                raise invalid(
                    "version", f"{version!r} is not a protocol version this server speaks (1)"
                )
            conversation = await Conversation.start(
                self.admission,
                parse_config(fields),
                self,
                method=METHOD,
                key=self.key,
                request_id=self.request_id,
            )
            settings = self.admission.session_config(conversation.config)
            rate = output_rate(
                settings.encoding, settings.sample_rate_hz, engine.decoder.sample_rate
            )
            await self._send(
                {
                    "type": ServerMessage.READY.value,
                    "version": PROTOCOL_VERSION,
                    "conversation_id": self.request_id,
                    "encoding": settings.encoding.value,
                    "sample_rate_hz": rate,
                    "word_timestamps": settings.word_timestamps,
                    "random_weights": engine.random_weights,
                }
            )
            end = await run_conversation(
                conversation, self._read(conversation), self.admission.conversation_idle_s
            )
            if isinstance(end, SessionError):
                raise end
            if end is ConversationEnd.GONE:
                code = ErrorCode.CANCELLED
            else:
                await self.ws.close(code=CloseCode.NORMAL, message=b"done")
        except ClientGone:
            code = ErrorCode.CANCELLED
        except SessionError as err:
            code, detail = err.code, f": {err}"
            await self.fail(err)
        except ConnectionError:
            code = ErrorCode.CANCELLED
        finally:
            if conversation is not None:
                detail += f" ({conversation.contexts_opened} contexts)"
            self.admission.record(METHOD, code, self.key, self.request_id, detail)

    async def _read(self, conversation: Conversation) -> None:
        """Feed the client's messages into the conversation until the socket closes;
        SessionError for a message that ends the conversation (not one context)."""
        while True:
            try:
                kind, fields = parse_message(await self.ws.receive(), ClientMessage)
            except ClientGone:
                return
            if kind is ClientMessage.CONFIG:
                raise invalid("config", "sent twice; only the first message may be a config")
            if kind is ClientMessage.CLOSE:
                _known_fields(fields)
                conversation.close()
                continue
            context_id = _context_id(fields)
            if kind is ClientMessage.TEXT:
                _known_fields(fields, "text", "config")
                text = fields.get("text")
                if not isinstance(text, str):
                    raise invalid("text", "must be a string")
                override = None
                if "config" in fields:
                    if not isinstance(fields["config"], dict):
                        raise invalid("config", "must be an object")
                    override = parse_config(fields["config"])
                await conversation.text(context_id, text, override)
            elif kind is ClientMessage.FLUSH:
                _known_fields(fields, "id")
                await conversation.flush(context_id, fields.get("id"))
            elif kind is ClientMessage.END:
                _known_fields(fields)
                await conversation.end(context_id)
            else:
                _known_fields(fields)
                await conversation.cancel(context_id)


async def handle_conversation(
    request: web.Request, admission: Admission, *, heartbeat_s: float, max_message_bytes: int
) -> web.StreamResponse:
    accepted = await accept_socket(
        request,
        admission,
        method=METHOD,
        subprotocol=SUBPROTOCOL,
        heartbeat_s=heartbeat_s,
        max_message_bytes=max_message_bytes,
    )
    if not isinstance(accepted, AcceptedSocket):
        return accepted
    await ConversationSocket(accepted.ws, admission, accepted.key, accepted.request_id).run()
    return accepted.ws
