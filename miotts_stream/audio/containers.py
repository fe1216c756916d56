"""File formats around a stream of 16-bit PCM, written as the audio arrives.

For HTTP responses, where a whole file is the unit: a WAV header written before the length is
known, and MP3 / FLAC / AAC through PyAV (FFmpeg's encoders and muxers), fed
chunk by chunk and drained after each one so bytes leave as soon as the encoder gives them.
"""

from __future__ import annotations

import contextlib
import enum
import struct

import numpy as np

# RIFF and data sizes of a WAV whose length is not known yet: the largest value, which readers
# (FFmpeg, browsers, SoX) take as "until the end of the file".
UNKNOWN_LENGTH = 0xFFFFFFFF


def wav_stream_header(sample_rate: int, channels: int = 1) -> bytes:
    """A 44-byte header for 16-bit PCM WAV of unknown length."""
    block_align = channels * 2
    fmt = struct.pack(
        "<HHIIHH", 1, channels, sample_rate, sample_rate * block_align, block_align, 16
    )
    return (
        b"RIFF"
        + struct.pack("<I", UNKNOWN_LENGTH)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", UNKNOWN_LENGTH)
    )


class ContainerFormat(enum.Enum):
    """Formats written by PyAV: (muxer, encoder)."""

    MP3 = ("mp3", "libmp3lame")
    FLAC = ("flac", "flac")
    AAC = ("adts", "aac")  # AAC in ADTS frames, the streamable way to carry it

    @property
    def muxer(self) -> str:
        return self.value[0]

    @property
    def codec(self) -> str:
        return self.value[1]


class _Sink:
    """A write-only file for PyAV's muxer; no seek, so the muxer writes a streamable file."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


class StreamingFileEncoder:
    """16-bit mono PCM in, bytes of an MP3, FLAC or AAC (ADTS) file out, chunk by chunk.

    `encode` returns whatever the muxer wrote so far (possibly nothing: encoders work in whole
    frames); `finish` flushes the encoder and closes the file. Not thread-safe: one caller at a
    time (the HTTP transport awaits each call in turn, on a worker thread).
    """

    def __init__(self, fmt: ContainerFormat, sample_rate: int):
        import av

        self.format = fmt
        self.sample_rate = sample_rate
        self._sink = _Sink()
        self._container = av.open(self._sink, "w", format=fmt.muxer)
        self._stream = self._container.add_stream(fmt.codec, rate=sample_rate, layout="mono")
        self._pts = 0
        self._closed = False

    def _frame(self, pcm: np.ndarray):
        import av

        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += len(pcm)
        return frame

    def encode(self, pcm_s16le: bytes) -> bytes:
        pcm = np.frombuffer(pcm_s16le, dtype="<i2")
        if len(pcm):
            for packet in self._stream.encode(self._frame(pcm)):
                self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        if not self._closed:
            self._closed = True
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        return self._sink.take()

    def close(self) -> None:
        """Release FFmpeg's state without writing the end (a stream that failed)."""
        if not self._closed:
            self._closed = True
            # A half-written file: nothing in it is worth an error of its own.
            with contextlib.suppress(Exception):
                self._container.close()
