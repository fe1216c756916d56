"""Graceful drain of a real `server.py` process: SIGTERM turns health NOT_SERVING at once and
refuses new streams with UNAVAILABLE, lets a stream in flight finish, ends one that would not
finish within --drain-timeout-s, and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from miotts_stream.llm.vllm_server import free_port
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc

from .conftest import TINY_CODECS

ROOT = Path(__file__).resolve().parents[1]
# Long enough for the short request to finish on a loaded 2-core machine; the held stream
# takes all of it, so it is the test's cost too.
DRAIN_S = 8.0


def _config(max_tokens: int) -> tts_pb2.SynthesisConfig:
    return tts_pb2.SynthesisConfig(
        generation=tts_pb2.GenerationOptions(seed=1, max_tokens=max_tokens)
    )


async def _health(channel) -> int | None:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="miotts.v1.TextToSpeech"), timeout=2
        )
        return reply.status
    except grpc.aio.AioRpcError:
        return None


@pytest.mark.asyncio
@pytest.mark.parametrize("sig", [signal.SIGTERM])  # SIGINT takes the same handler
async def test_signal_drains_then_exits_zero(sig, tmp_path):
    from miotts_stream.demo_model import ensure_demo_model

    port = free_port()
    command = [
        sys.executable, str(ROOT / "server.py"),
        "--model", str(ensure_demo_model("tiny")), "--codec", str(TINY_CODECS["24khz"]),
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--no-metrics",
        "--no-http",
        "--max-model-len", "512", "--kv-cache-gib", "0.5", "--enforce-eager",
        "--drain-timeout-s", str(DRAIN_S), "--idle-timeout-s", "60",
        "--data-dir", str(tmp_path / "voices"),
    ]  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(300):  # bounded: the engine starts within a few minutes at worst
                if await _health(channel) == health_pb2.HealthCheckResponse.SERVING:
                    break
                assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                await asyncio.sleep(0.5)
            stub = tts_pb2_grpc.TextToSpeechStub(channel)

            # In flight and finishing: a short text, all sent. Its first response shows the
            # server took it before the signal (otherwise the drain refuses it, by design).
            finishing = stub.Synthesize(
                tts_pb2.SynthesizeRequest(config=_config(12), text="Almost done.")
            )
            first = await finishing.read()
            assert first is not grpc.aio.EOF
            # In flight and never finishing by itself: the client keeps the stream open.
            hold = asyncio.Event()

            async def held():
                yield tts_pb2.StreamingSynthesizeRequest(config=_config(12))
                yield tts_pb2.StreamingSynthesizeRequest(text="Waiting for more. ")
                yield tts_pb2.StreamingSynthesizeRequest(flush=tts_pb2.Flush())
                await hold.wait()

            lingering = stub.StreamingSynthesize(held())
            assert (await lingering.read()).WhichOneof("response") == "segment"

            process.send_signal(sig)
            signalled = time.monotonic()
            for _ in range(200):
                if await _health(channel) != health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.05)
            assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.Synthesize(
                    tts_pb2.SynthesizeRequest(config=_config(12), text="Too late.")
                ):
                    pass
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in caught.value.details()

            kinds = [first.WhichOneof("response")]
            while (response := await finishing.read()) is not grpc.aio.EOF:
                kinds.append(response.WhichOneof("response"))
            assert kinds[-1] == "summary"  # finished normally during the drain

            with contextlib.suppress(grpc.aio.AioRpcError):
                while await lingering.read() is not grpc.aio.EOF:
                    pass
            assert await lingering.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
            ), await lingering.details()
            assert time.monotonic() - signalled >= DRAIN_S - 0.5  # it was given the drain time
            hold.set()
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "drain over: ending 1 streams still open" in text
