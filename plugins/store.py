"""SQLite state shared by the services that keep some: one file per plugin, one helper.

Every side effect is made idempotent the same way: the effect and the record that it
happened are written in one transaction, keyed by what must happen once (an order id for a
charge, an order id and event kind for a notification). A redelivered message finds the
record and does nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Store:
    """A SQLite database in WAL mode, safe for several worker processes on one host.

    :param path: the database file; its directory is created.
    :param schema: ``CREATE TABLE IF NOT EXISTS ...`` statements run on open.
    """

    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: transactions are begun explicitly, as BEGIN IMMEDIATE, so
        # two processes racing for the same rows serialise instead of failing on upgrade.
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(schema)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An exclusive write transaction: committed on success, rolled back on any error."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()
