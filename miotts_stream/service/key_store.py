"""API keys in PostgreSQL, shared by replicas (`--api-keys-db postgresql://...`).

    python -m miotts_stream.service.key_store --db URI add --name team-a [--max-streams 4]
    python -m miotts_stream.service.key_store --db URI list
    python -m miotts_stream.service.key_store --db URI remove --name team-a

`add` makes a random key and prints it once: the database keeps only its SHA-256 (a leaked
table gives no usable key). Servers read the table at start and again every
`--api-keys-refresh-s` (30 s by default) and on SIGHUP, so a key added or removed on any
machine takes effect on every replica within that time. A table with no key is an error, never
an open service; a database that cannot be reached on a refresh leaves the keys in force.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .access import AccessError, ApiKey, KeySource, key_digest

TABLE = "miotts_api_keys"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    name TEXT PRIMARY KEY,
    digest BYTEA NOT NULL UNIQUE,       -- SHA-256 of the key
    max_streams INTEGER CHECK (max_streams > 0),
    created_at DOUBLE PRECISION NOT NULL
)
"""
_SCHEMA_LOCK_KEY = 0x4D696F4B  # "MioK": replicas starting together create the table once


class PostgresKeySource(KeySource):
    """Keys in the table `miotts_api_keys` of the database `url` names (a libpq URI)."""

    changes = True

    def __init__(self, url: str, connect_timeout_s: float = 5.0) -> None:
        import psycopg

        self._psycopg = psycopg
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as err:
            raise AccessError(f"--api-keys-db: not a PostgreSQL connection URI: {err}") from None
        self._where = f"{params.get('host') or 'localhost'}/{params.get('dbname') or ''}"
        self._schema_ready = False  # the table is made on the first connection, not each one

    @contextmanager
    def _connect(self) -> Iterator:
        """A connection in a transaction, the table in place; any database failure becomes
        AccessError (the keys in force stay)."""
        psycopg = self._psycopg
        try:
            timeout = max(1, round(self.connect_timeout_s))
            with psycopg.connect(self.url, connect_timeout=timeout) as db:
                if not self._schema_ready:
                    # Once per source: the lock would otherwise line up every replica's
                    # periodic refresh behind one another.
                    db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                    db.execute(_SCHEMA)
                yield db
            self._schema_ready = True
        except psycopg.Error as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AccessError(f"API key store at {self._where}: {detail}") from None

    def load(self) -> list[ApiKey]:
        with self._connect() as db:
            rows = db.execute(
                f"SELECT name, digest, max_streams FROM {TABLE} ORDER BY name"
            ).fetchall()
        if not rows:
            raise AccessError(
                f"API key store at {self._where} holds no key (add one: python -m "
                "miotts_stream.service.key_store --db URI add --name NAME)"
            )
        return [ApiKey(name, bytes(digest), max_streams) for name, digest, max_streams in rows]

    def add(self, name: str, max_streams: int | None = None) -> str:
        """Store a new random key under `name`; returns the key (shown once, never stored)."""
        if not name or any(c.isspace() for c in name):
            raise AccessError("name: a key's name is one word")
        if max_streams is not None and max_streams < 1:
            raise AccessError("max_streams must be a positive integer")
        secret = secrets.token_urlsafe(32)
        with self._connect() as db:
            inserted = db.execute(
                f"INSERT INTO {TABLE} (name, digest, max_streams, created_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
                (name, key_digest(secret), max_streams, time.time()),
            ).rowcount
        if not inserted:
            raise AccessError(f"name: a key named {name!r} exists already")
        return secret

    def remove(self, name: str) -> None:
        with self._connect() as db:
            deleted = db.execute(f"DELETE FROM {TABLE} WHERE name = %s", (name,)).rowcount
        if not deleted:
            raise AccessError(f"name: no key named {name!r}")

    def names(self) -> list[tuple[str, int | None, float]]:
        """(name, max_streams, created_at) of every key."""
        with self._connect() as db:
            return db.execute(
                f"SELECT name, max_streams, created_at FROM {TABLE} ORDER BY name"
            ).fetchall()


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m miotts_stream.service.key_store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--db", required=True, help="the servers' --api-keys-db")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="make a key; prints it once")
    add.add_argument("--name", required=True)
    add.add_argument("--max-streams", type=int, default=None)
    commands.add_parser("list", help="key names (never the keys)")
    remove = commands.add_parser("remove", help="revoke a key")
    remove.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    store = PostgresKeySource(args.db)
    if args.command == "add":
        print(store.add(args.name, args.max_streams))
    elif args.command == "list":
        for name, max_streams, created in store.names():
            stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(created))
            print(f"{name}\t{max_streams or '-'}\t{stamp}")
    else:
        store.remove(args.name)
        print(f"removed {args.name}")
    return 0


def main() -> None:
    try:
        sys.exit(run())
    except AccessError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
