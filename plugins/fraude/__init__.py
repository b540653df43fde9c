"""fraude: scores every new order with explainable rules and publishes the verdict.

Each rule that fires adds points and a reason in Portuguese; the order is fraud when the
score reaches :attr:`Regras.limite_score`. The rules: a high total, too many orders from one
customer or one card within a time window, a blocklisted e-mail domain or card token, a card
issued in another country than the shipping one, and an unusual quantity on one line.
Thresholds and points default to :class:`Regras` and can be set in ``[plugins.fraude]``.

Velocity counts the orders kept in the plugin's store (``<data_dir>/fraude/fraude.sqlite3``, or
the shared PostgreSQL schema ``fraude`` with ``database_url``) whose ``criado_em``
falls in the window before this one's, so a replay judges an order as it was judged the first
time rather than by the wall clock. The verdict is stored with the order: a redelivery
re-publishes it (same event id) and is never counted twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

from kafkaworkers import ConfigError, Context, Plugin, PluginEnv, Store, open_store
from kafkaworkers_orders.contracts import (
    FRAUDE_VERIFICADO,
    PEDIDO_NOVO,
    FraudeVerificado,
    PedidoNovo,
    event_id_for,
    reais,
)

__all__ = ["Analises", "Regras", "Veredito", "avaliar", "plugin", "reais"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS analise (
    order_id TEXT PRIMARY KEY,
    cliente_id TEXT NOT NULL,
    cartao TEXT NOT NULL,
    criado_em DOUBLE PRECISION NOT NULL,
    fraude INTEGER NOT NULL,
    score INTEGER NOT NULL,
    motivos TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS analise_cliente ON analise (cliente_id, criado_em);
CREATE INDEX IF NOT EXISTS analise_cartao ON analise (cartao, criado_em);
"""


@dataclass(frozen=True)
class Regras:
    """The rules' thresholds and points; every field can be set in ``[plugins.fraude]``."""

    limite_score: int = 70
    valor_maximo_centavos: int = 500_000
    pontos_valor_alto: int = 40
    janela_minutos: int = 60
    max_pedidos_cliente: int = 3
    max_pedidos_cartao: int = 3
    pontos_velocidade: int = 35
    dominios_bloqueados: frozenset[str] = frozenset({"mailinator.com", "yopmail.com"})
    cartoes_bloqueados: frozenset[str] = frozenset()
    pontos_bloqueio: int = 100
    pontos_pais_divergente: int = 30
    quantidade_maxima: int = 20
    pontos_quantidade: int = 25

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Regras:
        """The defaults overridden by a plugin's settings; a bad key or value is a :class:`ConfigError`."""
        defaults = cls()
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ConfigError(f"[plugins.fraude]: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        values: dict[str, Any] = {}
        for name, value in config.items():
            if isinstance(getattr(defaults, name), frozenset):
                if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"[plugins.fraude] {name} must be a list of strings, not {value!r}")
                values[name] = (
                    frozenset(v.lower() for v in value) if name == "dominios_bloqueados" else frozenset(value)
                )
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"[plugins.fraude] {name} must be a whole number >= 0, not {value!r}")
            else:
                values[name] = value
        return replace(defaults, **values)


class Veredito(NamedTuple):
    fraude: bool
    score: int
    motivos: list[str]


