"""`MioCodecEncoder`: a speaker's 128-d global embedding from a few seconds of their voice.

Upstream's path (`MioCodecModel.encode(waveform, return_global=True)`), step by step:
  waveform at the codec's rate --zero-pad both sides (config.waveform_padding)-->
  --resample to 16 kHz (torchaudio's default sinc)--> WavLM --mean of global_ssl_layers-->
  --global_encoder (ConvNeXt backbone + attentive statistics pooling)--> (128,)
WavLM runs in float32; only the global encoder runs under the codec's autocast (bf16 on CUDA),
as upstream. The global encoder's weights are loaded strictly from the MioCodec checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from miotts_stream.audio.resample import SincResampler, resample

from .checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    _global_encoder_shapes,
    check_tensor_set,
    resolve_checkpoint,
)
from .config import CodecConfig, GlobalEncoderConfig, as_codec_config, load_config
from .decoder import default_device, init_random_weights
from .ssl import RANDOM_SSL_MODEL, SSLFeatures, average_layers

logger = logging.getLogger(__name__)

PREFIX = "global_encoder."


# ---- the global encoder (parameter names as upstream's checkpoints) --------------------------


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, intermediate_dim: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))  # layer scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        y = self.dwconv(x).transpose(1, 2)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


class ConvNeXtBackbone(nn.Module):
    def __init__(self, cfg: GlobalEncoderConfig):
        super().__init__()
        self.embed = (
            nn.Identity()
            if cfg.skip_embed
            else nn.Conv1d(cfg.input_channels, cfg.dim, kernel_size=7, padding=3)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.convnext = nn.ModuleList(
            ConvNeXtBlock(cfg.dim, cfg.intermediate_dim) for _ in range(cfg.num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C_in) -> (B, C, T)
        x = self.embed(x.transpose(1, 2))
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2)).transpose(1, 2)


class AttentiveStatsPool(nn.Module):
    """Attention-weighted mean and standard deviation over time, projected and normalised."""

    def __init__(self, dim: int, out: int, attention_channels: int):
        super().__init__()
        self.attn = nn.Sequential(
            nn.Conv1d(dim, attention_channels, kernel_size=1),
            nn.Tanh(),
            nn.Conv1d(attention_channels, dim, kernel_size=1),
            nn.Softmax(dim=2),
        )
        self.proj = nn.Linear(2 * dim, out)
        self.norm = nn.LayerNorm(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, out)
        weights = self.attn(x)
        mean = (weights * x).sum(dim=2)
        variance = (weights * x * x).sum(dim=2) - mean * mean
        # Upstream clamps the variance so silence or rounding cannot give NaN or infinity.
        std = variance.clamp(min=1e-4, max=1e4).sqrt()
        return self.norm(self.proj(torch.cat([mean, std], dim=1)))


class GlobalEncoder(nn.Module):
    def __init__(self, cfg: GlobalEncoderConfig):
        super().__init__()
        self.backbone = ConvNeXtBackbone(cfg)
        if cfg.use_attn_pool:
            self.pooling = AttentiveStatsPool(cfg.dim, cfg.output_channels, cfg.attention_channels)
        else:
            self.pooling = nn.Sequential(
                nn.AdaptiveAvgPool1d(1),
                nn.Flatten(1),
                nn.Linear(cfg.dim, cfg.output_channels),
                nn.LayerNorm(cfg.output_channels),
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, T, C_in) -> (B, out)
        return self.pooling(self.backbone(features))


def load_global_encoder(folder: Path) -> tuple[CodecConfig, GlobalEncoder]:
    """The global encoder from a MioCodec checkpoint, strictly (names and shapes)."""
    cfg = load_config(folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    module = GlobalEncoder(cfg.global_encoder)
    try:
        handle = safe_open(str(weights), framework="pt", device="cpu")
    except Exception as err:
        raise ValueError(f"checkpoint: cannot read {weights}: {err}") from err
    with handle as f:
        found = {
            name: tuple(f.get_slice(name).get_shape())
            for name in f.keys()  # noqa: SIM118
            if name.startswith(PREFIX)
        }
        check_tensor_set(found, _global_encoder_shapes(cfg.global_encoder), str(weights))
        state = {name[len(PREFIX) :]: f.get_tensor(name).float() for name in found}
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"checkpoint {weights}: tensor {PREFIX}{name} holds NaN or infinity")
    module.load_state_dict(state, strict=True)
    return cfg, module


def _as_waveform(waveform: object, what: str) -> torch.Tensor:
    if isinstance(waveform, torch.Tensor):
        w = waveform.detach().cpu()
    else:
        try:
            w = torch.as_tensor(np.asarray(waveform))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{what}: expected a 1-D float array ({err})") from err
    if not w.dtype.is_floating_point:
        raise ValueError(f"{what}: expected float samples, got dtype {w.dtype}")
    if w.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D (mono) waveform, got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{what}: no samples")
    if not torch.isfinite(w).all():
        raise ValueError(f"{what}: holds NaN or infinite samples")
    return w.float()


class MioCodecEncoder:
    """Waveform -> MioCodec global speaker embedding (float32, global_embedding_dim values)."""

    def __init__(
        self,
        config: CodecConfig,
        global_encoder: GlobalEncoder,
        ssl: SSLFeatures,
        *,
        device: str | torch.device | None = None,
        source: str = "",
        random_weights: bool = False,
    ):
        if ssl.hidden_size != config.global_encoder.input_channels:
            raise ValueError(
                f"ssl model {ssl.source}: hidden size {ssl.hidden_size} does not match the "
                f"codec's global_encoder.input_channels {config.global_encoder.input_channels}"
            )
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.global_encoder = global_encoder.to(self.device).eval().requires_grad_(False)
        self.ssl = ssl.to(self.device)
        self.to_ssl_rate = SincResampler(config.sample_rate, config.ssl_sample_rate)
        self.source = source
        self.random_weights = random_weights or ssl.random_weights
        # bf16 autocast on CUDA for the global encoder only, as upstream (and as decoding).
        self.compute_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        codec_path_or_id: str | Path,
        ssl_model: str | Path | None = "microsoft/wavlm-base-plus",
        device: str | torch.device | None = None,
    ) -> MioCodecEncoder:
        """A MioCodec checkpoint (folder or hub id) and a WavLM in transformers format
        (folder, hub id, or "random" for the built-in random-weight WavLM-base-plus)."""
        folder = resolve_checkpoint(codec_path_or_id)
        cfg, module = load_global_encoder(folder)
        ssl = SSLFeatures.load(ssl_model, max(cfg.global_ssl_layers))
        return cls(cfg, module, ssl, device=device, source=f"{codec_path_or_id} + {ssl.source}")

    @classmethod
    def from_config(
        cls,
        config: str | Path | dict | CodecConfig,
        ssl_model: str | Path | None = RANDOM_SSL_MODEL,
        device: str | torch.device | None = None,
        seed: int = 0,
    ) -> MioCodecEncoder:
        """The real architecture with a seeded random global encoder (demos, tests, benches)."""
        cfg = as_codec_config(config)
        module = GlobalEncoder(cfg.global_encoder)
        init_random_weights(module, seed)
        ssl = SSLFeatures.load(ssl_model, max(cfg.global_ssl_layers))
        label = f"random global encoder (seed {seed}) + {ssl.source}"
        return cls(cfg, module, ssl, device=device, source=label, random_weights=True)

    # ---- facts ------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def embedding_dim(self) -> int:
        return self.config.global_embedding_dim

    def describe(self) -> str:
        weights = " (RANDOM WEIGHTS: not speaker embeddings)" if self.random_weights else ""
        rate = self.sample_rate
        return f"MioCodec speaker encoder {rate} Hz, {self.device}: {self.source}{weights}"

    # ---- embedding --------------------------------------------------------------------------
    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def to_codec_rate(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Resample to the codec's rate (torchaudio's default sinc, as upstream's load_audio)."""
        if sample_rate == self.sample_rate:
            return waveform
        return resample(waveform, sample_rate, self.sample_rate)

    @torch.inference_mode()
    def _embed_same_length(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, samples) at the codec rate, all the same length -> (B, dim) float32."""
        pad = self.config.waveform_padding(clips.shape[1])
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # see MioCodecDecoder.run_batch: per thread
        clips = clips.to(self.device)
        padded = torch.nn.functional.pad(clips, (pad, pad))
        layers = self.ssl(self.to_ssl_rate(padded))
        features = average_layers(layers, self.config.global_ssl_layers)
        with self._autocast():
            embedding = self.global_encoder(features)
        return embedding.float().cpu()

    def embed(self, waveform: object, sample_rate: int) -> torch.Tensor:
        """One mono waveform (1-D floats) at `sample_rate` -> (embedding_dim,) float32."""
        return self.embed_batch([(waveform, sample_rate)])[0]

    def embed_batch(self, clips: Sequence[tuple[object, int]]) -> list[torch.Tensor]:
        """Several (waveform, sample_rate) clips; each result equals `embed` of that clip alone.

        Clips of equal length (at the codec's rate) share one forward. Clips of different
        lengths are not padded together: WavLM's first conv layer normalises over the whole
        clip and the pooling spans every frame, so padding would change the embedding.
        """
        if not clips:
            raise ValueError("clips: empty batch")
        waves = []
        for i, (waveform, rate) in enumerate(clips):
            if int(rate) <= 0:
                raise ValueError(f"clips[{i}].sample_rate: must be positive, got {rate}")
            waves.append(self.to_codec_rate(_as_waveform(waveform, f"clips[{i}]"), int(rate)))
        results: list[torch.Tensor | None] = [None] * len(waves)
        by_length: dict[int, list[int]] = {}
        for i, w in enumerate(waves):
            by_length.setdefault(w.numel(), []).append(i)
        for indices in by_length.values():
            out = self._embed_same_length(torch.stack([waves[i] for i in indices]))
            for row, i in enumerate(indices):
                results[i] = out[row].contiguous()
        return results  # type: ignore[return-value]
