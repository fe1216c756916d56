"""Reference audio for voice cloning: encoded bytes in, a checked mono waveform out.

WAV, FLAC, Ogg (Opus, Vorbis, FLAC), MP3 and whatever else FFmpeg reads are decoded with PyAV.
As upstream's `load_audio` does before encoding: channels are averaged to mono, the signal is
resampled to the codec's rate with torchaudio's default sinc resampler and scaled to peak 1.
Clips outside the allowed duration, silent clips and clips that are clipped throughout are
refused with a `BadAudio` that says why.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from .resample import resample

# Below this peak (about -60 dBFS) a clip is treated as silence: there is no voice to take.
SILENCE_PEAK = 1e-3
# A sample within this distance of the clip's peak counts as clipped...
CLIP_TOLERANCE = 1e-3
# ... and a clip with at least this share of clipped samples is refused: it is a square wave
# or saturated noise, and peak normalisation would not undo that. Lossy codecs (MP3, Opus)
# smear clipped stretches into ringing, so this catches clipping in PCM and FLAC input only.
MAX_CLIPPED_SHARE = 0.5
# Encoded input larger than this is refused before decoding (30 s of 48 kHz stereo WAV is 11 MB).
MAX_INPUT_BYTES = 16 * 1024 * 1024


class BadAudio(ValueError):
    """Reference audio that cannot be used; the message says why."""


@dataclass(frozen=True)
class AudioLimits:
    min_seconds: float = 1.0
    max_seconds: float = 30.0

    def __post_init__(self):
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError(
                f"audio limits: need 0 < min_seconds <= max_seconds, got "
                f"{self.min_seconds} and {self.max_seconds}"
            )


@dataclass(frozen=True)
class ReferenceAudio:
    samples: np.ndarray  # float32, mono, peak 1, at `sample_rate`
    sample_rate: int
    source_rate: int
    source_channels: int
    codec_name: str

    @property
    def duration_seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def decode_bytes(data: bytes) -> tuple[np.ndarray, int, str]:
    """Decode an audio file held in memory: (float32 samples (channels, n), rate, codec)."""
    import av

    if not data:
        raise BadAudio("audio: no bytes")
    if len(data) > MAX_INPUT_BYTES:
        raise BadAudio(f"audio: {len(data)} bytes is over the {MAX_INPUT_BYTES} byte limit")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            streams = container.streams.audio
            if not streams:
                raise BadAudio("audio: the file holds no audio stream")
            stream = streams[0]
            codec_name = stream.codec_context.name
            # Planar float32 at the stream's own rate and channel layout: no resampling here.
            chunks: list[np.ndarray] = []
            rate = 0
            for frame in container.decode(stream):
                rate = frame.sample_rate
                array = frame.to_ndarray()
                if frame.format.is_packed:  # interleaved (1, n * channels)
                    array = array.reshape(-1, len(frame.layout.channels)).T
                chunks.append(_to_float(array, frame.format.name))
    except BadAudio:
        raise
    except Exception as err:  # av.error.*: not audio, truncated, unknown codec
        raise BadAudio(f"audio: cannot decode it ({type(err).__name__}: {err})") from err
    if not chunks or rate <= 0:
        raise BadAudio("audio: the file decodes to no samples")
    return np.concatenate(chunks, axis=1), rate, codec_name


def _to_float(array: np.ndarray, sample_format: str) -> np.ndarray:
    if array.dtype == np.float32 or array.dtype == np.float64:
        return array.astype(np.float32)
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    if array.dtype == np.int32:
        return array.astype(np.float32) / 2147483648.0
    if array.dtype == np.uint8:
        return (array.astype(np.float32) - 128.0) / 128.0
    raise BadAudio(f"audio: unsupported sample format {sample_format}")


def prepare_reference(
    data: bytes, sample_rate: int, limits: AudioLimits | None = None
) -> ReferenceAudio:
    """Decode, check and normalise reference audio for the codec running at `sample_rate`."""
    limits = limits or AudioLimits()
    channels, source_rate, codec_name = decode_bytes(data)
    seconds = channels.shape[1] / source_rate
    if seconds < limits.min_seconds:
        raise BadAudio(
            f"audio: {seconds:.2f} s is too short; a voice needs {limits.min_seconds:g} to "
            f"{limits.max_seconds:g} s of speech"
        )
    if seconds > limits.max_seconds:
        raise BadAudio(
            f"audio: {seconds:.2f} s is too long; send {limits.min_seconds:g} to "
            f"{limits.max_seconds:g} s of speech"
        )
    if not np.isfinite(channels).all():
        raise BadAudio("audio: holds NaN or infinite samples")
    mono = channels.mean(axis=0, dtype=np.float32)
    peak = float(np.abs(mono).max())
    if peak < SILENCE_PEAK:
        raise BadAudio(
            f"audio: silent (peak {20 * np.log10(max(peak, 1e-12)):.0f} dBFS); "
            "a voice needs audible speech"
        )
    clipped = float(np.mean(np.abs(mono) >= peak - CLIP_TOLERANCE))
    if peak >= 0.99 and clipped >= MAX_CLIPPED_SHARE:
        raise BadAudio(
            f"audio: clipped throughout ({clipped:.0%} of samples at full scale); "
            "record at a lower level"
        )
    wave = torch.from_numpy(mono)
    if source_rate != sample_rate:
        wave = resample(wave, source_rate, sample_rate)
    # Peak normalisation, as upstream's load_audio (after resampling, with its 1e-8).
    wave = wave / (wave.abs().max() + 1e-8)
    return ReferenceAudio(
        samples=wave.numpy().astype(np.float32, copy=False),
        sample_rate=sample_rate,
        source_rate=source_rate,
        source_channels=channels.shape[0],
        codec_name=codec_name,
    )
