"""Reference audio for cloning: every container/codec decodes to mono at the codec rate, peak 1;
each bad-audio case is refused with a reason; decompression bombs and impossible headers are
refused in bounded memory."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from miotts_stream.audio.reference import (
    MAX_INPUT_BYTES,
    AudioLimits,
    BadAudio,
    prepare_reference,
)
from miotts_stream.audio.resample import ReferenceResampler, SincResampler, resample
from miotts_stream.bench.hostile import flac_bomb, wav_header

from .audio_files import FORMATS, encode, voice_like


@pytest.mark.parametrize("kind", sorted(FORMATS))
@pytest.mark.parametrize("channels", [1, 2])
def test_formats_decode_to_mono_at_the_codec_rate(kind, channels):
    rate = 44100 if kind == "mp3" else 48000
    x = voice_like(2.0, rate)
    data = encode(x if channels == 1 else np.stack([x, 0.5 * x]), rate, kind)
    ref = prepare_reference(data, 24000)
    assert ref.sample_rate == 24000 and ref.source_rate == rate
    assert ref.source_channels == channels
    assert ref.samples.dtype == np.float32 and ref.samples.ndim == 1
    # MP3 encoders add up to a frame or two of padding; the others keep the length.
    assert 2.0 <= ref.duration_seconds < (2.2 if kind == "mp3" else 2.0001)
    assert abs(float(np.abs(ref.samples).max()) - 1.0) < 1e-5


def test_lossless_path_is_mono_mean_then_sinc_resample_then_peak_normalise():
    x = voice_like(2.0, 48000, seed=4)
    left, right = x, np.roll(x, 100) * 0.3
    ref = prepare_reference(encode(np.stack([left, right]), 48000, "wav_f32"), 24000)
    expected = SincResampler(48000, 24000)(torch.from_numpy((left + right) / 2))
    expected = expected / (expected.abs().max() + 1e-8)
    np.testing.assert_allclose(ref.samples, expected.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "no bytes"),
        (b"this is not audio at all" * 40, "cannot decode"),
        (encode(voice_like(0.5, 24000), 24000), "too short"),
        (encode(voice_like(31.0, 16000), 16000), "too long"),
        (encode(np.zeros(48000, np.float32), 24000), "silent"),
        (encode(np.full(48000, 1e-4, np.float32), 24000, "wav_f32"), "silent"),
        (encode(np.sign(voice_like(2.0, 24000)) * 1.0, 24000), "clipped throughout"),
        (encode(np.clip(voice_like(2.0, 24000) * 50, -1, 1), 24000), "clipped throughout"),
    ],
    ids=["empty", "garbage", "short", "long", "zeros", "near-silent", "square", "saturated"],
)
def test_bad_audio_is_refused_with_a_reason(data, reason):
    with pytest.raises(BadAudio, match=reason):
        prepare_reference(data, 24000)


def test_nan_samples_are_refused():
    x = voice_like(2.0, 24000)
    x[1000] = np.nan
    with pytest.raises(BadAudio, match="NaN"):
        prepare_reference(encode(x, 24000, "wav_f32"), 24000)


def test_limits_are_configurable_and_loud_speech_passes():
    data = encode(voice_like(2.0, 24000), 24000)
    with pytest.raises(BadAudio, match="too short"):
        prepare_reference(data, 24000, AudioLimits(min_seconds=3.0, max_seconds=5.0))
    with pytest.raises(BadAudio, match="too long"):
        prepare_reference(data, 24000, AudioLimits(min_seconds=0.5, max_seconds=1.5))
    # Some clipped peaks (a hot recording) are fine: only clipping throughout is refused.
    hot = np.clip(voice_like(2.0, 24000) * 2.2, -1, 1)
    assert prepare_reference(encode(hot, 24000), 24000).duration_seconds == 2.0
    with pytest.raises(ValueError, match="min_seconds"):
        AudioLimits(min_seconds=5, max_seconds=1)


@pytest.mark.parametrize(
    ("orig", "new"),
    [(48000, 24000), (44100, 24000), (16000, 44100), (384000, 24000), (44056, 24000), (24000,) * 2],
)
def test_resampling_in_pieces_gives_the_whole_signals_resampling(orig, new):
    """The reference decoder resamples frame by frame; that is the whole signal's resampling
    (torchaudio's sinc, or libsoxr for odd pairs such as 44056 Hz), to float32 rounding."""
    rng = np.random.default_rng(orig)
    x = (0.3 * rng.standard_normal(orig + 1234)).astype(np.float32)
    whole = resample(torch.from_numpy(x), orig, new).numpy()
    stream, pieces, at = ReferenceResampler(orig, new), [], 0
    while at < len(x):
        size = int(rng.integers(1, 6000))
        pieces.append(stream.process(x[at : at + size]))
        at += size
    pieces.append(stream.flush())
    np.testing.assert_allclose(np.concatenate(pieces), whole, atol=2e-7, rtol=0)


def _peak_rss_rise_mb(call) -> float:
    """How far this process's resident memory rose above its level before `call`, at most
    (Linux: the peak is reset through /proc/self/clear_refs)."""

    def status(name: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{name}:\s+(\d+) kB", text).group(1)) // 1024

    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    call()
    return status("VmHWM") - before


@pytest.mark.parametrize("seconds", [600, 1800])
def test_a_decompression_bomb_is_refused_in_bounded_memory(seconds):
    """A FLAC of a constant signal at 384 kHz: 50 KB declaring 600 s, 150 KB for 1800 s (as
    decoded whole to float32 before: +1.2 and +4.4 GB). With its length in the header it is
    refused before decoding; without, decoding stops past the 30 s limit. Resident memory may
    rise by what 30 s at the codec's rate takes (2.9 MB), one frame and the decoder's own
    buffers: a 100 MB bound, far under the gigabytes a whole decode takes and well over the
    allocator's noise (measured: +2 to +21 MB)."""
    prepare_reference(encode(voice_like(2.0, 48000), 48000, "flac"), 24000)  # warm: imports
    declared = flac_bomb(seconds, 384000)
    with pytest.raises(BadAudio, match=rf"{seconds}.00 s \(as the file declares\) is too long"):
        prepare_reference(declared, 24000)
    hidden = flac_bomb(seconds, 384000, declare=False)

    def refused():
        with pytest.raises(BadAudio, match="more than 30 s is too long"):
            prepare_reference(hidden, 24000)

    assert _peak_rss_rise_mb(refused) < 100


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (wav_header(1_000_000, 1, bytes(4000)), "1000000 Hz is not accepted"),
        (wav_header(4000, 1, bytes(4000)), "4000 Hz is not accepted"),
        (wav_header(48000, 64, bytes(128 * 100)), "64 channels is not accepted"),
        (flac_bomb(5, 655350, declare=False), "655350 Hz is not accepted"),
    ],
    ids=["1-mhz", "4-khz", "64-channels", "flac-655-khz"],
)
def test_impossible_rates_and_channel_counts_are_refused_before_decoding(data, reason):
    with pytest.raises(BadAudio, match=reason):
        prepare_reference(data, 24000)


def test_a_file_path_is_read_within_the_same_limits(tmp_path):
    clip = tmp_path / "clip.flac"
    clip.write_bytes(encode(voice_like(2.0, 48000), 48000, "flac"))
    assert prepare_reference(clip, 24000).duration_seconds == 2.0
    big = tmp_path / "big.wav"
    with big.open("wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)
    with pytest.raises(BadAudio, match="byte limit"):
        prepare_reference(big, 24000)
