"""``kafkaworkers schema``, ``sample`` and ``produce --dry-run``/``--key``: a topic's type as users meet it."""

from __future__ import annotations

import enum
import json
import os
import random
import re
import uuid
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import pytest
from click.testing import CliRunner, Result
from msgspec import Meta

from kafkaworkers.cli import cli
from kafkaworkers.plugins import PluginHost
from kafkaworkers.samples import examples
from kafkaworkers.topics import KeyFieldError, message_key
from kafkaworkers.transports.memory import MemoryTransport
from kafkaworkers_orders.contracts import FraudeVerificado, PedidoNovo

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("KAFKAWORKERS_TEST_SEED", random.randrange(2**32)))
print(f"tests/test_samples.py seed: {SEED} (KAFKAWORKERS_TEST_SEED={SEED} replays it)")


def kw(*args: str, input: str | bytes | None = None) -> Result:
    host = PluginHost()
    host.load_entry_points()
    host.register_commands(cli)
    return CliRunner().invoke(cli, list(args), obj=host, input=input)


def order_topics() -> list[str]:
    host = PluginHost()
    host.load_entry_points()
    order_plugins = [p for name, p in host.plugins.items() if host.info(name).distribution == "kafkaworkers-orders"]
    assert order_plugins, "the order plugins are not installed"
    return sorted({t for p in order_plugins for t in [*p.subscriptions, *p.produced]})


@pytest.mark.parametrize("topic", order_topics())
def test_sample_output_passes_produce_dry_run(topic):
    sampled = kw("sample", topic, "--count", "25", "--seed", str(SEED))
    assert sampled.exit_code == 0, sampled.output
    assert len(sampled.stdout.splitlines()) == 25

    checked = kw("produce", topic, "--dry-run", "--key", "order_id", "-b", "memory://unused", input=sampled.stdout)

    assert checked.exit_code == 0, checked.output
    assert checked.stdout.strip() == f"25 valid for {topic}, 0 rejected (dry run: nothing sent)"


def test_sample_is_the_same_for_the_same_seed_and_differs_for_another():
    first = kw("sample", "pedido-novo", "-n", "5", "--seed", str(SEED)).stdout
    assert kw("sample", "pedido-novo", "-n", "5", "--seed", str(SEED)).stdout == first
    assert kw("sample", "pedido-novo", "-n", "5", "--seed", str(SEED + 1)).stdout != first
    assert len(set(first.splitlines())) == 5


def test_schema_prints_the_declared_types_json_schema():
    result = kw("schema", "fraude-verificado")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == msgspec.json.schema(FraudeVerificado)


def test_schema_of_an_undeclared_topic_is_one_line():
    result = kw("schema", "pedido-nuevo")
    assert result.exit_code == 1
    assert result.stderr.startswith("kafkaworkers: error: no installed plugin declares topic 'pedido-nuevo'")


def test_dry_run_reports_each_bad_line_by_number_and_sends_nothing():
    url = f"memory://dry-{uuid.uuid4().hex[:8]}"
    assert kw("topics", "create", "-b", url).exit_code == 0
    good = examples(PedidoNovo, 2, SEED)
    bad_order = json.loads(good[1])
    bad_order["itens"] = []
    lines = [good[0].decode(), "not json", "", json.dumps(bad_order), good[1].decode()]

    result = kw("produce", "pedido-novo", "--dry-run", "-b", url, input="\n".join(lines) + "\n")

    assert result.exit_code == 1
    rejected = result.stderr.splitlines()
    assert rejected[0].startswith("kafkaworkers: error: rejected line 2: JSON is malformed")
    assert rejected[1].startswith("kafkaworkers: error: rejected line 4: Expected `array` of length >= 1")
    assert result.stdout.strip() == "2 valid for pedido-novo, 2 rejected (dry run: nothing sent)"
    assert MemoryTransport.named(url.removeprefix("memory://")).broker.records("pedido-novo") == []


def test_examples_orders_file_is_valid():
    orders = str(ROOT / "examples/orders.jsonl")
    result = kw("produce", "pedido-novo", "--dry-run", "--key", "order_id", "--file", orders)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"\d+ valid for pedido-novo, 0 rejected \(dry run: nothing sent\)\n", result.stdout)


