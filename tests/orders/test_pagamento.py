"""pagamento: every test card's outcome, never charging twice, refunding once, the breaker
pausing the worker during an outage, and the HTTP gateway against a real local server."""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kafkaworkers import ConfigError, PermanentError, PluginEnv
from kafkaworkers.breaker import OPEN
from kafkaworkers_orders import pagamento
from kafkaworkers_orders.contracts import (
    PEDIDO_CANCELADO,
    PEDIDO_NOVO,
    PROCESSO_PAGAMENTO,
    Cartao,
    Cliente,
    Item,
    PedidoCancelado,
    PedidoNovo,
    ProcessoPagamento,
    event_id_for,
)
from kafkaworkers_orders.pagamento.gateway import ChargeResult, GatewayError, HttpGateway

API_KEY = "sk_live_do_not_leak_1234"
CARD = Cartao(token="tok_aprovado", final="4242", pais_emissor="BR")


def pedido(order_id: str, token: str = "tok_aprovado") -> PedidoNovo:
    return PedidoNovo(
        order_id=order_id,
        cliente=Cliente(id="c1", nome="Ana", email="ana@example.com"),
        itens=[Item(sku="CAM-001", quantidade=2, preco_unitario_centavos=4990)],
        cartao=Cartao(token=token, final="4242", pais_emissor="BR"),
        pais_entrega="BR",
        criado_em=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    )


def cancelado(order_id: str) -> PedidoCancelado:
    return PedidoCancelado(order_id=order_id, motivo="fraude")


def pagamentos(harness) -> list[ProcessoPagamento]:
    return harness.values(PROCESSO_PAGAMENTO, ProcessoPagamento)


@pytest.fixture
def harness(kafkaworkers_harness):
    return kafkaworkers_harness(pagamento.plugin)


# --- the simulated gateway's test cards -------------------------------------------------


@pytest.mark.parametrize(
    ("token", "status", "motivo"),
    [
        ("tok_aprovado", "aprovado", ""),
        ("tok_qualquer", "aprovado", ""),
        ("tok_recusado", "recusado", "cartão recusado pelo emissor"),
        ("tok_sem_saldo", "recusado", "saldo insuficiente"),
    ],
)
def test_each_test_card_gets_its_outcome(harness, token: str, status: str, motivo: str) -> None:
    harness.produce(PEDIDO_NOVO, pedido("p1", token), key="p1")
    harness.run_until_idle()

    [evento] = pagamentos(harness)
    assert (evento.order_id, evento.status, evento.motivo, evento.valor_centavos) == ("p1", status, motivo, 9980)
    assert evento.transacao_id.startswith("tx_")
    assert evento.event_id == event_id_for("p1", f"processo-pagamento:{status}")
    assert pagamento.gateway_breaker.state != OPEN


def test_a_gateway_error_is_retried_through_the_retry_topic(harness) -> None:
    harness.produce(PEDIDO_NOVO, pedido("p1", "tok_erro"), key="p1")
    harness.run_until_idle()

    assert pagamentos(harness) == []
    [retried] = harness.records("pagamento-retry-1")
    assert dict(retried.headers())["kw-exception"].endswith(b"GatewayError")
    assert harness.records("pagamento-dlq") == []


def test_a_timed_out_charge_is_retried_and_charged_only_once(kafkaworkers_harness) -> None:
    harness = kafkaworkers_harness(pagamento.plugin, plugins={"pagamento": {"gateway_timeout": 0.2}})
    harness.produce(PEDIDO_NOVO, pedido("p1", "tok_timeout"), key="p1")
    harness.run_until_idle()
    assert pagamentos(harness) == []
    assert len(harness.records("pagamento-retry-1")) == 1

    harness.run_until_idle(wait_for_retries=True)

    [evento] = pagamentos(harness)
    assert evento.status == "aprovado"
    gateway = harness.state("pagamento").gateway
    assert (gateway.charge_calls["p1"], gateway.charges_for("p1")) == (2, 1)


def test_a_redelivered_order_repeats_its_outcome_without_calling_the_gateway(harness) -> None:
    for _ in range(3):
        harness.produce(PEDIDO_NOVO, pedido("p1"), key="p1")
    harness.run_until_idle()

    eventos = pagamentos(harness)
    assert len(eventos) == 3 and len({(e.status, e.transacao_id, e.event_id) for e in eventos}) == 1
    gateway = harness.state("pagamento").gateway
    assert (gateway.charge_calls["p1"], gateway.charges_for("p1")) == (1, 1)


def test_a_cancellation_refunds_an_approved_charge_exactly_once(harness) -> None:
    harness.produce(PEDIDO_NOVO, pedido("p1"), key="p1")
    harness.run_until_idle()
    for _ in range(2):
        harness.produce(PEDIDO_CANCELADO, cancelado("p1"), key="p1")
    harness.run_until_idle()

    [aprovado] = [e for e in pagamentos(harness) if e.status == "aprovado"]
    estornos = [e for e in pagamentos(harness) if e.status == "estornado"]
    # The second copy re-publishes the same event (a crash could have lost the first); money moved once.
    assert {(e.event_id, e.transacao_id, e.valor_centavos) for e in estornos} == {
        (event_id_for("p1", "processo-pagamento:estornado"), aprovado.transacao_id, 9980)
    }
    assert harness.state("pagamento").gateway.refunds_for(aprovado.transacao_id) == 1


