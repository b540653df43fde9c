"""The topology's layout: every node placed once, data flowing left to right."""

from __future__ import annotations

import itertools
import random
import re

from kafkaworkers.plugins import PluginHost
from kafkaworkers.topology import Topology
from kafkaworkers.ui.graph import Drawing, draw


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


def points_of(path: str) -> list[list[tuple[float, float]]]:
    """An SVG path of M, L and C commands (absolute) as polylines, each curve sampled finely."""
    lines: list[list[tuple[float, float]]] = []
    for command, args in re.findall(r"([MLC])\s*([-0-9.,\s]*)", path):
        numbers = [float(n) for n in re.findall(r"-?[0-9.]+", args)]
        pairs = list(zip(numbers[::2], numbers[1::2], strict=True))
        if command == "M":
            lines.append([pairs[0]])
            continue
        if command == "L":
            lines[-1] += pairs
            continue
        (x0, y0), (c1x, c1y), (c2x, c2y), (x3, y3) = lines[-1][-1], *pairs
        for i in range(1, 101):
            t = i / 100
            u = 1 - t
            lines[-1].append((
                u**3 * x0 + 3 * u**2 * t * c1x + 3 * u * t**2 * c2x + t**3 * x3,
                u**3 * y0 + 3 * u**2 * t * c1y + 3 * u * t**2 * c2y + t**3 * y3,
            ))  # fmt: skip
    return lines


def crossed_boxes(drawing: Drawing) -> list[tuple[str, str, str]]:
    """(source, target, box) for every arrow that passes through a box other than its two ends."""
    crossings = []
    for edge in drawing.edges:
        ends = {("topic" if edge.kind == "consumes" else "plugin", edge.source),
                ("plugin" if edge.kind == "consumes" else "topic", edge.target)}  # fmt: skip
        for line in points_of(edge.path):
            for (x1, y1), (x2, y2) in itertools.pairwise(line):
                steps = max(1, int(max(abs(x2 - x1), abs(y2 - y1))))  # a point every pixel along the segment
                for i in range(steps + 1):
                    x, y = x1 + (x2 - x1) * i / steps, y1 + (y2 - y1) * i / steps
                    assert 0 <= x <= drawing.width and 0 <= y <= drawing.height, (edge, x, y)
                    for node in drawing.nodes:
                        inside = node.x < x < node.x + node.width and node.y < y < node.y + node.height
                        if inside and node.key not in ends:
                            crossings.append((edge.source, edge.target, node.name))
    return sorted(set(crossings))


def random_topology(rng: random.Random) -> Topology:
    """Plugins reading earlier topics and writing later ones, some reading back (cycles), some skipping far."""
    topics = [f"t{n}" for n in range(rng.randint(4, 12))]
    consumes: dict[str, dict[str, str]] = {}
    produces: dict[str, dict[str, str]] = {}
    for n in range(rng.randint(3, 10)):
        plugin = f"p{n}"
        reads = rng.sample(topics, rng.randint(1, 3))
        writes = rng.sample(topics, rng.randint(0, 3))
        consumes[plugin] = dict.fromkeys(reads, "T")
        produces[plugin] = dict.fromkeys(writes, "T")
    return Topology(consumes, produces)


def test_no_arrow_passes_through_a_box_but_its_own_two_ends_in_the_order_pipeline() -> None:
    host = PluginHost()
    host.load_entry_points()
    drawing = draw(Topology.of(host.plugins.values()))
    assert any("L" in e.path for e in drawing.edges), "the pipeline has arrows that skip columns"
    assert crossed_boxes(drawing) == []


def test_no_arrow_passes_through_a_box_in_random_topologies_with_skips_and_cycles() -> None:
    seed = random.randrange(2**32)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(40):
        topology = random_topology(rng)
        assert crossed_boxes(draw(topology)) == [], (seed, topology)
