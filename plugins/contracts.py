"""The order pipeline's message contracts: one msgspec type per topic, defined once.

Every plugin imports its types from here, so the registry can check that all of them agree
on each topic. Every event carries an event id, the order id (also the message key), a
schema version and when it happened. Money is integer cents, never a float.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

SCHEMA_VERSION = 1

# --- topics ------------------------------------------------------------------------------

#: Every order the sales system receives.
PEDIDO_NOVO = "pedido-novo"
#: The status of an order's payment: aprovado, recusado, estornado (refunded).
PROCESSO_PAGAMENTO = "processo-pagamento"
#: Whether an order was judged fraud, with its score and reasons.
FRAUDE_VERIFICADO = "fraude-verificado"
#: The picking (separation) stages of an order: iniciado, concluido.
PROCESSO_PICKING = "processo-picking"
#: Added: the outcome of a stock reservation: reservado, sem_estoque, liberado (released).
RESERVA_ESTOQUE = "reserva-estoque"
#: Added: an order was cancelled, and why; payment refunds and stock is released on it.
PEDIDO_CANCELADO = "pedido-cancelado"

OrderId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Sku = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[A-Z0-9-]+$")]
Cents = Annotated[int, Meta(ge=0, le=10**11)]
Email = Annotated[str, Meta(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
Country = Annotated[str, Meta(pattern=r"^[A-Z]{2}$")]


def reais(centavos: int) -> str:
    """Cents as Brazilian money, the way every service shows it: ``R$ 12.000,00``."""
    milhares = f"{centavos // 100:,}".replace(",", ".")
    return f"R$ {milhares},{centavos % 100:02d}"


def new_event_id() -> str:
    return uuid.uuid4().hex


_EVENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:kafkaworkers-orders:event")


def event_id_for(order_id: str, kind: str) -> str:
    """The event id of an order's ``kind`` of event (e.g. ``"reserva-estoque:reservado"``).

    Deterministic, so an event re-published after a crash carries the id of the first copy
    and consumers drop it as a duplicate.
    """
    return uuid.uuid5(_EVENT_NAMESPACE, f"{order_id}/{kind}").hex


def now() -> datetime:
    return datetime.now(UTC)


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Fields every event carries."""

    order_id: OrderId
    event_id: str = msgspec.field(default_factory=new_event_id)
    schema_version: int = SCHEMA_VERSION
    occurred_at: datetime = msgspec.field(default_factory=now)


class Cliente(msgspec.Struct, frozen=True, kw_only=True):
    """The customer who placed the order."""

    id: Annotated[str, Meta(min_length=1, max_length=64)]
    nome: Annotated[str, Meta(min_length=1, max_length=200)]
    email: Email


class Item(msgspec.Struct, frozen=True, kw_only=True):
    """One order line."""

    sku: Sku
    quantidade: Annotated[int, Meta(gt=0, le=10_000)]
    preco_unitario_centavos: Cents


class Cartao(msgspec.Struct, frozen=True, kw_only=True):
    """The card to charge, as a token (never a full card number) and its last digits."""

    token: Annotated[str, Meta(min_length=4, max_length=64)]
    final: Annotated[str, Meta(pattern=r"^[0-9]{4}$")]
    pais_emissor: Country


class PedidoNovo(Event, frozen=True, kw_only=True):
    """An order as the sales system received it (topic ``pedido-novo``)."""

    cliente: Cliente
    itens: Annotated[list[Item], Meta(min_length=1, max_length=100)]
    cartao: Cartao
    pais_entrega: Country
    criado_em: datetime

    @property
    def total_centavos(self) -> int:
        return sum(i.quantidade * i.preco_unitario_centavos for i in self.itens)


class ReservaEstoque(Event, frozen=True, kw_only=True):
    """The outcome of reserving an order's stock (topic ``reserva-estoque``)."""

    status: Literal["reservado", "sem_estoque", "liberado"]
    motivo: str = ""


class ProcessoPagamento(Event, frozen=True, kw_only=True):
    """The status of an order's payment (topic ``processo-pagamento``)."""

    status: Literal["aprovado", "recusado", "estornado"]
    valor_centavos: Cents
    transacao_id: str = ""
    motivo: str = ""


class FraudeVerificado(Event, frozen=True, kw_only=True):
    """The fraud verdict of an order (topic ``fraude-verificado``)."""

    fraude: bool
    score: Annotated[int, Meta(ge=0)]
    motivos: list[str] = []


class ProcessoPicking(Event, frozen=True, kw_only=True):
    """A picking stage of an order (topic ``processo-picking``)."""

    status: Literal["iniciado", "concluido"]


class PedidoCancelado(Event, frozen=True, kw_only=True):
    """An order was cancelled (topic ``pedido-cancelado``); compensations react to it."""

    motivo: Literal["fraude", "pagamento_recusado", "sem_estoque"]
    detalhe: str = ""


TOPICS: dict[str, type[Event]] = {
    PEDIDO_NOVO: PedidoNovo,
    RESERVA_ESTOQUE: ReservaEstoque,
    PROCESSO_PAGAMENTO: ProcessoPagamento,
    FRAUDE_VERIFICADO: FraudeVerificado,
    PROCESSO_PICKING: ProcessoPicking,
    PEDIDO_CANCELADO: PedidoCancelado,
}
