"""Text on its way to the speech LLM: normalization (as upstream MioTTS-Inference) and more."""

from .normalize import detect_language, is_japanese, normalize_japanese, normalize_text

__all__ = ["detect_language", "is_japanese", "normalize_japanese", "normalize_text"]
