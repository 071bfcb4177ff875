"""A real PostgreSQL server for the tests: Debian's ``initdb`` and ``pg_ctl`` in a temporary
directory, on a free loopback port, as the unprivileged ``postgres`` user when we are root
(PostgreSQL refuses to run as root). Tests can stop and start it (an outage)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from ingest.embedded import free_port

__all__ = ["PostgresError", "PostgresServer", "postgres_bin"]


class PostgresError(Exception):
    """The server could not be set up or started."""


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` with an ``initdb`` in it, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """One cluster in its own temporary directory (socket there too), listening on
    127.0.0.1 only, trusting local connections (a test server)."""

    def __init__(self) -> None:
        bindir = postgres_bin()
        if bindir is None:
            raise PostgresError("no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)")
        self.bin = bindir
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresError("running as root and there is no postgres user") from None
            self.user = "postgres"
        # not under pytest's base temp: it is private to root, and the server runs as postgres
        self.root = Path(tempfile.mkdtemp(prefix="dicom-ingest-pg-"))
        if self.user is not None:
            shutil.chown(self.root, self.user, self.user)
        self.data = self.root / "data"
        self.port = free_port()
        self.running = False

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, cwd=self.root)
        if result.returncode != 0:
            raise PostgresError(f"{' '.join(args[:2])} exited {result.returncode}: "
                                f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result

    def init(self) -> PostgresServer:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync")
        return self

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.root / "server.log"), "-o", options, "-w", "-t", "60", "start")
        self.running = True

    def stop(self) -> None:
        """Stop the server (fast: sessions are ended, as when an operator stops it)."""
        if self.running:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                      "-t", "60", "stop")
            self.running = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "server.log").read_text(errors="replace")
        return ""

    def remove(self) -> None:
        with contextlib.suppress(PostgresError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
