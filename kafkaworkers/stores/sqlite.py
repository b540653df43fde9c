"""The embedded store: one SQLite file in WAL mode, for the instances of a plugin on one host."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import cast

from kafkaworkers.stores import Connection, Store

__all__ = ["SqliteStore"]


class SqliteStore(Store):
    """A SQLite database file; several processes on one host may share it.

    :param path: the database file; its directory is created.
    :param schema: statements run on open (each may hold several, separated by ``;``).
    """

    dialect = "sqlite"
    shared = False
    # Taken as a write lock at once, so two writers racing for the same rows serialise
    # instead of one failing when it upgrades its read lock.
    _begin = "BEGIN IMMEDIATE"

    def __init__(self, path: Path, schema: Sequence[str]) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # This process's writers take turns here: SQLite's own wait for a busy database sleeps
        # up to 100 ms at a time, which would stall concurrent handlers far longer than a write.
        self._write_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        for script in schema:
            self._sqlite().executescript(script)

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def _sqlite(self) -> sqlite3.Connection:
        return cast(sqlite3.Connection, self.db)

    def _connect(self) -> Connection:
        # isolation_level=None: transactions are begun explicitly, as on every backend.
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            self._connections.append(db)
        return cast(Connection, db)

    def _in_transaction(self, db: Connection) -> bool:
        return cast(sqlite3.Connection, db).in_transaction

    def _writing(self) -> AbstractContextManager[object]:
        return self._write_lock

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()
