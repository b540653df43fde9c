"""A throw-away PostgreSQL server for tests, run from Debian's ``postgresql`` binaries.

``initdb`` and ``pg_ctl`` refuse to run as root, so they run as the ``postgres`` user
(``runuser``), in a directory handed to it. The server listens on one address only, trusts
every local connection (a test server holding nothing of value) and keeps its socket inside
its own directory, so several servers and the machine's own PostgreSQL never meet.
Independent of pytest: the fault harness imports it to run a server on a bridge address.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg

from kafkaworkers.stores import namespace

__all__ = ["PgServer", "pg_bin", "store_rows"]


def pg_bin() -> Path:
    """The newest installed PostgreSQL's ``bin`` directory (Debian's ``/usr/lib/postgresql/N/bin``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
    return Path(found[-1]).parent


class PgServer:
    """One PostgreSQL server in ``base_dir``: :meth:`start`, :meth:`create_database`, :meth:`url`, :meth:`stop`.

    :param base_dir: an empty or missing directory for the data, the socket and the log, which
        the ``postgres`` user can reach (pytest's ``tmp_path`` is private to root); by default
        a new one in the system's temporary directory, removed by :meth:`remove`.
    :param host: the one address it listens on.
    :param port: its TCP port.
    :param user: the superuser the URLs connect as (no password: the server trusts its clients).
    :param trust: networks (``10.0.0.0/24``) whose clients it trusts besides its own address.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 55432,
        user: str = "kw",
        trust: Sequence[str] = (),
    ) -> None:
        if base_dir is None:
            base_dir = Path(tempfile.mkdtemp(prefix="kw-pg-"))
            base_dir.chmod(0o755)
        self.base_dir = Path(base_dir)
        self.host = host
        self.port = port
        self.user = user
        self.trust = tuple(trust)
        self.data = self.base_dir / "data"
        self.socket_dir = self.base_dir / "socket"
        self.log = self.base_dir / "server.log"
        self._bin = pg_bin()

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}): {result.stderr.strip()}\n{log}")
        return result

    def start(self) -> PgServer:
        """Create the cluster if it is not there, start the server and wait until it accepts connections."""
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.base_dir, "postgres", "postgres")
            shutil.chown(self.socket_dir, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            self._run(
                str(self._bin / "initdb"), "-D", str(self.data), "-U", self.user,
                "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync",
            )  # fmt: skip
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.writelines(f"host all all {network} trust\n" for network in (f"{self.host}/32", *self.trust))
        options = (
            f"-c listen_addresses={self.host} -c port={self.port} -c unix_socket_directories={self.socket_dir}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        deadline = time.monotonic() + 30
        while self._psql("postgres", "SELECT 1").returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on {self.host}:{self.port} did not accept connections in 30 s")
            time.sleep(0.1)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate); its data stays for another :meth:`start`."""
        if (self.data / "postmaster.pid").exists():
            self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop the server at once and delete its directory."""
        self.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """Create (or empty, if it exists) the database ``name``; its URL."""
        for sql in (f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'):
            result = self._psql("postgres", sql)
            if result.returncode != 0:
                raise RuntimeError(f"{sql}: {result.stderr.strip()}")
        return self.url(name)

    def url(self, database: str) -> str:
        """A ``postgresql://`` URL of one database over TCP."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def _psql(self, database: str, sql: str) -> subprocess.CompletedProcess[str]:
        command = [
            str(self._bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
            "-p", str(self.port), "-U", self.user, "-d", database, "-c", sql,
        ]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def store_rows(url: str) -> Callable[[str, str, str], list[tuple[Any, ...]]]:
    """``rows(plugin, file, sql)``: rows of a plugin's store in the shared database, the store
    named as its SQLite file on one host (``estoque.sqlite3`` of reserva is the schema
    ``reserva_estoque``)."""

    def rows(plugin: str, file: str, sql: str) -> list[tuple[Any, ...]]:
        schema = namespace(plugin, file.removesuffix(".sqlite3"))
        with psycopg.connect(url, autocommit=True, options=f"-c search_path={schema}") as db:
            return db.execute(sql.encode()).fetchall()

    return rows
