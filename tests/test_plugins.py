"""The plugin host: loading, validation, hook dispatch."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from kafkaworkers import Plugin, PluginError, hookimpl
from kafkaworkers.plugins import PluginHost


class A(msgspec.Struct):
    x: int


class B(msgspec.Struct):
    y: str


def make(name: str, topic: str = "t", typ: type = A) -> Plugin:
    plugin = Plugin(name)

    @plugin.consumes(topic, typ)
    def handle(msg: object, ctx: object) -> None: ...

    return plugin


def test_two_plugins_with_one_name_are_refused() -> None:
    host = PluginHost()
    host.register(make("dup"), "first")
    host.register(make("dup"), "second")
    with pytest.raises(PluginError, match="two plugins declare the name 'dup'"):
        host.plugins  # noqa: B018


def test_conflicting_types_for_one_topic_are_refused() -> None:
    host = PluginHost()
    host.register(make("one", "orders", A))
    other = Plugin("two", produces={"orders": B})
    host.register(other)
    with pytest.raises(PluginError, match=r"topic 'orders' has two types: .*\.[AB] in plugin '(one|two)' and") as err:
        host.plugins  # noqa: B018
    assert "test_plugins.A in plugin 'one'" in str(err.value)
    assert "test_plugins.B in plugin 'two'" in str(err.value)


def test_misspelled_hook_is_refused_at_registration() -> None:
    class Observer:
        @hookimpl
        def kafkaworkers_worker_stated(self, worker: object) -> None: ...

    host = PluginHost()
    with pytest.raises(PluginError, match="implements a hook that does not exist"):
        host.register(Observer(), "typo")


def test_unknown_plugin_lists_what_is_installed() -> None:
    host = PluginHost()
    host.register(make("alpha"))
    with pytest.raises(PluginError, match="unknown plugin 'beta'; installed: alpha"):
        host.select(["beta"])


def test_plugin_declarations_are_validated() -> None:
    with pytest.raises(PluginError, match="must match"):
        Plugin("Bad Name")
    with pytest.raises(PluginError, match="not a valid Kafka topic name"):
        Plugin("ok", produces={"bad topic": A})
    plugin = make("twice")
    with pytest.raises(PluginError, match="two handlers"):
        plugin.consumes("t", A)(lambda m, c: None)


def test_per_message_hooks_are_reported_only_when_implemented() -> None:
    host = PluginHost()
    host.register(make("p"))
    assert not host.has_impl("kafkaworkers_message_handled")

    class Observer:
        @hookimpl
        def kafkaworkers_message_handled(self, plugin: object, message: object, value: object) -> None: ...

    host.register(Observer(), "observer")
    assert host.has_impl("kafkaworkers_message_handled")


def install_dist(site: Path, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A distribution made of a dist-info and modules, visible once ``site`` is on sys.path."""
    dist = site / "kwunit_plugins-2.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kwunit-plugins\nVersion: 2.0\n")
    (dist / "entry_points.txt").write_text(
        "[kafkaworkers]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    )
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)


PLUGIN_MODULE = "from kafkaworkers import Plugin\nplugin = Plugin({name!r})\n"


def test_entry_points_are_loaded_with_their_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_dist(tmp_path, {"kwu-one": "kwu_one:plugin"}, {"kwu_one": PLUGIN_MODULE.format(name="kwu-one")})
    monkeypatch.syspath_prepend(str(tmp_path))
    host = PluginHost()
    host.load_entry_points()
    assert "kwu-one" in host.plugins
    assert host.info("kwu-one").distribution == "kwunit-plugins"
    assert host.info("kwu-one").version == "2.0"


def test_disabled_entry_points_are_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_dist(
        tmp_path,
        {"kwu-a": "kwu_a:plugin", "kwu-b": "kwu_b:plugin"},
        {"kwu_a": PLUGIN_MODULE.format(name="kwu-a"), "kwu_b": "raise ImportError('broken on purpose')\n"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KAFKAWORKERS_DISABLE_PLUGINS", "kwu-b")
    host = PluginHost()
    host.load_entry_points()
    assert "kwu-a" in host.plugins
    assert "kwu-b" not in host.plugins


def test_a_plugin_that_fails_to_import_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_dist(tmp_path, {"kwu-broken": "kwu_broken:plugin"}, {"kwu_broken": "raise ImportError('no luck')\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        PluginError, match="plugin 'kwu-broken' from kwunit-plugins failed to import: ImportError: no luck"
    ):
        PluginHost().load_entry_points()
