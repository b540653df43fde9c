"""The benchmark's data: realistic orders in, one small result per order out.

Every contender decodes the same bytes into the same msgspec type, the order pipeline's own
``PedidoNovo`` contract, and encodes the same small result. Importable from the peers'
virtual environments too (it needs msgspec only): outside the project's venv the contract
and the header names are loaded from ``plugins/contracts.py`` and ``kafkaworkers/headers.py``
by path.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

__all__ = [
    "Pagamento",
    "PagamentoResumo",
    "PedidoNovo",
    "PedidoProcessado",
    "fails_once",
    "make_order",
    "order_stream",
    "payment_stream",
    "process",
    "summarize",
]

ROOT = Path(__file__).resolve().parent.parent


def _load(module: str, path: str):
    """``module`` as installed in the project's venv, else the source file at ``path`` (a peer's venv)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        name = f"bench_{path.replace('/', '_').removesuffix('.py')}"
        spec = importlib.util.spec_from_file_location(name, ROOT / path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        spec.loader.exec_module(loaded)
        return loaded


contracts = _load("kafkaworkers_orders.contracts", "plugins/contracts.py")
CORRELATION_HEADER = _load("kafkaworkers.headers", "kafkaworkers/headers.py").H_CORRELATION_ID
PedidoNovo = contracts.PedidoNovo
ProcessoPicking = contracts.ProcessoPicking


class PedidoProcessado(msgspec.Struct, frozen=True, kw_only=True):
    """The small result every contender produces per order (about 80 bytes of JSON)."""

    order_id: str
    total_centavos: int
    itens: int
    pais_entrega: str


def process(order: PedidoNovo) -> PedidoProcessado:
    """The per-order work of every contender, after decoding."""
    return PedidoProcessado(
        order_id=order.order_id,
        total_centavos=order.total_centavos,
        itens=len(order.itens),
        pais_entrega=order.pais_entrega,
    )


class Pagamento(msgspec.Struct, frozen=True, kw_only=True):
    """W3-small's input: a flat payment event of about 230 bytes of JSON, where decoding costs
    little and the framework's own per-message cost shows."""

    event_id: str
    order_id: str
    cliente_id: str
    valor_centavos: int
    moeda: str
    metodo: str
    parcelas: int
    status: str
    pais: str
    occurred_at: datetime


class PagamentoResumo(msgspec.Struct, frozen=True, kw_only=True):
    """W3-small's result (about 60 bytes of JSON)."""

    order_id: str
    valor_centavos: int
    aprovado: bool


def summarize(payment: Pagamento) -> PagamentoResumo:
    """The per-message work of W3-small, after decoding."""
    return PagamentoResumo(
        order_id=payment.order_id, valor_centavos=payment.valor_centavos, aprovado=payment.status == "aprovado"
    )


def fails_once(order_id: str, percent: float) -> bool:
    """Whether this order's first handling fails (W4): a stable ``percent`` of the orders."""
    return percent > 0 and zlib.crc32(order_id.encode()) % 10_000 < percent * 100


_NOMES = ["Ana Souza", "Bruno Lima", "Carla Mendes", "Diego Alves", "Elisa Rocha", "Fábio Nunes", "Gabriela Dias"]
_SKUS = ["CAM-001", "CAL-204", "TEN-3309", "MEI-12", "BON-77", "JAQ-9001", "BER-450"]


def make_order(
    rng: random.Random, order_id: str, criado_em: datetime | None = None, skus: list[str] | None = None
) -> PedidoNovo:
    """One order, mostly of one line, about 410-480 bytes as JSON (``skus``: the SKUs to pick from)."""
    nome = rng.choice(_NOMES)
    cliente_id = f"c{rng.randrange(10**6):06d}"
    return PedidoNovo(
        order_id=order_id,
        event_id=uuid.UUID(int=rng.getrandbits(128)).hex,
        occurred_at=criado_em or datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(10**7)),
        cliente=contracts.Cliente(id=cliente_id, nome=nome, email=f"{cliente_id}@ex.com.br"),
        itens=[
            contracts.Item(
                sku=rng.choice(skus or _SKUS),
                quantidade=rng.randint(1, 5),
                preco_unitario_centavos=rng.randint(990, 99_990),
            )
            for _ in range(1 if rng.random() < 0.8 else 2)
        ],
        cartao=contracts.Cartao(
            token=f"tok_{rng.getrandbits(64):016x}", final=f"{rng.randrange(10**4):04d}", pais_emissor="BR"
        ),
        pais_entrega="BR",
        criado_em=criado_em or datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(10**7)),
    )


def order_stream(count: int, prefix: str, seed: int = 7):
    """``count`` encoded orders as (key, value, headers), deterministic for a seed."""
    rng = random.Random(seed)
    encode = msgspec.json.Encoder().encode
    for i in range(count):
        order_id = f"{prefix}-{i:08d}"
        value = encode(make_order(rng, order_id))
        yield order_id.encode(), value, [(CORRELATION_HEADER, uuid.UUID(int=rng.getrandbits(128)).hex.encode())]


_METODOS = ["cartao", "pix", "boleto"]
_STATUS = ["aprovado", "aprovado", "aprovado", "recusado"]


def payment_stream(count: int, prefix: str, seed: int = 11, keys: int | None = None):
    """``count`` encoded :class:`Pagamento` events as (key, value, headers), deterministic for a
    seed; keyed by order id, or by one of ``keys`` customer ids when given (W6)."""
    rng = random.Random(seed)
    encode = msgspec.json.Encoder().encode
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(count):
        order_id = f"{prefix}-{i:08d}"
        cliente_id = f"c{rng.randrange(keys or 10**6):06d}"
        value = encode(
            Pagamento(
                event_id=uuid.UUID(int=rng.getrandbits(128)).hex,
                order_id=order_id,
                cliente_id=cliente_id,
                valor_centavos=rng.randint(990, 999_990),
                moeda="BRL",
                metodo=rng.choice(_METODOS),
                parcelas=rng.randint(1, 12),
                status=rng.choice(_STATUS),
                pais="BR",
                occurred_at=start + timedelta(seconds=rng.randrange(10**7)),
            )
        )
        key = cliente_id if keys else order_id
        yield key.encode(), value, [(CORRELATION_HEADER, uuid.UUID(int=rng.getrandbits(128)).hex.encode())]
