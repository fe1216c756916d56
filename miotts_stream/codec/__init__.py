"""MioCodec: decoding, offline (`MioCodecDecoder.decode`) and streaming (`decoder.stream`, or
many streams batched by one `decoder.batcher()`), and speaker embeddings from reference audio
(`MioCodecEncoder.embed`)."""

from .batcher import StreamBatcher
from .config import CodecConfig, load_config
from .decoder import MioCodecDecoder
from .encoder import MioCodecEncoder
from .streaming import StatisticsMode, StreamingOptions, TokenStreamDecoder
from .voices import VoiceLibrary, load_voice, load_voice_file

__all__ = [
    "CodecConfig",
    "MioCodecDecoder",
    "MioCodecEncoder",
    "StatisticsMode",
    "StreamBatcher",
    "StreamingOptions",
    "TokenStreamDecoder",
    "VoiceLibrary",
    "load_config",
    "load_voice",
    "load_voice_file",
]
