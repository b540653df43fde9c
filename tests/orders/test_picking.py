"""picking: the durable join in every arrival order, cancelling once, never picking a
cancelled order; and the whole saga with reserva, fraude and pagamento running together."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import permutations

import pytest

from kafkaworkers_orders import fraude, pagamento, picking, reserva
from kafkaworkers_orders.contracts import (
    FRAUDE_VERIFICADO,
    PEDIDO_CANCELADO,
    PEDIDO_NOVO,
    PROCESSO_PAGAMENTO,
    PROCESSO_PICKING,
    RESERVA_ESTOQUE,
    Cartao,
    Cliente,
    Event,
    FraudeVerificado,
    Item,
    PedidoCancelado,
    PedidoNovo,
    ProcessoPagamento,
    ProcessoPicking,
    ReservaEstoque,
    event_id_for,
)
from kafkaworkers_orders.picking import Pedido, Sinal, decidir

SERVICES = ("reserva", "pagamento", "fraude")
ORDERS = list(permutations(SERVICES))

POSITIVE = {
    "reserva": lambda o: ReservaEstoque(order_id=o, status="reservado"),
    "pagamento": lambda o: ProcessoPagamento(order_id=o, status="aprovado", valor_centavos=9980, transacao_id="tx_1"),
    "fraude": lambda o: FraudeVerificado(order_id=o, fraude=False, score=0),
}
NEGATIVE = {
    "reserva": lambda o: ReservaEstoque(order_id=o, status="sem_estoque", motivo="SKU desconhecido: XYZ-1"),
    "pagamento": lambda o: ProcessoPagamento(
        order_id=o, status="recusado", valor_centavos=9980, motivo="saldo insuficiente"
    ),
    "fraude": lambda o: FraudeVerificado(order_id=o, fraude=True, score=100, motivos=["cartão bloqueado: final 4242"]),
}
#: The cancellation each service's negative outcome causes, with its detail.
CANCELS = {
    "reserva": ("sem_estoque", "SKU desconhecido: XYZ-1"),
    "pagamento": ("pagamento_recusado", "saldo insuficiente"),
    "fraude": ("fraude", "score 100: cartão bloqueado: final 4242"),
}
TOPIC = {ReservaEstoque: RESERVA_ESTOQUE, ProcessoPagamento: PROCESSO_PAGAMENTO, FraudeVerificado: FRAUDE_VERIFICADO}


def deliver(harness, event: Event) -> None:
    harness.produce(TOPIC[type(event)], event, key=event.order_id)
    harness.run_until_idle()


def stages(harness) -> list[ProcessoPicking]:
    return harness.values(PROCESSO_PICKING, ProcessoPicking)


def cancels(harness) -> list[PedidoCancelado]:
    return harness.values(PEDIDO_CANCELADO, PedidoCancelado)


@pytest.fixture
def harness(kafkaworkers_harness):
    return kafkaworkers_harness(picking.plugin)


@pytest.mark.parametrize("arrival", ORDERS, ids="-".join)
def test_an_order_is_picked_when_its_three_positive_outcomes_arrive_in_any_order(harness, arrival) -> None:
    for service in arrival:
        assert stages(harness) == [], f"picked before {service} answered"
        deliver(harness, POSITIVE[service]("p1"))

    assert [(s.order_id, s.status, s.event_id) for s in stages(harness)] == [
        ("p1", "iniciado", event_id_for("p1", "processo-picking:iniciado")),
        ("p1", "concluido", event_id_for("p1", "processo-picking:concluido")),
    ]
    assert {r.key() for r in harness.records(PROCESSO_PICKING)} == {b"p1"}
    assert cancels(harness) == []


@pytest.mark.parametrize("negative", SERVICES)
@pytest.mark.parametrize("arrival", ORDERS, ids="-".join)
def test_a_negative_outcome_cancels_the_order_once_in_any_order(harness, arrival, negative: str) -> None:
    for service in arrival:
        deliver(harness, (NEGATIVE if service == negative else POSITIVE)[service]("p1"))

    [cancel] = cancels(harness)
    assert (cancel.order_id, cancel.motivo, cancel.detalhe) == ("p1", *CANCELS[negative])
    assert cancel.event_id == event_id_for("p1", "pedido-cancelado")
    assert stages(harness) == []


@pytest.mark.parametrize("arrival", ORDERS, ids="-".join)
def test_the_first_negative_outcome_decides_and_later_ones_add_nothing(harness, arrival) -> None:
    for service in arrival:
        deliver(harness, NEGATIVE[service]("p1"))

    assert [c.motivo for c in cancels(harness)] == [CANCELS[arrival[0]][0]]


def test_a_cancelled_order_is_never_picked_even_if_every_positive_outcome_follows(harness) -> None:
    deliver(harness, NEGATIVE["pagamento"]("p1"))
    for service in SERVICES:
        deliver(harness, POSITIVE[service]("p1"))

    assert stages(harness) == []
    assert [c.motivo for c in cancels(harness)] == ["pagamento_recusado"]


def test_a_redelivered_outcome_republishes_the_same_events_for_consumers_to_drop(harness) -> None:
    for service in SERVICES:
        deliver(harness, POSITIVE[service]("p1"))
    deliver(harness, POSITIVE["fraude"]("p1"))
    deliver(harness, NEGATIVE["fraude"]("p2"))
    deliver(harness, NEGATIVE["fraude"]("p2"))

    assert [s.status for s in stages(harness)] == ["iniciado", "concluido"] * 2
    assert len({s.event_id for s in stages(harness)}) == 2
    assert len(cancels(harness)) == 2 and len({c.event_id for c in cancels(harness)}) == 1


def test_compensations_are_neither_positive_nor_negative_outcomes(harness) -> None:
    deliver(harness, ReservaEstoque(order_id="p1", status="liberado"))
    deliver(harness, ProcessoPagamento(order_id="p1", status="estornado", valor_centavos=9980))
    deliver(harness, POSITIVE["fraude"]("p1"))

    assert stages(harness) == [] and cancels(harness) == []


def test_both_end_states_are_final() -> None:
    picked = Pedido(reservado=1, pagamento="aprovado", fraude=0, estado="separado")
    assert decidir(picked, Sinal("fraude", 1, "fraude")) == "separado"
    cancelled = Pedido(reservado=1, pagamento="aprovado", fraude=0, estado="cancelado_fraude")
    assert decidir(cancelled, Sinal("reservado", 1)) == "cancelado_fraude"


# --- the saga: reserva, fraude, pagamento and picking together --------------------------


def order(
    order_id: str, *, sku: str = "CAM-001", qtd: int = 1, token: str = "tok_aprovado", email: str = ""
) -> PedidoNovo:
    return PedidoNovo(
        order_id=order_id,
        cliente=Cliente(id=order_id, nome="Ana", email=email or "ana@example.com"),
        itens=[Item(sku=sku, quantidade=qtd, preco_unitario_centavos=4990)],
        cartao=Cartao(token=token, final="4242", pais_emissor="BR"),
        pais_entrega="BR",
        criado_em=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("pedido", "motivo"),
    [
        (order("ok"), None),
        (order("golpe", email="x@mailinator.com"), "fraude"),
        (order("recusado", token="tok_sem_saldo"), "pagamento_recusado"),
        (order("esgotado", sku="PIJ-001", qtd=50), "sem_estoque"),
        (order("desconhecido", sku="XYZ-999"), "sem_estoque"),
    ],
    ids=lambda v: v.order_id if isinstance(v, PedidoNovo) else str(v),
)
def test_the_saga_ends_picked_or_cancelled_with_every_compensation_done_once(
    kafkaworkers_harness, pedido: PedidoNovo, motivo: str | None
) -> None:
    harness = kafkaworkers_harness(reserva.plugin, fraude.plugin, pagamento.plugin, picking.plugin)
    sku = pedido.itens[0].sku
    before = harness.state("reserva").disponivel(sku)
    harness.produce(PEDIDO_NOVO, pedido, key=pedido.order_id)
    harness.run_until_idle()

    gateway = harness.state("pagamento").gateway
    approved = [p for p in harness.values(PROCESSO_PAGAMENTO, ProcessoPagamento) if p.status == "aprovado"]
    if motivo is None:
        assert [s.status for s in stages(harness)] == ["iniciado", "concluido"]
        assert cancels(harness) == []
        assert harness.state("reserva").disponivel(sku) == before - 1
        assert gateway.charges_for(pedido.order_id) == 1 and gateway.refunds_for(approved[0].transacao_id) == 0
        return
    assert stages(harness) == []
    assert [c.motivo for c in cancels(harness)] == [motivo]
    assert harness.state("reserva").disponivel(sku) == before
    # Fraud may cancel before or after the charge: either nothing was charged or it was refunded once.
    assert [gateway.refunds_for(p.transacao_id) for p in approved] == [1] * len(approved)
    statuses = [r.status for r in harness.values(RESERVA_ESTOQUE, ReservaEstoque)]
    assert statuses.count("liberado") == statuses.count("reservado")


# --- two instances sharing one database ------------------------------------------------------


def test_the_join_is_complete_whichever_instance_receives_each_outcome(
    kafkaworkers_harness, tmp_path, database_url
) -> None:
    """The assignment that stranded orders with a database per instance: one instance gets the
    stock and fraud outcomes, the other the payments, and they handle them at the same time."""
    a, b = (kafkaworkers_harness(picking.plugin, data_dir=tmp_path, database_url=database_url) for _ in range(2))
    orders = [f"o{n}" for n in range(40)]
    fraud = set(orders[::4])
    for o in orders:
        deliver_to = {"reserva": a, "fraude": a, "pagamento": b}
        for service, harness in deliver_to.items():
            event = (NEGATIVE if service == "fraude" and o in fraud else POSITIVE)[service](o)
            harness.produce(TOPIC[type(event)], event, key=o)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda h: h.run_until_idle(), (a, b)))

    picked = {(e.order_id, e.status) for h in (a, b) for e in stages(h)}
    cancelled = {(e.order_id, e.motivo) for h in (a, b) for e in cancels(h)}
    assert picked == {(o, s) for o in orders if o not in fraud for s in ("iniciado", "concluido")}
    assert cancelled == {(o, "fraude") for o in fraud}
