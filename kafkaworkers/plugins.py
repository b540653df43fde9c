"""The plugin host: loads plugins through entry points and calls their hooks.

The only module that talks to pluggy. The rest of the framework calls the typed methods
of :class:`PluginHost`, so hook names live in one place and an unimplemented per-message
hook is skipped without a call.

A plugin that cannot be used (it fails to import, shares its name with another, implements
a hook that does not exist, or produces a topic with another type than a second producer)
is recorded as broken and left out; every other plugin and every command keeps working,
and ``kafkaworkers plugins`` shows the error.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import pluggy

from kafkaworkers import hookspecs
from kafkaworkers.api import Plugin
from kafkaworkers.errors import PluginError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import click
    from prometheus_client import CollectorRegistry

    from kafkaworkers.demo import DemoScenario
    from kafkaworkers.transports import Headers, Message, TopicPartition
    from kafkaworkers.worker import Worker

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kafkaworkers"
#: Comma-separated entry points that must not be loaded: ``NAME`` (from any distribution)
#: or ``DISTRIBUTION:NAME`` (one of two distributions that use the same name).
DISABLE_ENV = "KAFKAWORKERS_DISABLE_PLUGINS"


def _tracing_on() -> bool:
    """OpenTelemetry tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter and
    ``OTEL_SDK_DISABLED`` is not ``true`` (the README's Tracing section says why)."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return exporter not in ("", "none") and os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"


#: Built-in plugins: name -> (module, whether it is switched on). Each is loaded like an
#: installed plugin (``KAFKAWORKERS_DISABLE_PLUGINS`` applies) through its module's
#: ``plugin()``, and only when switched on: a feature that is off implements no hook, so it
#: costs nothing per message.
BUILTINS: dict[str, tuple[str, Callable[[], bool]]] = {"tracing": ("kafkaworkers.tracing", _tracing_on)}


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """Where a loaded plugin came from, for ``kafkaworkers plugins``."""

    name: str
    distribution: str
    version: str


@dataclass(frozen=True, slots=True)
class BrokenPlugin:
    """A plugin left out because it cannot be used, and why.

    :param name: the entry-point (or registration) name, which is also what ``--plugin`` takes.
    :param distribution: the distribution it came from, ``<registered>`` if none.
    :param version: that distribution's version.
    :param error: one line that names the problem, the distributions involved and the way out.
    """

    name: str
    distribution: str
    version: str
    error: str


REGISTERED = PluginInfo("", "<registered>", "")


class PluginHost:
    """Loads plugins, validates their declarations, and calls their hooks."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager("kafkaworkers")
        self._pm.add_hookspecs(hookspecs)
        self._sources: dict[str, PluginInfo] = {}
        self._broken: list[BrokenPlugin] = []
        self._plugins: dict[str, Plugin[Any]] | None = None
        # declared plugin name -> the registration that declared it
        self._declared_by: dict[str, str] = {}
        #: called with (observer plugin, hook) when an observer hook raises (a metric)
        self.on_observer_error: Callable[[str, str], None] | None = None

    # --- loading ---------------------------------------------------------------------

    def load_entry_points(self) -> None:
        """Load every plugin of the ``kafkaworkers`` entry-point group, except disabled ones.

        Never raises for a plugin's fault: an entry point that fails to import, or a name two
        distributions use, is recorded as broken (see :attr:`broken`) and the others load.
        The built-in plugins that are switched on (:data:`BUILTINS`) load first, the same way.
        """
        self._load_builtins()
        found: dict[str, list[tuple[importlib.metadata.EntryPoint, PluginInfo]]] = {}
        for dist in importlib.metadata.distributions():
            dist_name = dist.metadata["Name"]
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or _disabled(ep.name, dist_name):
                    continue
                candidates = found.setdefault(ep.name, [])
                # The same distribution seen twice on sys.path is one plugin, not a clash.
                if all(_canonical(info.distribution) != _canonical(dist_name) for _, info in candidates):
                    candidates.append((ep, PluginInfo(ep.name, dist_name, dist.version)))
        for name, candidates in found.items():
            infos = [info for _, info in candidates]
            if self._pm.has_plugin(name):
                infos.insert(0, self._source(name))
            if len(infos) > 1:
                self._duplicate_entry_point(name, infos)
                continue
            ep, info = candidates[0]
            try:
                obj = ep.load()
            except Exception as exc:
                reason = f"failed to import: {type(exc).__name__}: {exc}; fix or uninstall {info.distribution}"
                self._break(info, reason)
                continue
            try:
                self.register(obj, name)
            except PluginError as exc:
                self._break(info, str(exc).removeprefix(f"plugin {name!r} "))
                continue
            self._sources[name] = info

    def _load_builtins(self) -> None:
        for name, (module, switched_on) in BUILTINS.items():
            if not switched_on() or _disabled(name, "kafkaworkers") or self._pm.has_plugin(name):
                continue
            info = PluginInfo(name, "kafkaworkers", importlib.metadata.version("kafkaworkers"))
            try:
                obj = importlib.import_module(module).plugin()
            except ImportError as exc:
                self._break(info, f"is switched on but cannot be imported ({exc}); pip install kafkaworkers[otel]")
                continue
            except Exception as exc:
                self._break(info, f"is switched on but failed to load: {type(exc).__name__}: {exc}")
                continue
            self.register(obj, name)
            self._sources[name] = info

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

    def _duplicate_entry_point(self, name: str, infos: list[PluginInfo]) -> None:
        """Load none of two plugins of one name: which one ran would depend on sys.path order."""
        if self._pm.has_plugin(name):
            self._pm.unregister(name=name)
            self._plugins = None
        ways = " or ".join(f"{DISABLE_ENV}={i.distribution}:{name}" for i in infos if i is not REGISTERED)
        reason = (
            f"is one of {len(infos)} plugins named {name!r}, from {' and '.join(_where(i) for i in infos)};"
            f" uninstall one, or disable one with {ways}"
        )
        for info in infos:
            self._break(PluginInfo(name, info.distribution, info.version), reason)

    def _break(self, info: PluginInfo, reason: str) -> None:
        error = f"plugin {info.name!r} ({_where(info)}) {reason}"
        if DISABLE_ENV not in error:
            error += f"; disable it with {DISABLE_ENV}={info.name}"
        self._broken.append(BrokenPlugin(info.name, info.distribution, info.version, error))

    # --- declarations ----------------------------------------------------------------

    @property
    def plugins(self) -> dict[str, Plugin[Any]]:
        """Every usable worker plugin by name; the unusable ones are in :attr:`broken`."""
        if self._plugins is None:
            self._plugins = self._declare()
        return self._plugins

    @property
    def broken(self) -> list[BrokenPlugin]:
        """Every plugin left out, with why, in the order they were found."""
        self.plugins  # noqa: B018 - declaring may break plugins too
        return list(self._broken)

    def check(self) -> None:
        """Raise :class:`PluginError` if any plugin is broken.

        For embedders and the test harness, where a broken plugin is a bug to fix rather
        than an installation to work around.
        """
        if self.broken:
            raise PluginError("; ".join(b.error for b in self._broken))

    def select(self, names: Iterable[str]) -> list[Plugin[Any]]:
        """The named plugins, or a :class:`PluginError` saying why one is broken or what is installed."""
        found = []
        for name in names:
            if name not in self.plugins:
                broken = [b for b in self._broken if b.name == name]
                if broken:
                    raise PluginError(broken[0].error)
                installed = ", ".join(sorted(self.plugins)) or "none"
                close = difflib.get_close_matches(name, self.plugins, n=1)
                guess = f" did you mean {close[0]!r}?" if close else ""
                raise PluginError(
                    f"unknown plugin {name!r};{guess} installed: {installed}."
                    " Install it with pip or check `kafkaworkers plugins`"
                )
            found.append(self.plugins[name])
        return found

    def info(self, name: str) -> PluginInfo:
        """The distribution a plugin was installed from (``<registered>`` if not from one)."""
        self.plugins  # noqa: B018 - maps declared names to registrations
        source = self._source(self._declared_by.get(name, name))
        return PluginInfo(name, source.distribution, source.version)

    def _declare(self) -> dict[str, Plugin[Any]]:
        """Ask each registration for its plugin on its own, so that a failure breaks only that one."""
        declared: dict[str, list[str]] = {}
        plugins: dict[str, Plugin[Any]] = {}
        for impl in self._pm.hook.kafkaworkers_declare.get_hookimpls():
            try:
                plugin = impl.function()
            except Exception as exc:
                self._unregister(impl.plugin_name, f"failed in kafkaworkers_declare: {type(exc).__name__}: {exc}")
                continue
            if plugin is None:
                continue
            if not isinstance(plugin, Plugin):
                self._unregister(impl.plugin_name, f"returned {plugin!r} from kafkaworkers_declare, not a Plugin")
                continue
            declared.setdefault(plugin.name, []).append(impl.plugin_name)
            plugins[plugin.name] = plugin
        for name, registrations in declared.items():
            if len(registrations) > 1:
                del plugins[name]
                where = " and ".join(f"{r!r} ({_where(self._source(r))})" for r in registrations)
                reason = (
                    f"is declared by {len(registrations)} entry points, {where}; plugin names must be"
                    f" unique: uninstall one, or disable one with {DISABLE_ENV}"
                )
                for registration in registrations:
                    self._unregister(registration, reason, name)
        self._declared_by = {name: registrations[0] for name, registrations in declared.items()}
        for topic, producers in _producers_by_type(plugins.values()).items():
            if len(producers) < 2:
                continue
            who = "; ".join(
                f"{type_name(typ)} by "
                + ", ".join(f"{n!r} ({_where(self._source(self._declared_by[n]))})" for n in names)
                for typ, names in producers.items()
            )
            reason = (
                f"produces topic {topic!r}, which its producers write with different types ({who});"
                f" its consumers need one shape: share one contract, or disable one with {DISABLE_ENV}"
            )
            for name in [n for names in producers.values() for n in names if n in plugins]:
                self._unregister(self._declared_by[name], reason, name)
                del plugins[name]
        return plugins

    def _source(self, registration: str) -> PluginInfo:
        return self._sources.get(registration, REGISTERED)

    def _unregister(self, registration: str, reason: str, name: str | None = None) -> None:
        """Record a registered plugin as broken (as ``name``, its declared name if known) and
        take its hooks out, so that nothing of it runs."""
        source = self._source(registration)
        self._break(PluginInfo(name or registration, source.distribution, source.version), reason)
        self._pm.unregister(name=registration)

    # --- hooks -----------------------------------------------------------------------

    def has_impl(self, hook: str) -> bool:
        """Whether any plugin implements ``hook``; the worker skips per-message hooks without one."""
        return bool(getattr(self._pm.hook, hook).get_hookimpls())

    def register_commands(self, cli: click.Group) -> None:
        """Let each plugin add its commands; one that raises is recorded as broken, the others still add theirs."""
        for impl in self._pm.hook.kafkaworkers_register_commands.get_hookimpls():
            try:
                impl.function(cli=cli)
            except Exception as exc:
                self._unregister(
                    impl.plugin_name, f"failed in kafkaworkers_register_commands: {type(exc).__name__}: {exc}"
                )
                self._plugins = None

    def demo_scenario(self) -> DemoScenario | None:
        # pluggy's hook calls return Any; a firstresult hook returns one implementation's result.
        return cast("DemoScenario | None", self._pm.hook.kafkaworkers_demo_scenario())

    def register_metrics(self, registry: CollectorRegistry, plugin: Plugin[Any]) -> None:
        self._pm.hook.kafkaworkers_register_metrics(registry=registry, plugin=plugin)

    # Observer hooks: each implementation is called on its own, and one that raises is logged
    # with its plugin's name and counted, never changing a message's outcome or the loop.

    def worker_started(self, worker: Worker) -> None:
        self._observe("kafkaworkers_worker_started", worker=worker)

    def worker_stopping(self, worker: Worker) -> None:
        self._observe("kafkaworkers_worker_stopping", worker=worker)

    def partitions_assigned(self, plugin: Plugin[Any], partitions: list[TopicPartition]) -> None:
        self._observe("kafkaworkers_partitions_assigned", plugin=plugin, partitions=partitions)

    def partitions_revoked(self, plugin: Plugin[Any], partitions: list[TopicPartition]) -> None:
        self._observe("kafkaworkers_partitions_revoked", plugin=plugin, partitions=partitions)

    def batch_received(self, plugin: Plugin[Any], messages: list[Message]) -> None:
        self._observe("kafkaworkers_batch_received", plugin=plugin, messages=messages)

    def message_scope(self, plugin: Plugin[Any], message: Message) -> _Scopes:
        """Every implementation's scope for one message, entered and exited together (see the hook)."""
        return _Scopes(self, plugin, message)

    def message_producing(self, plugin: Plugin[Any] | None, topic: str, key: bytes | None, headers: Headers) -> None:
        self._observe("kafkaworkers_message_producing", plugin=plugin, topic=topic, key=key, headers=headers)

    def message_handled(self, plugin: Plugin[Any], message: Message, value: Any) -> None:
        self._observe("kafkaworkers_message_handled", plugin=plugin, message=message, value=value)

    def message_failed(self, plugin: Plugin[Any], message: Message, error: BaseException, outcome: str) -> None:
        self._observe("kafkaworkers_message_failed", plugin=plugin, message=message, error=error, outcome=outcome)

    def _observe(self, hook: str, **kwargs: Any) -> None:
        for impl in getattr(self._pm.hook, hook).get_hookimpls():
            try:
                impl.function(*[kwargs[name] for name in impl.argnames])
            except Exception:
                self.observer_failed(impl.plugin_name, hook)

    def observer_failed(self, plugin: str, hook: str) -> None:
        """Log the exception being handled as an observer's failure, and count it."""
        log.exception("observer %r failed in %s; the message's outcome is unchanged", plugin, hook)
        if self.on_observer_error is not None:
            self.on_observer_error(plugin, hook)


class _Scopes:
    """The observers' scopes around one handler: each entered and exited on its own, so one that
    raises is logged and counted and the others, and the handler's outcome, are untouched."""

    __slots__ = ("_entered", "_host", "_message", "_plugin")

    _HOOK = "kafkaworkers_message_scope"

    def __init__(self, host: PluginHost, plugin: Plugin[Any], message: Message) -> None:
        self._host = host
        self._plugin = plugin
        self._message = message
        self._entered: list[tuple[str, Any]] = []

    def __enter__(self) -> None:
        for impl in self._host._pm.hook.kafkaworkers_message_scope.get_hookimpls():
            try:
                args = {"plugin": self._plugin, "message": self._message}
                made = impl.function(*[args[name] for name in impl.argnames])
                scope = cast("AbstractContextManager[object] | None", made)
                if scope is not None:
                    scope.__enter__()
                    self._entered.append((impl.plugin_name, scope))
            except Exception:
                self._host.observer_failed(impl.plugin_name, self._HOOK)

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for name, scope in reversed(self._entered):
            try:
                scope.__exit__(typ, exc, tb)
            except Exception:
                self._host.observer_failed(name, self._HOOK)


def hook_names() -> list[str]:
    """Every hook a plugin may implement."""
    return sorted(n for n in dir(hookspecs) if n.startswith("kafkaworkers_"))


def type_name(typ: type) -> str:
    """A declared type as ``module.QualName``, for listings and errors."""
    return f"{typ.__module__}.{getattr(typ, '__qualname__', repr(typ))}"


def _producers_by_type(plugins: Iterable[Plugin[Any]]) -> dict[str, dict[type, list[str]]]:
    """topic -> each type it is produced with -> the plugins producing it with that type."""
    out: dict[str, dict[type, list[str]]] = {}
    for plugin in sorted(plugins, key=lambda p: p.name):
        for topic, typ in plugin.produced.items():
            out.setdefault(topic, {}).setdefault(typ, []).append(plugin.name)
    return out


def _disabled(name: str, distribution: str) -> bool:
    entries = {e.strip() for e in os.environ.get(DISABLE_ENV, "").split(",") if e.strip()}
    return name in entries or any(
        e.partition(":")[2] == name and _canonical(e.partition(":")[0]) == _canonical(distribution)
        for e in entries
        if ":" in e
    )


def _canonical(distribution: str) -> str:
    """A distribution name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _where(info: PluginInfo) -> str:
    return f"{info.distribution} {info.version}".rstrip()
