"""Stock and reservations in one SQLite file: reserve an order all-or-nothing, release it once.

Every change is one ``BEGIN IMMEDIATE`` transaction, so worker processes sharing the file
serialise on it. A line is taken with ``UPDATE ... WHERE estoque >= ?`` and its row count
checked, and ``CHECK (estoque >= 0)`` backs that up: two orders racing for the last unit can
never both get it. The reserva row is written in the same transaction as the stock it took,
so an order's outcome is decided once and every later delivery reads it back.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from kafkaworkers_orders.contracts import Cents, Item, Sku
from kafkaworkers_orders.store import Store

__all__ = ["DB_FILE", "Estoque", "Produto", "Resultado", "read_catalogue"]

DB_FILE = "estoque.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS produto (
    sku TEXT PRIMARY KEY,
    nome TEXT NOT NULL,
    preco_centavos INTEGER NOT NULL DEFAULT 0,
    estoque INTEGER NOT NULL CHECK (estoque >= 0)
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
    """The stock database of one reserva process; several may share the file."""

    def __init__(self, path: Path) -> None:
        self.store = Store(path, SCHEMA)

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
        with self.store.transaction() as db:
            row = db.execute("SELECT status, motivo FROM reserva WHERE order_id = ?", (order_id,)).fetchone()
            if row is None:
                motivo = _take(db, quantidades)
                row = ("sem_estoque" if motivo else "reservado", motivo)
                db.execute("INSERT INTO reserva VALUES (?, ?, ?, ?)", (order_id, *row, json.dumps(quantidades)))
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
            row = db.execute("SELECT status, itens FROM reserva WHERE order_id = ?", (order_id,)).fetchone()
            if row is None:
                db.execute("INSERT INTO reserva VALUES (?, 'cancelado', '', '{}')", (order_id,))
                return False
            status, itens = row
            if status == "reservado":
                db.executemany(
                    "UPDATE produto SET estoque = estoque + ? WHERE sku = ?",
                    [(qtd, sku) for sku, qtd in json.loads(itens).items()],
                )
                db.execute("UPDATE reserva SET status = 'liberado' WHERE order_id = ?", (order_id,))
                return True
            return status == "liberado"

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


def _take(db: sqlite3.Connection, quantidades: Counter[str]) -> str:
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
