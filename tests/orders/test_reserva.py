"""reserva: all-or-nothing reservations, idempotent redelivery, release once, no overselling
under concurrent processes, and the ``stock`` command."""

from __future__ import annotations

import json
import multiprocessing
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from kafkaworkers import PluginEnv
from kafkaworkers.plugins import PluginHost
from kafkaworkers_orders import reserva
from kafkaworkers_orders.contracts import (
    PEDIDO_CANCELADO,
    PEDIDO_NOVO,
    RESERVA_ESTOQUE,
    Cartao,
    Cliente,
    Item,
    PedidoCancelado,
    PedidoNovo,
    ReservaEstoque,
    event_id_for,
)
from kafkaworkers_orders.reserva.estoque import Estoque, Produto


def pedido(order_id: str, *itens: tuple[str, int]) -> PedidoNovo:
    return PedidoNovo(
        order_id=order_id,
        cliente=Cliente(id="c1", nome="Ana", email="ana@example.com"),
        itens=[Item(sku=sku, quantidade=qtd, preco_unitario_centavos=1000) for sku, qtd in itens],
        cartao=Cartao(token="tok_aprovado", final="1234", pais_emissor="BR"),
        pais_entrega="BR",
        criado_em=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    )


def cancelado(order_id: str) -> PedidoCancelado:
    return PedidoCancelado(order_id=order_id, motivo="pagamento_recusado")


@pytest.fixture
def catalogue(tmp_path: Path) -> Path:
    path = tmp_path / "catalogo.json"
    path.write_text(
        json.dumps(
            [
                {"sku": "CAM-001", "nome": "Camiseta", "estoque": 5, "preco_centavos": 4990},
                {"sku": "TEN-001", "nome": "Tênis", "estoque": 1, "preco_centavos": 34990},
            ]
        )
    )
    return path


@pytest.fixture
def harness(kafkaworkers_harness, catalogue: Path):
    return kafkaworkers_harness(reserva.plugin, plugins={"reserva": {"catalogue": str(catalogue)}})


def estoque(harness) -> Estoque:
    """The running reserva's stock database."""
    return harness.state("reserva")


def outcomes(harness) -> list[ReservaEstoque]:
    return harness.values(RESERVA_ESTOQUE, ReservaEstoque)


def test_an_order_reserves_every_line_and_publishes_reservado(harness) -> None:
    harness.produce(PEDIDO_NOVO, pedido("p1", ("CAM-001", 2), ("TEN-001", 1)), key="p1")
    harness.run_until_idle()

    [evento] = outcomes(harness)
    assert (evento.order_id, evento.status) == ("p1", "reservado")
    assert evento.event_id == event_id_for("p1", "reserva-estoque:reservado")
    assert harness.records(RESERVA_ESTOQUE)[0].key() == b"p1"
    assert (estoque(harness).disponivel("CAM-001"), estoque(harness).disponivel("TEN-001")) == (3, 0)


def test_an_order_with_one_short_line_reserves_nothing(harness) -> None:
    harness.produce(PEDIDO_NOVO, pedido("p1", ("CAM-001", 2), ("TEN-001", 2)), key="p1")
    harness.run_until_idle()

    [evento] = outcomes(harness)
    assert evento.status == "sem_estoque"
    assert evento.motivo == "sem estoque: TEN-001 (pedidos 2, disponíveis 1)"
    assert (estoque(harness).disponivel("CAM-001"), estoque(harness).disponivel("TEN-001")) == (5, 1)


def test_repeated_lines_of_one_sku_are_reserved_as_their_sum(harness) -> None:
    harness.produce(PEDIDO_NOVO, pedido("p1", ("CAM-001", 3), ("CAM-001", 3)), key="p1")
    harness.run_until_idle()

    assert [e.status for e in outcomes(harness)] == ["sem_estoque"]
    assert estoque(harness).disponivel("CAM-001") == 5


