"""`MioCodecDecoder`: the public face of the codec package, the model.

Loads a released MioCodec checkpoint (or builds one with random weights for demos, tests and
benchmarks), validates inputs, picks device and precision, and decodes single utterances or
batches of utterances. It keeps no state about streams: `stream` and `batcher` hand out a
`StreamBatcher` over this model (`codec/batcher.py`), which owns the streams' device state.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from miotts_stream.speech_codes import TOKEN_RATE_HZ

from .batcher import StreamBatcher
from .checkpoint import load_decoder_model, resolve_checkpoint
from .config import CodecConfig, as_codec_config
from .layers import GroupStats, Transformer
from .model import MioCodecDecoderModel
from .placement import SUPPORTED_DTYPES, Placement, default_device
from .streaming import PlaybackClock, StreamingOptions, Timer, TokenStreamDecoder
from .tokens import check_tokens
from .voices import check_embedding

logger = logging.getLogger(__name__)

# Configurations of the released codecs (upstream config/model/25hz_wave*.yaml), for building
# full-size decoders with random weights: the service's built-in default, tests, benchmarks.
RELEASED_CONFIGS = {
    "24khz": Path(__file__).with_name("configs") / "MioCodec-25Hz-24kHz.yaml",
    "44khz": Path(__file__).with_name("configs") / "MioCodec-25Hz-44.1kHz-v2.yaml",
}


def _unit_gain_parameters(model: nn.Module) -> set[str]:
    """Names of the gains that sit at 1 in a trained (or freshly built) network: every
    GroupNorm's weight (ResNet blocks of wave_prior_net, wave_post_net and the upsampler) and
    the weight of each transformer's final LayerNorm (an AdaLN final norm has no gain)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.GroupNorm):
            names.add(f"{module_name}.weight")
        elif isinstance(module, Transformer) and isinstance(module.norm, nn.LayerNorm):
            names.add(f"{module_name}.norm.weight")
    return names


def init_random_weights(model: nn.Module, seed: int) -> None:
    """Seeded random weights with the statistics of the shared MioCodec test checkpoints.

    Those checkpoints (made with upstream's code) draw
    - matrices and convolution kernels ~ N(0, 1/fan_in) (fan_in: all of a tensor's dimensions
      after the first);
    - every GroupNorm gain and each transformer's final LayerNorm gain ~ 1 + N(0, 0.05^2);
    - everything else that is 1-D ~ N(0, 0.05^2): biases (GroupNorm and LayerNorm biases
      included), the transformer blocks' pre-norm LayerNorm gains, SnakeBeta's log-scale
      alpha and beta.
    Small pre-norm gains keep each block's residual update small, so the random decoder stays
    local in time, as a trained codec is. GroupNorm gains near 1 keep the utterance-wide
    statistics as influential as in a trained codec (streaming fidelity depends on them).
    Parameters draw their noise in sorted name order, one tensor each, so a seed's draws do
    not depend on the classification.
    """
    unit_gains = _unit_gain_parameters(model)
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=gen)
        with torch.no_grad():
            if param.dim() >= 2:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif name in unit_gains:
                param.copy_(1.0 + 0.05 * noise)
            else:
                param.copy_(0.05 * noise)


def store_matrices_in(model: MioCodecDecoderModel, dtype: torch.dtype) -> None:
    """Keep the transformers' linear layers (the weights autocast computes in `dtype`) stored
    in `dtype`. Autocast would otherwise convert every one of them again at every step (its
    cache of converted weights holds only weights that need gradients): 28% of a small
    streaming step on CPU. The rest of the model stays float32 (`layers.float32_region`)."""
    for transformer in (model.wave_prenet, model.wave_decoder):
        for module in transformer.modules():
            if isinstance(module, nn.Linear):
                module.to(dtype)


