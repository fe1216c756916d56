"""MioCodec checkpoint configuration: read upstream's `config.yaml` and check it is decodable.

Upstream stores a jsonargparse tree (`model.init_args.<component>.init_args...`). We read only
the sizes the decoding path needs, plus the encoder-side sizes needed to know which tensors a
checkpoint must contain, and refuse anything inconsistent with a ValueError that names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Geometry of the SSL front ends upstream names in `ssl_feature_extractor`. Only their
# convolutional feature extractor matters to us: upstream derives the decoded audio length from
# the minimum input length that yields a given number of SSL frames.
# (kernel_size, stride) per conv layer, and the SSL model's own sample rate.
SSL_FRONTENDS: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {
    name: (16000, ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)))
    for name in ("wavlm_base_plus", "wavlm_base", "wavlm_large", "hubert_base", "wav2vec2_base")
}


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of upstream's `miocodec.module.transformer.Transformer` (defaults as upstream)."""

    dim: int
    n_layers: int
    n_heads: int
    window_size: int | None = None
    rope_theta: float = 500000.0
    use_rope: bool = True
    input_dim: int | None = None
    output_dim: int | None = None
    adanorm_condition_dim: int | None = None
    use_adaln_zero: bool = False
    qkv_bias: bool = False
    proj_bias: bool = False
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    causal: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # Llama's rule: 2/3 of 4*dim, optionally scaled, rounded up to a multiple.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def out_dim(self) -> int:
        return self.output_dim if self.output_dim is not None else self.dim


@dataclass(frozen=True)
class GlobalEncoderConfig:
    input_channels: int
    output_channels: int
    dim: int
    intermediate_dim: int
    num_layers: int
    attention_channels: int = 128
    skip_embed: bool = False
    use_attn_pool: bool = True


@dataclass(frozen=True)
class CodecConfig:
    """Everything needed to build MioCodec's decoder and to validate a checkpoint."""

    sample_rate: int
    n_fft: int
    hop_length: int
    istft_padding: str
    downsample_factor: int
    use_conv_downsample: bool
    wave_upsample_factor: int
    wave_interpolation_mode: str
    wave_decoder_dim: int
    wave_resnet_num_blocks: int
    wave_resnet_kernel_size: int
    wave_resnet_num_groups: int
    wave_upsampler_factors: tuple[int, ...]
    wave_upsampler_kernel_sizes: tuple[int, ...]
    fsq_levels: tuple[int, ...]
    quantizer_input_dim: int
    quantizer_output_dim: int
    wave_prenet: TransformerConfig
    wave_decoder: TransformerConfig
    local_encoder: TransformerConfig
    global_encoder: GlobalEncoderConfig
    feature_decoder: TransformerConfig | None
    ssl_model_name: str
    ssl_sample_rate: int
    ssl_conv_layers: tuple[tuple[int, int], ...]
    # 1-based SSL layers whose outputs are averaged into the global (speaker) branch's input.
    global_ssl_layers: tuple[int, ...] = (1, 2)

    # ---- derived facts -------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    @property
    def global_embedding_dim(self) -> int:
        return self.global_encoder.output_channels

    @property
    def upsampler_factor(self) -> int:
        return math.prod(self.wave_upsampler_factors) if self.wave_upsampler_factors else 1

    def audio_length(self, num_tokens: int) -> int:
        """Upstream's `_calculate_original_audio_length`: samples spanned by `num_tokens`."""
        length = num_tokens * self.downsample_factor
        for kernel, stride in reversed(self.ssl_conv_layers):
            length = (length - 1) * stride + kernel
        return math.ceil(length / self.ssl_sample_rate * self.sample_rate)

    @property
    def ssl_hop(self) -> int:
        """Input samples (at the SSL rate) per SSL frame: the product of the conv strides."""
        return math.prod(stride for _, stride in self.ssl_conv_layers)

    def ssl_min_input_length(self, frames: int) -> int:
        """Fewest samples at the SSL rate for which the conv stack yields `frames` frames."""
        length = frames
        for kernel, stride in reversed(self.ssl_conv_layers):
            length = (length - 1) * stride + kernel
        return length

    def waveform_padding(self, num_samples: int) -> int:
        """Upstream's `_calculate_waveform_padding`: zeros added on each side before encoding.

        Enough to give ceil(samples / hop) SSL frames; the arithmetic (floats, in upstream's
        order) is kept as is so that the rounding, and so the padding, is the same.
        """
        at_ssl_rate = num_samples / self.sample_rate * self.ssl_sample_rate
        frames = math.ceil(at_ssl_rate / self.ssl_hop)
        required = self.ssl_min_input_length(frames) / self.ssl_sample_rate * self.sample_rate
        return math.ceil((required - num_samples) / 2)

    def stft_frames(self, audio_length: int) -> int:
        """Upstream's `_calculate_target_stft_length`: frames before the optional upsampler."""
        frames = audio_length // self.hop_length
        if self.istft_padding == "center":
            frames += 1
        return frames // self.upsampler_factor

    def frames_per_token(self) -> int:
        """Frames per token at the wave decoder's rate (after the conv upsample)."""
        return self.wave_upsample_factor

    @property
    def samples_per_token(self) -> int:
        """Output samples per token, checked against upstream's length rule at load."""
        return self.wave_upsample_factor * self.upsampler_factor * self.hop_length


