"""End to end, client side: the server on its built-in default, 1, 4 and 8 concurrent streams.

    python -m miotts_stream.bench.e2e [--streams 1 4 8] [--seconds 10] [--baseline DIR]

Starts `server.py` (built-in default: small demo LLM + full-size 24 kHz codec, random weights)
as a subprocess on loopback, then per concurrency level runs that many StreamingSynthesize calls
at once, each at most `--seconds` of audio (two sentences of 25 * seconds / 2 tokens at most;
the demo model ends utterances on its own too), and measures on the client:
  TTFA     from the last request message (end_of_input) to the first audio byte;
  TTLB     from the last request message to the last audio byte;
  ratio    TTFA / TTLB: how much sooner audio starts than when waiting for everything
           (what request-response serving, as upstream does, would give);
  gaps     between consecutive audio chunks;
  underruns  dry spells of a player starting at the first chunk (0 ms), or `--buffer-ms` after
           it (a dry spell pauses playback until the chunk comes; see bench.common.dry_spells);
  worst late  the most a chunk came after its playback time, playback starting at the first
           chunk and never pausing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from miotts_stream.llm.vllm_server import free_port
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc

from .common import dry_spells, table

ROOT = Path(__file__).resolve().parents[2]
# Two sentences (two segments), each allowed half of the utterance's tokens.
TEXT = (
    "The quick brown fox jumps over the lazy dog while the sun sets behind the hills. "
    "Everyone agrees that it was a lovely evening"
)


async def wait_serving(address: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(1)
    raise TimeoutError(f"server at {address} not serving after {timeout} s")


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then SIGKILL if it is still there after 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


@contextlib.asynccontextmanager
async def server_subprocess(
    streams: int, *options: str, startup_timeout: float, root: Path = ROOT
) -> AsyncIterator[str]:
    """`server.py` of checkout `root` (built-in default, no metrics, HTTP on a free port) on
    loopback, serving `streams` concurrent streams; yields its gRPC address once health says
    SERVING."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    command = [
        sys.executable,
        str(root / "server.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-metrics",
        # A port of its own rather than --no-http / --http-port 0, which older checkouts
        # (a --baseline) read differently.
        "--http-port",
        str(free_port()),
        "--max-streams",
        str(streams),
        *options,
    ]
    server = subprocess.Popen(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        await wait_serving(address, timeout=startup_timeout)
        yield address
    finally:
        stop_process(server)


async def one_stream(stub, seconds: float, seed: int, buffer_s: float) -> dict:
    config = tts_pb2.SynthesisConfig(
        generation=tts_pb2.GenerationOptions(seed=seed, max_tokens=int(25 * seconds / 2))
    )
    sent = {}

    async def requests():
        yield tts_pb2.StreamingSynthesizeRequest(config=config)
        yield tts_pb2.StreamingSynthesizeRequest(text=TEXT)
        sent["last"] = time.perf_counter()
        yield tts_pb2.StreamingSynthesizeRequest(end_of_input=tts_pb2.EndOfInput())

    arrivals, rate = [], 24000
    async for response in stub.StreamingSynthesize(requests()):
        kind = response.WhichOneof("response")
        if kind == "audio":
            arrivals.append((time.perf_counter(), response.audio.num_samples))
        elif kind == "summary":
            rate = response.summary.sample_rate_hz
    times = np.array([t for t, _ in arrivals])
    samples = np.array([n for _, n in arrivals])
    playback_due = times[0] + np.concatenate(([0], np.cumsum(samples)[:-1])) / rate
    late = times - playback_due
    return {
        "ttfa": times[0] - sent["last"],
        "ttlb": times[-1] - sent["last"],
        "gaps": np.diff(times),
        "underruns": dry_spells(list(times), list(samples), rate, 0.0)[0],
        "underruns_buffered": dry_spells(list(times), list(samples), rate, buffer_s)[0],
        "worst_late": float(late.max()),
        "audio_s": samples.sum() / rate,
    }


async def run_level(address: str, streams: int, seconds: float, buffer_s: float) -> list:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        return await asyncio.gather(
            *(one_stream(stub, seconds, i, buffer_s) for i in range(streams))
        )


def summarize(streams: int, results: list[dict]) -> list:
    ttfa = np.array([r["ttfa"] for r in results]) * 1000
    ttlb = np.array([r["ttlb"] for r in results]) * 1000
    gaps = np.concatenate([r["gaps"] for r in results]) * 1000
    return [
        streams,
        f"{np.mean([r['audio_s'] for r in results]):.1f}",
        f"{np.percentile(ttfa, 50):.0f}",
        f"{np.percentile(ttfa, 95):.0f}",
        f"{np.percentile(ttlb, 50):.0f}",
        f"{np.median(ttfa / ttlb):.3f}",
        f"{np.percentile(gaps, 50):.0f}",
        f"{gaps.max():.0f}",
        sum(r["underruns"] for r in results),
        sum(r["underruns_buffered"] for r in results),
        f"{max(r['worst_late'] for r in results) * 1000:.0f}",
    ]


async def run_checkout(args, root: Path) -> list[list]:
    """The levels against `root`'s server; rows labelled with the checkout."""
    most = max(args.streams) + 2
    buffer_s = args.buffer_ms / 1000
    label = "this checkout" if root == ROOT else f"baseline {root.name}"
    rows = []
    async with server_subprocess(
        most, *args.server_arg, startup_timeout=args.startup_timeout, root=root
    ) as address:
        await run_level(address, 1, 2.0, buffer_s)  # warm-up
        for streams in args.streams:
            results = await run_level(address, streams, args.seconds, buffer_s)
            rows.append([label, *summarize(streams, results)])
    return rows


async def main_async(args) -> None:
    rows = []
    if args.baseline:
        rows += await run_checkout(args, Path(args.baseline).resolve())
    rows += await run_checkout(args, ROOT)
    print(
        f"\nend to end, built-in default (random weights), {os.cpu_count()} CPUs, "
        f"up to {args.seconds:.0f} s per utterance (the demo model ends some sooner), "
        "PCM 24 kHz"
    )
    print(
        table(
            [
                "server",
                "streams",
                "audio s",
                "TTFA p50 ms",
                "TTFA p95 ms",
                "TTLB p50 ms",
                "TTFA/TTLB",
                "gap p50 ms",
                "gap max ms",
                "underruns 0 ms",
                f"underruns {args.buffer_ms:g} ms",
                "worst late ms",
            ],
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--buffer-ms", type=float, default=150.0)
    parser.add_argument(
        "--baseline", default=None, help="another checkout to measure first, for comparison"
    )
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra server.py argument (repeat)"
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
