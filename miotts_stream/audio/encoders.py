"""Audio out: from the codec's float32 samples to the bytes a client asked for.

Each encoder is stateful per stream (resampler filter, partial Opus frame, Ogg page counter):
feed it the codec's chunks in order with `encode`, then `finish` once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from .g711 import linear_to_alaw, linear_to_mulaw
from .ogg import OggOpusMuxer
from .resample import StreamingResampler


class Encoding(enum.Enum):
    PCM_S16LE = "PCM_S16LE"
    PCM_F32LE = "PCM_F32LE"
    OPUS = "OPUS"
    OGG_OPUS = "OGG_OPUS"
    MULAW = "MULAW"
    ALAW = "ALAW"


PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
G711_RATES = (8000,)
OPUS_FRAME_MS = 20


def supported_rates(encoding: Encoding) -> tuple[int, ...]:
    if encoding in (Encoding.PCM_S16LE, Encoding.PCM_F32LE):
        return PCM_RATES
    if encoding in (Encoding.OPUS, Encoding.OGG_OPUS):
        return OPUS_RATES
    return G711_RATES


def output_rate(encoding: Encoding, requested: int, codec_rate: int) -> int:
    """The output rate for a request (0 = the codec's own rate, where the encoding allows).

    Raises ValueError naming the unsupported encoding/rate pair.
    """
    rates = supported_rates(encoding)
    if requested == 0:
        if codec_rate in rates:
            return codec_rate
        # Opus has no 44.1 kHz mode: 44.1 kHz codec output goes out at 48 kHz.
        return 48000 if encoding in (Encoding.OPUS, Encoding.OGG_OPUS) else rates[0]
    if requested not in rates:
        allowed = ", ".join(str(r) for r in rates)
        raise ValueError(
            f"audio.sample_rate_hz: {requested} Hz is not supported for {encoding.value} "
            f"(supported: {allowed}, or 0 for the default)"
        )
    return requested


@dataclass
class EncodedAudio:
    data: bytes = b""
    packets: list[bytes] = field(default_factory=list)
    num_samples: int = 0  # real (not padding) samples at the output rate

    @property
    def empty(self) -> bool:
        return not self.data and not self.packets and self.num_samples == 0


def _to_int16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")


class AudioEncoder:
    """Resample, then encode. Subclasses implement `_encode` (and `_finish` if they buffer)."""

    def __init__(self, encoding: Encoding, codec_rate: int, out_rate: int):
        self.encoding, self.codec_rate, self.out_rate = encoding, codec_rate, out_rate
        self.resampler = StreamingResampler(codec_rate, out_rate)
        self.samples_out = 0

    @property
    def costly(self) -> bool:
        """Whether encoding a chunk takes long enough (resampling, Opus: milliseconds) to be
        worth running off the event loop."""
        return not self.resampler.identity or self.encoding in (Encoding.OPUS, Encoding.OGG_OPUS)

    def encode(self, samples: np.ndarray) -> EncodedAudio:
        resampled = self.resampler.process(samples)
        self.samples_out += len(resampled)
        return self._encode(resampled)

    def finish(self) -> EncodedAudio:
        rest = self.resampler.flush()
        self.samples_out += len(rest)
        return self._finish(rest)

    def _encode(self, samples: np.ndarray) -> EncodedAudio:
        raise NotImplementedError

    def _finish(self, samples: np.ndarray) -> EncodedAudio:
        return self._encode(samples)

    def stream_header(self) -> bytes:
        """Bytes that start the stream (Ogg headers); empty for other encodings."""
        return b""


class PcmEncoder(AudioEncoder):
    def _encode(self, samples: np.ndarray) -> EncodedAudio:
        if self.encoding == Encoding.PCM_F32LE:
            data = samples.astype("<f4").tobytes()
        else:
            data = _to_int16(samples).tobytes()
        return EncodedAudio(data=data, num_samples=len(samples))


class G711Encoder(AudioEncoder):
    def _encode(self, samples: np.ndarray) -> EncodedAudio:
        pcm = _to_int16(samples)
        law = linear_to_mulaw if self.encoding == Encoding.MULAW else linear_to_alaw
        return EncodedAudio(data=law(pcm), num_samples=len(samples))


class OpusEncoder(AudioEncoder):
    """libopus (through opuslib), 20 ms frames; a partial frame waits for the next chunk and is
    zero-padded at the end. OGG_OPUS wraps the same packets in Ogg pages."""

    def __init__(self, encoding: Encoding, codec_rate: int, out_rate: int):
        super().__init__(encoding, codec_rate, out_rate)
        import opuslib

        self._opus = opuslib.Encoder(out_rate, 1, opuslib.APPLICATION_AUDIO)
        self.frame = out_rate * OPUS_FRAME_MS // 1000
        self._pending = np.zeros(0, dtype=np.float32)
        self._muxer = None
        if encoding == Encoding.OGG_OPUS:
            # Lookahead is reported at the encoder's rate; Ogg Opus counts it at 48 kHz.
            lookahead = self._opus.lookahead * (48000 // out_rate)
            self._muxer = OggOpusMuxer(input_rate=codec_rate, pre_skip_48k=lookahead)

    def stream_header(self) -> bytes:
        return self._muxer.headers() if self._muxer is not None else b""

    def _packets(self, samples: np.ndarray, pad_last: bool) -> tuple[list[bytes], int]:
        buffered = np.concatenate((self._pending, samples))
        whole = len(buffered) // self.frame * self.frame
        padding = 0
        if pad_last and whole < len(buffered):
            padding = self.frame - (len(buffered) - whole)
            buffered = np.concatenate((buffered, np.zeros(padding, dtype=np.float32)))
            whole = len(buffered)
        packets = [
            self._opus.encode(_to_int16(buffered[i : i + self.frame]).tobytes(), self.frame)
            for i in range(0, whole, self.frame)
        ]
        self._pending = buffered[whole:]
        return packets, padding

    def _wrap(self, packets: list[bytes], samples: int, last: bool) -> EncodedAudio:
        if self._muxer is None:
            return EncodedAudio(packets=packets, num_samples=samples)
        scale = 48000 // self.out_rate
        end = self._muxer.pre_skip + self.samples_out * scale
        data = self._muxer.pages(
            packets, [self.frame * scale] * len(packets), last=last, end_granule=end
        )
        return EncodedAudio(data=data, num_samples=samples)

    def _encode(self, samples: np.ndarray) -> EncodedAudio:
        packets, _ = self._packets(samples, pad_last=False)
        if not packets:
            return EncodedAudio(num_samples=len(samples))  # waiting for a whole frame
        return self._wrap(packets, len(samples), last=False)

    def _finish(self, samples: np.ndarray) -> EncodedAudio:
        # The encoder holds `lookahead` samples back: push silence through so the real
        # audio's end is in the packets (Ogg's end granule trims it off again).
        flush = np.zeros(self._opus.lookahead, dtype=np.float32)
        packets, _ = self._packets(np.concatenate((samples, flush)), pad_last=True)
        return self._wrap(packets, len(samples), last=True)


def make_encoder(encoding: Encoding, codec_rate: int, requested_rate: int = 0) -> AudioEncoder:
    """An encoder for a client's request; ValueError for an unsupported encoding/rate pair."""
    rate = output_rate(encoding, requested_rate, codec_rate)
    if encoding in (Encoding.PCM_S16LE, Encoding.PCM_F32LE):
        return PcmEncoder(encoding, codec_rate, rate)
    if encoding in (Encoding.MULAW, Encoding.ALAW):
        return G711Encoder(encoding, codec_rate, rate)
    return OpusEncoder(encoding, codec_rate, rate)
