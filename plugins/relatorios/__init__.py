"""relatorios: a DuckDB warehouse of every order event, and ``kafkaworkers report`` over it.

Consumes all six order topics into ``<data_dir>/relatorios/warehouse.duckdb`` (see
:mod:`.warehouse`): each event once by its event id, each order's current state derived
from the facts so far, whatever order the topics interleave in.

A handler only appends the event to a SQLite buffer (``buffer.sqlite3``) and returns, so
the offset is stored only once the event is durable; the buffer is loaded into DuckDB in
one transaction per :data:`FLUSH_EVENTS` events or :data:`FLUSH_SECONDS`, at start (what a
crash left) and at stop. A crash between the DuckDB commit and emptying the buffer loads the
same events again, which the warehouse ignores by event id.

On several hosts (``database_url`` set) relatorios scales instead of keeping one writer:
every instance appends its events to one table of facts in the shared PostgreSQL schema
``relatorios_fatos``, once per event id whichever instance received it, and keeps no DuckDB
file; ``kafkaworkers report`` folds all the facts into an in-memory warehouse and reports
from it, so the report is complete however the topics' partitions were spread, and an
instance that dies loses nothing (its uncommitted events are redelivered to another).

The module is the entry point because it implements two hooks: the plugin declaration and
the ``report`` command.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import msgspec

from kafkaworkers import Context, Plugin, PluginEnv, Store, hookimpl, open_store
from kafkaworkers.config import load_settings
from kafkaworkers_orders.contracts import TOPICS, Event
from kafkaworkers_orders.relatorios.warehouse import FILE_NAME, Warehouse, render

__all__ = ["Relatorios", "kafkaworkers_declare", "kafkaworkers_register_commands", "plugin", "report"]

BUFFER_FILE = "buffer.sqlite3"
BUFFER_SCHEMA = """
CREATE TABLE IF NOT EXISTS pendentes (
    event_id TEXT PRIMARY KEY,
    topico TEXT NOT NULL,
    valor BLOB NOT NULL,
    recebido_em TEXT NOT NULL
);
"""
#: The shared facts (``database_url``): every event once, kept for the report.
FACTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS fatos (
    event_id TEXT PRIMARY KEY,
    topico TEXT NOT NULL,
    valor TEXT NOT NULL,
    recebido_em TEXT NOT NULL
);
"""
FLUSH_EVENTS = 1000
FLUSH_SECONDS = 1.0

_decoders = {topic: msgspec.json.Decoder(typ) for topic, typ in TOPICS.items()}


@dataclass
class Relatorios:
    """The running plugin's state: the warehouse, the buffer in front of it, and when it was last loaded.

    With no warehouse (``database_url`` set), the buffer is the shared table of facts itself.
    """

    warehouse: Warehouse | None
    buffer: Store
    pending: int = 0
    since: float = 0.0

    def buffer_event(self, topic: str, event: Event) -> None:
        """Keep one event durably in the buffer; load the buffer once it is big or old enough."""
        table = "pendentes" if self.warehouse is not None else "fatos"
        self.buffer.db.execute(
            f"INSERT INTO {table} VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (event.event_id, topic, msgspec.json.encode(event).decode(), datetime.now(UTC).isoformat()),
        )
        if self.warehouse is None:
            return
        if self.pending == 0:
            self.since = time.monotonic()
        self.pending += 1
        if self.pending >= FLUSH_EVENTS or time.monotonic() - self.since >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> int:
        """Load the buffered events into the warehouse; how many were new to it."""
        if self.warehouse is None:
            return 0
        sql = "SELECT rowid, topico, valor, recebido_em FROM pendentes ORDER BY rowid"
        rows = self.buffer.db.execute(sql).fetchall()
        new = self.warehouse.record_many(
            (topic, _decoders[topic].decode(value), datetime.fromisoformat(received))
            for _, topic, value, received in rows
        )
        if rows:
            self.buffer.db.execute("DELETE FROM pendentes WHERE rowid <= ?", (rows[-1][0],))
        self.pending = 0
        return new


plugin: Plugin[Relatorios] = Plugin(
    "relatorios", description="Keeps a DuckDB warehouse of order events for `kafkaworkers report`."
)


@plugin.on_start
def start(env: PluginEnv) -> Relatorios:
    if env.database_url:
        return Relatorios(None, open_store(env, "fatos", FACTS_SCHEMA))
    relatorios = Relatorios(Warehouse(env.data_dir / FILE_NAME), open_store(env, "buffer", BUFFER_SCHEMA))
    relatorios.flush()
    return relatorios


@plugin.on_stop
def stop(relatorios: Relatorios) -> None:
    relatorios.flush()
    if relatorios.warehouse is not None:
        relatorios.warehouse.close()
    relatorios.buffer.close()


@plugin.around_batch
def batch(relatorios: Relatorios) -> AbstractContextManager[None]:
    return relatorios.buffer.batch()


def _buffer(event: Event, ctx: Context[Relatorios]) -> None:
    ctx.state.buffer_event(ctx.topic, event)


# One handler for every topic, each decoded as its own contract (all are Events).
for _topic, _type in TOPICS.items():
    plugin.consumes(_topic, _type)(_buffer)


@hookimpl
def kafkaworkers_declare() -> Plugin[Relatorios]:
    return plugin


@click.command()
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True, help="Output format."
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The relatorios data directory [default: the settings' data_dir/relatorios].",
)
def report(fmt: str, data_dir: Path | None) -> None:
    """Orders by final state, revenue, fraud and out-of-stock rates, and time to each milestone."""
    settings = load_settings()
    directory = data_dir or Path(settings.data_dir) / plugin.name
    url = settings.database_url_for(plugin.name)
    summary: dict[str, Any]
    if url:
        summary = shared_summary(PluginEnv(plugin.name, {}, directory, url))
    else:
        store = Warehouse(directory / FILE_NAME, read_only=True)
        try:
            summary = store.summary()
        finally:
            store.close()
        summary["pending_events"] = _pending(directory / BUFFER_FILE)
    click.echo(json.dumps(summary, indent=2) if fmt == "json" else render(summary))


def shared_summary(env: PluginEnv) -> dict[str, Any]:
    """The report of the facts every instance recorded in the shared database, folded in memory."""
    facts = open_store(env, "fatos", FACTS_SCHEMA)
    warehouse = Warehouse(Path(":memory:"))
    try:
        rows = facts.db.execute("SELECT topico, valor, recebido_em FROM fatos ORDER BY recebido_em").fetchall()
        warehouse.record_many(
            (topic, _decoders[topic].decode(value), datetime.fromisoformat(received)) for topic, value, received in rows
        )
        summary: dict[str, Any] = warehouse.summary()
    finally:
        warehouse.close()
        facts.close()
    summary["pending_events"] = 0
    return summary


def _pending(path: Path) -> int:
    """Events a crashed worker left in its buffer: not in the warehouse until relatorios starts again."""
    if not path.is_file():
        return 0
    # A file URI (for mode=ro) must be absolute, and the default data directory is relative.
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as buffer:
        return buffer.execute("SELECT count(*) FROM pendentes").fetchone()[0]


@hookimpl
def kafkaworkers_register_commands(cli: click.Group) -> None:
    cli.add_command(report)
