"""Stock and reservations in one store: reserve an order all-or-nothing, release it once.

The store is SQLite on one host or PostgreSQL shared by instances on several (see
:func:`kafkaworkers.open_store`); the rules hold on both, under any interleaving of instances:

- A line is taken with ``UPDATE ... WHERE estoque >= ?`` and its row count checked (on
  PostgreSQL the ``WHERE`` is re-checked against a row another transaction just changed), and
  ``CHECK (estoque >= 0)`` backs that up: two orders racing for the last unit never both get it.
- The reserva row is inserted in the same transaction as the stock it took, ``ON CONFLICT DO
  NOTHING``: if another instance decided the same order meanwhile, this one gives its units
  back and reads that outcome, so an order's stock moves once.
- A release is ``UPDATE reserva SET status = 'liberado' WHERE status = 'reservado'``: only the
  transaction that changed the row puts the units back.
- Lines are locked in SKU order, so two orders never wait on each other's products in a circle.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from kafkaworkers import PluginEnv, Store, open_store
from kafkaworkers.stores import Connection
from kafkaworkers_orders.contracts import Cents, Item, Sku

__all__ = ["STORE", "Estoque", "Produto", "Resultado", "read_catalogue"]

#: The store's name: ``estoque.sqlite3`` in the data directory, schema ``reserva_estoque`` in PostgreSQL.
STORE = "estoque"

SCHEMA = """
CREATE TABLE IF NOT EXISTS produto (
    sku TEXT PRIMARY KEY,
    nome TEXT NOT NULL,
    preco_centavos BIGINT NOT NULL DEFAULT 0,
    estoque BIGINT NOT NULL CHECK (estoque >= 0)
);
-- cancelado: the cancellation came before the order; it must never reserve anything.
CREATE TABLE IF NOT EXISTS reserva (
    order_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('reservado', 'sem_estoque', 'liberado', 'cancelado')),
    motivo TEXT NOT NULL DEFAULT '',
    itens TEXT NOT NULL
);
"""


class Produto(msgspec.Struct, frozen=True, kw_only=True):
    """One catalogue entry, as ``catalogo.json`` lists it."""

    sku: Sku
    nome: Annotated[str, Meta(min_length=1, max_length=200)]
    estoque: Annotated[int, Meta(ge=0)]
    preco_centavos: Cents = 0


class Resultado(msgspec.Struct, frozen=True):
    """The outcome of reserving an order's stock."""

    status: Literal["reservado", "sem_estoque"]
    motivo: str = ""


def read_catalogue(path: Path) -> list[Produto]:
    """The products of a catalogue JSON file (a list of :class:`Produto` objects)."""
    return msgspec.json.decode(path.read_bytes(), type=list[Produto])


