"""The plugin API: state from ``on_start``, handler types from annotations, typed ``ctx.produce``.

Behaviour is checked through the test Harness (the real worker loop on the in-memory broker)
where the worker is involved, and on :class:`Plugin` and :class:`Context` directly where the
API alone decides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from kafkaworkers import Context, Plugin, PluginEnv, PluginError, RetryPolicy
from kafkaworkers.headers import H_EXCEPTION, H_MESSAGE
from kafkaworkers.testing import Harness
from kafkaworkers.transports.memory import MemoryMessage

MakeHarness = Callable[..., Harness]


class Ping(msgspec.Struct, frozen=True):
    n: int


class Pong(msgspec.Struct, frozen=True):
    n: int


class Event(msgspec.Struct, frozen=True, kw_only=True):
    id: str


class Created(Event, frozen=True, kw_only=True):
    name: str


def headers(record: Any) -> dict[str, bytes]:
    return dict(record.headers() or [])


# --- state ------------------------------------------------------------------------------


@dataclass
class Ledger:
    """A plugin's state: what its handlers, its batch scope and its stop callback share."""

    env: PluginEnv
    seen: list[int] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)
    stopped: bool = False


def ledger_plugin() -> Plugin[Ledger]:
    plugin: Plugin[Ledger] = Plugin("ledger", produces={"pongs": Pong})

    @plugin.on_start
    def start(env: PluginEnv) -> Ledger:
        return Ledger(env)

    @plugin.on_stop
    def stop(state: Ledger) -> None:
        state.stopped = True

    @plugin.around_batch
    @contextmanager
    def batch(state: Ledger) -> Iterator[None]:
        state.scopes.append("begin")
        yield
        state.scopes.append("end")

    @plugin.consumes("pings")
    def handle(ping: Ping, ctx: Context[Ledger]) -> None:
        ctx.state.seen.append(ping.n)
        ctx.produce("pongs", Pong(ping.n))

    return plugin


def test_what_on_start_returns_is_ctx_state_and_reaches_around_batch_and_on_stop(
    kafkaworkers_harness: MakeHarness,
) -> None:
    harness = kafkaworkers_harness(ledger_plugin(), partitions=1, plugins={"ledger": {"colour": "blue"}})
    state = harness.state("ledger")
    assert isinstance(state, Ledger)
    assert state.env.name == "ledger" and state.env.config == {"colour": "blue"}
    assert state.env.data_dir.is_dir()

    harness.produce("pings", Ping(1))
    harness.produce("pings", Ping(2))
    harness.run_until_idle()

    assert state.seen == [1, 2]
    assert state.scopes and state.scopes[0] == "begin" and state.scopes[-1] == "end"
    assert [p.n for p in harness.values("pongs", Pong)] == [1, 2]
    assert not state.stopped
    harness.close()
    assert state.stopped


def test_each_harness_gets_its_own_state_from_one_plugin_object(kafkaworkers_harness: MakeHarness) -> None:
    plugin = ledger_plugin()
    first = kafkaworkers_harness(plugin, partitions=1)
    first.produce("pings", Ping(1))
    first.run_until_idle()
    first.close()
    second = kafkaworkers_harness(plugin, partitions=1)
    second.produce("pings", Ping(2))
    second.run_until_idle()

    assert first.state("ledger").seen == [1]
    assert second.state("ledger").seen == [2]


def test_a_plugin_without_on_start_has_state_none(kafkaworkers_harness: MakeHarness) -> None:
    plugin = Plugin("stateless")
    states: list[object] = []

    @plugin.consumes("pings")
    def handle(ping: Ping, ctx: Context[None]) -> None:
        states.append(ctx.state)

    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.produce("pings", Ping(1))
    harness.run_until_idle()
    assert states == [None]
    assert harness.state("stateless") is None


def test_harness_state_of_a_plugin_not_running_names_those_that_are(kafkaworkers_harness: MakeHarness) -> None:
    harness = kafkaworkers_harness(ledger_plugin())
    with pytest.raises(KeyError, match=r"no plugin 'nope' runs in this harness \(running: ledger\)"):
        harness.state("nope")


