"""Audio out: every encoding decoded back by an independent decoder where one exists."""

from __future__ import annotations

import io
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # stdlib G.711 reference: deprecated, still present in 3.11

import av
import numpy as np
import opuslib
import pytest

from miotts_stream.audio.decoders import decode_audio, ogg_packets
from miotts_stream.audio.encoders import Encoding, make_encoder, output_rate
from miotts_stream.audio.g711 import (
    alaw_to_linear,
    linear_to_alaw,
    linear_to_mulaw,
    mulaw_to_linear,
)
from miotts_stream.audio.ogg import ogg_crc
from miotts_stream.audio.resample import StreamingResampler


def tone(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode_all(encoding, codec_rate, requested, audio, pieces=7):
    encoder = make_encoder(encoding, codec_rate, requested)
    data, packets, counted = encoder.stream_header(), [], 0
    for piece in np.array_split(audio, pieces):
        out = encoder.encode(piece)
        data, packets, counted = data + out.data, packets + out.packets, counted + out.num_samples
    out = encoder.finish()
    return encoder, data + out.data, packets + out.packets, counted + out.num_samples


def dominant_frequency(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.argmax(spectrum) * rate / len(audio))


@pytest.mark.parametrize("codec_rate", [24000, 44100])
@pytest.mark.parametrize(
    ("encoding", "requested"),
    [
        (e, r)
        for e in (Encoding.PCM_S16LE, Encoding.PCM_F32LE)
        for r in (0, 8000, 16000, 22050, 24000, 44100, 48000)
    ]
    + [
        (e, r)
        for e in (Encoding.OPUS, Encoding.OGG_OPUS)
        for r in (0, 8000, 12000, 16000, 24000, 48000)
    ]
    + [(Encoding.MULAW, 8000), (Encoding.ALAW, 0)],
)
def test_every_encoding_round_trips(codec_rate, encoding, requested):
    audio = tone(codec_rate, 1.013)
    encoder, data, packets, counted = encode_all(encoding, codec_rate, requested, audio)
    rate = encoder.out_rate
    if encoding in (Encoding.PCM_S16LE, Encoding.PCM_F32LE):
        default = codec_rate
    elif encoding in (Encoding.MULAW, Encoding.ALAW):
        default = 8000
    else:  # Opus has no 44.1 kHz mode
        default = 24000 if codec_rate == 24000 else 48000
    assert rate == (requested or default)
    expected_samples = round(len(audio) * rate / codec_rate)
    assert abs(counted - expected_samples) <= 1
    decoded = decode_audio(encoding, rate, data, packets)
    if encoding == Encoding.OPUS:
        assert len(packets) == -(-(counted + encoder._opus.lookahead) // (rate // 50))
        assert all(len(p) > 0 for p in packets)
    else:
        assert abs(len(decoded) - expected_samples) <= 1
    rms = float(np.sqrt(np.mean(decoded**2)))
    assert 0.3 < rms < 0.4  # a 0.5-amplitude sine: not silence, not clipped
    assert abs(dominant_frequency(decoded, rate) - 440) < 5


def test_ogg_opus_decodes_with_ffmpeg():
    """An independent demuxer and decoder (FFmpeg through PyAV) agrees on length and content."""
    audio = tone(24000, 2.013)
    _, data, _, counted = encode_all(Encoding.OGG_OPUS, 24000, 0, audio)
    container = av.open(io.BytesIO(data))
    stream = container.streams.audio[0]
    assert stream.codec_context.name == "opus"
    frames = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
    assert len(frames) == counted * 48000 // 24000  # FFmpeg decodes at 48 kHz
    assert abs(dominant_frequency(frames, 48000) - 440) < 5


def test_ogg_pages_are_well_formed_and_arrive_as_audio_does():
    encoder = make_encoder(Encoding.OGG_OPUS, 24000, 0)
    header = encoder.stream_header()
    first = encoder.encode(tone(24000, 0.2)).data
    assert header.count(b"OggS") == 2 and first.startswith(b"OggS")  # a page per chunk
    rest = encoder.finish().data
    stream = header + first + rest
    packets = ogg_packets(stream)
    assert packets[0].startswith(b"OpusHead") and packets[1].startswith(b"OpusTags")
    offset = 0
    while offset < len(stream):  # every page's CRC checks out
        count = stream[offset + 26]
        size = 27 + count + sum(stream[offset + 27 : offset + 27 + count])
        page = bytearray(stream[offset : offset + size])
        crc = int.from_bytes(page[22:26], "little")
        page[22:26] = b"\0\0\0\0"
        assert ogg_crc(bytes(page)) == crc
        offset += size
    assert stream[stream.rfind(b"OggS") + 5] & 0x04  # end of stream flag on the last page


def test_g711_matches_the_reference_decoder():
    codes = bytes(range(256))
    assert mulaw_to_linear(codes).tobytes() == audioop.ulaw2lin(codes, 2)
    assert alaw_to_linear(codes).tobytes() == audioop.alaw2lin(codes, 2)
    x = np.arange(-32768, 32768, dtype=np.int16)
    assert linear_to_alaw(x) == audioop.lin2alaw(x.tobytes(), 2)
    # mu-law: CPython quantises from 14 bits, the ITU reference from 16; decoding either
    # code gives the same value within the segment's step.
    ours = mulaw_to_linear(linear_to_mulaw(x)).astype(np.int32)
    step = np.maximum(8, (np.abs(x.astype(np.int32)) >> 4))
    assert np.all(np.abs(ours - x) <= step)


def test_resampler_is_seamless_across_chunks():
    audio = tone(24000, 1.0, freq=1000.0)
    whole = StreamingResampler(24000, 16000)
    reference = np.concatenate((whole.process(audio), whole.flush()))
    pieces = StreamingResampler(24000, 16000)
    chunked = np.concatenate(
        [pieces.process(p) for p in np.array_split(audio, 13)] + [pieces.flush()]
    )
    assert len(chunked) == len(reference) == 16000
    assert np.abs(chunked - reference).max() < 1e-5


@pytest.mark.parametrize(
    ("encoding", "rate", "message"),
    [
        (Encoding.MULAW, 16000, r"16000 Hz is not supported for MULAW \(supported: 8000"),
        (Encoding.OPUS, 44100, r"44100 Hz is not supported for OPUS"),
        (Encoding.PCM_S16LE, 11025, r"audio\.sample_rate_hz: 11025 Hz"),
    ],
)
def test_unsupported_encoding_rate_pairs(encoding, rate, message):
    with pytest.raises(ValueError, match=message):
        output_rate(encoding, rate, 24000)


def test_opus_packets_are_20ms_and_decodable_one_by_one():
    _, _, packets, _ = encode_all(Encoding.OPUS, 24000, 48000, tone(24000, 0.5))
    decoder = opuslib.Decoder(48000, 1)
    for packet in packets:
        assert len(decoder.decode(packet, 960)) == 960 * 2  # 960 16-bit samples = 20 ms
