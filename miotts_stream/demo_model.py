"""A stand-in MioTTS LLM with random weights, built locally so nothing needs the Hugging Face hub.

    python -m miotts_stream.demo_model --size {tiny,small} --out DIR

The folder it writes is an ordinary Hugging Face causal LM that vLLM, transformers and
`vllm serve` load unchanged:

- the Qwen3 architecture (``Qwen3ForCausalLM``), float32 weights drawn from a seeded generator;
- a byte-level tokenizer with the Qwen special tokens ``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>`` followed by the 12800 MioTTS speech tokens ``<|s_0|>`` .. ``<|s_12799|>``, all
  contiguous, as in the released models (where they start at 151669);
- a Qwen-style chat template: ``<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n``.

It writes speech tokens of the right kind at the right pace, not speech. So that utterances end
on their own, as a trained model's do, a few speech tokens are wired to the end token: after one
of them the model almost surely writes ``<|im_end|>`` (see ``_wire_end_of_utterance``). The mean
length is about ``DemoSpec.mean_tokens`` tokens.

``config.json`` carries ``"miotts_demo": {...}`` and the folder a README, so that whoever loads
it (the service) can say plainly that it runs random weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

NUM_SPEECH_TOKENS = 12800
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# Bump when the files written change, so cached builds from older code are rebuilt.
BUILD_VERSION = 3
DEMO_MARKER = "miotts_demo"


@dataclass(frozen=True)
class DemoSpec:
    """Shape of one demo size. head_dim must be one the CPU attention kernels support (32, 64..)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # Expected utterance length in tokens (25 per second) before the model ends it.
    mean_tokens: int = 150
    seed: int = 0