# --- --key ------------------------------------------------------------------------------------


def test_key_field_keys_each_message():
    url = f"memory://key-{uuid.uuid4().hex[:8]}"
    assert kw("topics", "create", "-b", url).exit_code == 0
    lines = examples(PedidoNovo, 3, SEED)

    result = kw("produce", "pedido-novo", "--key", "order_id", "-b", url, input=b"\n".join(lines))

    assert result.exit_code == 0, result.output
    records = MemoryTransport.named(url.removeprefix("memory://")).broker.records("pedido-novo")
    assert sorted(r.key() for r in records) == sorted(json.loads(line)["order_id"].encode() for line in lines)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("nope", "kafkaworkers: error: --key nope: PedidoNovo has no field 'nope'; its fields: order_id, event_id,"),
        ("cliente", "kafkaworkers: error: --key cliente: PedidoNovo.cliente is an object;"
                    " a key must be a string or integer field"),
        ("itens", "kafkaworkers: error: --key itens: PedidoNovo.itens is an array;"),
        ("criado_em", "kafkaworkers: error: --key criado_em: PedidoNovo.criado_em is a datetime;"),
    ],
)  # fmt: skip
def test_key_field_that_cannot_make_a_key_stops_before_sending(field, message):
    url = f"memory://key-{uuid.uuid4().hex[:8]}"
    assert kw("topics", "create", "-b", url).exit_code == 0
    result = kw("produce", "pedido-novo", "--key", field, "-b", url, input=b"\n".join(examples(PedidoNovo, 2, SEED)))

    assert result.exit_code == 1
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert MemoryTransport.named(url.removeprefix("memory://")).broker.records("pedido-novo") == []


def test_a_boolean_field_is_no_key():
    result = kw("produce", "fraude-verificado", "--key", "fraude", "-b", "memory://unused", input="")
    assert result.exit_code == 1
    assert "FraudeVerificado.fraude is a boolean; a key must be a string or integer field" in result.stderr


class Optional_(msgspec.Struct):
    id: str | None = None
    n: int = 0


def test_a_line_whose_key_field_is_null_is_rejected_by_number():
    with pytest.raises(KeyFieldError, match="key field 'id' is null"):
        message_key(Optional_(), "id")
    assert message_key(Optional_(id="a"), "id") == b"a"
    assert message_key(Optional_(n=7), "n") == b"7"


# --- examples of assorted types -----------------------------------------------------------------


class Cor(enum.Enum):
    AZUL = "azul"
    VERDE = "verde"


class Gato(msgspec.Struct, tag="gato"):
    nome: Annotated[str, Meta(pattern=r"^(Mi|Fe)[a-z]{2,4}$")]


class Cao(msgspec.Struct, tag="cao"):
    latidos: Annotated[int, Meta(ge=1, le=9, multiple_of=3)]


class Tudo(msgspec.Struct):
    codigo: Annotated[str, Meta(pattern=r"^[^@\s]{3}-\d{2}\w?$", max_length=8)]
    peso: Annotated[float, Meta(gt=0, lt=1)]
    cor: Cor
    tipo: Literal["a", "b"]
    animal: Gato | Cao
    id: uuid.UUID
    tags: Annotated[set[str], Meta(min_length=2)]
    extras: dict[str, int]
    talvez: int | None
    par: tuple[int, str]
    curto: Annotated[str, Meta(min_length=2, max_length=3)]


def test_examples_meet_patterns_bounds_tags_and_lengths():
    values = [msgspec.json.decode(raw, type=Tudo) for raw in examples(Tudo, 50, SEED)]

    assert all(re.search(r"^[^@\s]{3}-\d{2}\w?$", v.codigo) for v in values)
    assert all(0 < v.peso < 1 and len(v.tags) >= 2 and 2 <= len(v.curto) <= 3 for v in values)
    assert {type(v.animal) for v in values} == {Gato, Cao}
    assert all(v.animal.latidos in (3, 6, 9) for v in values if isinstance(v.animal, Cao))
