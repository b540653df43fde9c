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
    def batch(self) -> Iterator[None]:
        """One write transaction around a whole batch of messages: the plugins' ``around_batch``.

        A commit per message cost more than the work it committed; inside a batch,
        :meth:`transaction` is a savepoint, so a message that fails leaves nothing behind
        while the batch's other messages commit together.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One message's writes: all or nothing, committed on success (at the batch's end, in one)."""
        if self.db.in_transaction:  # inside batch(): a savepoint, committed with the batch
            self.db.execute("SAVEPOINT message")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK TO message")
                self.db.execute("RELEASE message")
                raise
            self.db.execute("RELEASE message")
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()
