"""The conversation WebSocket as its clients speak it (docs/http.md, `/v1/conversation`):
the URL, the messages a client sends, and the server's errors as exceptions. The path, the
version and the message types are `miotts_stream.conversation_protocol`'s, which the server
reads too. Shared by the framework plugins; it imports no framework."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from miotts_stream.conversation_protocol import PATH, PROTOCOL_VERSION, ClientMessage


def conversation_url(base_url: str) -> str:
    """`http://host:8080` (or `ws://...`, with or without a path prefix) -> the WebSocket URL
    of `/v1/conversation`."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"base_url: {base_url!r} is not an http(s):// or ws(s):// URL")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + PATH, "", ""))


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def config_message(
    voice: str,
    sample_rate: int,
    *,
    language: str | None = None,
    generation: dict[str, Any] | None = None,
) -> str:
    """The conversation's config: PCM 16-bit at `sample_rate`, word timings on; `voice` a
    preset, an alias or a stored voice (the server resolves the name)."""
    message: dict[str, Any] = {
        "type": ClientMessage.CONFIG,
        "version": PROTOCOL_VERSION,
        "voice": {"voice_id": voice},
        "audio": {"encoding": "PCM_S16LE", "sample_rate_hz": sample_rate},
        "word_timestamps": True,
    }
    if language:
        message["language"] = language
    if generation:
        message["generation"] = generation
    return encode(message)


def text_message(context_id: str, text: str, voice: str | None = None) -> str:
    """Text for a context; `voice`, with a context's first text, speaks it in another voice."""
    message: dict[str, Any] = {"type": ClientMessage.TEXT, "context_id": context_id, "text": text}
    if voice is not None:
        message["config"] = {"voice": {"voice_id": voice}}
    return encode(message)


def context_message(kind: ClientMessage, context_id: str, **fields: Any) -> str:
    """`flush`, `end` or `cancel` for a context."""
    return encode({"type": kind, "context_id": context_id, **fields})


CLOSE = encode({"type": ClientMessage.CLOSE})


class ServerError(Exception):
    """An `error` from the server: `code` (a gRPC status name), its message, the field it is
    about; `context_id` when it ended one context only."""

    def __init__(self, message: dict[str, Any]):
        self.code = str(message.get("code", "UNKNOWN"))
        self.field = message.get("field")
        self.context_id = message.get("context_id")
        super().__init__(f"MioTTS {self.code}: {message.get('message', '')}")
