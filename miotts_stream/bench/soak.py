"""Soak: many streams for a long time; does anything grow?

    python -m miotts_stream.bench.soak --streams 8 --minutes 30 [--interval-s 30]

Starts the service in process on loopback (the built-in default unless --model / --codec are
given: small demo LLM and full-size 24 kHz codec, random weights) and keeps `--streams` client
loops busy with a mix of traffic: unary Synthesize, text streamed in pieces, barge-in cancels,
client hang-ups, and bad requests. Every `--interval-s` it samples

    rss      resident memory of the process and its children (vLLM's engine core), MiB
    fds      open file descriptors of the process
    tasks    asyncio tasks of the server (the clients' own tasks are not counted)
    engine   requests the speech LLM holds
    streams  sessions open in the engine

and at the end prints the curve and flags growth: RSS whose last third (median) is more than
`--rss-growth` above its second sample's third, or fds / tasks above their early level once the
clients have stopped, or any session or engine request left after the clients stopped.
Exit status 1 when something is flagged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time

import grpc
import psutil

from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc

CLIENT_TASK = "soak-client"
TEXTS = [
    "Hello there.",
    "The quick brown fox jumps over the lazy dog.",
    "This is a longer sentence, with a clause or two, that takes a while to say. And another.",
    "こんにちは、今日はいい天気ですね。",
]


def _config(rng: random.Random) -> tts_pb2.SynthesisConfig:
    return tts_pb2.SynthesisConfig(
        audio=tts_pb2.AudioFormat(encoding=rng.choice([1, 3, 4, 5])),
        generation=tts_pb2.GenerationOptions(seed=rng.randint(0, 99), max_tokens=100),
    )


async def _drain_call(call, stop_after: int | None = None) -> None:
    read = 0
    async for _ in call:
        read += 1
        if stop_after is not None and read >= stop_after:
            call.cancel()
            return


async def _client(index: int, address: str, stop: asyncio.Event, counts: dict) -> None:
    rng = random.Random(index)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        while not stop.is_set():
            kind = rng.choices(
                ["unary", "pieces", "cancel", "hang_up", "bad"], [50, 25, 10, 10, 5]
            )[0]
            text = rng.choice(TEXTS)
            try:
                if kind == "unary":
                    req = tts_pb2.SynthesizeRequest(config=_config(rng), text=text)
                    await _drain_call(stub.Synthesize(req))
                elif kind in ("pieces", "cancel"):

                    async def requests(text=text, kind=kind):
                        yield tts_pb2.StreamingSynthesizeRequest(config=_config(rng))
                        for i in range(0, len(text), 5):
                            yield tts_pb2.StreamingSynthesizeRequest(text=text[i : i + 5])
                            await asyncio.sleep(0.02)
                        if kind == "cancel":
                            await asyncio.sleep(0.5)
                            yield tts_pb2.StreamingSynthesizeRequest(cancel=tts_pb2.Cancel())
                        else:
                            yield tts_pb2.StreamingSynthesizeRequest(end_of_input={})

                    await _drain_call(stub.StreamingSynthesize(requests()))
                elif kind == "hang_up":
                    req = tts_pb2.SynthesizeRequest(config=_config(rng), text=text)
                    await _drain_call(stub.Synthesize(req), stop_after=3)
                else:
                    bad = tts_pb2.SynthesisConfig(
                        generation=tts_pb2.GenerationOptions(temperature=5)
                    )
                    await _drain_call(stub.Synthesize(tts_pb2.SynthesizeRequest(config=bad)))
                counts[kind] = counts.get(kind, 0) + 1
            except grpc.aio.AioRpcError as err:
                key = f"{kind}:{err.code().name}"
                counts[key] = counts.get(key, 0) + 1


def _rss_mib(process: psutil.Process) -> float:
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total / 2**20


def _server_tasks() -> int:
    return sum(1 for t in asyncio.all_tasks() if not t.get_name().startswith(CLIENT_TASK))


def _sample(process: psutil.Process, engine, started: float) -> dict:
    return {
        "minute": (time.monotonic() - started) / 60,
        "rss": _rss_mib(process),
        "fds": process.num_fds(),
        "tasks": _server_tasks(),
        "engine": engine.source.num_unfinished_requests(),
        "streams": len(engine.sessions),
    }


def _print(sample: dict, label: str = "") -> None:
    print(
        f"{sample['minute']:7.1f} {sample['rss']:9.0f} {sample['fds']:5d} {sample['tasks']:6d} "
        f"{sample['engine']:7d} {sample['streams']:8d} {label}",
        flush=True,
    )


async def _main(args) -> int:
    from miotts_stream.service.server import MioTTSServer, ServerOptions, build_engine

    options = ServerOptions().with_values(
        model=args.model,
        codec=args.codec,
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        http_port=None,
        max_streams=max(16, args.streams),
    )
    engine = await build_engine(options)
    server = MioTTSServer(engine, options)
    await server.start()
    process = psutil.Process(os.getpid())
    address = f"127.0.0.1:{server.port}"
    stop = asyncio.Event()
    counts: dict[str, int] = {}
    started = time.monotonic()
    idle_before = _sample(process, engine, started)
    print(f"soak: {args.streams} streams for {args.minutes} min against {address}")
    print(" minute  rss(MiB)   fds  tasks  engine  streams")
    _print(idle_before, "(idle, before)")
    clients = [
        asyncio.get_running_loop().create_task(
            _client(i, address, stop, counts), name=f"{CLIENT_TASK}-{i}"
        )
        for i in range(args.streams)
    ]
    samples = []
    try:
        end = started + args.minutes * 60
        while time.monotonic() < end:
            await asyncio.sleep(min(args.interval_s, max(0.0, end - time.monotonic())))
            samples.append(_sample(process, engine, started))
            _print(samples[-1])
    finally:
        stop.set()
        await asyncio.wait(clients, timeout=120)
    for _ in range(200):  # let the last cleanups run
        if not engine.sessions and engine.source.num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1)
    idle_after = _sample(process, engine, started)
    _print(idle_after, "(idle, after)")
    await server.stop(grace=1)
    print(f"requests: {dict(sorted(counts.items()))}")

    flags = []
    if len(samples) >= 6:
        third = len(samples) // 3
        early = statistics.median(s["rss"] for s in samples[1 : 1 + third])
        late = statistics.median(s["rss"] for s in samples[-third:])
        growth = late / early - 1
        print(f"rss: early median {early:.0f} MiB, late median {late:.0f} MiB ({growth:+.1%})")
        if growth > args.rss_growth:
            flags.append(f"RSS grew {growth:+.1%} (more than {args.rss_growth:.0%})")
    if idle_after["fds"] > idle_before["fds"] + 2:
        flags.append(f"fds {idle_before['fds']} -> {idle_after['fds']} at idle")
    if idle_after["tasks"] > idle_before["tasks"]:
        flags.append(f"asyncio tasks {idle_before['tasks']} -> {idle_after['tasks']} at idle")
    if idle_after["engine"] or idle_after["streams"]:
        flags.append(
            f"left after the clients stopped: {idle_after['streams']} sessions, "
            f"{idle_after['engine']} engine requests"
        )
    print("GROWTH: " + "; ".join(flags) if flags else "no growth flagged")
    return 1 if flags else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--interval-s", type=float, default=30)
    p.add_argument("--rss-growth", type=float, default=0.05, help="flag above this (0.05: 5%%)")
    p.add_argument("--model", default=None, help="speech LLM (default: the built-in demo)")
    p.add_argument("--codec", default=None, help="MioCodec (default: the built-in 24 kHz)")
    sys.exit(asyncio.run(_main(p.parse_args())))


if __name__ == "__main__":
    main()
