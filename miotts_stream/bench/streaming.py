"""Streaming decode fidelity and cost, ours beside other projects' strategies.

    python -m miotts_stream.bench.streaming [--tokens 250] [--codecs 24kHz] [--no-throughput]

For both codecs (full-size, random weights) and three checkpoints each (two seeds of the
package's random recipe and one with PyTorch's default module initialisation, so that no
figure rests on one lucky checkpoint), and two arrival regimes:
  fast      all tokens available at once (a GPU LLM);
  realtime  tokens arrive at 1.5x real time; playback starts with the first chunk, and our
            streams see the client's buffer through a simulated clock.
prints, per checkpoint, tokens received before the first audio, LSD (dB) and SNR (dB) against
the offline decode of the same tokens, seams, and decode compute: window tokens decoded per
token of audio (padded as computed; deterministic) and decode seconds per second of audio
(timed). Then the mean over checkpoints, and per-chunk decode time and chunks per second at
batch 1, 8 and 32, and the cost of a chunk at the 2nd and at the 60th second.

The other strategies are re-implemented here from their public descriptions, for comparison only.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from miotts_stream.audio.quality import lsd_db, seam_jumps, snr_db
from miotts_stream.codec import (
    MioCodecDecoder,
    StatisticsMode,
    StreamingOptions,
    TokenStreamDecoder,
    load_config,
    load_voice,
)
from miotts_stream.codec.model import MioCodecDecoderModel

from .common import FULL_CODEC_CONFIGS, median, table

ARRIVAL_SPEEDUP = 1.5  # "realtime" regime: tokens arrive at 1.5x real time


@dataclass
class Run:
    audio: np.ndarray
    first_audio_tokens: int  # tokens received when the first audio came out
    seams: list[int]
    window_tokens: int | None = None  # ours: tokens decoded, windows padded as computed
    decode_seconds: float | None = None  # ours: time spent decoding windows


# ---- our streams -------------------------------------------------------------------------


def first_audio_tokens(decoder, tokens, voice, options) -> int:
    """Push token by token (no clock) and count tokens until audio comes out."""
    stream = decoder.stream(voice, options)
    for i in range(len(tokens)):
        if stream.push(tokens[i : i + 1]):
            return i + 1
    return len(tokens)


class _MeteredStream:
    """Drives one stream window by window, counting decoded window tokens and decode time."""

    def __init__(self, stream: TokenStreamDecoder):
        self.stream = stream
        self.window_tokens = 0
        self.decode_seconds = 0.0

    def drain(self) -> list[torch.Tensor]:
        bucket = self.stream.options.window_bucket_tokens
        chunks = []
        while (window := self.stream.next_window()) is not None:
            start = time.perf_counter()
            chunks += self.stream.batcher.decode([window])
            self.decode_seconds += time.perf_counter() - start
            self.window_tokens += bucket * math.ceil(window.length / bucket)
        return chunks


def ours(decoder, tokens, voice, regime: str, options: StreamingOptions) -> Run:
    spt = decoder.samples_per_token
    if regime == "fast":
        metered = _MeteredStream(decoder.stream(voice, options))
        metered.stream.push_tokens(tokens)
        chunks = metered.drain()
        metered.stream.mark_finished()
        chunks += metered.drain()
        first = first_audio_tokens(decoder, tokens, voice, options)
    else:
        rate = decoder.token_rate * ARRIVAL_SPEEDUP
        state = {"now": 0.0, "first_emit": None}

        def buffered_seconds() -> float:
            if state["first_emit"] is None:
                return float("inf")
            played = state["now"] - state["first_emit"]
            return metered.stream.emitted_samples / decoder.sample_rate - played

        metered = _MeteredStream(decoder.stream(voice, options, clock=buffered_seconds))
        chunks, first = [], None
        for i in range(len(tokens)):
            state["now"] = (i + 1) / rate
            metered.stream.push_tokens(tokens[i : i + 1])
            out = metered.drain()
            if out and first is None:
                first, state["first_emit"] = i + 1, state["now"]
            chunks += out
        metered.stream.mark_finished()
        chunks += metered.drain()
    seams = list(np.cumsum([c.numel() for c in chunks])[:-1])
    audio = torch.cat(chunks).numpy()
    assert len(audio) == spt * len(tokens)
    return Run(audio, first, seams, metered.window_tokens, metered.decode_seconds)


# ---- other projects' strategies (bench only) --------------------------------------------------


def independent_chunks(decoder, tokens, voice, chunk=60) -> Run:
    parts = [decoder.decode(tokens[i : i + chunk], voice) for i in range(0, len(tokens), chunk)]
    return Run(torch.cat(parts).numpy(), min(chunk, len(tokens)), _seams(parts))


def left_context_crossfade(decoder, tokens, voice, chunk=50, context=5, fade_ms=50.0) -> Run:
    """Chunks decoded with a little left context; each chunk's last `fade` samples are held back
    and crossfaded with the next window's left-context samples covering the same time."""
    spt = decoder.samples_per_token
    fade = round(fade_ms * decoder.sample_rate / 1000)
    parts, held = [], None
    for start in range(0, len(tokens), chunk):
        lo = max(0, start - context)
        wave = decoder.decode(tokens[lo : start + chunk], voice)
        body = wave[(start - lo) * spt :]
        if held is not None:
            overlap_src = wave[(start - lo) * spt - len(held) : (start - lo) * spt]
            ramp = torch.linspace(0, 1, len(held))
            parts.append(held * (1 - ramp) + overlap_src * ramp)
        last = start + chunk >= len(tokens)
        keep = body if last else body[:-fade]
        held = None if last else body[-fade:]
        parts.append(keep)
    return Run(torch.cat(parts).numpy(), min(chunk, len(tokens)), _seams(parts))


