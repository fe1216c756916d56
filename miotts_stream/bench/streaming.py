"""Streaming decode fidelity and cost in the regimes the service sees.

    python -m miotts_stream.bench.streaming [--codecs 24kHz 44.1kHz-v2] [--lengths 2 4 10]
        [--speeds 8 4 1.5] [--variants default before] [--check-standin] [--others]

The service never has all of an utterance's tokens at once: an LLM hands them over one per
step. So tokens arrive here one at a time at R times real time (token i at i / (25 R) s of a
simulated clock), and the stream sees its client's buffer through the playback clock the
service gives it (playback starts with the first chunk; a chunk that comes after the buffer ran
dry pauses playback, counted as a dry spell). Decoding takes no simulated time: what is
measured is planning, not this machine's speed. "All at once" (every token there before the
first window is planned, no clock) is printed as a bound only.

Per codec, utterance length (2, 4, 10 s) and regime, over several checkpoints:
  LSD        log-spectral distance (dB) against the offline decode of the same tokens, over
             the utterance and by stretch of it (the first seconds are where the error is);
  first      tokens received, and simulated ms since generation began, at the first audio;
  win/audio  window tokens decoded (padded, as computed) per token of audio: the decode cost;
  dry        dry spells of the simulated client.

Checkpoints: `upstream tiny` (the shared fixture the upstream code built, random weights,
small widths) and the full-size released architecture with this package's seeded random recipe
(`recipe seed 0`, `recipe seed 1`). `--check-standin` first shows that the recipe stands in for
the upstream build: the same tiny architecture with the recipe's weights beside the upstream
checkpoint, same utterances and regimes.

`--variants` compares streaming options (see VARIANTS) in one table; `--others` adds other
projects' fixed schedules on the 10 s utterance (re-implemented from their descriptions, for
comparison only).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from miotts_stream.audio.quality import lsd_db, seam_jumps
from miotts_stream.codec import MioCodecDecoder, StatisticsMode, StreamingOptions, load_voice
from miotts_stream.codec.config import load_config

from .common import FULL_CODEC_CONFIGS, median, table

TINY_FIXTURES = {
    "24kHz": Path(__file__).resolve().parents[2] / "tests/fixtures/miocodec/tiny-24khz",
    "44.1kHz-v2": Path(__file__).resolve().parents[2] / "tests/fixtures/miocodec/tiny-44khz",
}
SPEEDS = (8.0, 4.0, 1.5)
LENGTHS_S = (2, 4, 10)
UTTERANCES_PER_LENGTH = 2  # different token sequences, so no figure rests on one
POLL_S = 0.01  # the service's scheduler re-plans this often while tokens are pending
TOKEN_RATE = 25

# Stretches of an utterance whose LSD is reported on its own (seconds).
STRETCHES = {
    2: ((0, 0.16), (0.16, 0.5), (0.5, 1), (1, 2)),
    4: ((0, 0.5), (0.5, 1), (1, 2), (2, 4)),
    10: ((0, 1), (1, 2), (2, 4), (4, 7), (7, 10)),
}

VARIANTS: dict[str, StreamingOptions] = {
    "default": StreamingOptions(),
    # The planning before issue 20: first audio from 6 tokens, a chunk planned as soon as its
    # lookahead is there.
    "before": StreamingOptions(
        plan_buffer_ms=0,
        first_wait_ms=0,
        min_buffer_ms=150,
        early_lookahead_share=0.5,
        groupnorm_stats=StatisticsMode.ACCUMULATED,
    ),
    "accumulated statistics": StreamingOptions(groupnorm_stats=StatisticsMode.ACCUMULATED),
    "no just in time": StreamingOptions(plan_buffer_ms=0),
    "first window of 6": StreamingOptions(first_wait_ms=0),
    "deadline 150 ms": StreamingOptions(min_buffer_ms=150, plan_buffer_ms=300),
    "early context 1/2": StreamingOptions(early_lookahead_share=0.5),
}


@dataclass
class Run:
    audio: np.ndarray
    first_audio_tokens: int  # tokens received when the first audio came out
    first_audio_s: float  # simulated seconds since generation began, at the first audio
    seams: list[int]
    window_tokens: int  # tokens decoded, windows padded as computed
    dry_spells: int = 0

    def window_tokens_per_token(self, tokens: int) -> float:
        return self.window_tokens / tokens


class SimulatedClient:
    """The simulated time, and a client that plays the audio from its first chunk on."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.now = 0.0
        self.play_start: float | None = None
        self.emitted = 0  # samples sent
        self.dry_spells = 0

    def buffered_seconds(self) -> float:
        if self.play_start is None:
            return math.inf
        return self.emitted / self.sample_rate - (self.now - self.play_start)

    def receive(self, samples: int) -> None:
        if self.play_start is None:
            self.play_start = self.now
        elif self.buffered_seconds() < 0:  # playback ran dry and waited for this chunk
            self.dry_spells += 1
            self.play_start = self.now - self.emitted / self.sample_rate
        self.emitted += samples


