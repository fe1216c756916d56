"""Incremental segmentation of streamed text into sentences or clauses.

Text arrives in pieces that may split words (or "3." from "14") anywhere. A segment is cut:
- at a sentence end, once the next character is known: Japanese 。！？… with any closing
  quotes after them (「本当に？」 stays whole); ASCII . ! ? when whitespace follows (so "3.14"
  and "e.g." mid-sentence survive), not after a known abbreviation or a capital initial;
- at a newline;
- at a clause mark (, ; : 、 ，) once the segment is long enough: `first_clause_chars` for the
  first segment, so the first audio starts early, `clause_chars` after that;
- at the last space (or anywhere, for unspaced scripts) when it reaches `max_chars`.
`flush()` returns whatever is pending as a segment.
"""

from __future__ import annotations

from dataclasses import dataclass

_CJK_SENTENCE_END = "。！？…"
_CJK_CLAUSE = "、，"
_CLOSERS = "」』）)]\"'”’"
_ASCII_SENTENCE_END = ".!?"
_ASCII_CLAUSE = ",;:"
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "vs", "e.g", "i.e", "fig", "approx"}


@dataclass
class SegmenterOptions:
    max_chars: int = 200
    clause_chars: int = 80
    first_clause_chars: int = 24

    def validated(self) -> SegmenterOptions:
        if not 0 < self.first_clause_chars <= self.max_chars or self.clause_chars <= 0:
            raise ValueError(
                "segmenter: need 0 < first_clause_chars <= max_chars, clause_chars > 0"
            )
        return self


class TextSegmenter:
    """Feed text pieces with `push`; get back the segments they complete."""

    def __init__(self, options: SegmenterOptions | None = None):
        self.options = (options or SegmenterOptions()).validated()
        self._pending = ""
        self._emitted = 0

    def push(self, piece: str) -> list[str]:
        self._pending += piece
        segments = []
        while (cut := self._find_cut()) is not None:
            segment, self._pending = self._pending[:cut], self._pending[cut:]
            self._add(segments, segment)
        return segments

    def flush(self) -> list[str]:
        segments: list[str] = []
        self._add(segments, self._pending)
        self._pending = ""
        return segments

    def _add(self, segments: list[str], segment: str) -> None:
        segment = segment.strip()
        if segment:
            segments.append(segment)
            self._emitted += 1

    def _clause_limit(self) -> int:
        return self.options.first_clause_chars if self._emitted == 0 else self.options.clause_chars

    def _find_cut(self) -> int | None:
        """Index just past the first boundary in the pending text, or None."""
        text = self._pending
        clause_limit = self._clause_limit()
        for i, ch in enumerate(text):
            if ch == "\n":
                return i + 1
            if ch in _CJK_SENTENCE_END or ch in _ASCII_SENTENCE_END:
                end = self._after_closers(text, i + 1)
                if end >= len(text):
                    return None  # a closing quote or the "14" of "3.14" may still follow
                if ch in _CJK_SENTENCE_END or (
                    text[end].isspace() and not self._is_abbreviation(text, i)
                ):
                    return end
            if (
                ch in _CJK_CLAUSE
                or (ch in _ASCII_CLAUSE and i + 1 < len(text) and text[i + 1].isspace())
            ) and i + 1 >= clause_limit:
                return i + 1
            if i + 1 >= self.options.max_chars:
                space = text.rfind(" ", 0, i + 1)
                return space + 1 if space > 0 else i + 1
        return None

    @staticmethod
    def _after_closers(text: str, index: int) -> int:
        """Keep trailing quotes, brackets and repeated marks ("?!", "。」") with the sentence."""
        while index < len(text) and (
            text[index] in _CLOSERS or text[index] in _CJK_SENTENCE_END + _ASCII_SENTENCE_END
        ):
            index += 1
        return index

    @staticmethod
    def _is_abbreviation(text: str, dot: int) -> bool:
        if text[dot] != ".":
            return False
        start = dot
        while start > 0 and (text[start - 1].isalpha() or text[start - 1] == "."):
            start -= 1
        word = text[start:dot]
        # "J. Smith": a capital initial; "plan b." or "I said no." end sentences.
        return word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isupper())
