"""Words of a text segment and their estimated times in its audio, as the audio streams.

MioTTS has no aligner: nothing says where a word lies in the speech tokens. So the times are
estimates, made from what is exact and what is known so far:

- a segment's audio is exact: it starts where the previous segment's ended, and it is
  `samples_per_token` samples per speech token, so its end is known once its tokens are all in;
- inside a segment, words follow each other with no gap, each taking a share of the audio in
  proportion to its weight (`word_weight`: letters and digits, a CJK character counting for
  more, plus a pause after a comma or a sentence end).

Times must reach the client no later than the word's audio, and the audio streams before the
segment's end is known. `WordTimeline` therefore times words as late as it may: a word is timed
when the audio about to be sent reaches it (or when the segment's end is known, then all at
once). Until the end is known, the words still to time share what remains of an estimate of
it (the segment's weight at `TOKENS_PER_WEIGHT`, or the tokens already in when there are more),
and no word ends beyond the audio the tokens received so far certainly make: a time once sent
is never taken back, and it always lies inside the segment's audio.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Speech tokens per unit of word weight, before a segment's length is known (about English
# speech at 25 tokens per second: some 13 letters a second).
TOKENS_PER_WEIGHT = 2.0

_CLAUSE_MARKS = set(",;:、，；：")
_SENTENCE_MARKS = set(".!?。！？…")
_CLAUSE_PAUSE = 2.0
_SENTENCE_PAUSE = 3.0
_CJK_WEIGHT = 2.5  # a kana or kanji: about a mora or two, against a Latin letter
_DIGIT_WEIGHT = 2.0  # digits are read out: "3" is "three"


def _is_cjk(char: str) -> bool:
    """A character of a script written without spaces (kana, CJK ideographs)."""
    name = unicodedata.name(char, "")
    return name.startswith(("CJK UNIFIED", "CJK COMPATIBILITY", "HIRAGANA", "KATAKANA"))


def _is_spoken(char: str) -> bool:
    return char.isalnum()


@dataclass(frozen=True)
class Word:
    text: str  # as it is in the segment's text, punctuation attached
    weight: float


def word_weight(text: str) -> float:
    """How long a word takes to say, in rough units of one Latin letter."""
    weight = 0.0
    for char in text:
        if _is_cjk(char):
            weight += _CJK_WEIGHT
        elif char.isdigit():
            weight += _DIGIT_WEIGHT
        elif _is_spoken(char):
            weight += 1.0
        elif char in _SENTENCE_MARKS:
            weight += _SENTENCE_PAUSE
        elif char in _CLAUSE_MARKS:
            weight += _CLAUSE_PAUSE
    return max(weight, 1.0)


def _units(text: str) -> list[tuple[int, int]]:
    """`text` cut into (start, end) spans: a run of letters and digits with the punctuation in
    and after it ("3.14", "there,"), one character of a script written without spaces with the
    punctuation after it ("は、"), or punctuation alone (before any of those)."""
    units: list[list[int]] = []
    latin_open = False  # the last unit is a run that more letters continue
    for match in re.finditer(r"\S+", text):
        latin_open = False  # a space ends a run
        for i in range(match.start(), match.end()):
            char = text[i]
            if _is_cjk(char):
                units.append([i, i + 1])
                latin_open = False
            elif _is_spoken(char):
                if latin_open:
                    units[-1][1] = i + 1
                else:
                    units.append([i, i + 1])
                    latin_open = True
            elif units and units[-1][1] == i:  # punctuation right after a unit joins it
                units[-1][1] = i + 1
            else:
                units.append([i, i + 1])
                latin_open = False
    return [(start, end) for start, end in units]


def split_words(text: str) -> list[Word]:
    """The words of `text` in order, each spoken word once, each a piece of `text` as it is:
    runs between spaces (characters, in scripts written without spaces), with punctuation that
    says nothing by itself kept with the word it touches: the one it opens (`"fine`), else the
    one before it (`you? ...`), else the first."""
    units = _units(text)
    spans: list[list[int]] = []
    leading: int | None = None  # where punctuation opening the next word starts
    for i, (start, end) in enumerate(units):
        if any(_is_spoken(c) for c in text[start:end]):
            spans.append([start if leading is None else leading, end])
            leading = None
        elif (i + 1 < len(units) and units[i + 1][0] == end) or not spans:
            leading = start if leading is None else leading
        else:
            spans[-1][1] = end
    return [Word(text[start:end], word_weight(text[start:end])) for start, end in spans]


@dataclass(frozen=True)
class TimedWord:
    text: str
    start_sample: int  # from the start of the segment's audio (or the stream's: see users)
    end_sample: int


class WordTimeline:
    """One segment's words, timed as its audio streams (see the module docstring). Positions
    are samples from the start of the segment's audio.

    Each word has an ideal place: the words still to time share, in proportion to their
    weights, the audio from the ideal end of the last word timed to the segment's (estimated)
    end. A word's time is its ideal place, moved no earlier than the end of the word before it
    and, until the segment's end is known, no later than the audio known to exist; so a word
    squeezed at the start (tokens barely ahead of the audio) does not push the next ones
    early, and words may leave gaps (silence) between them.
    """

    def __init__(self, words: list[Word], samples_per_token: int):
        self.words = words
        self._weights_left = [0.0] * (len(words) + 1)  # weight of words[i:]
        for i in range(len(words) - 1, -1, -1):
            self._weights_left[i] = self._weights_left[i + 1] + words[i].weight
        self._estimate = round(TOKENS_PER_WEIGHT * self._weights_left[0] * samples_per_token)
        self.timed = 0  # words timed so far
        self.end = 0  # where the last timed word ends
        self._ideal_end = 0  # where it would have ended, had nothing moved it

    @property
    def done(self) -> bool:
        return self.timed == len(self.words)

    def due(self, before: int, known: int, total: int | None = None) -> list[TimedWord]:
        """Time the words that start before `before` (the end of the audio about to be sent),
        or every word left once `total` (the segment's exact length) is given. `known`: the
        samples the segment certainly has (the tokens received so far make them)."""
        timed: list[TimedWord] = []
        if total is not None:
            length = limit = total
        else:
            length, limit = max(known, self._estimate, self._ideal_end), known
        while not self.done:
            ideal_start = min(self._ideal_end, length)
            share = self.words[self.timed].weight / self._weights_left[self.timed]
            ideal_end = ideal_start + round((length - ideal_start) * share)
            start = max(self.end, min(ideal_start, limit))
            if total is None and start >= before:
                break  # its audio is not being sent yet
            end = min(ideal_end, limit)
            if total is not None and self.timed == len(self.words) - 1:
                end = total  # the last word runs to the segment's end
            end = max(end, start)
            timed.append(TimedWord(self.words[self.timed].text, start, end))
            self.timed += 1
            self.end, self._ideal_end = end, ideal_end
        return timed
