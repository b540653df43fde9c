"""The topology's layout: every node placed once, data flowing left to right."""

from __future__ import annotations

from kafkaworkers.topology import Topology
from kafkaworkers.ui.graph import draw


def chain() -> Topology:
    """orders -> billing -> invoices -> mailer, and audit reading orders and invoices."""
    return Topology(
        consumes={"audit": {"invoices": "I", "orders": "O"}, "billing": {"orders": "O"}, "mailer": {"invoices": "I"}},
        produces={"audit": {}, "billing": {"invoices": "I"}, "mailer": {}},
    )


def test_every_plugin_and_topic_is_one_node_and_every_declaration_one_edge() -> None:
    drawing = draw(chain())
    assert sorted(n.key for n in drawing.nodes) == [
        ("plugin", "audit"), ("plugin", "billing"), ("plugin", "mailer"), ("topic", "invoices"), ("topic", "orders"),
    ]  # fmt: skip
    assert sorted((e.kind, e.source, e.target) for e in drawing.edges) == [
        ("consumes", "invoices", "audit"), ("consumes", "invoices", "mailer"), ("consumes", "orders", "audit"),
        ("consumes", "orders", "billing"), ("produces", "billing", "invoices"),
    ]  # fmt: skip
    places = {(n.x, n.y) for n in drawing.nodes}
    assert len(places) == len(drawing.nodes), "no two nodes on one spot"
    assert all(n.x + n.width <= drawing.width and n.y + n.height <= drawing.height for n in drawing.nodes)


def test_data_flows_left_to_right_along_the_longest_path() -> None:
    x = {n.name: n.x for n in draw(chain()).nodes}
    assert x["orders"] < x["billing"] < x["invoices"] < x["mailer"]
    assert x["audit"] == x["mailer"], "audit sits after the last topic it reads"


def test_a_cycle_is_cut_and_still_drawn() -> None:
    loop = Topology(consumes={"a": {"t1": "T"}, "b": {"t2": "T"}}, produces={"a": {"t2": "T"}, "b": {"t1": "T"}})
    drawing = draw(loop)
    assert len(drawing.nodes) == 4 and len(drawing.edges) == 4
    assert len({n.x for n in drawing.nodes}) == 4, "one column each along the cut cycle"
