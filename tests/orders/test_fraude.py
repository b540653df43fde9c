"""fraude: each rule and its reason, the score threshold, settings, and velocity over
``criado_em`` windows that survive restarts and never count a redelivery twice."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kafkaworkers import ConfigError
from kafkaworkers_orders import fraude
from kafkaworkers_orders.contracts import (
    FRAUDE_VERIFICADO,
    PEDIDO_NOVO,
    Cartao,
    Cliente,
    FraudeVerificado,
    Item,
    PedidoNovo,
    event_id_for,
)
from kafkaworkers_orders.fraude import Regras, avaliar, reais

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def pedido(
    order_id: str = "p1",
    *,
    cliente: str = "c1",
    email: str = "ana@example.com",
    token: str = "tok_aprovado",
    pais_cartao: str = "BR",
    pais_entrega: str = "BR",
    itens: tuple[tuple[str, int, int], ...] = (("CAM-001", 1, 4990),),
    criado_em: datetime = T0,
) -> PedidoNovo:
    return PedidoNovo(
        order_id=order_id,
        cliente=Cliente(id=cliente, nome="Ana", email=email),
        itens=[Item(sku=s, quantidade=q, preco_unitario_centavos=p) for s, q, p in itens],
        cartao=Cartao(token=token, final="4242", pais_emissor=pais_cartao),
        pais_entrega=pais_entrega,
        criado_em=criado_em,
    )


# --- the rules, one by one --------------------------------------------------------------


def test_an_ordinary_order_scores_zero_and_is_not_fraud() -> None:
    assert avaliar(pedido(), Regras(), 1, 1) == (False, 0, [])


def test_a_high_total_gives_its_reason_in_reais() -> None:
    veredito = avaliar(pedido(itens=(("TEN-001", 2, 600_000),)), Regras(), 1, 1)
    assert veredito.motivos == ["valor alto: R$ 12.000,00 > R$ 5.000,00"]
    assert veredito.score == Regras().pontos_valor_alto and not veredito.fraude


def test_too_many_orders_from_one_customer_gives_its_reason() -> None:
    veredito = avaliar(pedido(), Regras(), 4, 1)
    assert veredito.motivos == ["muitos pedidos do cliente: 4 em 60 min (máximo 3)"]


def test_too_many_orders_on_one_card_gives_its_reason() -> None:
    veredito = avaliar(pedido(), Regras(), 1, 5)
    assert veredito.motivos == ["muitos pedidos do cartão final 4242: 5 em 60 min (máximo 3)"]


def test_a_blocklisted_email_domain_is_fraud_on_its_own() -> None:
    veredito = avaliar(pedido(email="x@Mailinator.com"), Regras(), 1, 1)
    assert veredito.fraude
    assert veredito.motivos == ["domínio de e-mail bloqueado: mailinator.com"]


def test_a_blocklisted_card_token_is_fraud_without_showing_the_token() -> None:
    veredito = avaliar(pedido(token="tok_roubado"), Regras(cartoes_bloqueados=frozenset({"tok_roubado"})), 1, 1)
    assert veredito.fraude
    assert veredito.motivos == ["cartão bloqueado: final 4242"]


def test_a_card_from_another_country_than_the_shipping_one_gives_its_reason() -> None:
    veredito = avaliar(pedido(pais_cartao="US"), Regras(), 1, 1)
    assert veredito.motivos == ["país do cartão (US) diferente do país de entrega (BR)"]


def test_an_unusual_quantity_names_the_lines_over_the_limit() -> None:
    itens = (("CAM-001", 50, 100), ("MEI-001", 2, 100), ("BON-001", 21, 100))
    veredito = avaliar(pedido(itens=itens), Regras(), 1, 1)
    assert veredito.motivos == ["quantidade incomum: 50 x CAM-001, 21 x BON-001 (máximo 20 por item)"]


def test_points_add_up_and_reaching_the_threshold_is_fraud() -> None:
    regras = Regras(pontos_valor_alto=40, pontos_pais_divergente=30, limite_score=70)
    veredito = avaliar(pedido(pais_cartao="AR", itens=(("TEN-001", 1, 600_000),)), regras, 1, 1)
    assert (veredito.fraude, veredito.score, len(veredito.motivos)) == (True, 70, 2)
    assert not avaliar(pedido(pais_cartao="AR"), regras, 1, 1).fraude


@pytest.mark.parametrize(
    ("centavos", "texto"),
    [
        (0, "R$ 0,00"),
        (5, "R$ 0,05"),
        (99_999, "R$ 999,99"),
        (1_200_000, "R$ 12.000,00"),
        (123_456_789, "R$ 1.234.567,89"),
    ],
)
def test_money_is_written_the_brazilian_way(centavos: int, texto: str) -> None:
    assert reais(centavos) == texto


# --- settings ---------------------------------------------------------------------------


def test_settings_override_the_default_rules() -> None:
    regras = Regras.from_config({"limite_score": 50, "dominios_bloqueados": ["Spam.example"], "cartoes_bloqueados": []})
    assert regras.limite_score == 50
    assert regras.dominios_bloqueados == frozenset({"spam.example"})
    assert regras.valor_maximo_centavos == Regras().valor_maximo_centavos


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"limite": 10}, "limite"),
        ({"limite_score": -1}, "limite_score"),
        ({"limite_score": "70"}, "limite_score"),
        ({"limite_score": True}, "limite_score"),
        ({"dominios_bloqueados": "spam.example"}, "dominios_bloqueados"),
    ],
)
def test_a_bad_setting_is_a_config_error_naming_it(config: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Regras.from_config(config)


# --- through the worker: verdicts and velocity ------------------------------------------


def verdicts(harness) -> dict[str, FraudeVerificado]:
    return {v.order_id: v for v in harness.values(FRAUDE_VERIFICADO, FraudeVerificado)}


def test_the_verdict_is_published_with_its_reasons_and_a_deterministic_id(kafkaworkers_harness) -> None:
    harness = kafkaworkers_harness(fraude.plugin, plugins={"fraude": {"valor_maximo_centavos": 1000}})
    harness.produce(PEDIDO_NOVO, pedido("p1", email="a@yopmail.com"), key="p1")
    harness.run_until_idle()

    [verdict] = harness.values(FRAUDE_VERIFICADO, FraudeVerificado)
    assert verdict.fraude and verdict.score == 140
    assert verdict.motivos == ["valor alto: R$ 49,90 > R$ 10,00", "domínio de e-mail bloqueado: yopmail.com"]
    assert verdict.event_id == event_id_for("p1", "fraude-verificado")
    assert harness.records(FRAUDE_VERIFICADO)[0].key() == b"p1"


def test_velocity_counts_a_customers_orders_within_the_window_of_criado_em(kafkaworkers_harness) -> None:
    harness = kafkaworkers_harness(fraude.plugin)
    times = [
        T0,
        T0 + timedelta(minutes=10),
        T0 + timedelta(minutes=20),
        T0 + timedelta(minutes=59),
        T0 + timedelta(hours=3),
    ]
    for n, criado_em in enumerate(times):
        harness.produce(PEDIDO_NOVO, pedido(f"p{n}", token=f"tok_{n}", criado_em=criado_em), key=f"p{n}")
        harness.run_until_idle()

    result = verdicts(harness)
    assert [result[f"p{n}"].motivos for n in range(3)] == [[], [], []]
    assert result["p3"].motivos == ["muitos pedidos do cliente: 4 em 60 min (máximo 3)"]
    assert result["p4"].motivos == []


def test_velocity_counts_one_cards_orders_across_customers(kafkaworkers_harness) -> None:
    harness = kafkaworkers_harness(fraude.plugin, plugins={"fraude": {"max_pedidos_cartao": 1}})
    for n in range(2):
        harness.produce(PEDIDO_NOVO, pedido(f"p{n}", cliente=f"c{n}", criado_em=T0 + timedelta(minutes=n)), key=f"p{n}")
        harness.run_until_idle()

    result = verdicts(harness)
    assert result["p0"].motivos == []
    assert result["p1"].motivos == ["muitos pedidos do cartão final 4242: 2 em 60 min (máximo 1)"]


def test_a_redelivered_order_is_counted_once_and_gets_the_same_verdict(kafkaworkers_harness) -> None:
    harness = kafkaworkers_harness(fraude.plugin, plugins={"fraude": {"max_pedidos_cliente": 2}})
    for order_id in ("p1", "p1", "p1", "p2"):
        harness.produce(PEDIDO_NOVO, pedido(order_id, token=f"tok_{order_id}"), key=order_id)
        harness.run_until_idle()

    every = harness.values(FRAUDE_VERIFICADO, FraudeVerificado)
    assert [(v.order_id, v.score, v.event_id) for v in every if v.order_id == "p1"] == [
        ("p1", 0, event_id_for("p1", "fraude-verificado"))
    ] * 3
    assert verdicts(harness)["p2"].motivos == []


def test_velocity_survives_a_restart(kafkaworkers_harness, tmp_path: Path) -> None:
    first = kafkaworkers_harness(fraude.plugin, data_dir=tmp_path / "data")
    for n in range(3):
        first.produce(PEDIDO_NOVO, pedido(f"p{n}", token=f"tok_{n}", criado_em=T0 + timedelta(minutes=n)), key=f"p{n}")
        first.run_until_idle()
    first.close()

    second = kafkaworkers_harness(fraude.plugin, data_dir=tmp_path / "data")
    second.produce(PEDIDO_NOVO, pedido("p3", token="tok_3", criado_em=T0 + timedelta(minutes=3)), key="p3")
    second.run_until_idle()

    assert verdicts(second)["p3"].motivos == ["muitos pedidos do cliente: 4 em 60 min (máximo 3)"]


def test_velocity_counts_the_orders_every_instance_judged_and_a_shared_order_keeps_one_verdict(
    kafkaworkers_harness, tmp_path: Path, database_url: str | None
) -> None:
    a, b = (kafkaworkers_harness(fraude.plugin, data_dir=tmp_path, database_url=database_url) for _ in range(2))
    for n, harness in enumerate((a, b, a)):
        harness.produce(
            PEDIDO_NOVO, pedido(f"p{n}", token=f"tok_{n}", criado_em=T0 + timedelta(minutes=n)), key=f"p{n}"
        )
        harness.run_until_idle()
    for harness in (a, b):  # both handle p3, as while its partition moves
        harness.produce(PEDIDO_NOVO, pedido("p3", token="tok_3", criado_em=T0 + timedelta(minutes=3)), key="p3")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda h: h.run_until_idle(), (a, b)))

    assert (
        verdicts(a)["p3"].motivos == verdicts(b)["p3"].motivos == ["muitos pedidos do cliente: 4 em 60 min (máximo 3)"]
    )
    assert a.state("fraude").store.db.execute("SELECT count(*) FROM analise").fetchone() == (4,)
