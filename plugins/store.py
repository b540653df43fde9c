"""SQLite state shared by the services that keep some: one file per plugin, one helper.

Every side effect is made idempotent the same way: the effect and the record that it
happened are written in one transaction, keyed by what must happen once (an order id for a
charge, an order id and event kind for a notification). A redelivered message finds the
record and does nothing.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Store:
    """A SQLite database in WAL mode, safe for several worker processes on one host and for
    handlers running on several threads (``--concurrency``): each thread has its own
    connection, so each has its own transaction, and SQLite serialises their writes.

    :param path: the database file; its directory is created.
    :param schema: ``CREATE TABLE IF NOT EXISTS ...`` statements run on open.
    """

    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._lock = threading.Lock()
        # This process's writers take turns here: SQLite's own wait for a busy database sleeps
        # up to 100 ms at a time, which would stall concurrent handlers far longer than a write.
        self._writing = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self.db.executescript(schema)

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: transactions are begun explicitly, as BEGIN IMMEDIATE, so
            # two writers racing for the same rows serialise instead of failing on upgrade.
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One write transaction around a whole batch of messages: the plugins' ``around_batch``.

        A commit per message cost more than the work it committed; inside a batch,
        :meth:`transaction` is a savepoint, so a message that fails leaves nothing behind
        while the batch's other messages commit together.
        """
        db = self.db
        with self._writing:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One message's writes: all or nothing, committed on success (at the batch's end, in one)."""
        db = self.db
        if db.in_transaction:  # inside batch(): a savepoint, committed with the batch
            db.execute("SAVEPOINT message")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK TO message")
                db.execute("RELEASE message")
                raise
            db.execute("RELEASE message")
            return
        with self._writing:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()
