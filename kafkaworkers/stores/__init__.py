"""Plugin state stores: a plugin's tables in SQLite on one host, or in PostgreSQL shared by every host.

:func:`open_store` gives a plugin a :class:`Store` for its state: a SQLite file in the
plugin's data directory by default, or a schema of its own in the PostgreSQL database that
its ``database_url`` setting names, shared by the plugin's instances on every host. The same
plugin code and SQL run on both: ``?`` placeholders, portable DDL (``TEXT``, ``BIGINT``,
``DOUBLE PRECISION``), ``INSERT ... ON CONFLICT``, ``RETURNING``.

Every side effect is made idempotent the same way: the effect and the record that it
happened are written in one transaction, keyed by what must happen once. A redelivered
message finds the record and does nothing.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Literal, Protocol

from kafkaworkers.errors import ConfigError

if TYPE_CHECKING:
    from kafkaworkers.api import PluginEnv

__all__ = ["Connection", "Rows", "Store", "namespace", "open_store"]


class Rows(Protocol):
    """What :meth:`Connection.execute` returns: a DB-API cursor's reading side."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """One thread's connection to a store; SQL uses ``?`` placeholders on every backend."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None: ...


class Store(ABC):
    """A plugin's tables, safe for several worker processes and for handlers on several
    threads (``--concurrency``): each thread has its own connection, hence its own transaction.

    :meth:`batch` is one transaction around a whole batch of messages (the plugins'
    ``around_batch``); inside it :meth:`transaction` is a savepoint per message, outside it
    a transaction of its own.
    """

    #: ``sqlite`` or ``postgresql``: for the rare statement that differs.
    dialect: Literal["sqlite", "postgresql"]
    #: Whether other hosts see the same data (a database server, not a local file).
    shared: bool

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def db(self) -> Connection:
        """This thread's connection, opened on first use."""
        db: Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One write transaction around a whole batch of messages: the plugins' ``around_batch``.

        A commit per message costs more than the work it commits; inside a batch,
        :meth:`transaction` is a savepoint, so a message that fails leaves nothing behind
        while the batch's other messages commit together.
        """
        db = self.db
        with self._writing():
            db.execute(self._begin)
            try:
                yield
            except BaseException:
                self._rollback(db)
                raise
            db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One message's writes: all or nothing, committed on success (at the batch's end, in one)."""
        db = self.db
        if self._in_transaction(db):  # inside batch(): a savepoint, committed with the batch
            db.execute("SAVEPOINT message")
            try:
                yield db
            except BaseException:
                self._rollback(db, "message")
                raise
            db.execute("RELEASE message")
            return
        with self._writing():
            db.execute(self._begin)
            try:
                yield db
            except BaseException:
                self._rollback(db)
                raise
            db.execute("COMMIT")

    @abstractmethod
    def close(self) -> None:
        """Close every thread's connection."""

    # --- what a backend provides -------------------------------------------------------

    #: How a write transaction begins.
    _begin = "BEGIN"

    @abstractmethod
    def _connect(self) -> Connection:
        """A new connection for the calling thread."""

    @abstractmethod
    def _in_transaction(self, db: Connection) -> bool:
        """Whether ``db`` is inside a transaction (a batch)."""

    def _writing(self) -> AbstractContextManager[object]:
        """Held while a write transaction is open: nothing by default."""
        return nullcontext()

    def _rollback(self, db: Connection, savepoint: str | None = None) -> None:
        """Undo the transaction, or back to ``savepoint`` and release it."""
        if savepoint is None:
            db.execute("ROLLBACK")
        else:
            db.execute(f"ROLLBACK TO {savepoint}")
            db.execute(f"RELEASE {savepoint}")


def namespace(plugin: str, name: str) -> str:
    """The PostgreSQL schema of a plugin's store ``name``: ``<plugin>``, or ``<plugin>_<name>``."""
    return (plugin if name == plugin else f"{plugin}_{name}").replace("-", "_")


def open_store(env: PluginEnv, name: str, schema: str | Sequence[str]) -> Store:
    """A plugin's store ``name``, its tables created (or completed) by ``schema``.

    With the plugin's ``database_url`` a ``postgresql://`` URL, the tables live in the
    PostgreSQL schema ``<plugin>`` (``<plugin>_<name>`` for a second store of the plugin)
    of that database, shared by every instance; otherwise in ``<data_dir>/<name>.sqlite3``.

    :param env: the plugin's start-up environment.
    :param name: the store's name, unique within the plugin.
    :param schema: ``CREATE ... IF NOT EXISTS`` statements; on PostgreSQL they run under an
        advisory lock, so instances starting at once never race to create the same table.
    """
    statements = [schema] if isinstance(schema, str) else list(schema)
    url = env.database_url
    if url:
        try:
            from kafkaworkers.stores.postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError(
                f"database_url of plugin {env.name!r} needs psycopg 3: pip install 'kafkaworkers[postgres]' ({exc})"
            ) from None

        return PostgresStore(url, namespace(env.name, name), statements)
    from kafkaworkers.stores.sqlite import SqliteStore

    return SqliteStore(env.data_dir / f"{name}.sqlite3", statements)
