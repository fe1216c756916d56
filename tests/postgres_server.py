"""A real PostgreSQL server for the tests, from the machine's Debian packages.

`scripts/setup.sh` installs the `postgresql` package; its programs live in
/usr/lib/postgresql/<version>/bin. initdb and postgres refuse to run as root, so under root they
run as the `postgres` user the package creates, in a temporary folder that user owns. The
server listens only on a Unix socket in that folder (no TCP port to collide with anything),
with durability off (a test database is thrown away), and is stopped at the end of the session.

conftest.py makes the fixtures `postgres_server` (the session's server) and `postgres_url` (a
new, empty database per test) available to every test.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

READY_TIMEOUT_S = 30.0
SUPERUSER = "miotts"
_database_numbers = itertools.count(1)


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian's layout), else one on PATH."""

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """One throwaway cluster: `start()`, `url(dbname)`, `create_database()`, `stop()`."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="miotts-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root  # short: a Unix socket path has ~100 characters at most
        self.process: subprocess.Popen | None = None
        self._user: dict = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")  # made by Debian's postgresql package
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def _run(self, *args: str) -> None:
        subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            timeout=60,
            cwd=self.root,
            **self._user,
        )

    def start(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
            "--no-instructions",
        )
        self.log = open(self.root / "postgres.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                str(self.bin_dir / "postgres"),
                "-D",
                str(self.data),
                "-k",
                str(self.socket_dir),
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            **self._user,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.root / 'postgres.log').read_text()}")
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def url(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.socket_dir}"

    def create_database(self) -> str:
        """A new empty database; its connection URI."""
        import psycopg

        name = f"test_{next(_database_numbers)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast shutdown": ends sessions, exits
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self.process is not None:
            self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.fail("PostgreSQL is not installed: scripts/setup.sh installs it (apt-get)")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URI of a new, empty database on the session's server."""
    return postgres_server.create_database()
