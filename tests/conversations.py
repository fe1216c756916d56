"""What the conversation tests (WebSocket, gRPC) share with the streaming tests: one stream's
(or one context's) events as a client received them, and the invariants of word timings and
segments."""

from __future__ import annotations

from dataclasses import dataclass, field

from miotts_stream.text.words import split_words


@dataclass
class Segment:
    index: int
    text: str
    start: int
    end: int | None = None


@dataclass
class Word:
    text: str
    start: int
    end: int
    segment_index: int
    received: int  # the order it arrived in, among the record's events


@dataclass
class Chunk:
    start: int
    samples: int
    received: int


@dataclass
class ContextRecord:
    """Everything one stream (or context) received, in order; positions in output samples
    from its start."""

    segments: list[Segment] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    audio: bytes = b""
    flushed: list = field(default_factory=list)
    done: dict | None = None
    cancelled: bool = False
    error: dict | None = None
    events: int = 0

    def segment(self, kind: str, index: int, text: str, start: int, end: int = 0) -> None:
        self.events += 1
        if kind == "started":
            assert [s.index for s in self.segments] == list(range(index))
            self.segments.append(Segment(index, text, start))
        else:
            segment = self.segments[index]
            assert segment.end is None and segment.start == start
            segment.end = end

    def timed(self, segment_index: int, words: list[tuple[str, int, int]]) -> None:
        self.events += 1
        self.words += [Word(t, s, e, segment_index, self.events) for t, s, e in words]

    def chunk(self, start: int, samples: int, data: bytes) -> None:
        self.events += 1
        self.chunks.append(Chunk(start, samples, self.events))
        self.audio += data


def check_words_and_segments(record: ContextRecord, total_samples: int) -> None:
    """Every word of every segment's text once, in order, monotonic, inside its segment's
    audio, and timed before the audio it starts in arrived; the segments covering the audio,
    one after the other, from 0 to its end."""
    position = 0
    for segment in record.segments:
        assert segment.start == position and segment.end is not None, segment
        assert segment.end >= segment.start
        position = segment.end
        words = [w for w in record.words if w.segment_index == segment.index]
        assert [w.text for w in words] == [w.text for w in split_words(segment.text)]
        for word in words:
            assert segment.start <= word.start <= word.end <= segment.end, (word, segment)
    assert position == total_samples
    previous_end = 0
    for word in record.words:
        assert previous_end <= word.start <= word.end, word
        previous_end = word.end
    for chunk in record.chunks:  # no word arrives after the audio it starts in
        for word in record.words:
            if word.start < chunk.start + chunk.samples:
                assert word.received < chunk.received, (word, chunk)
