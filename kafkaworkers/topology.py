"""The graph of plugins and topics, drawn from what the installed plugins declare."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kafkaworkers.api import Plugin

__all__ = ["Topology"]


@dataclass(frozen=True)
class Topology:
    """Edges topic -> plugin (consumes) and plugin -> topic (produces)."""

    consumes: dict[str, list[str]]
    produces: dict[str, list[str]]

    @classmethod
    def of(cls, plugins: Iterable[Plugin]) -> Topology:
        consumes: dict[str, list[str]] = {}
        produces: dict[str, list[str]] = {}
        for plugin in sorted(plugins, key=lambda p: p.name):
            consumes[plugin.name] = sorted(plugin.subscriptions)
            produces[plugin.name] = sorted(plugin.produced)
        return cls(consumes, produces)

    @property
    def topics(self) -> list[str]:
        return sorted({t for ts in [*self.consumes.values(), *self.produces.values()] for t in ts})

    @property
    def unproduced(self) -> list[str]:
        """Topics some plugin consumes but none produces: fed from outside, or a missing producer."""
        produced = {t for ts in self.produces.values() for t in ts}
        return sorted({t for ts in self.consumes.values() for t in ts} - produced)

    @property
    def unconsumed(self) -> list[str]:
        """Topics some plugin produces but none consumes: read outside, or a missing consumer."""
        consumed = {t for ts in self.consumes.values() for t in ts}
        return sorted({t for ts in self.produces.values() for t in ts} - consumed)

    def text(self) -> str:
        lines = []
        for plugin in self.consumes:
            lines.append(f"{plugin}")
            lines.extend(f"  <- {t}" for t in self.consumes[plugin])
            lines.extend(f"  -> {t}" for t in self.produces[plugin])
        return "\n".join(lines + self._warnings("# "))

    def mermaid(self) -> str:
        lines = ["flowchart LR"]
        lines.extend(f'  {_id(t)}[("{t}")]' for t in self.topics)
        lines.extend(f"  {_id(p)}[{p}]" for p in self.consumes)
        for plugin, topics in self.consumes.items():
            lines.extend(f"  {_id(t)} --> {_id(plugin)}" for t in topics)
        for plugin, topics in self.produces.items():
            lines.extend(f"  {_id(plugin)} --> {_id(t)}" for t in topics)
        return "\n".join(lines + self._warnings("%% "))

    def dot(self) -> str:
        lines = ["digraph kafkaworkers {", "  rankdir=LR;"]
        lines.extend(f'  "{t}" [shape=cylinder];' for t in self.topics)
        lines.extend(f'  "{p}" [shape=box];' for p in self.consumes)
        for plugin, topics in self.consumes.items():
            lines.extend(f'  "{t}" -> "{plugin}";' for t in topics)
        for plugin, topics in self.produces.items():
            lines.extend(f'  "{plugin}" -> "{t}";' for t in topics)
        return "\n".join([*lines, "}", *self._warnings("// ")])

    def _warnings(self, prefix: str) -> list[str]:
        out = [f"{prefix}consumed but produced by no plugin: {t}" for t in self.unproduced]
        return out + [f"{prefix}produced but consumed by no plugin: {t}" for t in self.unconsumed]


def _id(name: str) -> str:
    return "n_" + "".join(c if c.isalnum() else "_" for c in name)
