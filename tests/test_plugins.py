"""The plugin host: loading, validation, hook dispatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from kafkaworkers import Plugin, PluginError, hookimpl
from kafkaworkers.plugins import PluginHost, type_name


class A(msgspec.Struct):
    x: int


class B(msgspec.Struct):
    y: str


def make(name: str, topic: str = "t", typ: type = A) -> Plugin:
    plugin = Plugin(name)

    @plugin.consumes(topic, typ)
    def handle(msg: object, ctx: object) -> None: ...

    return plugin


def test_two_plugins_declaring_one_name_are_both_broken_and_the_others_still_load() -> None:
    host = PluginHost()
    host.register(make("dup"), "first")
    host.register(make("dup"), "second")
    host.register(make("fine"))
    assert list(host.plugins) == ["fine"]
    assert [b.name for b in host.broken] == ["dup", "dup"]
    error = host.broken[0].error
    assert "is declared by 2 entry points, 'first' (<registered>) and 'second' (<registered>)" in error
    assert "KAFKAWORKERS_DISABLE_PLUGINS" in error
    with pytest.raises(PluginError) as refused:
        host.select(["dup"])
    assert str(refused.value) == error
    with pytest.raises(PluginError, match="is declared by 2 entry points"):
        host.check()


def test_consumers_may_read_one_topic_with_types_of_their_own() -> None:
    host = PluginHost()
    host.register(make("one", "orders", A))
    host.register(make("two", "orders", B))
    host.register(Plugin("writer", produces={"orders": A}))
    assert sorted(host.plugins) == ["one", "two", "writer"]
    assert host.broken == []


def test_two_producers_of_one_topic_with_different_types_are_both_broken() -> None:
    host = PluginHost()
    host.register(Plugin("one", produces={"orders": A}))
    host.register(Plugin("two", produces={"orders": B}))
    host.register(make("reader", "orders", A))
    assert list(host.plugins) == ["reader"]
    assert [b.name for b in host.broken] == ["one", "two"]
    error = host.broken[0].error
    assert "produces topic 'orders', which its producers write with different types" in error
    assert f"{type_name(A)} by 'one' (<registered>); {type_name(B)} by 'two' (<registered>)" in error
    assert "KAFKAWORKERS_DISABLE_PLUGINS" in error


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


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_message_scope_that_raises_is_counted_and_changes_no_outcome(kafkaworkers_harness, concurrency: int) -> None:
    plugin = Plugin("p", produces={"out": A}, concurrency=concurrency)
    entered: list[str] = []

    @plugin.consumes("t")
    def handle(value: A, ctx: object) -> None:
        ctx.produce("out", value)  # type: ignore[attr-defined]

    class Scope:
        def __init__(self, fail: str) -> None:
            self.fail = fail

        def __enter__(self) -> None:
            entered.append(self.fail)
            if self.fail == "enter":
                raise RuntimeError("enter")

        def __exit__(self, *exc: object) -> None:
            if self.fail == "exit":
                raise RuntimeError("exit")

    class Failing:
        def __init__(self, fail: str) -> None:
            self.fail = fail

        @hookimpl
        def kafkaworkers_message_scope(self, plugin: object, message: object) -> Scope:
            return Scope(self.fail)

    harness = kafkaworkers_harness(plugin, Failing("enter"), Failing("exit"), Failing("none"), partitions=1)
    for n in range(3):
        harness.produce("t", A(x=n), key=str(n))
    harness.run_until_idle()
    assert len(harness.records("out")) == 3  # every message handled, each output sent once
    assert sorted(entered) == ["enter"] * 3 + ["exit"] * 3 + ["none"] * 3
    failures = [
        s.value
        for m in harness.metrics.registry.collect() if m.name == "kafkaworkers_observer_errors"
        for s in m.samples if s.name.endswith("_total") and s.labels["hook"] == "kafkaworkers_message_scope"
    ]  # fmt: skip
    assert failures == [3.0, 3.0]  # the one failing on enter, the one failing on exit


def install_dist(
    site: Path,
    entry_points: dict[str, str],
    modules: dict[str, str],
    name: str = "kwunit-plugins",
    version: str = "2.0",
) -> None:
    """A distribution made of a dist-info and modules, visible once ``site`` is on sys.path."""
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
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


def test_a_plugin_that_fails_to_import_is_broken_and_the_others_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_dist(
        tmp_path,
        {"kwu-ok": "kwu_ok:plugin", "kwu-broken": "kwu_broken:plugin"},
        {"kwu_ok": PLUGIN_MODULE.format(name="kwu-ok"), "kwu_broken": "raise ImportError('no luck')\n"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    host = PluginHost()
    host.load_entry_points()
    assert "kwu-ok" in host.plugins
    [broken] = [b for b in host.broken if b.name == "kwu-broken"]
    assert (broken.distribution, broken.version) == ("kwunit-plugins", "2.0")
    assert broken.error.startswith("plugin 'kwu-broken' (kwunit-plugins 2.0) failed to import: ImportError: no luck")
    assert "KAFKAWORKERS_DISABLE_PLUGINS=kwu-broken" in broken.error
    with pytest.raises(PluginError) as refused:
        host.select(["kwu-broken"])
    assert str(refused.value) == broken.error


def test_a_plugin_with_a_misspelled_hook_is_broken_and_names_its_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = "from kafkaworkers import hookimpl\n@hookimpl\ndef kafkaworkers_worker_stated(worker):\n    pass\n"
    install_dist(tmp_path, {"kwu-typo": "kwu_typo"}, {"kwu_typo": module})
    monkeypatch.syspath_prepend(str(tmp_path))
    host = PluginHost()
    host.load_entry_points()
    [broken] = [b for b in host.broken if b.name == "kwu-typo"]
    assert broken.error.startswith("plugin 'kwu-typo' (kwunit-plugins 2.0) implements a hook that does not exist")
    assert not host.has_impl("kafkaworkers_worker_stated")


def test_one_name_in_two_distributions_loads_neither_and_names_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_dist(tmp_path, {"kwu-twin": "kwu_twin_a:plugin"}, {"kwu_twin_a": PLUGIN_MODULE.format(name="kwu-twin")},
                 name="kwunit-a", version="1.0")  # fmt: skip
    install_dist(tmp_path, {"kwu-twin": "kwu_twin_b:plugin"}, {"kwu_twin_b": PLUGIN_MODULE.format(name="kwu-twin")},
                 name="kwunit-b", version="3.1")  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    host = PluginHost()
    host.load_entry_points()
    assert "kwu-twin" not in host.plugins
    twins = [b for b in host.broken if b.name == "kwu-twin"]
    assert sorted(b.distribution for b in twins) == ["kwunit-a", "kwunit-b"]
    error = twins[0].error
    assert "is one of 2 plugins named 'kwu-twin', from kwunit-a 1.0 and kwunit-b 3.1" in error or (
        "from kwunit-b 3.1 and kwunit-a 1.0" in error
    )
    assert "KAFKAWORKERS_DISABLE_PLUGINS=kwunit-a:kwu-twin" in error

    # Disabling one of the two by its distribution lets the other load.
    monkeypatch.setenv("KAFKAWORKERS_DISABLE_PLUGINS", "kwunit_a:kwu-twin")
    host = PluginHost()
    host.load_entry_points()
    assert "kwu-twin" in host.plugins
    assert host.info("kwu-twin").distribution == "kwunit-b"
    assert not [b for b in host.broken if b.name == "kwu-twin"]


# --- the command line with a broken plugin installed ---------------------------------------


@pytest.fixture
def broken_site(tmp_path: Path) -> Path:
    """A site with a distribution whose plugin fails to import, leaving a mark when it is imported."""
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "imported"
    module = f"open({str(marker)!r}, 'w').close()\nraise ImportError('no luck')\n"
    install_dist(site, {"kwu-broken": "kwu_broken:plugin"}, {"kwu_broken": module}, name="kwunit-broken", version="0.1")
    return site


def kafkaworkers(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site), "KAFKAWORKERS_METRICS_PORT": "0"}
    return subprocess.run([sys.executable, "-m", "kafkaworkers", *args], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


BROKEN_ERROR = "plugin 'kwu-broken' (kwunit-broken 0.1) failed to import: ImportError: no luck"


def test_version_loads_no_plugin(broken_site: Path) -> None:
    result = kafkaworkers(broken_site, "--version")
    assert result.returncode == 0, result.stderr
    assert "kafkaworkers" in result.stdout
    assert not (broken_site.parent / "imported").exists()


def test_help_and_other_commands_work_beside_a_broken_plugin(broken_site: Path) -> None:
    helped = kafkaworkers(broken_site, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "topology" in helped.stdout
    assert (broken_site.parent / "imported").exists(), "the broken plugin was never tried: the test proves nothing"
    drawn = kafkaworkers(broken_site, "topology")
    assert drawn.returncode == 0, drawn.stderr
    assert "fraude" in drawn.stdout


def test_plugins_lists_a_broken_plugin_with_its_error_beside_the_working_ones(broken_site: Path) -> None:
    text = kafkaworkers(broken_site, "plugins")
    assert text.returncode == 0, text.stderr
    assert f"kwu-broken  (kwunit-broken 0.1)  BROKEN: {BROKEN_ERROR}" in text.stdout
    assert "consumes pedido-novo" in text.stdout
    rows = {row["name"]: row for row in json.loads(kafkaworkers(broken_site, "plugins", "--format", "json").stdout)}
    assert rows["kwu-broken"]["distribution"] == "kwunit-broken"
    assert rows["kwu-broken"]["version"] == "0.1"
    assert rows["kwu-broken"]["error"].startswith(BROKEN_ERROR)
    assert rows["fraude"]["error"] is None
    assert "pedido-novo" in rows["fraude"]["consumes"]


def test_running_a_broken_plugin_fails_with_one_line_giving_its_error(broken_site: Path) -> None:
    result = kafkaworkers(broken_site, "run", "--plugin", "kwu-broken")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    [line] = lines
    assert line.startswith(f"kafkaworkers: error: {BROKEN_ERROR}")
    assert "KAFKAWORKERS_DISABLE_PLUGINS=kwu-broken" in line