@pytest.mark.parametrize("callback", ["on_start", "on_stop", "around_batch"])
def test_a_lifecycle_callback_declared_twice_is_refused(callback: str) -> None:
    plugin: Plugin[None] = Plugin("twice")
    declare = getattr(plugin, callback)
    declare(lambda _: None)
    with pytest.raises(PluginError, match=f"plugin 'twice' declares {callback} twice"):
        declare(lambda _: None)


def test_a_breaker_opened_under_one_harness_is_closed_when_the_next_starts(kafkaworkers_harness: MakeHarness) -> None:
    plugin = Plugin("guarded", produces={"pongs": Pong})
    breaker = plugin.breaker("api", wait=3600.0)

    @plugin.consumes("pings")
    def handle(ping: Ping, ctx: Context[None]) -> None:
        ctx.produce("pongs", breaker.call(lambda: Pong(ping.n)))

    first = kafkaworkers_harness(plugin, partitions=1)
    breaker.force_open()
    first.produce("pings", Ping(1))
    first.run_until_idle()
    assert first.records("pongs") == [], "the open breaker held the message back"
    first.close()

    second = kafkaworkers_harness(plugin, partitions=1)
    second.produce("pings", Ping(2))
    second.run_until_idle()
    assert [p.n for p in second.values("pongs", Pong)] == [2]


# --- the handler's message type -----------------------------------------------------------


def test_the_handler_annotation_is_the_message_type(kafkaworkers_harness: MakeHarness) -> None:
    plugin = Plugin("annotated")
    got: list[object] = []

    @plugin.consumes("pings")
    def handle(ping: Ping, ctx: Context[None]) -> None:
        got.append(ping)

    assert plugin.subscriptions["pings"].type is Ping
    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.produce("pings", Ping(7))
    harness.run_until_idle()
    assert got == [Ping(7)]


def test_an_explicit_type_the_annotation_agrees_with_is_accepted() -> None:
    plugin = Plugin("explicit")

    @plugin.consumes("same", Ping)
    def same(ping: Ping, ctx: Context[None]) -> None: ...

    @plugin.consumes("unannotated", Ping)
    def bare(ping, ctx) -> None:  # type: ignore[no-untyped-def]
        ...

    assert plugin.subscriptions["same"].type is Ping
    assert plugin.subscriptions["unannotated"].type is Ping


