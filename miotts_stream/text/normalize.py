"""Text normalization before the speech LLM, as upstream MioTTS-Inference does it.

Upstream (Aratako/MioTTS-Inference, ``miotts_server/text.py`` and the language detection in
``best_of_n.py``) normalizes only text it detects as Japanese: at least 20% of the non-space
characters are kana or CJK ideographs. Other text is only stripped of surrounding whitespace.
The models were trained on text normalized this way, so the rules are kept as they are, even
where they look odd (Japanese text loses all its spaces, a closing 。 is dropped).
"""

from __future__ import annotations

import re
from typing import Literal

Language = Literal["auto", "ja", "en"]

# Share of Japanese characters among non-space characters from which text counts as Japanese.
JAPANESE_RATIO = 0.2
# Share of ASCII letters from which text counts as English (upstream's "en"; "auto" otherwise).
ENGLISH_RATIO = 0.5

# Applied in this order, as upstream does.
_REPLACEMENTS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"\t", ""),
        (r"\[n\]", ""),
        (r" ", ""),
        (r"\u3000", ""),  # ideographic space
        (r"[;▼♀♂《》≪≫①②③④⑤⑥]", ""),
        # hyphens, dashes, minus and box-drawing lines that are read as nothing
        (r"[\u02d7\u2010-\u2015\u2043\u2212\u23af\u23e4\u2500\u2501\u2e3a\u2e3b]", ""),
        (r"[\uff5e\u301c]", "ー"),  # full-width tilde and wave dash lengthen the vowel
        (r"？", "?"),
        (r"！", "!"),
        (r"[●◯〇]", "○"),
        (r"♥", "♡"),
    )
)

_FULLWIDTH_LETTERS_TO_ASCII = str.maketrans(
    {chr(0xFF21 + i): chr(ord("A") + i) for i in range(26)}
    | {chr(0xFF41 + i): chr(ord("a") + i) for i in range(26)}
)
_FULLWIDTH_DIGITS_TO_ASCII = str.maketrans({chr(0xFF10 + i): str(i) for i in range(10)})
_HALFWIDTH_KATAKANA = "ｦｧｨｩｪｫｬｭｮｯｰｱｲｳｴｵｶｷｸｹｺｻｼｽｾｿﾀﾁﾂﾃﾄﾅﾆﾇﾈﾉﾊﾋﾌﾍﾎﾏﾐﾑﾒﾓﾔﾕﾖﾗﾘﾙﾚﾛﾜﾝ"
_FULLWIDTH_KATAKANA = (
    "ヲァィゥェォャュョッーアイウエオカキクケコサシスセソタチ"
    "ツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワン"
)
_HALFWIDTH_KATAKANA_TO_FULLWIDTH = str.maketrans(_HALFWIDTH_KATAKANA, _FULLWIDTH_KATAKANA)
_LONG_ELLIPSIS = re.compile(r"…{3,}")
# Brackets around the whole text are dropped, one pair of each kind, in this order.
_ENCLOSING_PAIRS = (("「", "」"), ("『", "』"), ("（", "）"), ("【", "】"), ("(", ")"))


def _is_japanese_char(ch: str) -> bool:
    code = ord(ch)
    return (
        0x3040 <= code <= 0x309F  # hiragana
        or 0x30A0 <= code <= 0x30FF  # katakana
        or 0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= code <= 0x4DBF  # CJK extension A
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility ideographs
    )


def detect_language(text: str) -> Literal["ja", "en", "auto"]:
    """ "ja" when >= 20% of the non-space characters are Japanese, "en" when >= 50% are ASCII
    letters, otherwise "auto" (unknown), as upstream decides."""
    visible = [ch for ch in text if not ch.isspace()]
    if not visible:
        return "auto"
    japanese = sum(1 for ch in visible if _is_japanese_char(ch))
    if japanese / len(visible) >= JAPANESE_RATIO:
        return "ja"
    letters = sum(1 for ch in visible if ch.isascii() and ch.isalpha())
    if letters / len(visible) >= ENGLISH_RATIO:
        return "en"
    return "auto"


def is_japanese(text: str) -> bool:
    """Whether upstream would treat `text` as Japanese (and normalize it)."""
    return detect_language(text) == "ja"


def normalize_japanese(text: str) -> str:
    """Upstream's normalization rules for Japanese text (applied whatever the text is)."""
    for pattern, replacement in _REPLACEMENTS:
        text = pattern.sub(replacement, text)
    text = text.translate(_FULLWIDTH_LETTERS_TO_ASCII)
    text = text.translate(_FULLWIDTH_DIGITS_TO_ASCII)
    text = text.translate(_HALFWIDTH_KATAKANA_TO_FULLWIDTH)
    text = _LONG_ELLIPSIS.sub("……", text)
    for opening, closing in _ENCLOSING_PAIRS:
        if text.startswith(opening) and text.endswith(closing):
            text = text[1:-1]
    # A trailing 。 or 、 (any run of them) is not read; the model was trained without it.
    return text.rstrip("。、")


def normalize_text(text: str, language: Language | str = "auto") -> str:
    """Text as the speech LLM expects it.

    language: "auto" (or "", an unset field) applies the Japanese rules when
    `is_japanese(text)`; "ja" always applies them; "en" only strips surrounding whitespace.
    """
    language = language or "auto"
    if language not in ("auto", "ja", "en"):
        raise ValueError(f"language must be 'auto', 'ja' or 'en', not {language!r}")
    if language == "ja" or (language == "auto" and is_japanese(text)):
        return normalize_japanese(text)
    return text.strip()
