"""The graph of plugins and topics, drawn from what the installed plugins declare.

Plugins and topics live in separate namespaces (a plugin may be named like a topic), so
every drawing gives them distinct node ids: ``p_<name>`` and ``t_<name>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kafkaworkers.api import Plugin
from kafkaworkers.plugins import type_name

__all__ = ["Topology"]


@dataclass(frozen=True)
class Topology:
    """Edges topic -> plugin (consumes) and plugin -> topic (produces), each with its declared type.

    :param consumes: plugin -> topic it reads -> the type it decodes the topic with.
    :param produces: plugin -> topic it writes -> the type it writes.
    """

    consumes: dict[str, dict[str, str]]
    produces: dict[str, dict[str, str]]

    @classmethod
    def of(cls, plugins: Iterable[Plugin[Any]]) -> Topology:
        consumes: dict[str, dict[str, str]] = {}
        produces: dict[str, dict[str, str]] = {}
        for plugin in sorted(plugins, key=lambda p: p.name):
            consumes[plugin.name] = {t: type_name(s.type) for t, s in sorted(plugin.subscriptions.items())}
            produces[plugin.name] = {t: type_name(typ) for t, typ in sorted(plugin.produced.items())}
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

    @property
    def readers_differ(self) -> dict[str, dict[str, str]]:
        """Topics whose readers decode them with different types: topic -> plugin -> type.

        Allowed (a type that decodes the bytes is all a consumer needs), but worth knowing
        when the producer's contract changes.
        """
        readers: dict[str, dict[str, str]] = {}
        for plugin, topics in self.consumes.items():
            for topic, typ in topics.items():
                readers.setdefault(topic, {})[plugin] = typ
        return {t: r for t, r in sorted(readers.items()) if len(set(r.values())) > 1}

    def text(self) -> str:
        lines = []
        for plugin in self.consumes:
            lines.append(f"{plugin}")
            lines.extend(f"  <- {t}  ({typ})" for t, typ in self.consumes[plugin].items())
            lines.extend(f"  -> {t}  ({typ})" for t, typ in self.produces[plugin].items())
        return "\n".join(lines + self._warnings("# "))

    def json(self) -> str:
        data: dict[str, Any] = {
            "plugins": {p: {"consumes": self.consumes[p], "produces": self.produces[p]} for p in self.consumes},
            "topics": self.topics,
            "unproduced": self.unproduced,
            "unconsumed": self.unconsumed,
            "readers_differ": self.readers_differ,
        }
        return json.dumps(data, indent=2)

    def mermaid(self) -> str:
        lines = ["flowchart LR"]
        lines.extend(f'  {_topic_id(t)}[("{t}")]' for t in self.topics)
        lines.extend(f'  {_plugin_id(p)}["{p}"]' for p in self.consumes)
        for plugin, topics in self.consumes.items():
            lines.extend(f"  {_topic_id(t)} --> {_plugin_id(plugin)}" for t in topics)
        for plugin, topics in self.produces.items():
            lines.extend(f"  {_plugin_id(plugin)} --> {_topic_id(t)}" for t in topics)
        return "\n".join(lines + self._warnings("%% "))

    def dot(self) -> str:
        lines = ["digraph kafkaworkers {", "  rankdir=LR;"]
        lines.extend(f'  "{_topic_id(t)}" [label="{t}", shape=cylinder];' for t in self.topics)
        lines.extend(f'  "{_plugin_id(p)}" [label="{p}", shape=box];' for p in self.consumes)
        for plugin, topics in self.consumes.items():
            lines.extend(f'  "{_topic_id(t)}" -> "{_plugin_id(plugin)}";' for t in topics)
        for plugin, topics in self.produces.items():
            lines.extend(f'  "{_plugin_id(plugin)}" -> "{_topic_id(t)}";' for t in topics)
        return "\n".join([*lines, "}", *self._warnings("// ")])

    def _warnings(self, prefix: str) -> list[str]:
        out = [f"{prefix}consumed but produced by no plugin: {t}" for t in self.unproduced]
        out += [f"{prefix}produced but consumed by no plugin: {t}" for t in self.unconsumed]
        for topic, readers in self.readers_differ.items():
            types = ", ".join(f"{plugin} as {typ}" for plugin, typ in readers.items())
            out.append(f"{prefix}read with different types: {topic}: {types}")
        return out


def _plugin_id(name: str) -> str:
    return "p_" + _escape(name)


def _topic_id(name: str) -> str:
    return "t_" + _escape(name)


def _escape(name: str) -> str:
    """Letters and digits as they are, anything else as ``_`` and its code: distinct names keep distinct ids."""
    return "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in name)
