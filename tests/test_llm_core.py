"""The engine-free parts of miotts_stream.llm: options, the runaway guard, the text parser and
the vocabulary lookup (on real tokenizers)."""

from __future__ import annotations

import random

import pytest

from miotts_stream.llm import (
    NUM_SPEECH_CODES,
    LLMError,
    RunawayGuard,
    SamplingOptions,
    SpeechTextParser,
    SpeechVocabulary,
    token_budget,
)

# ---- sampling options ---------------------------------------------------------------------


def test_defaults_are_upstreams() -> None:
    options = SamplingOptions()
    assert (options.temperature, options.top_p, options.repetition_penalty) == (0.8, 1.0, 1.0)
    assert options.max_tokens == 700 and options.seed is None
    options.validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", 2.5),  # vLLM refuses above 2: must fail here, at config time
        ("temperature", 1e6),
        ("repetition_penalty", 2.5),
        ("repetition_penalty", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("max_tokens", 0),
        ("max_tokens", 2.5),
        ("seed", -1),
    ],
)
def test_out_of_range_options_name_the_field(field: str, value: object) -> None:
    options = SamplingOptions(**{field: value})
    with pytest.raises(ValueError, match=field):
        options.validate()


def test_edge_values_are_valid() -> None:
    SamplingOptions(temperature=0.0, top_p=1.0, repetition_penalty=1.5, max_tokens=1, seed=0)
    SamplingOptions(temperature=2.0, top_p=1e-6, repetition_penalty=2.0).validate()


def test_the_message_gives_the_range() -> None:
    with pytest.raises(ValueError, match=r"temperature must be in \[0, 2\], got 2.5"):
        SamplingOptions(temperature=2.5).validate()


# ---- runaway guard ------------------------------------------------------------------------


def test_budget_follows_text_length() -> None:
    assert token_budget("hi", 700) == 75  # the floor
    assert token_budget("x" * 20, 700) == 200  # 10 per character
    assert token_budget("x" * 500, 700) == 700  # never above the request
    assert token_budget("x" * 20, 50) == 50


def test_budget_is_configurable() -> None:
    guard = RunawayGuard(tokens_per_char=4, min_tokens=10)
    assert guard.budget("ab", 700) == 10
    assert guard.budget("abcdefghij", 700) == 40
    assert token_budget("abc", 700, tokens_per_char=0) == 700  # 0 turns the guard off
    assert token_budget("", 700, tokens_per_char=10, min_tokens=0) == 1


# ---- text parser --------------------------------------------------------------------------

STREAM = (
    "<|s_0|><|s_12799|>abc<|s_42|>"  # speech around stray text
    "<<|s_7|>"  # a lone "<" right before a token
    "<|s_12800|>"  # out of range: stray
    "<|im_start|>"  # another special token: dropped whole
    "<|s_|><|s_x|>"  # shaped like special tokens, but not speech
    "|>s_<|"  # pieces of the syntax
    "<|s_00031|>"  # leading zeros still name code 31
    "<|im_end|>"  # a stop token: neither code nor dropped
    "<|s_5|>"
)
EXPECTED_CODES = [0, 12799, 42, 7, 31, 5]


def _parse_in_pieces(pieces: list[str]) -> tuple[list[int], str, list[str], bool, str]:
    parser = SpeechTextParser()
    codes: list[int] = []
    stray: list[str] = []
    specials: list[str] = []
    stopped = False
    for piece in pieces:
        parsed = parser.feed(piece)
        codes += parsed.codes
        stray.append(parsed.stray)
        specials += parsed.specials
        stopped |= parsed.stopped
    return codes, "".join(stray), specials, stopped, parser.finish()


def test_whole_text() -> None:
    codes, stray, specials, stopped, rest = _parse_in_pieces([STREAM])
    assert codes == EXPECTED_CODES
    assert stray == "abc" + "<" + "<|s_12800|>" + "|>s_<|"
    assert specials == ["<|im_start|>", "<|s_|>", "<|s_x|>"]  # shaped like special tokens
    assert stopped and rest == ""


def test_every_single_cut() -> None:
    whole = _parse_in_pieces([STREAM])
    for cut in range(len(STREAM) + 1):
        assert _parse_in_pieces([STREAM[:cut], STREAM[cut:]]) == whole, cut


def test_every_pair_of_cuts() -> None:
    whole = _parse_in_pieces([STREAM])
    for first in range(len(STREAM) + 1):
        for second in range(first, len(STREAM) + 1):
            pieces = [STREAM[:first], STREAM[first:second], STREAM[second:]]
            assert _parse_in_pieces(pieces) == whole, (first, second)


def test_one_character_at_a_time_and_random_pieces() -> None:
    whole = _parse_in_pieces([STREAM])
    assert _parse_in_pieces(list(STREAM)) == whole
    rng = random.Random(0)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 12)))
        pieces = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
        assert _parse_in_pieces(pieces) == whole, cuts


def test_codes_come_out_as_soon_as_complete() -> None:
    parser = SpeechTextParser()
    assert parser.feed("<|s_1").codes == []
    assert parser.feed("2|").codes == []
    assert parser.feed(">").codes == [12]
    assert parser.feed("<|s_3|><|s_").codes == [3]
    assert parser.finish() == "<|s_"  # unfinished at the end: handed back


def test_garbage_is_not_buffered_forever() -> None:
    parser = SpeechTextParser()
    parsed = parser.feed("<|" + "a" * 200)
    assert parsed.stray.startswith("<|") and len(parsed.stray) == 202
    assert parser.feed("<|s_9|>").codes == [9]


# ---- vocabulary lookup --------------------------------------------------------------------


def _tokenizer(tokens: list[str]):
    """A real (tokenizers) tokenizer with a tiny word vocabulary plus `tokens` as specials."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    inner.add_special_tokens(tokens)
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")


SPEECH = [f"<|s_{n}|>" for n in range(NUM_SPEECH_CODES)]


def test_vocabulary_found_wherever_it_starts() -> None:
    tokenizer = _tokenizer(["<|endoftext|>", "<|im_end|>", *SPEECH])
    vocab = SpeechVocabulary.from_tokenizer(tokenizer, model_vocab_size=2 + 2 + NUM_SPEECH_CODES)
    assert vocab.first_speech_id == 4
    assert vocab.stop_ids == {2, 3}
    assert vocab.code(4) == 0 and vocab.code(4 + NUM_SPEECH_CODES - 1) == NUM_SPEECH_CODES - 1
    assert vocab.code(3) is None and vocab.code(4 + NUM_SPEECH_CODES) is None
    allowed = vocab.allowed_token_ids()
    assert len(allowed) == NUM_SPEECH_CODES + 2 and {2, 3} <= set(allowed)


def test_vocabulary_rejects_non_miotts_tokenizers() -> None:
    with pytest.raises(LLMError, match="speech tokens"):
        SpeechVocabulary.from_tokenizer(_tokenizer(["<|im_end|>"]))
    shuffled = [*SPEECH]
    shuffled[100], shuffled[101] = shuffled[101], shuffled[100]
    with pytest.raises(LLMError, match="contiguous"):
        SpeechVocabulary.from_tokenizer(_tokenizer(["<|im_end|>", *shuffled]))
    with pytest.raises(LLMError, match="vocabulary has"):
        SpeechVocabulary.from_tokenizer(_tokenizer(["<|im_end|>", *SPEECH]), model_vocab_size=100)
    with pytest.raises(LLMError, match="end token"):
        SpeechVocabulary.from_tokenizer(_tokenizer(SPEECH))