def simulate(
    decoder: MioCodecDecoder,
    tokens: torch.Tensor,
    voice: torch.Tensor,
    options: StreamingOptions,
    speed: float | None,
) -> Run:
    """Tokens arriving one at a time at `speed` x real time (None: all at once, no clock)."""
    client = SimulatedClient(decoder.sample_rate)
    clock = None if speed is None else client.buffered_seconds
    stream = decoder.stream(voice, options, clock=clock, timer=lambda: client.now)
    bucket = options.window_bucket_tokens
    chunks: list[torch.Tensor] = []
    state = {"window_tokens": 0, "first": None}

    def drain() -> None:
        while (window := stream.next_window()) is not None:
            state["window_tokens"] += bucket * math.ceil(window.length / bucket)
            for chunk in stream.batcher.decode([window]):
                if state["first"] is None:
                    state["first"] = (len(stream.tokens), client.now)
                client.receive(chunk.numel())
                chunks.append(chunk)

    count = len(tokens)
    if speed is None:
        stream.push_tokens(tokens)
        drain()
    else:
        interval = 1.0 / (TOKEN_RATE * speed)
        arrived, next_poll = 0, POLL_S
        while arrived < count:
            next_token = (arrived + 1) * interval
            if next_poll < next_token - 1e-12:
                client.now = next_poll
                next_poll += POLL_S
            else:
                client.now = next_token
                stream.push_tokens(tokens[arrived : arrived + 1])
                arrived += 1
            drain()
    stream.mark_finished()
    drain()
    assert stream.done
    audio = torch.cat(chunks).numpy()
    assert len(audio) == decoder.samples_per_token * count
    seams = list(np.cumsum([c.numel() for c in chunks])[:-1])
    first_tokens, first_at = state["first"]
    return Run(audio, first_tokens, first_at, seams, state["window_tokens"], client.dry_spells)


# ---- checkpoints and utterances -------------------------------------------------------------


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoints(codec: str, device: str | None) -> dict[str, Callable[[], MioCodecDecoder]]:
    """Float32 decoders (the reference); `--dtype` streams the same weights in another."""
    config = FULL_CODEC_CONFIGS[codec]
    f32 = torch.float32

    def recipe(seed: int) -> Callable[[], MioCodecDecoder]:
        return lambda: MioCodecDecoder.from_config(config, device=device, dtype=f32, seed=seed)

    return {
        "upstream tiny": lambda: MioCodecDecoder.from_pretrained(
            TINY_FIXTURES[codec], device, dtype=f32
        ),
        "recipe seed 0": recipe(0),
        "recipe seed 1": recipe(1),
    }


def standin_checkpoints(codec: str, device: str | None) -> dict[str, Callable]:
    """The tiny architecture twice: as the upstream code built it, and with this package's
    random recipe (two seeds)."""
    folder = TINY_FIXTURES[codec]
    config = load_config(folder / "config.yaml")

    def recipe(seed: int) -> Callable[[], MioCodecDecoder]:
        return lambda: MioCodecDecoder.from_config(
            config, device=device, dtype=torch.float32, seed=seed
        )

    return {
        "upstream tiny": lambda: MioCodecDecoder.from_pretrained(folder, device, torch.float32),
        "recipe tiny seed 0": recipe(0),
        "recipe tiny seed 1": recipe(1),
    }


