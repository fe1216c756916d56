"""Test audio: a voice-like signal, and encoded files made with PyAV (FFmpeg's encoders)."""

from __future__ import annotations

import io

import numpy as np

# container format, codec, sample format PyAV wants for that codec
FORMATS = {
    "wav": ("wav", "pcm_s16le", "s16"),
    "flac": ("flac", "flac", "s16"),
    "ogg_opus": ("ogg", "libopus", "s16"),
    "mp3": ("mp3", "libmp3lame", "s16p"),
    "wav_f32": ("wav", "pcm_f32le", "flt"),
}


def voice_like(seconds: float, rate: int, seed: int = 0, f0: float = 140.0) -> np.ndarray:
    """Harmonics of a wobbling pitch under a syllable-rate envelope, peak 0.5, float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6))
    wave = wave * envelope + 0.01 * rng.standard_normal(len(t))
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


def encode(samples: np.ndarray, rate: int, kind: str = "wav") -> bytes:
    """Encode mono (n,) or multi-channel (channels, n) float samples into a file in memory."""
    import av

    container_format, codec, sample_format = FORMATS[kind]
    planar = np.atleast_2d(samples).astype(np.float32)
    channels = planar.shape[0]
    layout = "mono" if channels == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        if sample_format.startswith("s16"):
            data = np.clip(np.round(planar * 32767), -32768, 32767).astype(np.int16)
        else:
            data = planar
        if not sample_format.endswith("p"):
            data = data.T.reshape(1, -1)  # packed: interleaved
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), sample_format, layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()
