"""Every GPU measurement in one go, for a machine lent for minutes (no vLLM needed).

    python -m miotts_stream.bench.gpu [--device cuda] [--out gpu.json] [--quick]

1. decode step time, eager against CUDA graphs, batch 1 to 256, a steady window (50 + 20 + 32
   tokens) and a just-in-time one (50 + 80 + 128), full-size 24 kHz and 44.1 kHz decoders;
2. first-chunk time: a stream's first window (12 tokens) from plan to samples on the host;
3. streaming LSD in bf16 and fp32 against the fp32 offline decode, tokens one at a time at 4x
   and 1.5x real time (bench.streaming's simulation), 2 s and 10 s, recipe seed 0;
4. bench.load with the stand-in LLM: the service on this device, full-size 24 kHz codec, 64
   and 256 streams at 50 and 200 codes/s.

The figures are printed as they come and written to `--out` as JSON. `--device cpu --quick`
runs every section small, on the tiny checkpoint (tests/test_bench_gpu.py), so the script is
known to work before a GPU is lent. On the device machine (Python 3.12, torch with CUDA; no
grpcio, protobuf, soxr or opuslib): README, "Ready for the GPU".
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from miotts_stream.audio.quality import lsd_db
from miotts_stream.codec import MioCodecDecoder, StreamingOptions, load_voice

from . import load
from .common import FULL_CODEC_CONFIGS, table
from .streaming import TINY_FIXTURES, simulate, utterances

FULL_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_BATCHES = (1, 2)
# Window geometries a step decodes: a steady window, and a long one (an LLM ahead of real
# time, planned just in time: the longest chunk and lookahead).
WINDOWS = {
    "steady 50+20+32": StreamingOptions(max_chunk_tokens=0, max_lookahead_tokens=0),
    "long 50+80+128": StreamingOptions(),
}


@dataclass
class Section:
    name: str
    seconds: float
    rows: list[dict]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_times(decoder: MioCodecDecoder, batches, repeats: int) -> list[dict]:
    """Median wall time of one batched step (upload, forward, download), eager and, on CUDA,
    replayed as a CUDA graph; both with the fixed step shapes graphs use."""
    voice = load_voice("en_female")
    gen = torch.Generator().manual_seed(0)
    graphs_possible = decoder.device.type == "cuda"
    rows = []
    for label, options in WINDOWS.items():
        for graphs in (False, True) if graphs_possible else (False,):
            batcher = decoder.batcher(cuda_graphs=graphs)
            for batch in batches:
                streams = []
                for _ in range(batch):
                    stream = batcher.open(voice, options)
                    stream.push_tokens(
                        torch.randint(0, decoder.codebook_size, (400,), generator=gen)
                    )
                    stream.emitted_tokens = 100  # mid-utterance: a full left context
                    streams.append(stream)
                windows = [s.next_window() for s in streams]
                for _ in range(2):  # warm-up (and the graph's capture)
                    batcher.forward(windows, fixed_shapes=True)
                times = []
                for _ in range(repeats):
                    synchronize(decoder.device)
                    start = time.perf_counter()
                    batcher.forward(windows, fixed_shapes=True)  # ends with the download
                    times.append(time.perf_counter() - start)
                for stream in streams:
                    stream.close()
                step = statistics.median(times)
                chunk_s = windows[0].chunk_samples / decoder.sample_rate
                rows.append(
                    {
                        "window": label,
                        "mode": "CUDA graph" if graphs else "eager",
                        "batch": batch,
                        "step_ms": step * 1000,
                        "audio_s_per_s": batch * chunk_s / step,
                    }
                )
                print(
                    f"  {label}, {rows[-1]['mode']}, batch {batch}: {step * 1000:.1f} ms",
                    flush=True,
                )
    return rows


def first_chunk_times(decoder: MioCodecDecoder, repeats: int) -> list[dict]:
    """A stream's first window, 12 tokens (the first audio at 4x real time and faster): from
    planning to its samples on the host, alone and with 15 other streams' first windows."""
    voice = load_voice("en_female")
    gen = torch.Generator().manual_seed(1)
    rows = []
    for graphs in (False, True) if decoder.device.type == "cuda" else (False,):
        for batch in (1, 16):
            batcher = decoder.batcher(cuda_graphs=graphs)
            times = []
            for attempt in range(repeats + 2):
                streams = [batcher.open(voice) for _ in range(batch)]
                for stream in streams:
                    stream.push_tokens(
                        torch.randint(0, decoder.codebook_size, (12,), generator=gen)
                    )
                synchronize(decoder.device)
                start = time.perf_counter()
                windows = [s.next_window() for s in streams]
                chunks = batcher.forward(windows, fixed_shapes=True).apply()
                elapsed = time.perf_counter() - start
                assert all(c.numel() for c in chunks)
                if attempt >= 2:  # the first two warm up (and capture)
                    times.append(elapsed)
                for stream in streams:
                    stream.close()
            rows.append(
                {
                    "mode": "CUDA graph" if graphs else "eager",
                    "streams": batch,
                    "first_chunk_ms": statistics.median(times) * 1000,
                }
            )
            print(
                f"  first chunk, {rows[-1]['mode']}, {batch} streams: "
                f"{rows[-1]['first_chunk_ms']:.1f} ms",
                flush=True,
            )
    return rows


