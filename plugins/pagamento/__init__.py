"""pagamento: charges each new order once, and refunds the charge once if the order is cancelled.

Consumes ``pedido-novo`` and ``pedido-cancelado``, publishes ``processo-pagamento``. The
gateway (:mod:`.gateway`; ``gateway = "simulated" | "http"`` in ``[plugins.pagamento]``) is
called through the ``gateway`` circuit breaker, so an outage pauses the worker instead of
burning retries. The gateways bound each call with their own timeout (``gateway_timeout``,
10 s), so the breaker calls them on the worker's thread: a hand-off to a helper thread per
charge made pagamento the slowest service of the pipeline. Declines are results, never
exceptions, so they never trip the breaker.

Exactly-once money movement rests on two keys. The gateway call cannot share a transaction
with the store, so the charge's idempotency key is the order id (the refund's, the order id
plus ``:estorno``): a crash after the gateway charged but before ``cobranca`` recorded it, or
two instances handling the same order while its partition moves, charges nothing new. Once
recorded, a redelivered order re-publishes the recorded outcome, with the same event id,
without calling the gateway.

A cancellation can overtake its order (the topics are not ordered with each other); it is
recorded, so the late order is never charged, and a charge that raced it is refunded.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import NamedTuple

from kafkaworkers import ConfigError, Context, PermanentError, Plugin, PluginEnv, RetryPolicy, Store, open_store
from kafkaworkers.breaker import CircuitBreaker
from kafkaworkers_orders.contracts import (
    PEDIDO_CANCELADO,
    PEDIDO_NOVO,
    PROCESSO_PAGAMENTO,
    PedidoCancelado,
    PedidoNovo,
    ProcessoPagamento,
    event_id_for,
)
from kafkaworkers_orders.pagamento.gateway import LEDGER, Gateway, GatewayError, HttpGateway, SimulatedGateway

__all__ = ["Cobrancas", "GatewayError", "gateway_breaker", "plugin"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS cobranca (
    order_id TEXT PRIMARY KEY,
    -- NULL: not charged, because the order was cancelled before it came.
    status TEXT CHECK (status IN ('aprovado', 'recusado')),
    transacao_id TEXT NOT NULL DEFAULT '',
    motivo TEXT NOT NULL DEFAULT '',
    valor BIGINT NOT NULL DEFAULT 0,
    cancelado INTEGER NOT NULL DEFAULT 0,
    estornado INTEGER NOT NULL DEFAULT 0,
    -- Which message's handling refunded it (pedido-novo or pedido-cancelado): only that one
    -- announces the refund, again if it is redelivered; the other, racing it, stays silent.
    estorno_por TEXT NOT NULL DEFAULT ''
);
"""
_COLUMNS = "order_id, status, transacao_id, motivo, valor, cancelado, estornado"


class Cobranca(NamedTuple):
    order_id: str
    status: str | None
    transacao_id: str
    motivo: str
    valor: int
    cancelado: bool
    estornado: bool


class Cobrancas:
    """The charges of every order, and the gateway that makes them."""

    def __init__(self, store: Store, gateway: Gateway, breaker: CircuitBreaker) -> None:
        self.store = store
        self.gateway = gateway
        self.breaker = breaker

    def cobrar(self, pedido: PedidoNovo) -> list[ProcessoPagamento]:
        """Charge an order unless it was charged or cancelled; the events that say so."""
        cobranca = self._get(pedido.order_id)
        if cobranca is None:
            result = self.breaker.call(self.gateway.charge, pedido.order_id, pedido.total_centavos, pedido.cartao)
            # An upsert: a cancellation may have been recorded while the gateway was charging.
            cobranca = self._write(
                "INSERT INTO cobranca (order_id, status, transacao_id, motivo, valor) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (order_id) DO UPDATE SET status = excluded.status,"
                " transacao_id = excluded.transacao_id, motivo = excluded.motivo, valor = excluded.valor",
                (pedido.order_id, result.status, result.transacao_id, result.motivo, pedido.total_centavos),
            )
        if cobranca.status is None:
            return []
        return [_evento(cobranca, cobranca.status, cobranca.motivo), *self._estornar(cobranca, PEDIDO_NOVO)]

    def cancelar(self, order_id: str) -> list[ProcessoPagamento]:
        """Record an order's cancellation and refund its approved charge, once; the refund event."""
        cobranca = self._write(
            "INSERT INTO cobranca (order_id, cancelado) VALUES (?, 1)"
            " ON CONFLICT (order_id) DO UPDATE SET cancelado = 1",
            (order_id,),
        )
        return self._estornar(cobranca, PEDIDO_CANCELADO)

    def close(self) -> None:
        self.gateway.close()
        self.store.close()

    def _estornar(self, cobranca: Cobranca, via: str) -> list[ProcessoPagamento]:
        """Refund a cancelled order's approved charge once. The charge and the cancellation may
        be handled at once (two topics, two lanes at ``--concurrency``, or two instances): the
        refund and its record are one transaction, and only the message that refunded
        announces it, so the event is published once (again on a redelivery of that message)."""
        if cobranca.status != "aprovado" or not cobranca.cancelado:
            return []
        with self.store.transaction() as db:
            estornado, por = db.execute(
                "SELECT estornado, estorno_por FROM cobranca WHERE order_id = ?", (cobranca.order_id,)
            ).fetchone()
            if not estornado:
                key = f"{cobranca.order_id}:estorno"
                self.breaker.call(self.gateway.refund, key, cobranca.transacao_id, cobranca.valor)
                # Conditional: of two messages refunding at once (here or on another instance),
                # only the one whose update changed the row announces it; the gateway's
                # idempotency key made both calls one refund.
                mine = db.execute(
                    "UPDATE cobranca SET estornado = 1, estorno_por = ? WHERE order_id = ? AND estornado = 0"
                    " RETURNING estorno_por",
                    (via, cobranca.order_id),
                ).fetchone()
                if mine is None:
                    (por,) = db.execute(
                        "SELECT estorno_por FROM cobranca WHERE order_id = ?", (cobranca.order_id,)
                    ).fetchone()
                else:
                    por = via
        return [_evento(cobranca, "estornado", "pedido cancelado")] if por in (via, "") else []

    def _get(self, order_id: str) -> Cobranca | None:
        row = self.store.db.execute(f"SELECT {_COLUMNS} FROM cobranca WHERE order_id = ?", (order_id,)).fetchone()
        return Cobranca(*row) if row else None

    def _write(self, sql: str, params: tuple[object, ...]) -> Cobranca:
        """Run one upsert of an order's row; the row as it is now."""
        with self.store.transaction() as db:
            return Cobranca(*db.execute(f"{sql} RETURNING {_COLUMNS}", params).fetchone())


