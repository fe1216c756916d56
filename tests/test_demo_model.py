"""The random-weight demo LLMs: built locally, deterministic, cached, real Qwen3, Falcon-H1 and
LFM2 checkpoints."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miotts_stream.demo_model import (
    ARCHITECTURES,
    CHAT_TEMPLATE,
    build_demo_model,
    ensure_demo_model,
    is_demo_model,
    parameter_count,
)

NUM_SPEECH_CODES = 12800


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return ensure_demo_model("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


def test_build_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = build_demo_model("tiny", tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert _digest(again / name) == _digest(tiny / name), name


def test_cache_builds_once(tiny: Path) -> None:
    stamp = (tiny / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model("tiny", cache_dir=tiny.parent) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_cache_dir_from_environment(monkeypatch, tmp_path: Path) -> None:
    from miotts_stream.demo_model import default_cache_dir

    monkeypatch.setenv("MIOTTS_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "demo-models"


def test_marked_as_random_weights(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["miotts_demo"]["random_weights"] is True
    assert is_demo_model(tiny)
    assert "RANDOM WEIGHTS" in (tiny / "README.md").read_text()
    assert not is_demo_model(tiny.parent)


def test_sizes(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    assert config["miotts_demo"]["num_parameters"] == parameter_count("tiny")
    assert (tiny / "model.safetensors").stat().st_size < 16 * 2**20  # a few MB
    assert 80e6 < parameter_count("small") < 130e6  # about MioTTS-0.1B


def test_tokenizer_layout_and_chat_template(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    first = tokenizer.convert_tokens_to_ids("<|s_0|>")
    speech = [f"<|s_{n}|>" for n in range(NUM_SPEECH_CODES)]
    assert tokenizer.convert_tokens_to_ids(speech) == list(range(first, first + NUM_SPEECH_CODES))
    assert tokenizer.eos_token == "<|im_end|>"
    generation = json.loads((tiny / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }

    text = "こんにちは, world"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    # Text round-trips through the byte-level tokenizer; speech tokens are single tokens.
    ids = tokenizer.encode(text + "<|s_42|>", add_special_tokens=False)
    assert ids[-1] == first + 42
    assert tokenizer.decode(ids[:-1]) == text


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("family")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_transformers_loads_it_and_closing_tokens_end_the_utterance(
    arch: str, tiny: Path, cache: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if arch != "qwen3":
        tiny = ensure_demo_model("tiny", cache_dir=cache, arch=arch)
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[arch].hf_class]
    assert config["miotts_demo"]["arch"] == arch
    assert config["miotts_demo"]["num_parameters"] == parameter_count("tiny", arch)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    closing = json.loads((tiny / "config.json").read_text())["miotts_demo"]["closing_speech_codes"]
    first = tokenizer.convert_tokens_to_ids("<|s_0|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.encode(
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    ordinary = next(c for c in range(NUM_SPEECH_CODES) if c not in closing)
    with torch.no_grad():
        after_closing = model(torch.tensor([[*prompt, first + closing[0]]])).logits[0, -1]
        after_other = model(torch.tensor([[*prompt, first + ordinary]])).logits[0, -1]
    assert after_closing.argmax().item() == end
    assert after_closing[end] > after_closing[first : first + NUM_SPEECH_CODES].max() + 15
    assert after_other[end] < after_other[first : first + NUM_SPEECH_CODES].max()


def test_command_line(tmp_path: Path) -> None:
    out = tmp_path / "model"
    command = [sys.executable, "-m", "miotts_stream.demo_model", "--arch", "lfm2"]
    result = subprocess.run(
        [*command, "--size", "tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "lfm2 tiny demo model" in result.stdout
    assert is_demo_model(out) and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Lfm2ForCausalLM"]


def test_published_config_keys(cache: Path) -> None:
    """Keys vLLM reads that transformers 5 does not write: the build adds them."""
    lfm2 = json.loads((ensure_demo_model("tiny", cache, "lfm2") / "config.json").read_text())
    assert lfm2["conv_dim"] == lfm2["block_dim"] == lfm2["hidden_size"]
    assert lfm2["tie_word_embeddings"] is True  # as vLLM's LFM2 always ties the head
    assert len(lfm2["layer_types"]) == lfm2["num_hidden_layers"]
    assert set(lfm2["layer_types"]) == {"conv", "full_attention"}
    falcon = json.loads((ensure_demo_model("tiny", cache, "falcon_h1") / "config.json").read_text())
    assert falcon["mamba_d_ssm"] == falcon["mamba_n_heads"] * falcon["mamba_d_head"]
    assert falcon["mamba_chunk_size"] == 128 and falcon["mamba_rms_norm"] is True
    # The small builds stand in for MioTTS-0.1B and the smaller LFM2 models.
    assert 60e6 < parameter_count("small", "lfm2") < 160e6
    assert 60e6 < parameter_count("small", "falcon_h1") < 160e6


def test_unknown_size_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        ensure_demo_model("huge", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="architecture"):
        ensure_demo_model("tiny", cache_dir=tmp_path, arch="llama")
