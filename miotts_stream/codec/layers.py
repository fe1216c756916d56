"""Building blocks of MioCodec's decoder, written for batched, masked and windowed inference.

Attribute names follow the upstream checkpoint's tensor names (`wq`, `attention_norm`,
`condition_proj.1`, ...), so a released `model.safetensors` loads without renaming.

Every block takes a `valid` mask (B, T) of real (non-padding) positions. Positions outside it
are kept at zero before any operation that mixes time steps (convolutions, attention,
GroupNorm statistics), which is what makes a padded batch element equal to its unpadded decode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from .config import TransformerConfig

# A GroupNorm statistics provider: given the layer's index, its (B, C, T) input, the valid mask,
# the layer's frames per token and its group count, returns the per-item, per-group (mean, var),
# each (B, G). The default uses the valid frames; streaming decode substitutes its own.
GroupStats = Callable[
    [int, torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]
]


def float32_region(x: torch.Tensor) -> AbstractContextManager:
    """Autocast off: what runs inside stays in float32 whatever the codec's compute precision.

    Reduced precision (bf16 on CPU or CUDA) is for the two transformers, which hold 90% of the
    decoder's weights and matrix products. The convolutional stacks, their GroupNorms and the
    iSTFT head are cheap and sensitive: in bf16 they double the decode's error (measured on
    CPU against float32: 0.42 dB LSD with everything in bf16, 0.20 with the transformers
    alone, for 9% of the speed)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def zero_invalid(x: torch.Tensor, valid: torch.Tensor, time_dim: int) -> torch.Tensor:
    """Zero the padding positions of x; `valid` is (B, T) along `time_dim`."""
    shape = [1] * x.dim()
    shape[0], shape[time_dim] = valid.shape
    return x.masked_fill(~valid.view(shape), 0.0)