def test_one_handler_annotated_with_a_base_class_decodes_each_topic_as_its_explicit_subclass(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin = Plugin("events")
    got: list[Event] = []

    def record(event: Event, ctx: Context[None]) -> None:
        got.append(event)

    plugin.consumes("created", Created)(record)
    assert plugin.subscriptions["created"].type is Created

    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.produce("created", Created(id="e1", name="x"))
    harness.run_until_idle()
    assert got == [Created(id="e1", name="x")]


def handle_any_of_three(value: Created | Ping | Pong, ctx: Context[None]) -> None: ...


def test_an_explicit_member_of_a_union_annotation_is_accepted_and_another_type_refused() -> None:
    plugin = Plugin("unions")
    plugin.consumes("pings", Ping)(handle_any_of_three)
    assert plugin.subscriptions["pings"].type is Ping
    with pytest.raises(PluginError, match=r"consumes\(\) names Event but .* annotated tests\.test_api\.Created \|"):
        plugin.consumes("events", Event)(handle_any_of_three)


def test_an_explicit_type_that_differs_from_the_annotation_is_refused_naming_plugin_topic_and_both() -> None:
    plugin = Plugin("mismatch")
    with pytest.raises(PluginError) as err:

        @plugin.consumes("pings", Pong)
        def handle(ping: Ping, ctx: Context[None]) -> None: ...

    message = str(err.value)
    assert "plugin 'mismatch', topic 'pings'" in message
    assert "consumes() names Pong" in message and "annotated Ping" in message
    assert plugin.subscriptions == {}


def test_a_handler_with_neither_annotation_nor_type_is_refused_saying_what_to_add() -> None:
    plugin = Plugin("untyped")
    with pytest.raises(PluginError) as err:

        @plugin.consumes("pings")
        def handle(ping, ctx) -> None:  # type: ignore[no-untyped-def]
            ...

    message = str(err.value)
    assert message.startswith("plugin 'untyped', topic 'pings': the handler's parameter 'ping' has no annotation")
    assert "annotate the handler's first parameter with the message type" in message
    assert "consumes('pings', Order)" in message


def test_an_unresolvable_annotation_needs_the_explicit_type() -> None:
    plugin = Plugin("local")

    class Local(msgspec.Struct):
        x: int

    def handle(value: Local, ctx: Context[None]) -> None: ...

    with pytest.raises(PluginError, match=r"'Local' is not defined.*consumes\('a', Order\)"):
        plugin.consumes("a")(handle)
    plugin.consumes("b", Local)(handle)
    assert plugin.subscriptions["b"].type is Local


def test_only_the_message_annotation_must_resolve_when_the_handler_is_declared() -> None:
    assert forward.subscriptions["pings"].type is Ping


forward: Plugin[DeclaredLater] = Plugin("forward")


@forward.consumes("pings")
def _forward_handle(ping: Ping, ctx: Context[DeclaredLater]) -> None: ...


class DeclaredLater:
    """A state class defined below the handler whose ``Context[...]`` annotation names it."""


# --- ctx.produce checks the declared type -------------------------------------------------


def context(plugin: Plugin[Any], sent: list[tuple[Any, ...]]) -> Context[None]:
    message = MemoryMessage("pings", 0, 0, b"k", b"{}", None, 1)
    return Context(plugin, message, lambda *args: sent.append(args), None)


def test_producing_a_value_of_another_type_than_declared_fails_naming_plugin_topic_and_both_types() -> None:
    plugin = Plugin("typed", produces={"pongs": Pong})
    sent: list[tuple[Any, ...]] = []
    with pytest.raises(PluginError) as err:
        context(plugin, sent).produce("pongs", Ping(1))
    assert str(err.value) == "plugin 'typed' produced a Ping to 'pongs', which is declared to carry Pong"
    assert sent == []


def test_a_declared_instance_and_raw_bytes_are_produced() -> None:
    plugin = Plugin("typed", produces={"pongs": Pong})
    sent: list[tuple[Any, ...]] = []
    ctx = context(plugin, sent)
    ctx.produce("pongs", Pong(1))
    ctx.produce("pongs", b'{"n":2}')
    assert [value for _, value, _, _ in sent] == [b'{"n":1}', b'{"n":2}']


def test_a_declared_type_isinstance_cannot_test_is_not_checked() -> None:
    plugin = Plugin("loose", produces={"union": Ping | Pong, "alias": list[int]})
    sent: list[tuple[Any, ...]] = []
    ctx = context(plugin, sent)
    ctx.produce("union", Pong(1))
    ctx.produce("alias", [1, 2])
    assert [value for _, value, _, _ in sent] == [b'{"n":1}', b"[1,2]"]


def test_a_wrongly_typed_produce_dead_letters_the_consumed_message_and_sends_nothing(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin = Plugin("buggy", produces={"pongs": Pong}, retry=RetryPolicy(delays=(0.05,), jitter=0.0))

    @plugin.consumes("pings")
    def handle(ping: Ping, ctx: Context[None]) -> None:
        ctx.produce("pongs", {"n": ping.n})

    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.produce("pings", Ping(1))
    harness.run_until_idle(wait_for_retries=True)

    assert harness.records("pongs") == []
    assert harness.records("buggy-retry-1") == [], "a programming error is not retried"
    [letter] = harness.records("buggy-dlq")
    assert headers(letter)[H_EXCEPTION] == b"kafkaworkers.errors.PluginError"
    assert b"produced a dict to 'pongs', which is declared to carry Pong" in headers(letter)[H_MESSAGE]
