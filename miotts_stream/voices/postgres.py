"""Voices in PostgreSQL: one store shared by every replica (`--voice-store postgresql://...`).

What the service relies on holds across processes and machines: a voice is written in one
transaction, and the primary key makes concurrent creates of one id (on any replicas) leave
exactly one; the others get VoiceExists.

There is deliberately no cache of stored embeddings in front of the database. A synthesis
stream reads its voice by primary key once, when it starts (a 512-byte row, well under a
millisecond on a local network, against hundreds of milliseconds to the first audio), so a
voice created or deleted on any replica is seen by every other one as soon as the writing
transaction commits: a deleted voice is never served from a stale copy. A stream that started
before the delete keeps the voice it read, to its end, as with SQLite.

Calls block (psycopg's synchronous API, a small connection pool): the registry runs them in a
worker thread, never on the event loop. A database that cannot be reached raises
VoiceStoreUnavailable (UNAVAILABLE to clients) instead of a driver error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .store import (
    COLUMNS,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    VoiceStore,
    VoiceStoreUnavailable,
    record_row,
    row_record,
)

TABLE = "miotts_voices"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    voice_id TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    language TEXT NOT NULL,
    embedding BYTEA NOT NULL,           -- little-endian float32
    dim INTEGER NOT NULL,
    duration_seconds DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL,
    encoder TEXT NOT NULL
)
"""
# Replicas starting together all run CREATE TABLE IF NOT EXISTS; without a lock two of them
# can both find no table and one fails on the catalog's unique index.
_SCHEMA_LOCK_KEY = 0x4D696F54  # "MioT"
DEFAULT_CONNECT_TIMEOUT_S = 5.0
RECONNECT_WINDOW_S = 5.0


class PostgresVoiceStore(VoiceStore):
    """Voices in the table `miotts_voices` of the database `url` names.

    url: a libpq URI, postgresql://USER:PASSWORD@HOST:PORT/DBNAME?sslmode=...
    max_connections: the pool's size; voice calls are short, so a few serve many streams.
    connect_timeout_s: longest wait for a connection (at start, and for each call); None
        takes the URI's `connect_timeout` parameter, else 5 s.
    connect: connect (and create the table) now; False leaves that to `open()`, for a caller
        that runs it off its event loop.
    """

    def __init__(
        self,
        url: str,
        max_connections: int = 4,
        connect_timeout_s: float | None = None,
        *,
        connect: bool = True,
    ):
        try:
            import psycopg
            from psycopg_pool import ConnectionPool, PoolClosed
        except ImportError as err:  # pragma: no cover - the dependency is declared
            raise RuntimeError(
                "--voice-store postgresql://: install psycopg (pip install 'psycopg[binary,pool]')"
            ) from err
        self._psycopg = psycopg
        self._pool_closed = PoolClosed
        self.url = url
        params = _url_params(psycopg, url)
        self._where = _describe(params)
        if connect_timeout_s is None:
            connect_timeout_s = float(params.get("connect_timeout") or DEFAULT_CONNECT_TIMEOUT_S)
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            timeout=connect_timeout_s,
            kwargs={"connect_timeout": max(1, round(connect_timeout_s))},
            # A connection the server dropped (restart, failover) is replaced, not handed out.
            check=ConnectionPool.check_connection,
            # The pool retries a failed connection with a doubling delay for this long, then
            # gives up until the next call asks again: once the database is back, calls get
            # connections again within about this time (psycopg's default is 5 minutes).
            reconnect_timeout=RECONNECT_WINDOW_S,
            open=False,
            name="miotts-voices",
        )
        self._connect_timeout_s = connect_timeout_s
        if connect:
            self.open()

    def open(self) -> None:
        """Connect (VoiceStoreUnavailable if the database cannot be reached in time) and make
        the table if it is missing."""
        try:
            with self._reachable():
                self._pool.open(wait=True, timeout=self._connect_timeout_s)
            with self._connection() as db:
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                db.execute(_SCHEMA)
        except BaseException:
            self._pool.close()
            raise

    def describe(self) -> str:
        return f"PostgreSQL {self._where}"

    @contextmanager
    def _connection(self) -> Iterator:
        """A pooled connection in a transaction (committed on success)."""
        with self._reachable(), self._pool.connection() as db:
            yield db

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """An unreachable database (or a closed pool) becomes VoiceStoreUnavailable."""
        try:
            yield
        except (self._psycopg.OperationalError, self._pool_closed) as err:  # incl. PoolTimeout
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise VoiceStoreUnavailable(
                f"voice store: cannot reach {self.describe()}: {detail}"
            ) from None

    def create(self, record: VoiceRecord) -> VoiceRecord:
        # ON CONFLICT DO NOTHING: the loser of a race learns it from the row count, without
        # an error in the server's log for what is an ordinary outcome.
        with self._connection() as db:
            inserted = db.execute(
                f"INSERT INTO {TABLE} ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (voice_id) DO NOTHING",
                record_row(record),
            ).rowcount
        if not inserted:
            raise VoiceExists(f"voice_id: a voice {record.voice_id!r} exists already")
        return self.get(record.voice_id)

    def get(self, voice_id: str) -> VoiceRecord:
        with self._connection() as db:
            row = db.execute(
                f"SELECT {COLUMNS} FROM {TABLE} WHERE voice_id = %s", (voice_id,)
            ).fetchone()
        if row is None:
            raise VoiceNotFound(f"voice_id: no stored voice {voice_id!r}")
        return row_record(row)

    def delete(self, voice_id: str) -> None:
        with self._connection() as db:
            deleted = db.execute(f"DELETE FROM {TABLE} WHERE voice_id = %s", (voice_id,)).rowcount
        if not deleted:
            raise VoiceNotFound(f"voice_id: no stored voice {voice_id!r}")

    def list(self) -> list[VoiceRecord]:
        with self._connection() as db:
            rows = db.execute(f"SELECT {COLUMNS} FROM {TABLE} ORDER BY voice_id").fetchall()
        return [row_record(row) for row in rows]

    def close(self) -> None:
        self._pool.close()


def _url_params(psycopg, url: str) -> dict:
    try:
        return psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as err:
        raise ValueError(f"--voice-store: not a PostgreSQL connection URI: {err}") from None


def _describe(params: dict) -> str:
    """user@host:port/dbname of a connection URI, without its password."""
    user = f"{params['user']}@" if params.get("user") else ""
    host = params.get("host") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    return f"{user}{host}{port}/{params.get('dbname') or ''}"