class Estoque:
    """The stock of one reserva process; several, on one host or several, may share the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    def open(cls, env: PluginEnv) -> Estoque:
        """The stock store of the plugin environment ``env`` (its data directory or database)."""
        return cls(open_store(env, STORE, SCHEMA))

    def close(self) -> None:
        self.store.close()

    def reservar(self, order_id: str, itens: Iterable[Item]) -> Resultado | None:
        """Reserve every line of an order, or none of them.

        Idempotent: a repeated call returns the first outcome without touching stock.
        ``None`` when the order was cancelled before it was reserved.
        """
        quantidades: Counter[str] = Counter()
        for item in itens:
            quantidades[item.sku] += item.quantidade
        select = "SELECT status, motivo FROM reserva WHERE order_id = ?"
        with self.store.transaction() as db:
            row = db.execute(select, (order_id,)).fetchone()
            if row is None:
                db.execute("SAVEPOINT reservar")
                motivo = _take(db, quantidades)
                row = ("sem_estoque" if motivo else "reservado", motivo)
                inserted = db.execute(
                    "INSERT INTO reserva VALUES (?, ?, ?, ?) ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
                    (order_id, *row, json.dumps(dict(sorted(quantidades.items())))),
                ).fetchone()
                if inserted is None:  # another instance decided this order meanwhile: its outcome stands
                    db.execute("ROLLBACK TO reservar")
                    row = db.execute(select, (order_id,)).fetchone()
                db.execute("RELEASE reservar")
        status, motivo = row
        if status == "cancelado":
            return None
        # A released order was reserved first; that stays its reservation outcome.
        return Resultado("sem_estoque" if status == "sem_estoque" else "reservado", motivo)

    def liberar(self, order_id: str) -> bool:
        """Give a cancelled order's reserved units back, once; whether its units are released.

        An order cancelled before it was reserved is marked so that it never will be.
        """
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO reserva VALUES (?, 'cancelado', '', '{}') ON CONFLICT (order_id) DO NOTHING", (order_id,)
            )
            released = db.execute(
                "UPDATE reserva SET status = 'liberado' WHERE order_id = ? AND status = 'reservado' RETURNING itens",
                (order_id,),
            ).fetchone()
            if released is not None:
                db.executemany(
                    "UPDATE produto SET estoque = estoque + ? WHERE sku = ?",
                    [(qtd, sku) for sku, qtd in sorted(json.loads(released[0]).items())],
                )
                return True
            (status,) = db.execute("SELECT status FROM reserva WHERE order_id = ?", (order_id,)).fetchone()
            return bool(status == "liberado")

    def semear(self, produtos: Iterable[Produto]) -> int:
        """Add the products not there yet, leaving every existing one's stock alone; how many were added.

        Instances starting at once may all seed: each product is inserted once, and a later
        start never resets stock that orders have taken.
        """
        rows = [(p.sku, p.nome, p.preco_centavos, p.estoque) for p in produtos]
        added = 0
        with self.store.transaction() as db:
            for row in rows:
                added += db.execute(
                    "INSERT INTO produto (sku, nome, preco_centavos, estoque) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (sku) DO NOTHING",
                    row,
                ).rowcount
        return added

    def carregar(self, produtos: Iterable[Produto]) -> int:
        """Insert or update products, setting each one's stock to the given count; how many."""
        rows = [(p.sku, p.nome, p.preco_centavos, p.estoque) for p in produtos]
        with self.store.transaction() as db:
            db.executemany(
                "INSERT INTO produto (sku, nome, preco_centavos, estoque) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (sku) DO UPDATE SET nome = excluded.nome,"
                " preco_centavos = excluded.preco_centavos, estoque = excluded.estoque",
                rows,
            )
        return len(rows)

    def produtos(self) -> list[Produto]:
        """Every product with its current stock, by SKU."""
        rows = self.store.db.execute("SELECT sku, nome, estoque, preco_centavos FROM produto ORDER BY sku")
        return [Produto(sku=s, nome=n, estoque=e, preco_centavos=p) for s, n, e, p in rows]

    def disponivel(self, sku: str) -> int | None:
        """The units of ``sku`` not reserved, or ``None`` for an unknown SKU."""
        row = self.store.db.execute("SELECT estoque FROM produto WHERE sku = ?", (sku,)).fetchone()
        return row[0] if row else None


def _take(db: Connection, quantidades: Counter[str]) -> str:
    """Take every line's units inside the caller's transaction; on the first line that cannot
    be served, put back what was taken and return why (empty when all were taken)."""
    db.execute("SAVEPOINT linhas")
    for sku, qtd in sorted(quantidades.items()):
        taken = db.execute(
            "UPDATE produto SET estoque = estoque - ? WHERE sku = ? AND estoque >= ?", (qtd, sku, qtd)
        ).rowcount
        if taken:
            continue
        left = db.execute("SELECT estoque FROM produto WHERE sku = ?", (sku,)).fetchone()
        db.execute("ROLLBACK TO linhas")
        db.execute("RELEASE linhas")
        if left is None:
            return f"SKU desconhecido: {sku}"
        return f"sem estoque: {sku} (pedidos {qtd}, disponíveis {left[0]})"
    db.execute("RELEASE linhas")
    return ""
