"""notificacao: tells the customer, in Portuguese, what happened to their order.

Every customer-facing event (order received, payment approved, declined or refunded,
picking started or done, order cancelled) becomes one notification per configured channel.
Later events carry no customer, so ``pedido-novo`` stores order id → customer in the plugin's
store (SQLite, or PostgreSQL shared by every instance with ``database_url``); an
event that overtakes its order (another topic, another partition) raises
:class:`~kafkaworkers.Retry` and comes back through ``notificacao-retry-<n>`` (1 s, 5 s, 30 s;
then the dead-letter topic). SMTP and webhook sends go through the ``smtp`` and ``webhook``
circuit breakers, so an outage pauses the partition instead of burning the retries.

Delivery guarantee: at least once per channel, with a window of one message. Each
(order, kind, channel) is *claimed* in a transaction (status ``sending``), then sent, then
marked ``sent``. A redelivered event skips every channel already marked ``sent`` and resends
only one still ``sending``: that happens only when the process died, or the send failed,
between claim and mark. Recording only after sending duplicates on such a crash as well,
and recording before sending while skipping ``sending`` rows loses the notification: one
possible duplicate is the lesser harm, and the e-mail Message-ID and the webhook's
``Idempotency-Key`` are stable per (order, kind), so a receiver can drop it.

A claim is a lease held by one process for the channels' timeouts plus a margin: while a
partition moves, the same event may be handled by two instances at once, and the second
must not resend what the first is sending. It sends only what it could claim, and comes
back through a retry once the other's lease has run out, sending then only if the first
died before marking it sent.

With a store on another host (``database_url``), a send whose mark fails (the store out of
reach: a network cut) is kept in a journal on the host (:mod:`.journal`) and marked as soon as
the store answers, inside the lease, so the instance that takes the event over finds it sent.
A duplicate is then left only for a process killed between a send and its journal line, or a
host cut off for longer than the lease.

Settings (``[plugins.notificacao]``): ``channels`` (default ``["log"]``; also ``"smtp"``,
``"webhook"``), ``smtp_host``, ``smtp_port`` (25), ``smtp_from``, ``smtp_starttls``,
``smtp_user``, ``smtp_password`` (or the ``NOTIFICACAO_SMTP_PASSWORD`` environment variable),
``webhook_url``, ``timeout`` (seconds per send, 10).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kafkaworkers import ConfigError, Context, PermanentError, Plugin, PluginEnv, Retry, RetryPolicy, Store, open_store
from kafkaworkers.errors import CircuitOpenError
from kafkaworkers_orders.contracts import (
    PEDIDO_CANCELADO,
    PEDIDO_NOVO,
    PROCESSO_PAGAMENTO,
    PROCESSO_PICKING,
    PedidoCancelado,
    PedidoNovo,
    ProcessoPagamento,
    ProcessoPicking,
    reais,
)
from kafkaworkers_orders.notificacao.channels import Channel, LogChannel, Notificacao, SmtpChannel, WebhookChannel
from kafkaworkers_orders.notificacao.journal import Send, SendJournal

__all__ = ["TEXTS", "Notificador", "plugin", "reais"]

plugin: Plugin[Notificador] = Plugin(
    "notificacao",
    retry=RetryPolicy(delays=(1.0, 5.0, 30.0)),
    description="Tells the customer what happened to the order (log, e-mail, webhook).",
    # An SMTP or webhook call waits on the network: several at once, in order per order id.
    concurrency=8,
)
# PermanentError is the recipient's answer, not the dependency failing: it must not open the breaker.
_breakers = {
    name: plugin.breaker(name, timeout=30.0, wait=30.0, ignore=(PermanentError,)) for name in ("smtp", "webhook")
}

#: Seconds a claim outlasts the sends: a host cut off from the store while sending records its
#: sends from its journal once the store answers again (TCP gives up on the old session within
#: 10 s, a new one connects within seconds of the network's return), before the claim runs out
#: and another instance sends them again. Network cuts up to about this long cause no duplicate.
RECORD_MARGIN = 30.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS clientes (
    order_id TEXT PRIMARY KEY,
    nome TEXT NOT NULL,
    email TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS envios (
    order_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    channel TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('sending', 'sent')),
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    -- The process sending it (a random id per start) and until when its claim holds (epoch seconds).
    claimed_by TEXT NOT NULL DEFAULT '',
    claimed_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (order_id, kind, channel)
);
"""

