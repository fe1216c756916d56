"""What the server and its clients agree on for the conversation WebSocket (`/v1/conversation`,
docs/http.md): its path, its subprotocol and version, and the types of its messages. The server
(`service/http/conversation.py`) and the framework plugins (`integrations/`) both read them
from here; it imports nothing."""

from __future__ import annotations

import enum

PATH = "/v1/conversation"
PROTOCOL_VERSION = 1
SUBPROTOCOL = f"miotts.conversation.v{PROTOCOL_VERSION}"


class ClientMessage(enum.StrEnum):
    """The `type` of a message a client sends."""

    CONFIG = "config"
    TEXT = "text"
    FLUSH = "flush"
    END = "end"
    CANCEL = "cancel"
    CLOSE = "close"


class ServerMessage(enum.StrEnum):
    """The `type` of a message the server sends (an `audio` header is followed by one binary
    frame; `audio`, `segment` and `words` are /v1/stream's messages with a `context_id`)."""

    READY = "ready"
    AUDIO = "audio"
    SEGMENT = "segment"
    WORDS = "words"
    FLUSHED = "flushed"
    DONE = "done"
    CANCELLED = "cancelled"
    ERROR = "error"