def test_an_unknown_sku_is_sem_estoque_naming_it_and_reserves_nothing(harness) -> None:
    harness.produce(PEDIDO_NOVO, pedido("p1", ("CAM-001", 1), ("XYZ-999", 1)), key="p1")
    harness.run_until_idle()

    [evento] = outcomes(harness)
    assert (evento.status, evento.motivo) == ("sem_estoque", "SKU desconhecido: XYZ-999")
    assert estoque(harness).disponivel("CAM-001") == 5
    assert harness.records("reserva-dlq") == []


def test_a_redelivered_order_takes_stock_once_and_repeats_its_outcome(harness) -> None:
    for _ in range(3):
        harness.produce(PEDIDO_NOVO, pedido("p1", ("CAM-001", 2)), key="p1")
    harness.run_until_idle()

    eventos = outcomes(harness)
    assert [e.status for e in eventos] == ["reservado"] * 3
    assert {e.event_id for e in eventos} == {event_id_for("p1", "reserva-estoque:reservado")}
    assert estoque(harness).disponivel("CAM-001") == 3


def test_a_redelivered_out_of_stock_order_stays_out_of_stock_after_a_restock(harness, catalogue: Path) -> None:
    harness.produce(PEDIDO_NOVO, pedido("p1", ("TEN-001", 2)), key="p1")
    harness.run_until_idle()
    estoque(harness).carregar([Produto(sku="TEN-001", nome="Tênis", estoque=10)])
    harness.produce(PEDIDO_NOVO, pedido("p1", ("TEN-001", 2)), key="p1")
    harness.run_until_idle()

    assert [e.status for e in outcomes(harness)] == ["sem_estoque", "sem_estoque"]
    assert estoque(harness).disponivel("TEN-001") == 10


def test_a_cancellation_releases_the_reserved_stock_exactly_once(harness) -> None:
    harness.produce(PEDIDO_NOVO, pedido("p1", ("CAM-001", 2), ("TEN-001", 1)), key="p1")
    harness.run_until_idle()
    for _ in range(2):
        harness.produce(PEDIDO_CANCELADO, cancelado("p1"), key="p1")
    harness.run_until_idle()

    liberados = [e for e in outcomes(harness) if e.status == "liberado"]
    # The second copy re-publishes the same event (a crash could have lost the first); stock moved once.
    assert {e.event_id for e in liberados} == {event_id_for("p1", "reserva-estoque:liberado")}
    assert (estoque(harness).disponivel("CAM-001"), estoque(harness).disponivel("TEN-001")) == (5, 1)


def test_a_cancellation_of_an_order_never_reserved_publishes_nothing(harness) -> None:
    harness.produce(PEDIDO_NOVO, pedido("p1", ("TEN-001", 5)), key="p1")
    harness.run_until_idle()
    harness.produce(PEDIDO_CANCELADO, cancelado("p1"), key="p1")
    harness.run_until_idle()

    assert [e.status for e in outcomes(harness)] == ["sem_estoque"]
    assert estoque(harness).disponivel("TEN-001") == 1


def test_an_order_whose_cancellation_came_first_reserves_nothing(harness) -> None:
    harness.produce(PEDIDO_CANCELADO, cancelado("p1"), key="p1")
    harness.run_until_idle()
    harness.produce(PEDIDO_NOVO, pedido("p1", ("CAM-001", 1)), key="p1")
    harness.run_until_idle()

    assert outcomes(harness) == []
    assert estoque(harness).disponivel("CAM-001") == 5


def test_the_seed_catalogue_is_loaded_on_first_start_only(kafkaworkers_harness, tmp_path: Path) -> None:
    first = kafkaworkers_harness(reserva.plugin, data_dir=tmp_path / "data")
    seed = {p.sku: p.estoque for p in estoque(first).produtos()}
    assert len(seed) == 20 and seed["CAM-001"] > 0
    first.produce(PEDIDO_NOVO, pedido("p1", ("CAM-001", 1)), key="p1")
    first.run_until_idle()
    first.close()

    second = kafkaworkers_harness(reserva.plugin, data_dir=tmp_path / "data")
    assert estoque(second).disponivel("CAM-001") == seed["CAM-001"] - 1


