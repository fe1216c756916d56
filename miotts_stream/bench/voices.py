"""Voice cloning: the speaker encoder's cost, and whether cloning disturbs streaming.

    python -m miotts_stream.bench.voices [--streams 2] [--clones 4] [--rounds 3]

1. Encoder time for a 10 s clip with the built-in default (full-size 24 kHz global encoder +
   WavLM-base-plus architecture, random weights): wall and process CPU time per `embed`, on the
   CPU and, when there is one, on the GPU; and the audio input path (WAV decode + checks +
   resampling) on its own.
2. The server (built-in default) as a subprocess on loopback: first-audio times (TTFA, from the
   last request message) of `--streams` concurrent streams, first alone, then while `--clones`
   CreateVoice calls run at the same time; and how long each clone took.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import tempfile
import time
import wave

import grpc
import numpy as np
import torch

from miotts_stream.audio.reference import AudioLimits, prepare_reference
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc
from miotts_stream.voices.registry import make_encoder

from .common import median, table, time_call
from .e2e import one_stream, server_subprocess


def voice_clip(seconds: float, rate: int = 24000, seed: int = 0) -> np.ndarray:
    """Harmonics of a wobbling pitch under a syllable envelope: voice-like, float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 130 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t)) * rng.uniform(0.8, 1.3)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.6 + 0.4 * np.sin(8 * np.pi * t))
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def encoder_times(encoder, repeats: int, threads: int) -> list[object]:
    clip = voice_clip(10.0)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_before = time.process_time()
        walls = time_call(lambda: encoder.embed(clip, 24000), repeats)
        cpu = (time.process_time() - cpu_before) / (repeats + 1)  # the warm-up counts too
    finally:
        torch.set_num_threads(saved)
    return [
        str(encoder.device),
        threads,
        f"{median(walls) * 1000:.0f}",
        f"{min(walls) * 1000:.0f}",
        f"{cpu * 1000:.0f}",
    ]


async def clone(stub, voice_id: str, audio: bytes) -> float:
    start = time.perf_counter()
    await stub.CreateVoice(tts_pb2.CreateVoiceRequest(voice_id=voice_id, audio=audio))
    return time.perf_counter() - start


async def streams_with_clones(address: str, streams: int, clones: int, round_: int, seconds):
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", -1)]
    ) as ch:
        stub = tts_pb2_grpc.TextToSpeechStub(ch)
        clips = [wav_bytes(voice_clip(10.0, seed=round_ * 100 + i), 24000) for i in range(clones)]
        clone_tasks = [
            asyncio.ensure_future(clone(stub, f"bench-{round_}-{i}", clip))
            for i, clip in enumerate(clips)
        ]
        await asyncio.sleep(0.2)  # the clones are queued or running when the streams start
        results = await asyncio.gather(
            # Only first audio is read here; the client's buffer counts dry spells, unused.
            *(one_stream(stub, seconds, round_ * 10 + i, buffer_s=0.15) for i in range(streams))
        )
        clone_seconds = await asyncio.gather(*clone_tasks)
        return [r["ttfa"] for r in results], list(clone_seconds)


async def service_part(args) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        server = server_subprocess(
            args.streams + 2, "--data-dir", data_dir, startup_timeout=args.startup_timeout
        )
        async with server as address:
            # Warm-up: one stream, and one clone (loads the encoder on the server).
            await streams_with_clones(address, 1, 1, 99, 2.0)
            alone, busy, clone_times = [], [], []
            for r in range(args.rounds):
                ttfa, _ = await streams_with_clones(address, args.streams, 0, r, args.seconds)
                alone += ttfa
                ttfa, took = await streams_with_clones(
                    address, args.streams, args.clones, r, args.seconds
                )
                busy += ttfa
                clone_times += took

    def row(label, values):
        ms = np.array(values) * 1000
        return [label, len(ms), f"{np.percentile(ms, 50):.0f}", f"{ms.max():.0f}"]

    print(
        f"\nserver, built-in default (random weights), {os.cpu_count()} CPUs: {args.streams} "
        f"concurrent streams (up to {args.seconds:.0f} s each), {args.rounds} rounds; "
        f"{args.clones} CreateVoice calls of 10 s clips started just before the streams"
    )
    print(
        table(
            ["", "n", "p50 ms", "max ms"],
            [
                row("TTFA, no clones", alone),
                row("TTFA, while cloning", busy),
                row("CreateVoice latency", clone_times),
            ],
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--clones", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--skip-service", action="store_true")
    args = parser.parse_args()

    cpu_encoder = make_encoder(None, None, "cpu")
    # All threads, and one (as the server's background embedding thread runs).
    rows = [encoder_times(cpu_encoder, args.repeats, n) for n in (torch.get_num_threads(), 1)]
    if torch.cuda.is_available():
        rows.append(encoder_times(make_encoder(None, None, "cuda"), args.repeats, 1))
    data = wav_bytes(voice_clip(10.0, rate=44100), 44100)
    walls = time_call(lambda: prepare_reference(data, 24000, AudioLimits()), args.repeats)
    print(f"\nspeaker encoder, 10 s clip, built-in default (random weights), {os.cpu_count()} CPUs")
    headers = ["device", "CPU threads", "embed p50 ms", "embed min ms", "process CPU ms / embed"]
    print(table(headers, rows))
    print(
        f"audio input (44.1 kHz WAV -> decode, checks, resample to 24 kHz): "
        f"{median(walls) * 1000:.0f} ms"
    )
    if not args.skip_service:
        asyncio.run(service_part(args))


if __name__ == "__main__":
    main()
