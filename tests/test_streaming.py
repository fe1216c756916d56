"""Streaming decode on full-size random decoders: latency, fidelity, seams, batching."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from miotts_stream.audio.quality import lsd_db, seam_jumps, snr_db
from miotts_stream.codec import MioCodecDecoder, StatisticsMode, StreamingOptions, load_voice

from .conftest import FULL_CONFIGS
from .frozen import streaming_68f7d4f as legacy

TOKENS = 250


@pytest.fixture(scope="module", params=sorted(FULL_CONFIGS))
def full_decoder(request) -> MioCodecDecoder:
    return MioCodecDecoder.from_config(FULL_CONFIGS[request.param], device="cpu", seed=0)


@pytest.fixture(scope="module")
def utterance(full_decoder):
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 12800, (TOKENS,), generator=gen)
    voice = load_voice("en_female")
    return tokens, voice, full_decoder.decode(tokens, voice)


def test_first_audio_within_six_tokens(full_decoder, utterance):
    tokens, voice, _ = utterance
    stream = full_decoder.stream(voice)
    for count in range(1, 7):
        chunks = stream.push(tokens[count - 1 : count])
        if chunks:
            break
    assert chunks, "no audio after 6 tokens"
    assert count <= 6
    assert stream.emitted_tokens >= 1
    assert sum(c.numel() for c in chunks) == stream.emitted_tokens * full_decoder.samples_per_token


def test_fast_regime_fidelity_length_and_seams(full_decoder, utterance):
    tokens, voice, offline = utterance
    stream = full_decoder.stream(voice)
    chunks = stream.push(tokens) + stream.finish()
    audio = torch.cat(chunks).numpy()
    assert audio.shape == (full_decoder.samples_per_token * TOKENS,)
    assert lsd_db(audio, offline.numpy(), full_decoder.sample_rate) <= 0.6
    assert snr_db(audio, offline.numpy()) > 30
    seams = list(np.cumsum([c.numel() for c in chunks])[:-1])
    assert len(seams) >= 5  # chunks grow to 80 tokens when all tokens are there
    worst_seam, inner_p999 = seam_jumps(audio, seams)
    assert worst_seam <= inner_p999


def test_samples_are_placed_once_and_in_order(full_decoder, utterance):
    """With context covering the whole utterance every window equals the offline decode, so
    the stream must reproduce it sample for sample: nothing dropped, doubled or shifted."""
    tokens, voice, offline = utterance
    options = StreamingOptions(
        left_context_tokens=TOKENS,
        lookahead_tokens=TOKENS,
        chunk_tokens=37,
        max_chunk_tokens=0,  # no growth: fixed 37-token chunks
        crossfade_ms=0,
    )
    stream = full_decoder.stream(voice, options)
    chunks = stream.push(tokens) + stream.finish()
    assert len(chunks) == 1 + -(-(TOKENS - 4) // 37)
    audio = torch.cat(chunks)
    assert audio.shape == offline.shape
    assert snr_db(audio.numpy(), offline.numpy()) > 60


def test_cost_is_constant_along_the_utterance(full_decoder, monkeypatch):
    """No prefix re-decoding: every window in the middle of a 64 s utterance has the same
    length, so a chunk at the 60th second costs what one at the 2nd costs (all tokens there at
    once: the grown window, chunk_cap + lookahead_cap)."""
    windows = []
    real_trunk = full_decoder.model.trunk

    def recording_trunk(tokens, speaker, valid, group_stats=None):
        windows.append((tokens.shape[1], int(valid[0].sum())))
        return real_trunk(tokens, speaker, valid, group_stats)

    monkeypatch.setattr(full_decoder.model, "trunk", recording_trunk)
    stream = full_decoder.stream(torch.zeros(128))
    audio = stream.push(torch.zeros(25 * 64, dtype=torch.long)) + stream.finish()
    assert sum(c.numel() for c in audio) == 25 * 64 * full_decoder.samples_per_token
    options = StreamingOptions()
    full = options.max_window_tokens
    # From the first chunk with a full left context, up to the last ones (whose right context
    # shrinks, 20 tokens at a time, towards the end).
    tail = 3 + options.lookahead_cap // options.chunk_tokens
    middle = windows[3 : len(windows) - tail]
    assert len(middle) >= 5
    assert {real for _, real in middle} == {full}
    assert len({padded for padded, _ in middle}) == 1  # one fixed (bucketed) shape


def test_finish_without_tokens_and_push_after_finish(full_decoder):
    stream = full_decoder.stream(torch.zeros(128))
    assert stream.push([]) == []
    assert stream.finish() == []
    with pytest.raises(RuntimeError, match="push after finish"):
        stream.push([1, 2, 3])


def test_bad_tokens_and_options(full_decoder):
    stream = full_decoder.stream(torch.zeros(128))
    with pytest.raises(ValueError, match="token id 12800 is outside"):
        stream.push([5, 12800])
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        full_decoder.stream(torch.zeros(128), StreamingOptions(chunk_tokens=0))
    with pytest.raises(ValueError, match="global_embedding: expected 128 floats"):
        full_decoder.stream(torch.zeros(3))


class PlaybackSimulation:
    """Simulated time, and a client that plays a stream's audio from its first chunk on."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.now = 0.0
        self.started: float | None = None
        self.stream = None

    def buffered_seconds(self) -> float:
        if self.started is None:
            return float("inf")
        return self.stream.emitted_samples / self.sample_rate - (self.now - self.started)

    def open(self, decoder: MioCodecDecoder, voice, options: StreamingOptions | None = None):
        self.stream = decoder.stream(
            voice, options, clock=self.buffered_seconds, timer=lambda: self.now
        )
        return self.stream

    def plan(self):
        """The window the stream would decode now (decoded at once, as a scheduler would)."""
        window = self.stream.next_window()
        if window is not None:
            self.stream.batcher.decode([window])
            if self.started is None:
                self.started = self.now
        return window


