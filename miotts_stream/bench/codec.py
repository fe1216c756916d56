"""Offline decode speed of full-size MioCodec decoders (random weights) on this machine.

    python -m miotts_stream.bench.codec [--device cpu|cuda] [--repeats N]
        [--dtypes float32 bfloat16]

Prints the real-time factor (decode seconds / audio seconds; lower is faster) for 1 s and 10 s
of audio, peak memory, and for a reduced precision its LSD against the float32 decode of the
same tokens (same weights). Each codec and precision runs in its own subprocess so peak RSS is
its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os

import torch

from .common import FULL_CODEC_CONFIGS, median, peak_rss_mib, table, time_call

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _measure(name: str, device: str, dtype: str, repeats: int, queue) -> None:
    from miotts_stream.audio.quality import lsd_db
    from miotts_stream.codec import MioCodecDecoder

    rss_start = peak_rss_mib()
    config = FULL_CODEC_CONFIGS[name]
    decoder = MioCodecDecoder.from_config(config, device=device, dtype=DTYPES[dtype])
    params = sum(p.numel() for p in decoder.model.parameters())
    gen = torch.Generator().manual_seed(0)
    voice = torch.randn(128, generator=gen)
    results = {
        "codec": name,
        "params_m": params / 1e6,
        "device": str(decoder.device),
        "dtype": str(decoder.compute_dtype).replace("torch.", ""),
    }
    if decoder.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for seconds in (1, 10):
        tokens = torch.randint(0, decoder.codebook_size, (25 * seconds,), generator=gen)
        times = time_call(lambda t=tokens: decoder.decode(t, voice), repeats)
        results[f"rtf_{seconds}s"] = median(times) / seconds
    results["lsd_vs_fp32"] = 0.0
    if dtype != "float32":  # the same seeded weights in float32, decoded after the timing
        reference = MioCodecDecoder.from_config(config, device=device, dtype=torch.float32)
        results["lsd_vs_fp32"] = lsd_db(
            decoder.decode(tokens, voice).numpy(),
            reference.decode(tokens, voice).numpy(),
            decoder.sample_rate,
        )
    results["peak_rss_mib"] = peak_rss_mib()
    results["rss_start_mib"] = rss_start
    if decoder.device.type == "cuda":
        results["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    queue.put(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="*", choices=list(DTYPES), default=["float32"])
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = mp.get_context("spawn")
    rows = []
    for name in FULL_CODEC_CONFIGS:
        for dtype in args.dtypes:
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure, args=(name, device, dtype, args.repeats, queue))
            proc.start()
            result = queue.get()
            proc.join()
            rows.append(result)
    print(
        f"MioCodec decode, full-size random weights, device={device}, "
        f"threads={torch.get_num_threads()}, cpus={os.cpu_count()}, median of {args.repeats}"
    )
    headers = ["codec", "params(M)", "dtype", "RTF 1 s", "RTF 10 s", "LSD vs fp32", "peak RSS MiB"]
    body = [
        [
            r["codec"],
            f"{r['params_m']:.1f}",
            r["dtype"],
            f"{r['rtf_1s']:.4f}",
            f"{r['rtf_10s']:.4f}",
            f"{r['lsd_vs_fp32']:.3f}",
            f"{r['peak_rss_mib']:.0f}",
        ]
        for r in rows
    ]
    if any("peak_cuda_mib" in r for r in rows):
        headers.append("peak CUDA MiB")
        for line, r in zip(body, rows, strict=True):
            line.append(f"{r.get('peak_cuda_mib', 0):.0f}")
    print(table(headers, body))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
