"""relatorios: the DuckDB warehouse, the plugin on the in-memory broker, and ``kafkaworkers report``."""

from __future__ import annotations

import json
import random
import re
import sqlite3
import subprocess
import uuid
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kafkaworkers_orders import relatorios
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
)
from kafkaworkers_orders.relatorios.warehouse import FILE_NAME, Warehouse
from tests.conftest import KW

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def pedido(order_id: str, cents: int = 10_000) -> PedidoNovo:
    return PedidoNovo(
        order_id=order_id,
        event_id=f"{order_id}-novo",
        occurred_at=T0,
        cliente=Cliente(id="CLI-1", nome="João Lima", email="joao@exemplo.com.br"),
        itens=[Item(sku="CAM-001", quantidade=1, preco_unitario_centavos=cents)],
        cartao=Cartao(token="tok_aprovado", final="0001", pais_emissor="BR"),
        pais_entrega="BR",
        criado_em=T0,
    )


def separado(order_id: str, cents: int, pay: float, fraud: float, picking: float) -> list[tuple[str, Event]]:
    """Every event of an order that was picked, with its milestones ``pay``/``fraud``/``picking`` s after creation."""
    return [
        (PEDIDO_NOVO, pedido(order_id, cents)),
        (RESERVA_ESTOQUE, ReservaEstoque(order_id=order_id, event_id=f"{order_id}-res", status="reservado",
                                           occurred_at=at(0.5))),
        (PROCESSO_PAGAMENTO, ProcessoPagamento(order_id=order_id, event_id=f"{order_id}-pag", status="aprovado",
                                               valor_centavos=cents, occurred_at=at(pay))),
        (FRAUDE_VERIFICADO, FraudeVerificado(order_id=order_id, event_id=f"{order_id}-fra", fraude=False, score=5,
                                             occurred_at=at(fraud))),
        (PROCESSO_PICKING, ProcessoPicking(order_id=order_id, event_id=f"{order_id}-pi", status="iniciado",
                                           occurred_at=at(picking))),
        (PROCESSO_PICKING, ProcessoPicking(order_id=order_id, event_id=f"{order_id}-pc", status="concluido",
                                           occurred_at=at(9))),
    ]  # fmt: skip


def fraude(order_id: str, cents: int) -> list[tuple[str, Event]]:
    """An order judged fraud after it was charged and reserved: cancelled, refunded, released."""
    return [
        (PEDIDO_NOVO, pedido(order_id, cents)),
        (RESERVA_ESTOQUE, ReservaEstoque(order_id=order_id, event_id=f"{order_id}-res", status="reservado",
                                           occurred_at=at(0.5))),
        (PROCESSO_PAGAMENTO, ProcessoPagamento(order_id=order_id, event_id=f"{order_id}-pag", status="aprovado",
                                               valor_centavos=cents, occurred_at=at(4))),
        (FRAUDE_VERIFICADO, FraudeVerificado(order_id=order_id, event_id=f"{order_id}-fra", fraude=True, score=90,
                                             occurred_at=at(4))),
        (PEDIDO_CANCELADO, PedidoCancelado(order_id=order_id, event_id=f"{order_id}-can", motivo="fraude",
                                           occurred_at=at(5))),
        (PROCESSO_PAGAMENTO, ProcessoPagamento(order_id=order_id, event_id=f"{order_id}-est", status="estornado",
                                               valor_centavos=cents, occurred_at=at(6))),
        (RESERVA_ESTOQUE, ReservaEstoque(order_id=order_id, event_id=f"{order_id}-lib", status="liberado",
                                           occurred_at=at(6))),
    ]  # fmt: skip


def sem_estoque(order_id: str, cents: int) -> list[tuple[str, Event]]:
    return [
        (PEDIDO_NOVO, pedido(order_id, cents)),
        (
            RESERVA_ESTOQUE,
            ReservaEstoque(order_id=order_id, event_id=f"{order_id}-res", status="sem_estoque", occurred_at=at(0.5)),
        ),
        (
            PEDIDO_CANCELADO,
            PedidoCancelado(order_id=order_id, event_id=f"{order_id}-can", motivo="sem_estoque", occurred_at=at(1)),
        ),
    ]


@pytest.fixture
def warehouse(tmp_path: Path):
    store = Warehouse(tmp_path / FILE_NAME)
    yield store
    store.close()


def fill(store: Warehouse, events: list[tuple[str, Event]]) -> None:
    for topic, event in events:
        store.record(topic, event)