def utterances(seconds: int, codebook_size: int) -> list[torch.Tensor]:
    return [
        torch.randint(
            0,
            codebook_size,
            (TOKEN_RATE * seconds,),
            generator=torch.Generator().manual_seed(1000 * seconds + i),
        )
        for i in range(UTTERANCES_PER_LENGTH)
    ]


# ---- measuring ----------------------------------------------------------------------------


@dataclass
class Cell:
    """One (checkpoint, variant, length, regime): means over the utterances."""

    lsd: float
    stretches: list[float]
    first_tokens: int  # the most over the utterances
    first_ms: float
    window_per_token: float
    dry: int


@dataclass
class Results:
    """cells[checkpoint][variant, length, regime]"""

    cells: dict[str, dict[tuple[str, int, str], Cell]] = field(default_factory=dict)

    def mean(self, variant: str, length: int, regime: str, attr: str, names=None) -> float:
        names = names or list(self.cells)
        return statistics.mean(getattr(self.cells[n][variant, length, regime], attr) for n in names)

    def mean_stretches(self, variant: str, length: int, regime: str) -> list[float]:
        rows = [self.cells[n][variant, length, regime].stretches for n in self.cells]
        return [statistics.mean(col) for col in zip(*rows, strict=True)]


def regime_name(speed: float | None) -> str:
    return "all at once (bound)" if speed is None else f"{speed:g}x"


def measure(
    decoder: MioCodecDecoder,
    reference_decoder: MioCodecDecoder,
    voice: torch.Tensor,
    variants: dict[str, StreamingOptions],
    lengths: Sequence[int],
    speeds: Sequence[float | None],
) -> dict[tuple[str, int, str], Cell]:
    rate = decoder.sample_rate
    cells = {}
    for length in lengths:
        utts = utterances(length, decoder.codebook_size)
        references = [reference_decoder.decode(t, voice).numpy() for t in utts]
        if not all(np.isfinite(r).all() for r in references):
            raise SystemExit("the offline decode is not finite")
        for variant, options in variants.items():
            for speed in speeds:
                runs = [simulate(decoder, t, voice, options, speed) for t in utts]
                lsd = [lsd_db(r.audio, ref, rate) for r, ref in zip(runs, references, strict=True)]
                stretches = []
                for a, b in STRETCHES.get(length, ((0, length),)):
                    lo, hi = round(a * rate), round(b * rate)
                    stretches.append(
                        statistics.mean(
                            lsd_db(r.audio[lo:hi], ref[lo:hi], rate)
                            for r, ref in zip(runs, references, strict=True)
                        )
                    )
                cells[variant, length, regime_name(speed)] = Cell(
                    lsd=statistics.mean(lsd),
                    stretches=stretches,
                    first_tokens=max(r.first_audio_tokens for r in runs),
                    first_ms=max(r.first_audio_s for r in runs) * 1000,
                    window_per_token=statistics.mean(
                        r.window_tokens_per_token(len(t)) for r, t in zip(runs, utts, strict=True)
                    ),
                    dry=sum(r.dry_spells for r in runs),
                )
    return cells


def run_checkpoints(builders, args, variants, voice) -> Results:
    results = Results()
    speeds = [*args.speeds, None] if args.bound else list(args.speeds)
    for name, build in builders.items():
        started = time.perf_counter()
        reference = build()  # float32: the offline decode every figure is measured against
        decoder = reference
        if args.dtype != "float32":  # the same weights, streamed in reduced precision
            decoder = MioCodecDecoder(
                copy.deepcopy(reference.model),
                device=reference.device,
                dtype=DTYPES[args.dtype],
                source=reference.source,
                random_weights=reference.random_weights,
            )
        results.cells[name] = measure(decoder, reference, voice, variants, args.lengths, speeds)
        print(f"  {name}: {decoder.describe()} ({time.perf_counter() - started:.0f} s)", flush=True)
    return results


# ---- tables -----------------------------------------------------------------------------------


