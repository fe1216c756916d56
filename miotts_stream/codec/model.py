"""The decoding half of MioCodec as one module: tokens + speaker embedding -> waveform.

Data flow (as upstream `MioCodecModel.forward_wave`):
  token ids --FSQ codebook + proj_out--> content (B, T, 768) at 25 Hz
  --wave_prenet (local-window transformer)--> (B, T, 512)
  --wave_conv_upsample (transposed conv, x2)--> 50 Hz
  --wave_prior_net (ResNet, GroupNorm)--> --wave_decoder (transformer, AdaLN-Zero on speaker)-->
  --wave_post_net (ResNet)--> [--wave_upsampler x9 (44.1 kHz codec)-->] --iSTFT head--> samples
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import CodecConfig
from .layers import (
    GroupNorm,
    GroupStats,
    ISTFTHead,
    ResNetStack,
    Transformer,
    UpSamplerBlock,
    float32_region,
    zero_invalid,
)


class FSQCodebook(nn.Module):
    """Finite scalar quantizer, decode side: index -> per-level code in [-1, 1] -> proj_out."""

    def __init__(self, levels: tuple[int, ...], output_dim: int):
        super().__init__()
        level_t = torch.tensor(levels, dtype=torch.long)
        basis = torch.cumprod(torch.tensor((1, *levels[:-1]), dtype=torch.long), dim=0)
        self.register_buffer("levels", level_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.size = math.prod(levels)
        # Upstream skips the projection when the code width already equals the output width.
        self.proj_out = (
            nn.Linear(len(levels), output_dim) if len(levels) != output_dim else nn.Identity()
        )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels
        half = self.levels // 2
        codes = (digits - half).float() / half
        return self.proj_out(codes)


class MioCodecDecoderModel(nn.Module):
    """MioCodec decoder network. Parameter names match upstream checkpoints."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.wave_decoder_dim
        # Upstream names the quantizer `local_quantizer`; only its proj_out is used to decode.
        self.local_quantizer = FSQCodebook(cfg.fsq_levels, cfg.quantizer_output_dim)
        self.wave_prenet = Transformer(cfg.wave_prenet)
        factor = cfg.wave_upsample_factor
        self.wave_conv_upsample = (
            nn.ConvTranspose1d(dim, dim, kernel_size=factor, stride=factor) if factor > 1 else None
        )
        stack = (
            cfg.wave_resnet_num_blocks,
            cfg.wave_resnet_kernel_size,
            cfg.wave_resnet_num_groups,
        )
        self.wave_prior_net = ResNetStack(dim, *stack)
        self.wave_decoder = Transformer(cfg.wave_decoder)
        self.wave_post_net = ResNetStack(dim, *stack)
        self.wave_upsampler = (
            UpSamplerBlock(
                dim,
                cfg.wave_upsampler_factors,
                cfg.wave_upsampler_kernel_sizes,
                cfg.wave_resnet_num_groups,
            )
            if cfg.wave_upsampler_factors
            else None
        )
        self.istft_head = ISTFTHead(dim, cfg.n_fft, cfg.hop_length, cfg.istft_padding)
        self._index_group_norms()

    def _index_group_norms(self) -> None:
        """Number every GroupNorm in execution order and record its frames per token."""
        norms: list[tuple[GroupNorm, int]] = []
        rate = self.cfg.wave_upsample_factor
        for stack in (self.wave_prior_net, self.wave_post_net):
            for block in stack.blocks:
                norms += [(block.norm1, rate), (block.norm2, rate)]
        if self.wave_upsampler is not None:
            up_rate = rate
            for factor, block in zip(
                self.wave_upsampler.factors, self.wave_upsampler.resnet_blocks, strict=True
            ):
                up_rate *= factor
                norms += [(block.norm1, up_rate), (block.norm2, up_rate)]
        for index, (norm, frames_per_token) in enumerate(norms):
            norm.layer_index = index
            norm.frames_per_token = frames_per_token
        self.group_norms = [norm for norm, _ in norms]

    def trunk(
        self,
        tokens: torch.Tensor,
        speaker: torch.Tensor,
        valid: torch.Tensor,
        group_stats: GroupStats | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything up to the iSTFT head, for a padded batch.

        tokens: (B, T) int64; speaker: (B, D) float; valid: (B, T) bool, real tokens.
        Returns the head's input (B, T * head frames per token, C) and its valid mask.
        `group_stats` replaces the GroupNorm statistics (streaming decode).
        """
        cfg = self.cfg
        condition = speaker[:, None, :]
        with float32_region(speaker):
            x = self.local_quantizer(tokens.masked_fill(~valid, 0))
        # The transformers run in the codec's compute precision (under its autocast); the rest
        # in float32 (see `float32_region`).
        x = zero_invalid(self.wave_prenet(x, valid), valid, 1)

        with float32_region(x):
            x = x.float().transpose(1, 2)  # (B, C, T): convolutional layout from here on
            if self.wave_conv_upsample is not None:
                x = self.wave_conv_upsample(x)
                valid = valid.repeat_interleave(cfg.wave_upsample_factor, dim=1)
            # Upstream linearly interpolates to the STFT frame count; for every geometry the
            # config check admits, that is the identity (frames == tokens * upsample factor).
            x = zero_invalid(x, valid, 2)
            x = self.wave_prior_net(x, valid, group_stats)

        x = self.wave_decoder(x.transpose(1, 2), valid, condition)

        with float32_region(x):
            x = zero_invalid(x.float(), valid, 1).transpose(1, 2)
            x = self.wave_post_net(x, valid, group_stats)
            if self.wave_upsampler is not None:
                return self.wave_upsampler(x, valid, group_stats)
            return x.transpose(1, 2), valid

    @property
    def head_frames_per_token(self) -> int:
        factor = self.wave_upsampler.total_factor if self.wave_upsampler is not None else 1
        return self.cfg.wave_upsample_factor * factor

    def forward(
        self,
        tokens: torch.Tensor,
        speaker: torch.Tensor,
        lengths: list[int],
        group_stats: GroupStats | None = None,
    ) -> list[torch.Tensor]:
        """Decode a padded batch.

        tokens: (B, T) int64, padded after each item's length; speaker: (B, D) float;
        lengths: tokens per item. Returns one float32 waveform per item, samples_per_token *
        lengths[i] long.
        """
        cfg = self.cfg
        max_len = tokens.shape[1]
        valid = (
            torch.arange(max_len, device=tokens.device)[None, :]
            < torch.tensor(lengths, device=tokens.device)[:, None]
        )
        frames = [cfg.stft_frames(cfg.audio_length(n)) for n in lengths]
        assert all(f == n * cfg.wave_upsample_factor for f, n in zip(frames, lengths, strict=True))
        x, _ = self.trunk(tokens, speaker, valid, group_stats)
        return self.istft_head(x, [n * self.head_frames_per_token for n in lengths])
