"""The topology drawn from declarations."""

from __future__ import annotations

import json

import msgspec
from click.testing import CliRunner

from kafkaworkers import Plugin
from kafkaworkers.cli import cli
from kafkaworkers.plugins import PluginHost, type_name
from kafkaworkers.topology import Topology


class M(msgspec.Struct):
    x: int


class Narrow(msgspec.Struct):
    """A reader's own view of M's messages: only the field it needs."""

    x: int


def test_loose_ends_are_reported() -> None:
    first = Plugin("first", produces={"middle": M, "nowhere": M})
    first.consumes("input", M)(lambda m, c: None)
    second = Plugin("second")
    second.consumes("middle", M)(lambda m, c: None)
    graph = Topology.of([second, first])
    assert graph.unproduced == ["input"]
    assert graph.unconsumed == ["nowhere"]
    assert "t_input --> p_first" in graph.mermaid()
    assert '"p_first" -> "t_middle";' in graph.dot()
    assert "# produced but consumed by no plugin: nowhere" in graph.text()


def auditoria() -> list[Plugin]:
    """A plugin named like the topic it produces."""
    plugin = Plugin("auditoria", produces={"auditoria": M})
    plugin.consumes("pedido-novo", M)(lambda m, c: None)
    return [plugin]


def test_a_plugin_and_a_topic_of_one_name_are_two_nodes_in_every_format() -> None:
    graph = Topology.of(auditoria())
    mermaid = graph.mermaid().splitlines()
    assert '  t_auditoria[("auditoria")]' in mermaid
    assert '  p_auditoria["auditoria"]' in mermaid
    assert "  t_pedido_2dnovo --> p_auditoria" in mermaid
    assert "  p_auditoria --> t_auditoria" in mermaid
    dot = graph.dot().splitlines()
    assert '  "t_auditoria" [label="auditoria", shape=cylinder];' in dot
    assert '  "p_auditoria" [label="auditoria", shape=box];' in dot
    assert '  "p_auditoria" -> "t_auditoria";' in dot
    data = json.loads(graph.json())
    assert data["plugins"]["auditoria"]["produces"] == {"auditoria": type_name(M)}
    assert data["topics"] == ["auditoria", "pedido-novo"]


def test_node_ids_of_distinct_names_stay_distinct() -> None:
    plugin = Plugin("p", produces={"a.b": M, "a_b": M, "a-b": M})
    mermaid = Topology.of([plugin]).mermaid()
    assert {"t_a_2eb", "t_a_5fb", "t_a_2db"} <= set(mermaid.replace("[", " ").split())


def readers_of_one_topic() -> list[Plugin]:
    wide = Plugin("wide")
    wide.consumes("orders", M)(lambda m, c: None)
    narrow = Plugin("narrow")
    narrow.consumes("orders", Narrow)(lambda m, c: None)
    same = Plugin("same")
    same.consumes("shared", M)(lambda m, c: None)
    also = Plugin("also")
    also.consumes("shared", M)(lambda m, c: None)
    return [wide, narrow, same, also]


def test_readers_of_one_topic_with_different_types_are_reported_in_every_format() -> None:
    graph = Topology.of(readers_of_one_topic())
    assert graph.readers_differ == {"orders": {"narrow": type_name(Narrow), "wide": type_name(M)}}
    note = f"read with different types: orders: narrow as {type_name(Narrow)}, wide as {type_name(M)}"
    assert f"# {note}" in graph.text().splitlines()
    assert f"%% {note}" in graph.mermaid().splitlines()
    assert f"// {note}" in graph.dot().splitlines()
    assert json.loads(graph.json())["readers_differ"] == graph.readers_differ
    assert graph.text().count("read with different types") == 1, "readers that agree are not reported"


def test_the_topology_command_draws_what_the_host_holds() -> None:
    host = PluginHost()
    for plugin in auditoria():
        host.register(plugin)
    result = CliRunner().invoke(cli, ["topology", "--format", "dot"], obj=host)
    assert result.exit_code == 0, result.output
    assert '"p_auditoria" -> "t_auditoria";' in result.output
    shown = CliRunner().invoke(cli, ["topology", "--format", "json"], obj=host)
    assert json.loads(shown.output)["plugins"]["auditoria"]["consumes"] == {"pedido-novo": type_name(M)}
