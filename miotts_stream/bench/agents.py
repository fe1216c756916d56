"""Voice-agent frameworks against the server, our plugins beside the OpenAI path, in one run.

    python -m miotts_stream.bench.agents [--rate 50] [--runs 3]

`server.py` runs as a subprocess on loopback with the stand-in LLM at `--rate` codes per
second and the default codec (the full-size 24 kHz MioCodec decoder, random weights); this
process is the client: one conversation per run and path, two turns of LLM-style text (a word
every 40 ms). Paths:

- Pipecat, `MioTTSService` (the conversation WebSocket; text by token, and by sentence);
- Pipecat, its `OpenAITTSService` with `voice="alloy"` (`/v1/audio/speech`);
- LiveKit, our `TTS.stream()` (the conversation WebSocket);
- LiveKit, its OpenAI plugin through `StreamAdapter` (what an agent session does with a TTS
  that cannot stream).

Per path (median of the runs): the first audio frame after the last word of the first
sentence was pushed (goal 250 ms); from an interruption mid-utterance to the last audio frame
of that turn the framework hands on (goal 50 ms), and to the server's stream being freed (its
LLM request aborted); the first audio of the next turn on the same connection, from the last
word of its first sentence (goal 250 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .common import table

ROOT = Path(__file__).resolve().parents[2]
WORD_GAP_S = 0.04
FIRST_TURN = (
    "Hello there, thanks for calling today. I can help with your order, your account, or "
    "anything else you need, so just tell me what it is and we will sort it out together."
)
SECOND_TURN = "Sorry, please go ahead. I am listening, take your time."
INTERRUPT_AFTER_S = 1.0  # of the first turn's audio received


@dataclass
class Turns:
    """One run of one path, in milliseconds."""

    first_audio: float = float("nan")
    interrupt_to_last_frame: float = float("nan")
    interrupt_to_freed: float = float("nan")
    next_turn_first_audio: float = float("nan")
    errors: list[str] = field(default_factory=list)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """server.py with the stand-in LLM, HTTP and metrics on free ports."""

    def __init__(self, rate: float, data_dir: str):
        self.http_port, self.metrics_port = free_port(), free_port()
        command = [
            sys.executable,
            str(ROOT / "server.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--http-port",
            str(self.http_port),
            "--metrics-port",
            str(self.metrics_port),
            "--llm-standin-rate",
            str(rate),
            "--data-dir",
            data_dir,
            "--log-level",
            "WARNING",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env)
        self.base_url = f"http://127.0.0.1:{self.http_port}"

    async def ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError("server.py exited")
                try:
                    async with http.get(f"{self.base_url}/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError("server.py did not start")

    async def active_streams(self, http: aiohttp.ClientSession) -> float:
        async with http.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response:
            for line in (await response.text()).splitlines():
                if line.startswith("miotts_active_streams "):
                    return float(line.split()[1])
        return float("nan")

    async def freed_after(self, since: float, timeout: float = 5.0) -> float:
        """Milliseconds from `since` until the server holds no stream (polled every 5 ms)."""
        async with aiohttp.ClientSession() as http:
            deadline = time.perf_counter() + timeout
            while time.perf_counter() < deadline:
                if await self.active_streams(http) == 0:
                    return 1000 * (time.perf_counter() - since)
                await asyncio.sleep(0.005)
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# ---- Pipecat ---------------------------------------------------------------------------------


async def pipecat_turns(server: Server, make_service: Callable[[], object]) -> Turns:
    from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame

    from .pipecat_pipeline import ServicePipeline

    result = Turns()
    async with ServicePipeline(make_service(), sample_rate=24000) as pipe:
        first_said = await pipe.reply(FIRST_TURN, WORD_GAP_S, end=False)
        first = await pipe.down.until(lambda f: isinstance(f, TTSAudioRawFrame), timeout=30)
        result.first_audio = 1000 * (first.at - first_said)
        context = first.frame.context_id
        # Mid-utterance: once a second of its audio has come, the user barges in.
        while (
            sum(
                len(s.frame.audio)
                for s in pipe.down.of(TTSAudioRawFrame)
                if s.frame.context_id == context
            )
            < 2 * 24000 * INTERRUPT_AFTER_S
        ):
            await asyncio.sleep(0.01)
        interrupted = await pipe.interrupt()
        freed = asyncio.ensure_future(server.freed_after(interrupted))
        await asyncio.sleep(0.5)
        last = [s.at for s in pipe.down.of(TTSAudioRawFrame) if s.frame.context_id == context]
        result.interrupt_to_last_frame = max(0.0, 1000 * (last[-1] - interrupted))
        result.interrupt_to_freed = await freed
        second_said = await pipe.reply(SECOND_TURN, WORD_GAP_S)
        second = await pipe.down.until(
            lambda f: isinstance(f, TTSAudioRawFrame) and f.context_id != context, timeout=30
        )
        result.next_turn_first_audio = 1000 * (second.at - second_said)
        await asyncio.sleep(1.0)
    result.errors = [s.frame.error for s in pipe.up.of(ErrorFrame)]
    return result


# ---- LiveKit ---------------------------------------------------------------------------------


async def livekit_turns(server: Server, make_tts: Callable[[], object]) -> Turns:
    result = Turns()
    tts = make_tts()
    try:
        stream = tts.stream()
        said: dict[str, float] = {}
        pusher = asyncio.ensure_future(_push(stream, FIRST_TURN, said, end=False))
        frames: list[tuple[float, int]] = []
        consumer_done = asyncio.Event()

        async def consume() -> None:
            try:
                async for event in stream:
                    frames.append((time.perf_counter(), event.frame.samples_per_channel))
            except Exception as e:  # a closed stream may end with its error
                result.errors.append(repr(e))
            finally:
                consumer_done.set()

        consumer = asyncio.ensure_future(consume())
        while sum(n for _, n in frames) < tts.sample_rate * INTERRUPT_AFTER_S:
            if consumer_done.is_set():
                raise RuntimeError(f"the stream ended early: {result.errors}")
            await asyncio.sleep(0.01)
        first_at = next(at for at, _ in frames)
        result.first_audio = 1000 * (first_at - said.get("first sentence", first_at))
        interrupted = time.perf_counter()
        freed = asyncio.ensure_future(server.freed_after(interrupted))
        pusher.cancel()
        await stream.aclose()  # what an agent session does on an interruption
        await consumer
        result.interrupt_to_last_frame = max(0.0, 1000 * (frames[-1][0] - interrupted))
        result.interrupt_to_freed = await freed

        second = tts.stream()
        said.clear()
        pusher = asyncio.ensure_future(_push(second, SECOND_TURN, said, end=True))
        async for _event in second:
            now = time.perf_counter()
            result.next_turn_first_audio = 1000 * (now - said.get("first sentence", now))
            break
        await pusher
        await second.aclose()
    finally:
        await tts.aclose()
    return result


async def _push(stream, text: str, said: dict[str, float], end: bool) -> None:
    """Text as an LLM streams it: tokens with their leading space (" today."), so the end of a
    sentence shows only with the next token, as in Pipecat's pipeline."""
    for i, word in enumerate(text.split(" ")):
        stream.push_text(word if i == 0 else " " + word)
        if "first sentence" not in said and word.endswith((".", "?", "!")):
            said["first sentence"] = time.perf_counter()
        await asyncio.sleep(WORD_GAP_S)
    if end:
        stream.end_input()


