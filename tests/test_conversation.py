"""One connection per conversation: many utterances ("contexts") on one WebSocket
(`/v1/conversation`) or one gRPC call (`Converse`), with word timings. A real server on
loopback (the in-process stand-in LLM, the tiny codec checkpoint), API keys on, driven by the
`websockets` package and grpcio."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import numpy as np
import pytest
import pytest_asyncio
import websockets

from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc

from .conversations import ContextRecord, check_words_and_segments
from .servers import released, running_server, tiny_codec_options

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "conversation-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
METADATA = (("authorization", f"Bearer {KEY}"),)
RATE = 24000
SPT = 960
STANDIN_RATE = 100.0
IDLE_S = 1.5  # the conversation idle limit of this module's server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory):
    options = tiny_codec_options(
        llm_standin_rate=STANDIN_RATE,
        data_dir=str(tmp_path_factory.mktemp("voices")),
        http_port=0,
        max_streams=4,
        max_text_chars=2000,
        api_keys=[KEY],
        conversation_idle_timeout_s=IDLE_S,
    )
    async with running_server(options) as srv:
        yield srv


# ---- the WebSocket ---------------------------------------------------------------------------


class Conversation:
    """A WebSocket conversation as a client sees it: messages out, each context's record in."""

    def __init__(self, ws):
        self.ws = ws
        self.contexts: dict[str, ContextRecord] = {}
        self.order: list[str] = []  # the context of each audio frame, in arrival order
        self.errors: list[dict] = []  # errors of the conversation itself
        self.ready: dict | None = None
        self._header: dict | None = None

    async def send(self, **message) -> None:
        await self.ws.send(json.dumps(message))

    async def words(self, context_id: str, text: str, gap_s: float = 0.0) -> None:
        """Text as an LLM streams it: word by word."""
        for word in text.split(" "):
            await self.send(type="text", context_id=context_id, text=word + " ")
            if gap_s:
                await asyncio.sleep(gap_s)

    def record(self, context_id: str) -> ContextRecord:
        return self.contexts.setdefault(context_id, ContextRecord())

    def take(self, message) -> dict | None:
        """File one message; returns it (JSON) or None for an audio frame."""
        if isinstance(message, bytes):
            header, self._header = self._header, None
            assert header is not None and header["bytes"] == len(message)
            self.record(header["context_id"]).chunk(
                header["start_sample"], header["num_samples"], message
            )
            self.order.append(header["context_id"])
            return None
        message = json.loads(message)
        kind, context_id = message["type"], message.get("context_id")
        assert self._header is None, "a header's frame must follow it at once"
        if kind == "ready":
            self.ready = message
        elif kind == "audio":
            self._header = message
        elif kind == "segment":
            self.record(context_id).segment(
                message["kind"],
                message["segment_index"],
                message["text"],
                message["audio_start_sample"],
                message.get("audio_end_sample", 0),
            )
        elif kind == "words":
            assert message["estimated"] is True
            words = [(w["word"], w["start_sample"], w["end_sample"]) for w in message["words"]]
            self.record(context_id).timed(message["segment_index"], words)
        elif kind == "flushed":
            self.record(context_id).flushed.append(message["id"])
        elif kind == "done":
            self.record(context_id).done = message
        elif kind == "cancelled":
            self.record(context_id).cancelled = True
        elif kind == "error" and context_id is not None:
            self.record(context_id).error = message
        elif kind == "error":
            self.errors.append(message)
        else:
            raise AssertionError(message)
        if context_id is not None:  # nothing of a context after its last message
            record = self.record(context_id)
            ends = [record.done is not None, record.cancelled, record.error is not None]
            assert sum(ends) <= 1 or (kind == "cancelled" and record.error is None), message
        return message

    async def until(self, predicate, timeout: float = 20.0) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                message = self.take(await self.ws.recv())
                if message is not None and predicate(message):
                    return message

    async def rest(self) -> None:
        """Everything until the server closes."""
        try:
            async for message in self.ws:
                self.take(message)
        except websockets.ConnectionClosedError:
            pass


def connect(server, **kwargs):
    url = f"ws://127.0.0.1:{server.http_port}/v1/conversation"
    return websockets.connect(url, additional_headers=AUTH, max_size=None, **kwargs)


def config(**fields) -> dict:
    return {
        "type": "config",
        "word_timestamps": True,
        "generation": {"max_tokens": 40, "seed": 1},
        **fields,
    }


