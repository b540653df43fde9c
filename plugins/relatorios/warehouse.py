"""The relatorios warehouse: every order event as a fact, every order's current state, in DuckDB.

``eventos`` holds one row per event id: a batch inserts only the ids not there yet (the
primary key backs that up), and only those touch ``pedidos``. Each ``pedidos`` column is
written once, first value wins, so events of different topics may arrive in any order and a
redelivered event changes nothing. ``estado`` is derived from the columns, never from the
arrival order: cancelled beats separated beats picking beats in progress.

Writes go in batches, a few statements each whatever the batch size: DuckDB is built for
bulk work, and one transaction per event costs milliseconds. DuckDB lets one process open a
file for writing, and then no other process may read it: the plugin holds it while it runs,
``kafkaworkers report`` opens it read-only once the worker stopped.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kafkaworkers import KafkaWorkersError
from kafkaworkers_orders.contracts import (
    Event,
    FraudeVerificado,
    PedidoCancelado,
    PedidoNovo,
    ProcessoPagamento,
    ProcessoPicking,
    ReservaEstoque,
    reais,
)

__all__ = ["FILE_NAME", "Warehouse", "facts", "reais", "render"]

FILE_NAME = "warehouse.duckdb"

SCHEMA = """
CREATE TABLE IF NOT EXISTS eventos (
    event_id VARCHAR PRIMARY KEY,
    order_id VARCHAR NOT NULL,
    topico VARCHAR NOT NULL,
    tipo VARCHAR NOT NULL,
    valor_centavos BIGINT,
    occurred_at TIMESTAMP NOT NULL,
    recebido_em TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS pedidos (
    order_id VARCHAR PRIMARY KEY,
    estado VARCHAR NOT NULL DEFAULT 'em_andamento',
    criado_em TIMESTAMP,
    valor_centavos BIGINT,
    estoque VARCHAR,
    estoque_em TIMESTAMP,
    pagamento VARCHAR,
    pagamento_em TIMESTAMP,
    pago_centavos BIGINT,
    fraude BOOLEAN,
    fraude_em TIMESTAMP,
    picking_em TIMESTAMP,
    separado_em TIMESTAMP,
    cancelado_motivo VARCHAR,
    cancelado_em TIMESTAMP,
    estornado_centavos BIGINT,
    estornado_em TIMESTAMP,
    liberado_em TIMESTAMP,
    atualizado_em TIMESTAMP NOT NULL
);
"""

#: The ``pedidos`` columns, in table order.
ORDER_COLUMNS = (
    "order_id", "estado", "criado_em", "valor_centavos", "estoque", "estoque_em", "pagamento", "pagamento_em",
    "pago_centavos", "fraude", "fraude_em", "picking_em", "separado_em", "cancelado_motivo", "cancelado_em",
    "estornado_centavos", "estornado_em", "liberado_em", "atualizado_em",
)  # fmt: skip


def _estado(row: dict[str, Any]) -> str:
    if row.get("cancelado_motivo") is not None:
        return "cancelado"
    if row.get("separado_em") is not None:
        return "separado"
    if row.get("picking_em") is not None:
        return "em_separacao"
    return "em_andamento"


#: What the report measures latency to: label → the ``pedidos`` column.
MILESTONES = {"payment": "pagamento_em", "fraud verdict": "fraude_em", "picking started": "picking_em"}


def _utc(moment: datetime) -> datetime:
    """Naive UTC, the form TIMESTAMP columns hold, whatever zone the event was written in."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def _fact(topic: str, event: Event, received: datetime) -> tuple[Any, ...]:
    """An ``eventos`` row."""
    tipo, valor, _ = facts(topic, event)
    return event.event_id, event.order_id, topic, tipo, valor, _utc(event.occurred_at), received


def facts(topic: str, event: Event) -> tuple[str, int | None, dict[str, Any]]:
    """An event's ``tipo``, its amount, and the ``pedidos`` columns it sets."""
    at = _utc(event.occurred_at)
    if isinstance(event, PedidoNovo):
        total = event.total_centavos
        return "criado", total, {"criado_em": _utc(event.criado_em), "valor_centavos": total}
    if isinstance(event, ReservaEstoque):
        if event.status == "liberado":
            return event.status, None, {"liberado_em": at}
        return event.status, None, {"estoque": event.status, "estoque_em": at}
    if isinstance(event, ProcessoPagamento):
        if event.status == "estornado":
            columns = {"estornado_centavos": event.valor_centavos, "estornado_em": at}
        else:
            paid = event.valor_centavos if event.status == "aprovado" else None
            columns = {"pagamento": event.status, "pagamento_em": at, "pago_centavos": paid}
        return event.status, event.valor_centavos, columns
    if isinstance(event, FraudeVerificado):
        return ("fraude" if event.fraude else "legitimo"), None, {"fraude": event.fraude, "fraude_em": at}
    if isinstance(event, ProcessoPicking):
        return event.status, None, {"picking_em" if event.status == "iniciado" else "separado_em": at}
    if isinstance(event, PedidoCancelado):
        return event.motivo, None, {"cancelado_motivo": event.motivo, "cancelado_em": at}
    raise TypeError(f"no warehouse mapping for {type(event).__name__} from {topic!r}")


class Warehouse:
    """The DuckDB file: written by the plugin, read by ``kafkaworkers report``.

    :param path: the database file.
    :param read_only: open for reading only (the report); the file must exist.
    """

    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = path
        if read_only and not path.is_file():
            raise KafkaWorkersError(f"no warehouse at {path}; run the relatorios plugin first or pass --data-dir")
        # Imported here, not at the top: every `kafkaworkers run` loads all installed plugins,
        # and DuckDB's ~10 MiB of resident memory belongs only in the process that runs relatorios.
        import duckdb

        try:
            self.db = duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            raise KafkaWorkersError(
                f"cannot open the warehouse {path}: {exc}. Only one process may hold it for writing,"
                " and none may read it meanwhile: stop the relatorios worker first"
            ) from None
        if not read_only:
            self.db.execute(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def record(self, topic: str, event: Event, recebido_em: datetime | None = None) -> bool:
        """Add one event; ``False`` when its event id was already there (nothing changes then)."""
        return self.record_many([(topic, event, recebido_em or datetime.now(UTC))]) == 1

    def record_many(self, batch: Iterable[tuple[str, Event, datetime]]) -> int:
        """Add (topic, event, received at) triples in one transaction; how many were new."""
        batch = list(batch)
        if not batch:
            return 0
        self.db.begin()
        try:
            ids = [event.event_id for _, event, _ in batch]
            sql = "SELECT event_id FROM eventos WHERE event_id IN (SELECT unnest(?))"
            known = {event_id for (event_id,) in self.db.execute(sql, [ids]).fetchall()}
            fresh = []
            for topic, event, received in batch:
                if event.event_id not in known:
                    known.add(event.event_id)
                    fresh.append((topic, event, _utc(received)))
            if fresh:
                self._insert("eventos", [_fact(topic, event, received) for topic, event, received in fresh])
                self._merge(fresh)
        except BaseException:
            self.db.rollback()
            raise
        self.db.commit()
        return len(fresh)

    def _merge(self, fresh: list[tuple[str, Event, datetime]]) -> None:
        """Fill each touched order's still empty columns, then the state they imply."""
        ids = list({event.order_id for _, event, _ in fresh})
        sql = f"SELECT {', '.join(ORDER_COLUMNS)} FROM pedidos WHERE order_id IN (SELECT unnest(?))"
        found = self.db.execute(sql, [ids]).fetchall()
        orders = {row[0]: dict(zip(ORDER_COLUMNS, row, strict=True)) for row in found}
        for topic, event, received in fresh:
            order = orders.setdefault(event.order_id, {**dict.fromkeys(ORDER_COLUMNS), "order_id": event.order_id})
            for column, value in facts(topic, event)[2].items():
                if order[column] is None:
                    order[column] = value
            order["estado"] = _estado(order)
            order["atualizado_em"] = received
        self._insert("pedidos", [tuple(o.values()) for o in orders.values()], replace=True)

    def _insert(self, table: str, rows: list[tuple[Any, ...]], replace: bool = False) -> None:
        # One statement for the whole batch: each column travels as one list and is unnested.
        columns = [list(column) for column in zip(*rows, strict=True)]
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        self.db.execute(f"{verb} INTO {table} SELECT {', '.join('unnest(?)' for _ in columns)}", columns)

    def summary(self) -> dict[str, Any]:
        """The numbers ``kafkaworkers report`` prints."""
        q = self.db.execute
        states = q(
            "SELECT CASE WHEN estado = 'cancelado' THEN 'cancelado: ' || cancelado_motivo ELSE estado END, count(*)"
            " FROM pedidos GROUP BY ALL ORDER BY 2 DESC, 1"
        ).fetchall()
        approved, refunded = q(
            "SELECT coalesce(sum(pago_centavos), 0), coalesce(sum(estornado_centavos), 0) FROM pedidos"
        ).fetchone() or (0, 0)
        fraud, verdicts, sold_out, reservations = q(
            "SELECT count(*) FILTER (WHERE fraude), count(fraude),"
            " count(*) FILTER (WHERE estoque = 'sem_estoque'), count(estoque) FROM pedidos"
        ).fetchone() or (0, 0, 0, 0)
        latency: dict[str, dict[str, float | int | None]] = {}
        for label, column in MILESTONES.items():
            quantiles, n = q(
                f"SELECT quantile_cont(date_diff('microsecond', criado_em, {column}) / 1e6, [0.5, 0.95, 0.99]),"
                f" count(*) FROM pedidos WHERE criado_em IS NOT NULL AND {column} IS NOT NULL"
            ).fetchone() or (None, 0)
            p50, p95, p99 = quantiles or (None, None, None)
            latency[label] = {"p50": p50, "p95": p95, "p99": p99, "orders": n}
        return {
            "orders": sum(n for _, n in states),
            "by_state": dict(states),
            "revenue_approved_cents": approved,
            "revenue_refunded_cents": refunded,
            "revenue_net_cents": approved - refunded,
            "fraud_orders": fraud,
            "fraud_verdicts": verdicts,
            "fraud_rate": fraud / verdicts if verdicts else None,
            "out_of_stock_orders": sold_out,
            "reservations": reservations,
            "out_of_stock_rate": sold_out / reservations if reservations else None,
            "latency_seconds": latency,
        }


def render(summary: dict[str, Any]) -> str:
    """The summary as plain text with aligned columns."""
    width = max(24, *(len(state) + 4 for state in summary["by_state"]))

    def row(label: str, value: object, note: str = "") -> str:
        return f"{label:<{width}}{value!s:>14}" + (f"   {note}" if note else "")

    def rate(part: int, of: int, what: str) -> tuple[str, str]:
        return ("-", "") if not of else (f"{part / of * 100:.1f} %", f"{part} of {of} {what}")

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} s"

    fraud = rate(summary["fraud_orders"], summary["fraud_verdicts"], "verdicts")
    sold_out = rate(summary["out_of_stock_orders"], summary["reservations"], "reservations")
    lines = [row("Orders", summary["orders"])]
    lines += [row(f"  {state}", n) for state, n in summary["by_state"].items()]
    lines += [
        "",
        row("Revenue approved", reais(summary["revenue_approved_cents"])),
        row("Revenue refunded", reais(summary["revenue_refunded_cents"])),
        row("Revenue net", reais(summary["revenue_net_cents"])),
        row("Fraud rate", *fraud),
        row("Out-of-stock rate", *sold_out),
        "",
    ]
    latency = summary["latency_seconds"]
    quantiles = ("p50", "p95", "p99")
    # Each column two spaces wider than its widest value, so long waits never run together.
    col = 2 + max([10, *(len(secs(stats[q])) for stats in latency.values() for q in quantiles)])
    heads = "".join(f"{q:>{col}}" for q in quantiles)
    lines.append(f"{'Time from order creation':<{width}}{heads}{'orders':>8}")
    for label, stats in latency.items():
        cells = "".join(f"{secs(stats[q]):>{col}}" for q in quantiles)
        lines.append(f"{'  to ' + label:<{width}}{cells}{stats['orders']:>8}")
    if summary.get("pending_events"):
        lines += ["", f"{summary['pending_events']} event(s) not loaded yet: they load when relatorios next starts"]
    return "\n".join(lines)