SIZES: dict[str, DemoSpec] = {
    # A few MB: for tests, where only the plumbing matters.
    "tiny": DemoSpec(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
    ),
    # About 0.1B parameters, like MioTTS-0.1B: for benchmarks and the service's default.
    "small": DemoSpec(
        hidden_size=768,
        intermediate_size=2304,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
    ),
}


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes (GPT-2's mapping)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def build_tokenizer(out_dir: Path) -> dict[str, int]:
    """Writes a byte-level tokenizer with the Qwen and MioTTS special tokens; returns their ids.

    Text costs one token per UTF-8 byte (no merges): longer prompts than a trained tokenizer
    gives, which is harmless for a stand-in. Special tokens come right after the bytes, the
    speech tokens last and contiguous.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    speech = [f"<|s_{n}|>" for n in range(NUM_SPEECH_TOKENS)]
    tokenizer.add_special_tokens([*SPECIAL_TOKENS, *speech])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    # Name the class every transformers release knows (5.x writes its own new backend's name).
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    ids = {tok: tokenizer.token_to_id(tok) for tok in (*SPECIAL_TOKENS, speech[0], speech[-1])}
    if ids[speech[-1]] - ids[speech[0]] != NUM_SPEECH_TOKENS - 1:
        raise AssertionError("speech tokens were not added contiguously")
    return ids


def _config(spec: DemoSpec, ids: dict[str, int]):
    from transformers import Qwen3Config

    vocab_size = ids[f"<|s_{NUM_SPEECH_TOKENS - 1}|>"] + 1
    return Qwen3Config(
        vocab_size=(vocab_size + 63) // 64 * 64,  # padded like released checkpoints
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        torch_dtype="float32",
        architectures=["Qwen3ForCausalLM"],
    )


def _parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes as transformers' Qwen3ForCausalLM has them (built on the meta device)."""
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def parameter_count(size: str) -> int:
    """Parameters of the demo model of `size`, without building it."""
    spec = SIZES[size]
    vocab_end = 256 + len(SPECIAL_TOKENS) + NUM_SPEECH_TOKENS  # bytes, specials, speech
    ids = {"<|endoftext|>": 256, "<|im_end|>": 258, f"<|s_{NUM_SPEECH_TOKENS - 1}|>": vocab_end - 1}
    shapes = _parameter_shapes(_config(spec, ids))
    return sum(math.prod(shape) for shape in shapes.values())


def _random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Norm gains at 1, everything else N(0, 0.02), each tensor from its own seeded generator.

    Seeding per name (not one stream in order) keeps a tensor's values independent of which
    other tensors exist, so changing one size field does not reshuffle every weight.
    """
    weights = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape)
            continue
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        weights[name] = torch.randn(shape, generator=gen) * 0.02
    return weights


def _wire_end_of_utterance(
    weights: dict[str, torch.Tensor], ids: dict[str, int], spec: DemoSpec, num_layers: int
) -> list[int]:
    """Makes a few speech tokens ("closing" tokens) be followed by <|im_end|>; returns their codes.

    Hidden channel 0 is reserved: no layer writes to it (row 0 of every o_proj and down_proj is
    zero), so at the last position it holds exactly the embedding of the last token. Closing
    tokens carry a large value there, every other token zero. The final norm then leaves a
    large positive entry in channel 0 after a closing token, and lm_head's <|im_end|> row reads
    only that channel, lifting the end token's logit far above the ~12800 speech tokens.
    With random weights the speech tokens are drawn near uniformly, so the chance of a closing
    token, hence of the end, is (number of closing tokens) / 12800 per step.
    """
    num_closing = max(1, round(NUM_SPEECH_TOKENS / spec.mean_tokens))
    gen = torch.Generator().manual_seed(spec.seed + 1)
    closing = sorted(torch.randperm(NUM_SPEECH_TOKENS, generator=gen)[:num_closing].tolist())
    first_speech = ids["<|s_0|>"]

    embed = weights["model.embed_tokens.weight"]
    embed[:, 0] = 0.0
    # Far above the rest of the residual stream (all channels together reach an RMS of ~1
    # after 12 random layers), so that channel 0 carries nearly all of the final norm's RMS.
    embed[[first_speech + c for c in closing], 0] = 100.0
    for i in range(num_layers):
        weights[f"model.layers.{i}.self_attn.o_proj.weight"][0, :] = 0.0
        weights[f"model.layers.{i}.mlp.down_proj.weight"][0, :] = 0.0
    lm_head = weights["lm_head.weight"]
    lm_head[:, 0] = 0.0
    # After the final RMSNorm, channel 0 is then close to sqrt(hidden_size); scale the end
    # token's weight so that its logit lands near 30 (certain, even at temperature 1).
    lm_head[ids["<|im_end|>"], 0] = 30.0 / spec.hidden_size**0.5
    return closing


def _readme(size: str, spec: DemoSpec, num_params: int) -> str:
    return (
        f"# MioTTS demo LLM ({size}): RANDOM WEIGHTS\n\n"
        "Built locally by `python -m miotts_stream.demo_model`. It is not a trained model: it\n"
        "writes MioTTS speech tokens of the right kind at the right pace, not speech.\n\n"
        f"- architecture: Qwen3ForCausalLM, {num_params / 1e6:.1f}M parameters, float32\n"
        f"- shape: {json.dumps(asdict(spec))}\n"
        "- tokens: byte-level text, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then\n"
        "  `<|s_0|>` .. `<|s_12799|>` contiguous\n"
    )


def build_demo_model(size: str, out_dir: Path) -> Path:
    """Writes the demo model of `size` into `out_dir` (created or overwritten); returns it."""
    from safetensors.torch import save_file

    if size not in SIZES:
        raise ValueError(f"unknown demo model size {size!r}; choose from {sorted(SIZES)}")
    spec = SIZES[size]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    ids = build_tokenizer(out_dir)
    config = _config(spec, ids)
    weights = _random_weights(_parameter_shapes(config), spec.seed)
    closing = _wire_end_of_utterance(weights, ids, spec, config.num_hidden_layers)
    num_params = sum(t.numel() for t in weights.values())

    config_dict = config.to_dict()
    config_dict[DEMO_MARKER] = {
        "random_weights": True,
        "size": size,
        "build_version": BUILD_VERSION,
        "num_parameters": num_params,
        "closing_speech_codes": closing,
        **asdict(spec),
    }
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    generation_config = {
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    save_file(
        {name: t.contiguous() for name, t in sorted(weights.items())},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (out_dir / "README.md").write_text(_readme(size, spec, num_params))
    return out_dir


def default_cache_dir() -> Path:
    """`$MIOTTS_CACHE_DIR/demo-models`, else `<repo>/.cache/demo-models`."""
    if env := os.environ.get("MIOTTS_CACHE_DIR"):
        return Path(env) / "demo-models"
    return Path(__file__).resolve().parents[1] / ".cache" / "demo-models"


def is_demo_model(model_dir: Path | str) -> bool:
    """Whether a local model folder is one of these random-weight demo models."""
    config = Path(model_dir) / "config.json"
    try:
        return bool(json.loads(config.read_text()).get(DEMO_MARKER, {}).get("random_weights"))
    except (OSError, ValueError):
        return False


def _is_current_build(model_dir: Path, size: str) -> bool:
    try:
        marker = json.loads((model_dir / "config.json").read_text())[DEMO_MARKER]
    except (OSError, ValueError, KeyError):
        return False
    return (
        marker.get("size") == size
        and marker.get("build_version") == BUILD_VERSION
        and (model_dir / "model.safetensors").is_file()
        and (model_dir / "tokenizer.json").is_file()
    )


def ensure_demo_model(size: str = "small", cache_dir: Path | None = None) -> Path:
    """Returns the cached demo model of `size`, building it first when missing or outdated.

    The build goes to a temporary sibling folder that is renamed into place, so a crash or a
    concurrent build never leaves a half-written model where a loader would find it.
    """
    if size not in SIZES:
        raise ValueError(f"unknown demo model size {size!r}; choose from {sorted(SIZES)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / size
    if _is_current_build(target, size):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{size}-", dir=root))
    try:
        build_demo_model(size, staging)
        if target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            # Another process won the race; its build is the same (deterministic).
            if not _is_current_build(target, size):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    args = parser.parse_args()
    out = build_demo_model(args.size, args.out)
    marker = json.loads((out / "config.json").read_text())[DEMO_MARKER]
    print(f"wrote {args.size} demo model ({marker['num_parameters'] / 1e6:.1f}M params) to {out}")


if __name__ == "__main__":
    main()