def text(context_id: str, text: str, **fields) -> dict:
    return {"type": "text", "context_id": context_id, "text": text, **fields}


def pcm_samples(record: ContextRecord) -> int:
    return len(record.audio) // 2


async def test_one_connection_carries_many_contexts_in_order(server):
    """Text streamed word by word into a context; a second context opened while the first
    still plays: its audio follows, in order; flushes are acknowledged per context; the
    connection, its config and its key stay open across contexts; words and segments keep
    their invariants."""
    async with connect(server, subprotocols=["miotts.conversation.v1"]) as ws:
        assert ws.subprotocol == "miotts.conversation.v1"
        client = Conversation(ws)
        await client.send(**config())
        ready = await client.until(lambda m: m["type"] == "ready")
        assert ready["version"] == 1 and ready["sample_rate_hz"] == RATE
        assert ready["word_timestamps"] is True
        conversation_id = ready["conversation_id"]
        assert ws.response.headers["X-Request-Id"] == conversation_id

        await client.words("a", "Hello there, how are you doing today? I am fine.", 0.01)
        await client.send(type="flush", context_id="a", id="a-1")
        await client.until(lambda m: m["type"] == "audio" and m["context_id"] == "a")
        # The next turn opens while the first still plays.
        await client.words("b", "And this is the second turn.")
        await client.send(type="flush", context_id="b", id=7)
        await client.send(type="end", context_id="a")
        await client.send(type="end", context_id="b")
        await client.until(lambda m: m["type"] == "done" and m["context_id"] == "b")
        # Still open: a third context, then the conversation is closed.
        await client.words("c", "Third.")
        await client.send(type="close")
        await client.rest()
    assert ws.close_code == 1000 and ws.close_reason == "done"

    # Contexts in the order they opened: all of a's audio, then b's, then c's.
    assert client.order == sorted(client.order)
    for n, name in enumerate("abc", 1):
        record = client.contexts[name]
        assert record.done is not None and record.done["request_id"] == f"{conversation_id}.{n}"
        assert record.chunks[0].start == 0  # positions from the context's own start
        assert pcm_samples(record) == record.done["generated_tokens"] * SPT
        check_words_and_segments(record, pcm_samples(record))
    assert client.contexts["a"].flushed == ["a-1"] and client.contexts["b"].flushed == [7]
    assert [s.text for s in client.contexts["a"].segments] == [
        "Hello there, how are you doing today?",
        "I am fine.",
    ]
    await released(server)


async def test_cancel_is_acknowledged_its_audio_stops_and_the_connection_goes_on(server):
    async with connect(server) as ws:
        client = Conversation(ws)
        await client.send(**config(generation={"max_tokens": 300}))
        await client.words("long", "A long sentence that will be cut short by the caller. " * 3)
        await client.send(type="flush", context_id="long")
        await client.until(lambda m: m["type"] == "audio")
        # A context waiting behind the one playing is cancelled at once, without playing.
        await client.words("queued", "Never heard.")
        await client.send(type="cancel", context_id="queued")
        await client.until(lambda m: m["type"] == "cancelled" and m["context_id"] == "queued")
        cancelled_at = time.perf_counter()
        await client.send(type="cancel", context_id="long")
        await client.until(lambda m: m["type"] == "cancelled" and m["context_id"] == "long")
        acked_in = time.perf_counter() - cancelled_at
        audio_before = len(client.order)
        await released(server)  # its LLM request and its decoding stopped, its slot is free
        # Cancelling what is over or unknown is acknowledged too; late messages are dropped.
        await client.send(type="cancel", context_id="long")
        await client.until(lambda m: m["type"] == "cancelled")
        await client.send(type="text", context_id="long", text="too late")
        # The same connection speaks the next turn.
        await client.words("next", "Still here.")
        await client.send(type="end", context_id="next")
        await client.until(lambda m: m["type"] == "done")
        await client.send(type="close")
        await client.rest()
    assert "long" not in client.order[audio_before:]  # nothing of it after the ack
    assert "queued" not in client.order and client.contexts["queued"].chunks == []
    assert client.contexts["next"].done is not None
    assert acked_in < 1.0, acked_in
    await released(server)


