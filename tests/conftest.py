"""Shared fixtures: the small MioCodec checkpoints copied from upstream test vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .postgres_server import postgres_server, postgres_url  # noqa: F401 (shared fixtures)

FIXTURES = Path(__file__).parent / "fixtures"
MIOCODEC = FIXTURES / "miocodec"
TINY_CODECS = {"24khz": MIOCODEC / "tiny-24khz", "44khz": MIOCODEC / "tiny-44khz"}
FULL_CONFIGS = {
    "24khz": MIOCODEC / "configs" / "MioCodec-25Hz-24kHz.yaml",
    "44khz": MIOCODEC / "configs" / "MioCodec-25Hz-44.1kHz-v2.yaml",
}
FULL_KEYS = {
    "24khz": MIOCODEC / "keys-MioCodec-25Hz-24kHz.txt",
    "44khz": MIOCODEC / "keys-MioCodec-25Hz-44.1kHz-v2.txt",
}


def load_vectors(name: str) -> dict[str, np.ndarray]:
    with np.load(TINY_CODECS[name] / "vectors.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session", params=sorted(TINY_CODECS))
def tiny_codec_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_decoders():
    from miotts_stream.codec import MioCodecDecoder

    return {
        name: MioCodecDecoder.from_pretrained(path, device="cpu")
        for name, path in TINY_CODECS.items()
    }


def tiny_wavlm_config():
    """A small WavLM whose width (768) fits the tiny checkpoints' global encoder."""
    from transformers import WavLMConfig

    return WavLMConfig(
        hidden_size=768,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=256,
        conv_dim=(32,) * 7,
        num_buckets=32,
        max_bucket_distance=100,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )


@pytest.fixture(scope="session")
def tiny_wavlm(tmp_path_factory) -> Path:
    """A tiny random WavLM folder in transformers format (config.json + model.safetensors)."""
    from miotts_stream.codec.ssl import build_random_wavlm

    return build_random_wavlm(tmp_path_factory.mktemp("wavlm"), tiny_wavlm_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_wavlm):
    from miotts_stream.codec import MioCodecEncoder

    return MioCodecEncoder.from_pretrained(TINY_CODECS["24khz"], ssl_model=tiny_wavlm, device="cpu")