@pytest.fixture(scope="module")
def codes():
    gen = torch.Generator().manual_seed(12)
    return torch.randint(0, 12800, (100,), generator=gen), load_voice("en_female")


def test_first_window_waits_while_the_llm_is_fast(tiny_decoders, codes):
    """With a client listening, the first window takes the tokens that come within
    `first_wait_ms` of the first (never fewer than 6, at most 12): at 4x real time, 11 tokens;
    a third of them stay as right context."""
    tokens, voice = codes
    sim = PlaybackSimulation(24000)
    stream = sim.open(tiny_decoders["24khz"], voice)
    for i in range(10):  # a token every 10 ms (4x real time)
        sim.now = i * 0.01
        stream.push_tokens(tokens[i : i + 1])
        assert stream.next_window() is None
    sim.now = 0.1
    stream.push_tokens(tokens[10:11])
    window = sim.plan()
    assert (window.chunk_start, window.chunk_end, window.stop) == (0, 11 - 3, 11)

    fast = sim.open(tiny_decoders["24khz"], voice)  # 8x: the cap comes first
    sim.started = None
    for i in range(12):
        sim.now = i * 0.005
        fast.push_tokens(tokens[i : i + 1])
    window = sim.plan()
    assert sim.now < 0.1 and (window.chunk_end, window.stop) == (8, 12)

    slow = sim.open(tiny_decoders["24khz"], voice)  # 1.5x: 6 tokens after 133 ms
    sim.started = None
    for i in range(6):
        sim.now = i / 37.5
        slow.push_tokens(tokens[i : i + 1])
        window = sim.plan()
        assert (window is None) == (i < 5)
    assert (window.chunk_end, window.stop) == (4, 6)


