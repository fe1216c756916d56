"""Reference audio for voice cloning: an encoded file in, a checked mono waveform out, in
memory bounded by the limits whatever the file claims.

WAV, FLAC, Ogg (Opus, Vorbis, FLAC), MP3 and whatever else FFmpeg reads are decoded with PyAV.
As upstream's `load_audio` does before encoding: channels are averaged to mono, the signal is
resampled to the codec's rate with torchaudio's default sinc resampler and scaled to peak 1.

A few kilobytes of FLAC can declare an hour of audio (a constant signal compresses to almost
nothing), so the file is never decoded whole: frame by frame, each frame is mixed to mono and
resampled to the codec's rate at once, and decoding stops as soon as the file declares, or has
decoded, more than the longest clip allowed. What is held is at most that clip at the codec's
rate (30 s at 24 kHz: 2.9 MB) and one frame. Sample rates outside 8 to 384 kHz and more than 8
channels are refused before decoding. Clips outside the allowed duration, silent clips and clips
clipped throughout are refused with a `BadAudio` that says why.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from miotts_stream.errors import FieldError

from .resample import ReferenceResampler

# Below this peak (about -60 dBFS) a clip is treated as silence: there is no voice to take.
SILENCE_PEAK = 1e-3
# A sample within this distance of the clip's peak counts as clipped...
CLIP_TOLERANCE = 1e-3
# ... and a clip whose peak is at least this high and with at least MAX_CLIPPED_SHARE of its
# samples clipped is refused: it is a square wave or saturated noise, and peak normalisation
# would not undo that. Lossy codecs (MP3, Opus) smear clipped stretches into ringing, so this
# catches clipping in PCM and FLAC input only.
CLIPPED_PEAK = 0.99
MAX_CLIPPED_SHARE = 0.5
# Encoded input larger than this is refused before decoding (30 s of 48 kHz stereo WAV is 11 MB).
MAX_INPUT_BYTES = 16 * 1024 * 1024
# Telephony's 8 kHz is the least that carries a voice; 384 kHz is the highest rate in use
# (DXD-class recorders). Anything else in a header is a broken or hostile file.
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 384000
MAX_CHANNELS = 8  # 7.1 surround; FLAC's own limit


class BadAudio(FieldError):
    """Reference audio that cannot be used: "audio: <why>"."""

    def __init__(self, reason: str):
        super().__init__("audio", reason)


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

    def allowed(self) -> str:
        return f"send {self.min_seconds:g} to {self.max_seconds:g} s of speech"


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


@dataclass
class _Levels:
    """Peak, clipping and non-finite samples of the mono signal at its own rate, gathered
    frame by frame (the clipping share needs the final peak, so the values near the running
    peak are kept, counted: at most the float32 values within CLIP_TOLERANCE of it)."""

    peak: float = 0.0
    samples: int = 0
    non_finite: bool = False
    _near_values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _near_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def add(self, mono: np.ndarray) -> np.ndarray:
        """Take a frame into the statistics; the frame with non-finite samples zeroed."""
        finite = np.isfinite(mono)
        if not finite.all():
            self.non_finite = True
            mono = np.where(finite, mono, np.float32(0.0))
        self.samples += len(mono)
        level = np.abs(mono)
        self.peak = max(self.peak, float(level.max(initial=0.0)))
        # Only values that can still count as clipped: near the peak, and near full scale.
        floor = max(self.peak, CLIPPED_PEAK) - CLIP_TOLERANCE
        values = np.concatenate([self._near_values, level[level >= floor]])
        counts = np.concatenate([self._near_counts, np.ones(len(values) - len(self._near_values))])
        keep = values >= floor
        self._near_values, where = np.unique(values[keep], return_inverse=True)
        self._near_counts = np.bincount(where, weights=counts[keep]).astype(np.int64)
        return mono

    def clipped_share(self) -> float:
        near = self._near_counts[self._near_values >= self.peak - CLIP_TOLERANCE]
        return float(near.sum()) / max(self.samples, 1)


def _to_float(array: np.ndarray, sample_format: str) -> np.ndarray:
    if array.dtype == np.float32 or array.dtype == np.float64:
        return array.astype(np.float32)
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    if array.dtype == np.int32:
        return array.astype(np.float32) / 2147483648.0
    if array.dtype == np.uint8:
        return (array.astype(np.float32) - 128.0) / 128.0
    raise BadAudio(f"unsupported sample format {sample_format}")


def _check_format(rate: int, channels: int) -> None:
    """Refuse a rate or channel count no voice recording has (0: not known yet)."""
    if rate and not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise BadAudio(
            f"a sample rate of {rate} Hz is not accepted "
            f"({MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz)"
        )
    if channels > MAX_CHANNELS:
        raise BadAudio(f"{channels} channels is not accepted (1 to {MAX_CHANNELS})")


def _open(source: bytes | Path):
    import av

    if isinstance(source, Path):
        size = source.stat().st_size
        opened = str(source)
    else:
        size = len(source)
        opened = io.BytesIO(source)
    if not size:
        raise BadAudio("no bytes")
    if size > MAX_INPUT_BYTES:
        raise BadAudio(f"{size} bytes is over the {MAX_INPUT_BYTES} byte limit")
    return av.open(opened, mode="r")


@dataclass
class _Decoded:
    samples: np.ndarray  # mono at the codec's rate, not yet normalised
    source_rate: int
    source_channels: int
    codec_name: str
    levels: _Levels


def _decode(source: bytes | Path, sample_rate: int, limits: AudioLimits) -> _Decoded:
    """Decode, mix to mono and resample frame by frame; BadAudio as soon as the file is
    unusable or longer than the limit (declared or decoded)."""
    import av

    levels = _Levels()
    out: list[np.ndarray] = []
    try:
        with _open(source) as container:
            streams = container.streams.audio
            if not streams:
                raise BadAudio("the file holds no audio stream")
            stream = streams[0]
            codec_name = stream.codec_context.name
            # What the header says (some formats say it only with the first frame).
            _check_format(stream.codec_context.sample_rate, stream.codec_context.channels)
            declared = None
            if stream.duration is not None and stream.time_base is not None:
                declared = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                declared = container.duration / av.time_base
            if declared is not None and declared > limits.max_seconds:
                raise BadAudio(
                    f"{declared:.2f} s (as the file declares) is too long; {limits.allowed()}"
                )
            resampler: ReferenceResampler | None = None
            rate = channels = 0
            for frame in container.decode(stream):
                _check_format(frame.sample_rate, frame.layout.nb_channels)
                if resampler is None:
                    rate, channels = frame.sample_rate, frame.layout.nb_channels
                    resampler = ReferenceResampler(rate, sample_rate)
                elif frame.sample_rate != rate:
                    raise BadAudio("the sample rate changes within the file")
                array = frame.to_ndarray()
                if frame.format.is_packed:  # interleaved (1, n * channels)
                    array = array.reshape(-1, frame.layout.nb_channels).T
                mono = _to_float(array, frame.format.name).mean(axis=0, dtype=np.float32)
                out.append(resampler.process(levels.add(mono)))
                if levels.samples > limits.max_seconds * rate:
                    raise BadAudio(
                        f"more than {limits.max_seconds:g} s is too long; {limits.allowed()}"
                    )
    except BadAudio:
        raise
    except Exception as err:  # av.error.*: not audio, truncated, unknown codec
        raise BadAudio(f"cannot decode it ({type(err).__name__}: {err})") from err
    if resampler is None or not levels.samples:
        raise BadAudio("the file decodes to no samples")
    out.append(resampler.flush())
    return _Decoded(np.concatenate(out), rate, channels, codec_name, levels)


def prepare_reference(
    source: bytes | Path, sample_rate: int, limits: AudioLimits | None = None
) -> ReferenceAudio:
    """Decode, check and normalise reference audio (the file's bytes, or its path) for the
    codec running at `sample_rate`."""
    limits = limits or AudioLimits()
    decoded = _decode(source, sample_rate, limits)
    levels = decoded.levels
    seconds = levels.samples / decoded.source_rate
    if seconds < limits.min_seconds:
        raise BadAudio(f"{seconds:.2f} s is too short; {limits.allowed()}")
    if levels.non_finite:
        raise BadAudio("holds NaN or infinite samples")
    if levels.peak < SILENCE_PEAK:
        raise BadAudio(
            f"silent (peak {20 * np.log10(max(levels.peak, 1e-12)):.0f} dBFS); "
            "a voice needs audible speech"
        )
    clipped = levels.clipped_share()
    if levels.peak >= CLIPPED_PEAK and clipped >= MAX_CLIPPED_SHARE:
        raise BadAudio(
            f"clipped throughout ({clipped:.0%} of samples at full scale); record at a lower level"
        )
    wave = decoded.samples
    # Peak normalisation, as upstream's load_audio (after resampling, with its 1e-8).
    wave = wave / (np.abs(wave).max(initial=0.0) + 1e-8)
    return ReferenceAudio(
        samples=wave.astype(np.float32, copy=False),
        sample_rate=sample_rate,
        source_rate=decoded.source_rate,
        source_channels=decoded.source_channels,
        codec_name=decoded.codec_name,
    )