def avaliar(pedido: PedidoNovo, regras: Regras, pedidos_cliente: int, pedidos_cartao: int) -> Veredito:
    """Score one order; ``pedidos_*`` count the orders in the window, this one included."""
    pontos: list[tuple[int, str]] = []
    total = pedido.total_centavos
    if total > regras.valor_maximo_centavos:
        pontos.append((regras.pontos_valor_alto, f"valor alto: {reais(total)} > {reais(regras.valor_maximo_centavos)}"))
    janela = f"em {regras.janela_minutos} min"
    if pedidos_cliente > regras.max_pedidos_cliente:
        pontos.append(
            (
                regras.pontos_velocidade,
                f"muitos pedidos do cliente: {pedidos_cliente} {janela} (máximo {regras.max_pedidos_cliente})",
            )
        )
    if pedidos_cartao > regras.max_pedidos_cartao:
        pontos.append(
            (
                regras.pontos_velocidade,
                f"muitos pedidos do cartão final {pedido.cartao.final}: {pedidos_cartao} {janela}"
                f" (máximo {regras.max_pedidos_cartao})",
            )
        )
    dominio = pedido.cliente.email.rsplit("@", 1)[1].lower()
    if dominio in regras.dominios_bloqueados:
        pontos.append((regras.pontos_bloqueio, f"domínio de e-mail bloqueado: {dominio}"))
    if pedido.cartao.token in regras.cartoes_bloqueados:
        pontos.append((regras.pontos_bloqueio, f"cartão bloqueado: final {pedido.cartao.final}"))
    if pedido.cartao.pais_emissor != pedido.pais_entrega:
        pontos.append(
            (
                regras.pontos_pais_divergente,
                f"país do cartão ({pedido.cartao.pais_emissor}) diferente do país de entrega ({pedido.pais_entrega})",
            )
        )
    grandes = [f"{i.quantidade} x {i.sku}" for i in pedido.itens if i.quantidade > regras.quantidade_maxima]
    if grandes:
        pontos.append(
            (
                regras.pontos_quantidade,
                f"quantidade incomum: {', '.join(grandes)} (máximo {regras.quantidade_maxima} por item)",
            )
        )
    score = sum(p for p, _ in pontos)
    return Veredito(score >= regras.limite_score, score, [motivo for _, motivo in pontos])


class Analises:
    """Every order judged so far, for velocity and for replaying verdicts."""

    def __init__(self, store: Store, regras: Regras) -> None:
        self.store = store
        self.regras = regras

    def analisar(self, pedido: PedidoNovo) -> Veredito:
        """The order's verdict: judged now if it is new, else the one it got the first time."""
        with self.store.transaction() as db:
            row = db.execute("SELECT fraude, score, motivos FROM analise WHERE order_id = ?", (pedido.order_id,))
            found = row.fetchone()
            if found is not None:
                return Veredito(bool(found[0]), found[1], json.loads(found[2]))
            fim = pedido.criado_em.timestamp()
            inicio = fim - self.regras.janela_minutos * 60

            def recentes(column: str, value: str) -> int:
                sql = f"SELECT count(*) FROM analise WHERE {column} = ? AND criado_em > ? AND criado_em <= ?"
                return db.execute(sql, (value, inicio, fim)).fetchone()[0] + 1

            veredito = avaliar(
                pedido, self.regras, recentes("cliente_id", pedido.cliente.id), recentes("cartao", pedido.cartao.token)
            )
            # Another instance judging the same order at once (a partition moving) inserts first:
            # its verdict stands, and this one reads it back.
            stored = db.execute(
                "INSERT INTO analise VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
                (
                    pedido.order_id,
                    pedido.cliente.id,
                    pedido.cartao.token,
                    fim,
                    int(veredito.fraude),
                    veredito.score,
                    json.dumps(veredito.motivos),
                ),
            ).fetchone()
            if stored is None:
                fraude, score, motivos = db.execute(
                    "SELECT fraude, score, motivos FROM analise WHERE order_id = ?", (pedido.order_id,)
                ).fetchone()
                return Veredito(bool(fraude), score, json.loads(motivos))
        return veredito


plugin: Plugin[Analises] = Plugin(
    "fraude",
    produces={FRAUDE_VERIFICADO: FraudeVerificado},
    description="Scores orders with explainable fraud rules.",
)


@plugin.on_start
def start(env: PluginEnv) -> Analises:
    return Analises(open_store(env, "fraude", SCHEMA), Regras.from_config(env.config))


@plugin.on_stop
def stop(analises: Analises) -> None:
    analises.store.close()


@plugin.around_batch
def batch(analises: Analises) -> AbstractContextManager[None]:
    return analises.store.batch()


@plugin.consumes(PEDIDO_NOVO)
def verificar(pedido: PedidoNovo, ctx: Context[Analises]) -> None:
    fraude, score, motivos = ctx.state.analisar(pedido)
    ctx.produce(
        FRAUDE_VERIFICADO,
        FraudeVerificado(
            order_id=pedido.order_id,
            fraude=fraude,
            score=score,
            motivos=motivos,
            event_id=event_id_for(pedido.order_id, FRAUDE_VERIFICADO),
        ),
    )
