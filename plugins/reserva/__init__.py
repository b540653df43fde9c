"""reserva: reserves each new order's stock all-or-nothing, and releases it when the order is cancelled.

Consumes ``pedido-novo`` and ``pedido-cancelado``, publishes ``reserva-estoque``; the stock
lives in ``<data_dir>/reserva/estoque.sqlite3``, or with ``database_url`` in the PostgreSQL
schema ``reserva_estoque`` that every instance shares (see :mod:`.estoque`), seeded from the
catalogue by whichever instance starts first.

Choices:

- An order naming an unknown SKU is answered ``sem_estoque`` with the motivo
  ``SKU desconhecido: X`` rather than dead-lettered, so the order still reaches a terminal
  state (cancelled) instead of waiting forever for a reservation.
- Every event is re-published on redelivery with the same deterministic event id: a crash
  between the transaction and the broker's acknowledgement must not lose it, and consumers
  drop the copy by its id. Stock moves only once per order.
- A cancellation that arrives before its order (the topics are not ordered with each other)
  leaves a mark, so the late order reserves nothing and publishes nothing.

The module is the entry point because it implements two hooks: the plugin declaration and
the ``stock`` command (``kafkaworkers stock load`` / ``kafkaworkers stock show``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import click
import msgspec

from kafkaworkers import Context, Plugin, PluginEnv, hookimpl
from kafkaworkers.config import load_settings, redact_url
from kafkaworkers.stores import namespace
from kafkaworkers_orders.contracts import (
    PEDIDO_CANCELADO,
    PEDIDO_NOVO,
    RESERVA_ESTOQUE,
    PedidoCancelado,
    PedidoNovo,
    ReservaEstoque,
    event_id_for,
)
from kafkaworkers_orders.reserva.estoque import STORE, Estoque, read_catalogue

__all__ = ["kafkaworkers_declare", "kafkaworkers_register_commands", "load_stock", "plugin", "stock"]

CATALOGUE = Path(__file__).with_name("catalogo.json")

plugin: Plugin[Estoque] = Plugin(
    "reserva",
    produces={RESERVA_ESTOQUE: ReservaEstoque},
    description="Reserves order stock all-or-nothing; releases it on cancellation.",
)


@plugin.on_start
def start(env: PluginEnv) -> Estoque:
    estoque = Estoque.open(env)
    if not estoque.produtos():
        estoque.semear(read_catalogue(Path(env.config.get("catalogue", CATALOGUE))))
    return estoque


@plugin.on_stop
def stop(estoque: Estoque) -> None:
    estoque.close()


@plugin.around_batch
def batch(estoque: Estoque) -> AbstractContextManager[None]:
    return estoque.store.batch()


@plugin.consumes(PEDIDO_NOVO)
def reservar(pedido: PedidoNovo, ctx: Context[Estoque]) -> None:
    resultado = ctx.state.reservar(pedido.order_id, pedido.itens)
    if resultado is not None:
        ctx.produce(RESERVA_ESTOQUE, _evento(pedido.order_id, resultado.status, resultado.motivo))


@plugin.consumes(PEDIDO_CANCELADO)
def liberar(cancelado: PedidoCancelado, ctx: Context[Estoque]) -> None:
    if ctx.state.liberar(cancelado.order_id):
        ctx.produce(RESERVA_ESTOQUE, _evento(cancelado.order_id, "liberado", f"pedido cancelado: {cancelado.motivo}"))


def _evento(order_id: str, status: str, motivo: str) -> ReservaEstoque:
    return ReservaEstoque(
        order_id=order_id,
        status=status,  # type: ignore[arg-type]
        motivo=motivo,
        event_id=event_id_for(order_id, f"{RESERVA_ESTOQUE}:{status}"),
    )


def load_stock(env: PluginEnv, catalogue_json_path: Path) -> int:
    """Set the stock of every product in a catalogue file, adding new ones; how many."""
    db = Estoque.open(env)
    try:
        return db.carregar(read_catalogue(catalogue_json_path))
    finally:
        db.close()


_data_dir = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The reserva data directory [default: the settings' data_dir/reserva].",
)


def _env(data_dir: Path | None) -> PluginEnv:
    """The plugin's environment as a worker would make it: its data directory or its database."""
    settings = load_settings()
    directory = data_dir or Path(settings.data_dir) / plugin.name
    return PluginEnv(
        plugin.name, settings.plugin_config(plugin.name), directory, settings.database_url_for(plugin.name)
    )


def _where(env: PluginEnv) -> str:
    return (
        f"PostgreSQL schema {namespace(plugin.name, STORE)} ({redact_url(env.database_url)})"
        if env.database_url
        else str(env.data_dir / f"{STORE}.sqlite3")
    )


@click.group()
def stock() -> None:
    """The reserva service's stock: load counts from a catalogue, show what is available."""


@stock.command()
@click.option(
    "--file",
    "catalogue",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=CATALOGUE,
    help="A catalogue JSON file: [{sku, nome, estoque, preco_centavos}] [default: the seed catalogue].",
)
@_data_dir
def load(catalogue: Path, data_dir: Path | None) -> None:
    """Set each listed product's stock to the file's count (new SKUs are added)."""
    env = _env(data_dir)
    try:
        count = load_stock(env, catalogue)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise click.ClickException(f"{catalogue}: not a valid catalogue: {exc}") from None
    click.echo(f"{count} products loaded into {_where(env)}")


@stock.command()
@_data_dir
def show(data_dir: Path | None) -> None:
    """List every product with the units not reserved."""
    env = _env(data_dir)
    if not env.database_url and not (env.data_dir / f"{STORE}.sqlite3").exists():
        raise click.ClickException(f"no stock database at {_where(env)}; run `kafkaworkers stock load` first")
    db = Estoque.open(env)
    try:
        produtos = db.produtos()
    finally:
        db.close()
    for p in produtos:
        click.echo(f"{p.sku:<12} {p.estoque:>7}  {p.nome}")


@hookimpl
def kafkaworkers_declare() -> Plugin[Estoque]:
    return plugin


@hookimpl
def kafkaworkers_register_commands(cli: click.Group) -> None:
    cli.add_command(stock)