def _evento(cobranca: Cobranca, status: str, motivo: str) -> ProcessoPagamento:
    return ProcessoPagamento(
        order_id=cobranca.order_id,
        status=status,  # type: ignore[arg-type]
        valor_centavos=cobranca.valor,
        transacao_id=cobranca.transacao_id,
        motivo=motivo,
        event_id=event_id_for(cobranca.order_id, f"{PROCESSO_PAGAMENTO}:{status}"),
    )


plugin: Plugin[Cobrancas] = Plugin(
    "pagamento",
    produces={PROCESSO_PAGAMENTO: ProcessoPagamento},
    retry=RetryPolicy(delays=(1.0, 10.0, 60.0)),
    description="Charges orders once through the gateway; refunds cancelled ones once.",
    # A gateway call waits on the network: several at once, in order per order id.
    concurrency=8,
)

#: Opens after half of at least five recent calls failed; then probes the gateway every 30 s.
gateway_breaker = plugin.breaker(
    # A declined card returns normally and a rejected request (4xx) raises PermanentError:
    # both are answers from a healthy gateway, so neither counts towards opening the breaker.
    "gateway",
    failure_rate=0.5,
    window=20,
    min_calls=5,
    wait=30.0,
    probes=2,
    timeout=None,
    ignore=(PermanentError,),
)


@plugin.on_start
def start(env: PluginEnv) -> Cobrancas:
    config = env.config
    timeout = float(config.get("gateway_timeout", 10.0))
    kind = config.get("gateway", "simulated")
    gateway: Gateway
    if kind == "simulated":
        gateway = SimulatedGateway(open_store(env, "gateway", LEDGER), timeout=timeout)
    elif kind == "http":
        if not config.get("gateway_url") or not config.get("gateway_api_key"):
            raise ConfigError('[plugins.pagamento] gateway = "http" needs gateway_url and gateway_api_key')
        gateway = HttpGateway(config["gateway_url"], config["gateway_api_key"], timeout)
    else:
        raise ConfigError(f'[plugins.pagamento] gateway must be "simulated" or "http", not {kind!r}')
    store = open_store(env, "pagamento", SCHEMA)
    if store.dialect == "sqlite":
        columns = {row[1] for row in store.db.execute("PRAGMA table_info(cobranca)")}
        if "estorno_por" not in columns:  # a file made before the column existed
            store.db.execute("ALTER TABLE cobranca ADD COLUMN estorno_por TEXT NOT NULL DEFAULT ''")
    return Cobrancas(store, gateway, gateway_breaker)


@plugin.on_stop
def stop(cobrancas: Cobrancas) -> None:
    cobrancas.close()


@plugin.around_batch
def batch(cobrancas: Cobrancas) -> AbstractContextManager[None]:
    return cobrancas.store.batch()


@plugin.consumes(PEDIDO_NOVO)
def cobrar(pedido: PedidoNovo, ctx: Context[Cobrancas]) -> None:
    for evento in ctx.state.cobrar(pedido):
        ctx.produce(PROCESSO_PAGAMENTO, evento)


@plugin.consumes(PEDIDO_CANCELADO)
def estornar(cancelado: PedidoCancelado, ctx: Context[Cobrancas]) -> None:
    for evento in ctx.state.cancelar(cancelado.order_id):
        ctx.produce(PROCESSO_PAGAMENTO, evento)
