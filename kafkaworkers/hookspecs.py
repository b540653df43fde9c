"""Hook specifications: what an installed plugin may implement.

Every hook is prefixed ``kafkaworkers_``. Implement one with the ``hookimpl`` marker in
any module or object that the ``kafkaworkers`` entry-point group names. Hooks marked
*per message* are called only when some plugin implements them, so an unimplemented hook
costs nothing per message. Documented, with examples, in ``docs/plugins.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import click
    from prometheus_client import CollectorRegistry

    from kafkaworkers.api import Plugin
    from kafkaworkers.demo import DemoScenario
    from kafkaworkers.transports import Headers, Message, TopicPartition
    from kafkaworkers.worker import Worker

hookspec = pluggy.HookspecMarker("kafkaworkers")
hookimpl = pluggy.HookimplMarker("kafkaworkers")

# --- start-up ----------------------------------------------------------------------------


@hookspec
def kafkaworkers_declare() -> Plugin[Any] | None:
    """Declare a worker plugin: its name, consumed topics with handlers, produced topics.

    :return: a :class:`kafkaworkers.Plugin`, or ``None`` for a plugin that only observes.
    """


@hookspec
def kafkaworkers_register_commands(cli: click.Group) -> None:
    """Add commands to the ``kafkaworkers`` CLI (for example a plugin's report or data loader).

    :param cli: the top-level click group; call ``cli.add_command(...)``.
    """


@hookspec(firstresult=True)
def kafkaworkers_demo_scenario() -> DemoScenario | None:
    """Provide the scenario ``kafkaworkers demo`` runs: the input it produces and how it judges the result.

    First result wins.

    :return: a :class:`kafkaworkers.demo.DemoScenario`, or ``None``.
    """


@hookspec
def kafkaworkers_register_metrics(registry: CollectorRegistry, plugin: Plugin[Any]) -> None:
    """Register a plugin's own Prometheus metrics before the worker starts.

    Called once per running worker plugin, for every installed observer.

    :param registry: the registry ``/metrics`` serves.
    :param plugin: the worker plugin about to run.
    """


@hookspec
def kafkaworkers_worker_started(worker: Worker) -> None:
    """The worker has started its plugins and subscribed; no message was handled yet.

    :param worker: the running worker (``worker.plugins`` lists what it runs).
    """


# --- partitions --------------------------------------------------------------------------


@hookspec
def kafkaworkers_partitions_assigned(plugin: Plugin[Any], partitions: list[TopicPartition]) -> None:
    """The group gave ``plugin`` these partitions (incrementally, cooperative-sticky).

    :param plugin: the worker plugin whose consumer received them.
    :param partitions: the partitions added to its assignment.
    """


@hookspec
def kafkaworkers_partitions_revoked(plugin: Plugin[Any], partitions: list[TopicPartition]) -> None:
    """``plugin`` is giving these partitions up; their finished work was already committed.

    :param plugin: the worker plugin whose consumer loses them.
    :param partitions: the partitions removed from its assignment.
    """


# --- per batch and per message -----------------------------------------------------------


@hookspec
def kafkaworkers_batch_received(plugin: Plugin[Any], messages: list[Message]) -> None:
    """A consume call returned a batch of messages for ``plugin``, before any is handled.

    Called once per non-empty batch.

    :param plugin: the worker plugin.
    :param messages: the raw messages (do not keep references after the call).
    """


@hookspec
def kafkaworkers_message_scope(plugin: Plugin[Any], message: Message) -> AbstractContextManager[object] | None:
    """Wrap the handler of one decoded message in a context manager (per message; only called if implemented).

    Called and entered just before the handler runs, on the thread or in the task that runs
    it, and exited when it returns or raises: context variables the scope sets (a tracing
    span, a logging context) are what the handler and its ``ctx.produce`` calls see. The
    handler's exception reaches ``__exit__``, which cannot suppress it; one that the scope
    itself raises is logged and counted like any observer's, never changing the outcome.
    A message that fails to decode gets no scope, only :func:`kafkaworkers_message_failed`.

    :param plugin: the worker plugin.
    :param message: the raw message.
    :return: a context manager, or ``None`` to leave this message alone.
    """


@hookspec
def kafkaworkers_message_producing(plugin: Plugin[Any] | None, topic: str, key: bytes | None, headers: Headers) -> None:
    """A message is about to be produced: an observer may add headers (per produced message; if implemented).

    Called by ``ctx.produce`` on the handler's thread or in its task, inside its message scope;
    and with ``plugin`` ``None`` for what ``kafkaworkers produce`` and ``kafkaworkers demo``
    publish as input. Not called for the framework's retry and dead-letter copies, which keep
    the headers of the message they copy.

    :param plugin: the worker plugin whose handler produces, or ``None`` outside any handler.
    :param topic: the topic it goes to.
    :param key: its key.
    :param headers: its headers so far; append ``(name, bytes)`` pairs to add one.
    """


@hookspec
def kafkaworkers_message_handled(plugin: Plugin[Any], message: Message, value: Any) -> None:
    """A handler returned normally for ``message`` (per message; only called if implemented).

    :param plugin: the worker plugin.
    :param message: the raw message.
    :param value: the decoded value the handler received.
    """


@hookspec
def kafkaworkers_message_failed(plugin: Plugin[Any], message: Message, error: BaseException, outcome: str) -> None:
    """A message failed to decode or its handler raised (per message; only called if implemented).

    :param plugin: the worker plugin.
    :param message: the raw message.
    :param error: the exception.
    :param outcome: what the worker did with it: ``retried``, ``dead_lettered`` or ``paused``.
    """


# --- shutdown ----------------------------------------------------------------------------


@hookspec
def kafkaworkers_worker_stopping(worker: Worker) -> None:
    """The worker stopped fetching and is about to flush, commit and leave its groups.

    :param worker: the stopping worker.
    """
