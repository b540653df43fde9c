"""The topology as positioned boxes and arrows, for the console to draw as inline SVG.

Nodes are laid out in columns by their longest path from a topic nothing produces, so data
flows left to right; a cycle (a plugin that feeds a topic read upstream) is cut where the
walk meets it. Drawn on the server: the page needs no script and no library from anywhere.

Boxes sit on one grid, so the strips between columns and between rows hold no box. An arrow
between neighbouring columns is a curve within the strip between them; one that skips
columns, or goes back against the flow, leaves its box into the strip beside it, runs along
the strip between two rows (the one nearest both ends) and enters its target from the strip
before that: it never crosses a box. Arrows sharing a strip take tracks a few pixels apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from kafkaworkers.topology import Topology

__all__ = ["Drawing", "Edge", "Node", "draw"]

_WIDTH = 160
_HEIGHT = 36
#: The least room between two columns, and between two rows; round the grid, the margin.
_COLUMN_GAP = 50
_ROW_GAP = 28
_MARGIN = 16
#: Space between tracks in a strip; the last stretch into a box (room for the arrowhead).
_TRACK = 6
_LEAD = 14


#: A strip (the n-th between columns or rows) and a track in it.
_Track = tuple[int, int]


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
    row = {key: i for members in columns.values() for i, key in enumerate(members)}
    rows = max((len(m) for m in columns.values()), default=1)
    # First the strips each arrow runs along (their tracks counted), then the grid sized to fit them.
    routes: list[tuple[_Track, _Track, _Track] | None] = []
    gaps: dict[int, int] = {}
    lanes: dict[int, int] = {}
    for a, b, _ in arrows:
        if rank[b] == rank[a] + 1:
            routes.append(None)  # a curve within the strip between the two columns
            continue
        out, into = rank[a], rank[b] - 1  # strip n lies after column n
        lane = min(range(rows + 1), key=lambda r: (abs(2 * r - 2 * row[a] - 1) + abs(2 * r - 2 * row[b] - 1), r))
        routes.append((_take(gaps, out), _take(gaps, into), _take(lanes, lane)))
    last = max(columns, default=0)
    xs = [_MARGIN + _strip(gaps.get(-1, 0), 0)]
    for column in range(last):
        xs.append(xs[-1] + _WIDTH + _strip(gaps.get(column, 0), _COLUMN_GAP))
    ys = [_MARGIN + _strip(lanes.get(0, 0), 0)]
    for r in range(1, rows):
        ys.append(ys[-1] + _HEIGHT + _strip(lanes.get(r, 0), _ROW_GAP))
    nodes = {
        (kind, name): Node(kind, name, xs[column], ys[i])
        for column, members in sorted(columns.items())
        for i, (kind, name) in enumerate(members)
    }
    # Where each strip ends: a column strip at the next column, a row strip at the next row.
    column_ends = {g: xs[g + 1] for g in range(-1, last)}
    column_ends[last] = xs[-1] + _WIDTH + _strip(gaps.get(last, 0), 0)
    row_ends = {r: ys[r] for r in range(rows)}
    row_ends[rows] = ys[-1] + _HEIGHT + _strip(lanes.get(rows, 0), 0)

    def lane_y(lane: int, track: int) -> int:
        """Tracks centred in the strip above row ``lane``."""
        width = _strip(lanes[lane], _ROW_GAP if 0 < lane < rows else 0)
        return row_ends[lane] - width + (width - (lanes[lane] - 1) * _TRACK) // 2 + track * _TRACK

    edges = []
    for (a, b, kind), route in zip(arrows, routes, strict=True):
        if route is None:
            path = _curve(nodes[a], nodes[b])
        else:
            (out, out_track), (into, in_track), (lane, lane_track) = route
            out_x = column_ends[out] - _LEAD - out_track * _TRACK
            in_x = column_ends[into] - _LEAD - in_track * _TRACK
            path = _around(nodes[a], nodes[b], out_x, in_x, lane_y(lane, lane_track))
        edges.append(Edge(kind, a[1], b[1], path))
    width = column_ends[last] + _MARGIN
    height = row_ends[rows] + _MARGIN
    return Drawing(width, height, list(nodes.values()), edges)


def _take(strips: dict[int, int], strip: int) -> _Track:
    """The next free track of a strip: (strip, track)."""
    track = strips.get(strip, 0)
    strips[strip] = track + 1
    return strip, track


def _strip(tracks: int, least: int) -> int:
    """How wide a strip must be for ``tracks`` arrows side by side, clear of the boxes on either side."""
    return max(least, _LEAD + tracks * _TRACK) if tracks else least


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


def _around(a: Node, b: Node, out_x: int, in_x: int, lane_y: int) -> str:
    """Out of ``a`` to ``out_x`` in the strip after its column, along ``lane_y`` in a strip between
    rows, into ``b`` from ``in_x`` in the strip before its column: straight segments through
    strips that hold no box."""
    y1, y2 = a.y + a.height // 2, b.y + b.height // 2
    points = [(a.x + a.width, y1), (out_x, y1), (out_x, lane_y), (in_x, lane_y), (in_x, y2), (b.x, y2)]
    return "M" + " L".join(f"{x},{y}" for x, y in points)


def _curve(a: Node, b: Node) -> str:
    """A cubic curve from the right side of ``a`` to the left side of ``b`` (or back round)."""
    x1, y1 = a.x + a.width, a.y + a.height // 2
    x2, y2 = b.x, b.y + b.height // 2
    bend = max(40, abs(x2 - x1) // 2)
    return f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
