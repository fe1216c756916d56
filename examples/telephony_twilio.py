"""A phone agent: Twilio Media Streams -> Pipecat -> MioTTS at 8 kHz, a scripted reply
instead of an LLM.

Twilio connects a call to a WebSocket (TwiML `<Connect><Stream url="wss://HOST/twilio"/>`): it
sends `connected`, `start`, then the caller's audio as `media` (base64 mu-law, 8 kHz, 20 ms per
message); it plays the `media` it is sent, and drops what it has queued on `clear`. Here Pipecat
carries that (its Twilio serializer and WebSocket transport), Silero's VAD hears the caller,
and `ScriptedAgent` answers each time the caller stops talking with the next line of a script,
word by word as an LLM would; when the caller speaks over the agent, it interrupts: Pipecat
sends Twilio `clear`, and `MioTTSService` cancels the turn on the MioTTS server, on the one
connection it keeps for the whole call.

    .venv/bin/python server.py                       # MioTTS on :8080
    .venv/bin/python examples/telephony_twilio.py    # this agent on :8765, path /twilio

tests/test_telephony.py plays Twilio's side of the call against it.
"""

from __future__ import annotations

import argparse
import asyncio

from fastapi import FastAPI, WebSocket
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)
from pipecat.workers.runner import WorkerRunner

from miotts_stream.integrations.pipecat import MioTTSService

TWILIO_RATE = 8000
SCRIPT = (
    "Hello, thanks for calling. This is a demo of streaming speech over the phone, "
    "so tell me anything you like.",
    "I hear you. Every reply is spoken while it is still being written, so you can cut in "
    "at any moment, and I will stop.",
    "Thanks for trying it out. Goodbye!",
)


class ScriptedAgent(FrameProcessor):
    """Stands in for an LLM: after each time the caller stops talking, the next line of the
    script, pushed a word at a time; the caller talking over it interrupts it."""

    def __init__(self, script: tuple[str, ...] = SCRIPT, word_gap_s: float = 0.04):
        super().__init__()
        self.script = script
        self.word_gap_s = word_gap_s
        self.lines_spoken = 0
        self.bot_speaking = False
        self._reply: asyncio.Task | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, BotStartedSpeakingFrame):
            self.bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self.bot_speaking = False
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            if self.bot_speaking or (self._reply is not None and not self._reply.done()):
                if self._reply is not None:
                    await self.cancel_task(self._reply)
                await self.broadcast_interruption()  # barge-in: Twilio gets `clear`
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self.say_next()
        await self.push_frame(frame, direction)

    def say_next(self) -> None:
        if self.lines_spoken < len(self.script):
            line = self.script[self.lines_spoken]
            self.lines_spoken += 1
            self._reply = self.create_task(self._say(line))

    async def _say(self, line: str) -> None:
        await self.push_frame(LLMFullResponseStartFrame())
        for i, word in enumerate(line.split(" ")):
            await self.push_frame(LLMTextFrame(word if i == 0 else " " + word))
            await asyncio.sleep(self.word_gap_s)
        await self.push_frame(LLMFullResponseEndFrame())


async def run_call(
    websocket: WebSocket, miotts_url: str, api_key: str | None = None, voice: str = "en_female"
) -> None:
    """One phone call, from Twilio's `start` to its hang-up."""
    _, call = await parse_telephony_websocket(websocket)
    serializer = TwilioFrameSerializer(
        stream_sid=call["stream_id"],
        call_sid=call["call_id"],
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False),  # no Twilio account here
    )
    transport = FastAPIWebsocketTransport(
        websocket,
        FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            audio_out_10ms_chunks=2,  # 20 ms media messages, as Twilio sends its own
            serializer=serializer,
        ),
    )
    agent = ScriptedAgent()
    tts = MioTTSService(base_url=miotts_url, api_key=api_key, voice=voice)  # 8 kHz: the call's
    worker = PipelineWorker(
        Pipeline(
            [
                transport.input(),
                VADProcessor(vad_analyzer=SileroVADAnalyzer()),
                agent,
                tts,
                transport.output(),
            ]
        ),
        params=PipelineParams(audio_in_sample_rate=TWILIO_RATE, audio_out_sample_rate=TWILIO_RATE),
    )

    @transport.event_handler("on_client_connected")
    async def greet(transport, client):
        agent.say_next()

    @transport.event_handler("on_client_disconnected")
    async def hang_up(transport, client):
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def create_app(miotts_url: str, api_key: str | None = None, voice: str = "en_female") -> FastAPI:
    app = FastAPI()

    @app.websocket("/twilio")
    async def twilio(websocket: WebSocket):
        await websocket.accept()
        await run_call(websocket, miotts_url, api_key, voice)

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--miotts", default="http://127.0.0.1:8080", help="the MioTTS server")
    parser.add_argument("--api-key", default=None, help="its API key, when it has keys")
    parser.add_argument("--voice", default="en_female")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    uvicorn.run(create_app(args.miotts, args.api_key, args.voice), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
