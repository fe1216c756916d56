"""`/v1/stream`: the bidirectional stream over a WebSocket, in JSON (see docs/http.md).

One connection is one stream, as one `StreamingSynthesize` call is in gRPC. The client sends
text frames: a `config` first (the gRPC `SynthesisConfig` fields, in protobuf's JSON mapping),
then `text`, `flush` (with an `id`, acknowledged by `flushed` once the audio of all text sent
before it is out), `cancel` or `end`. The server sends `ready`, then `segment` events and
`audio` headers each followed by one binary frame of audio, `flushed` acks, and a `summary`;
or an `error` whose `code` is the gRPC status name, then a close code from the shared table.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import WSMsgType, hdrs, web
from google.protobuf import json_format

from miotts_stream.service.access import ApiKey
from miotts_stream.service.admission import Admission, invalid
from miotts_stream.service.engine import (
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
from miotts_stream.service.pb.miotts.v1 import tts_pb2
from miotts_stream.service.runner import run_session

from .errors import HTTP_ERRORS, CloseCode, error_response
from .json_input import parse_json
from .request_ids import request_id_of

logger = logging.getLogger(__name__)

METHOD = "WS /v1/stream"
# The subprotocol the server answers with. Browsers cannot set an Authorization header on a
# WebSocket: they offer `bearer.KEY` as a second subprotocol instead (never echoed back).
SUBPROTOCOL = "miotts.v1"
BEARER_SUBPROTOCOL = "bearer."


class ClientMessage(enum.Enum):
    CONFIG = "config"
    TEXT = "text"
    FLUSH = "flush"
    CANCEL = "cancel"
    END = "end"


class ServerMessage(enum.Enum):
    READY = "ready"
    AUDIO = "audio"
    SEGMENT = "segment"
    WORDS = "words"
    FLUSHED = "flushed"
    SUMMARY = "summary"
    ERROR = "error"


class ClientGone(Exception):
    """The client closed the connection (or it broke)."""


def _offered_protocols(request: web.Request) -> list[str]:
    header = request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "")
    return [protocol.strip() for protocol in header.split(",") if protocol.strip()]


def authorization_of(request: web.Request) -> str | None:
    """The `Authorization` header, or a key offered as the `bearer.KEY` subprotocol."""
    for protocol in _offered_protocols(request):
        if protocol.startswith(BEARER_SUBPROTOCOL):
            return "Bearer " + protocol[len(BEARER_SUBPROTOCOL) :]
    return request.headers.get(hdrs.AUTHORIZATION)


def without_key_protocols(request: web.Request) -> web.Request:
    """The request as aiohttp's handshake should see it: without `bearer.KEY` subprotocols.
    The key has done its work (authentication), and aiohttp logs the subprotocols a client
    offers when none is one it knows, which would put the key in the log."""
    offered = _offered_protocols(request)
    kept = [p for p in offered if not p.startswith(BEARER_SUBPROTOCOL)]
    if kept == offered:
        return request
    headers = request.headers.copy()
    del headers[hdrs.SEC_WEBSOCKET_PROTOCOL]
    if kept:
        headers[hdrs.SEC_WEBSOCKET_PROTOCOL] = ", ".join(kept)
    return request.clone(headers=headers)


def parse_message(message, kinds: type[enum.Enum] = ClientMessage) -> tuple[Any, dict[str, Any]]:
    """A client frame as (kind, one of `kinds`; fields); SessionError naming what is wrong;
    ClientGone when the socket closed."""
    if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
        raise ClientGone
    if message.type == WSMsgType.BINARY:
        raise SessionError(
            ErrorCode.INVALID_ARGUMENT,
            "message: binary frames are not accepted; send JSON text frames",
        )
    fields = parse_json(message.data, "message")
    if not isinstance(fields, dict):
        raise SessionError(
            ErrorCode.INVALID_ARGUMENT, "message: must be a JSON object with a 'type'"
        )
    kind = fields.pop("type", None)
    allowed = ", ".join(m.value for m in kinds)
    if kind is None:
        raise invalid("type", f"missing ({allowed})")
    try:
        return kinds(kind), fields
    except ValueError:
        raise invalid("type", f"unknown message type {kind!r} (one of {allowed})") from None


def parse_config(fields: dict[str, Any]) -> tts_pb2.SynthesisConfig:
    """A `SynthesisConfig` from its JSON fields; INVALID_ARGUMENT naming `config` otherwise."""
    try:
        return json_format.ParseDict(fields, tts_pb2.SynthesisConfig())
    except json_format.ParseError as err:
        first_line = str(err).splitlines()[0]
        raise invalid("config", first_line) from None


def words_message(event: WordsOut) -> dict[str, Any]:
    """Word timings: estimates (MioTTS has no aligner; docs/http.md says how they are made),
    sent before the audio in which each word starts."""
    return {
        "type": ServerMessage.WORDS.value,
        "segment_index": event.segment_index,
        "estimated": True,
        "words": [
            {"word": w.text, "start_sample": w.start_sample, "end_sample": w.end_sample}
            for w in event.words
        ],
    }


def segment_message(event: SegmentStarted | SegmentFinished) -> dict[str, Any]:
    finished = isinstance(event, SegmentFinished)
    return {
        "type": ServerMessage.SEGMENT.value,
        "kind": "finished" if finished else "started",
        **asdict(event),
    }


def summary_message(event: Summary, kind: str = "summary") -> dict[str, Any]:
    summary = asdict(event)
    summary["encoding"] = event.encoding.value
    return {"type": kind, **summary}


def audio_header(event: AudioOut, size: int) -> dict[str, Any]:
    header = {
        "type": ServerMessage.AUDIO.value,
        "sequence": event.sequence,
        "segment_index": event.segment_index,
        "start_sample": event.start_sample,
        "num_samples": event.audio.num_samples,
        "bytes": size,
    }
    if event.audio.packets:  # OPUS: the binary frame holds these packets back to back
        header["packets"] = [len(p) for p in event.audio.packets]
    return header


class StreamConnection:
    """One WebSocket, one session: a reader task feeds the session, this task sends events."""

    def __init__(
        self, ws: web.WebSocketResponse, admission: Admission, key: ApiKey | None, request_id: str
    ):
        self.ws = ws
        self.admission = admission
        self.key = key
        self.request_id = request_id
        self._send_lock = asyncio.Lock()
        self._flushes: deque[tuple[int, Any]] = deque()  # (segments needed, client's id)
        self._segments_finished = 0

    async def _send(self, message: dict[str, Any], data: bytes | None = None) -> None:
        async with self._send_lock:  # a header and its audio frame go out together
            await self.ws.send_str(json.dumps(message, separators=(",", ":")))
            if data is not None:
                await self.ws.send_bytes(data)

    async def fail(self, err: SessionError) -> None:
        """Send the error, then close with the code of the shared table."""
        with contextlib.suppress(Exception):
            error = {"type": ServerMessage.ERROR.value, "code": err.code.value, "message": str(err)}
            if err.field is not None:
                error["field"] = err.field
            await self._send(error)
        code = HTTP_ERRORS[err.code].close_code
        reason = str(err).encode()[:120].decode(errors="ignore")  # a close reason: <= 123 bytes
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, message=reason.encode())

    async def run(self, idle_timeout_s: float) -> None:
        try:
            try:
                first = await self.ws.receive(timeout=idle_timeout_s or None)
            except TimeoutError:
                raise SessionError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"config: none received within {idle_timeout_s:g} s (--idle-timeout-s)",
                    "config",
                ) from None
            kind, fields = parse_message(first)
            if kind is not ClientMessage.CONFIG:
                raise invalid("config", f"the first message must be a config, got {kind.value}")
            session = await self.admission.open(parse_config(fields), self.key, self.request_id)
        except ClientGone:
            self.admission.record(METHOD, ErrorCode.CANCELLED, self.key, self.request_id)
            return
        except SessionError as err:
            self.admission.record(METHOD, err.code, self.key, self.request_id, f": {err}")
            await self.fail(err)
            return
        await self._stream(session)

    async def _stream(self, session: SynthesisSession) -> None:
        reader = asyncio.get_running_loop().create_task(self._read(session))
        try:
            with contextlib.suppress(ConnectionError):  # gone before ready: run_session sees it
                await self._send(
                    {
                        "type": ServerMessage.READY.value,
                        "session_id": session.id,
                        "encoding": session.config.encoding.value,
                        "sample_rate_hz": session.encoder.out_rate,
                        "random_weights": self.admission.engine.random_weights,
                    }
                )
            code = await run_session(
                self.admission, session, self, method=METHOD, key=self.key, reader=reader
            )
            if code in (ErrorCode.OK, ErrorCode.CANCELLED):
                reason = b"cancelled" if code is ErrorCode.CANCELLED else b"done"
                await self.ws.close(code=CloseCode.NORMAL, message=reason)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    # ---- the session's outcome (a SessionSink) --------------------------------------------
    async def send(self, event: Event) -> None:
        if isinstance(event, AudioOut):
            data = event.audio.data or b"".join(event.audio.packets)
            await self._send(audio_header(event, len(data)), data)
        elif isinstance(event, SegmentStarted | SegmentFinished):
            await self._send(segment_message(event))
            if isinstance(event, SegmentFinished):
                self._segments_finished = event.segment_index + 1
                await self._ack_flushes()
        elif isinstance(event, WordsOut):
            await self._send(words_message(event))
        elif isinstance(event, Summary):
            await self._send(summary_message(event))

    async def _ack_flushes(self) -> None:
        done = []
        while self._flushes and self._flushes[0][0] <= self._segments_finished:
            done.append(self._flushes.popleft()[1])
        for flush_id in done:
            await self._send({"type": ServerMessage.FLUSHED.value, "id": flush_id})

    async def _read(self, session: SynthesisSession) -> None:
        """Feed the client's messages into the session; problems fail the session."""
        ended = False
        try:
            while True:
                try:
                    kind, fields = parse_message(await self.ws.receive())
                except ClientGone:
                    break
                if kind is ClientMessage.TEXT:
                    text = fields.get("text")
                    if not isinstance(text, str):
                        raise invalid("text", "must be a string")
                    session.push_text(text)
                elif kind is ClientMessage.FLUSH:
                    session.flush()
                    self._flushes.append((session.segment_count, fields.get("id")))
                    await self._ack_flushes()  # nothing pending: acknowledged at once
                elif kind is ClientMessage.END:
                    session.end_input()
                    ended = True
                elif kind is ClientMessage.CANCEL:
                    session.cancel()
                    break
                else:
                    raise invalid("config", "sent twice; only the first message may be a config")
            if not ended and not session.cancelled:
                session.cancel()  # the client closed the socket: no one would hear the rest
        except SessionError as err:
            session.fail(err)
        # After a cancel or an error the client may still be sending: read and drop that.
        with contextlib.suppress(Exception):
            while not self.ws.closed:
                message = await self.ws.receive()
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break


