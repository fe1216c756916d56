"""Locate a MioCodec checkpoint and load it strictly.

A checkpoint is a folder with upstream's `config.yaml` and `model.safetensors`, or a Hugging Face
repo id fetched with `huggingface_hub` where a hub is reachable. The file must hold exactly the
tensors the config implies: the decoder's, and the encoder side's (which we check but do not
keep). Missing, unexpected or mis-shaped tensors are a ValueError naming them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from .config import CodecConfig, GlobalEncoderConfig, load_config
from .layers import Transformer
from .model import MioCodecDecoderModel

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Shapes = dict[str, tuple[int, ...]]


def resolve_checkpoint(path_or_repo_id: str | Path) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (config + weights only)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise ValueError(f"checkpoint: {path} has no {name}")
        return path
    if path.exists():
        raise ValueError(f"checkpoint: {path} is not a folder (expected config.yaml + weights)")
    text = str(path_or_repo_id)
    if not _REPO_ID.match(text):
        raise ValueError(f"checkpoint: {text!r} is neither a folder nor a Hugging Face repo id")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(text, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
    except Exception as err:  # network, auth, missing repo: all mean "cannot get it"
        raise ValueError(
            f"checkpoint: cannot fetch {text!r} from the Hugging Face hub: {err}"
        ) from err
    return resolve_checkpoint(local)


# ---- the tensors a checkpoint must hold -----------------------------------------------------


def _transformer_shapes(prefix: str, cfg) -> Shapes:
    with torch.device("meta"):
        module = Transformer(cfg)
    return {f"{prefix}.{k}": tuple(v.shape) for k, v in module.state_dict().items()}


def _global_encoder_shapes(cfg: GlobalEncoderConfig) -> Shapes:
    d, inner, att = cfg.dim, cfg.intermediate_dim, cfg.attention_channels
    shapes: Shapes = {}
    backbone = "global_encoder.backbone"
    if not cfg.skip_embed:
        shapes |= {
            f"{backbone}.embed.weight": (d, cfg.input_channels, 7),
            f"{backbone}.embed.bias": (d,),
        }
    for norm in ("norm", "final_layer_norm"):
        shapes |= {f"{backbone}.{norm}.weight": (d,), f"{backbone}.{norm}.bias": (d,)}
    for i in range(cfg.num_layers):
        block = f"{backbone}.convnext.{i}"
        shapes |= {
            f"{block}.dwconv.weight": (d, 1, 7),
            f"{block}.dwconv.bias": (d,),
            f"{block}.gamma": (d,),
            f"{block}.norm.weight": (d,),
            f"{block}.norm.bias": (d,),
            f"{block}.pwconv1.weight": (inner, d),
            f"{block}.pwconv1.bias": (inner,),
            f"{block}.pwconv2.weight": (d, inner),
            f"{block}.pwconv2.bias": (d,),
        }
    pool = "global_encoder.pooling"
    out = cfg.output_channels
    if cfg.use_attn_pool:
        shapes |= {
            f"{pool}.attn.0.weight": (att, d, 1),
            f"{pool}.attn.0.bias": (att,),
            f"{pool}.attn.2.weight": (d, att, 1),
            f"{pool}.attn.2.bias": (d,),
            f"{pool}.proj.weight": (out, 2 * d),
            f"{pool}.proj.bias": (out,),
        }
    else:
        shapes |= {f"{pool}.2.weight": (out, d), f"{pool}.2.bias": (out,)}
        pool = f"{pool}.3"
        return shapes | {f"{pool}.weight": (out,), f"{pool}.bias": (out,)}
    return shapes | {f"{pool}.norm.weight": (out,), f"{pool}.norm.bias": (out,)}


def encoder_side_shapes(cfg: CodecConfig) -> Shapes:
    """Tensors of the encoding half (WavLM excluded, as in released checkpoints)."""
    shapes = _transformer_shapes("local_encoder", cfg.local_encoder)
    width = cfg.local_encoder.out_dim
    if cfg.downsample_factor > 1 and cfg.use_conv_downsample:
        shapes |= {
            "conv_downsample.weight": (width, width, cfg.downsample_factor),
            "conv_downsample.bias": (width,),
        }
    n_levels = len(cfg.fsq_levels)
    if n_levels != cfg.quantizer_input_dim:
        shapes |= {
            "local_quantizer.proj_in.weight": (n_levels, cfg.quantizer_input_dim),
            "local_quantizer.proj_in.bias": (n_levels,),
        }
    return shapes | _global_encoder_shapes(cfg.global_encoder)


def _weight_norm_name(name: str) -> tuple[str, str] | None:
    """Upstream stores the upsampler's transposed convs with torch's weight_norm parametrization."""
    match = re.match(r"^(wave_upsampler\.upsample_layers\.\d+)\.weight$", name)
    if match:
        base = f"{match.group(1)}.parametrizations.weight"
        return f"{base}.original0", f"{base}.original1"
    return None


def decoder_shapes(model: MioCodecDecoderModel) -> Shapes:
    """Checkpoint names and shapes of the decoder's parameters, as upstream saves them."""
    shapes: Shapes = {}
    for name, tensor in model.state_dict().items():
        split = _weight_norm_name(name)
        if split is None:
            shapes[name] = tuple(tensor.shape)
        else:
            gain, direction = split
            shapes[gain] = (tensor.shape[0], 1, 1)
            shapes[direction] = tuple(tensor.shape)
    return shapes


def expected_shapes(cfg: CodecConfig) -> Shapes:
    """Every tensor name and shape a checkpoint with this config must contain."""
    with torch.device("meta"):
        model = MioCodecDecoderModel(cfg)
    return decoder_shapes(model) | encoder_side_shapes(cfg)


def check_tensor_set(found: Shapes, expected: Shapes, source: str) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{name} {found[name]} (config implies {expected[name]})"
        for name in set(found) & set(expected)
        if tuple(found[name]) != tuple(expected[name])
    )
    problems = []
    for label, names in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            problems.append(f"{len(names)} {label} tensor(s): {shown}")
    if problems:
        raise ValueError(f"checkpoint {source}: " + "; ".join(problems))


def _fold_weight_norm(gain: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """weight = g * v / ||v||, the norm taken per output slice along dim 0 (torch's default)."""
    norm = direction.flatten(1).norm(dim=1).view(-1, *([1] * (direction.dim() - 1)))
    return gain * direction / norm


def load_decoder_model(folder: Path) -> tuple[CodecConfig, MioCodecDecoderModel]:
    """Build the decoder from `config.yaml` and fill it from `model.safetensors`, strictly."""
    cfg = load_config(folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    model = MioCodecDecoderModel(cfg)
    try:
        handle = safe_open(str(weights), framework="pt", device="cpu")
    except Exception as err:
        raise ValueError(f"checkpoint: cannot read {weights}: {err}") from err
    with handle as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
        check_tensor_set(found, expected_shapes(cfg), str(weights))
        state = {}
        for name in model.state_dict():
            split = _weight_norm_name(name)
            if split is None:
                state[name] = f.get_tensor(name).float()
            else:
                gain, direction = (f.get_tensor(n).float() for n in split)
                state[name] = _fold_weight_norm(gain, direction)
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"checkpoint {weights}: tensor {name} holds NaN or infinity")
    model.load_state_dict(state, strict=True)
    return cfg, model
