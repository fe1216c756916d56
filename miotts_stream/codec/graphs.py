"""CUDA graphs of the streaming decode step: one captured graph per step shape.

An eager step of this decoder is a few hundred small kernels, and on a GPU their launches, not
the arithmetic, set its time. A graph replays them all with one launch. Steps come in few
shapes (`forward_windows` with fixed shapes: batch a power of two, window length a multiple of
the bucket, fixed output width), so each shape is captured once, on first use, and replayed
after. Graphs read their input from, and write their outputs to, static tensors, and they hold
the addresses of the stream slots' tensors, so all are captured again if the slots grow.
A shape whose capture fails runs eagerly from then on (logged once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .decoder import MioCodecDecoder

logger = logging.getLogger(__name__)

StepKey = tuple[int, int, int, int]  # rows, padded window length, output width, head frames


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    packed: torch.Tensor  # static input
    chunks: torch.Tensor  # static outputs
    finite: torch.Tensor


class CudaGraphSteps:
    """Captured streaming steps of one decoder on CUDA (see the module docstring)."""

    def __init__(self, decoder: MioCodecDecoder):
        if decoder.device.type != "cuda":
            raise ValueError("CUDA graphs need a decoder on a CUDA device")
        self.decoder = decoder
        self._graphs: dict[StepKey, _Captured] = {}
        self._eager: set[StepKey] = set()
        self._generation = decoder.stream_slots.generation
        self._pool = torch.cuda.graph_pool_handle()
        self.captures = 0
        self.replays = 0

    @property
    def shapes(self) -> list[StepKey]:
        return sorted(self._graphs)

    def run(
        self, packed: torch.Tensor, padded_length: int, width: int, frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from .streaming import _run_windows

        slots = self.decoder.stream_slots
        if slots.generation != self._generation:  # the slot tensors moved: recapture
            self._graphs.clear()
            self._generation = slots.generation
        key = (packed.shape[0], padded_length, width, frames)
        captured = self._graphs.get(key)
        if captured is None and key not in self._eager:
            captured = self._capture(key, packed)
        if captured is None:
            return _run_windows(self.decoder, packed, padded_length, width, frames)
        captured.packed.copy_(packed)
        captured.graph.replay()
        self.replays += 1
        return captured.chunks, captured.finite

    def _capture(self, key: StepKey, example: torch.Tensor) -> _Captured | None:
        from .streaming import _run_windows, scratch_row

        _, padded_length, width, frames = key
        decoder = self.decoder
        # Warm-up and capture run on rows that touch only the scratch slot.
        static = example.clone()
        meta_start = static.shape[1] - len(scratch_row(decoder.stream_slots, padded_length))
        static[:, meta_start:] = scratch_row(decoder.stream_slots, padded_length).to(static)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisations (RoPE tables, cuBLAS) happen here
                    _run_windows(decoder, static, padded_length, width, frames)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                chunks, finite = _run_windows(decoder, static, padded_length, width, frames)
        except Exception:  # an op that cannot be captured: this shape stays eager
            logger.exception("capturing a CUDA graph for step shape %s failed; eager", key)
            self._eager.add(key)
            return None
        self.captures += 1
        captured = _Captured(graph, static, chunks, finite)
        self._graphs[key] = captured
        return captured
