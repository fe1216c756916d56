"""The speaker encoder: torchaudio-default resampling, upstream's padding rule, SSL layer
selection, the global encoder loaded strictly, and embeddings that are deterministic and the same
batched or alone. WavLM is a tiny random one in transformers format (built locally)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from miotts_stream.audio.resample import SincResampler
from miotts_stream.codec import MioCodecEncoder, load_config
from miotts_stream.codec.encoder import load_global_encoder
from miotts_stream.codec.ssl import SSLFeatures, average_layers

from .conftest import TINY_CODECS


def windowed_sinc(x: float, cutoff: float, zeros: int = 6) -> float:
    """torchaudio's published filter at offset x (input periods, reduced rates), from its docs:
    sinc at `cutoff`, Hann-tapered over `zeros` zero crossings, scaled for unit DC gain."""
    t = max(-zeros, min(zeros, x * cutoff))
    window = math.cos(t * math.pi / zeros / 2) ** 2
    sinc = 1.0 if t == 0 else math.sin(math.pi * t) / (math.pi * t)
    return sinc * window


@pytest.mark.parametrize(("orig", "new"), [(24000, 16000), (44100, 16000), (16000, 24000)])
def test_resampler_impulse_response_is_the_published_filter(orig, new):
    resampler = SincResampler(orig, new)
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    cutoff = min(o, n) * 0.99
    length, at = 4 * o + 40, 2 * o + 7  # an impulse away from both ends
    x = torch.zeros(length)
    x[at] = 1.0
    y = resampler(x).double().numpy()
    assert len(y) == math.ceil(length * n / o)
    # y[j] = sum_i x[i] h(i/o - j/n) * cutoff / o
    expected = np.array([windowed_sinc(at / o - j / n, cutoff) * cutoff / o for j in range(len(y))])
    np.testing.assert_allclose(y, expected, atol=2e-7)


def test_resampler_known_widths_and_lengths():
    # torchaudio: width = ceil(6 * orig / (0.99 * min(orig, new))) on the gcd-reduced rates.
    assert SincResampler(24000, 16000).width == 10  # 3 -> 2
    assert SincResampler(44100, 16000).width == 17  # 441 -> 160
    assert SincResampler(24000, 16000).output_length(24001) == 16001


def _level_db(y: np.ndarray, freq: float, rate: int) -> float:
    """Amplitude of `freq` in y (least squares fit of a sine and cosine), in dB re 1."""
    n = np.arange(len(y))
    basis = np.stack([np.sin(2 * np.pi * freq * n / rate), np.cos(2 * np.pi * freq * n / rate)], 1)
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    return 20 * np.log10(np.hypot(*coef) + 1e-12)


@pytest.mark.parametrize("orig", [24000, 44100])
def test_resampler_passband_and_stopband(orig):
    resampler = SincResampler(orig, 16000)
    t = np.arange(orig) / orig
    trim = 400  # leave out the edges, where the zero padding shows

    def through(freq):
        y = resampler(torch.from_numpy(np.sin(2 * np.pi * freq * t).astype(np.float32)))
        return y.double().numpy()[trim:-trim]

    for freq in (100, 1000, 3000):  # passband: flat
        assert abs(_level_db(through(freq), freq, 16000)) < 0.05, freq
    # The short Hann-tapered filter (6 zero crossings) starts to roll off early.
    assert -0.5 < _level_db(through(6000), 6000, 16000) < -0.01
    # Above the new Nyquist: a transition band just past 8 kHz (the filter is short), then
    # what aliases back is at least 40 dB down, and more the further out.
    assert -15 < _level_db(through(8500), 7500, 16000) < -5
    for freq in (10000, 11000):
        assert _level_db(through(freq), 16000 - freq, 16000) < -40, freq
    if orig > 30000:
        assert _level_db(through(15000), 1000, 16000) < -60


def test_waveform_padding_matches_upstream_rule():
    cfg = load_config(TINY_CODECS["24khz"] / "config.yaml")
    # 3 s: 48000 samples at 16 kHz -> 150 frames -> 149 * 320 + 400 = 48080 -> 72120 at 24 kHz.
    assert cfg.waveform_padding(72000) == 60
    # 24001 samples: 16000.67 at 16 kHz -> 51 frames -> 16400 -> 24600 -> ceil(599 / 2).
    assert cfg.waveform_padding(24001) == 300
    cfg44 = load_config(TINY_CODECS["44khz"] / "config.yaml")
    # 2 s at 44.1 kHz: 32000 -> 100 frames -> 32080 -> 88420.5 at 44.1 kHz -> ceil(110.25).
    assert cfg44.waveform_padding(88200) == 111


@pytest.mark.parametrize("samples", [24000, 36017, 72000])
def test_padded_clip_gives_one_ssl_frame_per_hop(tiny_encoder, samples):
    cfg = tiny_encoder.config
    pad = cfg.waveform_padding(samples)
    padded = torch.nn.functional.pad(torch.randn(1, samples) * 0.1, (pad, pad))
    layers = tiny_encoder.ssl(tiny_encoder.to_ssl_rate(padded))
    assert layers[0].shape[1] == math.ceil(samples / cfg.sample_rate * 16000 / 320)


def test_layer_selection_and_averaging(tiny_encoder, tiny_wavlm):
    """The embedding is the global encoder applied to the plain mean of the config's 1-based
    layers, computed here from the whole (untruncated) transformers model."""
    from transformers import WavLMModel

    full = WavLMModel.from_pretrained(tiny_wavlm, attn_implementation="eager").eval()
    wave = torch.randn(48000, generator=torch.Generator().manual_seed(3)) * 0.2
    pad = tiny_encoder.config.waveform_padding(len(wave))
    x16 = SincResampler(24000, 16000)(torch.nn.functional.pad(wave, (pad, pad))[None])
    with torch.inference_mode():
        hidden = full(x16, output_hidden_states=True).hidden_states
        assert tiny_encoder.config.global_ssl_layers == (1, 2)
        mean = (hidden[1] + hidden[2]) / 2
        expected = tiny_encoder.global_encoder(mean)[0]
    torch.testing.assert_close(tiny_encoder.embed(wave, 24000), expected, atol=1e-5, rtol=0)

    a, b, c = (torch.full((1, 2, 3), v) for v in (1.0, 2.0, 6.0))
    torch.testing.assert_close(average_layers([a, b, c], [1, 3]), torch.full((1, 2, 3), 3.5))
    assert average_layers([a, b, c], [2]) is b
    with pytest.raises(ValueError, match="layer 4"):
        average_layers([a, b, c], [1, 4])


def test_single_layer_config_uses_that_layer(tiny_wavlm, tmp_path):
    folder = tmp_path / "codec"
    shutil.copytree(TINY_CODECS["24khz"], folder)
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(
        text.replace("global_ssl_layers:\n      - 1\n      - 2", "global_ssl_layers:\n      - 3")
    )
    encoder = MioCodecEncoder.from_pretrained(folder, ssl_model=tiny_wavlm, device="cpu")
    assert encoder.config.global_ssl_layers == (3,)
    assert len(encoder.ssl.model.encoder.layers) == 3
    wave = torch.randn(30000, generator=torch.Generator().manual_seed(1)) * 0.2
    pad = encoder.config.waveform_padding(len(wave))
    padded = torch.nn.functional.pad(wave, (pad, pad))[None]
    layers = encoder.ssl(SincResampler(24000, 16000)(padded))
    with torch.inference_mode():
        expected = encoder.global_encoder(layers[2])[0]
    torch.testing.assert_close(encoder.embed(wave, 24000), expected, atol=1e-6, rtol=0)


def test_embedding_is_deterministic_and_batched_equals_alone(tiny_encoder):
    gen = torch.Generator().manual_seed(0)
    clips = [torch.randn(n, generator=gen) * 0.2 for n in (24000, 36000, 24000, 50000)]
    alone = [tiny_encoder.embed(c, 24000) for c in clips]
    assert all(e.shape == (128,) and e.dtype == torch.float32 for e in alone)
    again = tiny_encoder.embed(clips[1], 24000)
    assert torch.equal(again, alone[1])
    batched = tiny_encoder.embed_batch([(c, 24000) for c in clips])
    for a, b in zip(alone, batched, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Different voices differ; a numpy array is accepted as well as a tensor.
    assert (alone[0] - alone[2]).abs().max() > 1e-3
    torch.testing.assert_close(tiny_encoder.embed(clips[0].numpy(), 24000), alone[0])


def test_other_input_rates_are_resampled_to_the_codec_rate(tiny_encoder):
    wave = torch.randn(48000, generator=torch.Generator().manual_seed(5)) * 0.2
    at_24k = SincResampler(48000, 24000)(wave)
    torch.testing.assert_close(
        tiny_encoder.embed(wave, 48000), tiny_encoder.embed(at_24k, 24000), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(
    ("waveform", "message"),
    [
        (np.zeros((2, 100), np.float32), "1-D"),
        (np.zeros(100, np.int16), "float"),
        (np.array([0.0, np.nan], np.float32), "NaN"),
        (np.zeros(0, np.float32), "no samples"),
    ],
)
def test_bad_waveforms_are_refused(tiny_encoder, waveform, message):
    with pytest.raises(ValueError, match=message):
        tiny_encoder.embed(waveform, 24000)


def test_global_encoder_loads_strictly(tmp_path):
    _, module = load_global_encoder(TINY_CODECS["24khz"])
    weights = load_file(str(TINY_CODECS["24khz"] / "model.safetensors"))
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, weights[f"global_encoder.{name}"]), name

    folder = tmp_path / "codec"
    shutil.copytree(TINY_CODECS["24khz"], folder)
    del weights["global_encoder.pooling.proj.bias"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing.*global_encoder\.pooling\.proj\.bias"):
        load_global_encoder(folder)


def test_ssl_model_must_fit_the_codec(tiny_wavlm, tmp_path):
    from transformers import WavLMConfig

    from miotts_stream.codec.ssl import build_random_wavlm

    narrow = WavLMConfig.from_pretrained(tiny_wavlm)
    narrow.hidden_size, narrow.num_attention_heads = 64, 4
    folder = build_random_wavlm(tmp_path / "narrow", narrow)
    with pytest.raises(ValueError, match="hidden size 64 does not match"):
        MioCodecEncoder.from_pretrained(TINY_CODECS["24khz"], ssl_model=folder, device="cpu")
    with pytest.raises(ValueError, match="needs layer 5"):
        SSLFeatures.load(tiny_wavlm, 5)
    with pytest.raises(ValueError, match=r"no config\.json"):
        SSLFeatures.load(tmp_path, 2)


def test_encoder_follows_the_servers_codec_names(tiny_wavlm):
    """--codec random-24khz / random-44khz (and no codec) give the released architecture's
    encoder; anything else is a checkpoint."""
    from miotts_stream.voices.registry import make_encoder

    for name, rate in ((None, 24000), ("random-24khz", 24000), ("random-44khz", 44100)):
        encoder = make_encoder(name, str(tiny_wavlm), "cpu")  # the tiny WavLM: no big build
        assert encoder.random_weights and encoder.sample_rate == rate
        assert encoder.config.global_encoder.input_channels == 768
    from_checkpoint = make_encoder(str(TINY_CODECS["44khz"]), str(tiny_wavlm), "cpu")
    assert from_checkpoint.sample_rate == 44100 and from_checkpoint.random_weights
    with pytest.raises(ValueError, match="random-32khz"):
        make_encoder("random-32khz", str(tiny_wavlm), "cpu")