#: Subject and body of each kind of notification; the body follows a greeting by name.
TEXTS = {
    "pedido_recebido": (
        "Recebemos o seu pedido {order}",
        "Recebemos o seu pedido {order}, no valor de {valor}. Vamos avisar você a cada etapa.",
    ),
    "pagamento_aprovado": (
        "Pagamento aprovado: pedido {order}",
        "O pagamento de {valor} do pedido {order} foi aprovado.",
    ),
    "pagamento_recusado": (
        "Pagamento recusado: pedido {order}",
        "O pagamento de {valor} do pedido {order} foi recusado{motivo}. Nenhum valor foi cobrado.",
    ),
    "estorno": (
        "Estorno do pedido {order}",
        "Estornamos {valor} referentes ao pedido {order}. O crédito aparece no seu cartão em até duas faturas.",
    ),
    "separacao_iniciada": ("Pedido {order} em separação", "Começamos a separar os itens do seu pedido {order}."),
    "separacao_concluida": (
        "Pedido {order} separado",
        "Os itens do seu pedido {order} foram separados e logo seguem para a entrega.",
    ),
    "pedido_cancelado": (
        "Pedido {order} cancelado",
        "Infelizmente o seu pedido {order} foi cancelado porque {motivo}. Se algum valor foi cobrado,"
        " ele será estornado.",
    ),
}
PAYMENT_KINDS = {"aprovado": "pagamento_aprovado", "recusado": "pagamento_recusado", "estornado": "estorno"}
PICKING_KINDS = {"iniciado": "separacao_iniciada", "concluido": "separacao_concluida"}
#: Why an order was cancelled, in the customer's words.
MOTIVOS = {
    "fraude": "ele não foi aprovado na nossa análise de segurança",
    "pagamento_recusado": "o pagamento foi recusado",
    "sem_estoque": "um ou mais itens estão sem estoque",
}


def channels_from(config: Mapping[str, Any]) -> list[Channel]:
    """The channels ``[plugins.notificacao]`` asks for, each checked for the settings it needs."""
    names = config.get("channels", ["log"])
    if isinstance(names, str) or not names:
        raise ConfigError('plugins.notificacao.channels must be a non-empty list, e.g. ["log", "smtp"]')
    timeout = float(config.get("timeout", 10.0))
    channels: list[Channel] = []
    for name in names:
        if name == "log":
            channels.append(LogChannel())
        elif name == "smtp":
            if not config.get("smtp_host") or not config.get("smtp_from"):
                raise ConfigError("the smtp channel needs plugins.notificacao.smtp_host and smtp_from")
            channels.append(
                SmtpChannel(
                    host=config["smtp_host"],
                    port=int(config.get("smtp_port", 25)),
                    sender=config["smtp_from"],
                    starttls=bool(config.get("smtp_starttls", False)),
                    user=config.get("smtp_user"),
                    password=config.get("smtp_password") or os.environ.get("NOTIFICACAO_SMTP_PASSWORD"),
                    timeout=timeout,
                )
            )
        elif name == "webhook":
            if not config.get("webhook_url"):
                raise ConfigError("the webhook channel needs plugins.notificacao.webhook_url")
            channels.append(WebhookChannel(url=config["webhook_url"], timeout=timeout))
        else:
            raise ConfigError(f"unknown notificacao channel {name!r}; use log, smtp or webhook")
    return channels


