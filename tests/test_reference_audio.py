"""Reference audio for cloning: every container/codec decodes to mono at the codec rate, peak 1;
each bad-audio case is refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from miotts_stream.audio.reference import AudioLimits, BadAudio, prepare_reference
from miotts_stream.audio.resample import SincResampler

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