def test_a_cancellation_of_a_declined_order_refunds_nothing(harness) -> None:
    harness.produce(PEDIDO_NOVO, pedido("p1", "tok_recusado"), key="p1")
    harness.run_until_idle()
    harness.produce(PEDIDO_CANCELADO, cancelado("p1"), key="p1")
    harness.run_until_idle()

    assert [e.status for e in pagamentos(harness)] == ["recusado"]


def test_an_order_whose_cancellation_came_first_is_never_charged(harness) -> None:
    harness.produce(PEDIDO_CANCELADO, cancelado("p1"), key="p1")
    harness.run_until_idle()
    harness.produce(PEDIDO_NOVO, pedido("p1"), key="p1")
    harness.run_until_idle()

    assert pagamentos(harness) == []
    assert harness.state("pagamento").gateway.charge_calls["p1"] == 0


def test_the_breaker_opens_and_pauses_the_worker_while_the_gateway_is_down(harness) -> None:
    harness.state("pagamento").gateway.down = True
    for n in range(8):
        harness.produce(PEDIDO_NOVO, pedido(f"p{n}"), key=f"p{n}")
    harness.run_until_idle()

    assert pagamento.gateway_breaker.state == OPEN
    assert harness.worker.runners[0].paused
    failed = harness.records("pagamento-retry-1")
    # The calls before the threshold failed on their own and were retried; the one that
    # opened the breaker waits with the paused partition instead of spending a retry.
    assert len(failed) == pagamento.gateway_breaker.min_calls - 1
    assert pagamentos(harness) == [] and harness.records("pagamento-dlq") == []


def test_an_unknown_gateway_kind_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="simulated"):
        pagamento.plugin.start(PluginEnv("pagamento", {"gateway": "paypal"}, tmp_path))


def test_the_http_gateway_needs_its_url_and_api_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gateway_url and gateway_api_key"):
        pagamento.plugin.start(PluginEnv("pagamento", {"gateway": "http"}, tmp_path))


# --- the HTTP gateway against a real local server ---------------------------------------


class FakeGatewayServer(ThreadingHTTPServer):
    """A gateway API on localhost that keeps each idempotency key's first answer."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.answers: dict[tuple[str, str], bytes] = {}
        self.fail_with: int | None = None
        self.release = threading.Event()
        self.release.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: the timeout test hangs up before the answer, on purpose."""