@pytest.mark.parametrize(
    ("messages", "field", "words"),
    [
        ([text("x", "Hi.", config={"voice": {"preset": "nobody"}})], "voice.preset",
         "unknown preset"),
        ([text("x", "Hi.", config={"audio": {"encoding": "MULAW"}})], "config.audio",
         "the conversation's"),
        ([{"type": "text", "context_id": "x", "text": "x" * 3000}], "text", "exceeds the limit"),
        ([{"type": "flush", "context_id": "nobody"}], "context_id", "no context 'nobody'"),
        ([{"type": "text", "context_id": "x", "text": " "}, {"type": "end", "context_id": "x"}],
         "text", "no text"),
    ],
)  # fmt: skip
async def test_a_contexts_error_is_its_own_and_the_conversation_goes_on(
    server, messages, field, words
):
    async with connect(server) as ws:
        client = Conversation(ws)
        await client.send(**config())
        for message in messages:
            await client.send(**message)
        error = await client.until(lambda m: m["type"] == "error")
        assert error["field"] == field and words in error["message"], error
        assert error["context_id"] in ("x", "nobody")
        await client.words("fine", "This one works.")
        await client.send(type="end", context_id="fine")
        await client.until(lambda m: m["type"] == "done")
        await client.send(type="close")
        await client.rest()
    assert ws.close_code == 1000
    await released(server)


@pytest.mark.parametrize(
    ("messages", "code", "field"),
    [
        (["{not json"], "INVALID_ARGUMENT", None),
        ([json.dumps(text("a", "hi"))], "INVALID_ARGUMENT", "config"),
        ([json.dumps(config(version=2))], "INVALID_ARGUMENT", "version"),
        ([json.dumps(config(voice={"preset": "nobody"}))], "NOT_FOUND", "voice.preset"),
        ([json.dumps(config()), json.dumps({"type": "text", "text": "hi"})], "INVALID_ARGUMENT",
         "context_id"),
        ([json.dumps(config()), json.dumps(config())], "INVALID_ARGUMENT", "config"),
        ([json.dumps(config()), json.dumps({"type": "end", "context_id": "a", "x": 1})],
         "INVALID_ARGUMENT", "x"),
    ],
)  # fmt: skip
async def test_a_bad_message_ends_the_conversation_naming_the_field(server, messages, code, field):
    async with connect(server) as ws:
        client = Conversation(ws)
        for message in messages:
            await ws.send(message)
        await client.rest()
    (error,) = client.errors
    assert error["code"] == code and error.get("field") == field, error
    assert ws.close_code in (1008, 1011)
    await released(server)


async def test_a_bad_message_while_audio_streams_ends_it_cleanly(server):
    """The conversation ends mid-audio: every audio header still comes with its frame, then
    the error; the context's work stops."""
    async with connect(server) as ws:
        client = Conversation(ws)
        await client.send(**config(generation={"max_tokens": 300}))
        await client.words("a", "A long sentence that is cut by a bad message. " * 3)
        await client.send(type="flush", context_id="a")
        await client.until(lambda m: m["type"] == "audio")
        await client.send(type="bogus")
        await client.rest()  # Conversation.take checks each header's frame follows it
    (error,) = client.errors
    assert error["field"] == "type" and ws.close_code == 1008
    await released(server)


async def test_an_idle_conversation_is_closed_after_its_limit(server):
    async with connect(server) as ws:
        client = Conversation(ws)
        await client.send(**config())
        await client.words("a", "Short.")
        await client.send(type="end", context_id="a")
        await client.until(lambda m: m["type"] == "done")
        done_at = time.perf_counter()
        await client.rest()  # nothing more is sent
    (error,) = client.errors
    assert error["code"] == "DEADLINE_EXCEEDED" and "idle conversation" in error["message"]
    assert IDLE_S * 0.9 <= time.perf_counter() - done_at < IDLE_S + 5
    await released(server)


# ---- gRPC ------------------------------------------------------------------------------------


def request(**fields) -> tts_pb2.ConverseRequest:
    return tts_pb2.ConverseRequest(**fields)


