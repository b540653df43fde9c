"""The sends this host made and has not yet recorded in the shared store.

A send to a channel and its record in the store cannot be one transaction. When the store is
a database server on another host, the record can fail after the send went out: the host is
cut off from the network (a log line or a local relay still sends), or the process dies. The
notification is then still ``sending`` in the store, and once the claim runs out another
instance sends it again. The journal is a SQLite file in the plugin's data dir, written right
after each send and with no network: whatever it holds is recorded in the store as soon as the
store answers again (a background thread tries every second, and a restarted process first
thing), well inside the claim. What is left is a process killed between a send and its journal
line, a window of a few instructions instead of a round trip to the database.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

#: (order id, kind, channel) of one send.
Send = tuple[str, str, str]


class SendJournal:
    """A local, crash-safe list of sends not yet recorded elsewhere, and the thread recording them.

    :param path: the journal's file; every process of the plugin on this host may share it.
    :param record: records some sends in the store, raising if the store cannot be reached.
    :param interval: seconds between two attempts to record what is left.
    """

    def __init__(self, path: Path, record: Callable[[list[Send]], None], interval: float = 1.0) -> None:
        # One connection for every handler thread: a short lock around each statement is cheaper
        # than a connection per thread, and WAL with synchronous=NORMAL survives a killed process.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS unrecorded (order_id TEXT, kind TEXT, channel TEXT, sent_at REAL,"
            " PRIMARY KEY (order_id, kind, channel))"
        )
        self._interval = interval
        self._lock = threading.Lock()
        self._record = record
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notificacao-journal", daemon=True)

    def start(self) -> SendJournal:
        """Record what a previous process on this host sent and could not record, then keep recording."""
        self.flush()
        self._thread.start()
        return self

    def add(self, send: Send) -> None:
        """Remember a send that just went out."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO unrecorded VALUES (?, ?, ?, ?)", (*send, time.time()))

    def discard(self, sends: Iterable[Send]) -> None:
        """Forget sends now recorded in the store."""
        with self._lock:
            self._db.executemany("DELETE FROM unrecorded WHERE order_id = ? AND kind = ? AND channel = ?", sends)

    def pending(self, age: float = 0.0) -> list[Send]:
        """The sends not yet recorded that were made at least ``age`` seconds ago."""
        with self._lock:
            sql = "SELECT order_id, kind, channel FROM unrecorded WHERE sent_at <= ?"
            return self._db.execute(sql, (time.time() - age,)).fetchall()

    def pending_for(self, order_id: str, kind: str) -> list[Send]:
        """One notification's sends not yet recorded."""
        with self._lock:
            sql = "SELECT order_id, kind, channel FROM unrecorded WHERE order_id = ? AND kind = ?"
            return self._db.execute(sql, (order_id, kind)).fetchall()

    def flush(self, age: float = 0.0) -> None:
        """Record the pending sends made at least ``age`` seconds ago, if the store answers."""
        sends = self.pending(age=age)
        if not sends:
            return
        try:
            self._record(sends)
        except Exception as exc:  # the store is still out of reach: the next round tries again
            log.warning("notificacao: %d sends not yet recorded, the store is out of reach: %s", len(sends), exc)
            return
        self.discard(sends)
        log.info("notificacao: recorded %d sends whose record had failed", len(sends))

    def _run(self) -> None:
        # A send younger than a round is still being recorded by its handler.
        while not self._stopping.wait(self._interval):
            self.flush(age=self._interval)

    def close(self) -> None:
        """Stop the thread and close the file; what is still pending waits for the next start."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._db.close()