# ---- the run ---------------------------------------------------------------------------------


def paths(server: Server) -> dict[str, Callable[[], Awaitable[Turns]]]:
    from livekit.agents import tts as livekit_tts
    from livekit.plugins import openai as livekit_openai
    from pipecat.services.openai.tts import OpenAITTSService
    from pipecat.services.tts_service import TextAggregationMode

    from miotts_stream.integrations.livekit import TTS
    from miotts_stream.integrations.pipecat import MioTTSService

    url = server.base_url
    return {
        "Pipecat, MioTTSService (by token)": lambda: pipecat_turns(
            server, lambda: MioTTSService(base_url=url)
        ),
        "Pipecat, MioTTSService (by sentence)": lambda: pipecat_turns(
            server,
            lambda: MioTTSService(base_url=url, text_aggregation_mode=TextAggregationMode.SENTENCE),
        ),
        "Pipecat, OpenAITTSService alloy": lambda: pipecat_turns(
            server,
            lambda: OpenAITTSService(
                api_key="none",
                base_url=f"{url}/v1",
                settings=OpenAITTSService.Settings(voice="alloy"),
            ),
        ),
        "LiveKit, TTS.stream()": lambda: livekit_turns(server, lambda: TTS(base_url=url)),
        "LiveKit, OpenAI + StreamAdapter": lambda: livekit_turns(
            server,
            lambda: livekit_tts.StreamAdapter(
                tts=livekit_openai.TTS(base_url=f"{url}/v1", api_key="none", voice="alloy")
            ),
        ),
    }


def ms(values: list[float]) -> str:
    values = [v for v in values if v == v]
    return f"{statistics.median(values):.0f}" if values else "-"


async def main_async(args) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        server = Server(args.rate, data_dir)
        try:
            await server.ready()
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{server.base_url}/v1/audio/speech",
                    json={"model": "m", "input": "Warm up.", "response_format": "pcm"},
                ) as response,
            ):
                await response.read()  # the first decode's one-off costs stay out
            rows = []
            for name, run in paths(server).items():
                results = [await run() for _ in range(args.runs)]
                errors = sorted({e for r in results for e in r.errors})
                rows.append(
                    [
                        name,
                        ms([r.first_audio for r in results]),
                        ms([r.interrupt_to_last_frame for r in results]),
                        ms([r.interrupt_to_freed for r in results]),
                        ms([r.next_turn_first_audio for r in results]),
                        "; ".join(errors)[:60] or "-",
                    ]
                )
                print(f"{name}: done", flush=True)
        finally:
            server.stop()
    print(
        f"\nstand-in LLM at {args.rate:g} codes/s, default codec (full-size 24 kHz, random "
        f"weights), a word every {WORD_GAP_S * 1000:.0f} ms, median of {args.runs} runs (ms):"
    )
    print(
        table(
            [
                "path",
                "first audio",
                "interrupt->last frame",
                "interrupt->stream freed",
                "next turn first audio",
                "errors",
            ],
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0, help="stand-in codes per second")
    parser.add_argument("--runs", type=int, default=3, help="runs of each path")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
