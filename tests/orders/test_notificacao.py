"""notificacao on the in-memory broker, delivering to a real SMTP server and a real HTTP server."""

from __future__ import annotations

import email
import email.policy
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from kafkaworkers import ConfigError, PluginEnv, Retry, open_store
from kafkaworkers.errors import StoreConflict
from kafkaworkers_orders import notificacao
from kafkaworkers_orders.contracts import (
    PEDIDO_CANCELADO,
    PEDIDO_NOVO,
    PROCESSO_PAGAMENTO,
    PROCESSO_PICKING,
    Cartao,
    Cliente,
    Item,
    PedidoCancelado,
    PedidoNovo,
    ProcessoPagamento,
    ProcessoPicking,
)
from kafkaworkers_orders.notificacao.channels import Notificacao, SmtpChannel, WebhookChannel
from tests.conftest import free_port, wait_for

ORDER = "PED-0001"


def pedido(order_id: str = ORDER, email: str = "maria.souza@exemplo.com.br") -> PedidoNovo:
    return PedidoNovo(
        order_id=order_id,
        cliente=Cliente(id="CLI-1", nome="Maria Souza", email=email),
        itens=[Item(sku="CAM-001", quantidade=2, preco_unitario_centavos=4990)],
        cartao=Cartao(token="tok_aprovado", final="4242", pais_emissor="BR"),
        pais_entrega="BR",
        criado_em=datetime.now(UTC),
    )


def pagamento(status: str, order_id: str = ORDER) -> ProcessoPagamento:
    return ProcessoPagamento(order_id=order_id, status=status, valor_centavos=9980)  # type: ignore[arg-type]


