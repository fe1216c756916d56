"""Persistent voices: a `VoiceStore` interface and its embedded SQLite implementation.

A stored voice is a speaker embedding with an id, a display name, a language and where it came
from. The server, its CLI (`python -m miotts_stream.voices`) and later replicas share voices
through the store, so everything a caller needs goes through the interface; a shared database
backend can implement it for several replicas.

SQLite gives what the service relies on: a voice is written in one transaction (a crash never
leaves half a voice), and the primary key makes concurrent creates of one id leave exactly one.
Each operation opens its own connection, so any thread and any process may use the store.
"""

from __future__ import annotations

import abc
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch

from miotts_stream.errors import FieldError

VOICE_ID = re.compile(r"[a-z0-9_-]{1,64}")  # matched whole (fullmatch): no trailing newline
MAX_DISPLAY_NAME_CHARS = 200
MAX_LANGUAGE_CHARS = 35  # a BCP 47 tag
DEFAULT_DATA_DIR = Path(".data")
DB_FILE = "voices.sqlite3"


class VoiceExists(Exception):
    """A voice with this id exists already (a stored voice or a preset)."""

    field = "voice_id"


class VoiceStoreUnavailable(RuntimeError):
    """The store cannot be reached now (a shared database down or out of connections): a
    temporary condition, reported to clients as UNAVAILABLE; the server keeps serving presets."""


class VoiceNotFound(KeyError):
    """No voice with this id."""

    field = "voice_id"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "voice not found"


class VoiceSource(StrEnum):
    AUDIO = "audio"  # embedded from reference audio
    IMPORTED = "imported"  # read from an embedding file


def check_voice_id(voice_id: str, what: str = "voice_id") -> str:
    if not isinstance(voice_id, str) or not VOICE_ID.fullmatch(voice_id):
        raise FieldError(what, f"{voice_id!r} is not a valid id (1 to 64 of a-z, 0-9, '_' and '-')")
    return voice_id


def check_display_name(name: str) -> str:
    if len(name) > MAX_DISPLAY_NAME_CHARS or any(ord(c) < 32 for c in name):
        raise FieldError(
            "display_name", f"at most {MAX_DISPLAY_NAME_CHARS} characters, no control characters"
        )
    return name


def check_language(language: str) -> str:
    if len(language) > MAX_LANGUAGE_CHARS or not re.fullmatch(r"[A-Za-z0-9-]*", language):
        raise FieldError("language", f"{language!r} is not a language tag such as 'en' or 'ja'")
    return language


@dataclass(frozen=True)
class VoiceRecord:
    voice_id: str
    embedding: torch.Tensor  # float32 (dim,)
    display_name: str = ""
    language: str = ""
    duration_seconds: float = 0.0  # of the reference audio used; 0 for imported voices
    created_at: float = 0.0  # Unix time, seconds
    source: VoiceSource = VoiceSource.AUDIO
    encoder: str = ""  # which codec + SSL model made the embedding

    def __post_init__(self):
        check_voice_id(self.voice_id)
        check_display_name(self.display_name)
        check_language(self.language)


class VoiceStore(abc.ABC):
    """Where stored voices live. Implementations must make `create` atomic and exclusive."""

    @abc.abstractmethod
    def create(self, record: VoiceRecord) -> VoiceRecord:
        """Store a new voice (created_at set now when 0); VoiceExists if the id is taken."""

    @abc.abstractmethod
    def get(self, voice_id: str) -> VoiceRecord:
        """The voice; VoiceNotFound if there is none."""

    @abc.abstractmethod
    def delete(self, voice_id: str) -> None:
        """Remove the voice; VoiceNotFound if there is none."""

    @abc.abstractmethod
    def list(self) -> list[VoiceRecord]:
        """Every stored voice, by id."""

    def describe(self) -> str:
        """Where the voices live, for logs (never a password)."""
        return type(self).__name__

    def open(self) -> None:  # noqa: B027 (optional hook)
        """Connect and prepare, blocking; for a store made with `open_voice_store(...,
        connect=False)`, which leaves this to be run off the event loop."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Let go of connections; the store is not used afterwards."""

    def __contains__(self, voice_id: str) -> bool:
        try:
            self.get(voice_id)
        except VoiceNotFound:
            return False
        return True


_SCHEMA = """
CREATE TABLE IF NOT EXISTS voices (
    voice_id TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    language TEXT NOT NULL,
    embedding BLOB NOT NULL,        -- little-endian float32
    dim INTEGER NOT NULL,
    duration_seconds REAL NOT NULL,
    created_at REAL NOT NULL,
    source TEXT NOT NULL,
    encoder TEXT NOT NULL
)
"""
# Both backends store a voice as one row with these columns, in this order.
COLUMNS = (
    "voice_id, display_name, language, embedding, dim, duration_seconds, created_at, source, "
    "encoder"
)


