"""MioCodec decoder: fidelity to upstream, strict checkpoint loading, input validation."""

from __future__ import annotations

import math
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from miotts_stream.codec import MioCodecDecoder, load_config
from miotts_stream.codec.checkpoint import decoder_shapes, encoder_side_shapes, expected_shapes
from miotts_stream.codec.decoder import RELEASED_CONFIGS
from miotts_stream.codec.layers import local_attention

from .conftest import FULL_CONFIGS, FULL_KEYS, TINY_CODECS, load_vectors


@pytest.mark.parametrize("length", [1, 7, 60])
def test_decode_matches_upstream_vectors(tiny_decoders, tiny_codec_name, length):
    decoder = tiny_decoders[tiny_codec_name]
    vectors = load_vectors(tiny_codec_name)
    wave = decoder.decode(
        torch.from_numpy(vectors[f"tokens_{length}"]), torch.from_numpy(vectors["global_embedding"])
    )
    expected = vectors[f"waveform_{length}"]
    assert wave.dtype == torch.float32
    assert wave.shape == (decoder.samples_per_token * length,) == expected.shape
    assert np.abs(wave.numpy() - expected).max() <= 1e-4


def test_codec_facts(tiny_decoders):
    d24, d44 = tiny_decoders["24khz"], tiny_decoders["44khz"]
    assert (d24.sample_rate, d24.samples_per_token, d24.token_rate) == (24000, 960, 25)
    assert (d44.sample_rate, d44.samples_per_token, d44.token_rate) == (44100, 1764, 25)
    assert d24.codebook_size == 12800 and d24.embedding_dim == 128
    assert not d24.random_weights


def test_decode_batch_equals_single_decodes(tiny_decoders, tiny_codec_name):
    decoder = tiny_decoders[tiny_codec_name]
    vectors = load_vectors(tiny_codec_name)
    gen = torch.Generator().manual_seed(3)
    tokens = [
        torch.from_numpy(vectors["tokens_60"]),
        torch.from_numpy(vectors["tokens_1"]),
        torch.randint(0, 12800, (33,), generator=gen),
    ]
    voices = [
        torch.from_numpy(vectors["global_embedding"]),
        torch.randn(128, generator=gen),
        torch.randn(128, generator=gen),
    ]
    batch = decoder.decode_batch(tokens, voices)
    for t, v, w in zip(tokens, voices, batch, strict=True):
        alone = decoder.decode(t, v)
        assert w.shape == alone.shape
        # Batched GEMMs round differently from single ones; the iSTFT head exp() turns that
        # float32 noise into up to ~2e-5 on these random tiny weights.
        assert (w - alone).abs().max() <= 5e-5


def test_speaker_embedding_changes_output(tiny_decoders):
    decoder = tiny_decoders["24khz"]
    tokens = torch.arange(0, 12800, 997)[:10]
    a = decoder.decode(tokens, torch.zeros(128))
    b = decoder.decode(tokens, torch.ones(128))
    assert (a - b).abs().max() > 1e-3


def test_no_length_cap_beyond_upstream_rope_table(tiny_decoders):
    """Upstream's RoPE table holds 1024 positions (41 s of tokens); we decode past it."""
    decoder = tiny_decoders["24khz"]
    tokens = torch.randint(0, 12800, (1500,), generator=torch.Generator().manual_seed(0))
    wave = decoder.decode(tokens, torch.randn(128))
    assert wave.shape == (1500 * 960,)
    assert torch.isfinite(wave).all() and wave.abs().max() > 0


def test_blocked_local_attention_equals_dense():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 700, 8, generator=gen) for _ in range(3))
    valid = torch.ones(2, 700, dtype=torch.bool)
    valid[1, 650:] = False
    blocked = local_attention(q, k, v, 32, valid, block=128)
    idx = torch.arange(700)
    mask = ((idx[:, None] - idx[None, :]).abs() <= 32)[None, None] & valid[:, None, None, :]
    mask = mask | torch.eye(700, dtype=torch.bool)[None, None]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (blocked - dense).abs().max() < 1e-5