def test_chunks_are_planned_just_in_time(tiny_decoders, codes):
    """After the first chunk, a chunk whose lookahead is there waits until the client's buffer
    falls below `plan_buffer_ms` (200 ms), then takes what came meanwhile; one short of its
    lookahead goes out at the deadline (`min_buffer_ms`, 60 ms) keeping 2/3 of the tokens there
    as context."""
    tokens, voice = codes
    sim = PlaybackSimulation(24000)
    stream = sim.open(tiny_decoders["24khz"], voice)
    stream.push_tokens(tokens[:12])
    assert sim.plan().chunk_end == 8  # 320 ms for the client
    stream.push_tokens(tokens[12:80])  # lookahead enough for a 20-token chunk
    sim.now = 0.119  # 201 ms left
    assert stream.next_window() is None
    sim.now = 0.121  # 199 ms left: plan, splitting the 72 tokens there 80 : 128
    window = sim.plan()
    assert (window.chunk_start, window.chunk_end, window.stop) == (8, 8 + 27, 80)

    # 35 tokens sent (1.4 s of audio); 3 more: short of the 20 + 32 a chunk waits for.
    stream.push_tokens(tokens[80:83])
    sim.now = 1.4 - 0.201  # 201 ms left
    assert stream.next_window() is None
    sim.now = 1.4 - 0.061  # 61 ms left: above the deadline, so it still waits
    assert stream.next_window() is None
    sim.now = 1.4 - 0.059  # 59 ms left: 48 tokens there, 32 stay as right context
    window = sim.plan()
    assert (window.chunk_start, window.chunk_end, window.stop) == (35, 35 + 16, 83)

    # Once the utterance is complete, nothing waits: the rest goes out in the longest chunks.
    stream.mark_finished()
    assert sim.plan().chunk_end == 83


def decode_in_pieces(decoder, tokens, voice, options) -> torch.Tensor:
    stream = decoder.stream(voice, options)
    return torch.cat(
        [c for piece in torch.split(tokens, 9) for c in stream.push(piece)] + stream.finish()
    )


def test_recomputed_statistics_count_every_frame_once(tiny_decoders, codes):
    """Recomputed statistics (the default): the slot holds the frames before the window, the
    window adds all of its own. Without left context that is the accumulated mode's sum; with
    a left context reaching the utterance's start, it is the window's frames alone; between,
    after each window the slot holds exactly the frames the next window will not cover."""
    tokens, voice = codes
    decoder = tiny_decoders["24khz"]

    def mode(statistics: StatisticsMode, left: int) -> StreamingOptions:
        return StreamingOptions(groupnorm_stats=statistics, left_context_tokens=left)

    for left, same_as in ((0, StatisticsMode.ACCUMULATED), (100, StatisticsMode.WINDOW)):
        recomputed = decode_in_pieces(decoder, tokens, voice, mode(StatisticsMode.RECOMPUTED, left))
        other = decode_in_pieces(decoder, tokens, voice, mode(same_as, left))
        assert torch.equal(recomputed, other)

    stream = decoder.stream(voice, mode(StatisticsMode.RECOMPUTED, 20))
    slots = stream.batcher.slots
    first_norm = decoder.model.group_norms[0]
    per_token = first_norm.frames_per_token * first_norm.num_channels // first_norm.num_groups
    stream.push_tokens(tokens)
    while (window := stream.next_window()) is not None:
        stream.batcher.decode([window])
        held = slots.norm_sums[slots.take(stream), 0, 0, 0].item()  # count, layer 0, group 0
        assert held == per_token * max(0, window.chunk_end - 20)


def test_batched_streams_equal_streams_decoded_alone(full_decoder):
    """Three streams arriving at different rates, their ready windows decoded together."""
    gen = torch.Generator().manual_seed(5)
    utterances = [torch.randint(0, 12800, (n,), generator=gen) for n in (90, 41, 130)]
    voices = [load_voice("en_female"), load_voice("jp_male"), torch.randn(128, generator=gen)]
    pieces = [torch.split(tokens, 7 + 3 * i) for i, tokens in enumerate(utterances)]

    alone = []
    for stream_pieces, voice in zip(pieces, voices, strict=True):
        stream = full_decoder.stream(voice)
        chunks = [c for piece in stream_pieces for c in stream.push(piece)] + stream.finish()
        alone.append(torch.cat(chunks))

    batcher = full_decoder.batcher()
    streams = [batcher.open(v) for v in voices]
    outputs: list[list[torch.Tensor]] = [[] for _ in streams]
    batch_sizes = []
    for round_index in range(max(len(p) for p in pieces) + 1):
        for stream, stream_pieces in zip(streams, pieces, strict=True):
            if round_index < len(stream_pieces):
                stream.push_tokens(stream_pieces[round_index])
            else:
                stream.mark_finished()
        while produced := batcher.step(streams):
            batch_sizes.append(len(produced))
            for i, chunk in produced.items():
                outputs[i].append(chunk)
    assert all(s.done for s in streams)
    assert max(batch_sizes) == 3  # windows of different streams did share forwards
    for solo, chunks in zip(alone, outputs, strict=True):
        batched = torch.cat(chunks)
        assert batched.shape == solo.shape
        assert (batched - solo).abs().max() <= 1e-5


