"""Client side: turn received audio chunks back into float32 PCM (for WAV files and tests)."""

from __future__ import annotations

import struct

import numpy as np

from .encoders import Encoding
from .g711 import alaw_to_linear, mulaw_to_linear


def ogg_packets(stream: bytes) -> list[bytes]:
    """Split an Ogg bitstream into its packets (single logical stream), checking page order."""
    packets, partial, offset, expected_sequence = [], b"", 0, 0
    while offset < len(stream):
        if stream[offset : offset + 4] != b"OggS":
            raise ValueError(f"ogg: no page at byte {offset}")
        sequence = struct.unpack_from("<I", stream, offset + 18)[0]
        if sequence != expected_sequence:
            raise ValueError(f"ogg: page {sequence} where {expected_sequence} was expected")
        expected_sequence += 1
        count = stream[offset + 26]
        lacing = stream[offset + 27 : offset + 27 + count]
        offset += 27 + count
        for size in lacing:
            partial += stream[offset : offset + size]
            offset += size
            if size < 255:
                packets.append(partial)
                partial = b""
    return packets


def decode_audio(encoding: Encoding, rate: int, data: bytes, packets: list[bytes]) -> np.ndarray:
    """All of a stream's audio as float32 in [-1, 1] at `rate`.

    data: the concatenated `data` bytes of every chunk; packets: every `opus_packets` entry.
    """
    if encoding == Encoding.PCM_F32LE:
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if encoding == Encoding.PCM_S16LE:
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if encoding == Encoding.MULAW:
        return mulaw_to_linear(data).astype(np.float32) / 32768.0
    if encoding == Encoding.ALAW:
        return alaw_to_linear(data).astype(np.float32) / 32768.0
    import opuslib

    decoder = opuslib.Decoder(rate, 1)
    frame = rate * 20 // 1000
    pre_skip, end = 0, None
    if encoding == Encoding.OGG_OPUS:
        all_packets = ogg_packets(data)
        head = all_packets[0]
        if not head.startswith(b"OpusHead"):
            raise ValueError("ogg: first packet is not OpusHead")
        pre_skip = struct.unpack_from("<H", head, 10)[0] * rate // 48000
        packets = all_packets[2:]  # after OpusHead and OpusTags
        last_page = data.rfind(b"OggS")
        end = struct.unpack_from("<q", data, last_page + 6)[0] * rate // 48000
    pcm = [np.frombuffer(decoder.decode(p, frame), dtype="<i2") for p in packets]
    audio = np.concatenate(pcm).astype(np.float32) / 32768.0 if pcm else np.zeros(0, np.float32)
    return audio[pre_skip:end]
