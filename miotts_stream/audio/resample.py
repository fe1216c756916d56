"""Streaming sample-rate conversion (libsoxr), chunk by chunk, with no seams between chunks."""

from __future__ import annotations

import numpy as np
import soxr


class StreamingResampler:
    """Resamples a mono float32 stream; identity when the rates are equal.

    soxr keeps its filter state between calls, so chunk boundaries leave no trace; `flush`
    returns the samples still held in the filter at the end of the stream.
    """

    def __init__(self, in_rate: int, out_rate: int):
        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")
        )

    @property
    def identity(self) -> bool:
        return self._stream is None

    def process(self, samples: np.ndarray) -> np.ndarray:
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=False)

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