def main_table(results: Results, variant: str, lengths, speeds) -> str:
    names = list(results.cells)
    rows = []
    for length in lengths:
        for regime in map(regime_name, speeds):
            cells = [results.cells[n][variant, length, regime] for n in names]
            rows.append(
                [
                    f"{length} s",
                    regime,
                    *(f"{c.lsd:.2f}" for c in cells),
                    f"{statistics.mean(c.lsd for c in cells):.2f}",
                    max(c.first_tokens for c in cells),
                    f"{max(c.first_ms for c in cells):.0f}",
                    f"{statistics.mean(c.window_per_token for c in cells):.2f}",
                    sum(c.dry for c in cells),
                ]
            )
    headers = [
        "utterance",
        "regime",
        *(f"LSD {n}" for n in names),
        "LSD mean",
        "first: tokens",
        "first: ms",
        "win/audio tok",
        "dry",
    ]
    return table(headers, rows)


def stretch_table(results: Results, variant: str, length: int, speeds) -> str:
    spans = STRETCHES.get(length, ((0, length),))
    rows = [
        [
            regime_name(s),
            *(f"{v:.2f}" for v in results.mean_stretches(variant, length, regime_name(s))),
        ]
        for s in speeds
    ]
    headers = ["regime", *(f"{a:g}-{b:g} s" for a, b in spans)]
    return table(headers, rows)


def variants_table(results: Results, variants, lengths, speeds) -> str:
    rows = []
    for variant in variants:
        row = [variant]
        for speed in speeds:
            regime = regime_name(speed)
            row += [f"{results.mean(variant, n, regime, 'lsd'):.2f}" for n in lengths]
            cost = statistics.mean(
                results.mean(variant, n, regime, "window_per_token") for n in lengths
            )
            row.append(f"{cost:.2f}")
        row.append(
            max(
                results.cells[n][variant, lengths[0], regime_name(s)].first_tokens
                for n in results.cells
                for s in speeds
            )
        )
        rows.append(row)
    headers = ["variant"]
    for speed in speeds:
        headers += [f"{regime_name(speed)} {n} s" for n in lengths] + [
            f"{regime_name(speed)} win/tok"
        ]
    headers.append("first: tokens")
    return table(headers, rows)


# ---- other projects' strategies (bench only) --------------------------------------------------


def _seams(parts) -> list[int]:
    return list(np.cumsum([len(p) for p in parts])[:-1])


def independent_chunks(decoder, tokens, voice, chunk=60):
    parts = [decoder.decode(tokens[i : i + chunk], voice) for i in range(0, len(tokens), chunk)]
    return torch.cat(parts).numpy(), min(chunk, len(tokens)), _seams(parts)


def left_context_crossfade(decoder, tokens, voice, chunk=50, context=5, fade_ms=50.0):
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
    return torch.cat(parts).numpy(), min(chunk, len(tokens)), _seams(parts)


def prefix_redecode(decoder, tokens, voice, every=32, hold=6):
    """Re-decode the whole prefix every `every` tokens and emit all but the last `hold`."""
    spt = decoder.samples_per_token
    parts, emitted, first = [], 0, None
    n = len(tokens)
    for mark in [*range(every, n, every), n]:
        wave = decoder.decode(tokens[:mark], voice)
        end = mark * spt if mark == n else max(0, (mark - hold) * spt)
        if end <= emitted:
            continue
        parts.append(wave[emitted:end])
        emitted, first = end, first or mark
    return torch.cat(parts).numpy(), first, _seams(parts)


OTHERS: dict[str, Callable] = {
    "independent 60-token chunks (any-miotts)": independent_chunks,
    "50-token chunks, 5 left ctx, 50 ms xfade (SSE fork)": left_context_crossfade,
    "prefix re-decode /32, hold 6 (Indic server)": prefix_redecode,
}


def others_table(decoder, voice, seconds: int = 10) -> str:
    tokens = utterances(seconds, decoder.codebook_size)[0]
    reference = decoder.decode(tokens, voice).numpy()
    rows = []
    for label, strategy in OTHERS.items():
        audio, first, seams = strategy(decoder, tokens, voice)
        jump, p999 = seam_jumps(audio, seams)
        rows.append(
            [
                label,
                first,
                f"{lsd_db(audio, reference, decoder.sample_rate):.2f}",
                f"{jump / p999:.2f}",
            ]
        )
    return table(
        ["strategy (fixed schedule)", "tokens→1st audio", "LSD dB", "seam jump / p99.9"], rows
    )