def test_window_grows_only_with_tokens_already_there(full_decoder, utterance):
    """A chunk never waits for more than `lookahead_tokens`; tokens already there give it a
    longer chunk and more right context, up to the caps."""
    tokens, voice, _ = utterance
    options = StreamingOptions()
    batcher = full_decoder.batcher()
    just_in_time = batcher.open(voice, options)
    just_in_time.push_tokens(tokens[:6])
    first = just_in_time.next_window()
    assert (first.chunk_start, first.chunk_end, first.stop) == (0, 4, 6)
    batcher.decode([first])
    need = 4 + options.chunk_tokens + options.lookahead_tokens
    just_in_time.push_tokens(tokens[6 : need - 1])
    assert just_in_time.next_window() is None  # one token short of the lookahead it waits for
    just_in_time.push_tokens(tokens[need - 1 : need])
    window = just_in_time.next_window()
    assert (window.chunk_end, window.stop) == (4 + options.chunk_tokens, need)

    ahead = batcher.open(voice, options)
    ahead.push_tokens(tokens)  # the LLM ran far ahead
    first = ahead.next_window()
    assert (first.chunk_end, first.stop) == (4, 4 + options.lookahead_cap)
    batcher.decode([first])
    window = ahead.next_window()
    assert window.chunk_end == 4 + options.chunk_cap
    assert window.stop == window.chunk_end + options.lookahead_cap


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_lookahead_tokens", -1, "max_lookahead_tokens must be >= 0"),
        ("max_chunk_tokens", -5, "max_chunk_tokens must be >= 0"),
    ],
)
def test_bad_adaptive_window_options(full_decoder, field, value, message):
    with pytest.raises(ValueError, match=message):
        full_decoder.stream(torch.zeros(128), StreamingOptions(**{field: value}))


# ---- bit-identical to the decode path before its redesign ---------------------------------
#
# `tests/frozen/streaming_68f7d4f.py` is the streaming module as it was before the decode
# path was redesigned (issue 19). Both decode the same tokens here, in one process, on the
# same decoder, and the audio must be equal bit for bit: the redesign moved code, not numbers,
# and issue 20's planning and statistics, switched off by options, leave the old path as it was.
# A frozen copy rather than stored reference audio: float kernels differ between CPUs, thread
# counts and torch builds, while both copies running side by side see the same ones.


class LegacyDecoder:
    """What the frozen module read from `MioCodecDecoder` at 68f7d4f: the model and its facts
    (unchanged since), plus the stream slots the decoder held then. No CUDA graphs (CPU)."""

    cuda_graphs = None

    def __init__(self, decoder: MioCodecDecoder):
        self._decoder = decoder
        self.stream_slots = legacy.StreamSlots.for_decoder(self)

    def __getattr__(self, name: str):
        return getattr(self._decoder, name)


# Issue 20 changed what streams do on purpose (just-in-time planning, a first window that
# waits while the LLM is fast, a 60 ms deadline keeping 2/3 as context, recomputed statistics).
# Switched off, the decode path must still be the one before, bit for bit: these options.
BEFORE_ISSUE_20 = {
    "plan_buffer_ms": 0,
    "first_wait_ms": 0,
    "min_buffer_ms": 150.0,
    "early_lookahead_share": 0.5,
}


def switched_off(options: StreamingOptions) -> StreamingOptions:
    return dataclasses.replace(options, **BEFORE_ISSUE_20)


def legacy_options(options: StreamingOptions) -> legacy.StreamingOptions:
    known = {field.name for field in dataclasses.fields(legacy.StreamingOptions)}
    values = {field.name: getattr(options, field.name) for field in dataclasses.fields(options)}
    values = {name: value for name, value in values.items() if name in known}
    values["groupnorm_stats"] = options.groupnorm_stats.value
    return legacy.StreamingOptions(**values)


