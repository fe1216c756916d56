"""Incremental text segmentation: any split of the input gives the same segments."""

from __future__ import annotations

import random

import pytest

from miotts_stream.text.segmenter import SegmenterOptions, TextSegmenter


def segment(text: str, pieces: list[str] | None = None, **options) -> list[str]:
    segmenter = TextSegmenter(SegmenterOptions(**options))
    out = []
    for piece in pieces if pieces is not None else [text]:
        out += segmenter.push(piece)
    return out + segmenter.flush()


def random_pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, len(text) // 3)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


ENGLISH = 'Hello there. Dr. Smith paid $3.14 for it, e.g. a coffee! Really?! "Yes." Then he left'
JAPANESE = "こんにちは。今日はいい天気ですね！「本当に？」はい、そうです"


def test_english_sentences():
    assert segment(ENGLISH) == [
        "Hello there.",
        "Dr. Smith paid $3.14 for it, e.g. a coffee!",
        "Really?!",
        '"Yes."',
        "Then he left",
    ]


def test_japanese_sentences():
    assert segment(JAPANESE) == [
        "こんにちは。",
        "今日はいい天気ですね！",
        "「本当に？」",
        "はい、そうです",
    ]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("text", [ENGLISH, JAPANESE])
def test_any_split_gives_the_same_segments(text, seed):
    assert segment(text, random_pieces(text, seed)) == segment(text)


def test_sentence_end_waits_for_the_next_character():
    segmenter = TextSegmenter()
    assert segmenter.push("It costs 3.") == []  # "3." may be "3.14"
    assert segmenter.push("14 dollars. And") == ["It costs 3.14 dollars."]
    assert segmenter.flush() == ["And"]


def test_first_clause_is_short_then_clauses_are_longer():
    text = (
        "Well, as I was saying to my friend yesterday, the weather is lovely, and we should "
        "go out, maybe to the park, or to the beach, whichever you like, really, it is fine"
    )
    segments = segment(text)
    assert segments[0] == "Well, as I was saying to my friend yesterday,"
    assert all(len(s) <= 200 for s in segments)
    assert " ".join(segments) == text


def test_max_chars_cuts_at_a_space_or_anywhere():
    words = "word " * 100
    segments = segment(words, max_chars=50)
    assert all(len(s) <= 50 for s in segments)
    assert " ".join(segments).split() == words.split()
    unspaced = "あ" * 130
    assert [len(s) for s in segment(unspaced, max_chars=50)] == [50, 50, 30]


def test_words_that_look_like_abbreviations_still_end_sentences():
    assert segment("I said no. Then I left. Ask J. Smith, he knows.") == [
        "I said no.",
        "Then I left.",
        "Ask J. Smith, he knows.",
    ]


def test_newlines_and_flush():
    assert segment("line one\nline two") == ["line one", "line two"]
    segmenter = TextSegmenter()
    assert segmenter.push("no end yet") == []
    assert segmenter.flush() == ["no end yet"]
    assert segmenter.flush() == []
    assert segment("   ") == []
