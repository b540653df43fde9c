"""The topology drawn from declarations."""

from __future__ import annotations

import msgspec

from kafkaworkers import Plugin
from kafkaworkers.topology import Topology


class M(msgspec.Struct):
    x: int


def test_loose_ends_are_reported() -> None:
    first = Plugin("first", produces={"middle": M, "nowhere": M})
    first.consumes("input", M)(lambda m, c: None)
    second = Plugin("second")
    second.consumes("middle", M)(lambda m, c: None)
    graph = Topology.of([second, first])
    assert graph.unproduced == ["input"]
    assert graph.unconsumed == ["nowhere"]
    assert "n_input --> n_first" in graph.mermaid()
    assert '"first" -> "middle";' in graph.dot()
    assert "# produced but consumed by no plugin: nowhere" in graph.text()