def drive(open_stream, forward, voices, utterances, sample_rate: int) -> list[list]:
    """Streams fed side by side, token i of each at i / 37.5 s of a simulated clock (1.5x real
    time), and decoded in shared steps (`forward(windows)` -> their chunks, applied) after each
    arrival; each stream's chunks. Each stream's client starts playing its first chunk at once,
    so its buffer runs low early on and chunks go out before their lookahead."""
    now = 0.0
    first_at: list[float | None] = [None] * len(voices)
    streams: list = []

    def clock_of(i: int):
        def buffered_seconds() -> float:
            if first_at[i] is None:
                return float("inf")
            return streams[i].emitted_samples / sample_rate - (now - first_at[i])

        return buffered_seconds

    streams += [open_stream(voice, clock_of(i)) for i, voice in enumerate(voices)]
    chunks: list[list] = [[] for _ in streams]
    for arrived in range(1, max(len(u) for u in utterances) + 2):
        now = arrived / 37.5
        for stream, tokens in zip(streams, utterances, strict=True):
            if arrived <= len(tokens):
                stream.push_tokens(tokens[arrived - 1 : arrived])
            else:
                stream.mark_finished()
        while ready := [(i, w) for i, s in enumerate(streams) if (w := s.next_window())]:
            for (i, _), chunk in zip(ready, forward([w for _, w in ready]), strict=True):
                chunks[i].append(chunk)
                if first_at[i] is None:
                    first_at[i] = now
    assert all(stream.done for stream in streams)
    return chunks


def assert_bit_identical(before: list, after: list) -> None:
    assert [c.numel() for c in before] == [c.numel() for c in after]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("statistics", [StatisticsMode.ACCUMULATED, StatisticsMode.WINDOW])
def test_a_stream_alone_is_bit_identical_to_before(full_decoder, utterance, statistics):
    """Through the documented API: `decoder.stream(voice, options)`, `push`, `finish`."""
    tokens, voice, _ = utterance
    options = switched_off(StreamingOptions(groupnorm_stats=statistics))
    streams = [
        legacy.TokenStreamDecoder(LegacyDecoder(full_decoder), voice, legacy_options(options)),
        full_decoder.stream(voice, options),
    ]
    before, after = (
        [c for piece in torch.split(tokens[:120], 7) for c in s.push(piece)] + s.finish()
        for s in streams
    )
    assert_bit_identical(before, after)
    assert streams[1].emitted_samples == 120 * full_decoder.samples_per_token


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["exact-shapes", "fixed-shapes"])
def test_batched_streams_on_a_playback_clock_are_bit_identical_to_before(
    full_decoder, fixed_shapes
):
    """Three streams decoded in shared steps while their clients' buffers force chunks out
    early (checked below). `fixed_shapes` pads the steps as CUDA graphs replay them (run
    eagerly here)."""
    gen = torch.Generator().manual_seed(7)
    utterances = [torch.randint(0, 12800, (n,), generator=gen) for n in (70, 35, 90)]
    voices = [load_voice("en_female"), load_voice("jp_male"), torch.randn(128, generator=gen)]
    options = switched_off(StreamingOptions(groupnorm_stats=StatisticsMode.ACCUMULATED))
    rate = full_decoder.sample_rate
    old = LegacyDecoder(full_decoder)
    before = drive(
        lambda voice, clock: legacy.TokenStreamDecoder(old, voice, legacy_options(options), clock),
        lambda windows: legacy.forward_windows(old, windows, fixed_shapes=fixed_shapes).apply(),
        voices,
        utterances,
        rate,
    )
    batcher = full_decoder.batcher()
    after = drive(
        lambda voice, clock: batcher.open(voice, options, clock),
        lambda windows: batcher.forward(windows, fixed_shapes=fixed_shapes).apply(),
        voices,
        utterances,
        rate,
    )
    for old_chunks, new_chunks in zip(before, after, strict=True):
        assert_bit_identical(old_chunks, new_chunks)
    middle = [c.numel() for chunks in after for c in chunks[1:-1]]
    assert min(middle) < options.chunk_tokens * full_decoder.samples_per_token  # forced early
    assert batcher.slots_in_use == 0
