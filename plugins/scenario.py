"""The order pipeline's demo scenario: what ``kafkaworkers demo`` publishes and how it judges the result.

It generates realistic orders whose outcome is known in advance, one failure cause each:

- about 10 % fraud: a blocklisted e-mail domain, or (a third of them, while stock allows)
  an amount above the limit paid with a foreign card, since fraude's default rules score a
  high amount alone below their verdict threshold;
- 10 % declined payments (the gateway's test tokens ``tok_recusado`` and ``tok_sem_saldo``);
- 5 % out of stock: one more unit of the catalogue's scarcest SKU than it holds;
- the rest picked (``separado``): well below the fraud limit, shipped where the card is from.

Stock is budgeted so no outcome depends on timing: every order that reserves fits in the
catalogue together with all the others (a cancelled order releases its units only at some
later moment, so all count), and none of them touches the SKU the out-of-stock orders ask
for. The catalogue grows with the run: past the few hundred orders reserva's seed catalogue
carries, every product's stock but the scarcest's is multiplied (:meth:`OrderScenario.stock`),
and the demo hands reserva that catalogue (:meth:`OrderScenario.prepare`).

Each order has its own customer, so customer velocity stays quiet; the shared test card
tokens do trip card velocity, which alone stays below the fraud threshold.

An order is finished when it reached a terminal state (picking ``concluido`` or
``pedido-cancelado``) and its compensations are done: a charged cancelled order was refunded
(``estornado``), a reserved one released (``liberado``).
"""

from __future__ import annotations

import random
import unicodedata
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from kafkaworkers import KafkaWorkersError, hookimpl
from kafkaworkers.demo import DemoReport
from kafkaworkers.headers import H_CORRELATION_ID
from kafkaworkers.transports import Headers
from kafkaworkers_orders.contracts import (
    PEDIDO_CANCELADO,
    PEDIDO_NOVO,
    PROCESSO_PAGAMENTO,
    PROCESSO_PICKING,
    RESERVA_ESTOQUE,
    Cartao,
    Cliente,
    Item,
    PedidoCancelado,
    PedidoNovo,
    ProcessoPagamento,
    ProcessoPicking,
    ReservaEstoque,
    event_id_for,
)
from kafkaworkers_orders.fraude import Regras
from kafkaworkers_orders.reserva import CATALOGUE
from kafkaworkers_orders.reserva.estoque import Produto, read_catalogue

__all__ = ["OUTCOMES", "OrderScenario", "Planned", "kafkaworkers_demo_scenario"]

#: Terminal outcomes: picked, or cancelled for one of the three reasons.
OUTCOMES = ("separado", "fraude", "pagamento_recusado", "sem_estoque")
SHARES = {"fraude": 0.10, "pagamento_recusado": 0.10, "sem_estoque": 0.05}
#: The fraude plugin's default rules, which the demo runs with.
_RULES = Regras()
FRAUD_LIMIT_CENTS = _RULES.valor_maximo_centavos
BLOCKLISTED_DOMAINS = sorted(_RULES.dominios_bloqueados)
FOREIGN_COUNTRIES = ("AR", "US", "PT", "CN")
#: Legitimate orders stay this far below the fraud limit, big fraudulent ones this far above it.
SAFE_TOTAL_CENTS = FRAUD_LIMIT_CENTS * 8 // 10
BIG_TOTAL_CENTS = FRAUD_LIMIT_CENTS * 6 // 5
#: The share of fraudulent orders made by amount (the rest by e-mail domain), and the stock per
#: remaining order below which none is.
BIG_FRAUD_SHARE = 1 / 3
BIG_ORDER_ALLOWANCE = 6
UNFINISHED = "unfinished"

FIRST_NAMES = (
    "Ana", "Beatriz", "Bruna", "Camila", "Carla", "Fernanda", "Gabriela", "Helena", "Juliana", "Larissa",
    "Letícia", "Mariana", "Patrícia", "Rafaela", "Vitória", "André", "Bruno", "Carlos", "Diego", "Eduardo",
    "Felipe", "Gustavo", "João", "José", "Lucas", "Marcelo", "Mateus", "Paulo", "Rafael", "Thiago",
)  # fmt: skip
SURNAMES = (
    "Silva", "Santos", "Oliveira", "Souza", "Rodrigues", "Ferreira", "Alves", "Pereira", "Lima", "Gomes",
    "Costa", "Ribeiro", "Martins", "Carvalho", "Araújo", "Melo", "Barbosa", "Rocha", "Dias", "Nascimento",
)  # fmt: skip
DOMAINS = ("gmail.com", "hotmail.com", "outlook.com", "yahoo.com.br", "uol.com.br", "bol.com.br", "terra.com.br")
DECLINED_TOKENS = ("tok_recusado", "tok_sem_saldo")
#: Units per order line, mostly one, so the catalogue carries a few hundred orders.
QUANTITY_WEIGHTS = {1: 75, 2: 20, 3: 5}
#: Stock units planned per reserving order: with these, a run has room for orders of several
#: lines and for a few big fraudulent ones (reserva's seed catalogue: 950 units, 237 orders).
UNITS_PER_ORDER = 4