async def test_grpc_converse_has_the_same_semantics(server):
    """Contexts in order on one call, the next opening while the first plays, cancel with its
    acknowledgement and no audio after it, a context's error, flushes, words at 8 kHz mu-law
    (resampled) keeping their invariants."""
    outgoing: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (message := await outgoing.get()) is not None:
            yield message

    records: dict[str, ContextRecord] = {}
    order, flushed = [], []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = tts_pb2_grpc.TextToSpeechStub(channel).Converse(requests(), metadata=METADATA)
        mulaw = tts_pb2.AudioFormat(encoding=tts_pb2.MULAW, sample_rate_hz=8000)
        generation = tts_pb2.GenerationOptions(max_tokens=300, seed=2)
        await outgoing.put(
            request(config=tts_pb2.SynthesisConfig(
                audio=mulaw, generation=generation, word_timestamps=True))
        )  # fmt: skip
        for word in ("One", "short", "turn,", "spoken", "first.", "Then", "more."):
            await outgoing.put(request(context_id="a", text=word + " "))
        await outgoing.put(request(context_id="a", end_of_input=tts_pb2.EndOfInput()))
        await outgoing.put(request(context_id="b", text="A long second turn, cut. " * 8))
        await outgoing.put(request(context_id="b", flush=tts_pb2.Flush(id="f")))
        bad = tts_pb2.SynthesisConfig(voice=tts_pb2.Voice(preset="nobody"))
        await outgoing.put(request(context_id="c", text="Hi.", context_config=bad))
        ready = None
        async for response in call:
            kind = response.WhichOneof("response")
            if kind == "ready":
                ready = response.ready
                continue
            record = records.setdefault(response.context_id, ContextRecord())
            if kind == "audio":
                audio = response.audio
                assert not record.cancelled  # nothing of a context after its cancelled
                record.chunk(audio.start_sample, audio.num_samples, audio.data)
                order.append(response.context_id)
                if response.context_id == "b" and len(record.chunks) == 2:
                    await outgoing.put(request(context_id="b", cancel=tts_pb2.Cancel()))
            elif kind == "segment":
                segment = response.segment
                finished = segment.kind == tts_pb2.SegmentEvent.FINISHED
                record.segment(
                    "finished" if finished else "started",
                    segment.segment_index,
                    segment.text,
                    segment.audio_start_sample,
                    segment.audio_end_sample,
                )
            elif kind == "words":
                assert response.words.estimated
                words = [(w.word, w.start_sample, w.end_sample) for w in response.words.words]
                record.timed(response.words.segment_index, words)
            elif kind == "flushed":
                flushed.append(response.flushed.id)
            elif kind == "done":
                record.done = {"tokens": response.done.generated_tokens}
            elif kind == "cancelled":
                record.cancelled = True
                await outgoing.put(request(close=tts_pb2.CloseConversation()))
            elif kind == "error":
                record.error = response.error
        assert await call.code() == grpc.StatusCode.OK
        request_id = dict(await call.initial_metadata())["x-request-id"]
    assert ready.conversation_id == request_id and ready.sample_rate_hz == 8000
    assert order == sorted(order)  # a's audio, then b's
    a, b, c = records["a"], records["b"], records["c"]
    check_words_and_segments(a, len(a.audio))  # mu-law: a byte a sample
    assert len(a.audio) == a.done["tokens"] * SPT // 3
    assert b.cancelled and b.done is None and len(b.chunks) >= 2
    assert c.error.code == tts_pb2.ContextError.NOT_FOUND and c.error.field == "voice.preset"
    assert flushed == []  # b was cancelled before its flushed text was out
    await released(server)


async def test_grpc_streaming_synthesize_sends_words_when_asked(server):
    """Word timings on the one-utterance stream too (resampled to 16 kHz), only when asked."""
    text = "Words on the old stream, timed. And a second sentence."
    results = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        for asked in (True, False):
            config = tts_pb2.SynthesisConfig(
                audio=tts_pb2.AudioFormat(encoding=tts_pb2.PCM_S16LE, sample_rate_hz=16000),
                generation=tts_pb2.GenerationOptions(max_tokens=60, seed=4),
                word_timestamps=asked,
            )
            record = ContextRecord()
            call = stub.Synthesize(
                tts_pb2.SynthesizeRequest(config=config, text=text), metadata=METADATA
            )
            async for response in call:
                kind = response.WhichOneof("response")
                if kind == "audio":
                    record.chunk(
                        response.audio.start_sample, response.audio.num_samples, response.audio.data
                    )
                elif kind == "segment":
                    s = response.segment
                    record.segment(
                        "finished" if s.kind == s.FINISHED else "started",
                        s.segment_index,
                        s.text,
                        s.audio_start_sample,
                        s.audio_end_sample,
                    )
                elif kind == "words":
                    record.timed(
                        response.words.segment_index,
                        [(w.word, w.start_sample, w.end_sample) for w in response.words.words],
                    )
            results[asked] = record
    check_words_and_segments(results[True], len(results[True].audio) // 2)
    assert results[False].words == []
    assert np.frombuffer(results[True].audio, "<i2").size == len(results[False].audio) // 2
    await released(server)
