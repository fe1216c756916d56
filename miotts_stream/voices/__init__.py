"""Stored voices: clone once from reference audio, then use the voice by id.

`store` keeps voices behind the `VoiceStore` interface (SQLite by default; `postgres` for a
database shared by replicas; `open_voice_store` picks one from --voice-store); `registry` makes
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
    VoiceStoreUnavailable,
    check_voice_id,
    export_embedding,
    open_voice_store,
)

__all__ = [
    "SQLiteVoiceStore",
    "VoiceExists",
    "VoiceNotFound",
    "VoiceRecord",
    "VoiceSource",
    "VoiceStore",
    "VoiceStoreUnavailable",
    "check_voice_id",
    "export_embedding",
    "open_voice_store",
]
