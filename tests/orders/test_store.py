"""The services' SQLite helper: a transaction per message, or one per batch with a savepoint per message."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from kafkaworkers_orders.store import Store

SCHEMA = "CREATE TABLE IF NOT EXISTS feito (chave TEXT PRIMARY KEY);"


def rows(path: Path) -> list[str]:
    """What another connection (another process) sees committed."""
    with sqlite3.connect(path) as other:
        return [r[0] for r in other.execute("SELECT chave FROM feito ORDER BY chave")]


def write(store: Store, chave: str, fail: bool = False) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO feito VALUES (?)", (chave,))
        if fail:
            raise ValueError("the handler failed after writing")


def test_a_batch_commits_its_messages_together_and_a_failed_message_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path, SCHEMA)
    with store.batch():
        write(store, "a")
        with pytest.raises(ValueError):
            write(store, "b", fail=True)
        write(store, "c")
        assert rows(path) == [], "nothing is visible before the batch commits"
    assert rows(path) == ["a", "c"]


def test_a_batch_that_fails_rolls_every_message_back_and_the_store_works_on(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path, SCHEMA)
    with pytest.raises(RuntimeError), store.batch():
        write(store, "a")
        raise RuntimeError("the commit would fail")
    assert rows(path) == []
    write(store, "a")
    assert rows(path) == ["a"], "outside a batch a transaction commits at once"