def prefix_redecode(decoder, tokens, voice, every=32, hold=6, fade_ms=0.0) -> Run:
    """Re-decode the whole prefix every `every` tokens and emit all but the last `hold`
    tokens; optionally crossfade with the previous decode's samples past the emitted point."""
    spt = decoder.samples_per_token
    fade = round(fade_ms * decoder.sample_rate / 1000)
    parts, emitted, prev, first = [], 0, None, None
    n = len(tokens)
    marks = [*list(range(every, n, every)), n]
    for mark in marks:
        wave = decoder.decode(tokens[:mark], voice)
        final = mark == n
        end = mark * spt if final else max(0, (mark - hold) * spt)
        if end <= emitted:
            continue
        piece = wave[emitted:end].clone()
        if prev is not None and fade:
            overlap = min(fade, len(piece), len(prev) - emitted)
            if overlap > 0:
                ramp = torch.linspace(0, 1, overlap)
                piece[:overlap] = (
                    prev[emitted : emitted + overlap] * (1 - ramp) + piece[:overlap] * ramp
                )
        parts.append(piece)
        emitted, prev = end, wave
        first = first or mark
    return Run(torch.cat(parts).numpy(), first, _seams(parts))


def _seams(parts) -> list[int]:
    return list(np.cumsum([len(p) for p in parts])[:-1])


OTHERS: dict[str, Callable] = {
    "independent 60-token chunks (any-miotts)": independent_chunks,
    "50-token chunks, 5 left ctx, 50 ms xfade (SSE fork)": left_context_crossfade,
    "prefix re-decode /32, hold 6 (Indic server)": prefix_redecode,
    "prefix re-decode /20, hold 32, 30 ms xfade (llama.cpp port)": lambda d, t, v: prefix_redecode(
        d, t, v, every=20, hold=32, fade_ms=30.0
    ),
}

