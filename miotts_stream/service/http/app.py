"""The HTTP transport (aiohttp): OpenAI's speech API, models and voices, the WebSocket stream,
and the browser demo, over the same engine and `Admission` as gRPC.

Routes:
    GET    /                      the demo page (static files under /static/)
    POST   /v1/audio/speech       OpenAI-compatible speech (speech.py)
    GET    /v1/models             the served model, OpenAI's list shape
    GET    /v1/voices             presets and stored voices (gRPC ListVoicesResponse as JSON)
    POST   /v1/voices             clone a voice: multipart form, `audio` file + `voice_id` ...
    GET    /v1/voices/{voice_id}  one voice
    DELETE /v1/voices/{voice_id}  delete a stored voice
    GET    /v1/stream             the bidirectional WebSocket stream (websocket.py)
    GET    /v1/conversation       one WebSocket, many utterances (conversation.py)
    GET    /health                200 SERVING or 503 NOT_SERVING, as gRPC health (no key)
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import json_format
from google.protobuf.message import Message

from miotts_stream.service.admission import Admission, invalid, voice_error
from miotts_stream.service.engine import ErrorCode, SessionError
from miotts_stream.service.options import HttpConnectionOptions

from .connections import ConnectionGuard, GuardedSite
from .conversation import handle_conversation
from .errors import error_response
from .request_ids import request_id_of, request_ids, send_request_id
from .speech import handle_speech
from .websocket import handle_stream

STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True)
class HttpOptions:
    heartbeat_s: float  # WebSocket pings to find dead peers (--keepalive-time-s)
    max_request_bytes: int  # request bodies and WebSocket frames (--max-receive-message-bytes)
    connections: HttpConnectionOptions  # time limits and the cap (connections.py)


def proto_json(message: Message) -> dict[str, Any]:
    """A protobuf message as JSON, snake_case names, zero values included."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


# aiohttp's own errors, as the engine's codes.
HTTP_EXCEPTION_CODES = {
    HTTPStatus.UNAUTHORIZED: ErrorCode.UNAUTHENTICATED,
    HTTPStatus.NOT_FOUND: ErrorCode.NOT_FOUND,
    HTTPStatus.METHOD_NOT_ALLOWED: ErrorCode.UNIMPLEMENTED,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: ErrorCode.RESOURCE_EXHAUSTED,
}


def json_errors(max_request_bytes: int):
    """A middleware answering aiohttp's own errors (unknown path, wrong method, a body over
    the limit) with OpenAI error objects, like every other error of the API."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as err:
            if err.status < 400 or not request.path.startswith("/v1/"):
                raise
            code = HTTP_EXCEPTION_CODES.get(HTTPStatus(err.status), ErrorCode.INVALID_ARGUMENT)
            if err.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                error = SessionError(
                    code, f"request body: larger than the limit of {max_request_bytes} bytes"
                )
            else:
                error = SessionError(code, f"{request.method} {request.path}: {err.reason}")
            return error_response(error, err.status)

    return middleware


class ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger, as this service wants it: a request aiohttp cannot parse (a
    bad header, a line too long, a body cut short: the client's doing, answered 400 and
    closed by aiohttp) is one line at DEBUG, as aiohttp already logs non-HTTP bytes; aiohttp
    logs every other such request at ERROR with a traceback. Its own failures keep theirs."""

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        if isinstance(exc_info, HttpProcessingError):
            reason = " ".join(str(exc_info).split())
            self.debug(f"{msg}: %s: %s", *args, type(exc_info).__name__, reason, **kwargs)
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)


