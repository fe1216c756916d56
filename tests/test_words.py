"""Words of a segment and their estimated times (miotts_stream/text/words.py): how text is cut
into words, and the timeline's invariants under many streaming schedules (seeded): every word
once, in order, monotonic, inside the segment's audio, each timed before the audio it starts
in is sent."""

from __future__ import annotations

import random

import pytest

from miotts_stream.text.words import WordTimeline, split_words, word_weight

SPT = 960


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Hello there, how are you?", ["Hello", "there,", "how", "are", "you?"]),
        ("It costs 3.14 dollars... ok", ["It", "costs", "3.14", "dollars...", "ok"]),
        ('He said "fine" — then left.', ["He", "said", '"fine" —', "then", "left."]),
        ("— Yes!", ["— Yes!"]),
        ("... —", []),
        ("こんにちは、世界。", ["こ", "ん", "に", "ち", "は、", "世", "界。"]),
        ("「本当？」ABCです", ["「本", "当？」", "ABC", "で", "す"]),
    ],
)
def test_words_are_pieces_of_the_text_each_spoken_word_once(text, words):
    found = split_words(text)
    assert [w.text for w in found] == words
    position = 0
    for word in found:  # in order, each a piece of the text as it is
        position = text.index(word.text, position) + len(word.text)


def test_weights_count_letters_digits_scripts_and_pauses():
    assert word_weight("cat") == 3
    assert word_weight("42") == 4  # digits are read out
    assert word_weight("cat,") == 5 and word_weight("cat.") == 6
    assert word_weight("猫") == 2.5
    assert word_weight("—") == 1  # never nothing


def check_timeline(words, timed, total) -> None:
    """The invariants, for one segment's words as they were timed."""
    assert [t.text for t in timed] == [w.text for w in words]  # every word once, in order
    end = 0
    for word in timed:
        assert end <= word.start_sample <= word.end_sample <= total  # monotonic, inside
        end = word.end_sample


@pytest.mark.parametrize("seed", range(40))
def test_the_timeline_keeps_its_invariants_whatever_the_schedule(seed):
    """Tokens arrive in random batches, ahead of the audio by a random margin; audio goes out
    in random chunks; the segment's end becomes known at a random point. A word is timed before
    the chunk its start falls in goes out (its start is never in audio already sent), never
    beyond the audio the tokens received make, and never moved afterwards."""
    rng = random.Random(seed)
    text = " ".join(
        rng.choice(["a", "word", "longer", "3,5", "end.", "then,", "extraordinarily"])
        for _ in range(rng.randint(1, 12))
    )
    words = split_words(text)
    tokens = rng.randint(1, 120)
    timeline = WordTimeline(words, SPT)
    timed = []
    received = sent = 0  # tokens received from the LLM; tokens of audio sent
    total = None
    while sent < tokens:
        received = min(tokens, received + rng.randint(1, 8))
        if received == tokens and rng.random() < 0.7:
            total = tokens * SPT  # all codes are in: the segment's length is known
        if received - sent < rng.randint(1, 6) and received < tokens:
            continue  # the decoder waits for more lookahead
        chunk_end = rng.randint(sent + 1, received)
        new = timeline.due(chunk_end * SPT, received * SPT, total)
        for word in new:
            assert word.start_sample >= sent * SPT  # its audio has not gone out yet
            if total is None:
                assert word.end_sample <= received * SPT  # no further than known audio
        timed += new
        sent = chunk_end
    rest = timeline.due(tokens * SPT, tokens * SPT, tokens * SPT)  # the segment's end
    assert all(word.start_sample >= sent * SPT for word in rest)
    check_timeline(words, timed + rest, tokens * SPT)


def test_words_share_a_known_segment_by_weight():
    words = split_words("a bb cccc.")
    timed = WordTimeline(words, SPT).due(0, 100 * SPT, 100 * SPT)
    lengths = [t.end_sample - t.start_sample for t in timed]
    weights = [w.weight for w in words]
    for length, weight in zip(lengths, weights, strict=True):
        assert length == pytest.approx(100 * SPT * weight / sum(weights), abs=1)
    assert timed[0].start_sample == 0 and timed[-1].end_sample == 100 * SPT


def test_a_word_is_timed_only_when_its_audio_is_about_to_go():
    timeline = WordTimeline(split_words("one two three four five six"), SPT)
    first = timeline.due(4 * SPT, 10 * SPT)  # the first chunk: 4 tokens of audio
    assert [w.text for w in first] == ["one"]
    assert first[0].end_sample <= 10 * SPT  # no further than the tokens received make
    assert timeline.due(4 * SPT, 10 * SPT) == []  # nothing new is due
