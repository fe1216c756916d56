"""Hostile files for voice cloning: decompression bombs and impossible headers.

`flac_bomb` writes a FLAC file of a constant signal frame by frame (CONSTANT subframes: about
15 bytes per 65535 samples), so a file of a few kilobytes declares, and holds, an hour at
384 kHz; `declare=False` leaves the length out of the header, so only decoding can find it.
`wav_header` writes a WAV whose header claims any rate and channel count. The tests and the
HTTP hostile benchmark (`python -m miotts_stream.bench.hostile_http`) use them.
"""

from __future__ import annotations

import struct

FLAC_MAX_BLOCK = 65535


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _flac_frame_number(n: int) -> bytes:
    """FLAC's frame number: UTF-8's variable-length coding, extended to 36 bits."""
    if n < 0x80:
        return bytes([n])
    for length in range(2, 8):
        if n < 1 << (5 * length + 1):
            tail = []
            for _ in range(length - 1):
                tail.append(0x80 | (n & 0x3F))
                n >>= 6
            return bytes([((0xFF << (8 - length)) & 0xFF) | n, *reversed(tail)])
    raise ValueError(f"frame number {n} does not fit")


def flac_bomb(seconds: float, rate: int, *, declare: bool = True, level: int = 1000) -> bytes:
    """A mono 16-bit FLAC of `seconds` of the constant `level`, at `rate` Hz (at most
    1,048,575); `declare`: STREAMINFO gives the total length (else 0: unknown)."""
    total = int(seconds * rate)
    # STREAMINFO: block sizes, frame sizes unknown, then 20 bits rate, 3 bits channels - 1,
    # 5 bits bits-per-sample - 1, 36 bits total samples; then an MD5 of zeros (unchecked).
    packed = (rate << 44) | (0 << 41) | (15 << 36) | (total if declare else 0)
    info = struct.pack(">HH", FLAC_MAX_BLOCK, FLAC_MAX_BLOCK) + bytes(6) + packed.to_bytes(8)
    out = bytearray(b"fLaC" + bytes([0x80, 0, 0, 34]) + info + bytes(16))
    done = number = 0
    while done < total:
        samples = min(FLAC_MAX_BLOCK, total - done)
        # Sync, fixed blocks; block size in 16 bits at the end, rate from STREAMINFO; mono,
        # 16 bits per sample.
        header = bytes([0xFF, 0xF8, 0x70, 0x08]) + _flac_frame_number(number)
        header += struct.pack(">H", samples - 1)
        header += bytes([_crc8(header)])
        frame = header + b"\x00" + struct.pack(">h", level)  # one CONSTANT subframe
        out += frame + struct.pack(">H", _crc16(frame))
        done += samples
        number += 1
    return bytes(out)


def wav_header(rate: int, channels: int, data: bytes = b"") -> bytes:
    """A 16-bit PCM WAV file claiming `rate` and `channels`, holding `data`."""
    block = 2 * channels
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body