def rows(store: Warehouse, table: str) -> list[tuple]:
    return store.db.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()


def known_set() -> list[tuple[str, Event]]:
    return [
        *separado("A", 10_000, pay=1, fraud=2, picking=3),
        *separado("B", 30_000, pay=3, fraud=4, picking=5),
        *fraude("C", 550_000),
        *sem_estoque("D", 5_000),
    ]


def test_the_same_event_twice_is_one_row_and_changes_nothing(warehouse):
    events = separado("A", 10_000, pay=1, fraud=2, picking=3)
    fill(warehouse, events)
    before = rows(warehouse, "eventos"), rows(warehouse, "pedidos")

    assert [warehouse.record(topic, event) for topic, event in events] == [False] * len(events)
    assert (rows(warehouse, "eventos"), rows(warehouse, "pedidos")) == before
    assert len(before[0]) == len(events)


def test_order_state_follows_the_facts_whatever_order_they_arrive_in(warehouse):
    rng = random.Random(3)
    for n in range(20):
        events = fraude(f"C{n}", 550_000)
        rng.shuffle(events)
        fill(warehouse, events)

    outcomes = {row[1:-1] for row in rows(warehouse, "pedidos")}  # all but order_id and atualizado_em
    assert len(outcomes) == 1
    assert outcomes.pop()[0] == "cancelado"


def test_state_moves_from_in_progress_to_picking_to_separado(warehouse):
    events = separado("A", 10_000, pay=1, fraud=2, picking=3)

    def estado() -> str:
        return warehouse.db.execute("SELECT estado FROM pedidos WHERE order_id = 'A'").fetchone()[0]

    fill(warehouse, events[:4])
    assert estado() == "em_andamento"
    fill(warehouse, events[4:5])
    assert estado() == "em_separacao"
    fill(warehouse, events[5:])
    assert estado() == "separado"


def test_summary_numbers_on_a_known_set_of_orders(warehouse):
    fill(warehouse, known_set())
    summary = warehouse.summary()

    assert summary["orders"] == 4
    assert summary["by_state"] == {"separado": 2, "cancelado: fraude": 1, "cancelado: sem_estoque": 1}
    assert summary["revenue_approved_cents"] == 10_000 + 30_000 + 550_000
    assert summary["revenue_refunded_cents"] == 550_000
    assert summary["revenue_net_cents"] == 40_000
    assert (summary["fraud_orders"], summary["fraud_verdicts"], summary["fraud_rate"]) == (1, 3, 1 / 3)
    assert (summary["out_of_stock_orders"], summary["reservations"], summary["out_of_stock_rate"]) == (1, 4, 0.25)
    payment = summary["latency_seconds"]["payment"]
    # quantile_cont over 1, 3, 4 s: interpolated between ranks.
    assert payment["orders"] == 3
    assert payment["p50"] == pytest.approx(3.0)
    assert payment["p95"] == pytest.approx(3.9)
    assert payment["p99"] == pytest.approx(3.98)
    assert summary["latency_seconds"]["picking started"]["p50"] == pytest.approx(4.0)
    assert summary["latency_seconds"]["fraud verdict"]["orders"] == 3


def test_plugin_records_every_topic_once_on_redelivery(kafkaworkers_harness):
    harness = kafkaworkers_harness(relatorios.plugin)
    loaded = []
    for _ in range(2):
        for topic, event in known_set():
            harness.produce(topic, event, key=event.order_id)
        harness.run_until_idle()
        loaded.append(harness.state("relatorios").flush())

    assert loaded == [len(known_set()), 0]
    store = harness.state("relatorios").warehouse
    assert store.db.execute("SELECT topico, count(*) FROM eventos GROUP BY ALL ORDER BY 1").fetchall() == [
        (FRAUDE_VERIFICADO, 3), (PEDIDO_CANCELADO, 2), (PEDIDO_NOVO, 4), (PROCESSO_PAGAMENTO, 4),
        (PROCESSO_PICKING, 4), (RESERVA_ESTOQUE, 5),
    ]  # fmt: skip
    assert store.summary()["by_state"] == {"separado": 2, "cancelado: fraude": 1, "cancelado: sem_estoque": 1}


