"""Stored voices: clone once from reference audio, then use the voice by id.

`store` keeps voices (SQLite by default, behind the `VoiceStore` interface); `registry` makes
them from audio off the event loop and answers the service's voice requests; `python -m
miotts_stream.voices` is the command line on the same store.
"""

from .store import (
    SQLiteVoiceStore,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    VoiceSource,
    VoiceStore,
    check_voice_id,
    export_embedding,
)

__all__ = [
    "SQLiteVoiceStore",
    "VoiceExists",
    "VoiceNotFound",
    "VoiceRecord",
    "VoiceSource",
    "VoiceStore",
    "check_voice_id",
    "export_embedding",
]
