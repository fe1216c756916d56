"""A stand-in MioTTS LLM with random weights, built locally so nothing needs the Hugging Face hub.

    python -m miotts_stream.demo_model --arch {qwen3,falcon_h1,lfm2} --size {tiny,small} --out DIR

The folder it writes is an ordinary Hugging Face causal LM that vLLM, transformers and
`vllm serve` load unchanged:

- one of the MioTTS family's architectures: Qwen3 (``Qwen3ForCausalLM``, MioTTS-0.6B/1.7B),
  Falcon-H1 (``FalconH1ForCausalLM``, attention and Mamba2 side by side, MioTTS-0.1B) or LFM2
  (``Lfm2ForCausalLM``, short convolutions and attention, MioTTS-0.4B/1.2B/2.6B), with the
  config keys the published checkpoints carry (vLLM reads some that transformers no longer
  writes, e.g. LFM2's ``conv_dim`` and ``block_dim``); float32 weights from a seeded generator;
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
BUILD_VERSION = 4
DEMO_MARKER = "miotts_demo"


@dataclass(frozen=True)
class DemoSpec:
    """Shape of one demo size. head_dim must be one the CPU attention kernels support (32, 64..).

    The mamba_* fields shape Falcon-H1's Mamba2 mixer (d_ssm = heads * head_dim); `layer_types`
    is LFM2's per-layer choice of "conv" or "full_attention". Other architectures ignore them.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mamba_n_heads: int = 0
    mamba_d_head: int = 0
    mamba_d_state: int = 0
    layer_types: tuple[str, ...] = ()
    # Expected utterance length in tokens (25 per second) before the model ends it.
    mean_tokens: int = 150
    seed: int = 0


@dataclass(frozen=True)
class Architecture:
    """What differs between the family's architectures when building a demo checkpoint."""

    hf_class: str  # transformers' and vLLM's class name, written to config.json
    # Weights whose output rows add to the residual stream, by name suffix (see
    # _wire_end_of_utterance); every layer's writers are listed.
    residual_writers: tuple[str, ...]
    # LFM2 always ties lm_head to the embeddings in vLLM, as its checkpoints do.
    tie_word_embeddings: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "qwen3": Architecture(
        hf_class="Qwen3ForCausalLM",
        residual_writers=("self_attn.o_proj.weight", "mlp.down_proj.weight"),
    ),
    "falcon_h1": Architecture(
        hf_class="FalconH1ForCausalLM",
        residual_writers=(
            "self_attn.o_proj.weight",
            "mamba.out_proj.weight",
            "feed_forward.down_proj.weight",
        ),
    ),
    "lfm2": Architecture(
        hf_class="Lfm2ForCausalLM",
        residual_writers=(
            "self_attn.out_proj.weight",
            "conv.out_proj.weight",
            "feed_forward.w2.weight",
        ),
        tie_word_embeddings=True,
    ),
}
DEFAULT_ARCH = "qwen3"