# ---- parsing -------------------------------------------------------------------------------


def _section(tree: dict[str, Any], key: str, *, required: bool = True) -> dict[str, Any] | None:
    value = tree.get(key)
    if value is None:
        if required:
            raise ValueError(f"config: missing 'model.init_args.{key}'")
        return None
    if not isinstance(value, dict):
        raise ValueError(f"config: 'model.init_args.{key}' must be a mapping")
    args = value.get("init_args", value)
    if not isinstance(args, dict):
        raise ValueError(f"config: 'model.init_args.{key}.init_args' must be a mapping")
    return args


def _int(args: dict[str, Any], key: str, where: str, default: Any = ..., minimum: int = 1) -> int:
    if key not in args or args[key] is None:
        if default is ...:
            raise ValueError(f"config: missing '{where}.{key}'")
        return default
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config: '{where}.{key}' must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"config: '{where}.{key}' must be >= {minimum}, got {value}")
    return value


def _transformer(args: dict[str, Any], where: str) -> TransformerConfig:
    cfg = TransformerConfig(
        dim=_int(args, "dim", where),
        n_layers=_int(args, "n_layers", where, minimum=0),
        n_heads=_int(args, "n_heads", where),
        window_size=_int(args, "window_size", where, default=None),
        rope_theta=float(args.get("rope_theta", 500000.0)),
        use_rope=bool(args.get("use_rope", True)),
        input_dim=_int(args, "input_dim", where, default=None),
        output_dim=_int(args, "output_dim", where, default=None),
        adanorm_condition_dim=_int(args, "adanorm_condition_dim", where, default=None),
        use_adaln_zero=bool(args.get("use_adaln_zero", False)),
        qkv_bias=bool(args.get("qkv_bias", False)),
        proj_bias=bool(args.get("proj_bias", False)),
        multiple_of=_int(args, "multiple_of", where, default=256),
        ffn_dim_multiplier=args.get("ffn_dim_multiplier"),
        norm_eps=float(args.get("norm_eps", 1e-5)),
        causal=bool(args.get("causal", False)),
    )
    if cfg.dim % cfg.n_heads:
        raise ValueError(f"config: '{where}.dim' ({cfg.dim}) is not divisible by n_heads")
    if cfg.head_dim % 2 and cfg.use_rope:
        raise ValueError(f"config: '{where}' head dim {cfg.head_dim} must be even for RoPE")
    if cfg.window_size is not None and cfg.window_size % 2 == 0:
        raise ValueError(f"config: '{where}.window_size' must be odd, got {cfg.window_size}")
    if cfg.use_adaln_zero and cfg.adanorm_condition_dim is None:
        raise ValueError(f"config: '{where}.adanorm_condition_dim' is required with AdaLN-Zero")
    return cfg


