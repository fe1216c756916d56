"""G.711 mu-law and A-law (ITU-T G.711), vectorised with NumPy, for 8 kHz telephony."""

from __future__ import annotations

import numpy as np

_MU_BIAS = 0x84  # 132: added before finding the segment, as the standard's encoder does
_MU_CLIP = 32635


def _segment(magnitude: np.ndarray) -> np.ndarray:
    """Index of the highest set bit above bit 7, 0..7 (the chord)."""
    seg = np.zeros(magnitude.shape, dtype=np.int32)
    for bit in range(1, 8):
        seg[magnitude >= (1 << (bit + 7))] = bit
    return seg


def linear_to_mulaw(pcm: np.ndarray) -> bytes:
    """int16 samples -> mu-law bytes."""
    x = pcm.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0x00)
    magnitude = np.minimum(np.abs(x), _MU_CLIP) + _MU_BIAS
    seg = _segment(magnitude)
    mantissa = (magnitude >> (seg + 3)) & 0x0F
    return (~(sign | (seg << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def mulaw_to_linear(data: bytes) -> np.ndarray:
    """mu-law bytes -> int16 samples."""
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    seg = (u >> 4) & 0x07
    magnitude = (((u & 0x0F) << 3) + _MU_BIAS) << seg
    return np.where(u & 0x80, _MU_BIAS - magnitude, magnitude - _MU_BIAS).astype(np.int16)


def linear_to_alaw(pcm: np.ndarray) -> bytes:
    """int16 samples -> A-law bytes (even bits inverted, as transmitted)."""
    x = pcm.astype(np.int32) >> 3  # A-law works on 13-bit magnitudes
    sign = np.where(x >= 0, 0x80, 0x00)
    magnitude = np.where(x >= 0, x, -x - 1)
    magnitude = np.minimum(magnitude, 0x0FFF)
    seg = np.zeros(magnitude.shape, dtype=np.int32)
    for bit in range(1, 8):
        seg[magnitude >= (1 << (bit + 4))] = bit
    mantissa = np.where(seg == 0, magnitude >> 1, magnitude >> seg) & 0x0F
    return ((sign | (seg << 4) | mantissa) ^ 0x55).astype(np.uint8).tobytes()


def alaw_to_linear(data: bytes) -> np.ndarray:
    """A-law bytes -> int16 samples."""
    a = np.frombuffer(data, dtype=np.uint8).astype(np.int32) ^ 0x55
    seg = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(seg == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << (seg - 1))
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)