# --- concurrency: real transactions of separate instances, on one file or one PostgreSQL ----


TWO = [Produto(sku="CAM-001", nome="Camiseta", estoque=10), Produto(sku="TEN-001", nome="Tênis", estoque=15)]


def test_four_instances_racing_in_threads_never_oversell(tmp_path: Path, database_url: str | None) -> None:
    env = PluginEnv("reserva", {}, tmp_path, database_url)
    seed = Estoque.open(env)
    seed.carregar(TWO)
    start = threading.Barrier(4)

    def buy(worker: int) -> list[str]:
        # A store of its own per thread, as each reserva instance has.
        db = Estoque.open(env)
        start.wait()
        try:
            itens = pedido("x", ("CAM-001", 1), ("TEN-001", 1)).itens
            return [db.reservar(f"t{worker}-{n}", itens).status for n in range(10)]
        finally:
            db.close()

    with ThreadPoolExecutor(4) as pool:
        results = [status for statuses in pool.map(buy, range(4)) for status in statuses]

    assert results.count("reservado") == 10
    assert (seed.disponivel("CAM-001"), seed.disponivel("TEN-001")) == (0, 5)


def test_the_same_order_reserved_and_released_by_two_instances_at_once_moves_stock_once(
    tmp_path: Path, database_url: str | None
) -> None:
    """As when a partition moves mid-batch: both instances handle each order and its cancellation."""
    env = PluginEnv("reserva", {}, tmp_path, database_url)
    seed = Estoque.open(env)
    seed.carregar(TWO)
    instances = [Estoque.open(env) for _ in range(2)]
    start = threading.Barrier(2)
    itens = pedido("x", ("CAM-001", 1), ("TEN-001", 2)).itens

    def run(db: Estoque) -> tuple[list[str], int]:
        start.wait()
        statuses = [db.reservar(f"o{n}", itens).status for n in range(12)]
        released = sum(db.liberar(f"o{n}") for n in range(12))
        return statuses, released

    with ThreadPoolExecutor(2) as pool:
        (a, released_a), (b, released_b) = pool.map(run, instances)

    assert a == b, "both instances read the one outcome of each order"
    assert a.count("reservado") == 7, "15 units of TEN-001 at 2 an order"
    assert released_a == released_b == 7, "each says the order's units are released"
    assert (seed.disponivel("CAM-001"), seed.disponivel("TEN-001")) == (10, 15), "and they came back once"
    for db in (seed, *instances):
        db.close()


def test_instances_seeding_at_once_seed_once_and_never_reset_taken_stock(
    tmp_path: Path, database_url: str | None
) -> None:
    env = PluginEnv("reserva", {}, tmp_path, database_url)
    first = Estoque.open(env)
    assert first.semear(TWO) == 2
    first.reservar("o1", pedido("o1", ("CAM-001", 4)).itens)
    later = Estoque.open(env)
    assert later.semear(TWO) == 0, "a later instance adds nothing"
    assert later.disponivel("CAM-001") == 6
    first.close()
    later.close()


def _buy_in_process(data_dir: str, url: str | None, prefix: str, orders: int, start: Any) -> None:
    db = Estoque.open(PluginEnv("reserva", {}, Path(data_dir), url))
    start.wait()
    for n in range(orders):
        db.reservar(f"{prefix}-{n}", pedido("x", ("CAM-001", 1), ("TEN-001", 1)).itens)
    db.close()


