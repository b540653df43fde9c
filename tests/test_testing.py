"""The plugin authors' harness: a plugin passed with the module declaring it runs once, with the module's hooks."""

from __future__ import annotations

import types

import msgspec

from kafkaworkers import Context, Plugin, hookimpl
from kafkaworkers_orders import reserva


class Ping(msgspec.Struct):
    n: int


def ping_module() -> types.ModuleType:
    """A plugin module as an author writes one: the plugin, its declaration and an observer hook."""
    module = types.ModuleType("pingplugin")
    module.handled = []
    module.observed = []
    module.plugin = Plugin("ping")

    @module.plugin.consumes("ping")
    def handle(value: Ping, ctx: Context[None]) -> None:
        module.handled.append(value.n)

    @hookimpl
    def kafkaworkers_declare() -> Plugin:
        return module.plugin

    @hookimpl
    def kafkaworkers_message_handled(plugin, message, value) -> None:
        module.observed.append(value.n)

    module.kafkaworkers_declare = kafkaworkers_declare
    module.kafkaworkers_message_handled = kafkaworkers_message_handled
    return module


def test_a_plugin_and_its_module_together_run_the_plugin_once_with_the_modules_hooks(kafkaworkers_harness):
    module = ping_module()
    harness = kafkaworkers_harness(module.plugin, module)

    for n in range(3):
        harness.produce("ping", Ping(n))
    harness.run_until_idle()

    assert [runner.plugin.name for runner in harness.worker.runners] == ["ping"]
    assert sorted(module.handled) == [0, 1, 2]
    assert sorted(module.observed) == [0, 1, 2]
    handled = {"plugin": "ping", "topic": "ping", "outcome": "ok"}
    assert harness.metrics.registry.get_sample_value("kafkaworkers_messages_handled_total", handled) == 3


def test_an_installed_plugin_and_its_module_together(kafkaworkers_harness):
    harness = kafkaworkers_harness(reserva.plugin, reserva)
    assert [runner.plugin.name for runner in harness.worker.runners] == ["reserva"]