def record_row(record: VoiceRecord) -> tuple:
    """`record` as the values of one row (COLUMNS' order); the embedding as little-endian f32."""
    embedding = record.embedding.detach().cpu().float().reshape(-1)
    return (
        record.voice_id,
        record.display_name,
        record.language,
        embedding.numpy().astype("<f4").tobytes(),
        embedding.numel(),
        float(record.duration_seconds),
        record.created_at or time.time(),
        str(record.source),
        record.encoder,
    )


def row_record(row: tuple) -> VoiceRecord:
    """The record of a row read back (COLUMNS' order)."""
    voice_id, name, language, blob, dim, duration, created, source, encoder = row
    values = np.frombuffer(bytes(blob), dtype="<f4")
    if values.size != dim:
        raise ValueError(f"voice store: voice {voice_id!r} has a corrupt embedding")
    return VoiceRecord(
        voice_id=voice_id,
        embedding=torch.from_numpy(values.astype(np.float32)),
        display_name=name,
        language=language,
        duration_seconds=duration,
        created_at=created,
        source=VoiceSource(source),
        encoder=encoder,
    )


class SQLiteVoiceStore(VoiceStore):
    """Voices in `<data_dir>/voices.sqlite3` (or another file name in that folder)."""

    def __init__(self, data_dir: str | Path = DEFAULT_DATA_DIR, file_name: str = DB_FILE):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / file_name
        with self._connect() as db:
            # WAL: readers (the server) never wait for a writer (the CLI) and vice versa.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    def describe(self) -> str:
        return f"SQLite {self.path}"

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # The connection's context manager commits on success and rolls back on an exception.
        with closing(sqlite3.connect(self.path, timeout=10.0)) as db, db:
            yield db

    def create(self, record: VoiceRecord) -> VoiceRecord:
        try:
            with self._connect() as db:
                db.execute(
                    f"INSERT INTO voices ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    record_row(record),
                )
        except sqlite3.IntegrityError:
            raise VoiceExists(f"voice_id: a voice {record.voice_id!r} exists already") from None
        return self.get(record.voice_id)

    def get(self, voice_id: str) -> VoiceRecord:
        with self._connect() as db:
            row = db.execute(
                f"SELECT {COLUMNS} FROM voices WHERE voice_id = ?", (voice_id,)
            ).fetchone()
        if row is None:
            raise VoiceNotFound(f"voice_id: no stored voice {voice_id!r}")
        return row_record(row)

    def delete(self, voice_id: str) -> None:
        with self._connect() as db:
            deleted = db.execute("DELETE FROM voices WHERE voice_id = ?", (voice_id,)).rowcount
        if not deleted:
            raise VoiceNotFound(f"voice_id: no stored voice {voice_id!r}")

    def list(self) -> list[VoiceRecord]:
        with self._connect() as db:
            rows = db.execute(f"SELECT {COLUMNS} FROM voices ORDER BY voice_id").fetchall()
        return [row_record(row) for row in rows]


def open_voice_store(
    spec: str | None, data_dir: str | Path = DEFAULT_DATA_DIR, *, connect: bool = True
) -> VoiceStore:
    """The store a `--voice-store` value names.

    None or "": SQLite in `data_dir` (the embedded default, one machine).
    "sqlite://PATH": SQLite in the database file PATH (created with its folder if missing),
    e.g. sqlite:///var/lib/miotts/voices.sqlite3.
    "postgresql://..." (or "postgres://"): a PostgreSQL database shared by replicas; the value
    is a libpq connection URI (user, password, host, port, database, sslmode, ...).
    connect=False: a database store connects only when `open()` is called.
    """
    if not spec:
        return SQLiteVoiceStore(data_dir)
    scheme, sep, rest = spec.partition("://")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        path = Path(rest)  # sqlite:///abs/file.sqlite3, or sqlite://relative/file.sqlite3
        if not rest or rest.endswith("/"):
            raise ValueError(f"--voice-store: {spec!r} names no file (sqlite:///PATH/FILE)")
        return SQLiteVoiceStore(path.parent, path.name)
    if sep and scheme in ("postgresql", "postgres"):
        from .postgres import PostgresVoiceStore

        return PostgresVoiceStore(spec, connect=connect)
    raise ValueError(
        f"--voice-store: {scheme if sep else spec!r} is not a known store "
        "(postgresql://USER:PASSWORD@HOST:PORT/DB or sqlite:///PATH)"
    )


# ---- preset files (upstream-compatible) ------------------------------------------------------


def export_embedding(embedding: torch.Tensor, path: str | Path) -> Path:
    """Write an embedding as upstream writes presets: `.pt` (a bare float32 tensor, as
    `torch.save(global_embedding)`) or `.safetensors` (one tensor named `global_embedding`)."""
    path = Path(path)
    tensor = embedding.detach().cpu().float().reshape(-1).contiguous()
    suffix = path.suffix.lower()
    if suffix == ".pt":
        torch.save(tensor.clone(), path)
    elif suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"global_embedding": tensor}, str(path))
    else:
        raise ValueError(f"export: {path} must end in .pt or .safetensors")
    return path
