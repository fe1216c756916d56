"""From LLM output to MioCodec codes: token ids (in process) or text pieces (from a server)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from miotts_stream.speech_codes import NUM_SPEECH_CODES

from .base import LLMError

# Tokens that end an utterance in the MioTTS models (Qwen's chat and document ends).
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def speech_token(code: int) -> str:
    return f"<|s_{code}|>"


@dataclass(frozen=True)
class SpeechVocabulary:
    """Where the speech tokens and the stop tokens sit in a tokenizer's vocabulary."""

    first_speech_id: int  # id of <|s_0|>; <|s_N|> is first_speech_id + N
    stop_ids: frozenset[int]

    @classmethod
    def from_tokenizer(cls, tokenizer, model_vocab_size: int | None = None) -> SpeechVocabulary:
        """Looks the speech tokens up and checks that they are all there, contiguous, and inside
        the model's embedding; a tokenizer that is not MioTTS's fails here, not mid-request."""
        vocab: dict[str, int] = tokenizer.get_vocab()
        missing = [
            speech_token(n) for n in (0, NUM_SPEECH_CODES - 1) if speech_token(n) not in vocab
        ]
        if missing:
            raise LLMError(
                f"the tokenizer has no MioTTS speech tokens ({', '.join(missing)} missing): "
                "is this a MioTTS model?"
            )
        first = vocab[speech_token(0)]
        for code in range(NUM_SPEECH_CODES):
            token_id = vocab.get(speech_token(code))
            if token_id != first + code:
                raise LLMError(
                    f"speech tokens are not contiguous: {speech_token(code)} has id {token_id}, "
                    f"expected {first + code} (<|s_0|> is {first})"
                )
        last = first + NUM_SPEECH_CODES - 1
        if model_vocab_size is not None and last >= model_vocab_size:
            raise LLMError(
                f"speech token ids reach {last} but the model's vocabulary has "
                f"{model_vocab_size} entries"
            )
        stop_ids = {vocab[token] for token in STOP_TOKENS if token in vocab}
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            stop_ids.add(eos)
        if not stop_ids:
            raise LLMError("the tokenizer has no end token (<|im_end|>, <|endoftext|> or EOS)")
        if any(first <= i <= last for i in stop_ids):
            raise LLMError("an end token id falls among the speech tokens")
        return cls(first_speech_id=first, stop_ids=frozenset(stop_ids))

    def code(self, token_id: int) -> int | None:
        """The MioCodec code of a token id, or None when it is not a speech token."""
        code = token_id - self.first_speech_id
        return code if 0 <= code < NUM_SPEECH_CODES else None

    def allowed_token_ids(self) -> list[int]:
        """The speech tokens and the stop tokens: all a MioTTS model should ever write."""
        speech = range(self.first_speech_id, self.first_speech_id + NUM_SPEECH_CODES)
        return [*speech, *sorted(self.stop_ids)]


_SPEECH = re.compile(r"<\|s_(\d{1,6})\|>")
# Any other special token, e.g. <|im_end|>: dropped (or ignored, for stop tokens) as a whole.
_SPECIAL = re.compile(r"<\|[A-Za-z0-9_]{1,64}\|>")
# What may still become a special token once more text arrives ("<", "<|s_12", "<|im_end|").
_UNFINISHED = re.compile(r"<(?:\|(?:[A-Za-z0-9_]{1,64}\|?)?)?")


@dataclass
class ParsedText:
    codes: list[int] = field(default_factory=list)
    stray: str = ""  # text that is not a speech token
    specials: list[str] = field(default_factory=list)  # other special tokens, stop tokens aside
    stopped: bool = False  # a stop token was seen


class SpeechTextParser:
    """Finds `<|s_N|>` in text that arrives in pieces cut anywhere (a server's stream).

    `feed` returns what the text so far completes and keeps an unfinished "<|s_1" for the next
    piece; `finish` gives back what is left at the end (as stray text).
    """

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> ParsedText:
        result = ParsedText()
        buffer = self._buffer + text
        stray: list[str] = []
        pos = 0
        while pos < len(buffer):
            start = buffer.find("<", pos)
            if start < 0:
                stray.append(buffer[pos:])
                pos = len(buffer)
                break
            stray.append(buffer[pos:start])
            if match := _SPEECH.match(buffer, start):
                code = int(match.group(1))
                if code < NUM_SPEECH_CODES:
                    result.codes.append(code)
                else:
                    stray.append(match.group(0))
                pos = match.end()
            elif match := _SPECIAL.match(buffer, start):
                if match.group(0) in STOP_TOKENS:
                    result.stopped = True
                else:
                    result.specials.append(match.group(0))
                pos = match.end()
            elif _UNFINISHED.fullmatch(buffer, start):
                pos = start
                break  # keep it for the next piece
            else:
                stray.append("<")
                pos = start + 1
        self._buffer = buffer[pos:]
        result.stray = "".join(stray)
        return result

    def finish(self) -> str:
        """Text left unfinished at the end of the stream."""
        rest, self._buffer = self._buffer, ""
        return rest