OUR_SETTINGS: dict[str, StreamingOptions] = {
    "ours: defaults (adaptive window)": StreamingOptions(),
    "ours: fixed window (defaults before issue 9)": StreamingOptions(
        max_lookahead_tokens=0, max_chunk_tokens=0
    ),
    "ours: window-only GroupNorm stats": StreamingOptions(groupnorm_stats=StatisticsMode.WINDOW),
}
# Settings measured on the first checkpoint of each codec only (to keep the bench short).
FIRST_CHECKPOINT_ONLY = ("ours: window-only GroupNorm stats",)
REGIMES = ("fast", "realtime")
HEADERS = [
    "strategy",
    "regime",
    "tokens→1st audio",
    "LSD dB",
    "SNR dB",
    "chunks",
    "max seam jump / p99.9",
    "window tok / audio tok",
    "decode s / audio s",
]


def fidelity_rows(decoder, tokens, voice, reference, others: bool) -> tuple[list[list], dict]:
    """Table rows for one checkpoint, and {(setting, regime): (LSD, window tok / audio tok,
    tokens before the first audio)}."""
    audio_seconds = len(tokens) / decoder.token_rate
    rows, ours_lsd = [], {}

    def add(label, regime, run: Run):
        jump, p999 = seam_jumps(run.audio, run.seams)
        lsd = lsd_db(run.audio, reference, decoder.sample_rate)
        per_token = None if run.window_tokens is None else run.window_tokens / len(tokens)
        rows.append(
            [
                label,
                regime,
                run.first_audio_tokens,
                f"{lsd:.3f}",
                f"{snr_db(run.audio, reference):.1f}",
                len(run.seams) + 1,
                f"{jump / p999:.2f}",
                "" if per_token is None else f"{per_token:.2f}",
                "" if run.decode_seconds is None else f"{run.decode_seconds / audio_seconds:.3f}",
            ]
        )
        return lsd, per_token, run.first_audio_tokens

    for label, options in OUR_SETTINGS.items():
        if label in FIRST_CHECKPOINT_ONLY and not others:
            continue
        for regime in REGIMES:
            ours_lsd[label, regime] = add(
                label, regime, ours(decoder, tokens, voice, regime, options)
            )
    if others:
        for label, strategy in OTHERS.items():
            # Fixed schedules: the same output whatever the arrival rate.
            add(label, "both", strategy(decoder, tokens, voice))
    return rows, ours_lsd


def checkpoints(config_path, device) -> dict[str, Callable[[], MioCodecDecoder]]:
    """Three full-size random checkpoints: two seeds of the package's recipe (GroupNorm and
    final LayerNorm gains ~ 1) and PyTorch's default module initialisation (seeded)."""

    def recipe(seed: int) -> Callable[[], MioCodecDecoder]:
        return lambda: MioCodecDecoder.from_config(config_path, device=device, seed=seed)

    def torch_default() -> MioCodecDecoder:
        torch.manual_seed(0)
        model = MioCodecDecoderModel(load_config(config_path))
        return MioCodecDecoder(
            model, device=device, source="PyTorch default init (seed 0)", random_weights=True
        )

    return {"recipe seed 0": recipe(0), "recipe seed 1": recipe(1), "torch default": torch_default}


def mean_table(results: dict[str, dict]) -> str:
    """Mean over checkpoints of our settings' LSD, and over the recipe's seeds alone."""
    rows = []
    for label in OUR_SETTINGS:
        if label in FIRST_CHECKPOINT_ONLY:
            continue
        for regime in REGIMES:
            cells = [results[name][label, regime] for name in results]
            recipe = [
                r[label, regime][0] for name, r in results.items() if name.startswith("recipe")
            ]
            rows.append(
                [
                    label,
                    regime,
                    max(c[2] for c in cells),
                    f"{statistics.mean(c[0] for c in cells):.3f}",
                    f"{statistics.mean(recipe):.3f}" if recipe else "",
                    f"{max(c[0] for c in cells):.3f}",
                    f"{statistics.mean(c[1] for c in cells):.2f}",
                ]
            )
    headers = [
        "strategy",
        "regime",
        "tokens→1st audio (max)",
        "LSD mean",
        "LSD mean, recipe seeds",
        "LSD worst",
        "window tok / audio tok",
    ]
    return table(headers, rows)


