"""miotts-stream server: streaming MioTTS over gRPC (miotts.v1.TextToSpeech) and HTTP
(OpenAI /v1/audio/speech, the /v1/stream WebSocket, a demo page at /).

With no flags it serves the built-in default, a small demo speech LLM and a full-size 24 kHz
MioCodec decoder, both with RANDOM WEIGHTS (audio of the right shape and timing, not speech).
Real models, on a GPU machine:

    python server.py --model Aratako/MioTTS-0.1B --codec Aratako/MioCodec-25Hz-24kHz
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from miotts_stream.demo_model import ARCHITECTURES
from miotts_stream.llm import parse_engine_arg
from miotts_stream.service.server import ENGINE_DEATH_EXIT_CODE, ServerOptions, run_server

DEFAULT_HTTP_PORT = 8080


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    d = ServerOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        default=None,
        help="speech LLM for the in-process vLLM engine: a folder or a Hugging Face id\n"
        "(default: the built-in small demo model, random weights)",
    )
    p.add_argument(
        "--codec",
        default=None,
        help="MioCodec checkpoint: a folder (config.yaml + model.safetensors) or a\n"
        "Hugging Face id; random-24khz / random-44khz: the released architecture with\n"
        "random weights (default: random-24khz)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cuda or cpu for the codec (default: cuda if available); the in-process engine\n"
        "runs where the installed vLLM build runs, and this is checked against it",
    )
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"gRPC port (default {d.port})")
    p.add_argument(
        "--max-streams",
        type=int,
        default=d.max_streams,
        help=f"concurrent synthesis streams; more get RESOURCE_EXHAUSTED (default {d.max_streams})",
    )
    p.add_argument(
        "--presets-dir",
        action="append",
        default=[],
        dest="presets_dirs",
        help="extra folder of voice embeddings (.pt/.npy/.safetensors), by file name;\n"
        "may be repeated",
    )
    p.add_argument(
        "--default-voice",
        default=d.default_voice,
        help=f"preset used when a request names no voice (default {d.default_voice})",
    )
    p.add_argument(
        "--llm-base-url",
        action="append",
        default=None,
        help="use an OpenAI-compatible server (vllm serve, llama.cpp, Ollama) instead\n"
        "of the in-process engine, e.g. http://127.0.0.1:8000/v1; repeat it for several\n"
        "servers: each request goes to the one with the fewest in flight, and one that\n"
        "fails is taken out and probed back in",
    )
    p.add_argument(
        "--llm-model",
        default=None,
        help="model name on that server (default: the first of /v1/models)",
    )
    p.add_argument("--llm-api-key", default=None, help="bearer token for that server, if any")
    p.add_argument(
        "--llm-standin-rate",
        type=float,
        default=None,
        help="load tests: instead of an LLM, a stand-in that writes random speech codes at\n"
        "this many per second per request (noise of the right length, not speech)",
    )
    p.add_argument(
        "--llm-standin-prefill-ms",
        type=float,
        default=d.llm_standin_prefill_ms,
        help=f"the stand-in's delay before its first code (default {d.llm_standin_prefill_ms:g})",
    )
    engine = p.add_argument_group("in-process vLLM engine")
    engine.add_argument(
        "--max-model-len",
        type=int,
        default=d.max_model_len,
        help=f"prompt + speech tokens per request (default {d.max_model_len})",
    )
    engine.add_argument("--dtype", default=d.dtype, help="model dtype (default auto)")
    engine.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=d.gpu_memory_utilization,
        help="GPU memory share for vLLM (weights + KV cache), CUDA only "
        f"(default {d.gpu_memory_utilization})",
    )
    engine.add_argument(
        "--kv-cache-gib",
        type=float,
        default=d.kv_cache_gib,
        help="KV cache size in GiB (default: 1 on CPU; on a GPU, sized from\n"
        "--gpu-memory-utilization)",
    )
    engine.add_argument(
        "--enforce-eager",
        action="store_true",
        help="disable CUDA graphs / compilation (faster start, slower decode)",
    )
    engine.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        type=parse_engine_arg,
        dest="engine_args",
        metavar="KEY=VALUE",
        help="any vLLM engine argument, over this program's choices; VALUE is JSON when it\n"
        "parses (8, 0.5, true, {...}), else a string; may be repeated, e.g.\n"
        "--engine-arg enable_prefix_caching=false --engine-arg max_num_seqs=32",
    )
    engine.add_argument(
        "--demo-arch",
        choices=sorted(ARCHITECTURES),
        default=d.demo_arch,
        help="architecture of the built-in demo model served without --model\n"
        f"(default {d.demo_arch})",
    )
    engine.add_argument(
        "--cpu-placement",
        choices=("auto", "off"),
        default=d.cpu_placement,
        help="when the in-process engine and the codec both run on the CPU: auto splits the\n"
        "cores between the LLM worker and the decoder (default auto)",
    )
    engine.add_argument(
        "--exit-on-engine-death",
        action="store_true",
        help="when the engine core dies, exit with status "
        f"{ENGINE_DEATH_EXIT_CODE} (for an orchestrator\n"
        "to restart) instead of restarting the engine in process",
    )
    voices = p.add_argument_group("stored voices and cloning")
    voices.add_argument(
        "--data-dir",
        default=d.data_dir,
        help=f"folder of the voice store, shared with python -m miotts_stream.voices\n"
        f"(default {d.data_dir}/)",
    )
    voices.add_argument(
        "--voice-store",
        default=None,
        help="where stored voices live: postgresql://USER:PASSWORD@HOST:PORT/DB for a\n"
        "database shared by replicas, or sqlite:///PATH/FILE (default: SQLite in --data-dir)",
    )
    voices.add_argument(
        "--ssl-model",
        default=d.ssl_model,
        help="WavLM for cloning voices from audio: a transformers folder, a Hugging Face\n"
        "id, or 'random' (default: microsoft/wavlm-base-plus with --codec; the built-in\n"
        "random-weight WavLM without)",
    )
    voices.add_argument(
        "--reference-min-seconds",
        type=float,
        default=d.reference_min_seconds,
        help=f"shortest reference audio accepted (default {d.reference_min_seconds:g})",
    )
    voices.add_argument(
        "--reference-max-seconds",
        type=float,
        default=d.reference_max_seconds,
        help=f"longest reference audio accepted (default {d.reference_max_seconds:g})",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=d.metrics_port,
        help=f"Prometheus /metrics HTTP port, 0 for any free port (default {d.metrics_port})",
    )
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument(
        "--http-port",
        type=int,
        default=DEFAULT_HTTP_PORT,
        help="HTTP port: OpenAI /v1/audio/speech, the /v1/stream WebSocket and the demo page\n"
        f"at /, same engine, keys and limits as gRPC; 0 disables (default {DEFAULT_HTTP_PORT})",
    )
    p.add_argument(
        "--max-text-chars",
        type=int,
        default=d.max_text_chars,
        help=f"text characters per stream (default {d.max_text_chars})",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=d.max_batch,
        help=f"decode windows per batched step, all streams (default {d.max_batch})",
    )
    p.add_argument(
        "--codec-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default=d.codec_dtype,
        help="codec compute precision of its transformers; the rest stays float32 (default\n"
        "auto: bfloat16 on CUDA, as upstream, and on CPUs with AVX-512 BF16 or AMX;\n"
        "float32 on other CPUs; float32 on CUDA uses TF32 matrix units)",
    )
    limits = p.add_argument_group("limits and timeouts (seconds; 0 disables one)")
    limits.add_argument(
        "--idle-timeout-s",
        type=float,
        default=d.idle_timeout_s,
        help="close a stream that sends nothing for this long while nothing is pending\n"
        "(all its audio sent, or only a config) with DEADLINE_EXCEEDED\n"
        f"(default {d.idle_timeout_s:g})",
    )
    limits.add_argument(
        "--max-stream-s",
        type=float,
        default=d.max_stream_s,
        help="longest a stream may stay open, generation included; then DEADLINE_EXCEEDED\n"
        f"(default {d.max_stream_s:g})",
    )
    limits.add_argument(
        "--stall-timeout-s",
        type=float,
        default=d.stall_timeout_s,
        help="cancel a stream whose client has read nothing for this long, aborting its\n"
        f"LLM request (default {d.stall_timeout_s:g})",
    )
    limits.add_argument(
        "--drain-timeout-s",
        type=float,
        default=d.drain_timeout_s,
        help="on SIGTERM/SIGINT, how long open streams may take to finish before they are\n"
        f"cancelled (default {d.drain_timeout_s:g})",
    )
    limits.add_argument(
        "--drain-notice-s",
        type=float,
        default=d.drain_notice_s,
        help="on SIGTERM/SIGINT, health turns NOT_SERVING at once but new streams are still\n"
        "taken for this long, so that a load balancer's health check takes the replica out\n"
        f"before it refuses any; then the drain (default {d.drain_notice_s:g})",
    )
    limits.add_argument(
        "--keepalive-time-s",
        type=float,
        default=d.keepalive_time_s,
        help=f"HTTP/2 ping interval to find dead peers (default {d.keepalive_time_s:g})",
    )
    limits.add_argument(
        "--keepalive-timeout-s",
        type=float,
        default=d.keepalive_timeout_s,
        help="drop a peer that does not answer a ping within this time\n"
        f"(default {d.keepalive_timeout_s:g})",
    )
    limits.add_argument(
        "--max-receive-message-bytes",
        type=int,
        default=d.max_receive_message_bytes,
        help="largest request message; larger ones get RESOURCE_EXHAUSTED\n"
        f"(default {d.max_receive_message_bytes}: 16 MiB of reference audio plus 64 KiB)",
    )
    access = p.add_argument_group("access")
    access.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS")
    access.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    access.add_argument(
        "--tls-client-ca",
        default=None,
        help="PEM CA certificates: require client certificates they signed (mTLS)",
    )
    access.add_argument(
        "--api-key",
        action="append",
        default=[],
        dest="api_keys",
        help="accept this key (clients send 'authorization: Bearer KEY'); may be repeated",
    )
    access.add_argument(
        "--api-keys-file",
        default=None,
        help="file of keys, one per line: KEY [name=NAME] [max_streams=N]",
    )
    access.add_argument(
        "--api-keys-db",
        default=None,
        help="postgresql://... : keys shared by replicas (manage them with\n"
        "python -m miotts_stream.service.key_store); read again every 30 s and on SIGHUP",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    values = {k: v for k, v in vars(args).items() if k not in ("no_metrics", "log_level")}
    if args.no_metrics:
        values["metrics_port"] = None
    if args.http_port == 0:
        values["http_port"] = None
    values["engine_args"] = dict(args.engine_args)
    return ServerOptions(**values)


def main() -> None:
    asyncio.run(run_server(parse_args()))


if __name__ == "__main__":
    main()
