"""``kafkaworkers report`` as a user runs it: the default relative data directory, and columns that never touch."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kafkaworkers_orders import relatorios
from kafkaworkers_orders.relatorios.warehouse import FILE_NAME, Warehouse, render
from tests.orders.test_relatorios import fill, known_set


def cli() -> click.Group:
    group = click.Group()
    relatorios.kafkaworkers_register_commands(group)
    return group


def test_report_reads_the_default_relative_data_dir_with_a_buffer_in_it(kafkaworkers_harness, tmp_path, monkeypatch):
    # A worker that ran from this directory with the default data_dir ("data") leaves both files there.
    monkeypatch.chdir(tmp_path)
    harness = kafkaworkers_harness(relatorios.plugin, data_dir=Path("data"))
    for topic, event in known_set():
        harness.produce(topic, event, key=event.order_id)
    harness.run_until_idle()
    harness.close()
    assert (tmp_path / "data" / "relatorios" / relatorios.BUFFER_FILE).is_file()

    result = CliRunner(env={"KAFKAWORKERS_DATA_DIR": None}).invoke(cli(), ["report"])

    assert result.exit_code == 0, result.output
    assert re.search(r"^Orders\s+4$", result.output, re.MULTILINE), result.output


@pytest.fixture
def summary(tmp_path: Path) -> dict:
    store = Warehouse(tmp_path / FILE_NAME)
    fill(store, known_set())
    data = store.summary()
    store.close()
    return data


def test_report_latency_columns_stay_apart_however_long_the_wait(summary):
    # Waits of an hour and of a year: values as wide as a column, and wider.
    summary["latency_seconds"]["payment"].update(p50=3816.081, p95=3816.084, p99=3816.09)
    summary["latency_seconds"]["fraud check"] = {"p50": 31_536_000.5, "p95": 31_536_000.5, "p99": None, "orders": 1}

    lines = render(summary).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Time from order creation"))
    table = lines[header:]

    assert table[1].split() == ["to", "payment", "3816.081", "s", "3816.084", "s", "3816.090", "s", "3"]
    assert "31536000.500 s  31536000.500 s" in table[-1]
    # Every row, header included, is as long as the others: the columns line up.
    assert len({len(line) for line in table}) == 1, table
