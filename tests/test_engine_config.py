"""What the in-process engine is built with, per architecture, and what it refuses at load:
no engine starts here (the config checks run before one would)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import server
from miotts_stream.demo_model import ensure_demo_model
from miotts_stream.llm import (
    ModelConfigError,
    VLLMEngineOptions,
    VLLMTokenSource,
    parse_engine_arg,
)
from miotts_stream.llm.vllm_source import (
    engine_args,
    load_model_config,
    validate_model_config,
)


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    return {arch: ensure_demo_model("tiny", arch=arch) for arch in ("qwen3", "falcon_h1", "lfm2")}


def test_demo_configs_pass(models: dict[str, Path]) -> None:
    expected = {"qwen3": "Qwen3ForCausalLM", "falcon_h1": "FalconH1ForCausalLM"}
    expected["lfm2"] = "Lfm2ForCausalLM"
    for arch, path in models.items():
        assert validate_model_config(load_model_config(path), path) == expected[arch]


def _copy_with(path: Path, tmp_path: Path, **changes) -> Path:
    """The model folder with config.json changed (a value None removes the key)."""
    out = tmp_path / path.name
    shutil.copytree(path, out)
    config = json.loads((out / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_lfm2_without_conv_dim_is_refused_naming_the_key(models, tmp_path: Path) -> None:
    # As transformers 5 saves an LFM2 checkpoint: without conv_dim (and block_dim).
    broken = _copy_with(models["lfm2"], tmp_path, conv_dim=None)
    with pytest.raises(ModelConfigError, match=r"'conv_dim'.*\"conv_dim\": 64"):
        VLLMTokenSource.from_model(broken, VLLMEngineOptions())


def test_inconsistent_configs_are_refused(models, tmp_path: Path) -> None:
    lfm2 = load_model_config(models["lfm2"])
    lfm2["layer_types"] = lfm2["layer_types"][:-1]
    with pytest.raises(ModelConfigError, match="layer_types"):
        validate_model_config(lfm2)
    falcon = load_model_config(models["falcon_h1"])
    falcon["mamba_d_ssm"] += 1
    with pytest.raises(ModelConfigError, match="mamba_d_ssm"):
        validate_model_config(falcon)
    with pytest.raises(ModelConfigError, match="architectures"):
        validate_model_config({"hidden_size": 8})
    with pytest.raises(ModelConfigError, match=r"no config\.json"):
        load_model_config(tmp_path)


def test_engine_settings_per_architecture_on_cpu() -> None:
    options = VLLMEngineOptions(max_model_len=4096)
    qwen3 = engine_args(options, "Qwen3ForCausalLM")
    falcon = engine_args(options, "FalconH1ForCausalLM")
    lfm2 = engine_args(options, "Lfm2ForCausalLM")
    for args in (falcon, lfm2):
        assert args["enable_chunked_prefill"] is False
        assert args["max_num_batched_tokens"] >= 4096  # a whole prompt fits one step
    assert "enable_prefix_caching" not in qwen3 and "enable_chunked_prefill" not in qwen3
    assert falcon["enable_prefix_caching"] is False and lfm2["enable_prefix_caching"] is False
    assert falcon["mamba_ssm_cache_dtype"] == "float32"
    # The user's --engine-arg wins over the architecture's choice.
    mine = VLLMEngineOptions(extra_engine_args={"enable_prefix_caching": True})
    assert engine_args(mine, "FalconH1ForCausalLM")["enable_prefix_caching"] is True


def test_engine_arg_values_are_typed() -> None:
    assert parse_engine_arg("max_num_seqs=8") == ("max_num_seqs", 8)
    assert parse_engine_arg("enable-prefix-caching=false") == ("enable_prefix_caching", False)
    assert parse_engine_arg("swap_space=0.5") == ("swap_space", 0.5)
    assert parse_engine_arg("kv_cache_dtype=fp8") == ("kv_cache_dtype", "fp8")
    assert parse_engine_arg('hf_overrides={"conv_dim": 64}') == ("hf_overrides", {"conv_dim": 64})
    assert parse_engine_arg("tokenizer_mode=") == ("tokenizer_mode", "")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_engine_arg("no_value")


def test_an_unknown_engine_arg_is_refused(models) -> None:
    options = VLLMEngineOptions(extra_engine_args={"enable_prefix_cache": False})
    with pytest.raises(ValueError, match="enable_prefix_cache: not an argument"):
        VLLMTokenSource.from_model(models["qwen3"], options)


def test_server_flags_for_the_family() -> None:
    options = server.parse_args(
        [
            "--demo-arch",
            "falcon_h1",
            "--engine-arg",
            "max_num_seqs=8",
            "--engine-arg",
            "enable_prefix_caching=true",
            "--exit-on-engine-death",
        ]
    )
    assert options.vllm.demo_arch == "falcon_h1"
    assert options.vllm.engine_args == {"max_num_seqs": 8, "enable_prefix_caching": True}
    assert options.vllm.exit_on_engine_death
    defaults = server.parse_args([])
    assert defaults.vllm.demo_arch == "qwen3" and defaults.vllm.engine_args == {}
    assert not defaults.vllm.exit_on_engine_death
    with pytest.raises(SystemExit):
        server.parse_args(["--demo-arch", "llama"])
