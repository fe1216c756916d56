"""MioCodec decoding: offline (`MioCodecDecoder.decode`) and streaming (`decoder.stream`)."""

from .config import CodecConfig, load_config
from .decoder import MioCodecDecoder
from .voices import VoiceLibrary, load_voice, load_voice_file

__all__ = [
    "CodecConfig",
    "MioCodecDecoder",
    "VoiceLibrary",
    "load_config",
    "load_voice",
    "load_voice_file",
]
