"""The voice store: persistence across restarts and processes, atomic and exclusive creates,
upstream-compatible preset files, and the command line on the same store."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from miotts_stream.audio.reference import AudioLimits
from miotts_stream.bench.hostile import flac_bomb
from miotts_stream.codec.voices import load_voice_file
from miotts_stream.voices import (
    SQLiteVoiceStore,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    export_embedding,
)
from miotts_stream.voices.registry import embed_reference_audio
from miotts_stream.voices.store import DB_FILE

from .audio_files import encode, voice_like
from .conftest import TINY_CODECS

ROOT = Path(__file__).resolve().parents[1]


def record(voice_id: str, seed: int = 0, **kwargs) -> VoiceRecord:
    embedding = torch.randn(128, generator=torch.Generator().manual_seed(seed))
    return VoiceRecord(voice_id=voice_id, embedding=embedding, **kwargs)


def test_create_get_list_delete_and_restart(tmp_path):
    store = SQLiteVoiceStore(tmp_path)
    made = store.create(record("alice", 1, display_name="Alice", language="en", duration_seconds=4))
    assert made.created_at > 0 and made.display_name == "Alice"
    store.create(record("bob", 2))
    with pytest.raises(VoiceExists, match="alice"):
        store.create(record("alice", 3))

    reopened = SQLiteVoiceStore(tmp_path)  # a restart: a new store on the same folder
    assert [r.voice_id for r in reopened.list()] == ["alice", "bob"]
    alice = reopened.get("alice")
    assert torch.equal(alice.embedding, record("alice", 1).embedding)
    assert (alice.language, alice.duration_seconds, alice.created_at) == ("en", 4, made.created_at)

    reopened.delete("bob")
    with pytest.raises(VoiceNotFound, match="bob"):
        store.get("bob")
    with pytest.raises(VoiceNotFound):
        store.delete("bob")
    assert "alice" in store and "bob" not in store


@pytest.mark.parametrize("bad", ["", "Upper", "has space", "x" * 65, "dots.no", "ü"])
def test_voice_ids_are_checked(bad):
    with pytest.raises(ValueError, match="voice_id"):
        record(bad)


def test_concurrent_creates_of_one_id_leave_exactly_one(tmp_path):
    SQLiteVoiceStore(tmp_path)  # schema in place, as a running server would have it
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def create(seed: int) -> None:
        store = SQLiteVoiceStore(tmp_path)  # its own connection, as another replica would
        start.wait(timeout=30)
        try:
            store.create(record("same", seed))
            outcomes.append(f"created {seed}")
        except VoiceExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=create, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [o for o in outcomes if o.startswith("created")]
    assert len(outcomes) == 8 and len(winners) == 1
    seed = int(winners[0].split()[1])
    stored = SQLiteVoiceStore(tmp_path).list()
    assert len(stored) == 1 and torch.equal(stored[0].embedding, record("same", seed).embedding)


def test_a_writer_that_dies_mid_write_leaves_no_voice(tmp_path):
    store = SQLiteVoiceStore(tmp_path)
    # Another process starts inserting a voice and dies before committing.
    code = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('BEGIN')\n"
        "db.execute(\"INSERT INTO voices VALUES ('ghost', '', '', x'00000000', 1, 0, 0, "
        "'audio', '')\")\n"
        "os._exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / DB_FILE)], timeout=60)
    assert done.returncode == 3
    assert store.list() == [] and "ghost" not in store
    store.create(record("ghost"))  # the id is free


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_is_an_upstream_preset_file(tmp_path, suffix):
    embedding = record("x", 5).embedding
    path = export_embedding(embedding, tmp_path / f"voice{suffix}")
    if suffix == ".pt":  # upstream: torch.save(features.global_embedding) -> a bare tensor
        raw = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        (raw,) = load_file(str(path)).values()
    assert raw.dtype == torch.float32 and raw.shape == (128,)
    assert torch.equal(raw, embedding)
    assert torch.equal(load_voice_file(path), embedding)  # and --presets-dir reads it
    with pytest.raises(ValueError, match=r"\.pt or \.safetensors"):
        export_embedding(embedding, tmp_path / "voice.npy")


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "miotts_stream.voices", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )


def test_cli_create_list_export_import_delete(tmp_path, tiny_wavlm, tiny_encoder):
    audio = tmp_path / "me.flac"
    audio.write_bytes(encode(voice_like(3.0, 48000, seed=2), 48000, "flac"))
    codec = ["--codec", str(TINY_CODECS["24khz"]), "--ssl-model", str(tiny_wavlm)]
    made = cli(tmp_path, "create", "--audio", str(audio), "--id", "me", "--name", "Me", *codec)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("created me\tMe\t-\t3.0 s")

    again = cli(tmp_path, "create", "--audio", str(audio), "--id", "me", *codec)
    assert again.returncode == 1 and "exists already" in again.stderr
    preset = cli(tmp_path, "create", "--audio", str(audio), "--id", "en_female", *codec)
    assert preset.returncode == 1 and "preset" in preset.stderr
    short = tmp_path / "short.wav"
    short.write_bytes(encode(voice_like(0.3, 24000), 24000))
    bad = cli(tmp_path, "create", "--audio", str(short), "--id", "short", *codec)
    assert bad.returncode == 1 and "too short" in bad.stderr
    bomb = tmp_path / "bomb.flac"  # 150 KB of FLAC holding 1800 s at 384 kHz, undeclared
    bomb.write_bytes(flac_bomb(1800, 384000, declare=False))
    bad = cli(tmp_path, "create", "--audio", str(bomb), "--id", "bomb", *codec)
    assert bad.returncode == 1 and "more than 30 s is too long" in bad.stderr

    exported = cli(tmp_path, "export", "--id", "me", "--out", str(tmp_path / "me.pt"))
    assert exported.returncode == 0, exported.stderr
    stored = SQLiteVoiceStore(tmp_path).get("me")
    expected, _ = embed_reference_audio(tiny_encoder, audio.read_bytes(), AudioLimits())
    torch.testing.assert_close(stored.embedding, expected, atol=1e-5, rtol=0)
    assert torch.equal(torch.load(tmp_path / "me.pt", weights_only=True), stored.embedding)
    imported = cli(tmp_path, "import", "--id", "me2", "--file", str(tmp_path / "me.pt"))
    assert imported.returncode == 0, imported.stderr
    assert torch.equal(SQLiteVoiceStore(tmp_path).get("me2").embedding, stored.embedding)

    listed = cli(tmp_path, "list")
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["me", "me2"]
    assert cli(tmp_path, "delete", "--id", "me").returncode == 0
    gone = cli(tmp_path, "delete", "--id", "me")
    assert gone.returncode == 1 and "no stored voice" in gone.stderr
    assert [r.voice_id for r in SQLiteVoiceStore(tmp_path).list()] == ["me2"]


async def test_embedding_runs_off_the_event_loop(tmp_path, tiny_encoder):
    """While a clone is held up inside the encoder, the event loop keeps answering: other
    voice requests complete, and the clone finishes once released."""
    import asyncio

    from miotts_stream.codec.voices import VoiceLibrary
    from miotts_stream.voices.registry import VoiceRegistry

    release = threading.Event()
    entered = threading.Event()

    def gated_encoder():
        entered.set()
        assert release.wait(timeout=60)
        return tiny_encoder

    registry = VoiceRegistry(SQLiteVoiceStore(tmp_path), VoiceLibrary(), gated_encoder)
    try:
        registry.store.create(record("already"))
        clip = encode(voice_like(2.0, 24000, seed=8), 24000)
        creating = asyncio.ensure_future(registry.create("new", clip))
        assert await asyncio.to_thread(entered.wait, 60)
        listed = await registry.list()  # answered while the worker is blocked
        assert [r.voice_id for r in listed] == ["already"] and not creating.done()
        release.set()
        made = await asyncio.wait_for(creating, timeout=120)
        assert made.voice_id == "new" and "new" in registry.store
        assert registry.embeddings_computed == 1
    finally:
        release.set()
        registry.close()
