"""MioTTS for Pipecat: `MioTTSService`, a WebSocket TTS service with word timestamps.

Built on Pipecat's own WebSocket TTS base (`WebsocketTTSService`), as its multi-context
services are: one connection to `/v1/conversation` for the whole pipeline, a context per
turn (Pipecat's context ids), `cancel` of the turn's context on an interruption (no
reconnect), words as `TTSTextFrame`s timed by the server's word timings (estimates: MioTTS has
no aligner, docs/http.md), PCM at the pipeline's output rate (8 kHz for telephony included;
the server resamples).

    from miotts_stream.integrations.pipecat import MioTTSService

    tts = MioTTSService(base_url="http://127.0.0.1:8080", voice="en_female")

Text reaches the server token by token by default (`TextAggregationMode.TOKEN`): the server
cuts sentences and clauses itself, as soon as the text allows. With
`text_aggregation_mode=TextAggregationMode.SENTENCE`, Pipecat's sentences are sent and each is
spoken at once (a flush after each). Errors surface as `ErrorFrame`s that name the cause: a
voice the server does not know, a key it refuses, a server it cannot reach.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, TTSAudioRawFrame, TTSStoppedFrame
from pipecat.processors.frame_processor import FrameProcessorSetup
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TextAggregationMode, WebsocketTTSService
from pipecat.transcriptions.language import Language
from websockets.exceptions import InvalidStatus
from websockets.protocol import State

from miotts_stream.conversation_protocol import SUBPROTOCOL, ClientMessage, ServerMessage

from . import protocol

# Conversation-level errors that another connection would only repeat: the configuration or
# the key is wrong. Others (the server draining, an idle conversation closed) are worth a
# reconnect.
_PERMANENT = {"INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "FAILED_PRECONDITION"}
_PERMANENT_HTTP = {401, 403, 404}


def _language(language: Language | str | None) -> str | None:
    """Pipecat's language as the server's ("en", "ja"), or None (the server's "auto")."""
    if language is None:
        return None
    base = str(getattr(language, "value", language)).split("-")[0].lower()
    return base if base in ("en", "ja") else None


class MioTTSService(WebsocketTTSService):
    """MioTTS over one WebSocket per pipeline (see the module docstring)."""

    Settings = TTSSettings
    _settings: TTSSettings

    def __init__(
        self,
        *,
        base_url: str = "http://127.0.0.1:8080",
        voice: str = "en_female",
        api_key: str | None = None,
        sample_rate: int | None = None,
        text_aggregation_mode: TextAggregationMode | None = None,
        settings: TTSSettings | None = None,
        **kwargs: Any,
    ):
        """Args:
        base_url: the server's HTTP address (`ws://`, `https://` and `wss://` work too).
        voice: a preset, an alias (OpenAI's names) or a stored voice id.
        api_key: the server's API key, when it has keys.
        sample_rate: the output rate; None: the pipeline's output rate.
        text_aggregation_mode: TOKEN (the default here) or SENTENCE.
        settings: runtime-updatable settings (voice, language), over the arguments.
        **kwargs: Pipecat's TTS service arguments.
        """
        defaults = TTSSettings(model="miotts", voice=voice, language=None)
        if settings is not None:
            defaults.apply_update(settings)
        super().__init__(
            text_aggregation_mode=text_aggregation_mode or TextAggregationMode.TOKEN,
            push_text_frames=False,  # words come timed from the server, as they are spoken
            pause_frame_processing=False,  # the server tags its audio with its context
            push_start_frame=True,
            sample_rate=sample_rate,
            settings=defaults,
            **kwargs,
        )
        self._url = protocol.conversation_url(base_url)
        self._api_key = api_key
        self._receive_task = None
        self._opened: set[str] = set()  # contexts that have sent text on this connection
        self._connection_voice: str | None = None  # the voice in this connection's config
        self._audio_header: dict[str, Any] | None = None  # the header of the next frame

    def can_generate_metrics(self) -> bool:
        return True

    def language_to_service_language(self, language: Language) -> str | None:
        return _language(language)

    # ---- the connection -------------------------------------------------------------------
    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)  # the output rate is known from here on
        await self._connect()

    async def _connect(self):
        await super()._connect()
        await self._connect_websocket()
        if self._websocket and not self._receive_task:
            self._receive_task = self.create_task(self._receive_task_handler(self._report_error))

    async def _disconnect(self):
        await super()._disconnect()
        if self._receive_task:
            await self.cancel_task(self._receive_task)
            self._receive_task = None
        await self._disconnect_websocket()

    async def _connect_websocket(self):
        if self._websocket and self._websocket.state is State.OPEN:
            return
        try:
            logger.debug(f"{self}: connecting to {self._url}")
            self._websocket = await self._websocket_connect(
                self._url,
                additional_headers=protocol.auth_headers(self._api_key),
                subprotocols=[SUBPROTOCOL],
                max_size=None,
            )
            voice = str(self._settings.voice)
            await self._websocket.send(
                protocol.config_message(
                    voice, self.sample_rate, language=_language(self._settings.language)
                )
            )
        except InvalidStatus as e:
            self._websocket = None
            status = e.response.status_code
            await self.push_error(
                f"MioTTS at {self._url} refused the connection (HTTP {status}): "
                f"{self._http_error_message(e)}",
                exception=e,
                force_treat_as_permanent=status in _PERMANENT_HTTP,
            )
            await self._call_event_handler("on_connection_error", f"HTTP {status}")
            return
        except OSError as e:
            self._websocket = None
            await self.push_error(f"MioTTS at {self._url} cannot be reached: {e}", exception=e)
            await self._call_event_handler("on_connection_error", str(e))
            return
        self._connection_voice = voice
        self._opened.clear()
        self._audio_header = None
        await self._call_event_handler("on_connected")

    @staticmethod
    def _http_error_message(error: InvalidStatus) -> str:
        """The server's error message from a refused handshake's body (an OpenAI error
        object), or the status's reason."""
        try:
            return json.loads(error.response.body)["error"]["message"]
        except (TypeError, ValueError, KeyError):
            return error.response.reason_phrase

    async def _disconnect_websocket(self):
        try:
            await self.stop_all_metrics()
            if self._websocket:
                await self._websocket.close()
        except Exception as e:
            await self.push_error(f"MioTTS: closing the connection failed: {e}", exception=e)
        finally:
            self._websocket = None
            self._opened.clear()
            await self._call_event_handler("on_disconnected")

    def _get_websocket(self):
        if self._websocket:
            return self._websocket
        raise ConnectionError(f"MioTTS at {self._url}: not connected")

    # ---- contexts -------------------------------------------------------------------------
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Send a turn's text to its context (the first text opens it on the server)."""
        if not self._websocket or self._websocket.state is State.CLOSED:
            await self._connect()
        if not self._websocket:  # the connection's error has been pushed
            yield TTSStoppedFrame(context_id=context_id)
            return
        voice = None
        if context_id not in self._opened and self._settings.voice != self._connection_voice:
            voice = str(self._settings.voice)  # a voice changed since this connection began
        try:
            await self._websocket.send(protocol.text_message(context_id, text, voice))
            self._opened.add(context_id)
            if not self._is_streaming_tokens:  # a whole sentence: speak it now
                await self._websocket.send(
                    protocol.context_message(ClientMessage.FLUSH, context_id)
                )
            await self.start_tts_usage_metrics(text)
        except Exception as e:
            yield ErrorFrame(error=f"MioTTS: sending text failed: {e}")
            yield TTSStoppedFrame(context_id=context_id)
            return
        yield None  # the audio comes through the receive loop

    async def flush_audio(self, context_id: str | None = None):
        """The turn's text is complete: the context's audio finishes, then its `done`."""
        context_id = context_id or self.get_active_audio_context_id()
        if context_id in self._opened and self._websocket:
            await self._websocket.send(protocol.context_message(ClientMessage.END, context_id))

    async def on_audio_context_interrupted(self, context_id: str):
        """Barge-in: cancel the context on the server (its audio stops, the connection
        stays)."""
        await self.stop_all_metrics()
        if context_id in self._opened and self._websocket:
            try:
                await self._websocket.send(
                    protocol.context_message(ClientMessage.CANCEL, context_id)
                )
            except Exception as e:
                logger.warning(f"{self}: cancel of {context_id} not sent: {e}")
        await super().on_audio_context_interrupted(context_id)

    # ---- from the server ------------------------------------------------------------------
    async def _receive_messages(self):
        async for message in self._get_websocket():
            if isinstance(message, bytes):
                await self._audio(message)
            else:
                await self._message(json.loads(message))

    async def _audio(self, data: bytes) -> None:
        header, self._audio_header = self._audio_header, None
        context_id = header["context_id"] if header else None
        if context_id and self.audio_context_available(context_id):
            frame = TTSAudioRawFrame(data, self.sample_rate, 1, context_id=context_id)
            await self.append_to_audio_context(context_id, frame)

    async def _message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        context_id = message.get("context_id")
        if kind == ServerMessage.AUDIO:
            self._audio_header = message
        elif (
            kind == ServerMessage.WORDS and context_id and self.audio_context_available(context_id)
        ):
            rate = self.sample_rate
            words = [(w["word"], w["start_sample"] / rate) for w in message["words"]]
            japanese = _language(self._settings.language) == "ja"
            await self.add_word_timestamps(
                words, context_id, includes_inter_frame_spaces=True if japanese else None
            )
        elif kind == ServerMessage.DONE and context_id and self.audio_context_available(context_id):
            await self.stop_ttfb_metrics()
            await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
            await self.remove_audio_context(context_id)
        elif kind == ServerMessage.ERROR:
            await self._server_error(protocol.ServerError(message))

    async def _server_error(self, error: protocol.ServerError) -> None:
        context_id = error.context_id
        if context_id is not None:  # one context failed; the connection goes on
            await self.push_error(str(error))
            if self.audio_context_available(context_id):
                await self.append_to_audio_context(
                    context_id, TTSStoppedFrame(context_id=context_id)
                )
                await self.remove_audio_context(context_id)
            return
        if error.code == "DEADLINE_EXCEEDED":  # an idle conversation closed: reconnect quietly
            logger.debug(f"{self}: {error}")
            return
        await self.stop_all_metrics()
        await self.push_error(str(error), force_treat_as_permanent=error.code in _PERMANENT)