def build_decoder(codec: str, device, quick: bool, dtype=None) -> MioCodecDecoder:
    """The full-size decoder (recipe seed 0); in a quick run, the tiny upstream checkpoint."""
    if quick:
        return MioCodecDecoder.from_pretrained(TINY_FIXTURES[codec], device, dtype)
    return MioCodecDecoder.from_config(FULL_CODEC_CONFIGS[codec], device, dtype, seed=0)


def streaming_lsd(device: str, codecs, lengths, speeds, quick: bool) -> list[dict]:
    """bench.streaming's simulation with the decode on `device`, fp32 and bf16."""
    voice = load_voice("en_female")
    rows = []
    for codec in codecs:
        reference = build_decoder(codec, device, quick, torch.float32)
        bf16 = MioCodecDecoder(
            copy.deepcopy(reference.model), device=device, dtype=torch.bfloat16, random_weights=True
        )
        for length in lengths:
            tokens = utterances(length, reference.codebook_size)[0]
            offline = reference.decode(tokens, voice).numpy()
            offline_bf16 = bf16.decode(tokens, voice).numpy()
            rate = reference.sample_rate
            for speed in speeds:
                cells = {}
                for dtype, decoder in (("fp32", reference), ("bf16", bf16)):
                    run = simulate(decoder, tokens, voice, StreamingOptions(), speed)
                    cells[dtype] = lsd_db(run.audio, offline, rate)
                rows.append(
                    {
                        "codec": codec,
                        "seconds": length,
                        "regime": f"{speed:g}x",
                        "lsd_fp32": cells["fp32"],
                        "lsd_bf16": cells["bf16"],
                        "lsd_bf16_offline": lsd_db(offline_bf16, offline, rate),
                    }
                )
                print(
                    f"  {codec} {length} s {speed:g}x: fp32 {cells['fp32']:.2f} dB, "
                    f"bf16 {cells['bf16']:.2f} dB",
                    flush=True,
                )
    return rows


def load_levels(device: str, codec: str, levels, rates, seconds: float) -> list[dict]:
    """bench.load against this checkout's server on `device`, the stand-in LLM in process."""
    rows = []
    for rate in rates:
        args = load.build_parser().parse_args(
            [
                "--device",
                device,
                "--codec",
                codec,
                "--rate",
                str(rate),
                "--seconds",
                str(seconds),
                "--levels",
                *map(str, levels),
            ]
        )
        headers = [h.format(buffer=f"{args.buffer_ms:g}") for h in load.HEADERS]
        for row in asyncio.run(load.run_levels(args, load.ROOT)):
            rows.append(dict(zip(["rate", *headers], [rate, *row[1:]], strict=True)))
    return rows


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="write every figure here as JSON")
    parser.add_argument(
        "--quick", action="store_true", help="every section small (checks the script on a CPU)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (--device cpu --quick to try it)")
    quick = args.quick
    started = time.perf_counter()
    report: dict = {"environment": environment(device), "sections": []}
    print(json.dumps(report["environment"]))

    def section(name: str, run) -> None:
        print(f"\n== {name} ==", flush=True)
        began = time.perf_counter()
        rows = run()
        report["sections"].append(Section(name, time.perf_counter() - began, rows).__dict__)
        if rows:
            headers = list(rows[0])
            cells = [[_fmt(r[h]) for h in headers] for r in rows]
            print(table(headers, cells))
        print(f"({time.perf_counter() - began:.0f} s)", flush=True)
        if args.out:  # after every section: a run cut short still leaves what it measured
            Path(args.out).write_text(json.dumps(report, indent=1))

    codecs = ["24kHz"] if quick else list(FULL_CODEC_CONFIGS)
    for codec in codecs:
        decoder = build_decoder(codec, device, quick)
        section(
            f"decode step, {codec}, {decoder.describe()}",
            lambda d=decoder: step_times(
                d, QUICK_BATCHES if quick else FULL_BATCHES, 3 if quick else 10
            ),
        )
        section(f"first chunk, {codec}", lambda d=decoder: first_chunk_times(d, 2 if quick else 10))
        del decoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    section(
        "streaming LSD against the fp32 offline decode",
        lambda: streaming_lsd(
            args.device,
            codecs,
            (2,) if quick else (2, 10),
            (4.0,) if quick else (4.0, 1.5),
            quick,
        ),
    )
    section(
        "bench.load, stand-in LLM",
        lambda: load_levels(
            args.device,
            "tiny-24khz" if quick else "random-24khz",
            (2,) if quick else (64, 256),
            (50,) if quick else (50, 200),
            2.0 if quick else 10.0,
        ),
    )
    report["total_seconds"] = time.perf_counter() - started
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nall sections in {report['total_seconds']:.0f} s")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


if __name__ == "__main__":
    main()
