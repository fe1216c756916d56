"""Ogg Opus muxing (RFC 3533 pages, RFC 7845 Opus mapping), page by page as audio arrives."""

from __future__ import annotations

import struct


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc_table()


def ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32: polynomial 0x04c11db7, initial value 0, no reflection."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC_TABLE[((crc >> 24) & 0xFF) ^ byte]
    return crc


def _lacing(packet: bytes) -> list[int]:
    """Segment sizes for one packet: 255s, then a final segment < 255 (possibly 0)."""
    full, rest = divmod(len(packet), 255)
    return [255] * full + [rest]


class OggOpusMuxer:
    """Builds an Ogg Opus stream: header pages first, then one or more pages per `add` call.

    Granule positions count the 48 kHz samples decodable from the start of the stream, so they
    include the pre-skip (RFC 7845 section 4); the final page's granule (pre-skip plus the real
    samples) trims the last packet's padding so players stop at the real end.
    """

    def __init__(self, input_rate: int, pre_skip_48k: int, serial: int = 0x4D696F54):
        self.serial = serial
        self.sequence = 0
        self.pre_skip = pre_skip_48k
        self.granule = 0
        self.input_rate = input_rate

    def _page(self, packets: list[bytes], granule: int, *, bos=False, eos=False) -> bytes:
        lacing = [size for packet in packets for size in _lacing(packet)]
        assert len(lacing) <= 255, "a page holds at most 255 segments"
        header_type = (0x02 if bos else 0) | (0x04 if eos else 0)
        header = struct.pack(
            "<4sBBqIIIB",
            b"OggS",
            0,
            header_type,
            granule,
            self.serial,
            self.sequence,
            0,
            len(lacing),
        ) + bytes(lacing)
        body = b"".join(packets)
        crc = ogg_crc(header + body)
        self.sequence += 1
        return header[:22] + struct.pack("<I", crc) + header[26:] + body

    def headers(self) -> bytes:
        """The identification page (OpusHead) and the comment page (OpusTags)."""
        opus_head = struct.pack(
            "<8sBBHIhB", b"OpusHead", 1, 1, self.pre_skip, self.input_rate, 0, 0
        )
        vendor = b"miotts-stream"
        opus_tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
        return self._page([opus_head], 0, bos=True) + self._page([opus_tags], 0)

    def pages(
        self,
        packets: list[bytes],
        samples_48k: list[int],
        *,
        last=False,
        end_granule: int | None = None,
    ) -> bytes:
        """Pages for these packets (each `samples_48k[i]` long at 48 kHz).

        With `last`, the final page carries EOS and `end_granule` (pre-skip plus the real
        samples at 48 kHz), which tells players where the padding starts.
        """
        out = []
        batch: list[bytes] = []
        segments = 0
        for i, (packet, duration) in enumerate(zip(packets, samples_48k, strict=True)):
            needed = len(_lacing(packet))
            if batch and segments + needed > 255:
                out.append(self._page(batch, self.granule))
                batch, segments = [], 0
            batch.append(packet)
            segments += needed
            self.granule += duration
            if i == len(packets) - 1:
                granule = end_granule if last and end_granule is not None else self.granule
                out.append(self._page(batch, granule, eos=last))
                batch = []
        if last and not packets:
            granule = end_granule if end_granule is not None else self.granule
            out.append(self._page([], granule, eos=True))
        return b"".join(out)
