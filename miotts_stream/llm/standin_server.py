"""The stand-in speech LLM over HTTP: an OpenAI-compatible server for load tests.

    python -m miotts_stream.llm.standin_server --port 8000 --rate 50 [--prefill-ms 15]

Serves `GET /v1/models`, `GET /health`, streamed `POST /v1/chat/completions` (server-sent
events shaped like vLLM's, the speech codes as `<|s_N|>` text) and `GET /metrics` with the
number of requests running. Codes come at the stand-in's fixed rate per request (see
`standin.StandInPacing`); codes that fell due together go out in one event, as a real server
does for a slow reader.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time

from aiohttp import web

from .base import SamplingOptions, prepare_text
from .speech_tokens import speech_token
from .standin import StandInPacing

MODEL_NAME = "miotts-standin"


class StandInServer:
    def __init__(self, pacing: StandInPacing) -> None:
        self.pacing = pacing
        self.running = 0  # requests streaming now
        self.total = 0
        self.app = web.Application()
        self.app.add_routes(
            [
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.post("/v1/chat/completions", self.chat),
                web.get("/metrics", self.metrics),
            ]
        )

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL_NAME}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")  # as vLLM's /health: 200 while it serves

    async def metrics(self, request: web.Request) -> web.Response:
        body = f"standin_requests_running {self.running}\nstandin_requests_total {self.total}\n"
        return web.Response(text=body)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            text = body["messages"][-1]["content"]
            options = SamplingOptions(max_tokens=int(body.get("max_tokens") or 700))
            seed = body.get("seed")
            normalized = prepare_text(text, "auto")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            return web.json_response(
                {"error": {"message": f"bad request: {err}", "type": "BadRequestError"}},
                status=400,
            )
        count, reason = self.pacing.length(normalized, options.max_tokens)
        codes = self.pacing.codes(count, seed if isinstance(seed, int) else self.total)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        started = time.perf_counter()
        self.running += 1
        self.total += 1
        try:
            sent = 0
            while sent < count:
                due = await self.pacing.next_batch(started, sent, count)
                content = "".join(speech_token(c) for c in codes[sent:due])
                sent = due
                await response.write(_event({"content": content}, None))
            await response.write(_event({}, reason))
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client went away: stop generating, as a real server does
        finally:
            self.running -= 1
        return response


def _event(delta: dict, finish_reason: str | None) -> bytes:
    chunk = {
        "object": "chat.completion.chunk",
        "model": MODEL_NAME,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def serve(host: str, port: int, pacing: StandInPacing) -> None:
    runner = web.AppRunner(StandInServer(pacing).app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    logging.getLogger(__name__).info("stand-in LLM on http://%s:%d/v1", host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--rate", type=float, default=50.0, help="codes per second per request")
    parser.add_argument("--prefill-ms", type=float, default=15.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    pacing = StandInPacing(rate_hz=args.rate, prefill_s=args.prefill_ms / 1000)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, pacing))


if __name__ == "__main__":
    main()