@dataclass
class Notificador:
    """The running plugin's state: who each order's customer is, what was sent, and the channels."""

    store: Store
    channels: list[Channel]
    #: Where this host remembers sends not yet recorded in the store (see :mod:`.journal`);
    #: ``None`` for a store on this host, which is as reachable as a journal would be.
    journal_path: Path | None
    #: How long a claim keeps other processes from sending the same notification.
    lease: float = 30.0
    #: This process's claims.
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    journal: SendJournal | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.journal_path is not None:
            self.journal = SendJournal(self.journal_path, self.record).start()

    def notificar(self, order_id: str, kind: str, **facts: str) -> None:
        """Claim, send and mark one notification on every channel not yet marked sent for it."""
        now, stamp = time.time(), datetime.now(UTC).isoformat()
        # Sent by this host before a failed record (the store out of reach): recorded with the
        # claim, so that handling the event again does not send them again.
        journal = self.journal
        unrecorded = journal.pending_for(order_id, kind) if journal is not None else []
        with self.store.transaction() as db:
            cliente = db.execute("SELECT nome, email FROM clientes WHERE order_id = ?", (order_id,)).fetchone()
            if cliente is None:
                raise Retry("customer not known yet")
            db.executemany(
                "INSERT INTO envios (order_id, kind, channel, status, updated_at)"
                " VALUES (?, ?, ?, 'sending', ?) ON CONFLICT DO NOTHING",
                [(order_id, kind, channel.name, stamp) for channel in self.channels],
            )
            self.record(unrecorded)
            claimed = db.execute(
                "UPDATE envios SET attempts = attempts + 1, updated_at = ?, claimed_by = ?, claimed_until = ?"
                " WHERE order_id = ? AND kind = ? AND status = 'sending' AND (claimed_until < ? OR claimed_by = ?)"
                " RETURNING channel",
                (stamp, self.owner, now + self.lease, order_id, kind, now, self.owner),
            )
            pending = {row[0] for row in claimed.fetchall()}
            (elsewhere,) = db.execute(
                "SELECT count(*) FROM envios"
                " WHERE order_id = ? AND kind = ? AND status = 'sending' AND claimed_by != ?",
                (order_id, kind, self.owner),
            ).fetchone()
        if unrecorded:
            assert journal is not None
            journal.discard(unrecorded)
        nome, email = cliente
        assunto, texto = (template.format(order=order_id, **facts) for template in TEXTS[kind])
        notificacao = Notificacao(order_id, kind, nome, email, assunto, f"Olá, {nome}!\n\n{texto}\n")
        errors: list[Exception] = []
        for channel in self.channels:
            if channel.name not in pending:
                continue
            try:
                breaker = _breakers.get(channel.name)
                if breaker is None:
                    channel.send(notificacao)
                else:
                    breaker.call(channel.send, notificacao)
            except Exception as exc:
                # The other channels still get their chance; the failed one is redone on redelivery.
                errors.append(exc)
                continue
            sent = (order_id, kind, channel.name)
            if journal is None:
                self.record([sent])
            else:
                journal.add(sent)
                self.record([sent])
                journal.discard([sent])
        if errors:
            # An open breaker pauses the partition, a transient error retries, and only when every
            # failure is permanent does the message go to the dead-letter topic.
            raise min(errors, key=lambda e: (not isinstance(e, CircuitOpenError), isinstance(e, PermanentError)))
        if elsewhere:
            raise Retry("another instance is sending it; looked at again once its claim ran out", delay=self.lease)

    def record(self, sends: list[Send]) -> None:
        """Mark ``sends`` sent in the store."""
        if not sends:
            return
        stamp = datetime.now(UTC).isoformat()
        with self.store.transaction() as db:
            db.executemany(
                "UPDATE envios SET status = 'sent', updated_at = ? WHERE order_id = ? AND kind = ? AND channel = ?",
                [(stamp, *send) for send in sends],
            )

    def close(self) -> None:
        """Stop recording and close the store; sends still unrecorded wait in the journal."""
        if self.journal is not None:
            self.journal.close()
        self.store.close()

    def sent_counts(self, channel: str | None = None) -> dict[str, int]:
        """Deliveries marked sent, per notification kind (one per channel; ``channel`` narrows to one)."""
        sql = "SELECT kind, count(*) FROM envios WHERE status = 'sent'"
        params: tuple[str, ...] = ()
        if channel is not None:
            sql, params = sql + " AND channel = ?", (channel,)
        return dict(self.store.db.execute(sql + " GROUP BY kind", params).fetchall())


@plugin.on_start
def start(env: PluginEnv) -> Notificador:
    channels = channels_from(env.config)
    store = open_store(env, "notificacao", SCHEMA)
    if store.dialect == "sqlite":
        columns = {row[1] for row in store.db.execute("PRAGMA table_info(envios)")}
        if "claimed_by" not in columns:  # a file made before claims were leases
            store.db.execute("ALTER TABLE envios ADD COLUMN claimed_by TEXT NOT NULL DEFAULT ''")
            store.db.execute("ALTER TABLE envios ADD COLUMN claimed_until DOUBLE PRECISION NOT NULL DEFAULT 0")
    # Every channel may take its whole timeout, and the claim must outlast them all; with a store on
    # another host, also the time a host cut off from it while sending needs to record its sends.
    margin = RECORD_MARGIN if store.shared else 5.0
    lease = float(env.config.get("timeout", 10.0)) * len(channels) + margin
    journal = env.data_dir / "notificacao-journal.db" if store.shared else None
    return Notificador(store, channels, journal, lease)


@plugin.on_stop
def stop(notificador: Notificador) -> None:
    notificador.close()


@plugin.consumes(PEDIDO_NOVO)
def pedido_novo(pedido: PedidoNovo, ctx: Context[Notificador]) -> None:
    with ctx.state.store.transaction() as db:
        db.execute(
            "INSERT INTO clientes (order_id, nome, email) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (pedido.order_id, pedido.cliente.nome, pedido.cliente.email),
        )
    ctx.state.notificar(pedido.order_id, "pedido_recebido", valor=reais(pedido.total_centavos))


@plugin.consumes(PROCESSO_PAGAMENTO)
def processo_pagamento(pagamento: ProcessoPagamento, ctx: Context[Notificador]) -> None:
    motivo = f" ({pagamento.motivo})" if pagamento.motivo else ""
    kind = PAYMENT_KINDS[pagamento.status]
    ctx.state.notificar(pagamento.order_id, kind, valor=reais(pagamento.valor_centavos), motivo=motivo)


@plugin.consumes(PROCESSO_PICKING)
def processo_picking(picking: ProcessoPicking, ctx: Context[Notificador]) -> None:
    ctx.state.notificar(picking.order_id, PICKING_KINDS[picking.status])


@plugin.consumes(PEDIDO_CANCELADO)
def pedido_cancelado(cancelado: PedidoCancelado, ctx: Context[Notificador]) -> None:
    ctx.state.notificar(cancelado.order_id, "pedido_cancelado", motivo=MOTIVOS[cancelado.motivo])
