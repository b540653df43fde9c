"""The shared store: a plugin's tables in a PostgreSQL schema, seen by its instances on every host.

psycopg 3 with a connection pool: each thread that touches the store takes a connection
and keeps it until the store closes, so a handler thread has its own transaction (as with
SQLite). Transactions are begun explicitly, so plugin code runs unchanged on both backends;
PostgreSQL's default isolation, read committed, re-checks an ``UPDATE``'s ``WHERE`` against a
row another transaction just changed, which is what makes ``UPDATE ... WHERE estoque >= ?``
an atomic conditional take. A failure that is not the message's own (a deadlock or a
serialization failure with another instance, a lost connection) is raised as
:class:`~kafkaworkers.errors.StoreConflict`, which the worker answers by handling the
message again shortly, never by retrying it through the topics or dead-lettering it.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, cast

import psycopg
import psycopg_pool
from psycopg.pq import TransactionStatus

from kafkaworkers.config import redact_url
from kafkaworkers.errors import StoreConflict
from kafkaworkers.stores import Connection, Rows, Store

__all__ = ["PostgresStore"]

log = logging.getLogger(__name__)

#: The advisory lock every store's schema is created under (any 64-bit number of our own).
_SCHEMA_LOCK = zlib.crc32(b"kafkaworkers.stores schema")
#: Asked of the server for each session: a host that vanished from the network (its data
#: unacknowledged for 10 s, or no answer to keepalives after 5 s + 3 x 2 s) has its session
#: ended within seconds instead of TCP's minutes, so the row locks its open batch held do not
#: stall the instances that took over its partitions. Nothing here ends a live session.
_VANISHED_CLIENT = (
    "-c tcp_user_timeout=10000 -c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"
)
#: How long a message waits before it is handled again after a conflict: long enough for the
#: winning transaction to commit, short enough not to be noticed; jittered so two losers
#: of one deadlock do not meet again.
_CONFLICT_PAUSE = (0.05, 0.5)
# A quoted literal (kept, its % doubled), a ? placeholder, or a bare %.
_TOKEN = re.compile(r"'(?:[^']|'')*'|\?|%")


@functools.lru_cache(maxsize=1024)
def _translate(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s``, every literal ``%`` doubled."""

    def token(match: re.Match[str]) -> str:
        text = match.group()
        return "%s" if text == "?" else text.replace("%", "%%")

    return _TOKEN.sub(token, sql)


def _conflict(exc: psycopg.Error) -> StoreConflict:
    retry_at = time.monotonic() + random.uniform(*_CONFLICT_PAUSE)
    kind = getattr(exc, "sqlstate", None) or type(exc).__name__
    return StoreConflict(f"PostgreSQL {kind}: {str(exc).splitlines()[0] if str(exc) else ''}", retry_at)


class _PgConnection:
    """A psycopg connection that speaks the stores' SQL: ``?`` placeholders, conflicts as
    :class:`StoreConflict`."""

    def __init__(self, conn: psycopg.Connection[Any], on_broken: Any) -> None:
        self.conn = conn
        self._on_broken = on_broken

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        query = _translate(sql) if params else sql
        try:
            return cast(Rows, self.conn.execute(query, params or None))
        except psycopg.OperationalError as exc:
            self._check()
            raise _conflict(exc) from exc

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        try:
            with self.conn.cursor() as cursor:
                cursor.executemany(_translate(sql), params)
        except psycopg.OperationalError as exc:
            self._check()
            raise _conflict(exc) from exc

    def _check(self) -> None:
        if self.conn.broken or self.conn.closed:
            self._on_broken(self)


class PostgresStore(Store):
    """A PostgreSQL schema of a plugin's tables, shared by its instances.

    :param url: a ``postgresql://`` URL; its password never appears in a log, repr or error.
    :param namespace: the PostgreSQL schema the tables live in (created if missing).
    :param schema: statements run on open, under an advisory lock.
    :param max_connections: the pool's bound: at most one connection per thread using the store.
    :param connect_timeout: how long start-up waits for the database.
    """

    dialect = "postgresql"
    shared = True

    def __init__(
        self,
        url: str,
        namespace: str,
        schema: Sequence[str],
        max_connections: int = 64,
        connect_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", namespace):
            raise ValueError(f"not a PostgreSQL schema name: {namespace!r}")
        self.namespace = namespace
        self._shown = redact_url(url)
        self._lock = threading.Lock()
        self._held: list[_PgConnection] = []
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"autocommit": True, "options": f"-c search_path={namespace} {_VANISHED_CLIENT}"},
            open=False,
            name=f"kafkaworkers-{namespace}",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except psycopg_pool.PoolTimeout:
            self._pool.close()
            message = f"cannot connect to PostgreSQL at {self._shown} within {connect_timeout:g} s"
            raise StoreConflict(message, time.monotonic()) from None
        self._create(schema)

    def __repr__(self) -> str:
        return f"PostgresStore({self._shown!r}, namespace={self.namespace!r})"

    def _create(self, schema: Sequence[str]) -> None:
        """Create the schema and its tables once, whichever instance starts first: the lock
        makes instances starting at once take turns (``CREATE TABLE IF NOT EXISTS`` racing
        itself can fail on PostgreSQL's own catalogue)."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.namespace}")
            for script in schema:
                conn.execute(script)
        log.debug("store %s ready in %s", self.namespace, self._shown)

    def _connect(self) -> Connection:
        try:
            conn = self._pool.getconn()
        except psycopg_pool.PoolTimeout:
            raise StoreConflict(f"no PostgreSQL connection from {self._shown}", time.monotonic() + 1.0) from None
        held = _PgConnection(conn, self._drop)
        with self._lock:
            self._held.append(held)
        return held

    def _drop(self, held: _PgConnection) -> None:
        """A broken connection goes back to the pool (which discards it); the thread takes a new one next."""
        with self._lock:
            if held not in self._held:
                return  # already given back (a batch's later statements fail on it too)
            self._held.remove(held)
        if getattr(self._local, "db", None) is held:
            del self._local.db
        self._pool.putconn(held.conn)

    def _in_transaction(self, db: Connection) -> bool:
        return cast(_PgConnection, db).conn.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        for connection in held:
            self._pool.putconn(connection.conn)
        self._pool.close()
        self._local = threading.local()