def parse_config(raw: Any) -> CodecConfig:
    """Build a CodecConfig from the parsed YAML tree of an upstream `config.yaml`."""
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError("config: expected a mapping with a 'model' section (upstream format)")
    model = raw["model"]
    tree = model.get("init_args", model)
    if not isinstance(tree, dict):
        raise ValueError("config: 'model.init_args' must be a mapping")
    top = tree.get("config")
    if not isinstance(top, dict):
        raise ValueError("config: missing 'model.init_args.config'")
    where = "model.init_args.config"

    if not top.get("use_wave_decoder", False):
        raise ValueError(
            f"config: '{where}.use_wave_decoder' is not true: only the wave-decoder MioCodec "
            "(iSTFT head) is supported, not the mel-decoder variant"
        )
    istft_padding = top.get("istft_padding", "same")
    if istft_padding not in ("same", "center"):
        raise ValueError(f"config: '{where}.istft_padding' must be 'same' or 'center'")
    interpolation = top.get("wave_interpolation_mode", "linear")
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"config: '{where}.wave_interpolation_mode' must be linear or nearest")
    up_factors = tuple(top.get("wave_upsampler_factors") or ())
    up_kernels = tuple(top.get("wave_upsampler_kernel_sizes") or (2 * f for f in up_factors))
    if len(up_kernels) != len(up_factors):
        raise ValueError(
            f"config: '{where}.wave_upsampler_kernel_sizes' and 'wave_upsampler_factors' "
            "differ in length"
        )
    for i, (k, u) in enumerate(zip(up_kernels, up_factors, strict=True)):
        if not isinstance(k, int) or not isinstance(u, int) or u < 1 or k < u or (k - u) % 2:
            raise ValueError(
                f"config: '{where}.wave_upsampler_*[{i}]': kernel {k!r} and factor {u!r} "
                "do not give an exact upsampling"
            )

    quantizer = _section(tree, "local_quantizer")
    levels = quantizer.get("levels")
    if (
        not isinstance(levels, list)
        or not levels
        or not all(isinstance(v, int) and v > 1 for v in levels)
    ):
        raise ValueError("config: 'model.init_args.local_quantizer.levels' must be integers > 1")

    ssl = _section(tree, "ssl_feature_extractor")
    ssl_name = ssl.get("model_name", "wavlm_base_plus")
    if ssl_name not in SSL_FRONTENDS:
        raise ValueError(
            f"config: unknown 'ssl_feature_extractor.model_name' {ssl_name!r}; "
            f"known: {sorted(SSL_FRONTENDS)}"
        )
    ssl_rate, ssl_convs = SSL_FRONTENDS[ssl_name]

    global_layers = top.get("global_ssl_layers", [1, 2])
    if (
        not isinstance(global_layers, list)
        or not global_layers
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in global_layers)
    ):
        raise ValueError(f"config: '{where}.global_ssl_layers' must be a list of integers >= 1")

    genc = _section(tree, "global_encoder")
    feature_decoder = _section(tree, "feature_decoder", required=False)
    cfg = CodecConfig(
        sample_rate=_int(top, "sample_rate", where),
        n_fft=_int(top, "n_fft", where),
        hop_length=_int(top, "hop_length", where),
        istft_padding=istft_padding,
        downsample_factor=_int(top, "downsample_factor", where, default=2),
        use_conv_downsample=bool(top.get("use_conv_downsample", True)),
        wave_upsample_factor=_int(top, "wave_upsample_factor", where, default=4),
        wave_interpolation_mode=interpolation,
        wave_decoder_dim=_int(top, "wave_decoder_dim", where, default=512),
        wave_resnet_num_blocks=_int(top, "wave_resnet_num_blocks", where, default=2, minimum=0),
        wave_resnet_kernel_size=_int(top, "wave_resnet_kernel_size", where, default=3),
        wave_resnet_num_groups=_int(top, "wave_resnet_num_groups", where, default=32),
        wave_upsampler_factors=up_factors,
        wave_upsampler_kernel_sizes=up_kernels,
        fsq_levels=tuple(levels),
        quantizer_input_dim=_int(quantizer, "input_dim", "model.init_args.local_quantizer"),
        quantizer_output_dim=_int(quantizer, "output_dim", "model.init_args.local_quantizer"),
        wave_prenet=_transformer(_section(tree, "wave_prenet"), "model.init_args.wave_prenet"),
        wave_decoder=_transformer(_section(tree, "wave_decoder"), "model.init_args.wave_decoder"),
        local_encoder=_transformer(
            _section(tree, "local_encoder"), "model.init_args.local_encoder"
        ),
        global_encoder=GlobalEncoderConfig(
            input_channels=_int(genc, "input_channels", "model.init_args.global_encoder"),
            output_channels=_int(genc, "output_channels", "model.init_args.global_encoder"),
            dim=_int(genc, "dim", "model.init_args.global_encoder"),
            intermediate_dim=_int(genc, "intermediate_dim", "model.init_args.global_encoder"),
            num_layers=_int(genc, "num_layers", "model.init_args.global_encoder", minimum=0),
            attention_channels=_int(genc, "attention_channels", "global_encoder", default=128),
            skip_embed=bool(genc.get("skip_embed", False)),
            use_attn_pool=bool(genc.get("use_attn_pool", True)),
        ),
        feature_decoder=(
            _transformer(feature_decoder, "model.init_args.feature_decoder")
            if feature_decoder is not None
            else None
        ),
        ssl_model_name=ssl_name,
        ssl_sample_rate=ssl_rate,
        ssl_conv_layers=ssl_convs,
        global_ssl_layers=tuple(global_layers),
    )
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: CodecConfig) -> None:
    """Sizes that must agree between components, each failure naming both fields."""
    d = cfg.wave_decoder_dim
    checks = [
        (
            cfg.quantizer_output_dim == cfg.wave_prenet.dim,
            "local_quantizer.output_dim must equal wave_prenet.dim",
        ),
        (cfg.wave_prenet.out_dim == d, "wave_prenet.output_dim must equal config.wave_decoder_dim"),
        (cfg.wave_decoder.dim == d, "wave_decoder.dim must equal config.wave_decoder_dim"),
        (cfg.wave_decoder.use_adaln_zero, "wave_decoder.use_adaln_zero must be true"),
        (
            cfg.wave_decoder.adanorm_condition_dim == cfg.global_embedding_dim,
            "wave_decoder.adanorm_condition_dim must equal global_encoder.output_channels",
        ),
        (
            d % cfg.wave_resnet_num_groups == 0,
            "config.wave_decoder_dim must be divisible by config.wave_resnet_num_groups",
        ),
        (cfg.wave_resnet_kernel_size % 2 == 1, "config.wave_resnet_kernel_size must be odd"),
        (
            d % (2 ** len(cfg.wave_upsampler_factors)) == 0,
            "config.wave_decoder_dim must halve evenly at every wave_upsampler stage",
        ),
        (cfg.n_fft >= cfg.hop_length, "config.n_fft must be >= config.hop_length"),
        (
            (cfg.n_fft - cfg.hop_length) % 2 == 0 or cfg.istft_padding == "center",
            "config.n_fft - config.hop_length must be even for 'same' iSTFT padding",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"config: inconsistent sizes: {message}")
    # Upstream derives the output length from the SSL geometry; streaming needs it to be an exact
    # multiple of the token count, which holds for the released codecs. Check a range of lengths.
    for tokens in (1, 2, 3, 7, 60, 1000):
        frames = cfg.stft_frames(cfg.audio_length(tokens))
        if frames != tokens * cfg.wave_upsample_factor:
            raise ValueError(
                "config: the decoded length is not a whole number of samples per token "
                f"({tokens} tokens give {frames} frames); this codec geometry is not supported"
            )


def load_config(path: str | Path) -> CodecConfig:
    """Read and validate an upstream `config.yaml`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"config: cannot read {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise ValueError(f"config: {path} is not valid YAML: {err}") from err
    return parse_config(raw)


def as_codec_config(config: str | Path | dict | CodecConfig) -> CodecConfig:
    """A validated config from a `config.yaml` path, its parsed dict, or a config itself."""
    if isinstance(config, CodecConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    return load_config(config)