@dataclass(frozen=True)
class AcceptedSocket:
    """A WebSocket past its key check and handshake: the socket, the caller's key, the id."""

    ws: web.WebSocketResponse
    key: ApiKey | None
    request_id: str


async def accept_socket(
    request: web.Request,
    admission: Admission,
    *,
    method: str,
    subprotocol: str,
    heartbeat_s: float,
    max_message_bytes: int,
) -> AcceptedSocket | web.Response:
    """The key checked, then the handshake; a refused key is answered as an HTTP error, before
    the upgrade (the response to return)."""
    request_id = request_id_of(request)
    try:
        key = admission.authenticate(authorization_of(request))
    except SessionError as err:
        admission.record(method, err.code, None, request_id, f": {err}")
        return error_response(err)
    ws = web.WebSocketResponse(
        protocols=(subprotocol,),
        heartbeat=heartbeat_s or None,
        max_msg_size=max_message_bytes,
        compress=False,  # audio does not compress; deflate would only cost CPU
    )
    await ws.prepare(without_key_protocols(request))
    return AcceptedSocket(ws, key, request_id)


async def handle_stream(
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
    connection = StreamConnection(accepted.ws, admission, accepted.key, accepted.request_id)
    await connection.run(admission.engine.limits.idle_s)
    return accepted.ws