class Inbox:
    """An aiosmtpd handler that keeps every accepted e-mail."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], email.message.EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        self.messages.append((list(envelope.rcpt_tos), parsed))  # type: ignore[arg-type]
        return "250 OK"


def start_smtp(port: int) -> tuple[Controller, Inbox]:
    """A real SMTP server on 127.0.0.1 that accepts the login loja / s3nha-secreta."""
    inbox = Inbox()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        authenticator=lambda server, session, envelope, mechanism, data: AuthResult(
            success=isinstance(data, LoginPassword) and data.password == b"s3nha-secreta"
        ),
        auth_require_tls=False,
    )
    controller.start()
    return controller, inbox


@pytest.fixture
def smtp() -> Iterator[tuple[Controller, Inbox]]:
    controller, inbox = start_smtp(free_port())
    yield controller, inbox
    controller.stop()


class Webhook:
    """A real local HTTP server that records each POST and answers the statuses it is given."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.statuses: list[int] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.requests.append((dict(self.headers), body))
                self.send_response(hook.statuses.pop(0) if hook.statuses else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notificacoes?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    hook.thread.start()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()


def run(harness: Any, *events: tuple[str, Any]) -> None:
    for topic, value in events:
        harness.produce(topic, value, key=value.order_id)
    harness.run_until_idle()


def test_every_customer_event_is_notified_once_in_portuguese(kafkaworkers_harness, caplog):
    harness = kafkaworkers_harness(notificacao.plugin)
    caplog.set_level(logging.INFO, logger="kafkaworkers_orders.notificacao")
    run(harness, (PEDIDO_NOVO, pedido()))
    run(
        harness,
        (PROCESSO_PAGAMENTO, pagamento("aprovado")),
        (PROCESSO_PICKING, ProcessoPicking(order_id=ORDER, status="iniciado")),
        (PROCESSO_PICKING, ProcessoPicking(order_id=ORDER, status="concluido")),
    )

    assert harness.state("notificacao").sent_counts() == {
        "pedido_recebido": 1,
        "pagamento_aprovado": 1,
        "separacao_iniciada": 1,
        "separacao_concluida": 1,
    }
    text = caplog.text
    assert "Recebemos o seu pedido PED-0001, no valor de R$ 99,80" in text
    assert "O pagamento de R$ 99,80 do pedido PED-0001 foi aprovado" in text
    assert "Os itens do seu pedido PED-0001 foram separados" in text


def test_redelivered_events_do_not_notify_twice(kafkaworkers_harness):
    harness = kafkaworkers_harness(notificacao.plugin)
    run(harness, (PEDIDO_NOVO, pedido()))
    cancelado = PedidoCancelado(order_id=ORDER, motivo="fraude")
    run(harness, (PEDIDO_CANCELADO, cancelado), (PROCESSO_PAGAMENTO, pagamento("estornado")))
    # The same events again, as after a crash before the offsets were committed.
    run(harness, (PEDIDO_NOVO, pedido()), (PEDIDO_CANCELADO, cancelado), (PROCESSO_PAGAMENTO, pagamento("estornado")))

    assert harness.state("notificacao").sent_counts() == {"pedido_recebido": 1, "pedido_cancelado": 1, "estorno": 1}


def test_event_before_its_order_is_retried_and_notified_once_the_order_arrives(kafkaworkers_harness):
    harness = kafkaworkers_harness(notificacao.plugin)
    run(harness, (PROCESSO_PAGAMENTO, pagamento("recusado")))

    [retried] = harness.records("notificacao-retry-1")
    assert dict(retried.headers())["kw-exception-message"] == b"customer not known yet"
    assert harness.state("notificacao").sent_counts() == {}

    harness.produce(PEDIDO_NOVO, pedido(), key=ORDER)
    harness.run_until_idle(wait_for_retries=True)
    assert harness.state("notificacao").sent_counts() == {"pedido_recebido": 1, "pagamento_recusado": 1}
    assert harness.records("notificacao-dlq") == []


def test_emails_reach_a_real_smtp_server_in_portuguese(kafkaworkers_harness, smtp, caplog):
    controller, inbox = smtp
    config = {
        "channels": ["smtp"],
        "smtp_host": "127.0.0.1",
        "smtp_port": controller.port,
        "smtp_from": "Loja <pedidos@loja.example>",
        "smtp_user": "loja",
        "smtp_password": "s3nha-secreta",
    }
    caplog.set_level(logging.DEBUG)
    harness = kafkaworkers_harness(notificacao.plugin, plugins={"notificacao": config})
    run(harness, (PEDIDO_NOVO, pedido()))
    run(harness, (PEDIDO_CANCELADO, PedidoCancelado(order_id=ORDER, motivo="sem_estoque")))

    wait_for(lambda: len(inbox.messages) == 2, 10, "two e-mails")
    (to1, recebido), (to2, cancelado) = inbox.messages
    assert to1 == to2 == ["maria.souza@exemplo.com.br"]
    assert recebido["Subject"] == "Recebemos o seu pedido PED-0001"
    assert cancelado["Subject"] == "Pedido PED-0001 cancelado"
    assert cancelado["To"] == "Maria Souza <maria.souza@exemplo.com.br>"
    assert cancelado["Message-ID"] == "<PED-0001.pedido_cancelado@loja.example>"
    body = cancelado.get_content()
    assert body.startswith("Olá, Maria Souza!")
    assert "foi cancelado porque um ou mais itens estão sem estoque" in body
    assert harness.state("notificacao").sent_counts("smtp") == {"pedido_recebido": 1, "pedido_cancelado": 1}
    assert "s3nha-secreta" not in caplog.text
    assert "s3nha-secreta" not in repr(notificacao.channels_from(config))


def test_unreachable_smtp_server_is_retried_and_sends_once_it_is_up(kafkaworkers_harness):
    port = free_port()
    config = {"channels": ["smtp"], "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_from": "pedidos@loja.example"}
    harness = kafkaworkers_harness(notificacao.plugin, plugins={"notificacao": config})
    run(harness, (PEDIDO_NOVO, pedido()))
    assert len(harness.records("notificacao-retry-1")) == 1
    assert harness.state("notificacao").sent_counts() == {}

    controller, inbox = start_smtp(port)
    try:
        harness.run_until_idle(wait_for_retries=True)
    finally:
        controller.stop()
    assert [m["Subject"] for _, m in inbox.messages] == ["Recebemos o seu pedido PED-0001"]
    assert harness.state("notificacao").sent_counts() == {"pedido_recebido": 1}


def test_webhook_receives_json_with_a_stable_idempotency_key(kafkaworkers_harness, webhook):
    config = {"channels": ["webhook"], "webhook_url": webhook.url}
    harness = kafkaworkers_harness(notificacao.plugin, plugins={"notificacao": config})
    run(harness, (PEDIDO_NOVO, pedido()))
    run(harness, (PROCESSO_PAGAMENTO, pagamento("aprovado")))

    assert [body["kind"] for _, body in webhook.requests] == ["pedido_recebido", "pagamento_aprovado"]
    headers, body = webhook.requests[1]
    assert headers["Idempotency-Key"] == "PED-0001.pagamento_aprovado"
    assert body["email"] == "maria.souza@exemplo.com.br"
    assert body["assunto"] == "Pagamento aprovado: pedido PED-0001"
    assert "R$ 99,80" in body["texto"]


def test_a_failing_channel_is_retried_alone_while_the_others_send_once(kafkaworkers_harness, webhook):
    webhook.statuses = [503]
    config = {"channels": ["log", "webhook"], "webhook_url": webhook.url}
    harness = kafkaworkers_harness(notificacao.plugin, plugins={"notificacao": config})
    run(harness, (PEDIDO_NOVO, pedido()))
    assert harness.state("notificacao").sent_counts("log") == {"pedido_recebido": 1}
    assert harness.state("notificacao").sent_counts("webhook") == {}

    harness.run_until_idle(wait_for_retries=True)
    assert harness.state("notificacao").sent_counts() == {"pedido_recebido": 2}
    assert harness.state("notificacao").sent_counts("webhook") == {"pedido_recebido": 1}
    assert len(webhook.requests) == 2


def test_webhook_client_error_is_dead_lettered_without_retry(kafkaworkers_harness, webhook):
    webhook.statuses = [410]
    config = {"channels": ["webhook"], "webhook_url": webhook.url}
    harness = kafkaworkers_harness(notificacao.plugin, plugins={"notificacao": config})
    run(harness, (PEDIDO_NOVO, pedido()))

    [dead] = harness.records("notificacao-dlq")
    assert b"410" in dict(dead.headers())["kw-exception-message"]
    assert b"token=abc" not in dict(dead.headers())["kw-exception-message"]
    assert harness.records("notificacao-retry-1") == []


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ({"channels": "log"}, "non-empty list"),
        ({"channels": ["pombo"]}, "unknown notificacao channel 'pombo'"),
        ({"channels": ["smtp"], "smtp_host": "mail"}, "smtp_host and smtp_from"),
        ({"channels": ["webhook"]}, "webhook_url"),
    ],
)
def test_bad_channel_settings_are_refused_naming_the_setting(config, complaint):
    with pytest.raises(ConfigError, match=complaint):
        notificacao.channels_from(config)


