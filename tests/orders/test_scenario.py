"""The demo scenario: the orders it plans, checked against the real services' rules, and its verdict."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from kafkaworkers import KafkaWorkersError, PluginEnv, open_store
from kafkaworkers.headers import H_CORRELATION_ID
from kafkaworkers_orders.contracts import (
    PEDIDO_CANCELADO,
    PEDIDO_NOVO,
    PROCESSO_PAGAMENTO,
    PROCESSO_PICKING,
    RESERVA_ESTOQUE,
    Event,
    FraudeVerificado,
    PedidoCancelado,
    PedidoNovo,
    ProcessoPagamento,
    ProcessoPicking,
    ReservaEstoque,
)
from kafkaworkers_orders.fraude import Regras, avaliar
from kafkaworkers_orders.pagamento.gateway import LEDGER, SimulatedGateway
from kafkaworkers_orders.reserva import CATALOGUE
from kafkaworkers_orders.reserva.estoque import Estoque, read_catalogue
from kafkaworkers_orders.scenario import OrderScenario, Planned


def plan(count: int = 200, seed: int = 7) -> list[Planned]:
    return OrderScenario(run_id="t").plan(count, seed)


def test_the_same_seed_plans_the_same_orders_and_another_seed_others():
    assert plan(seed=7) == plan(seed=7)
    assert [p.pedido for p in plan(seed=7)] != [p.pedido for p in plan(seed=8)]


@pytest.mark.parametrize(
    ("count", "shares"),
    [
        (200, {"separado": 150, "fraude": 20, "pagamento_recusado": 20, "sem_estoque": 10}),
        (60, {"separado": 45, "fraude": 6, "pagamento_recusado": 6, "sem_estoque": 3}),
        (1, {"separado": 1}),
    ],
)
def test_expected_outcomes_come_in_the_stated_shares(count, shares):
    assert Counter(p.expected for p in plan(count)) == shares


def test_generated_messages_are_valid_orders_keyed_and_correlated_by_order_id():
    scenario = OrderScenario()
    before = time.time()
    messages = list(scenario.generate(60, 3))

    orders = [msgspec.json.decode(value, type=PedidoNovo) for _, _, value, _ in messages]
    assert {topic for topic, *_ in messages} == {PEDIDO_NOVO}
    assert [key for _, key, _, _ in messages] == [o.order_id.encode() for o in orders]
    assert [headers for *_, headers in messages] == [[(H_CORRELATION_ID, o.order_id.encode())] for o in orders]
    assert len({o.order_id for o in orders}) == len({o.event_id for o in orders}) == 60
    assert all(before <= o.criado_em.timestamp() <= time.time() for o in orders)
    assert all(o.order_id.startswith(f"PED-{scenario.run_id}-") for o in orders)


def test_fraud_rules_flag_exactly_the_orders_planned_as_fraud_whatever_the_card_velocity():
    rules = Regras()
    for p in plan(600):
        for card_orders in (1, 1000):
            verdict = avaliar(p.pedido, rules, pedidos_cliente=1, pedidos_cartao=card_orders)
            assert verdict.fraude == (p.expected == "fraude"), (p.expected, verdict)


def test_the_gateway_declines_exactly_the_orders_planned_as_declined(tmp_path):
    gateway = SimulatedGateway(open_store(PluginEnv("pagamento", {}, tmp_path), "gateway", LEDGER))
    try:
        for p in plan(100):
            result = gateway.charge(p.pedido.order_id, p.pedido.total_centavos, p.pedido.cartao)
            assert (result.status == "recusado") == (p.expected == "pagamento_recusado")
    finally:
        gateway.close()


@pytest.mark.parametrize(("count", "shuffle_seed"), [(200, 1), (200, 2), (1000, 3), (2000, 4), (20_000, 5)])
def test_stock_runs_out_exactly_for_the_planned_orders_in_any_arrival_order(tmp_path: Path, count, shuffle_seed):
    scenario = OrderScenario(run_id="t")
    planned = scenario.plan(count, seed=7)
    random.Random(shuffle_seed).shuffle(planned)
    estoque = Estoque.open(PluginEnv("reserva", {}, tmp_path))
    try:
        estoque.carregar(scenario.stock(count))
        for p in planned:
            resultado = estoque.reservar(p.pedido.order_id, p.pedido.itens)
            assert resultado is not None
            assert (resultado.status == "sem_estoque") == (p.expected == "sem_estoque"), p
    finally:
        estoque.close()


def test_the_stock_grows_with_the_orders_but_the_scarcest_products_which_only_out_of_stock_orders_ask_for():
    seed = read_catalogue(CATALOGUE)
    scarce = min(seed, key=lambda p: (p.estoque, p.preco_centavos))
    scenario = OrderScenario()
    assert scenario.stock(200) == seed, "the seed catalogue carries a couple of hundred orders as it is"
    for count in (238, 5000, 100_000):
        stock = scenario.stock(count)
        [kept] = [p for p in stock if p.sku == scarce.sku]
        assert kept == scarce
        assert sum(p.estoque for p in stock if p.sku != scarce.sku) >= count * 4
        factors = {p.estoque / before.estoque for p, before in zip(stock, seed, strict=True) if before != scarce}
        assert len(factors) == 1, "every other product is scaled by one factor"
    assert len(scenario.plan(100_000, 1)) == 100_000


def test_the_demo_hands_reserva_the_catalogue_its_orders_are_planned_against(tmp_path: Path):
    scenario = OrderScenario()
    config = scenario.prepare(5000, tmp_path)

    assert read_catalogue(Path(config["reserva"]["catalogue"])) == scenario.stock(5000)


def test_a_catalogue_without_stock_cannot_plan_an_order_that_reserves():
    [product, *_] = read_catalogue(CATALOGUE)
    empty = [msgspec.structs.replace(product, sku=f"X-{n}", estoque=0) for n in range(3)]
    with pytest.raises(KafkaWorkersError, match=r"ran out after 0 of 10 orders; it needs stock in more than"):
        OrderScenario(catalogue=empty).generate(10, 1)


# --- the verdict, on synthetic observations ----------------------------------------------


class Run:
    """A scenario that generated ``count`` orders, fed events as the watcher would see them."""

    def __init__(self, count: int = 20, seed: int = 5) -> None:
        self.scenario = OrderScenario(run_id="j")
        self.messages = list(self.scenario.generate(count, seed))
        self.by_outcome: dict[str, list[str]] = {}
        for order_id, track in self.scenario.tracks.items():
            self.by_outcome.setdefault(track.expected, []).append(order_id)

    def see(self, topic: str, event: Event, after_ms: int = 100) -> None:
        criado = self.scenario.tracks[event.order_id].criado_ms
        self.scenario.observe(topic, event.order_id.encode(), msgspec.json.encode(event), criado + after_ms)

    def separate(self, order_id: str, after_ms: int = 100) -> None:
        self.see(RESERVA_ESTOQUE, ReservaEstoque(order_id=order_id, status="reservado"))
        self.see(PROCESSO_PAGAMENTO, ProcessoPagamento(order_id=order_id, status="aprovado", valor_centavos=100))
        self.see(PROCESSO_PICKING, ProcessoPicking(order_id=order_id, status="iniciado"))
        self.see(PROCESSO_PICKING, ProcessoPicking(order_id=order_id, status="concluido"), after_ms)

    def cancel(self, order_id: str, motivo: str) -> None:
        self.see(PEDIDO_CANCELADO, PedidoCancelado(order_id=order_id, motivo=motivo))  # type: ignore[arg-type]

    def play_expected(self) -> None:
        for outcome, orders in self.by_outcome.items():
            for n, order_id in enumerate(orders, start=1):
                if outcome == "separado":
                    self.separate(order_id, after_ms=100 * n)
                else:
                    self.cancel(order_id, outcome)


def test_a_cancelled_order_is_finished_only_once_its_charge_is_refunded_and_its_stock_released():
    run = Run()
    run.play_expected()
    [order, *_] = run.by_outcome["fraude"]
    track = run.scenario.tracks[order]
    assert run.scenario.finished()

    run.see(PROCESSO_PAGAMENTO, ProcessoPagamento(order_id=order, status="aprovado", valor_centavos=100))
    run.see(RESERVA_ESTOQUE, ReservaEstoque(order_id=order, status="reservado"))
    assert not track.finished and not run.scenario.finished()
    run.see(PROCESSO_PAGAMENTO, ProcessoPagamento(order_id=order, status="estornado", valor_centavos=100))
    assert not track.finished
    run.see(RESERVA_ESTOQUE, ReservaEstoque(order_id=order, status="liberado"))
    assert track.finished and run.scenario.finished()


def test_a_run_where_every_order_ends_as_expected_is_ok_with_latency_and_throughput():
    run = Run(count=20)
    run.play_expected()
    report = run.scenario.report(elapsed=2.0, timed_out=False)

    assert report.ok
    assert report.data["states"]["separado"] == {"expected": 15, "actual": 15, "match": True}
    assert report.data["throughput_orders_per_second"] == 10.0
    # 100 ms for the 5 cancelled orders, 100..1500 ms for the 15 picked: interpolated ranks.
    assert report.data["latency_ms"] == {"p50": 550, "p99": pytest.approx(1481)}
    assert "p50 550 ms, p99 1481 ms" in report.text
    assert "result: OK" in report.text
    assert "separado                    15      15  yes" in report.text


def test_a_wrong_outcome_fails_the_run_and_names_the_order():
    run = Run(count=20)
    [wrong, *_] = run.by_outcome["fraude"]
    for outcome, orders in run.by_outcome.items():
        for order_id in orders:
            if order_id == wrong:
                run.cancel(order_id, "sem_estoque")
            elif outcome == "separado":
                run.separate(order_id)
            else:
                run.cancel(order_id, outcome)
    report = run.scenario.report(elapsed=1.0, timed_out=False)

    assert not report.ok
    assert report.data["states"]["fraude"] == {"expected": 2, "actual": 1, "match": False}
    assert report.data["states"]["sem_estoque"] == {"expected": 1, "actual": 2, "match": False}
    assert report.data["mismatches"] == [
        {
            "order_id": wrong,
            "expected": "fraude",
            "actual": "sem_estoque",
            "problem": "ended sem_estoque, expected fraude",
        }
    ]
    assert f"  {wrong}: ended sem_estoque, expected fraude" in report.text
    assert "fraude                       2       1  NO" in report.text


def test_a_timed_out_run_fails_and_lists_unfinished_orders_first_ten_in_the_text():
    run = Run(count=40)
    charged = run.by_outcome["pagamento_recusado"][0]
    for order_id in run.by_outcome["separado"][:5]:
        run.separate(order_id)
    run.see(RESERVA_ESTOQUE, ReservaEstoque(order_id=charged, status="reservado"))
    run.cancel(charged, "pagamento_recusado")
    report = run.scenario.report(elapsed=30.0, timed_out=True)

    assert not report.ok and report.data["timed_out"]
    assert report.data["states"]["unfinished"] == {"expected": 0, "actual": 34, "match": False}
    problems = {m["order_id"]: m["problem"] for m in report.data["mismatches"]}
    assert len(problems) == 35
    assert problems[charged] == "compensation missing: liberado"
    assert report.text.count(": no terminal event") + report.text.count(": compensation missing") == 10
    assert "TIMED OUT" in report.text


def test_events_of_other_runs_and_other_topics_are_ignored():
    run = Run(count=5)
    before = {k: (t.terminal, t.charged) for k, t in run.scenario.tracks.items()}
    stranger = ProcessoPicking(order_id="PED-earlier-00001", status="concluido")
    run.scenario.observe(PROCESSO_PICKING, b"PED-earlier-00001", msgspec.json.encode(stranger), 0)
    verdict = FraudeVerificado(order_id=next(iter(before)), fraude=True, score=100)
    run.scenario.observe("fraude-verificado", None, msgspec.json.encode(verdict), 0)
    assert {k: (t.terminal, t.charged) for k, t in run.scenario.tracks.items()} == before