class _Handler(BaseHTTPRequestHandler):
    server: FakeGatewayServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), body))
        self.server.release.wait(10)
        if self.server.fail_with:
            self.send_error(self.server.fail_with)
            return
        key = (self.path, self.headers["Idempotency-Key"])
        if key not in self.server.answers:
            n = len(self.server.answers)
            if self.path.endswith("/charges"):
                declined = body["card"]["token"] == "tok_recusado"
                answer = {"status": "recusado" if declined else "aprovado", "transacao_id": f"gw-{n}"}
                self.server.answers[key] = json.dumps(
                    answer | ({"motivo": "não autorizado"} if declined else {})
                ).encode()
            else:
                self.server.answers[key] = json.dumps({"estorno_id": f"re-{n}"}).encode()
        payload = self.server.answers[key]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads ``server.requests`` instead."""


@pytest.fixture
def server() -> Iterator[FakeGatewayServer]:
    server = FakeGatewayServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_the_http_gateway_charges_with_the_idempotency_key_and_a_bearer_token(server: FakeGatewayServer) -> None:
    gateway = HttpGateway(server.url + "/", API_KEY, timeout=5)

    first = gateway.charge("p1", 9980, CARD)
    again = gateway.charge("p1", 9980, CARD)

    assert first == again == ChargeResult(status="aprovado", transacao_id="gw-0")
    path, headers, body = server.requests[0]
    assert path == "/v1/charges"
    assert headers["Idempotency-Key"] == "p1"
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert body == {"amount_cents": 9980, "card": {"token": "tok_aprovado", "final": "4242", "pais_emissor": "BR"}}
    assert API_KEY not in repr(gateway)


def test_the_http_gateway_reports_a_decline_as_a_result(server: FakeGatewayServer) -> None:
    result = HttpGateway(server.url, API_KEY).charge(
        "p1", 100, Cartao(token="tok_recusado", final="1", pais_emissor="BR")
    )
    assert result == ChargeResult(status="recusado", transacao_id="gw-0", motivo="não autorizado")


def test_the_http_gateway_refunds_with_its_own_idempotency_key(server: FakeGatewayServer) -> None:
    HttpGateway(server.url, API_KEY).refund("p1:estorno", "gw-0", 9980)
    [(path, headers, body)] = server.requests
    assert (path, headers["Idempotency-Key"], body) == (
        "/v1/refunds",
        "p1:estorno",
        {"transacao_id": "gw-0", "amount_cents": 9980},
    )


@pytest.mark.parametrize("status", [500, 503, 429, 401])
def test_a_failing_http_gateway_is_a_transient_error_that_hides_the_api_key(
    server: FakeGatewayServer, status: int
) -> None:
    server.fail_with = status
    with pytest.raises(GatewayError, match=f"HTTP {status}") as raised:
        HttpGateway(server.url, API_KEY).charge("p1", 100, CARD)
    assert API_KEY not in str(raised.value)


def test_a_request_the_http_gateway_rejects_is_permanent(server: FakeGatewayServer) -> None:
    server.fail_with = 422
    with pytest.raises(PermanentError, match="HTTP 422"):
        HttpGateway(server.url, API_KEY).charge("p1", 100, CARD)


def test_a_slow_http_gateway_times_out_as_a_transient_error(server: FakeGatewayServer) -> None:
    server.release.clear()
    with pytest.raises(GatewayError, match="unreachable"):
        HttpGateway(server.url, API_KEY, timeout=0.2).charge("p1", 100, CARD)


def test_an_unreachable_http_gateway_is_a_transient_error() -> None:
    closed = FakeGatewayServer()
    url = closed.url
    closed.server_close()
    with pytest.raises(GatewayError, match="unreachable"):
        HttpGateway(url, API_KEY, timeout=2).charge("p1", 100, CARD)


def test_pagamento_charges_and_refunds_through_the_http_gateway_once(
    kafkaworkers_harness, server: FakeGatewayServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = {"gateway": "http", "gateway_url": server.url, "gateway_api_key": API_KEY, "gateway_timeout": 5}
    harness = kafkaworkers_harness(pagamento.plugin, plugins={"pagamento": config})
    caplog.set_level(logging.DEBUG)
    server.fail_with = 503
    harness.produce(PEDIDO_NOVO, pedido("p1"), key="p1")
    harness.run_until_idle()
    server.fail_with = None
    harness.run_until_idle(wait_for_retries=True)
    for message in (pedido("p1"), cancelado("p1"), cancelado("p1")):
        topic = PEDIDO_NOVO if isinstance(message, PedidoNovo) else PEDIDO_CANCELADO
        harness.produce(topic, message, key="p1")
        harness.run_until_idle()

    assert [e.status for e in pagamentos(harness)] == ["aprovado", "aprovado", "estornado", "estornado"]
    assert [(path, headers["Idempotency-Key"]) for path, headers, _ in server.requests] == [
        ("/v1/charges", "p1"),
        ("/v1/charges", "p1"),
        ("/v1/refunds", "p1:estorno"),
    ]
    assert "HTTP 503" in caplog.text
    assert API_KEY not in caplog.text


# --- two instances sharing one database ------------------------------------------------------


def test_two_instances_charge_each_order_once_and_announce_each_refund_once(
    kafkaworkers_harness, tmp_path: Path, database_url: str | None
) -> None:
    """As while a partition moves: the same order charged by both at once, then its redelivery
    on one racing its cancellation on the other."""
    a, b = (
        kafkaworkers_harness(pagamento.plugin, data_dir=tmp_path, database_url=database_url).state("pagamento")
        for _ in range(2)
    )
    orders = [pedido(f"p{n}") for n in range(30)]
    start = threading.Barrier(2)

    def charge(instance: pagamento.Cobrancas) -> list[ProcessoPagamento]:
        start.wait()
        return [e for p in orders for e in instance.cobrar(p)]

    with ThreadPoolExecutor(2) as pool:
        charged_a, charged_b = pool.map(charge, (a, b))
    assert a.gateway.charge_calls.total() + b.gateway.charge_calls.total() >= 30
    assert all(a.gateway.charges_for(p.order_id) == 1 for p in orders), "one charge per order in the shared ledger"
    assert {(e.order_id, e.transacao_id) for e in charged_a} == {(e.order_id, e.transacao_id) for e in charged_b}

    # Both reach each order at the same moment.
    def redeliver(_: object) -> list[ProcessoPagamento]:
        return [e for p in orders if start.wait() >= 0 for e in a.cobrar(p)]

    def cancel(_: object) -> list[ProcessoPagamento]:
        return [e for p in orders if start.wait() >= 0 for e in b.cancelar(p.order_id)]

    with ThreadPoolExecutor(2) as pool:
        events = [e for f in (pool.submit(redeliver, None), pool.submit(cancel, None)) for e in f.result()]
    refunds = collections.Counter(e.order_id for e in events if e.status == "estornado")
    assert refunds == dict.fromkeys((p.order_id for p in orders), 1), "each refund announced by one message"
    assert all(b.gateway.refunds_for(e.transacao_id) == 1 for e in charged_a), "and made once"