class HttpTransport:
    def __init__(self, admission: Admission, options: HttpOptions):
        self.admission = admission
        self.options = options
        self.guard = ConnectionGuard(options.connections, admission.metrics)
        self.port = 0
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[
                request_ids,
                self.guard.middleware(),
                json_errors(self.options.max_request_bytes),
            ],
            client_max_size=self.options.max_request_bytes,
        )
        app.on_response_prepare.append(send_request_id)
        stream = partial(
            handle_stream,
            admission=self.admission,
            heartbeat_s=self.options.heartbeat_s,
            max_message_bytes=self.options.max_request_bytes,
        )
        conversation = partial(
            handle_conversation,
            admission=self.admission,
            heartbeat_s=self.options.heartbeat_s,
            max_message_bytes=self.options.max_request_bytes,
        )
        app.add_routes(
            [
                web.get("/", self.index),
                web.static("/static", STATIC_DIR),
                web.post("/v1/audio/speech", partial(handle_speech, admission=self.admission)),
                web.get("/v1/models", self.models),
                web.get("/v1/voices", self.list_voices),
                web.post("/v1/voices", self.create_voice),
                web.get("/v1/voices/{voice_id}", self.get_voice),
                web.delete("/v1/voices/{voice_id}", self.delete_voice),
                web.get("/v1/stream", stream),
                web.get("/v1/conversation", conversation),
                web.get("/health", self.health),
            ]
        )
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        # handler_cancellation: a client that disconnects cancels its handler at once, so its
        # session (and engine request) ends even while it waits for the next audio chunk.
        self._runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=1.0,
            logger=ServerLog(logging.getLogger("aiohttp.server")),
        )
        await self._runner.setup()
        site = GuardedSite(self._runner, host, port, self.guard, ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- pages and lists -----------------------------------------------------------------
    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def health(self, request: web.Request) -> web.Response:
        serving = self.admission.serving
        return web.json_response(
            {"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503
        )

    def _authenticate(self, request: web.Request):
        return self.admission.authenticate(request.headers.get("Authorization"))

    async def models(self, request: web.Request) -> web.Response:
        method = "GET /v1/models"
        try:
            key = self._authenticate(request)
        except SessionError as err:
            self.admission.record(method, err.code, None, request_id_of(request), f": {err}")
            return error_response(err)
        self.admission.record(method, ErrorCode.OK, key, request_id_of(request))
        engine = self.admission.engine
        model = {
            "id": engine.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "miotts-stream",
            "codec": engine.decoder.describe(),
            "sample_rate_hz": engine.decoder.sample_rate,
            "random_weights": engine.random_weights,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def _voice_call(self, method: str, request: web.Request, call, status: int = 200):
        """Authenticate, run `call`, map failures through the shared table, count."""
        code, key, detail = ErrorCode.OK, None, ""
        try:
            key = self._authenticate(request)
            return web.json_response(await call(), status=status)
        except web.HTTPException as err:  # aiohttp's (a body over the limit): json_errors
            code = HTTP_EXCEPTION_CODES.get(HTTPStatus(err.status), ErrorCode.INVALID_ARGUMENT)
            raise
        except Exception as err:
            error = voice_error(method, err)
            code, detail = error.code, f": {error}"
            return error_response(error)
        finally:
            self.admission.record(method, code, key, request_id_of(request), detail)

    async def list_voices(self, request: web.Request) -> web.Response:
        async def call():
            return proto_json(await self.admission.list_voices())

        return await self._voice_call("GET /v1/voices", request, call)

    async def get_voice(self, request: web.Request) -> web.Response:
        async def call():
            return proto_json(await self.admission.get_voice(request.match_info["voice_id"]))

        return await self._voice_call("GET /v1/voices/{id}", request, call)

    async def delete_voice(self, request: web.Request) -> web.Response:
        voice_id = request.match_info["voice_id"]

        async def call():
            await self.admission.delete_voice(voice_id)
            return {"id": voice_id, "deleted": True}

        return await self._voice_call("DELETE /v1/voices/{id}", request, call)

    async def create_voice(self, request: web.Request) -> web.Response:
        async def call():
            fields = await self._voice_form(request)
            info = await self.admission.create_voice(
                fields.get("voice_id", ""),
                fields.get("audio", b""),
                fields.get("display_name", ""),
                fields.get("language", ""),
            )
            return proto_json(info)

        return await self._voice_call("POST /v1/voices", request, call, status=201)

    @staticmethod
    async def _voice_form(request: web.Request) -> dict[str, Any]:
        """The multipart form of a new voice: `audio` (a file), `voice_id`, `display_name`,
        `language`."""
        if not request.content_type.startswith("multipart/"):
            raise SessionError(
                ErrorCode.INVALID_ARGUMENT,
                "request body: must be multipart/form-data with an 'audio' file and a 'voice_id'",
            )
        try:
            form = await request.post()
        except (ValueError, AssertionError) as err:  # aiohttp's multipart reader on bad input
            raise SessionError(
                ErrorCode.INVALID_ARGUMENT, f"request body: not a readable form ({err})"
            ) from None
        fields: dict[str, Any] = {}
        for name in ("voice_id", "display_name", "language"):
            value = form.get(name, "")
            if not isinstance(value, str):
                raise invalid(name, "must be a text field, not a file")
            fields[name] = value
        audio = form.get("audio")
        if audio is None:
            raise invalid("audio", "required: the reference audio as a file field")
        fields["audio"] = audio.file.read() if hasattr(audio, "file") else str(audio).encode()
        return fields
