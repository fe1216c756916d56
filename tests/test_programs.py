"""The command-line programs and generated code: flags map to options, generated code is fresh."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import server
from miotts_stream.service.options import ServerOptions

ROOT = Path(__file__).resolve().parents[1]


def test_generated_grpc_code_matches_the_proto():
    result = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_server_flags_map_to_options():
    options = server.parse_args(
        [
            "--model",
            "m",
            "--codec",
            "c",
            "--device",
            "cpu",
            "--port",
            "6000",
            "--max-streams",
            "3",
            "--presets-dir",
            "a",
            "--presets-dir",
            "b",
            "--llm-base-url",
            "http://x/v1",
            "--kv-cache-gib",
            "0.5",
            "--enforce-eager",
            "--no-metrics",
            "--max-batch",
            "4",
        ]
    )
    assert (options.llm.model, options.decoder.codec, options.decoder.device) == ("m", "c", "cpu")
    assert options.network.port == 6000 and options.decoder.max_batch == 4
    assert options.limits.max_streams == 3 and options.voices.presets_dirs == ("a", "b")
    assert options.llm.llm_base_url == ("http://x/v1",) and options.vllm.kv_cache_gib == 0.5
    assert options.vllm.enforce_eager and options.network.metrics_port is None
    defaults = server.parse_args([])
    assert defaults == ServerOptions()  # the command line's defaults are the declaration's
    assert defaults.llm.model is None and defaults.decoder.codec is None  # the built-in default
    assert defaults.network.port == 50051 and defaults.network.metrics_port == 9400
    assert defaults.network.http_port == 8080
    # 0 is any free port for every port; --no-http and --no-metrics turn those off.
    assert server.parse_args(["--http-port", "0"]).network.http_port == 0
    assert server.parse_args(["--no-http"]).network.http_port is None


def test_server_help_explains_every_flag():
    result = subprocess.run(
        [sys.executable, "server.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for flag in (
        "--model",
        "--codec",
        "--device",
        "--host",
        "--port",
        "--max-streams",
        "--presets-dir",
        "--llm-base-url",
        "--max-model-len",
        "--dtype",
        "--gpu-memory-utilization",
        "--kv-cache-gib",
        "--metrics-port",
    ):
        assert flag in result.stdout
    assert "random weights" in result.stdout


def test_security_and_limit_flags_map_to_options():
    flags = (
        "--idle-timeout-s 5 --max-stream-s 60 --stall-timeout-s 7 --drain-timeout-s 9 "
        "--keepalive-time-s 11 --keepalive-timeout-s 3 --max-receive-message-bytes 1000 "
        "--tls-cert c.pem --tls-key k.pem --tls-client-ca ca.pem --api-key one-key-123 "
        "--api-key two-key-456 --api-keys-file keys.txt"
    )
    options = server.parse_args(shlex.split(flags))
    limits = options.limits.session_limits()
    assert (limits.idle_s, limits.max_stream_s, limits.stall_s) == (5, 60, 7)
    assert options.limits.drain_timeout_s == 9
    access = options.access
    assert (access.tls_cert, access.tls_key, access.tls_client_ca) == ("c.pem", "k.pem", "ca.pem")
    assert access.api_keys == ("one-key-123", "two-key-456")
    assert access.api_keys_file == "keys.txt"
    assert "one-key-123" not in repr(options)  # keys stay out of logged option dumps
    grpc_options = dict(options.limits.grpc_options())
    assert grpc_options["grpc.max_receive_message_length"] == 1000
    assert grpc_options["grpc.keepalive_time_ms"] == 11000
    assert grpc_options["grpc.keepalive_timeout_ms"] == 3000
    defaults = server.parse_args([])
    assert defaults.limits.idle_timeout_s == 20 and defaults.limits.drain_timeout_s == 30
    assert "grpc.keepalive_time_ms" not in dict(
        server.parse_args(["--keepalive-time-s", "0"]).limits.grpc_options()
    )
