"""A Pipecat pipeline around one TTS service, as the benchmark (bench.agents) and the tests
drive it: frames in at the top as an LLM would push them, every frame the service sends either
way recorded with the time it came (no transport, no cloud service). Needs the `pipecat`
extra."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    StartFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner


@dataclass
class Seen:
    at: float  # time.perf_counter()
    frame: Frame


class Recorder(FrameProcessor):
    """Records the frames passing one way, passes everything on."""

    def __init__(self, direction: FrameDirection):
        super().__init__()
        self.direction = direction
        self.seen: list[Seen] = []
        self.arrived = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == self.direction and not isinstance(frame, StartFrame):
            self.seen.append(Seen(time.perf_counter(), frame))
            self.arrived.set()
        await self.push_frame(frame, direction)

    def of(self, kind: type) -> list[Seen]:
        return [s for s in self.seen if isinstance(s.frame, kind)]

    async def until(self, predicate, timeout: float = 20.0) -> Seen:
        """The first frame (recorded from now on, or already) for which `predicate` holds."""
        start = 0
        async with asyncio.timeout(timeout):
            while True:
                for seen in self.seen[start:]:
                    if predicate(seen.frame):
                        return seen
                start = len(self.seen)
                self.arrived.clear()
                await self.arrived.wait()


class ServicePipeline:
    """`async with ServicePipeline(tts) as pipe:` a running pipeline [up, tts, down]."""

    def __init__(self, service: FrameProcessor, sample_rate: int = 8000):
        self.up = Recorder(FrameDirection.UPSTREAM)
        self.down = Recorder(FrameDirection.DOWNSTREAM)
        self.worker = PipelineWorker(
            Pipeline([self.up, service, self.down]),
            params=PipelineParams(audio_out_sample_rate=sample_rate),
            cancel_on_idle_timeout=False,
        )
        self._started = asyncio.Event()
        self._task: asyncio.Task | None = None

        @self.worker.event_handler("on_pipeline_started")
        async def started(worker, frame):
            self._started.set()

    async def __aenter__(self) -> ServicePipeline:
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.worker)
        self._task = asyncio.ensure_future(runner.run())
        await asyncio.wait_for(self._started.wait(), 20)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.worker.queue_frame(EndFrame())
        try:
            await asyncio.wait_for(self._task, 20)
        except TimeoutError:
            await self.worker.cancel()
            raise

    async def reply(self, text: str, gap_s: float = 0.04, end: bool = True) -> float:
        """An LLM's reply, a word every `gap_s` (leading spaces, as LLM tokens have them);
        returns when its first sentence's last word was pushed."""
        await self.worker.queue_frame(LLMFullResponseStartFrame())
        first_sentence_end = None
        for i, word in enumerate(text.split(" ")):
            await self.worker.queue_frame(LLMTextFrame(word if i == 0 else " " + word))
            if first_sentence_end is None and word.endswith((".", "?", "!")):
                first_sentence_end = time.perf_counter()
            await asyncio.sleep(gap_s)
        if end:
            await self.worker.queue_frame(LLMFullResponseEndFrame())
        return first_sentence_end or time.perf_counter()

    async def interrupt(self) -> float:
        at = time.perf_counter()
        await self.worker.queue_frame(InterruptionFrame())
        return at
