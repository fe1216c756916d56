"""MioTTS for LiveKit Agents: `TTS`, a `tts.TTS` that streams both ways with aligned
transcripts.

One WebSocket to `/v1/conversation` per `TTS` instance, shared by all of its streams: each
`stream()` (and each `synthesize()`) is one context on it. `push_text` reaches the server as it
is pushed (no `StreamAdapter`, no sentence tokenizer here: the server cuts sentences and clauses
itself); `flush()` speaks what was pushed so far; `end_input()` ends the context, and the
stream ends once its audio is out; `aclose()` cancels the context on the server (its audio
stops, its LLM request is aborted, the connection stays). Timed transcripts come from the
server's word timings (estimates: MioTTS has no aligner, docs/http.md).

    from miotts_stream.integrations.livekit import TTS

    tts = TTS(base_url="http://127.0.0.1:8080", voice="en_female")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    APIConnectionError,
    APIConnectOptions,
    APIStatusError,
    APITimeoutError,
    tts,
)
from livekit.agents.types import TimedString

from miotts_stream.conversation_protocol import SUBPROTOCOL, ClientMessage, ServerMessage

from . import protocol

# The server's error codes (gRPC names) as HTTP statuses, so that LiveKit's retry rule (no
# retry on a 4xx but 408, 429, 499) reads them right.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def _status_error(error: protocol.ServerError, request_id: str | None = None) -> APIStatusError:
    return APIStatusError(
        str(error), status_code=HTTP_STATUS.get(error.code, 500), request_id=request_id
    )


def _spaced(word: str) -> str:
    """A word as the transcript joins it: a space after it, but not after a character of a
    script written without spaces (Japanese words are characters)."""
    last = word[-1]
    unspaced = "\u3000" <= last <= "\u9fff" or "\uff00" <= last <= "\uffef"
    return word if unspaced else word + " "


@dataclass
class _Closed:
    error: Exception  # why the connection ended (delivered to every context still open)


class _Conversation:
    """One WebSocket conversation: messages out, messages in routed to their context."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.contexts: dict[str, asyncio.Queue] = {}
        self.closed: Exception | None = None
        self._reader = asyncio.create_task(self._read(), name="miotts-conversation")

    async def send(self, message: str) -> None:
        if self.closed is not None:
            raise APIConnectionError(f"MioTTS: the connection is closed ({self.closed})")
        await self.ws.send_str(message)

    def open(self, context_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.contexts[context_id] = queue
        return queue

    def release(self, context_id: str) -> None:
        self.contexts.pop(context_id, None)

    async def _read(self) -> None:
        header: dict[str, Any] | None = None
        error: Exception = APIConnectionError("MioTTS closed the connection")
        try:
            async for message in self.ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    if header is not None and header["context_id"] in self.contexts:
                        self.contexts[header["context_id"]].put_nowait((header, message.data))
                    header = None
                    continue
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(message.data)
                context_id = event.get("context_id")
                if event.get("type") == ServerMessage.AUDIO:
                    header = event
                elif context_id is None:
                    if event.get("type") == ServerMessage.ERROR:  # the conversation ends with it
                        error = _status_error(protocol.ServerError(event))
                elif context_id in self.contexts:
                    self.contexts[context_id].put_nowait(event)
        except Exception as e:  # a broken connection: every open context learns why
            error = APIConnectionError(f"MioTTS connection lost: {e!r}")
        finally:
            self.closed = error
            for queue in self.contexts.values():
                queue.put_nowait(_Closed(error))

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


class TTS(tts.TTS):
    """MioTTS as a LiveKit Agents TTS (see the module docstring)."""

    def __init__(
        self,
        *,
        base_url: str = "http://127.0.0.1:8080",
        voice: str = "en_female",
        api_key: str | None = None,
        sample_rate: int = 24000,
        language: str | None = None,
        http_session: aiohttp.ClientSession | None = None,
    ) -> None:
        """Args:
        base_url: the server's HTTP address (`ws://`, `https://` and `wss://` work too).
        voice: a preset, an alias (OpenAI's names) or a stored voice id.
        api_key: the server's API key, when it has keys.
        sample_rate: the output rate (PCM 16-bit, mono; the server resamples).
        language: "en" or "ja" (text normalisation); None: the server's "auto".
        http_session: an aiohttp session to connect with (one is made otherwise).
        """
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
            sample_rate=sample_rate,
            num_channels=1,
        )
        self._url = protocol.conversation_url(base_url)
        self._api_key = api_key
        self._voice = voice
        self._language = language
        self._session = http_session
        self._own_session = http_session is None
        self._conversation: _Conversation | None = None
        self._config_voice: str | None = None  # the voice in the conversation's config
        self._connecting = asyncio.Lock()
        self._prewarm: asyncio.Task | None = None

    @property
    def model(self) -> str:
        return "miotts"

    @property
    def provider(self) -> str:
        return "miotts-stream"

    def update_options(self, *, voice: str | None = None) -> None:
        """A new voice for the streams that start from now on."""
        if voice is not None:
            self._voice = voice

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        return self._synthesize_with_stream(text, conn_options=conn_options)

    def stream(
        self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> SynthesizeStream:
        return SynthesizeStream(tts=self, conn_options=conn_options)

    def prewarm(self) -> None:
        async def connect() -> None:
            with contextlib.suppress(Exception):
                await self._connect(DEFAULT_API_CONNECT_OPTIONS.timeout)

        if self._prewarm is None or self._prewarm.done():
            self._prewarm = asyncio.create_task(connect())

    async def aclose(self) -> None:
        if self._prewarm is not None:
            self._prewarm.cancel()
        if self._conversation is not None:
            await self._conversation.aclose()
            self._conversation = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _connect(self, timeout: float) -> _Conversation:
        """The open conversation, or a new one (its config taken: `ready` received)."""
        async with self._connecting:
            if self._conversation is not None and self._conversation.closed is None:
                return self._conversation
            if self._session is None:
                self._session = aiohttp.ClientSession()
            try:
                ws = await asyncio.wait_for(
                    self._session.ws_connect(
                        self._url,
                        headers=protocol.auth_headers(self._api_key),
                        protocols=(SUBPROTOCOL,),
                        max_msg_size=0,
                    ),
                    timeout,
                )
                await ws.send_str(
                    protocol.config_message(self._voice, self.sample_rate, language=self._language)
                )
                first = await ws.receive(timeout=timeout)
            except TimeoutError:
                raise APITimeoutError(f"MioTTS at {self._url}: no answer in {timeout} s") from None
            except aiohttp.WSServerHandshakeError as e:  # the key (the headers stay out)
                raise APIStatusError(
                    f"MioTTS at {self._url} refused the connection (HTTP {e.status})",
                    status_code=e.status,
                ) from None
            except aiohttp.ClientError as e:
                raise APIConnectionError(f"MioTTS at {self._url} cannot be reached: {e}") from None
            event = json.loads(first.data) if first.type == aiohttp.WSMsgType.TEXT else {}
            if event.get("type") != ServerMessage.READY:
                await ws.close()
                if event.get("type") == ServerMessage.ERROR:  # the config: an unknown voice, ...
                    raise _status_error(protocol.ServerError(event))
                raise APIConnectionError(f"MioTTS at {self._url}: no ready message")
            self._conversation = _Conversation(ws)
            self._config_voice = self._voice
            return self._conversation


class SynthesizeStream(tts.SynthesizeStream):
    """One context of the TTS's conversation."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions):
        super().__init__(tts=tts, conn_options=conn_options)
        self._tts: TTS = tts
        self._voice = tts._voice

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        context_id = uuid.uuid4().hex
        output_emitter.initialize(
            request_id=context_id,
            sample_rate=self._tts.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
            stream=True,
        )
        conversation = await self._tts._connect(self._conn_options.timeout)
        events = conversation.open(context_id)
        over = False  # done, cancelled or failed: nothing to cancel on the server
        opened = False

        async def send_input() -> None:
            nonlocal opened
            voice = self._voice if self._voice != self._tts._config_voice else None
            async for data in self._input_ch:
                if isinstance(data, self._FlushSentinel):
                    if opened:
                        await conversation.send(
                            protocol.context_message(ClientMessage.FLUSH, context_id)
                        )
                    continue
                self._mark_started()
                await conversation.send(protocol.text_message(context_id, data, voice))
                opened, voice = True, None
            if opened:
                await conversation.send(protocol.context_message(ClientMessage.END, context_id))
            else:  # no text at all: there is no context to end
                events.put_nowait({"type": ServerMessage.DONE})

        sender = asyncio.create_task(send_input(), name="miotts-input")
        try:
            segment_started = False
            while True:
                event = await events.get()
                if isinstance(event, _Closed):
                    raise event.error
                if not segment_started:
                    output_emitter.start_segment(segment_id=context_id)
                    segment_started = True
                if isinstance(event, tuple):  # an audio header and its frame
                    output_emitter.push(event[1])
                    continue
                kind = event.get("type")
                if kind == ServerMessage.WORDS:
                    for word in event["words"]:
                        output_emitter.push_timed_transcript(
                            TimedString(
                                _spaced(word["word"]),
                                start_time=word["start_sample"] / self._tts.sample_rate,
                                end_time=word["end_sample"] / self._tts.sample_rate,
                            )
                        )
                elif kind == ServerMessage.DONE:
                    over = True
                    output_emitter.end_input()
                    break
                elif kind == ServerMessage.ERROR:
                    over = True
                    raise _status_error(protocol.ServerError(event), context_id)
                elif kind == ServerMessage.CANCELLED:
                    over = True
                    break
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            conversation.release(context_id)
            if opened and not over and conversation.closed is None:
                # aclose(), or a failure on our side: the server stops the context's work.
                with contextlib.suppress(Exception):
                    await conversation.send(
                        protocol.context_message(ClientMessage.CANCEL, context_id)
                    )