def _keys_file(path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")
        shapes[name] = tuple(int(n) for n in re.findall(r"\d+", shape))
    return shapes


def test_shipped_configs_are_the_released_ones():
    """The package's copies (built-in default, benches) equal the fixtures tested here."""
    for name, path in FULL_CONFIGS.items():
        assert RELEASED_CONFIGS[name].read_text() == path.read_text()


@pytest.mark.parametrize("name", sorted(FULL_CONFIGS))
def test_full_size_decoder_has_exactly_the_released_tensors(name):
    released = _keys_file(FULL_KEYS[name])
    decoder = MioCodecDecoder.from_config(FULL_CONFIGS[name], device="cpu")
    built = decoder_shapes(decoder.model) | encoder_side_shapes(decoder.config)
    assert built == released
    assert decoder.random_weights and "RANDOM" in decoder.describe()
    assert decoder.samples_per_token == {"24khz": 960, "44khz": 1764}[name]


# Every 1-D parameter of the released decoders, by what the random recipe draws for it.
UNIT_GAINS = (
    r"(wave_prior_net\.blocks|wave_post_net\.blocks|wave_upsampler\.resnet_blocks)"
    r"\.\d+\.norm[12]\.weight",  # GroupNorm gains
    r"wave_prenet\.norm\.weight",  # final LayerNorm gain (wave_decoder's final norm is AdaLN)
)
SMALL_NOISE = (
    r".*\.bias",  # every bias, norm biases included
    r"wave_prenet\.layers\.\d+\.(attention|ffn)_norm\.weight",  # pre-norm gains
    r"wave_upsampler\.(snake_activations\.\d+|out_snake)\.(alpha|beta)",  # log-scales
)


@pytest.mark.parametrize("name", sorted(FULL_CONFIGS))
def test_random_recipe_statistics_are_what_its_docstring_says(name):
    """Norm gains ~ 1 + N(0, 0.05^2); other 1-D parameters ~ N(0, 0.05^2); matrices and
    kernels ~ N(0, 1/fan_in). Every 1-D parameter must fall in exactly one class."""
    decoder = MioCodecDecoder.from_config(FULL_CONFIGS[name], device="cpu", seed=3)
    gains, small, groupnorm_gains = [], [], 0
    for param_name, param in decoder.model.named_parameters():
        values = param.detach().double().flatten()
        if param.dim() >= 2:
            fan_in = param[0].numel()
            assert abs(values.mean()) < 4 / math.sqrt(values.numel() * fan_in), param_name
            assert values.std() * math.sqrt(fan_in) == pytest.approx(1.0, abs=0.1), param_name
            continue
        is_gain = any(re.fullmatch(p, param_name) for p in UNIT_GAINS)
        is_small = any(re.fullmatch(p, param_name) for p in SMALL_NOISE)
        assert is_gain != is_small, f"{param_name}: not classified exactly once"
        (gains if is_gain else small).append(values)
        groupnorm_gains += bool(re.fullmatch(UNIT_GAINS[0], param_name))
    expected_groupnorms = 2 * 2 * decoder.config.wave_resnet_num_blocks + 2 * len(
        decoder.config.wave_upsampler_factors
    )
    assert groupnorm_gains == expected_groupnorms
    gains, small = torch.cat(gains), torch.cat(small)
    assert gains.mean() == pytest.approx(1.0, abs=0.005)
    assert gains.std() == pytest.approx(0.05, abs=0.003)
    assert gains.min() > 0.7
    assert small.mean() == pytest.approx(0.0, abs=0.005)
    assert small.std() == pytest.approx(0.05, abs=0.003)
    # The GroupNorms really are on: each normalises to about unit gain.
    for norm in decoder.model.group_norms:
        assert norm.weight.mean() == pytest.approx(1.0, abs=0.03)


def test_full_size_checkpoint_round_trip(tmp_path):
    """Write a full-size 24 kHz checkpoint in the released layout and load it back."""
    source = MioCodecDecoder.from_config(FULL_CONFIGS["24khz"], device="cpu", seed=5)
    cfg = source.config
    tensors = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    tensors |= {k: torch.zeros(s, dtype=torch.float16) for k, s in encoder_side_shapes(cfg).items()}
    assert set(tensors) == set(expected_shapes(cfg))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(FULL_CONFIGS["24khz"], tmp_path / "config.yaml")
    loaded = MioCodecDecoder.from_pretrained(tmp_path, device="cpu")
    tokens = torch.randint(0, 12800, (12,), generator=torch.Generator().manual_seed(0))
    voice = torch.randn(128)
    assert torch.equal(loaded.decode(tokens, voice), source.decode(tokens, voice))


def _mutated_checkpoint(tmp_path, mutate):
    src = TINY_CODECS["24khz"]
    shutil.copy(src / "config.yaml", tmp_path / "config.yaml")
    tensors = load_file(str(src / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda t: t.pop("wave_decoder.layers.1.attention.wq.weight"),
            r"1 missing tensor\(s\): wave_decoder\.layers\.1\.attention\.wq\.weight",
        ),
        (
            lambda t: t.pop("local_encoder.norm.weight"),
            r"missing tensor\(s\): local_encoder\.norm\.weight",
        ),
        (
            lambda t: t.__setitem__("wave_decoder.extra.weight", torch.zeros(3)),
            r"unexpected tensor\(s\): wave_decoder\.extra\.weight",
        ),
        (
            lambda t: t.__setitem__("istft_head.out.bias", torch.zeros(7)),
            r"mis-shaped tensor\(s\): istft_head\.out\.bias \(7,\) \(config implies \(1922,\)\)",
        ),
        (
            lambda t: t.__setitem__("istft_head.out.bias", torch.full((1922,), float("nan"))),
            r"istft_head\.out\.bias holds NaN",
        ),
    ],
)
def test_checkpoint_problems_are_named(tmp_path, mutate, message):
    folder = _mutated_checkpoint(tmp_path, mutate)
    with pytest.raises(ValueError, match=message):
        MioCodecDecoder.from_pretrained(folder, device="cpu")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace("      n_fft: 1920\n", ""),
            r"missing 'model\.init_args\.config\.n_fft'",
        ),
        (
            lambda t: t.replace("wave_decoder_dim: 64", "wave_decoder_dim: 96"),
            r"wave_prenet\.output_dim must equal config\.wave_decoder_dim",
        ),
        (
            lambda t: t.replace("use_wave_decoder: true", "use_wave_decoder: false"),
            r"use_wave_decoder' is not true",
        ),
        (lambda t: t.replace("window_size: 65", "window_size: 64", 1), r"window_size' must be odd"),
        (
            lambda t: t.replace("hop_length: 480", "hop_length: many"),
            r"hop_length' must be an integer",
        ),
        (lambda t: t + "\n  : [\n", r"not valid YAML"),
        (lambda t: "just a string", r"expected a mapping with a 'model' section"),
    ],
)
def test_bad_configs_are_named(tmp_path, edit, message):
    text = (TINY_CODECS["24khz"] / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(edit(text))
    shutil.copy(TINY_CODECS["24khz"] / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        MioCodecDecoder.from_pretrained(tmp_path, device="cpu")


def test_missing_checkpoint_files(tmp_path):
    with pytest.raises(ValueError, match=r"has no config\.yaml"):
        MioCodecDecoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither a folder nor a Hugging Face repo id"):
        MioCodecDecoder.from_pretrained(str(tmp_path / "missing" / "deeper" / "x y"))
    with pytest.raises(ValueError, match="cannot read"):
        load_config(tmp_path / "nothing.yaml")


@pytest.mark.parametrize(
    ("tokens", "embedding", "message"),
    [
        ([0, 12800], torch.zeros(128), r"tokens: token id 12800 is outside 0\.\.12799"),
        ([-1, 3], torch.zeros(128), r"token id -1 is outside"),
        ([], torch.zeros(128), r"tokens: no tokens to decode"),
        ([1.5, 2.0], torch.zeros(128), r"token ids must be integers"),
        ([[1, 2]], torch.zeros(128), r"expected a 1-D sequence"),
        ([1, 2], torch.zeros(127), r"global_embedding: expected 128 floats, got shape \(127,\)"),
        ([1, 2], torch.tensor([float("nan")] * 128), r"global_embedding: holds NaN"),
        ([1, 2], "voice", r"global_embedding: expected 128 floats"),
    ],
)
def test_bad_inputs_raise_value_error(tiny_decoders, tokens, embedding, message):
    with pytest.raises(ValueError, match=message):
        tiny_decoders["24khz"].decode(tokens, embedding)


def test_decode_batch_validates_each_item(tiny_decoders):
    decoder = tiny_decoders["24khz"]
    with pytest.raises(ValueError, match=r"tokens\[1\]: token id 99999"):
        decoder.decode_batch([[1, 2], [99999]], [torch.zeros(128)] * 2)
    with pytest.raises(ValueError, match="2 embeddings for 1 utterances"):
        decoder.decode_batch([[1, 2]], [torch.zeros(128)] * 2)