def test_channel_reprs_hide_secrets():
    assert "pw" not in repr(SmtpChannel("mail", 25, "a@b.c", user="u", password="pw"))
    assert "token" not in repr(WebhookChannel("https://hooks.example/x?token=t"))


@pytest.mark.parametrize(
    ("cents", "text"), [(0, "R$ 0,00"), (5, "R$ 0,05"), (9980, "R$ 99,80"), (123456789, "R$ 1.234.567,89")]
)
def test_amounts_are_written_in_brazilian_format(cents, text):
    assert notificacao.reais(cents) == text


# --- two instances sharing one database ------------------------------------------------------


class Held:
    """A channel whose sends wait until the test lets them go; it records each one."""

    name = "log"

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.sending = threading.Event()
        self.go = threading.Event()

    def send(self, n: Notificacao) -> None:
        self.sending.set()
        assert self.go.wait(10)
        self.sent.append(n.idempotency_key)


def two_instances(tmp_path: Any, database_url: str | None, lease: float) -> tuple[Any, Held, Any, Held]:
    """Two notificacao instances on one database, each with a held channel, the order's customer known."""
    env = PluginEnv("notificacao", {}, tmp_path, database_url)
    made = []
    for host in "ab":
        channel = Held()
        store = open_store(env, "notificacao", notificacao.SCHEMA)
        made += [notificacao.Notificador(store, [channel], tmp_path / f"journal-{host}.db", lease), channel]
    with made[0].store.transaction() as db:
        db.execute("INSERT INTO clientes VALUES (?, ?, ?)", (ORDER, "Maria", "maria@exemplo.com.br"))
    return made[0], made[1], made[2], made[3]


def test_an_event_handled_by_two_instances_at_once_is_sent_by_the_one_holding_the_claim(tmp_path, database_url) -> None:
    a, first, b, second = two_instances(tmp_path, database_url, lease=30.0)
    sending = threading.Thread(target=a.notificar, args=(ORDER, "separacao_iniciada"))
    sending.start()
    assert first.sending.wait(10)

    second.go.set()
    with pytest.raises(Retry, match="another instance is sending it"):
        b.notificar(ORDER, "separacao_iniciada")
    assert second.sent == [], "the claim held by the other instance is not sent again"
    first.go.set()
    sending.join(10)
    b.notificar(ORDER, "separacao_iniciada")
    assert (first.sent, second.sent) == ([f"{ORDER}.separacao_iniciada"], []), "sent once, by the claim's holder"


