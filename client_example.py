"""Example client: synthesize text over gRPC and write a WAV file.

    python client_example.py "Hello there. How are you?" --out out.wav
    python client_example.py "..." --encoding OPUS --sample-rate 48000 --stream-text

Prints time to first audio and the real-time factor. Opus, Ogg Opus and G.711 audio is decoded
back to PCM for the WAV file. --stream-text sends the text word by word with small delays, as
an upstream LLM would, over the bidirectional StreamingSynthesize RPC.

A server with TLS: --tls-ca ca.pem (and --tls-cert/--tls-key when it wants client
certificates); with API keys: --api-key KEY (or the MIOTTS_API_KEY environment variable).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import wave
from pathlib import Path

import grpc
import numpy as np

from miotts_stream.audio.decoders import decode_audio
from miotts_stream.audio.encoders import Encoding
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc


def build_config(args) -> tts_pb2.SynthesisConfig:
    voice = tts_pb2.Voice(preset=args.voice) if args.voice else tts_pb2.Voice()
    return tts_pb2.SynthesisConfig(
        voice=voice,
        audio=tts_pb2.AudioFormat(
            encoding=tts_pb2.Encoding.Value(args.encoding), sample_rate_hz=args.sample_rate
        ),
        language=args.language,
    )


async def send_text(call, args, config) -> None:
    """Write the requests one by one, and stop as soon as the call has ended.

    grpcio's asyncio client reports INTERNAL "Internal error from Core" instead of the server's
    status when one of its writes lands after the server ended the call (grpc/grpc#36066): so
    no write once the call is done, and a failed write just ends the sending.
    """
    words = args.text.split(" ")
    messages = [tts_pb2.StreamingSynthesizeRequest(config=config)]
    messages += [
        tts_pb2.StreamingSynthesizeRequest(text=word + (" " if i < len(words) - 1 else ""))
        for i, word in enumerate(words)
    ]
    messages.append(tts_pb2.StreamingSynthesizeRequest(end_of_input=tts_pb2.EndOfInput()))
    try:
        for i, message in enumerate(messages):
            if call.done():
                return
            await call.write(message)
            if 0 < i < len(messages) - 1:
                await asyncio.sleep(args.word_delay)
        await call.done_writing()
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        return  # the call ended: its status comes with the responses


def open_channel(args) -> grpc.aio.Channel:
    if not args.tls_ca and not args.tls_cert:
        return grpc.aio.insecure_channel(args.server)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(args.tls_ca).read_bytes() if args.tls_ca else None,
        private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
        certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
    )
    return grpc.aio.secure_channel(args.server, credentials)


def explain(err: grpc.aio.AioRpcError) -> str:
    if err.code() == grpc.StatusCode.INTERNAL and "Internal error from Core" in err.details():
        return (
            "the server ended the stream while this client was still sending, and grpcio "
            "lost its status (grpc/grpc#36066); the server log has the reason"
        )
    return f"{err.code().name}: {err.details()}"


async def synthesize(args) -> None:
    try:
        await _synthesize(args)
    except grpc.aio.AioRpcError as err:
        sys.exit(f"error: {explain(err)}")


async def _synthesize(args) -> None:
    config = build_config(args)
    api_key = args.api_key or os.environ.get("MIOTTS_API_KEY")
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    async with open_channel(args) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        start = time.perf_counter()
        sender = None
        if args.stream_text:
            call = stub.StreamingSynthesize(metadata=metadata, timeout=args.timeout)
            sender = asyncio.ensure_future(send_text(call, args, config))
        else:
            request = tts_pb2.SynthesizeRequest(config=config, text=args.text)
            call = stub.Synthesize(request, metadata=metadata, timeout=args.timeout)
        data, packets, first_audio, summary = b"", [], None, None
        async for response in call:
            kind = response.WhichOneof("response")
            if kind == "audio":
                if first_audio is None:
                    first_audio = time.perf_counter() - start
                data += response.audio.data
                packets += list(response.audio.opus_packets)
            elif kind == "segment" and args.verbose:
                print(
                    f"segment {response.segment.segment_index} "
                    f"{tts_pb2.SegmentEvent.Kind.Name(response.segment.kind)}: "
                    f"{response.segment.text!r}"
                )
            elif kind == "summary":
                summary = response.summary
        if sender is not None:
            await sender
    elapsed = time.perf_counter() - start
    rate = summary.sample_rate_hz
    audio = decode_audio(
        Encoding(args.encoding if args.encoding != "ENCODING_UNSPECIFIED" else "PCM_S16LE"),
        rate,
        data,
        packets,
    )
    with wave.open(args.out, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    seconds = len(audio) / rate
    print(f"wrote {args.out}: {seconds:.2f} s at {rate} Hz ({args.encoding})")
    print(
        f"time to first audio: {first_audio * 1000:.0f} ms (client side; server says "
        f"{summary.time_to_first_audio_ms:.0f} ms)"
    )
    print(
        f"real-time factor: {elapsed / seconds:.3f} (wall {elapsed:.2f} s), "
        f"{summary.generated_tokens} speech tokens"
    )
    if summary.random_weights:
        print("note: the server runs random-weight demo models: this is not speech")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("text")
    p.add_argument("--out", default="out.wav")
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--encoding", default="PCM_S16LE", choices=list(tts_pb2.Encoding.keys()))
    p.add_argument("--sample-rate", type=int, default=0, help="0: the codec's own rate")
    p.add_argument("--voice", default=None, help="a preset name (see ListVoices)")
    p.add_argument("--language", default="auto", choices=["auto", "ja", "en"])
    p.add_argument(
        "--stream-text",
        action="store_true",
        help="send the text word by word, as an upstream LLM would",
    )
    p.add_argument("--word-delay", type=float, default=0.05, help="seconds between words")
    p.add_argument("--timeout", type=float, default=None, help="deadline of the call, seconds")
    p.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer KEY'")
    p.add_argument("--tls-ca", default=None, help="PEM CA certificates: connect with TLS")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate (mTLS)")
    p.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    p.add_argument("--verbose", action="store_true")
    asyncio.run(synthesize(p.parse_args()))


if __name__ == "__main__":
    main()
