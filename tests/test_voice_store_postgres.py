"""The PostgreSQL voice store against a real PostgreSQL (Debian's, started by the tests):
the same contract as SQLite, exclusive creates across stores (replicas), a server that is
down reported as VoiceStoreUnavailable, and --voice-store parsing."""

from __future__ import annotations

import threading

import pytest
import torch

from miotts_stream.voices import (
    SQLiteVoiceStore,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    VoiceStoreUnavailable,
    export_embedding,
    open_voice_store,
)
from miotts_stream.voices.postgres import PostgresVoiceStore


def record(voice_id: str, seed: int = 0, **kwargs) -> VoiceRecord:
    embedding = torch.randn(128, generator=torch.Generator().manual_seed(seed))
    return VoiceRecord(voice_id=voice_id, embedding=embedding, **kwargs)


def test_create_get_list_delete_across_two_stores(postgres_url):
    a = open_voice_store(postgres_url)
    b = open_voice_store(postgres_url)  # another replica on the same database
    try:
        assert isinstance(a, PostgresVoiceStore) and "password" not in a.describe()
        made = a.create(record("alice", 1, display_name="Alice", language="en", duration_seconds=4))
        assert made.created_at > 0 and made.display_name == "Alice"
        b.create(record("bob", 2))
        with pytest.raises(VoiceExists, match="alice"):
            b.create(record("alice", 3))

        assert [r.voice_id for r in b.list()] == ["alice", "bob"]
        alice = b.get("alice")
        assert torch.equal(alice.embedding, record("alice", 1).embedding)
        assert (alice.language, alice.duration_seconds, alice.created_at) == (
            "en",
            4,
            made.created_at,
        )

        b.delete("bob")
        with pytest.raises(VoiceNotFound, match="bob"):
            a.get("bob")  # no stale copy on the other replica
        with pytest.raises(VoiceNotFound):
            a.delete("bob")
        assert "alice" in a and "bob" not in a
    finally:
        a.close()
        b.close()


def test_concurrent_creates_on_several_stores_leave_exactly_one(postgres_url):
    open_voice_store(postgres_url).close()  # schema in place, as a running server would have it
    stores = [PostgresVoiceStore(postgres_url) for _ in range(6)]  # six "replicas"
    start = threading.Barrier(len(stores))
    outcomes: list[str] = []

    def create(seed: int) -> None:
        start.wait(timeout=30)
        try:
            stores[seed].create(record("same", seed))
            outcomes.append(f"created {seed}")
        except VoiceExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=create, args=(seed,)) for seed in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        winners = [o for o in outcomes if o.startswith("created")]
        assert len(outcomes) == len(stores) and len(winners) == 1
        seed = int(winners[0].split()[1])
        stored = stores[0].list()
        assert len(stored) == 1 and torch.equal(stored[0].embedding, record("same", seed).embedding)
    finally:
        for store in stores:
            store.close()


def test_replicas_starting_together_all_get_the_schema(postgres_url):
    """CREATE TABLE IF NOT EXISTS from several processes at once must not fail any of them."""
    start = threading.Barrier(4)
    opened: list[PostgresVoiceStore] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        start.wait(timeout=30)
        try:
            opened.append(PostgresVoiceStore(postgres_url))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for store in opened:
        store.close()
    assert not errors and len(opened) == 4


def test_an_unreachable_database_is_unavailable_not_a_driver_error(postgres_server, tmp_path):
    missing = f"postgresql://miotts@/voices?host={tmp_path}"  # no server has its socket there
    with pytest.raises(VoiceStoreUnavailable, match="cannot reach"):
        PostgresVoiceStore(missing, connect_timeout_s=1.0)


def test_a_database_that_goes_away_is_unavailable_then_back(postgres_server, postgres_url):
    import psycopg

    store = PostgresVoiceStore(postgres_url, connect_timeout_s=1.0)
    try:
        store.create(record("kept", 1))
        dbname = psycopg.conninfo.conninfo_to_dict(postgres_url)["dbname"]
        # Every connection of the store is cut, as a database restart or failover would.
        with psycopg.connect(postgres_server.url("postgres"), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (dbname,),
            )
        # The pool replaces dead connections on checkout: the next call just works.
        assert store.get("kept").voice_id == "kept"
    finally:
        store.close()
    with pytest.raises(VoiceStoreUnavailable):
        store.get("kept")  # closed: no connection to be had


def test_voice_store_specs(tmp_path):
    default = open_voice_store(None, tmp_path / "dir")
    assert isinstance(default, SQLiteVoiceStore) and default.path.parent == tmp_path / "dir"
    file_store = open_voice_store(f"sqlite://{tmp_path}/elsewhere/v.db")
    assert isinstance(file_store, SQLiteVoiceStore)
    assert file_store.path == tmp_path / "elsewhere" / "v.db" and file_store.path.exists()
    with pytest.raises(ValueError, match="--voice-store"):
        open_voice_store("mysql://x/y")
    with pytest.raises(ValueError, match="names no file"):
        open_voice_store("sqlite://")


def test_the_command_line_works_on_the_shared_store(postgres_url, tmp_path, capsys):
    from miotts_stream.voices.__main__ import run

    path = export_embedding(record("x", 7).embedding, tmp_path / "v.pt")
    imported = ["import", "--id", "cli-voice", "--file", str(path)]
    assert run(["--voice-store", postgres_url, *imported]) == 0
    assert run(["--voice-store", postgres_url, "list"]) == 0
    assert "cli-voice" in capsys.readouterr().out
    store = open_voice_store(postgres_url)  # what a server on the same database sees
    try:
        assert torch.equal(store.get("cli-voice").embedding, record("x", 7).embedding)
        assert run(["--voice-store", postgres_url, "delete", "--id", "cli-voice"]) == 0
        assert "cli-voice" not in store
    finally:
        store.close()
