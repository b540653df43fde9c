"""The topology as positioned boxes and curves, for the console to draw as inline SVG.

Nodes are laid out in columns by their longest path from a topic nothing produces, so data
flows left to right; a cycle (a plugin that feeds a topic read upstream) is cut where the
walk meets it. Drawn on the server: the page needs no script and no library from anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from kafkaworkers.topology import Topology

__all__ = ["Drawing", "Edge", "Node", "draw"]

_COLUMN = 210
_ROW = 64
_WIDTH = 160
_HEIGHT = 36
_MARGIN = 16


@dataclass(frozen=True)
class Node:
    """A plugin or a topic at its place: ``x``, ``y`` of the top-left corner."""

    kind: str  # "plugin" or "topic"
    name: str
    x: int
    y: int
    width: int = _WIDTH
    height: int = _HEIGHT

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.name


@dataclass(frozen=True)
class Edge:
    """A consume (topic -> plugin) or produce (plugin -> topic) arrow, as an SVG path."""

    kind: str  # "consumes" or "produces"
    source: str
    target: str
    path: str


@dataclass(frozen=True)
class Drawing:
    width: int
    height: int
    nodes: list[Node]
    edges: list[Edge]


def draw(topology: Topology) -> Drawing:
    """Place every plugin and topic of ``topology`` and route the arrows between them."""
    arrows: list[tuple[tuple[str, str], tuple[str, str], str]] = []
    for plugin, topics in topology.consumes.items():
        arrows += [(("topic", t), ("plugin", plugin), "consumes") for t in topics]
    for plugin, topics in topology.produces.items():
        arrows += [(("plugin", plugin), ("topic", t), "produces") for t in topics]
    keys = [("topic", t) for t in topology.topics] + [("plugin", p) for p in topology.consumes]
    rank = _ranks(keys, [(a, b) for a, b, _ in arrows])
    columns: dict[int, list[tuple[str, str]]] = {}
    for key in keys:
        columns.setdefault(rank[key], []).append(key)
    _order_rows(columns, [(a, b) for a, b, _ in arrows])
    nodes: dict[tuple[str, str], Node] = {}
    for column, members in sorted(columns.items()):
        for row, (kind, name) in enumerate(members):
            nodes[(kind, name)] = Node(kind, name, _MARGIN + column * _COLUMN, _MARGIN + row * _ROW)
    edges = [Edge(kind, a[1], b[1], _curve(nodes[a], nodes[b])) for a, b, kind in arrows]
    width = _MARGIN * 2 + (max(columns, default=0)) * _COLUMN + _WIDTH
    height = _MARGIN * 2 + max((len(m) for m in columns.values()), default=1) * _ROW - (_ROW - _HEIGHT)
    return Drawing(width, height, list(nodes.values()), edges)


def _ranks(
    keys: list[tuple[str, str]], arrows: list[tuple[tuple[str, str], tuple[str, str]]]
) -> dict[tuple[str, str], int]:
    """Each node's column: the longest path to it, ignoring arrows that close a cycle."""
    after: dict[tuple[str, str], list[tuple[str, str]]] = {k: [] for k in keys}
    for a, b in arrows:
        after[a].append(b)
    rank = dict.fromkeys(keys, 0)
    state: dict[tuple[str, str], int] = {}  # 1 on the current walk, 2 finished
    order: list[tuple[str, str]] = []

    def visit(node: tuple[str, str]) -> None:
        state[node] = 1
        for nxt in after[node]:
            if state.get(nxt) is None:
                visit(nxt)
        state[node] = 2
        order.append(node)

    for key in keys:
        if state.get(key) is None:
            visit(key)
    position = {node: i for i, node in enumerate(reversed(order))}
    for node in reversed(order):
        for nxt in after[node]:
            if position[nxt] > position[node]:  # a forward arrow; a back arrow closes a cycle
                rank[nxt] = max(rank[nxt], rank[node] + 1)
    return rank


def _order_rows(
    columns: dict[int, list[tuple[str, str]]], arrows: list[tuple[tuple[str, str], tuple[str, str]]]
) -> None:
    """Sort each column by the mean row of the nodes feeding it (the barycenter heuristic), fewer crossings."""
    before: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for a, b in arrows:
        before.setdefault(b, []).append(a)
    row: dict[tuple[str, str], float] = {}
    for column in sorted(columns):
        members = columns[column]
        for key in members:
            fed = [row[a] for a in before.get(key, []) if a in row]
            row[key] = sum(fed) / len(fed) if fed else float(members.index(key))
        members.sort(key=lambda k: row[k])
        for i, key in enumerate(members):
            row[key] = float(i)


def _curve(a: Node, b: Node) -> str:
    """A cubic curve from the right side of ``a`` to the left side of ``b`` (or back round)."""
    x1, y1 = a.x + a.width, a.y + a.height // 2
    x2, y2 = b.x, b.y + b.height // 2
    bend = max(40, abs(x2 - x1) // 2)
    return f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
