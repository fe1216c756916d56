"""Helpers shared by the benchmarks: configs of the released codecs, timing, memory."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch

from miotts_stream.codec.decoder import RELEASED_CONFIGS

FULL_CODEC_CONFIGS = {"24kHz": RELEASED_CONFIGS["24khz"], "44.1kHz-v2": RELEASED_CONFIGS["44khz"]}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def dry_spells(
    arrivals: list[float], samples: list[int], rate: int, buffer_s: float
) -> tuple[int, float]:
    """(dry spells, seconds dry) of a player that starts `buffer_s` after the first chunk
    arrives: a chunk that arrives after its samples were due to play is a dry spell, and
    playback waits for it (so one late chunk counts once, not with every chunk after it)."""
    if not arrivals:
        return 0, 0.0
    play_at = arrivals[0] + buffer_s  # when the next chunk's first sample plays
    count, dry = 0, 0.0
    for arrived, n in zip(arrivals, samples, strict=True):
        if arrived > play_at + 1e-3:
            count += 1
            dry += arrived - play_at
            play_at = arrived
        play_at += n / rate
    return count, dry
