"""Text normalization: upstream MioTTS-Inference's rules, and when they apply."""

from __future__ import annotations

import pytest

from miotts_stream.text import detect_language, is_japanese, normalize_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("あabcd", True),  # 1 of 5 visible characters: exactly 20%
        ("あabcde", False),  # 1 of 6: below
        ("あ a b c d", True),  # spaces do not count
        ("漢字", True),
        ("カタカナ", True),
        ("Hello, world.", False),
        ("ｱｲｳｴｵ", False),  # half-width katakana is not in upstream's ranges
        ("", False),
        ("   ", False),
    ],
)
def test_japanese_detection_uses_the_20_percent_rule(text: str, expected: bool) -> None:
    assert is_japanese(text) is expected


def test_detect_language_matches_upstream_labels() -> None:
    assert detect_language("今日はいい天気") == "ja"
    assert detect_language("What a nice day") == "en"
    assert detect_language("12345 !!!") == "auto"
    assert detect_language("") == "auto"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("今日は いい　天気\tです", "今日はいい天気です"),  # spaces, ideographic spaces, tabs
        ("本当？すごい！", "本当?すごい!"),
        ("ええ～", "ええー"),
        ("ええ〜", "ええー"),
        ("ＡＢＣとｘｙｚです", "ABCとxyzです"),
        ("１２３円", "123円"),
        ("ｶﾀｶﾅと漢字", "カタカナと漢字"),
        ("それは………", "それは……"),
        ("「こんにちは」", "こんにちは"),
        ("『題名』", "題名"),
        ("（注意）", "注意"),
        ("【速報】", "速報"),
        ("(補足)", "補足"),
        ("終わりです。", "終わりです"),
        ("続きます、、", "続きます"),
        ("●と◯と〇", "○と○と○"),
        ("好き♥", "好き♡"),
        ("改行[n]です", "改行です"),
        ("東京―大阪‐名古屋−福岡", "東京大阪名古屋福岡"),  # dashes and the minus sign go
        ("記号;▼《》①です", "記号です"),
        ("全角；は残る", "全角；は残る"),  # only the ASCII semicolon is removed
        # Brackets come off before the closing 。 does, as upstream: this pair stays.
        ("「はい」。", "「はい」"),
    ],
)
def test_japanese_rules(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_other_text_is_only_stripped() -> None:
    assert normalize_text("  Hello,  world!  ") == "Hello,  world!"
    assert normalize_text("(aside) — fine.") == "(aside) — fine."
    assert normalize_text("\tMixed 日本 text here.\n") == "Mixed 日本 text here."


def test_language_forces_the_path() -> None:
    assert normalize_text("Hello world。", language="ja") == "Helloworld"
    assert normalize_text(" 今日は いい天気。 ", language="en") == "今日は いい天気。"
    assert normalize_text(" 今日は いい天気。 ", language="auto") == "今日はいい天気"
    assert normalize_text(" 今日は いい天気。 ", language="") == "今日はいい天気"


def test_unknown_language_is_an_error() -> None:
    with pytest.raises(ValueError, match="language"):
        normalize_text("hello", language="fr")