def test_events_a_crashed_worker_left_buffered_are_reported_then_loaded_on_start(kafkaworkers_harness, tmp_path):
    first = kafkaworkers_harness(relatorios.plugin)
    for topic, event in known_set():
        first.produce(topic, event, key=event.order_id)
    first.run_until_idle()
    # What a kill -9 leaves behind: the buffer committed, the warehouse without its events.
    crashed = tmp_path / "crashed"
    left = crashed / "relatorios"
    left.mkdir(parents=True)
    buffer = Path(first.settings.data_dir) / "relatorios" / relatorios.BUFFER_FILE
    with closing(sqlite3.connect(buffer)) as source, closing(sqlite3.connect(left / buffer.name)) as copy:
        source.backup(copy)
    Warehouse(left / FILE_NAME).close()
    first.close()

    result = CliRunner().invoke(cli(), ["report", "--format", "json", "--data-dir", str(left)])
    summary = json.loads(result.output)
    assert (summary["orders"], summary["pending_events"]) == (0, len(known_set()))

    restarted = kafkaworkers_harness(relatorios.plugin, data_dir=crashed)
    assert restarted.state("relatorios").warehouse.summary()["orders"] == 4


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    directory = tmp_path / "relatorios"
    directory.mkdir()
    store = Warehouse(directory / FILE_NAME)
    fill(store, known_set())
    store.close()
    return directory


def cli() -> click.Group:
    group = click.Group()
    relatorios.kafkaworkers_register_commands(group)
    return group


def test_report_table_is_readable(filled):
    result = CliRunner().invoke(cli(), ["report", "--data-dir", str(filled)])

    assert result.exit_code == 0, result.output
    lines = {re.split(r"\s{2,}", line.strip())[0]: line for line in result.output.splitlines() if line}
    assert lines["Orders"].split() == ["Orders", "4"]
    assert lines["Revenue approved"].endswith("R$ 5.900,00")
    assert lines["Revenue refunded"].endswith("R$ 5.500,00")
    assert lines["Fraud rate"].endswith("33.3 %   1 of 3 verdicts")
    assert lines["Out-of-stock rate"].endswith("25.0 %   1 of 4 reservations")
    assert lines["to payment"].split() == ["to", "payment", "3.000", "s", "3.900", "s", "3.980", "s", "3"]
    # Every value column ends in the same place.
    assert len({len(lines[label]) for label in ("Orders", "Revenue approved", "Revenue net")}) == 1


def test_report_reads_the_settings_data_dir_by_default(filled):
    env = {"KAFKAWORKERS_DATA_DIR": str(filled.parent)}
    result = CliRunner(env=env).invoke(cli(), ["report", "--format", "json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["orders"] == 4


def test_report_command_of_the_installed_cli_prints_json(filled):
    done = subprocess.run(
        [KW, "report", "--format", "json", "--data-dir", str(filled)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["revenue_net_cents"] == 40_000
    assert summary["latency_seconds"]["payment"]["p50"] == pytest.approx(3.0)


def test_report_without_a_warehouse_says_where_it_looked(tmp_path):
    done = subprocess.run([KW, "report", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"kafkaworkers: error: no warehouse at {tmp_path / FILE_NAME};"
        " run the relatorios plugin first or pass --data-dir"
    )


# --- several instances sharing one database ------------------------------------------------


def test_instances_sharing_a_database_each_record_their_events_and_the_report_holds_them_all(
    kafkaworkers_harness, pg_server, tmp_path
):
    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    a, b = (kafkaworkers_harness(relatorios.plugin, data_dir=tmp_path / host, database_url=url) for host in ("a", "b"))
    events = known_set()
    # Each instance gets every other event (the topics' partitions split between them), and a
    # few events reach both (a partition moving while a batch was in flight).
    for n, (topic, event) in enumerate(events):
        for harness in (a, b) if n % 5 == 0 else ((a, b)[n % 2],):
            harness.produce(topic, event, key=event.order_id)
    a.run_until_idle()
    b.run_until_idle()

    assert not (tmp_path / "a" / "relatorios" / FILE_NAME).exists(), "no warehouse file on the workers"
    env = {"KAFKAWORKERS_DATABASE_URL": url, "KAFKAWORKERS_DATA_DIR": str(tmp_path / "elsewhere")}
    result = CliRunner(env=env).invoke(cli(), ["report", "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["by_state"] == {"separado": 2, "cancelado: fraude": 1, "cancelado: sem_estoque": 1}
    assert summary["revenue_net_cents"] == 40_000
    assert summary["latency_seconds"]["payment"]["p50"] == pytest.approx(3.0), "each event counted once"