# ---- throughput ------------------------------------------------------------------------------


def throughput_table(decoder, voice, batches=(1, 8, 32), repeats=3) -> str:
    """Steady windows (full left context, the longest chunk and lookahead), one per stream."""
    options = StreamingOptions()
    gen = torch.Generator().manual_seed(1)
    rows = []
    for batch in batches:
        batcher = decoder.batcher()
        streams = []
        for _ in range(batch):
            stream = batcher.open(voice, options)
            stream.push_tokens(torch.randint(0, decoder.codebook_size, (400,), generator=gen))
            streams.append(stream)
        times = []
        for _ in range(repeats):
            for s in streams:
                s.emitted_tokens = 100  # mid-utterance: full left context
                s.has_tail = False
            start = time.perf_counter()
            produced = batcher.step(streams)
            times.append(time.perf_counter() - start)
            assert len(produced) == batch
        step = median(times)
        audio_per_chunk = produced[0].numel() / decoder.sample_rate
        rows.append(
            [
                batch,
                f"{step * 1000:.0f}",
                f"{step / batch * 1000:.1f}",
                f"{batch * audio_per_chunk / step:.1f}",
            ]
        )
    headers = ["batch", "step ms", "ms/chunk", "audio s per s"]
    return f"chunks of {audio_per_chunk:.2f} s audio\n" + table(headers, rows)


# ---- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", nargs="*", default=list(FULL_CODEC_CONFIGS))
    parser.add_argument("--lengths", type=int, nargs="*", default=list(LENGTHS_S))
    parser.add_argument("--speeds", type=float, nargs="*", default=list(SPEEDS))
    parser.add_argument("--variants", nargs="*", default=["default"], choices=list(VARIANTS))
    parser.add_argument("--no-bound", dest="bound", action="store_false")
    parser.add_argument("--check-standin", action="store_true")
    parser.add_argument("--others", action="store_true")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="compute precision of the streamed decode (the offline reference is float32)",
    )
    args = parser.parse_args()
    voice = load_voice("en_female")
    variants = {name: VARIANTS[name] for name in args.variants}
    speeds = [*args.speeds, None] if args.bound else list(args.speeds)
    print(
        f"streaming fidelity: tokens one at a time at {', '.join(f'{s:g}x' for s in args.speeds)}"
        f" real time, {UTTERANCES_PER_LENGTH} utterances per length, voice en_female, "
        f"streamed in {args.dtype} against the float32 offline decode, "
        f"{torch.get_num_threads()} threads"
    )
    for codec in args.codecs:
        if args.check_standin:
            print(f"\n=== {codec}: does the random recipe stand in for the upstream build? ===")
            standin = run_checkpoints(
                standin_checkpoints(codec, args.device),
                args,
                {"default": VARIANTS["default"]},
                voice,
            )
            print(main_table(standin, "default", args.lengths, speeds))
        print(f"\n=== MioCodec {codec} ===")
        results = run_checkpoints(checkpoints(codec, args.device), args, variants, voice)
        for variant in variants:
            print(f"\n{codec}, variant '{variant}': LSD dB against the offline decode")
            print(main_table(results, variant, args.lengths, speeds))
            for length in args.lengths:
                print(f"\n{codec}, '{variant}', {length} s: LSD dB by stretch, mean of checkpoints")
                print(stretch_table(results, variant, length, speeds))
        if len(variants) > 1:
            print(f"\n{codec}: variants (LSD: mean of checkpoints; win/tok: mean of lengths)")
            print(variants_table(results, variants, args.lengths, args.speeds))
        if args.others or args.throughput:
            decoder = checkpoints(codec, args.device)["recipe seed 0"]()
            if args.others:
                print(f"\n{codec}, recipe seed 0, 10 s, other projects' schedules:")
                print(others_table(decoder, voice))
            if args.throughput:
                print(
                    f"\nthroughput, {codec} ({decoder.device}, {torch.get_num_threads()} threads):"
                )
                print(throughput_table(decoder, voice))


if __name__ == "__main__":
    main()