_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
}
_SMALL = {
    "hidden_size": 768,
    "intermediate_size": 2304,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
# LFM2's published layouts put an attention layer after every two or three convolutions.
_LFM2_SMALL_LAYERS = ("conv", "conv", "full_attention") * 4

SIZES: dict[str, dict[str, DemoSpec]] = {
    # tiny: a few MB, for tests, where only the plumbing matters.
    # small: about 0.1B parameters, like MioTTS-0.1B: for benchmarks and the service's default.
    "qwen3": {
        "tiny": DemoSpec(num_hidden_layers=2, **_TINY),
        "small": DemoSpec(num_hidden_layers=12, **_SMALL),
    },
    "falcon_h1": {
        "tiny": DemoSpec(
            num_hidden_layers=2, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, **_TINY
        ),
        "small": DemoSpec(
            num_hidden_layers=12, mamba_n_heads=24, mamba_d_head=64, mamba_d_state=64, **_SMALL
        ),
    },
    "lfm2": {
        "tiny": DemoSpec(num_hidden_layers=4, layer_types=("conv", "full_attention") * 2, **_TINY),
        "small": DemoSpec(num_hidden_layers=12, layer_types=_LFM2_SMALL_LAYERS, **_SMALL),
    },
}


def demo_spec(arch: str, size: str) -> DemoSpec:
    """The shape of the demo model `arch`/`size`; a ValueError names the unknown one."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown demo model architecture {arch!r}; choose from {sorted(SIZES)}")
    if size not in SIZES[arch]:
        raise ValueError(f"unknown demo model size {size!r}; choose from {sorted(SIZES[arch])}")
    return SIZES[arch][size]


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


def _config(arch: str, spec: DemoSpec, ids: dict[str, int]):
    """transformers' config object for `arch`, with the demo tokenizer's ids."""
    import transformers

    vocab_size = ids[f"<|s_{NUM_SPEECH_TOKENS - 1}|>"] + 1
    common = {
        "vocab_size": (vocab_size + 63) // 64 * 64,  # padded like released checkpoints
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": ARCHITECTURES[arch].tie_word_embeddings,
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "architectures": [ARCHITECTURES[arch].hf_class],
    }
    if arch == "qwen3":
        return transformers.Qwen3Config(
            head_dim=spec.head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            torch_dtype="float32",
            **common,
        )
    if arch == "falcon_h1":
        # Published Falcon-H1 values where they are not shape: RMS-normed Mamba output, chunk
        # size 128, conv bias on, multipliers at 1 (random weights need no muP scaling).
        return transformers.FalconH1Config(
            head_dim=spec.head_dim,
            mamba_d_ssm=spec.mamba_n_heads * spec.mamba_d_head,
            mamba_n_heads=spec.mamba_n_heads,
            mamba_d_head=spec.mamba_d_head,
            mamba_d_state=spec.mamba_d_state,
            mamba_n_groups=1,
            mamba_d_conv=4,
            mamba_chunk_size=128,
            mamba_rms_norm=True,
            mamba_conv_bias=True,
            mamba_proj_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 100_000_000_000.0},
            dtype="float32",
            **common,
        )
    if arch == "lfm2":
        return transformers.Lfm2Config(
            layer_types=list(spec.layer_types),
            conv_L_cache=3,
            conv_bias=False,
            norm_eps=1e-5,
            block_multiple_of=256,
            block_ffn_dim_multiplier=1.0,
            block_auto_adjust_ff_dim=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            dtype="float32",
            **common,
        )
    raise ValueError(f"unknown demo model architecture {arch!r}")


def _published_keys(arch: str, spec: DemoSpec) -> dict[str, object]:
    """Keys the published checkpoints carry that transformers 5 no longer writes but vLLM reads.

    LFM2 (LiquidAI/LFM2-*): vLLM's model sizes its convolutions and feed-forward blocks from
    `conv_dim` and `block_dim` (both the hidden size in every published checkpoint).
    """
    if arch == "lfm2":
        return {
            "conv_dim": spec.hidden_size,
            "conv_dim_out": spec.hidden_size,
            "block_dim": spec.hidden_size,
            "block_ff_dim": spec.intermediate_size,
            "num_heads": spec.num_attention_heads,
            "full_attn_idxs": [i for i, t in enumerate(spec.layer_types) if t == "full_attention"],
        }
    return {}


def _model_class(arch: str):
    import transformers

    return getattr(transformers, ARCHITECTURES[arch].hf_class)


def _parameter_shapes(arch: str, config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the stored tensors as transformers has them (built on the meta
    device); a tied lm_head is the embedding and is not stored."""
    with torch.device("meta"):
        model = _model_class(arch)(config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if ARCHITECTURES[arch].tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _placeholder_ids() -> dict[str, int]:
    vocab_end = 256 + len(SPECIAL_TOKENS) + NUM_SPEECH_TOKENS  # bytes, specials, speech
    return {
        "<|endoftext|>": 256,
        "<|im_end|>": 258,
        f"<|s_{NUM_SPEECH_TOKENS - 1}|>": vocab_end - 1,
    }


def parameter_count(size: str, arch: str = DEFAULT_ARCH) -> int:
    """Parameters of the demo model `arch`/`size`, without building it."""
    config = _config(arch, demo_spec(arch, size), _placeholder_ids())
    return sum(math.prod(shape) for shape in _parameter_shapes(arch, config).values())


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
    weights: dict[str, torch.Tensor], ids: dict[str, int], spec: DemoSpec, arch: Architecture
) -> list[int]:
    """Makes a few speech tokens ("closing" tokens) be followed by <|im_end|>; returns their codes.

    Hidden channel 0 is reserved: no layer writes to it (row 0 of every residual writer is
    zero), so at the last position it holds exactly the embedding of the last token. Closing
    tokens carry a large value there, every other token zero. The final norm then leaves a
    large positive entry in channel 0 after a closing token (about sqrt(hidden_size)), and the
    output head's column 0 turns that into a logit for <|im_end|> far above the ~12800 speech
    tokens. With random weights the speech tokens are drawn near uniformly, so the chance of a
    closing token, hence of the end, is (number of closing tokens) / 12800 per step.

    Untied head: only <|im_end|>'s row reads channel 0. Tied head (LFM2): the head is the
    embedding, so after a closing token the closing tokens' own logits rise as well;
    <|im_end|> then gets a slightly larger channel-0 entry than they have, which puts its logit
    the same margin above theirs.
    """
    num_closing = max(1, round(NUM_SPEECH_TOKENS / spec.mean_tokens))
    gen = torch.Generator().manual_seed(spec.seed + 1)
    closing = sorted(torch.randperm(NUM_SPEECH_TOKENS, generator=gen)[:num_closing].tolist())
    first_speech = ids["<|s_0|>"]

    embed = weights["model.embed_tokens.weight"]
    embed[:, 0] = 0.0
    # Far above the rest of the residual stream (all channels together reach an RMS of ~1
    # after 12 random layers), so that channel 0 carries nearly all of the final norm's RMS.
    closing_value = 100.0
    embed[[first_speech + c for c in closing], 0] = closing_value
    for name, weight in weights.items():
        if name.startswith("model.layers.") and name.endswith(arch.residual_writers):
            weight[0, :] = 0.0
    # The end token's logit lands ~30 above the rest (certain, even at temperature 1).
    margin = 30.0 / spec.hidden_size**0.5
    if arch.tie_word_embeddings:
        embed[ids["<|im_end|>"], 0] = closing_value + margin
    else:
        lm_head = weights["lm_head.weight"]
        lm_head[:, 0] = 0.0
        lm_head[ids["<|im_end|>"], 0] = margin
    return closing


def _readme(arch: str, size: str, spec: DemoSpec, num_params: int) -> str:
    return (
        f"# MioTTS demo LLM ({arch}, {size}): RANDOM WEIGHTS\n\n"
        "Built locally by `python -m miotts_stream.demo_model`. It is not a trained model: it\n"
        "writes MioTTS speech tokens of the right kind at the right pace, not speech.\n\n"
        f"- architecture: {ARCHITECTURES[arch].hf_class}, {num_params / 1e6:.1f}M parameters, "
        "float32\n"
        f"- shape: {json.dumps(asdict(spec))}\n"
        "- tokens: byte-level text, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then\n"
        "  `<|s_0|>` .. `<|s_12799|>` contiguous\n"
    )


def build_demo_model(size: str, out_dir: Path, arch: str = DEFAULT_ARCH) -> Path:
    """Writes the demo model `arch`/`size` into `out_dir` (created or overwritten); returns it."""
    from safetensors.torch import save_file

    spec = demo_spec(arch, size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    ids = build_tokenizer(out_dir)
    config = _config(arch, spec, ids)
    weights = _random_weights(_parameter_shapes(arch, config), spec.seed)
    closing = _wire_end_of_utterance(weights, ids, spec, ARCHITECTURES[arch])
    num_params = sum(t.numel() for t in weights.values())

    config_dict = config.to_dict()
    config_dict.update(_published_keys(arch, spec))
    config_dict[DEMO_MARKER] = {
        "random_weights": True,
        "arch": arch,
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
    (out_dir / "README.md").write_text(_readme(arch, size, spec, num_params))
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


def _is_current_build(model_dir: Path, arch: str, size: str) -> bool:
    try:
        marker = json.loads((model_dir / "config.json").read_text())[DEMO_MARKER]
    except (OSError, ValueError, KeyError):
        return False
    return (
        marker.get("arch") == arch
        and marker.get("size") == size
        and marker.get("build_version") == BUILD_VERSION
        and (model_dir / "model.safetensors").is_file()
        and (model_dir / "tokenizer.json").is_file()
    )


def _cache_name(arch: str, size: str) -> str:
    # Qwen3 keeps the plain size as its folder name (and so its "vllm:tiny" source name).
    return size if arch == DEFAULT_ARCH else f"{arch}-{size}"


def ensure_demo_model(
    size: str = "small", cache_dir: Path | None = None, arch: str = DEFAULT_ARCH
) -> Path:
    """Returns the cached demo model `arch`/`size`, building it first when missing or outdated.

    The build goes to a temporary sibling folder that is renamed into place, so a crash or a
    concurrent build never leaves a half-written model where a loader would find it.
    """
    demo_spec(arch, size)  # a clear error for an unknown name, before touching the cache
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = _cache_name(arch, size)
    target = root / name
    if _is_current_build(target, arch, size):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build_demo_model(size, staging, arch)
        if target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            # Another process won the race; its build is the same (deterministic).
            if not _is_current_build(target, arch, size):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default=DEFAULT_ARCH)
    parser.add_argument("--size", choices=sorted(SIZES[DEFAULT_ARCH]), default="small")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    args = parser.parse_args()
    out = build_demo_model(args.size, args.out, args.arch)
    marker = json.loads((out / "config.json").read_text())[DEMO_MARKER]
    print(
        f"wrote {args.arch} {args.size} demo model "
        f"({marker['num_parameters'] / 1e6:.1f}M params) to {out}"
    )


if __name__ == "__main__":
    main()
