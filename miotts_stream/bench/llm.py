"""Speech-token speed of the demo LLM: in process (vLLM AsyncLLM) and behind `vllm serve`.

    python -m miotts_stream.bench.llm [--size small] [--streams 1 4 16] [--tokens 200]

For 1, 4 and 16 concurrent streams: the first-token latency (from the request to its first
speech code) and each stream's rate after that, in tokens per second. Real time needs 25
tokens per second per stream (MioCodec runs at 25 Hz). Both sources run the same model with
the same engine options, one after the other so they do not share the CPU. Every stream runs
for the same number of tokens (the end token does not stop it), so the batch stays full.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass

from miotts_stream.llm import TOKEN_RATE_HZ, SamplingOptions, TokenSource, VLLMEngineOptions

from .common import table

# About what one sentence segment of the service holds.
TEXT = "The quick brown fox jumps over the lazy dog, then naps in the afternoon sun."


@dataclass
class StreamTiming:
    first_token_s: float  # request to first code
    rate: float  # codes per second after the first
    codes: int


@dataclass
class Row:
    source: str
    streams: int
    timings: list[StreamTiming]
    wall_s: float

    @property
    def real_time(self) -> bool:
        return min(t.rate for t in self.timings) >= TOKEN_RATE_HZ


async def _one_stream(source: TokenSource, seed: int, tokens: int) -> StreamTiming:
    # A budget of tokens from the runaway guard would cut the stream short; the guard is set
    # off on the sources built below.
    stream = source.stream(TEXT, SamplingOptions(seed=seed, max_tokens=tokens))
    started = time.perf_counter()
    first = last = 0.0
    count = 0
    async for _ in stream:
        last = time.perf_counter()
        if count == 0:
            first = last
        count += 1
    # Every stream must run its full length for the rates to compare. An end token drawn on
    # the way (the demo model draws one every ~150 tokens) does not stop it but is no code.
    if stream.finish_reason != "length" or count < 0.9 * tokens:
        raise RuntimeError(f"stream {seed}: {count} codes of {tokens} ({stream.finish_reason})")
    return StreamTiming(first - started, (count - 1) / (last - first), count)


async def measure(source: TokenSource, label: str, streams: int, tokens: int) -> Row:
    started = time.perf_counter()
    timings = await asyncio.gather(*(_one_stream(source, s, tokens) for s in range(streams)))
    return Row(label, streams, list(timings), time.perf_counter() - started)


async def _run_source(source: TokenSource, label: str, counts: list[int], tokens: int) -> list:
    # Warm-up: first-request setup stays out of the figures.
    async for _ in source.stream(TEXT, SamplingOptions(seed=10_000, max_tokens=8)):
        pass
    rows = []
    for streams in counts:
        rows.append(await measure(source, label, streams, tokens))
        print(f"  {label}: {streams} streams done", flush=True)
    return rows


async def bench_in_process(model, options, counts, tokens) -> tuple[list[Row], float]:
    from miotts_stream.llm import RunawayGuard, VLLMTokenSource

    started = time.perf_counter()
    source = VLLMTokenSource.from_model(
        model,
        options,
        guard=RunawayGuard(tokens_per_char=0),
        extra_sampling={"ignore_eos": True, "stop_token_ids": []},
    )
    startup = time.perf_counter() - started
    try:
        return await _run_source(source, "in process", counts, tokens), startup
    finally:
        await source.close()


async def bench_server(model, options, counts, tokens) -> tuple[list[Row], float]:
    from miotts_stream.llm import OpenAITokenSource, RunawayGuard
    from miotts_stream.llm.vllm_server import VLLMServer

    started = time.perf_counter()
    server = VLLMServer(model, options).start()
    try:
        server.wait_ready(timeout_s=600)
        startup = time.perf_counter() - started
        source = OpenAITokenSource(
            server.base_url,
            guard=RunawayGuard(tokens_per_char=0),
            extra_body={"ignore_eos": True},
        )
        try:
            return await _run_source(source, "vllm serve", counts, tokens), startup
        finally:
            await source.close()
    finally:
        server.stop()


def _format(rows: list[Row]) -> str:
    headers = [
        "source",
        "streams",
        "first token ms (median / max)",
        "tok/s per stream (median / min)",
        "tok/s total",
        "real time",
    ]
    body = []
    for row in rows:
        first = [t.first_token_s * 1000 for t in row.timings]
        rates = [t.rate for t in row.timings]
        total = sum(t.codes for t in row.timings) / row.wall_s
        body.append(
            [
                row.source,
                row.streams,
                f"{statistics.median(first):.0f} / {max(first):.0f}",
                f"{statistics.median(rates):.1f} / {min(rates):.1f}",
                f"{total:.0f}",
                "yes" if row.real_time else "no",
            ]
        )
    return table(headers, body)


async def _main(args: argparse.Namespace) -> None:
    from miotts_stream.demo_model import ensure_demo_model, parameter_count
    from miotts_stream.llm.vllm_source import engine_args

    model = ensure_demo_model(args.size)
    options = VLLMEngineOptions(
        max_model_len=1024, dtype=args.dtype, max_num_seqs=max(args.streams)
    )
    resolved = engine_args(options)
    in_process, in_process_start = await bench_in_process(model, options, args.streams, args.tokens)
    served, served_start = await bench_server(model, options, args.streams, args.tokens)
    print()
    print(
        f"Speech LLM: {args.size} demo model ({parameter_count(args.size) / 1e6:.0f}M params, "
        f"random weights), dtype={resolved['dtype']}, enforce_eager={resolved['enforce_eager']}, "
        f"cpus={os.cpu_count()}"
    )
    print(
        f"{args.tokens} tokens per stream (end token ignored); prompt: {len(TEXT)} characters; "
        f"real time = every stream >= {TOKEN_RATE_HZ} tok/s"
    )
    print(_format(in_process + served))
    print(
        f"startup: in-process engine {in_process_start:.0f} s, "
        f"vllm serve ready {served_start:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=200, help="codes per stream (8 s audio)")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    # vLLM logs every step of its start at INFO; the table is what this program is for.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