# ---- rotary position embedding -----------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """RoPE on adjacent channel pairs (Llama convention), computed for any length.

    Upstream precomputes a 1024-position table; we build the (cos, sin) table for the length at
    hand and cache the largest one, so there is no length cap.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cache.get(device)
        if cached is None or cached[0].shape[0] < length:
            size = max(length, 1024)
            exponents = torch.arange(0, self.head_dim, 2)[: self.head_dim // 2].float()
            inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
            angles = torch.outer(torch.arange(size, dtype=torch.float32), inv_freq)
            cached = (angles.cos().to(device), angles.sin().to(device))
            self._cache[device] = cached
        return cached[0][:length], cached[1][:length]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H, D) -> same, rotated by position."""
        cos, sin = self._table(x.shape[1], x.device)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).type_as(x)


# ---- attention and transformer --------------------------------------------------------------


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_per_side: int | None,
    valid: torch.Tensor,
    block: int = 256,
) -> torch.Tensor:
    """Banded self-attention, |i - j| <= window_per_side, over valid keys.

    q, k, v: (B, H, T, D). Queries are processed in blocks against the keys their band can
    reach, so memory grows linearly with T (minutes of audio), not quadratically.
    """
    _, _, length, _ = q.shape
    if window_per_side is None:
        window_per_side = length
    outputs = []
    positions = torch.arange(length, device=q.device)
    for start in range(0, length, block):
        stop = min(start + block, length)
        k_lo, k_hi = max(0, start - window_per_side), min(length, stop + window_per_side)
        rel = positions[start:stop, None] - positions[None, k_lo:k_hi]
        band = rel.abs() <= window_per_side  # (Tq, Tk)
        # Padding keys are masked; a padding query keeps its own position so that no row of
        # the softmax is empty (an empty row would give NaN, which would leak through 0 * NaN).
        own = rel == 0
        key_ok = valid[:, None, None, k_lo:k_hi]  # (B, 1, 1, Tk)
        mask = band[None, None] & (key_ok | own[None, None])
        outputs.append(
            F.scaled_dot_product_attention(
                q[:, :, start:stop], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi], attn_mask=mask
            )
        )
    return torch.cat(outputs, dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.dim, inner, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, inner, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, inner, bias=cfg.qkv_bias)
        self.wo = nn.Linear(inner, cfg.dim, bias=cfg.proj_bias)
        self.window_per_side = None if cfg.window_size is None else cfg.window_size // 2
        if cfg.causal:
            raise ValueError("config: causal transformers are not part of MioCodec's decoder")

    def forward(
        self, x: torch.Tensor, rope: RotaryEmbedding | None, valid: torch.Tensor
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        shape = (batch, length, self.n_heads, self.head_dim)
        q, k, v = self.wq(x).view(shape), self.wk(x).view(shape), self.wv(x).view(shape)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = local_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.window_per_side, valid
        )
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        hidden = cfg.ffn_hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class AdaLNZero(nn.Module):
    """LayerNorm without affine, modulated by the speaker embedding (shift, scale[, gate])."""

    def __init__(self, dim: int, condition_dim: int, eps: float, with_gate: bool):
        super().__init__()
        self.dim, self.eps, self.with_gate = dim, eps, with_gate
        # Index 1 to match upstream's nn.Sequential(SiLU, Linear) tensor names.
        self.condition_proj = nn.Sequential(
            nn.SiLU(), nn.Linear(condition_dim, (3 if with_gate else 2) * dim)
        )

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        params = self.condition_proj(condition)  # (B, 1, k*dim)
        normed = F.layer_norm(x, (self.dim,), eps=self.eps)
        if self.with_gate:
            shift, scale, gate = params.chunk(3, dim=-1)
        else:
            (shift, scale), gate = params.chunk(2, dim=-1), None
        return normed * (1 + scale) + shift, gate


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.adaptive = cfg.use_adaln_zero
        if self.adaptive:
            assert cfg.adanorm_condition_dim is not None
            self.attention_norm = AdaLNZero(cfg.dim, cfg.adanorm_condition_dim, cfg.norm_eps, True)
            self.ffn_norm = AdaLNZero(cfg.dim, cfg.adanorm_condition_dim, cfg.norm_eps, True)
        else:
            self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
            self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding | None,
        valid: torch.Tensor,
        condition: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.adaptive:
            normed, gate = self.attention_norm(x, condition)
            x = x + gate * self.attention(normed, rope, valid)
            normed, gate = self.ffn_norm(x, condition)
            return x + gate * self.feed_forward(normed)
        x = x + self.attention(self.attention_norm(x), rope, valid)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Upstream's local-window transformer (pre-norm, SwiGLU, RoPE, optional AdaLN-Zero)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.Linear(cfg.input_dim, cfg.dim) if cfg.input_dim else nn.Identity()
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        if cfg.use_adaln_zero:
            assert cfg.adanorm_condition_dim is not None
            self.norm = AdaLNZero(cfg.dim, cfg.adanorm_condition_dim, cfg.norm_eps, False)
        else:
            self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output_proj = nn.Linear(cfg.dim, cfg.output_dim) if cfg.output_dim else nn.Identity()
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.use_rope else None

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, T, input_dim), valid: (B, T) bool, condition: (B, 1, cond_dim) or None."""
        x = self.input_proj(x)
        for layer in self.layers:
            x = layer(x, self.rope, valid, condition)
        x = self.norm(x, condition)[0] if self.cfg.use_adaln_zero else self.norm(x)
        return self.output_proj(x)


# ---- convolutional blocks ---------------------------------------------------------------------