@dataclass(frozen=True, slots=True)
class Planned:
    """One generated order and the outcome it must reach; ``criado_em`` is stamped when it is sent."""

    pedido: PedidoNovo
    expected: str


@dataclass(slots=True)
class _Track:
    expected: str
    criado_ms: int = 0
    terminal: str | None = None
    terminal_ms: int = 0
    charged: bool = False
    refunded: bool = False
    reserved: bool = False
    released: bool = False

    @property
    def missing(self) -> list[str]:
        """The compensations a cancelled order still waits for."""
        if self.terminal in (None, "separado"):
            return []
        needs = (("estornado", self.charged and not self.refunded), ("liberado", self.reserved and not self.released))
        return [name for name, needed in needs if needed]

    @property
    def finished(self) -> bool:
        return self.terminal is not None and not self.missing


class OrderScenario:
    """The :class:`~kafkaworkers.demo.DemoScenario` of the order pipeline.

    :param run_id: prefixes the order ids, so a run on a real broker ignores the events of
        earlier runs still on the topics; random by default.
    :param catalogue: the stock the orders are planned against; reserva's seed by default.
    """

    def __init__(self, run_id: str | None = None, catalogue: list[Produto] | None = None) -> None:
        self.plugins = ["reserva", "notificacao", "fraude", "relatorios", "picking", "pagamento"]
        self.watch = [PROCESSO_PICKING, PEDIDO_CANCELADO, PROCESSO_PAGAMENTO, RESERVA_ESTOQUE]
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.catalogue = catalogue if catalogue is not None else read_catalogue(CATALOGUE)
        self.tracks: dict[str, _Track] = {}
        self._decoders = {
            PROCESSO_PICKING: msgspec.json.Decoder(ProcessoPicking),
            PEDIDO_CANCELADO: msgspec.json.Decoder(PedidoCancelado),
            PROCESSO_PAGAMENTO: msgspec.json.Decoder(ProcessoPagamento),
            RESERVA_ESTOQUE: msgspec.json.Decoder(ReservaEstoque),
        }

    # --- input ---------------------------------------------------------------------------

    def stock(self, count: int) -> list[Produto]:
        """The catalogue scaled to carry ``count`` orders: every product's stock but the scarcest's
        multiplied by the smallest factor that gives :data:`UNITS_PER_ORDER` units per order.

        The scarcest product keeps its stock: only the out-of-stock orders ask for it, each
        for one unit more than it holds.
        """
        scarce = _scarcest(self.catalogue)
        units = sum(p.estoque for p in self.catalogue if p is not scarce)
        scale = max(1, -(-count * UNITS_PER_ORDER // units)) if units else 1
        return [p if p is scarce else msgspec.structs.replace(p, estoque=p.estoque * scale) for p in self.catalogue]

    def prepare(self, count: int, data_dir: Path) -> dict[str, dict[str, Any]]:
        """Write the catalogue ``count`` orders are planned against for reserva to load, and
        return the plugin setting that points reserva at it."""
        path = data_dir / "demo-catalogue.json"
        path.write_bytes(msgspec.json.encode(self.stock(count)))
        return {"reserva": {"catalogue": str(path)}}

    def plan(self, count: int, seed: int) -> list[Planned]:
        """``count`` orders with their expected outcomes; the same seed gives the same orders."""
        rng = random.Random(seed)
        outcomes = [o for o, share in SHARES.items() for _ in range(round(count * share))]
        outcomes = (outcomes + ["separado"] * count)[:count]
        rng.shuffle(outcomes)
        catalogue = self.stock(count)
        scarce = _scarcest(catalogue)
        budget = {p.sku: p.estoque for p in catalogue if p is not scarce}
        prices = {p.sku: p.preco_centavos for p in catalogue}
        reserving = sum(o != "sem_estoque" for o in outcomes)
        planned = []
        for number, outcome in enumerate(outcomes, start=1):
            big = False
            if outcome == "sem_estoque":
                itens = [
                    Item(sku=scarce.sku, quantidade=scarce.estoque + 1, preco_unitario_centavos=scarce.preco_centavos)
                ]
            else:
                allowance = max(1, sum(budget.values()) // reserving)
                reserving -= 1
                # A big order takes a few dozen units: only while the stock leaves plenty for the rest.
                big = outcome == "fraude" and allowance >= BIG_ORDER_ALLOWANCE and rng.random() < BIG_FRAUD_SHARE
                itens = _items(rng, budget, prices, allowance, big)
                if not itens:
                    raise KafkaWorkersError(
                        f"the catalogue's stock ran out after {number - 1} of {count} orders;"
                        " it needs stock in more than its scarcest product"
                    )
                big = big and _total(itens) > BIG_TOTAL_CENTS
            planned.append(Planned(self._order(rng, number, itens, outcome, big), outcome))
        return planned

    def generate(self, count: int, seed: int) -> Iterator[tuple[str, bytes | None, bytes, Headers]]:
        """The planned orders, each stamped ``criado_em`` = now as it is handed to the producer."""
        planned = self.plan(count, seed)
        self.tracks = {p.pedido.order_id: _Track(p.expected) for p in planned}
        encoder = msgspec.json.Encoder()

        def stamped() -> Iterator[tuple[str, bytes | None, bytes, Headers]]:
            for p in planned:
                now = datetime.now(UTC)
                pedido = msgspec.structs.replace(p.pedido, criado_em=now, occurred_at=now)
                self.tracks[pedido.order_id].criado_ms = int(now.timestamp() * 1000)
                order_id = pedido.order_id.encode()
                yield PEDIDO_NOVO, order_id, encoder.encode(pedido), [(H_CORRELATION_ID, order_id)]

        return stamped()

    def _order(self, rng: random.Random, number: int, itens: list[Item], outcome: str, big: bool) -> PedidoNovo:
        first, last = rng.choice(FIRST_NAMES), rng.choice(SURNAMES)
        local = _ascii(f"{first}.{last}").lower()
        domain = rng.choice(BLOCKLISTED_DOMAINS if outcome == "fraude" and not big else DOMAINS)
        token = rng.choice(DECLINED_TOKENS) if outcome == "pagamento_recusado" else "tok_aprovado"
        placeholder = datetime.fromtimestamp(0, UTC)
        order_id = f"PED-{self.run_id}-{number:05d}"
        return PedidoNovo(
            order_id=order_id,
            event_id=event_id_for(order_id, PEDIDO_NOVO),
            occurred_at=placeholder,
            criado_em=placeholder,
            # One customer per order keeps customer velocity quiet (card velocity, by token, cannot be).
            cliente=Cliente(
                id=f"CLI-{self.run_id}-{number:05d}", nome=f"{first} {last}", email=f"{local}{number}@{domain}"
            ),
            itens=itens,
            cartao=Cartao(
                token=token,
                final=f"{rng.randrange(10_000):04d}",
                pais_emissor=rng.choice(FOREIGN_COUNTRIES) if big else "BR",
            ),
            pais_entrega="BR",
        )

    # --- observation and verdict ---------------------------------------------------------

    def observe(self, topic: str, key: bytes | None, value: bytes, timestamp_ms: int) -> None:
        decoder = self._decoders.get(topic)
        if decoder is None:
            return
        event = decoder.decode(value)
        track = self.tracks.get(event.order_id)
        if track is None:
            return  # not this run's order
        if isinstance(event, ProcessoPicking) and event.status == "concluido":
            self._terminal(track, "separado", timestamp_ms)
        elif isinstance(event, PedidoCancelado):
            self._terminal(track, event.motivo, timestamp_ms)
        elif isinstance(event, ProcessoPagamento):
            track.charged |= event.status == "aprovado"
            track.refunded |= event.status == "estornado"
        elif isinstance(event, ReservaEstoque):
            track.reserved |= event.status == "reservado"
            track.released |= event.status == "liberado"

    @staticmethod
    def _terminal(track: _Track, state: str, timestamp_ms: int) -> None:
        if track.terminal is None:
            track.terminal, track.terminal_ms = state, timestamp_ms

    def finished(self) -> bool:
        return all(t.finished for t in self.tracks.values())

    def report(self, elapsed: float, timed_out: bool) -> DemoReport:
        expected = Counter(t.expected for t in self.tracks.values())
        actual = Counter(t.terminal or UNFINISHED for t in self.tracks.values())
        states = [s for s in (*OUTCOMES, UNFINISHED) if expected[s] or actual[s]]
        table = {s: {"expected": expected[s], "actual": actual[s], "match": expected[s] == actual[s]} for s in states}
        mismatches = [
            {"order_id": order_id, "expected": t.expected, "actual": t.terminal or UNFINISHED, "problem": problem}
            for order_id, t in self.tracks.items()
            if (problem := _problem(t))
        ]
        latencies = sorted(t.terminal_ms - t.criado_ms for t in self.tracks.values() if t.terminal)
        latency = {"p50": _percentile(latencies, 0.50), "p99": _percentile(latencies, 0.99)}
        cancelled = [t for t in self.tracks.values() if t.terminal not in (None, "separado")]
        compensations = {
            "refunds_needed": sum(t.charged for t in cancelled),
            "refunds_done": sum(t.charged and t.refunded for t in cancelled),
            "releases_needed": sum(t.reserved for t in cancelled),
            "releases_done": sum(t.reserved and t.released for t in cancelled),
        }
        orders = len(self.tracks)
        ok = not timed_out and not mismatches
        data: dict[str, Any] = {
            "ok": ok,
            "orders": orders,
            "elapsed_seconds": round(elapsed, 3),
            "timed_out": timed_out,
            "throughput_orders_per_second": round(orders / elapsed, 1) if elapsed > 0 else None,
            "states": table,
            "compensations": compensations,
            "latency_ms": latency,
            "mismatches": mismatches,
        }
        return DemoReport(ok, _text(data), data)


def _items(rng: random.Random, budget: dict[str, int], prices: dict[str, int], allowance: int, big: bool) -> list[Item]:
    """Order lines taken from the remaining ``budget``: 1-4 lines within ``allowance`` units and
    well below the fraud limit, or (``big``) the dearest SKUs until far above it; none when
    the stock is used up."""
    lines: dict[str, int] = {}
    units = total = 0
    wanted = rng.randint(1, 4)
    while len(lines) < (4 if big else wanted) and not (big and total > BIG_TOTAL_CENTS):
        left = [sku for sku, n in budget.items() if n > 0 and sku not in lines]
        if not left:
            break
        if big:
            sku = max(left, key=prices.__getitem__)
            quantity = min(budget[sku], 10)
        else:
            sku = rng.choices(left, weights=[budget[s] for s in left])[0]
            wanted_units = rng.choices(list(QUANTITY_WEIGHTS), list(QUANTITY_WEIGHTS.values()))[0]
            quantity = min(wanted_units, budget[sku], max(1, allowance - units))
            if lines and (units + quantity > allowance or total + prices[sku] * quantity > SAFE_TOTAL_CENTS):
                break
        lines[sku] = quantity
        budget[sku] -= quantity
        units += quantity
        total += prices[sku] * quantity
    return [Item(sku=s, quantidade=q, preco_unitario_centavos=prices[s]) for s, q in lines.items()]


def _scarcest(catalogue: list[Produto]) -> Produto:
    """The product the out-of-stock orders ask for: the least stock, then the cheapest."""
    return min(catalogue, key=lambda p: (p.estoque, p.preco_centavos))


def _total(itens: list[Item]) -> int:
    return sum(i.quantidade * i.preco_unitario_centavos for i in itens)


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def _problem(track: _Track) -> str:
    if track.terminal is None:
        return "no terminal event"
    if track.terminal != track.expected:
        return f"ended {track.terminal}, expected {track.expected}"
    return "compensation missing: " + ", ".join(track.missing) if track.missing else ""


def _percentile(values: list[int], q: float) -> float | None:
    """Linear interpolation between the closest ranks of sorted ``values``."""
    if not values:
        return None
    position = (len(values) - 1) * q
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def _text(data: dict[str, Any]) -> str:
    lines = [
        f"kafkaworkers demo: {data['orders']} orders in {data['elapsed_seconds']:.2f} s"
        f" ({data['throughput_orders_per_second']} orders/s)" + ("  TIMED OUT" if data["timed_out"] else ""),
        "",
        f"{'state':<20}{'expected':>10}{'actual':>8}  match",
    ]
    for state, row in data["states"].items():
        lines.append(f"{state:<20}{row['expected']:>10}{row['actual']:>8}  {'yes' if row['match'] else 'NO'}")
    c = data["compensations"]
    lines += [
        "",
        f"compensations: refunds (estornado) {c['refunds_done']}/{c['refunds_needed']},"
        f" releases (liberado) {c['releases_done']}/{c['releases_needed']}",
    ]
    p50, p99 = data["latency_ms"]["p50"], data["latency_ms"]["p99"]
    if p50 is not None:
        lines.append(f"end-to-end latency (criado_em to terminal event): p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    mismatches = data["mismatches"]
    if mismatches:
        lines += ["", f"{len(mismatches)} order(s) did not end as expected (first 10):"]
        lines += [f"  {m['order_id']}: {m['problem']}" for m in mismatches[:10]]
    lines += ["", "result: OK, every order ended as expected" if data["ok"] else "result: FAILED"]
    return "\n".join(lines)


@hookimpl
def kafkaworkers_demo_scenario() -> OrderScenario:
    return OrderScenario()
