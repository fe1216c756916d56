"""Who may use the service, and how much: API keys and their stream limits.

Transport-neutral: the gRPC servicer passes the value of the `authorization` metadata entry,
an HTTP transport would pass its `Authorization` header, and both get the same answer. Keys
are compared in constant time, and only a key's *name* ever reaches logs and metrics.

Key file format, one key per line (blank lines and `#` comments are skipped):

    KEY [name=NAME] [max_streams=N]

A key without a name is called `key-<line number>`; `--api-key` values are `cli-1`, `cli-2`...
Keys come from `KeySource`s (flags, a key file); the server reads them again on SIGHUP, so a
key file that every replica mounts (one secret) is rotated on all of them without a restart.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

BEARER = "bearer "
# One message for a missing and for a wrong key, so that keys cannot be probed. No
# "authorization: ..." or "key: ..." in it: secret scrubbers (Pipecat's) mask the value after
# such a name, and the client would read "[REDACTED]" instead of what to do.
UNAUTHENTICATED_MESSAGE = (
    "API key missing or not valid: send it in the Authorization header as 'Bearer KEY'"
)


@dataclass(frozen=True)
class ApiKey:
    name: str  # what logs and metrics show
    # SHA-256 of the key: what is compared, and all a shared key store keeps of it.
    digest: bytes = field(repr=False)
    max_streams: int | None = None  # None: only the server's --max-streams applies

    @classmethod
    def from_secret(cls, name: str, secret: str, max_streams: int | None = None) -> ApiKey:
        return cls(name, key_digest(secret), max_streams)


def key_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class AccessError(ValueError):
    """A key file or key flag that cannot be used."""


def parse_key_line(line: str, default_name: str) -> ApiKey | None:
    """One line of a key file; None for blank and comment lines."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    secret, *options = line.split()
    name, max_streams = default_name, None
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise AccessError(f"{default_name}: expected NAME=VALUE after the key, got {option!r}")
        if key == "name":
            name = value
        elif key == "max_streams":
            if not value.isdigit() or int(value) < 1:
                raise AccessError(f"{default_name}: max_streams must be a positive integer")
            max_streams = int(value)
        else:
            raise AccessError(f"{default_name}: unknown option {key!r} (name, max_streams)")
    if len(secret) < 8:
        raise AccessError(f"{default_name}: a key must have at least 8 characters")
    return ApiKey.from_secret(name, secret, max_streams)


class KeySource(abc.ABC):
    """Where API keys come from. Replicas share keys by sharing the source: the same key file
    on every replica (a mounted secret), or one database (`key_store.PostgresKeySource`); see
    docs/voice-store.md."""

    changes = False  # True: read it again periodically (keys added elsewhere)

    @abc.abstractmethod
    def load(self) -> list[ApiKey]:
        """The keys as they are now; AccessError (or OSError) if they cannot be read."""


@dataclass(frozen=True)
class FlagKeys(KeySource):
    """`--api-key` values (fixed for the life of the process)."""

    secrets: tuple[str, ...] = field(repr=False)

    def load(self) -> list[ApiKey]:
        keys = (parse_key_line(secret, f"cli-{i}") for i, secret in enumerate(self.secrets, 1))
        return [key for key in keys if key is not None]


@dataclass(frozen=True)
class KeyFile(KeySource):
    """A key file (`--api-keys-file`), read again on every `load` (SIGHUP reloads)."""

    path: Path

    def load(self) -> list[ApiKey]:
        keys = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            key = parse_key_line(line, f"key-{number}")
            if key is not None:
                keys.append(key)
        if not keys:
            raise AccessError(f"--api-keys-file {self.path}: holds no key")
        return keys


@dataclass
class AccessPolicy:
    """The API keys a server accepts; no keys means the service is open."""

    keys: list[ApiKey] = field(default_factory=list)
    sources: list[KeySource] = field(default_factory=list, repr=False)

    @classmethod
    def from_options(
        cls, api_keys: list[str], api_keys_file: str | None, api_keys_db: str | None = None
    ) -> AccessPolicy:
        sources: list[KeySource] = [FlagKeys(tuple(api_keys))]
        if api_keys_file:
            sources.append(KeyFile(Path(api_keys_file)))
        if api_keys_db:
            from .key_store import PostgresKeySource

            sources.append(PostgresKeySource(api_keys_db))
        return cls.from_sources(sources)

    @property
    def changes(self) -> bool:
        """Whether a source can change by itself (a database), so it is worth reading again
        from time to time; a file changes only with a SIGHUP."""
        return any(source.changes for source in self.sources)

    @classmethod
    def from_sources(cls, sources: list[KeySource]) -> AccessPolicy:
        policy = cls(sources=list(sources))
        policy.reload()
        return policy

    def reload(self) -> None:
        """Read the sources again (a rotated key file). On any error the keys in force stay,
        and the error is raised for the caller to report."""
        keys = [key for source in self.sources for key in source.load()]
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise AccessError("API key names must be unique")
        if len({k.digest for k in keys}) != len(keys):
            raise AccessError("the same API key is given twice")
        if self.keys and not keys:
            raise AccessError("a reload found no keys; the service stays closed")
        self.keys = keys  # one assignment: a request sees the old list or the new one

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The key an `authorization` value carries ("Bearer KEY"), or None.

        The presented key's SHA-256 is compared with every configured key's, each in constant
        time, whatever matched earlier, so the time taken says nothing about which key or how
        much of it was right.
        """
        if authorization is None or authorization[: len(BEARER)].lower() != BEARER:
            presented = key_digest("")  # matches no key (keys have 8 characters or more)
        else:
            presented = key_digest(authorization[len(BEARER) :].strip())
        found = None
        for key in self.keys:
            if hmac.compare_digest(presented, key.digest) and found is None:
                found = key
        return found