class MioCodecDecoder:
    """MioCodec's decoder: 25 Hz speech tokens + a speaker embedding -> waveform.

    With a reduced compute precision (bf16, fp16), the model's transformers are converted to
    it in place (`store_matrices_in`): give each decoder its own model."""

    def __init__(
        self,
        model: MioCodecDecoderModel,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        source: str = "",
        random_weights: bool = False,
    ):
        device = torch.device(device) if device is not None else default_device()
        # On CUDA, bf16 autocast as upstream; on CPU, float32 unless asked otherwise.
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype: unsupported compute dtype {dtype}")
        self.placement = Placement(device, dtype)
        if device.type == "cuda" and dtype == torch.float32:
            # float32 weights and activations, matrix products on TF32 units: near-fp32 output
            # at about bf16's speed for this decoder's sizes.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = model.to(self.device).eval().requires_grad_(False)
        if dtype != torch.float32:
            store_matrices_in(model, dtype)
        self.config: CodecConfig = model.cfg
        self.source = source
        self.random_weights = random_weights

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> MioCodecDecoder:
        """Load a checkpoint folder (config.yaml + model.safetensors) or a hub repo id."""
        folder = resolve_checkpoint(path_or_repo_id)
        _, model = load_decoder_model(folder)
        return cls(model, device=device, dtype=dtype, source=str(path_or_repo_id))

    @classmethod
    def from_config(
        cls,
        config: str | Path | dict | CodecConfig,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> MioCodecDecoder:
        """The real architecture with seeded random weights (demos, tests, benchmarks)."""
        cfg = as_codec_config(config)
        model = MioCodecDecoderModel(cfg)
        init_random_weights(model, seed)
        origin = config if isinstance(config, (str, Path)) else "a config"
        label = f"random weights (seed {seed}) from {origin}"
        return cls(model, device=device, dtype=dtype, source=label, random_weights=True)

    # ---- facts ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.placement.dtype

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def samples_per_token(self) -> int:
        return self.config.samples_per_token

    @property
    def token_rate(self) -> int:
        return TOKEN_RATE_HZ

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def embedding_dim(self) -> int:
        return self.config.global_embedding_dim

    def validate_tokens(self, tokens: object, what: str = "tokens") -> torch.Tensor:
        return check_tokens(tokens, self.codebook_size, what)

    def validate_embedding(self, embedding: object, what: str = "global_embedding") -> torch.Tensor:
        return check_embedding(embedding, self.embedding_dim, what)

    # ---- decoding ---------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager:
        """The compute precision's autocast context (none for float32)."""
        return self.placement.autocast()

    @torch.inference_mode()
    def run_batch(
        self,
        tokens: Sequence[torch.Tensor],
        embeddings: Sequence[torch.Tensor] | torch.Tensor,
        group_stats: GroupStats | None = None,
        lengths: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """One forward over already-validated inputs; float32 waveforms on the CPU.

        `lengths` gives each item's real token count when `tokens` are already padded.
        """
        lengths = [int(t.numel()) for t in tokens] if lengths is None else list(lengths)
        padded = torch.zeros(len(tokens), max(int(t.numel()) for t in tokens), dtype=torch.long)
        for i, t in enumerate(tokens):
            padded[i, : t.numel()] = t
        speaker = (
            embeddings if isinstance(embeddings, torch.Tensor) else torch.stack(list(embeddings))
        )
        self.placement.prepare_thread()
        padded = padded.to(self.device, non_blocking=True)
        speaker = speaker.to(self.device, dtype=torch.float32, non_blocking=True)
        with self.autocast():
            waves = self.model(padded, speaker, lengths, group_stats)
        return [w.float().cpu() for w in waves]

    def decode(self, tokens: object, global_embedding: object) -> torch.Tensor:
        """Decode one utterance: samples_per_token * len(tokens) float32 samples (CPU)."""
        t = self.validate_tokens(tokens)
        e = self.validate_embedding(global_embedding)
        return self.run_batch([t], [e])[0]

    def decode_batch(
        self, tokens: Sequence[object], global_embeddings: Sequence[object] | torch.Tensor
    ) -> list[torch.Tensor]:
        """Decode several utterances (any lengths) in one forward; each equals `decode` alone."""
        if len(tokens) == 0:
            raise ValueError("tokens: empty batch")
        if len(global_embeddings) != len(tokens):
            raise ValueError(
                f"global_embeddings: {len(global_embeddings)} embeddings "
                f"for {len(tokens)} utterances"
            )
        ts = [self.validate_tokens(t, f"tokens[{i}]") for i, t in enumerate(tokens)]
        es = [
            self.validate_embedding(e, f"global_embeddings[{i}]")
            for i, e in enumerate(global_embeddings)
        ]
        return self.run_batch(ts, es)

    def stream(
        self,
        global_embedding: object,
        options: StreamingOptions | None = None,
        clock: PlaybackClock | None = None,
        timer: Timer = time.perf_counter,
    ) -> TokenStreamDecoder:
        """A streaming decoder for one utterance (see `miotts_stream.codec.streaming`).

        `clock` returns how many seconds of audio the client has buffered; with it, planning
        follows the client: the first window grows while the LLM is fast, later chunks are
        planned just in time, and a chunk goes out early when playback would otherwise run
        dry. `timer` is the time those plans read (a simulated one in benchmarks).
        The stream has a batcher of its own (one device slot, eager steps); to decode several
        streams in shared steps (and, on CUDA, replay graphs), open them from one `batcher()`.
        """
        batcher = self.batcher(cuda_graphs=False, capacity=2)
        return batcher.open(global_embedding, options, clock, timer)

    def batcher(self, *, cuda_graphs: bool | None = None, capacity: int = 64) -> StreamBatcher:
        """A new `StreamBatcher` over this model: it opens streams and decodes their windows
        batched across streams. `cuda_graphs` (default: on CUDA) replays the step as captured
        graphs; `capacity` is the device slots allocated at first (they grow as needed)."""
        return StreamBatcher(self.model, self.placement, cuda_graphs=cuda_graphs, capacity=capacity)

    def describe(self) -> str:
        weights = "RANDOM WEIGHTS (not a trained codec)" if self.random_weights else self.source
        return (
            f"MioCodec decoder {self.sample_rate} Hz, {self.samples_per_token} samples/token, "
            f"{self.device} {str(self.compute_dtype).replace('torch.', '')}, {weights}"
        )