def masked_group_stats(
    x: torch.Tensor, valid: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item, per-group mean and biased variance of x (B, C, T) over valid frames."""
    batch, channels, _ = x.shape
    grouped = x.float().reshape(batch, groups, channels // groups, -1)
    weight = valid[:, None, None, :].to(grouped.dtype)
    count = weight.sum(dim=(2, 3)) * (channels // groups)  # (B, 1)
    mean = (grouped * weight).sum(dim=(2, 3)) / count
    centered = (grouped - mean[..., None, None]) * weight
    var = centered.square().sum(dim=(2, 3)) / count
    return mean, var


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics come from the valid frames or from a streaming provider."""

    layer_index: int = -1  # set by the decoder: which streaming accumulator this layer uses
    frames_per_token: int = 1

    def forward_masked(
        self, x: torch.Tensor, valid: torch.Tensor, stats: GroupStats | None
    ) -> torch.Tensor:
        if stats is None:
            mean, var = masked_group_stats(x, valid, self.num_groups)
        else:
            mean, var = stats(self.layer_index, x, valid, self.frames_per_token, self.num_groups)
        batch, channels, length = x.shape
        grouped = x.float().reshape(batch, self.num_groups, -1, length)
        inv_std = torch.rsqrt(var + self.eps)[..., None, None]
        normed = ((grouped - mean[..., None, None]) * inv_std).reshape(batch, channels, length)
        return (normed * self.weight[None, :, None] + self.bias[None, :, None]).to(x.dtype)


class ResNetBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv -> GroupNorm -> SiLU -> Conv, plus the residual."""

    def __init__(self, channels: int, kernel_size: int, num_groups: int):
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.norm1 = GroupNorm(num_groups, channels, eps=1e-6)
        self.conv1 = nn.Conv1d(channels, channels, kernel_size, padding=padding)
        self.norm2 = GroupNorm(num_groups, channels, eps=1e-6)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size, padding=padding)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, stats: GroupStats | None
    ) -> torch.Tensor:
        h = zero_invalid(F.silu(self.norm1.forward_masked(x, valid, stats)), valid, 2)
        h = self.conv1(h)
        h = zero_invalid(F.silu(self.norm2.forward_masked(h, valid, stats)), valid, 2)
        return zero_invalid(x + self.conv2(h), valid, 2)


class ResNetStack(nn.Module):
    def __init__(self, channels: int, num_blocks: int, kernel_size: int, num_groups: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResNetBlock(channels, kernel_size, num_groups) for _ in range(num_blocks)
        )

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, stats: GroupStats | None
    ) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, valid, stats)
        return x


class SnakeBeta(nn.Module):
    """x + sin^2(a x) / b with log-scale a, b per channel (channels on dim 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.exp()[None, :, None]
        beta = self.beta.exp()[None, :, None]
        return x + torch.sin(alpha * x).pow(2) / (beta + 1e-9)


class UpSamplerBlock(nn.Module):
    """x9 (3 x 3) transposed-conv upsampler with SnakeBeta and ResNet blocks (44.1 kHz codec).

    Checkpoints store the transposed convolutions weight-normalised
    (`parametrizations.weight.original0/1`); the loader folds them into plain weights.
    """

    def __init__(
        self, channels: int, factors: tuple[int, ...], kernels: tuple[int, ...], num_groups: int
    ):
        super().__init__()
        self.factors = factors
        self.upsample_layers = nn.ModuleList()
        self.snake_activations = nn.ModuleList()
        self.resnet_blocks = nn.ModuleList()
        for i, (kernel, factor) in enumerate(zip(kernels, factors, strict=True)):
            c_in, c_out = channels // 2**i, channels // 2 ** (i + 1)
            self.upsample_layers.append(
                nn.ConvTranspose1d(
                    c_in, c_out, kernel, stride=factor, padding=(kernel - factor) // 2
                )
            )
            self.snake_activations.append(SnakeBeta(c_out))
            self.resnet_blocks.append(ResNetBlock(c_out, 3, min(num_groups, c_out)))
        final = channels // 2 ** len(factors)
        self.out_proj = nn.Linear(final, channels)
        self.out_snake = SnakeBeta(channels)

    @property
    def total_factor(self) -> int:
        return math.prod(self.factors)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, stats: GroupStats | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, L) -> ((B, L * factor, C), valid mask at the new rate)."""
        for up, snake, block, factor in zip(
            self.upsample_layers,
            self.snake_activations,
            self.resnet_blocks,
            self.factors,
            strict=True,
        ):
            x = zero_invalid(x, valid, 2)
            valid = valid.repeat_interleave(factor, dim=1)
            x = block(snake(up(x)), valid, stats)
        x = self.out_snake(self.out_proj(x.transpose(1, 2)).transpose(1, 2))
        return x.transpose(1, 2), valid


# ---- iSTFT head --------------------------------------------------------------------------------


class ISTFTHead(nn.Module):
    """Predicts log-magnitude and phase per frame and overlap-adds them into a waveform.

    'same' padding as upstream: the output of T frames is T * hop samples, trimmed by
    (n_fft - hop) / 2 at both ends and divided by the summed squared Hann window.
    """

    def __init__(self, dim: int, n_fft: int, hop_length: int, padding: str):
        super().__init__()
        self.n_fft, self.hop, self.padding = n_fft, hop_length, padding
        self.out = nn.Linear(dim, n_fft + 2)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self._envelopes: dict[tuple[int, torch.device], torch.Tensor] = {}

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> complex (B, n_fft/2 + 1, T), computed in float32."""
        with float32_region(x):
            log_mag, phase = self.out(x.float()).transpose(1, 2).chunk(2, dim=1)
        magnitude = log_mag.exp().clamp(max=1e2)
        return torch.complex(magnitude * phase.cos(), magnitude * phase.sin())

    def _overlap_add(self, frames: torch.Tensor, count: int) -> torch.Tensor:
        """frames: (B, n_fft, count) -> (B, (count - 1) * hop + n_fft)."""
        length = (count - 1) * self.hop + self.n_fft
        return F.fold(
            frames, output_size=(1, length), kernel_size=(1, self.n_fft), stride=(1, self.hop)
        )[:, 0, 0, :]

    def _envelope(self, count: int, device: torch.device) -> torch.Tensor:
        key = (count, device)
        if key not in self._envelopes:
            window_sq = self.window.to(device).square()[None, :, None].expand(1, -1, count)
            self._envelopes[key] = self._overlap_add(window_sq.contiguous(), count)[0]
        return self._envelopes[key]

    def forward(self, x: torch.Tensor, frame_counts: list[int]) -> list[torch.Tensor]:
        """x: (B, T, dim) -> one waveform per item, of frame_counts[i] * hop samples."""
        spec = self.spectrum(x)
        if self.padding == "center":
            return [
                torch.istft(
                    spec[i, :, :n], self.n_fft, self.hop, self.n_fft, self.window, center=True
                )
                for i, n in enumerate(frame_counts)
            ]
        frames = torch.fft.irfft(spec, self.n_fft, dim=1) * self.window[None, :, None]
        trim = (self.n_fft - self.hop) // 2
        waves = []
        for i, count in enumerate(frame_counts):
            summed = self._overlap_add(frames[i : i + 1, :, :count], count)[0]
            envelope = self._envelope(count, x.device)
            waves.append((summed / envelope)[trim : trim + count * self.hop])
        return waves

    def forward_ranges(
        self,
        x: torch.Tensor,
        frame_counts: torch.Tensor,
        first_frame: torch.Tensor,
        sample_begin: torch.Tensor,
        width: int,
        frames: int,
    ) -> torch.Tensor:
        """Samples [sample_begin[i], sample_begin[i] + width) of each item's waveform, computing
        only the `frames` frames from `first_frame[i]` on (see `frames_for_range`).

        Streaming keeps a short chunk of a long window; the head is a per-frame projection plus
        an overlap-add, so the frames that do not reach the chunk need not be computed at all.
        x: (B, T, dim); frame_counts, first_frame, sample_begin: (B,) int64 on x's device.
        Equals slicing `forward`'s waveforms ("same" padding only). Positions past an item's
        own length come out as zeros.
        """
        if self.padding != "same":
            raise ValueError("forward_ranges: only the 'same' iSTFT padding is supported")
        _batch, length, dim = x.shape
        index = first_frame[:, None] + torch.arange(frames, device=x.device)[None, :]
        frame_ok = (index >= 0) & (index < frame_counts[:, None])
        gathered = x.gather(1, index.clamp(0, length - 1)[..., None].expand(-1, -1, dim))
        spec = self.spectrum(gathered)
        mask = frame_ok[:, None, :].float()
        window = self.window.to(x.device)[None, :, None]
        summed = self._overlap_add(torch.fft.irfft(spec, self.n_fft, dim=1) * window * mask, frames)
        envelope = self._overlap_add(window.square() * mask, frames)
        trim = (self.n_fft - self.hop) // 2
        local = (sample_begin + trim - first_frame * self.hop)[:, None] + torch.arange(
            width, device=x.device
        )[None, :]
        local = local.clamp(0, summed.shape[1] - 1)
        return summed.gather(1, local) / envelope.gather(1, local).clamp_min(1e-11)

    def frames_for_range(self, sample_begin: int, width: int) -> tuple[int, int]:
        """(first frame, frame count) whose overlap-add covers samples [begin, begin + width)."""
        trim = (self.n_fft - self.hop) // 2
        first = (sample_begin + trim - self.n_fft) // self.hop + 1
        last = (sample_begin + trim + width - 1) // self.hop
        return first, last - first + 1
