"""relatorios: a DuckDB warehouse of every order event, and ``kafkaworkers report`` over it.

Consumes all six order topics into ``<data_dir>/relatorios/warehouse.duckdb`` (see
:mod:`.warehouse`): each event once by its event id, each order's current state derived
from the facts so far, whatever order the topics interleave in.

A handler only appends the event to a SQLite buffer (``buffer.sqlite3``) and returns, so
the offset is stored only once the event is durable; the buffer is loaded into DuckDB in
one transaction per :data:`FLUSH_EVENTS` events or :data:`FLUSH_SECONDS`, at start (what a
crash left) and at stop. A crash between the DuckDB commit and emptying the buffer loads the
same events again, which the warehouse ignores by event id. The module is the entry point
because it implements two hooks: the plugin declaration and the ``report`` command.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import msgspec

from kafkaworkers import Context, Plugin, PluginEnv, hookimpl
from kafkaworkers.config import load_settings
from kafkaworkers_orders.contracts import TOPICS, Event
from kafkaworkers_orders.relatorios.warehouse import FILE_NAME, Warehouse, render
from kafkaworkers_orders.store import Store

__all__ = ["flush", "kafkaworkers_declare", "kafkaworkers_register_commands", "plugin", "report", "warehouse"]

BUFFER_FILE = "buffer.sqlite3"
BUFFER_SCHEMA = """
CREATE TABLE IF NOT EXISTS pendentes (
    event_id TEXT PRIMARY KEY,
    topico TEXT NOT NULL,
    valor BLOB NOT NULL,
    recebido_em TEXT NOT NULL
);
"""
FLUSH_EVENTS = 1000
FLUSH_SECONDS = 1.0

plugin = Plugin("relatorios", description="Keeps a DuckDB warehouse of order events for `kafkaworkers report`.")
_decoders = {topic: msgspec.json.Decoder(typ) for topic, typ in TOPICS.items()}


@dataclass
class _State:
    warehouse: Warehouse
    buffer: Store
    pending: int = 0
    since: float = 0.0


_state: _State | None = None


@plugin.on_start
def start(env: PluginEnv) -> None:
    global _state
    _state = _State(Warehouse(env.data_dir / FILE_NAME), Store(env.data_dir / BUFFER_FILE, BUFFER_SCHEMA))
    flush()


@plugin.on_stop
def stop(_unused: object) -> None:
    global _state
    if _state is not None:
        flush()
        _state.warehouse.close()
        _state.buffer.close()
        _state = None


def warehouse() -> Warehouse:
    """The running plugin's warehouse."""
    return _require().warehouse


def flush() -> int:
    """Load the buffered events into the warehouse; how many were new to it."""
    state = _require()
    rows = state.buffer.db.execute("SELECT rowid, topico, valor, recebido_em FROM pendentes ORDER BY rowid").fetchall()
    new = state.warehouse.record_many(
        (topic, _decoders[topic].decode(value), datetime.fromisoformat(received)) for _, topic, value, received in rows
    )
    if rows:
        state.buffer.db.execute("DELETE FROM pendentes WHERE rowid <= ?", (rows[-1][0],))
    state.pending = 0
    return new


def _buffer(event: Event, ctx: Context) -> None:
    state = _require()
    state.buffer.db.execute(
        "INSERT OR IGNORE INTO pendentes VALUES (?, ?, ?, ?)",
        (event.event_id, ctx.topic, msgspec.json.encode(event), datetime.now(UTC).isoformat()),
    )
    if state.pending == 0:
        state.since = time.monotonic()
    state.pending += 1
    if state.pending >= FLUSH_EVENTS or time.monotonic() - state.since >= FLUSH_SECONDS:
        flush()


for _topic, _type in TOPICS.items():
    plugin.consumes(_topic, _type)(_buffer)

plugin.around_batch(lambda _unused: _require().buffer.batch())


def _require() -> _State:
    if _state is None:
        raise RuntimeError("relatorios is not started")
    return _state


@hookimpl
def kafkaworkers_declare() -> Plugin:
    return plugin


@click.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The relatorios data directory [default: the settings' data_dir/relatorios].",
)
def report(fmt: str, data_dir: Path | None) -> None:
    """Orders by final state, revenue, fraud and out-of-stock rates, and time to each milestone."""
    directory = data_dir or Path(load_settings().data_dir) / plugin.name
    store = Warehouse(directory / FILE_NAME, read_only=True)
    try:
        summary: dict[str, Any] = store.summary()
    finally:
        store.close()
    summary["pending_events"] = _pending(directory / BUFFER_FILE)
    click.echo(json.dumps(summary, indent=2) if fmt == "json" else render(summary))


def _pending(path: Path) -> int:
    """Events a crashed worker left in its buffer: not in the warehouse until relatorios starts again."""
    if not path.is_file():
        return 0
    with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as buffer:
        return buffer.execute("SELECT count(*) FROM pendentes").fetchone()[0]


@hookimpl
def kafkaworkers_register_commands(cli: click.Group) -> None:
    cli.add_command(report)
