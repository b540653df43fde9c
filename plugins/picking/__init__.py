"""picking: joins each order's three outcomes and either picks it or cancels it.

Consumes ``reserva-estoque``, ``processo-pagamento`` and ``fraude-verificado``, in whatever
order they arrive, into one durable row per order. The order is picked (``processo-picking``
iniciado then concluido) once it is reserved, its payment approved and it is not fraud; the
first negative outcome (sem_estoque, recusado, fraude) cancels it instead
(``pedido-cancelado``, which reserva and pagamento compensate). Both end states are final:
a cancelled order is never picked, and a later negative adds nothing.

What to publish is derived from the committed state, not from whether the state changed: a
crash after the commit but before the broker acknowledged the events re-publishes them when
the message is redelivered, with the same deterministic event ids, so consumers drop the
copies. Compensation statuses (liberado, estornado) are ignored.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Literal, NamedTuple

from kafkaworkers import Context, Plugin, PluginEnv, Store, open_store
from kafkaworkers_orders.contracts import (
    FRAUDE_VERIFICADO,
    PEDIDO_CANCELADO,
    PROCESSO_PAGAMENTO,
    PROCESSO_PICKING,
    RESERVA_ESTOQUE,
    FraudeVerificado,
    PedidoCancelado,
    ProcessoPagamento,
    ProcessoPicking,
    ReservaEstoque,
    event_id_for,
)

__all__ = ["Juncao", "Sinal", "decidir", "plugin"]

Motivo = Literal["fraude", "pagamento_recusado", "sem_estoque"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS pedido (
    order_id TEXT PRIMARY KEY,
    reservado INTEGER,
    pagamento TEXT,
    fraude INTEGER,
    estado TEXT NOT NULL DEFAULT 'aguardando' CHECK (estado IN (
        'aguardando', 'separado', 'cancelado_fraude', 'cancelado_pagamento_recusado', 'cancelado_sem_estoque'
    )),
    detalhe TEXT NOT NULL DEFAULT ''
);
"""


_ETAPAS: tuple[Literal["iniciado", "concluido"], ...] = ("iniciado", "concluido")


class Sinal(NamedTuple):
    """One outcome about an order: the column it fills, its value, and the cancellation it causes."""

    campo: Literal["reservado", "pagamento", "fraude"]
    valor: int | str
    cancela: Motivo | None = None
    detalhe: str = ""


class Pedido(NamedTuple):
    reservado: int | None
    pagamento: str | None
    fraude: int | None
    estado: str


def decidir(pedido: Pedido, sinal: Sinal) -> str:
    """The order's state after ``sinal`` was recorded in ``pedido``.

    The first negative outcome cancels, all three positive ones pick; both are final.
    """
    if pedido.estado != "aguardando":
        return pedido.estado
    if sinal.cancela is not None:
        return f"cancelado_{sinal.cancela}"
    if pedido.reservado == 1 and pedido.pagamento == "aprovado" and pedido.fraude == 0:
        return "separado"
    return "aguardando"


def eventos(
    order_id: str, estado: str, detalhe: str, sinal: Sinal
) -> list[tuple[str, ProcessoPicking | PedidoCancelado]]:
    """What ``sinal`` makes this service (re)publish, given the state it left the order in.

    A positive outcome of a picked order re-publishes both stages; the negative outcome that
    cancelled an order re-publishes its cancellation; anything else publishes nothing.
    """
    if estado == "separado" and sinal.cancela is None:
        return [
            (
                PROCESSO_PICKING,
                ProcessoPicking(
                    order_id=order_id, status=etapa, event_id=event_id_for(order_id, f"{PROCESSO_PICKING}:{etapa}")
                ),
            )
            for etapa in _ETAPAS
        ]
    if sinal.cancela is not None and estado == f"cancelado_{sinal.cancela}":
        cancelado = PedidoCancelado(
            order_id=order_id, motivo=sinal.cancela, detalhe=detalhe, event_id=event_id_for(order_id, PEDIDO_CANCELADO)
        )
        return [(PEDIDO_CANCELADO, cancelado)]
    return []


class Juncao:
    """The durable join: one row per order with each outcome as it arrives.

    With ``database_url`` the rows live in PostgreSQL, shared by every instance, so the join is
    complete whichever instance receives each outcome: the upsert locks the order's row, and
    the outcome that arrives second (on any instance) sees the first one's column.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def registrar(self, order_id: str, sinal: Sinal) -> tuple[str, str]:
        """Record an outcome and move the order on; its state and the detail of its cancellation."""
        with self.store.transaction() as db:
            # campo is one of three literal column names, never input.
            row = db.execute(
                f"INSERT INTO pedido (order_id, {sinal.campo}) VALUES (?, ?)"
                f" ON CONFLICT (order_id) DO UPDATE SET {sinal.campo} = excluded.{sinal.campo}"
                " RETURNING reservado, pagamento, fraude, estado, detalhe",
                (order_id, sinal.valor),
            ).fetchone()
            pedido, detalhe = Pedido(*row[:4]), row[4]
            estado = decidir(pedido, sinal)
            if estado != pedido.estado:
                detalhe = sinal.detalhe
                db.execute("UPDATE pedido SET estado = ?, detalhe = ? WHERE order_id = ?", (estado, detalhe, order_id))
        return estado, detalhe


plugin: Plugin[Juncao] = Plugin(
    "picking",
    produces={PROCESSO_PICKING: ProcessoPicking, PEDIDO_CANCELADO: PedidoCancelado},
    description="Picks orders that are reserved, paid and not fraud; cancels the others.",
)


@plugin.on_start
def start(env: PluginEnv) -> Juncao:
    return Juncao(open_store(env, "picking", SCHEMA))


@plugin.on_stop
def stop(juncao: Juncao) -> None:
    juncao.store.close()


@plugin.around_batch
def batch(juncao: Juncao) -> AbstractContextManager[None]:
    return juncao.store.batch()


def _aplicar(order_id: str, sinal: Sinal, ctx: Context[Juncao]) -> None:
    estado, detalhe = ctx.state.registrar(order_id, sinal)
    for topic, evento in eventos(order_id, estado, detalhe, sinal):
        ctx.produce(topic, evento)


@plugin.consumes(RESERVA_ESTOQUE)
def reserva(evento: ReservaEstoque, ctx: Context[Juncao]) -> None:
    if evento.status == "reservado":
        _aplicar(evento.order_id, Sinal("reservado", 1), ctx)
    elif evento.status == "sem_estoque":
        _aplicar(evento.order_id, Sinal("reservado", 0, "sem_estoque", evento.motivo), ctx)


@plugin.consumes(PROCESSO_PAGAMENTO)
def pagamento(evento: ProcessoPagamento, ctx: Context[Juncao]) -> None:
    if evento.status == "aprovado":
        _aplicar(evento.order_id, Sinal("pagamento", "aprovado"), ctx)
    elif evento.status == "recusado":
        _aplicar(evento.order_id, Sinal("pagamento", "recusado", "pagamento_recusado", evento.motivo), ctx)


@plugin.consumes(FRAUDE_VERIFICADO)
def fraude(evento: FraudeVerificado, ctx: Context[Juncao]) -> None:
    if evento.fraude:
        detalhe = f"score {evento.score}: " + "; ".join(evento.motivos)
        _aplicar(evento.order_id, Sinal("fraude", 1, "fraude", detalhe), ctx)
    else:
        _aplicar(evento.order_id, Sinal("fraude", 0), ctx)
