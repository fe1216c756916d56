"""`VoiceRegistry`: voices for the service: presets, stored voices, and one-off reference audio.

Embedding runs on one worker thread, never on the event loop: decoding the audio and running
WavLM take a second or more on a CPU, while the loop keeps streaming. The encoder is loaded on
first use (in that thread), so a server that never clones pays nothing for it. Reference audio
sent inside a synthesis config is embedded once per distinct content (SHA-256), so a repeated
clip costs a dictionary lookup; concurrent requests for the same new clip share one embedding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from miotts_stream.audio.reference import AudioLimits, prepare_reference
from miotts_stream.codec.encoder import MioCodecEncoder
from miotts_stream.codec.voices import VoiceLibrary, check_embedding

from .store import (
    VoiceExists,
    VoiceRecord,
    VoiceSource,
    VoiceStore,
    check_display_name,
    check_language,
    check_voice_id,
)

logger = logging.getLogger(__name__)


class PresetVoice(Exception):
    """The voice is a built-in or configured preset: it cannot be deleted."""

    field = "voice_id"


class EncoderUnavailable(RuntimeError):
    """The speaker encoder cannot be loaded (a missing SSL model, no model hub, ...)."""


def embed_reference_audio(
    encoder: MioCodecEncoder, source: bytes | Path, limits: AudioLimits
) -> tuple[torch.Tensor, float]:
    """Encoded audio (bytes, or a file's path) -> (embedding, seconds used). BadAudio says what
    is wrong with the audio. Every way in (HTTP, WebSocket, gRPC, the CLI) comes here."""
    reference = prepare_reference(source, encoder.sample_rate, limits)
    embedding = encoder.embed(reference.samples, reference.sample_rate)
    return check_embedding(embedding, encoder.embedding_dim, "embedding"), (
        reference.duration_seconds
    )


# Niceness added to the embedding thread: clones yield the CPU to decoding and the event loop.
EMBED_THREAD_NICENESS = 10


def _background_thread() -> None:
    """Make the calling (worker) thread a background one: one intra-op thread (OpenMP's count
    is per calling thread, so decoding keeps all of its threads) at a lower CPU priority
    (Linux: per-thread niceness, which the thread's OpenMP helpers inherit)."""
    torch.set_num_threads(1)
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(
            os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + EMBED_THREAD_NICENESS
        )


class VoiceRegistry:
    def __init__(
        self,
        store: VoiceStore,
        presets: VoiceLibrary,
        load_encoder: Callable[[], MioCodecEncoder],
        limits: AudioLimits | None = None,
        reference_cache_size: int = 256,
    ):
        self.store = store
        self.presets = presets
        self.limits = limits or AudioLimits()
        self._load_encoder = load_encoder
        self._encoder: MioCodecEncoder | None = None
        self._encoder_lock = threading.Lock()
        # One background thread: clones queue up instead of competing with each other, and
        # streaming comes first for the CPU.
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="voice-embed", initializer=_background_thread
        )
        self._reference_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._reference_cache_size = reference_cache_size
        self._pending: dict[str, asyncio.Future] = {}
        self.embeddings_computed = 0  # clips embedded so far (cache hits not counted)

    # ---- embedding (worker thread) --------------------------------------------------------
    def encoder(self) -> MioCodecEncoder:
        with self._encoder_lock:
            if self._encoder is None:
                try:
                    self._encoder = self._load_encoder()
                except Exception as err:
                    logger.exception("voice cloning: cannot load the speaker encoder")
                    raise EncoderUnavailable(f"voice cloning is unavailable: {err}") from err
                logger.info("voice cloning: %s", self._encoder.describe())
            return self._encoder

    def _embed(self, data: bytes) -> tuple[torch.Tensor, float]:
        result = embed_reference_audio(self.encoder(), data, self.limits)
        self.embeddings_computed += 1
        return result

    async def embed_audio(self, data: bytes) -> tuple[torch.Tensor, float]:
        """(embedding, seconds) for encoded audio, computed on the worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self._embed, bytes(data))

    async def reference_embedding(self, data: bytes) -> torch.Tensor:
        """The embedding of one-off reference audio, cached by content hash."""
        key = hashlib.sha256(data).hexdigest()
        if key in self._reference_cache:
            self._reference_cache.move_to_end(key)
            return self._reference_cache[key]
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self.embed_audio(data))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        # shield: one caller going away does not cancel the embedding others wait for.
        embedding, _ = await asyncio.shield(pending)
        self._reference_cache[key] = embedding
        while len(self._reference_cache) > self._reference_cache_size:
            self._reference_cache.popitem(last=False)
        return embedding

    # ---- stored voices ----------------------------------------------------------------------
    async def create(
        self, voice_id: str, audio: bytes, display_name: str = "", language: str = ""
    ) -> VoiceRecord:
        """Clone a voice from audio and store it. ValueError (bad id, name or language, or
        BadAudio), VoiceExists."""
        check_display_name(display_name)
        check_language(language)
        # Fail fast, before embedding.
        await asyncio.to_thread(check_new_voice_id, voice_id, self.presets, self.store)
        embedding, seconds = await self.embed_audio(audio)
        record = VoiceRecord(
            voice_id=voice_id,
            embedding=embedding,
            display_name=display_name,
            language=language,
            duration_seconds=seconds,
            source=VoiceSource.AUDIO,
            encoder=self.encoder().source,
        )
        # The store decides races: of concurrent creates of one id, exactly one succeeds.
        return await asyncio.to_thread(self.store.create, record)

    async def get(self, voice_id: str) -> VoiceRecord:
        return await asyncio.to_thread(self.store.get, voice_id)

    async def delete(self, voice_id: str) -> None:
        if voice_id in self.presets:
            raise PresetVoice(f"voice_id: {voice_id!r} is a preset; presets cannot be deleted")
        await asyncio.to_thread(self.store.delete, voice_id)

    async def list(self) -> list[VoiceRecord]:
        return await asyncio.to_thread(self.store.list)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        self.store.close()


def check_new_voice_id(voice_id: str, presets: VoiceLibrary, store: VoiceStore) -> None:
    """Whether a new voice may take `voice_id`: ValueError for a malformed id, VoiceExists for a
    preset's name or a stored voice's (the store's `create` still decides races)."""
    check_voice_id(voice_id)
    if voice_id in presets:
        raise VoiceExists(f"voice_id: {voice_id!r} is the name of a preset")
    if voice_id in store:
        raise VoiceExists(f"voice_id: a voice {voice_id!r} exists already")


def make_encoder(
    codec: str | None, ssl_model: str | None, device: str | None = None
) -> MioCodecEncoder:
    """The encoder matching the server's --codec (the CLI uses the same rule).

    No codec, `random-24khz` or `random-44khz`: the released architecture with a random global
    encoder (seed 0), as the server's random decoder, and unless `ssl_model` says otherwise the
    built-in random WavLM. A checkpoint (folder or hub id): its global encoder and
    microsoft/wavlm-base-plus unless `ssl_model` names another.
    """
    from miotts_stream.codec.decoder import RELEASED_CONFIGS
    from miotts_stream.codec.ssl import DEFAULT_SSL_MODEL, RANDOM_SSL_MODEL

    codec = codec or "random-24khz"
    released = codec.removeprefix("random-")
    if codec.startswith("random-") and released in RELEASED_CONFIGS:
        return MioCodecEncoder.from_config(
            RELEASED_CONFIGS[released], ssl_model=ssl_model or RANDOM_SSL_MODEL, device=device
        )
    return MioCodecEncoder.from_pretrained(
        codec, ssl_model=ssl_model or DEFAULT_SSL_MODEL, device=device
    )
