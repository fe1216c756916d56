"""Request-sequence fuzzer: seeded random StreamingSynthesize sequences against a live server.

    python -m miotts_stream.bench.fuzz [--sequences 500] [--seed 1] [--concurrency 4]

Starts the service in process (tiny demo LLM and the tiny test codec by default, on loopback),
then runs random sequences: valid and broken configs, text pieces of random Unicode (control
characters included), flush / end_of_input / cancel / empty messages in any order, raw bytes
that are not valid protobuf or not valid UTF-8, pauses, and client hang-ups. It checks that
every call ends within its bound with a status from the documented set, and that afterwards the
server holds no stream slot and no engine request. Exit status 1 on a hang, an unexpected
status, or a leak. The test suite runs a short budget of the same sequences.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import grpc

from miotts_stream.service.pb.miotts.v1 import tts_pb2

STREAMING = "/miotts.v1.TextToSpeech/StreamingSynthesize"
# What a call may end with; anything else (UNKNOWN, INTERNAL) is a finding.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
# grpcio's asyncio client reports this instead of the server's status when one of its writes
# lands after the call ended (grpc/grpc#36066): the client's pauses in the middle of a stream
# can outlast the server's short drain. Counted apart, not as a server failure.
CLIENT_LOST_STATUS = "Internal error from Core"

_ALPHABET = "abc xyz. ,!?こんにちは。" + "".join(map(chr, range(0, 32))) + "\u202e\ufeff\U0001f600"


def _random_text(rng: random.Random, max_len: int) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, max_len)))


def _random_config(rng: random.Random) -> tts_pb2.SynthesisConfig:
    config = tts_pb2.SynthesisConfig(
        generation=tts_pb2.GenerationOptions(seed=rng.randint(0, 9), max_tokens=rng.randint(1, 16))
    )
    roll = rng.random()
    if roll < 0.1:
        config.voice.preset = rng.choice(["nobody", "", "en_male"])
    elif roll < 0.2:
        values = [rng.choice([0.5, float("nan"), 1e30, -2.0]) for _ in range(rng.choice([128, 3]))]
        config.voice.embedding.values.extend(values)
    if rng.random() < 0.15:
        config.audio.encoding = rng.choice([1, 2, 3, 4, 5, 6, 99])
        config.audio.sample_rate_hz = rng.choice([0, 8000, 16000, 44100, -1])
    if rng.random() < 0.1:
        config.generation.temperature = rng.choice([0.0, 1.0, 2.5, -1.0])
    if rng.random() < 0.05:
        config.language = rng.choice(["ja", "en", "xx"])
    return config


def random_sequence(rng: random.Random, max_text_chars: int) -> tuple[list[bytes | float], bool]:
    """Messages (serialized; a float is a pause in seconds) and whether the client hangs up
    after sending them instead of half-closing."""
    out: list[bytes | float] = []
    if rng.random() < 0.9:
        out.append(
            tts_pb2.StreamingSynthesizeRequest(config=_random_config(rng)).SerializeToString()
        )
    for _ in range(rng.randint(0, 8)):
        roll = rng.random()
        if roll < 0.5:
            msg = tts_pb2.StreamingSynthesizeRequest(text=_random_text(rng, 24))
        elif roll < 0.6:
            msg = tts_pb2.StreamingSynthesizeRequest(flush=tts_pb2.Flush())
        elif roll < 0.68:
            msg = tts_pb2.StreamingSynthesizeRequest(end_of_input=tts_pb2.EndOfInput())
        elif roll < 0.73:
            msg = tts_pb2.StreamingSynthesizeRequest(cancel=tts_pb2.Cancel())
        elif roll < 0.77:
            msg = tts_pb2.StreamingSynthesizeRequest()
        elif roll < 0.8:
            msg = tts_pb2.StreamingSynthesizeRequest(config=_random_config(rng))
        elif roll < 0.85:
            out.append(rng.choice([b"\x12\x02\xff\xfe", b"\x12\x03\xed\xa0\x80", b"\xff\xff"]))
            continue
        elif roll < 0.88:
            msg = tts_pb2.StreamingSynthesizeRequest(text="x" * (max_text_chars + 1))
        else:
            out.append(rng.choice([0.0, 0.05, 0.2]))
            continue
        out.append(msg.SerializeToString())
    if rng.random() < 0.5:
        out.append(tts_pb2.StreamingSynthesizeRequest(end_of_input={}).SerializeToString())
    return out, rng.random() < 0.15


def raw_streaming(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    """StreamingSynthesize taking request messages already serialized (or made-up bytes)."""
    return channel.stream_stream(
        STREAMING,
        request_serializer=lambda b: b,
        response_deserializer=tts_pb2.StreamingSynthesizeResponse.FromString,
    )


async def run_sequence(channel: grpc.aio.Channel, rng: random.Random, max_text_chars: int):
    """Run one random sequence; returns its final status code ("LOST_BY_CLIENT" for
    grpc/grpc#36066). AssertionError on a status outside the documented set."""
    messages, hang_up = random_sequence(rng, max_text_chars)
    call = raw_streaming(channel)

    async def requests():
        for m in messages:
            if isinstance(m, float):
                await asyncio.sleep(m)
            else:
                yield m

    responses = call(requests())
    read = 0
    try:
        async for _ in responses:
            read += 1
            if hang_up and read >= 2:
                responses.cancel()
                break
    except grpc.aio.AioRpcError:
        pass
    code = await responses.code()
    if code == grpc.StatusCode.INTERNAL and await responses.details() == CLIENT_LOST_STATUS:
        return "LOST_BY_CLIENT"
    if code not in EXPECTED:
        shown = [m[:40] if isinstance(m, bytes) else m for m in messages]
        raise AssertionError(f"unexpected {code}: {await responses.details()} for {shown!r}")
    return code


async def _main(args) -> int:
    from miotts_stream.demo_model import ensure_demo_model
    from miotts_stream.service.server import MioTTSServer, ServerOptions, build_engine

    codec = Path(__file__).resolve().parents[2] / "tests/fixtures/miocodec/tiny-24khz"
    options = ServerOptions().with_values(
        model=args.model or str(ensure_demo_model("tiny")),
        codec=args.codec or str(codec),
        device="cpu",
        host="127.0.0.1",
        port=0,
        max_streams=args.concurrency,
        metrics_port=None,
        http_port=None,
        max_text_chars=2000,
        max_model_len=512,
        kv_cache_gib=0.5,
        enforce_eager=True,
        idle_timeout_s=1.0,
        stall_timeout_s=5.0,
        max_stream_s=30.0,
    )
    engine = await build_engine(options)
    server = MioTTSServer(engine, options)
    await server.start()
    failures = 0
    codes: dict[str, int] = {}
    started = time.perf_counter()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:

            async def worker(index: int) -> None:
                nonlocal failures
                rng = random.Random(args.seed * 1000 + index)
                for _ in range(index, args.sequences, args.concurrency):
                    try:
                        code = await asyncio.wait_for(
                            run_sequence(channel, rng, options.limits.max_text_chars), 60
                        )
                        name = code if isinstance(code, str) else code.name
                        codes[name] = codes.get(name, 0) + 1
                    except (AssertionError, TimeoutError) as err:
                        failures += 1
                        print(f"FAIL: {type(err).__name__}: {err}", file=sys.stderr)

            await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
            for _ in range(200):
                if not engine.sessions and engine.source.num_unfinished_requests() == 0:
                    break
                await asyncio.sleep(0.05)
        leaked = len(engine.sessions), engine.source.num_unfinished_requests()
    finally:
        await server.stop(grace=0.5)
    print(f"{args.sequences} sequences in {time.perf_counter() - started:.0f} s: {codes}")
    print(f"failures {failures}; left open: {leaked[0]} sessions, {leaked[1]} engine requests")
    return 1 if failures or any(leaked) else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--model", default=None, help="speech LLM (default: tiny demo model)")
    p.add_argument("--codec", default=None, help="MioCodec folder (default: tiny test codec)")
    sys.exit(asyncio.run(_main(p.parse_args())))


if __name__ == "__main__":
    main()