def test_two_processes_racing_for_the_last_units_never_oversell(tmp_path: Path, database_url: str | None) -> None:
    db = Estoque.open(PluginEnv("reserva", {}, tmp_path, database_url))
    db.carregar([Produto(sku="CAM-001", nome="Camiseta", estoque=20), Produto(sku="TEN-001", nome="Tênis", estoque=25)])
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_buy_in_process, args=(str(tmp_path), database_url, name, 30, start)) for name in ("a", "b")
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0

    reservados = db.store.db.execute("SELECT count(*) FROM reserva WHERE status = 'reservado'").fetchone()[0]
    assert reservados == 20
    assert (db.disponivel("CAM-001"), db.disponivel("TEN-001")) == (0, 5)


# --- the entry point and the stock command ----------------------------------------------


@pytest.fixture
def cli() -> click.Group:
    host = PluginHost()
    host.register(reserva, "reserva")
    group = click.Group("kafkaworkers")
    host.register_commands(group)
    return group


def test_the_module_entry_point_declares_the_plugin_and_the_stock_command(cli: click.Group) -> None:
    host = PluginHost()
    host.register(reserva, "reserva")
    assert host.plugins == {"reserva": reserva.plugin}
    assert "stock" in cli.commands


def test_stock_load_sets_counts_and_stock_show_lists_them(cli: click.Group, catalogue: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    data = str(tmp_path / "reserva")
    loaded = runner.invoke(cli, ["stock", "load", "--file", str(catalogue), "--data-dir", data])
    assert loaded.exit_code == 0, loaded.output
    assert "2 products loaded" in loaded.output
    catalogue.write_text(json.dumps([{"sku": "CAM-001", "nome": "Camiseta", "estoque": 42}]))
    assert runner.invoke(cli, ["stock", "load", "--file", str(catalogue), "--data-dir", data]).exit_code == 0

    shown = runner.invoke(cli, ["stock", "show", "--data-dir", data])
    assert shown.exit_code == 0, shown.output
    lines = [line.split() for line in shown.output.splitlines()]
    assert lines == [["CAM-001", "42", "Camiseta"], ["TEN-001", "1", "Tênis"]]


def test_stock_load_and_show_use_the_shared_database_when_there_is_one(
    cli: click.Group, catalogue: Path, tmp_path: Path, pg_server
) -> None:
    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}").replace("@", ":hunter2@", 1)
    runner = CliRunner(env={"KAFKAWORKERS_DATABASE_URL": url, "KAFKAWORKERS_DATA_DIR": str(tmp_path / "host-a")})
    loaded = runner.invoke(cli, ["stock", "load", "--file", str(catalogue)])
    assert loaded.exit_code == 0, loaded.output
    assert "2 products loaded into PostgreSQL schema reserva_estoque" in loaded.output
    assert "hunter2" not in loaded.output
    elsewhere = CliRunner(env={"KAFKAWORKERS_DATABASE_URL": url, "KAFKAWORKERS_DATA_DIR": str(tmp_path / "host-b")})
    shown = elsewhere.invoke(cli, ["stock", "show"])
    assert shown.exit_code == 0, shown.output
    assert [line.split()[:2] for line in shown.output.splitlines()] == [["CAM-001", "5"], ["TEN-001", "1"]]
    assert not (tmp_path / "host-a" / "reserva" / "estoque.sqlite3").exists()


def test_stock_load_without_a_file_loads_the_seed_catalogue(cli: click.Group, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["stock", "load", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "20 products loaded" in result.output


def test_stock_load_rejects_an_invalid_catalogue_naming_the_problem(cli: click.Group, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"sku": "CAM-001", "nome": "Camiseta", "estoque": -1}]))
    result = CliRunner().invoke(cli, ["stock", "load", "--file", str(bad), "--data-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "not a valid catalogue" in result.output and "estoque" in result.output


def test_stock_show_without_a_database_says_to_load_first(cli: click.Group, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["stock", "show", "--data-dir", str(tmp_path / "none")])
    assert result.exit_code != 0
    assert "kafkaworkers stock load" in result.output
