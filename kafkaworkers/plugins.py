"""The plugin host: loads plugins through entry points and calls their hooks.

The only module that talks to pluggy. The rest of the framework calls the typed methods
of :class:`PluginHost`, so hook names live in one place and an unimplemented per-message
hook is skipped without a call.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from kafkaworkers import hookspecs
from kafkaworkers.api import Plugin
from kafkaworkers.errors import PluginError

if TYPE_CHECKING:
    import click
    from prometheus_client import CollectorRegistry

    from kafkaworkers.demo import DemoScenario
    from kafkaworkers.transports import Message, TopicPartition
    from kafkaworkers.worker import Worker

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kafkaworkers"
#: Comma-separated entry-point names that must not be loaded (a broken or unwanted plugin).
DISABLE_ENV = "KAFKAWORKERS_DISABLE_PLUGINS"


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """Where a loaded plugin came from, for ``kafkaworkers plugins``."""

    name: str
    distribution: str
    version: str


class PluginHost:
    """Loads plugins, validates their declarations, and calls their hooks."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager("kafkaworkers")
        self._pm.add_hookspecs(hookspecs)
        self._sources: dict[str, PluginInfo] = {}
        self._plugins: dict[str, Plugin] | None = None

    # --- loading ---------------------------------------------------------------------

    def load_entry_points(self) -> None:
        """Load every plugin of the ``kafkaworkers`` entry-point group, except disabled ones."""
        disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or ep.name in disabled:
                    continue
                if self._pm.get_plugin(ep.name) is not None:
                    other = self._sources.get(ep.name)
                    where = other.distribution if other else "an earlier registration"
                    raise PluginError(
                        f"two plugins are named {ep.name!r}: one from {where},"
                        f" one from {dist.metadata['Name']}; uninstall one or disable it with"
                        f" {DISABLE_ENV}"
                    )
                try:
                    obj = ep.load()
                except Exception as exc:
                    raise PluginError(
                        f"plugin {ep.name!r} from {dist.metadata['Name']} failed to import: {type(exc).__name__}: {exc}"
                    ) from exc
                self.register(obj, ep.name)
                self._sources[ep.name] = PluginInfo(ep.name, dist.metadata["Name"], dist.version)

    def register(self, obj: object, name: str | None = None) -> None:
        """Register a plugin object or module directly (tests, embedding)."""
        try:
            self._pm.register(obj, name)
        except ValueError as exc:
            raise PluginError(f"plugin {name or obj!r} is registered twice: {exc}") from exc
        self._plugins = None
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self._pm.unregister(obj)
            raise PluginError(
                f"plugin {name or obj!r} implements a hook that does not exist: {exc};"
                " see docs/plugins.md for the hook names"
            ) from exc

    # --- declarations ----------------------------------------------------------------

    @property
    def plugins(self) -> dict[str, Plugin]:
        """Every declared worker plugin by name, validated against each other."""
        if self._plugins is None:
            self._plugins = _validate(p for p in self._pm.hook.kafkaworkers_declare() if p is not None)
        return self._plugins

    def select(self, names: Iterable[str]) -> list[Plugin]:
        """The named plugins, or a :class:`PluginError` that lists what is installed."""
        found = []
        for name in names:
            if name not in self.plugins:
                installed = ", ".join(sorted(self.plugins)) or "none"
                raise PluginError(
                    f"unknown plugin {name!r}; installed: {installed}."
                    " Install it with pip or check `kafkaworkers plugins`"
                )
            found.append(self.plugins[name])
        return found

    def info(self, name: str) -> PluginInfo:
        """The distribution a plugin was installed from (``<registered>`` if not from one)."""
        for info in self._sources.values():
            obj = self._pm.get_plugin(info.name)
            declared = getattr(obj, "name", None) if isinstance(obj, Plugin) else None
            if info.name == name or declared == name:
                return info
        return PluginInfo(name, "<registered>", "")

    # --- hooks -----------------------------------------------------------------------

    def has_impl(self, hook: str) -> bool:
        """Whether any plugin implements ``hook``; the worker skips per-message hooks without one."""
        return bool(getattr(self._pm.hook, hook).get_hookimpls())

    def register_commands(self, cli: click.Group) -> None:
        self._pm.hook.kafkaworkers_register_commands(cli=cli)

    def demo_scenario(self) -> DemoScenario | None:
        return self._pm.hook.kafkaworkers_demo_scenario()

    def register_metrics(self, registry: CollectorRegistry, plugin: Plugin) -> None:
        self._pm.hook.kafkaworkers_register_metrics(registry=registry, plugin=plugin)

    def worker_started(self, worker: Worker) -> None:
        self._pm.hook.kafkaworkers_worker_started(worker=worker)

    def worker_stopping(self, worker: Worker) -> None:
        self._pm.hook.kafkaworkers_worker_stopping(worker=worker)

    def partitions_assigned(self, plugin: Plugin, partitions: list[TopicPartition]) -> None:
        self._pm.hook.kafkaworkers_partitions_assigned(plugin=plugin, partitions=partitions)

    def partitions_revoked(self, plugin: Plugin, partitions: list[TopicPartition]) -> None:
        self._pm.hook.kafkaworkers_partitions_revoked(plugin=plugin, partitions=partitions)

    def batch_received(self, plugin: Plugin, messages: list[Message]) -> None:
        self._pm.hook.kafkaworkers_batch_received(plugin=plugin, messages=messages)

    def message_handled(self, plugin: Plugin, message: Message, value: Any) -> None:
        self._pm.hook.kafkaworkers_message_handled(plugin=plugin, message=message, value=value)

    def message_failed(self, plugin: Plugin, message: Message, error: BaseException, outcome: str) -> None:
        self._pm.hook.kafkaworkers_message_failed(plugin=plugin, message=message, error=error, outcome=outcome)


def hook_names() -> list[str]:
    """Every hook a plugin may implement."""
    return sorted(n for n in dir(hookspecs) if n.startswith("kafkaworkers_"))


def _validate(declared: Iterable[Plugin]) -> dict[str, Plugin]:
    plugins: dict[str, Plugin] = {}
    types: dict[str, tuple[type, str]] = {}
    for plugin in declared:
        if not isinstance(plugin, Plugin):
            raise PluginError(f"kafkaworkers_declare returned {plugin!r}, not a kafkaworkers.Plugin")
        if plugin.name in plugins:
            raise PluginError(f"two plugins declare the name {plugin.name!r}; plugin names must be unique")
        plugins[plugin.name] = plugin
        declarations = [(s.topic, s.type) for s in plugin.subscriptions.values()]
        declarations += list(plugin.produced.items())
        for topic, typ in declarations:
            seen = types.setdefault(topic, (typ, plugin.name))
            if seen[0] is not typ:
                raise PluginError(
                    f"topic {topic!r} has two types: {_qualname(seen[0])} in plugin {seen[1]!r}"
                    f" and {_qualname(typ)} in plugin {plugin.name!r}; both must use one contract"
                )
    return plugins


def _qualname(typ: type) -> str:
    return f"{typ.__module__}.{getattr(typ, '__qualname__', typ)}"
