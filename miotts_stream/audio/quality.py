"""Fidelity of a streamed waveform against the offline decode of the same tokens."""

from __future__ import annotations

import numpy as np


def _stft_power(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    window = np.hanning(n_fft + 1)[:-1].astype(np.float64)  # periodic Hann
    frames = 1 + max(0, (len(x) - n_fft) // hop)
    index = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    spectrum = np.fft.rfft(x.astype(np.float64)[index] * window, axis=1)
    return np.abs(spectrum) ** 2


def lsd_db(estimate: np.ndarray, reference: np.ndarray, sample_rate: int) -> float:
    """Log-spectral distance in dB: per frame, RMS over bins of the dB difference of the power
    spectra (floored at 1e-10); mean over frames. Hann 1024 / hop 256 at 24 kHz, 2048 / 512
    at 44.1 kHz (the frame length scales with the rate)."""
    if estimate.shape != reference.shape:
        raise ValueError(f"lsd: shapes differ {estimate.shape} vs {reference.shape}")
    n_fft = 1024 if sample_rate <= 24000 else 2048
    hop = n_fft // 4
    est = 10 * np.log10(np.maximum(_stft_power(estimate, n_fft, hop), 1e-10))
    ref = 10 * np.log10(np.maximum(_stft_power(reference, n_fft, hop), 1e-10))
    return float(np.mean(np.sqrt(np.mean((est - ref) ** 2, axis=1))))


def snr_db(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Signal-to-noise ratio of estimate against reference, in dB."""
    noise = np.sum((reference.astype(np.float64) - estimate) ** 2)
    signal = np.sum(reference.astype(np.float64) ** 2)
    return float(10 * np.log10(signal / max(noise, 1e-20)))


def seam_jumps(audio: np.ndarray, seams: list[int]) -> tuple[float, float]:
    """(largest sample-to-sample jump at the seams, 99.9th percentile of all other jumps)."""
    jumps = np.abs(np.diff(audio.astype(np.float64)))
    at_seams = np.array([jumps[s - 1] for s in seams if 0 < s < len(audio)])
    inside = np.delete(jumps, [s - 1 for s in seams if 0 < s < len(audio)])
    return float(at_seams.max(initial=0.0)), float(np.percentile(inside, 99.9))
