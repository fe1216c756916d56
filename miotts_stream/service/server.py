"""Assemble and run the service: token source + codec + voices -> engine -> gRPC server.

`ServerOptions` mirrors the command line of `server.py`; `run_server` blocks until a signal,
`MioTTSServer` is the same thing as an object (tests start it on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from miotts_stream.audio.reference import MAX_INPUT_BYTES, AudioLimits
from miotts_stream.codec import MioCodecDecoder, VoiceLibrary
from miotts_stream.codec.decoder import RELEASED_CONFIGS
from miotts_stream.demo_model import DEFAULT_ARCH, ensure_demo_model, is_demo_model
from miotts_stream.llm import (
    EngineState,
    OpenAITokenSource,
    RestartPolicy,
    TokenSource,
    VLLMEngineOptions,
    VLLMTokenSource,
)
from miotts_stream.llm.standin import StandInPacing, StandInTokenSource
from miotts_stream.voices import SQLiteVoiceStore
from miotts_stream.voices.registry import VoiceRegistry, make_encoder

from .engine import SpeechEngine
from .metrics import ServiceMetrics
from .pb.miotts.v1 import tts_pb2, tts_pb2_grpc
from .servicer import TextToSpeechServicer

logger = logging.getLogger("miotts_stream.server")

CODEC_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
SERVICE_NAME = tts_pb2.DESCRIPTOR.services_by_name["TextToSpeech"].full_name
# The process's exit status when --exit-on-engine-death ends it (for an orchestrator).
ENGINE_DEATH_EXIT_CODE = 3


@dataclass
class ServerOptions:
    model: str | None = None  # None: the built-in small demo model (random weights)
    codec: str | None = None  # None: full-size 24 kHz MioCodec with random weights
    device: str | None = None
    host: str = "0.0.0.0"
    port: int = 50051
    max_streams: int = 16
    presets_dirs: list[str] = field(default_factory=list)
    default_voice: str = "en_female"
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key: str | None = None
    # A stand-in LLM (random codes at this rate per request) for load tests; not speech.
    llm_standin_rate: float | None = None
    llm_standin_prefill_ms: float = 15.0
    max_model_len: int = 2048
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.5
    kv_cache_gib: float | None = None  # None: 1 GiB on CPU; on GPU, from the memory share
    enforce_eager: bool = False
    metrics_port: int | None = 9400
    max_text_chars: int = 10000
    max_batch: int = 32
    codec_dtype: str = "auto"  # auto: bfloat16 on CUDA (as upstream), float32 on CPU
    demo_arch: str = DEFAULT_ARCH  # architecture of the built-in demo model (no --model)
    engine_args: dict[str, Any] = field(default_factory=dict)  # more vLLM engine arguments
    exit_on_engine_death: bool = False  # instead of restarting the engine in process
    data_dir: str = ".data"  # the voice store (SQLite), shared with the voices CLI
    ssl_model: str | None = None  # None: wavlm-base-plus with --codec, else the random WavLM
    reference_min_seconds: float = 1.0
    reference_max_seconds: float = 30.0


async def build_engine(options: ServerOptions) -> SpeechEngine:
    """Load everything the options name; log plainly what has random weights."""
    random_parts = []
    voices = VoiceLibrary([Path(p) for p in options.presets_dirs])
    if options.default_voice not in voices:
        raise ValueError(f"--default-voice: unknown preset {options.default_voice!r}")
    codec = options.codec or "random-24khz"
    dtype = CODEC_DTYPES[options.codec_dtype]
    if codec.startswith("random-") and codec.removeprefix("random-") in RELEASED_CONFIGS:
        config = RELEASED_CONFIGS[codec.removeprefix("random-")]
        decoder = MioCodecDecoder.from_config(config, device=options.device, dtype=dtype)
        random_parts.append("codec")
    else:
        decoder = MioCodecDecoder.from_pretrained(codec, device=options.device, dtype=dtype)
    logger.info("codec: %s", decoder.describe())
    for name in voices.names():  # a broken preset file fails now, not in a client's request
        decoder.validate_embedding(voices.get(name), f"preset {name}")

    source: TokenSource
    if options.llm_standin_rate is not None:
        pacing = StandInPacing(options.llm_standin_rate, options.llm_standin_prefill_ms / 1000)
        source = StandInTokenSource(pacing)
        model_name = source.name
        random_parts.append("speech LLM stand-in")
    elif options.llm_base_url:
        source = OpenAITokenSource(
            options.llm_base_url,
            model=options.llm_model,
            api_key=options.llm_api_key,
            # Each stream holds one streamed completion at a time; a few spare for listing.
            max_connections=options.max_streams + 8,
        )
        model_name = f"{options.llm_model or '(server default)'} at {options.llm_base_url}"
    else:
        model = options.model
        if model is None:
            model = str(ensure_demo_model("small", arch=options.demo_arch))
        if is_demo_model(model):
            random_parts.append("speech LLM")
        engine_options = VLLMEngineOptions(
            max_model_len=options.max_model_len,
            dtype=options.dtype,
            device=options.device or "auto",
            gpu_memory_utilization=options.gpu_memory_utilization,
            kv_cache_gib=options.kv_cache_gib,
            enforce_eager=True if options.enforce_eager else None,  # None: eager on CPU only
            extra_engine_args=dict(options.engine_args),
        )
        restart = RestartPolicy(enabled=not options.exit_on_engine_death)
        source = VLLMTokenSource.from_model(model, engine_options, restart=restart)
        model_name = model
    logger.info("speech LLM: %s", model_name)
    if random_parts:
        logger.warning(
            "RANDOM WEIGHTS: the %s %s built-in demo models with random weights: the service "
            "produces audio of the right shape and timing, not speech. Pass --model and --codec "
            "for real MioTTS weights.",
            " and ".join(random_parts),
            "is a" if len(random_parts) == 1 else "are",
        )
    engine = SpeechEngine(
        source,
        decoder,
        voices,
        max_streams=options.max_streams,
        max_text_chars=options.max_text_chars,
        max_batch=options.max_batch,
        random_weights=bool(random_parts),
        model_name=model_name,
    )
    await engine.start()
    return engine


class MioTTSServer:
    """The gRPC server (TextToSpeech, health, reflection) and the metrics endpoint."""

    def __init__(self, engine: SpeechEngine, options: ServerOptions):
        self.engine = engine
        self.options = options
        self.metrics = ServiceMetrics()
        self.grpc = grpc.aio.server(
            options=[
                # Reference audio for cloning (up to 16 MB of encoded audio) plus the message.
                ("grpc.max_receive_message_length", MAX_INPUT_BYTES + 64 * 1024),
            ]
        )
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self._lag_watch: asyncio.Task | None = None
        # Set when the engine died for good (restarts off: --exit-on-engine-death).
        self.engine_died = asyncio.Event()
        self._health_updates: set[asyncio.Task] = set()
        # Checked now (a bad --data-dir or limit fails at start); the encoder loads on first use.
        self.voices = VoiceRegistry(
            SQLiteVoiceStore(options.data_dir),
            engine.voices,
            partial(make_encoder, options.codec, options.ssl_model, options.device),
            AudioLimits(options.reference_min_seconds, options.reference_max_seconds),
        )

    async def start(self) -> int:
        servicer = TextToSpeechServicer(
            self.engine, self.metrics, self.options.default_voice, self.voices
        )
        tts_pb2_grpc.add_TextToSpeechServicer_to_server(servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self.port = self.grpc.add_insecure_port(f"{self.options.host}:{self.options.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.options.host}:{self.options.port}")
        await self.grpc.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        add_state_listener = getattr(self.engine.source, "add_state_listener", None)
        if add_state_listener is not None:  # an in-process engine: its state is our health
            add_state_listener(self._on_engine_state)
        if self.options.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.options.metrics_port, self.options.host)
        self.metrics.watch_decoder(self.engine.scheduler)
        self._lag_watch = asyncio.get_running_loop().create_task(
            self.metrics.watch_event_loop(), name="event-loop-lag"
        )
        logger.info(
            "serving %s on %s:%d (metrics on %s)",
            SERVICE_NAME,
            self.options.host,
            self.port,
            self.metrics_port,
        )
        return self.port

    def _on_engine_state(self, state: EngineState) -> None:
        """The engine's state as gRPC health: SERVING only while the engine serves."""
        serving = state is EngineState.SERVING
        if serving:
            self.metrics.engine_restarts.inc()  # the first SERVING is no change: not heard
        elif state is EngineState.DEAD:
            self.engine_died.set()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        task = asyncio.get_running_loop().create_task(self._set_health(status))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float = 2.0) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.stop(grace)
        if self._lag_watch is not None:
            self._lag_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_watch
        self.voices.close()
        await self.engine.close()
        self.metrics.close()


async def run_server(options: ServerOptions) -> None:
    engine = await build_engine(options)
    server = MioTTSServer(engine, options)
    try:
        await server.start()
    except BaseException:
        await engine.close()  # do not leave vLLM's worker processes behind
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(server.engine_died.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for waiting in waits:
        waiting.cancel()
    if server.engine_died.is_set():
        logger.error("the speech engine died; exiting (--exit-on-engine-death)")
    logger.info("shutting down")
    await server.stop()
    if server.engine_died.is_set():
        raise SystemExit(ENGINE_DEATH_EXIT_CODE)
