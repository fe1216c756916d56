"""MioCodec: decoding, offline (`MioCodecDecoder.decode`) and streaming (`decoder.stream`), and
speaker embeddings from reference audio (`MioCodecEncoder.embed`)."""

from .config import CodecConfig, load_config
from .decoder import MioCodecDecoder
from .encoder import MioCodecEncoder
from .voices import VoiceLibrary, load_voice, load_voice_file

__all__ = [
    "CodecConfig",
    "MioCodecDecoder",
    "MioCodecEncoder",
    "VoiceLibrary",
    "load_config",
    "load_voice",
    "load_voice_file",
]