def throughput_table(decoder, voice, batches=(1, 8, 32), repeats=3) -> str:
    """Steady-state windows (full left context and lookahead), one per stream per step."""
    options = StreamingOptions()
    gen = torch.Generator().manual_seed(1)
    rows = []
    for batch in batches:
        batcher = decoder.batcher()
        streams = []
        for _ in range(batch):
            stream = batcher.open(voice, options)
            stream.push_tokens(torch.randint(0, decoder.codebook_size, (400,), generator=gen))
            stream.emitted_tokens = 100  # jump to mid-utterance: full left context
            streams.append(stream)
        times = []
        for _ in range(repeats):
            for s in streams:
                s.emitted_tokens = 100
                s.has_tail = False
            start = time.perf_counter()
            produced = batcher.step(streams)
            times.append(time.perf_counter() - start)
            assert len(produced) == batch
        step = median(times)
        # Chunks grow when tokens are already there (adaptive window): measure what came out.
        audio_per_chunk = produced[0].numel() / decoder.sample_rate
        rows.append(
            [
                batch,
                f"{step * 1000:.0f}",
                f"{step / batch * 1000:.1f}",
                f"{batch / step:.1f}",
                f"{batch * audio_per_chunk / step:.1f}",
            ]
        )
    headers = ["batch", "step ms", "ms/chunk", "chunks/s", "audio s per s"]
    return f"chunks of {audio_per_chunk:.2f} s audio\n" + table(headers, rows)


def cost_by_position(decoder, voice, repeats=5) -> str:
    """Time of the chunk starting at second 2 and at second 60 of one long utterance."""
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, decoder.codebook_size, (25 * 64,), generator=gen)
    cells = []
    for second in (2, 60):
        times = []
        for _ in range(repeats):
            stream = decoder.stream(voice)
            stream.push_tokens(tokens)
            stream.emitted_tokens = 25 * second
            start = time.perf_counter()
            window = stream.next_window()
            stream.batcher.decode([window])
            times.append(time.perf_counter() - start)
        cells.append((second, window.length, median(times)))
    ratio = cells[1][2] / cells[0][2]
    lines = [f"chunk at {s:>2} s: window {n} tokens, {t * 1000:.0f} ms" for s, n, t in cells]
    return "\n".join([*lines, f"cost ratio 60 s / 2 s: {ratio:.2f}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--device", default=None)
    parser.add_argument("--codecs", nargs="*", default=list(FULL_CODEC_CONFIGS))
    parser.add_argument("--no-throughput", action="store_true")
    args = parser.parse_args()
    voice = load_voice("en_female")
    for name in args.codecs:
        results = {}
        for index, (label, build) in enumerate(
            checkpoints(FULL_CODEC_CONFIGS[name], args.device).items()
        ):
            decoder = build()
            gen = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, decoder.codebook_size, (args.tokens,), generator=gen)
            reference = decoder.decode(tokens, voice).numpy()
            if not np.isfinite(reference).all():
                raise SystemExit(f"{name}, {label}: the offline decode is not finite")
            rms = float(np.sqrt(np.mean(reference.astype(np.float64) ** 2)))
            print(
                f"\n=== MioCodec {name}, {label}, {decoder.device}, {args.tokens} tokens "
                f"({args.tokens / 25:.0f} s), voice en_female (norm {float(voice.norm()):.1f}); "
                f"offline decode finite, RMS {rms:.3f} ==="
            )
            rows, results[label] = fidelity_rows(
                decoder, tokens, voice, reference, others=index == 0
            )
            print(table(HEADERS, rows))
        print(f"\n=== MioCodec {name}: mean over the {len(results)} checkpoints ===")
        print(mean_table(results))
        if not args.no_throughput:
            decoder = MioCodecDecoder.from_config(FULL_CODEC_CONFIGS[name], device=args.device)
            print(f"\nthroughput, {name} ({decoder.device}, {torch.get_num_threads()} threads):")
            print(throughput_table(decoder, voice))
            print(cost_by_position(decoder, voice))


if __name__ == "__main__":
    main()
