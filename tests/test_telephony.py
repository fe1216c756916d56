"""Telephony, shown working: examples/telephony_twilio.py (a Pipecat pipeline with Pipecat's
Twilio serializer and our MioTTSService at 8 kHz, a scripted reply instead of an LLM) against a
real MioTTS server, with this test playing Twilio's side of the Media Streams WebSocket:
`connected`, `start`, the caller's `media` in real time, `media` out as base64 mu-law in 20 ms
frames, and `clear` when the caller talks over the agent."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import uvicorn
import websockets

from miotts_stream.audio.g711 import linear_to_mulaw

from .audio_files import voice_like
from .servers import running_server, server_log_lines, tiny_codec_options

ROOT = Path(__file__).resolve().parents[1]
FRAME = 160  # 20 ms of 8 kHz mu-law
STREAM_SID = "MZ00000000000000000000000000000000"


def load_example():
    spec = importlib.util.spec_from_file_location(
        "telephony_twilio", ROOT / "examples" / "telephony_twilio.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Caller:
    """Twilio's side of one call: the caller's audio every 20 ms (silence, or speech while
    `talking`), and everything Twilio would receive."""

    def __init__(self, ws):
        self.ws = ws
        self.talking = False
        self.media: list[tuple[float, bytes]] = []  # (arrival, mu-law payload)
        self.clears: list[float] = []
        speech = voice_like(30.0, 8000, seed=5)
        self._speech = linear_to_mulaw(
            np.round(speech * 32767 * 1.6).clip(-32768, 32767).astype(np.int16)
        )
        self._spoken = 0

    async def start(self) -> None:
        await self.ws.send(
            json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        )
        await self.ws.send(json.dumps({
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "accountSid": "AC00000000000000000000000000000000",
                "streamSid": STREAM_SID,
                "callSid": "CA00000000000000000000000000000000",
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": {},
            },
            "streamSid": STREAM_SID,
        }))  # fmt: skip

    async def send_audio(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        sequence = 2
        while True:
            if self.talking:
                chunk = self._speech[self._spoken : self._spoken + FRAME]
                self._spoken += FRAME
            else:
                chunk = b"\xff" * FRAME  # mu-law silence
            media = {
                "track": "inbound",
                "chunk": str(sequence),
                "payload": base64.b64encode(chunk).decode(),
            }
            await self.ws.send(
                json.dumps(
                    {
                        "event": "media",
                        "sequenceNumber": str(sequence),
                        "media": media,
                        "streamSid": STREAM_SID,
                    }
                )
            )
            sequence += 1
            due += FRAME / 8000
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def receive(self) -> None:
        loop = asyncio.get_running_loop()
        async for message in self.ws:
            event = json.loads(message)
            assert event["streamSid"] == STREAM_SID
            if event["event"] == "media":
                self.media.append((loop.time(), base64.b64decode(event["media"]["payload"])))
            elif event["event"] == "clear":
                self.clears.append(loop.time())

    async def until(self, predicate, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)


@pytest.mark.asyncio(loop_scope="function")
async def test_a_phone_call_with_barge_in(tmp_path, unused_tcp_port, caplog):
    caplog.set_level(logging.INFO, logger="miotts_stream.service.admission")
    # The stand-in at 40 codes/s (1.6x real time): the greeting (about 8 s of audio) is still
    # being generated when the caller cuts in, a second or two into it.
    options = tiny_codec_options(llm_standin_rate=40.0, data_dir=str(tmp_path), http_port=0)
    example = load_example()
    async with running_server(options) as miotts:
        app = example.create_app(f"http://127.0.0.1:{miotts.http_port}")
        config = uvicorn.Config(
            app, host="127.0.0.1", port=unused_tcp_port, log_level="warning", lifespan="off"
        )
        agent = uvicorn.Server(config)
        serving = asyncio.ensure_future(agent.serve())
        try:
            async with asyncio.timeout(10):
                while not agent.started:
                    await asyncio.sleep(0.02)
            async with websockets.connect(f"ws://127.0.0.1:{unused_tcp_port}/twilio") as ws:
                caller = Caller(ws)
                await caller.start()
                tasks = [
                    asyncio.ensure_future(caller.send_audio()),
                    asyncio.ensure_future(caller.receive()),
                ]
                try:
                    # The agent greets the caller: 20 ms mu-law frames, in real time.
                    await caller.until(lambda: len(caller.media) >= 25)  # half a second
                    caller.talking = True  # ... and the caller talks over it
                    await caller.until(lambda: caller.clears)
                    heard_before = len(caller.media)
                    await asyncio.sleep(1.0)
                    caller.talking = False
                    await caller.until(lambda: len(caller.media) >= heard_before + 25)  # a reply
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            agent.should_exit = True
            await serving
        for _ in range(100):  # the call's pipeline has ended: its conversation is closed
            if not miotts.engine.sessions:
                break
            await asyncio.sleep(0.05)
    assert all(len(payload) == FRAME for _, payload in caller.media)
    greeting = [at for at, _ in caller.media[:heard_before]]
    assert max(np.diff(greeting)) < 0.5  # a continuous stream, not a file at the end
    cleared = caller.clears[0]
    assert not [at for at, _ in caller.media if cleared < at < cleared + 0.2], "audio after clear"
    assert len(caller.clears) == 1
    # One MioTTS connection for the call: the greeting's context cancelled, the reply's next.
    lines = [line for line in server_log_lines(caplog) if "WS /v1/conversation" in line]
    contexts = [line for line in lines if ".1 WS" in line or ".2 WS" in line]
    assert ": CANCELLED" in contexts[0], lines
    assert contexts[0].split()[3].rsplit(".", 1)[0] == contexts[1].split()[3].rsplit(".", 1)[0]