def test_a_claim_left_by_an_instance_that_died_is_sent_by_another_once_it_ran_out(tmp_path, database_url) -> None:
    a, dead, b, alive = two_instances(tmp_path, database_url, lease=0.3)
    threading.Thread(target=a.notificar, args=(ORDER, "estorno"), kwargs={"valor": "R$ 1,00"}, daemon=True).start()
    assert dead.sending.wait(10)  # claimed, and never marked: it "died" sending
    alive.go.set()
    with pytest.raises(Retry):
        b.notificar(ORDER, "estorno", valor="R$ 1,00")

    wait_for(lambda: time.time() > claimed_until(a), 5, "the dead instance's claim to run out")
    b.notificar(ORDER, "estorno", valor="R$ 1,00")
    assert alive.sent == [f"{ORDER}.estorno"]
    dead.go.set()


def claimed_until(instance: Any) -> float:
    return float(instance.store.db.execute("SELECT max(claimed_until) FROM envios").fetchone()[0])


class CutOff:
    """A store that stops answering while ``cut`` is set, as one across a network cut does."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.cut = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def transaction(self) -> Any:
        if self.cut:
            raise StoreConflict("the database host cannot be reached", time.monotonic())
        return self.store.transaction()


class CutWhileSending:
    """A channel that sends, and the network goes down right after: the send cannot be recorded."""

    name = "log"

    def __init__(self, store: CutOff) -> None:
        self.store = store
        self.sent: list[str] = []

    def send(self, n: Notificacao) -> None:
        self.sent.append(n.idempotency_key)
        self.store.cut = True


def cut_off_instance(tmp_path: Any, database_url: str | None, journal: str) -> tuple[Any, CutWhileSending]:
    env = PluginEnv("notificacao", {}, tmp_path, database_url)
    store = CutOff(open_store(env, "notificacao", notificacao.SCHEMA))
    channel = CutWhileSending(store)
    return notificacao.Notificador(store, [channel], tmp_path / journal, lease=0.5), channel


def sent_and_cut_off(tmp_path: Any, database_url: str | None, kind: str) -> tuple[Any, CutWhileSending]:
    """An instance that sent ``kind`` for :data:`ORDER` and was cut off from the store before recording it."""
    cut, channel = cut_off_instance(tmp_path, database_url, "journal.db")
    with cut.store.transaction() as db:
        db.execute("INSERT INTO clientes VALUES (?, ?, ?)", (ORDER, "Maria", "maria@exemplo.com.br"))
    with pytest.raises(StoreConflict):
        cut.notificar(ORDER, kind, valor="R$ 1,00")
    cut.store.cut = False
    return cut, channel


def test_a_send_cut_off_from_the_store_is_recorded_once_it_answers_and_never_sent_again(tmp_path, database_url) -> None:
    unused, _, other, other_channel = two_instances(tmp_path, database_url, lease=0.5)
    unused.close()
    other_channel.go.set()
    cut, channel = cut_off_instance(tmp_path, database_url, "journal-cut.db")
    with pytest.raises(StoreConflict):
        cut.notificar(ORDER, "separacao_concluida")
    assert cut.journal.pending() == [(ORDER, "separacao_concluida", "log")]

    cut.store.cut = False
    wait_for(lambda: not cut.journal.pending(), 10, "the journal to record the send once the store answers")
    wait_for(lambda: time.time() > claimed_until(other), 5, "the cut instance's claim to run out")
    other.notificar(ORDER, "separacao_concluida")
    cut.notificar(ORDER, "separacao_concluida")
    assert (channel.sent, other_channel.sent) == ([f"{ORDER}.separacao_concluida"], []), "sent once"
    cut.close()
    other.close()


def test_an_event_handled_again_after_a_failed_record_is_not_sent_again(tmp_path, database_url) -> None:
    cut, channel = sent_and_cut_off(tmp_path, database_url, "estorno")
    cut.notificar(ORDER, "estorno", valor="R$ 1,00")  # at once, well before the journal's next round
    assert channel.sent == [f"{ORDER}.estorno"]
    assert cut.sent_counts() == {"estorno": 1}
    cut.close()


def test_sends_a_killed_process_could_not_record_are_recorded_by_its_successor_at_start(tmp_path, database_url) -> None:
    killed, channel = sent_and_cut_off(tmp_path, database_url, "pedido_recebido")
    killed.journal.close()  # it dies: nothing of it runs any more, its journal file stays

    successor, successor_channel = cut_off_instance(tmp_path, database_url, "journal.db")
    assert successor.journal.pending() == [], "recorded at start"
    wait_for(lambda: time.time() > claimed_until(successor), 5, "the killed process's claim to run out")
    successor.notificar(ORDER, "pedido_recebido", valor="R$ 1,00")
    assert (channel.sent, successor_channel.sent) == ([f"{ORDER}.pedido_recebido"], [])
    successor.close()
