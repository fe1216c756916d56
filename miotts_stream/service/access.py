"""Who may use the service, and how much: API keys and their stream limits.

Transport-neutral: the gRPC servicer passes the value of the `authorization` metadata entry,
an HTTP transport would pass its `Authorization` header, and both get the same answer. Keys
are compared in constant time, and only a key's *name* ever reaches logs and metrics.

Key file format, one key per line (blank lines and `#` comments are skipped):

    KEY [name=NAME] [max_streams=N]

A key without a name is called `key-<line number>`; `--api-key` values are `cli-1`, `cli-2`...
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

BEARER = "bearer "
# One message for a missing and for a wrong key, so that keys cannot be probed.
UNAUTHENTICATED_MESSAGE = (
    "authorization: missing or invalid API key (send 'authorization: Bearer KEY')"
)


@dataclass(frozen=True)
class ApiKey:
    name: str  # what logs and metrics show
    secret: str = field(repr=False)
    max_streams: int | None = None  # None: only the server's --max-streams applies


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
    return ApiKey(name, secret, max_streams)


@dataclass
class AccessPolicy:
    """The API keys a server accepts; no keys means the service is open."""

    keys: list[ApiKey] = field(default_factory=list)

    @classmethod
    def from_options(cls, api_keys: list[str], api_keys_file: str | None) -> AccessPolicy:
        keys = []
        for i, secret in enumerate(api_keys, 1):
            key = parse_key_line(secret, f"cli-{i}")
            if key is not None:
                keys.append(key)
        if api_keys_file:
            lines = Path(api_keys_file).read_text().splitlines()
            for number, line in enumerate(lines, 1):
                key = parse_key_line(line, f"key-{number}")
                if key is not None:
                    keys.append(key)
            if not keys:
                raise AccessError(f"--api-keys-file {api_keys_file}: holds no key")
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise AccessError("API key names must be unique")
        if len({k.secret for k in keys}) != len(keys):
            raise AccessError("the same API key is given twice")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The key an `authorization` value carries ("Bearer KEY"), or None.

        Every configured key is compared, each in constant time, whatever matched earlier, so
        the time taken says nothing about which key or how much of it was right.
        """
        if authorization is None or authorization[: len(BEARER)].lower() != BEARER:
            presented = b""
        else:
            presented = authorization[len(BEARER) :].strip().encode()
        found = None
        for key in self.keys:
            if hmac.compare_digest(presented, key.secret.encode()) and found is None:
                found = key
        return found
