"""The consumer loop: poll a batch, decode, handle, produce, flush, store offsets.

One :class:`Worker` runs one or more plugins in one thread, each plugin with its own
consumer in its own group, all sharing the process's producer. The order of a batch is the
whole delivery guarantee:

1. ``consume`` a batch; drop what belongs to a partition revoked meanwhile; skip partitions
   that are paused (a retry not yet due, an open breaker, a retry in place);
2. decode and handle each message, inside the plugin's ``around_batch`` scope if it has one
   (a database transaction committed once per batch); a failure is routed by the plugin's
   retry policy (:mod:`kafkaworkers.retry`): a retry topic, a pause in place, or the
   dead-letter topic;
3. ``flush`` the producer: every message the handlers, retries and dead letters produced is
   acknowledged by the broker, or refused;
4. only then store each partition's next offset (librdkafka commits stored offsets in the
   background). The bookkeeping of steps 2-4 is a :class:`~kafkaworkers.batch.Batch`.

A crash anywhere re-delivers from the last stored offset: at-least-once, nothing lost.
Observer hooks never change a message's outcome: the plugin host isolates them.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import msgspec
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from kafkaworkers.api import Context, Plugin, PluginEnv, Subscription
from kafkaworkers.batch import RETRY_IN_PLACE, RETRY_NOT_DUE, Batch, Partitions, pause_reason
from kafkaworkers.clock import SYSTEM_CLOCK, Clock
from kafkaworkers.concurrency import GATHER_WAIT, Dispatcher, EventLoopThread
from kafkaworkers.config import DEFAULT_PARTITIONS, Settings, admin_config
from kafkaworkers.consumer import create_consumer
from kafkaworkers.control import ControlChannel
from kafkaworkers.errors import (
    BrokerUnavailable,
    CircuitOpenError,
    ConfigError,
    DecodeError,
    PluginError,
    StoreConflict,
)
from kafkaworkers.headers import H_DUE, H_ORIGINAL_TOPIC, number, parse_headers
from kafkaworkers.inspect import client_id
from kafkaworkers.metrics import LAG_STATS_INTERVAL_MS, Metrics, PluginMetrics
from kafkaworkers.plugins import PluginHost
from kafkaworkers.producer import create_producer, producer_config, shared_producer
from kafkaworkers.retry import FailureRouter
from kafkaworkers.supervisor import ENV_INDEX
from kafkaworkers.transactions import TRANSACTION_TIMEOUT_MS, Transactions, transactional_id
from kafkaworkers.transports import Consumer, Headers, Message, Producer, Transport, transport_for

__all__ = ["PluginRunner", "Worker"]

log = logging.getLogger(__name__)

_ERROR_LOG_INTERVAL = 10.0
_BROKER_CHECK_INTERVAL = 5.0
#: At concurrency N, a partition is paused past max(4N, this) accepted, unfinished messages: the N
#: running and the N waiting for a slot, with room to spare, so pauses (which drop what was
#: prefetched) stay rare.
_MIN_BUFFER = 64
#: The most a revoke waits for the revoked partitions' messages in flight.
_MAX_REVOKE_WAIT = 10.0
#: The longest an idle loop with handlers running waits for one of them before polling again.
_IN_FLIGHT_WAIT = 0.05
#: CPython's own collector thresholds: the worker replaces them only if nothing else changed them.
_PYTHON_GC_THRESHOLDS = (700, 10, 10)
#: The youngest generation collected every 100,000 allocations instead of 700: a batch's
#: messages, contexts and decoded values live until it ends, and the default traversed them
#: over and over. W3 (the 430-byte nested order) spent 0.88 CPU-seconds per 100,000 messages
#: with the default and 0.75-0.77 with this, at the same peak memory.
_GC_THRESHOLDS = (100_000, 10, 10)
#: Consumer errors that mean no broker can be reached (readiness fails until one answers).
_UNREACHABLE = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE})
TP = tuple[str, int]


class _Route:
    """A consumed topic's handler with its metric children, resolved once per plugin."""

    __slots__ = (
        "asynchronous", "consumed", "dead", "decode", "decoder", "duration", "handler", "ok", "retried", "timed",
        "topic", "type_name",
    )  # fmt: skip

    def __init__(self, subscription: Subscription[Any], metrics: PluginMetrics | None) -> None:
        self.topic = subscription.topic
        self.type_name = getattr(subscription.type, "__name__", str(subscription.type))
        self.decoder = subscription.decoder
        self.decode = subscription.decoder.decode
        self.handler = subscription.handler
        self.asynchronous = subscription.asynchronous
        self.duration = metrics.duration(self.topic) if metrics else None
        #: the batch loop's per-message handler seconds, counted once per batch (:meth:`HandlerDurations.settle`)
        self.timed = self.duration.record if self.duration is not None else None
        self.consumed = self.ok = self.retried = self.dead = 0


class PluginRunner:
    """One plugin's consumers and the batch step that drives them.

    :param plugin: the plugin.
    :param settings: resolved settings.
    :param host: the plugin host, for observer hooks.
    :param producer: the process's shared producer.
    :param transport: the broker.
    :param metrics: the plugin's metric children; ``None`` turns metrics off.
    :param state: what the plugin's ``on_start`` returned: ``ctx.state``, and its batch scope's.
    :param clock: the clocks pauses and due times are measured on.
    :param completed: set when a handler running concurrently finishes (wakes the worker's loop).
    :param txn: in exactly-once mode, the worker's transactions (``producer`` is their producer).
    """

    def __init__(
        self,
        plugin: Plugin[Any],
        settings: Settings,
        host: PluginHost,
        producer: Producer,
        transport: Transport,
        metrics: PluginMetrics | None,
        state: Any = None,
        clock: Clock = SYSTEM_CLOCK,
        completed: threading.Event | None = None,
        txn: Transactions | None = None,
    ) -> None:
        self.plugin = plugin
        self.txn = txn
        # exactly-once: messages whose outputs the broker refused, dead-lettered when handled again
        self._poisoned: dict[tuple[str, int, int], Exception] = {}
        self.state = state
        self.group = settings.group_for(plugin.name)
        self.host = host
        self.producer = producer
        self.metrics = metrics
        self.clock = clock
        self.batch_size = settings.batch_size
        self.routes = {t: _Route(s, metrics) for t, s in plugin.subscriptions.items()}
        max_bytes = int(producer_config(settings).get("message.max.bytes", 1_000_000))
        self.router = FailureRouter(plugin.name, self.group, plugin.retry, clock, max_bytes)
        self.retry_topics = self.router.retry_topics
        self.dlq = self.router.dlq
        self._error_logged: dict[int, float] = {}
        #: a consumer said no broker answers; cleared by the next message or broker answer
        self.broker_down = False
        callbacks = self._client_callbacks(settings)
        if "client.id" not in settings.consumer and "client.id" not in settings.kafka:
            callbacks["client.id"] = client_id()  # `inspect workers` reads host, pid and process from it
        if txn is not None:
            # Offsets commit in the transaction, never by themselves.
            callbacks["enable.auto.commit"] = False
        self.consumer = create_consumer(settings, self.group, callbacks, transport=transport)
        # Retry topics get a consumer (and group) of their own: sticky assignment balances the
        # partition count over all subscribed topics, so with one consumer a second process
        # could end up holding only retry partitions and scaling out would add no parallelism.
        self.retry_consumer: Consumer | None = None
        if self.retry_topics:
            self.retry_consumer = create_consumer(settings, f"{self.group}-retry", callbacks, transport=transport)
        self.consumers = [c for c in (self.consumer, self.retry_consumer) if c is not None]
        self.partitions = Partitions(
            plugin.name, self._consumer_of, clock, metrics.paused.set if metrics is not None else None
        )
        self._joined: set[int] = set()
        # Bumped by every revoke or loss, so a fetch can tell a rebalance ran inside it.
        self._rebalances = 0
        # retry mode "pause": the partition -> (offset, failed deliveries) of the message it waits on
        self._in_place: dict[TP, tuple[int, int]] = {}
        self._produced: defaultdict[str, int] = defaultdict(int)
        self._hook_handled = host.has_impl("kafkaworkers_message_handled")
        self._hook_failed = host.has_impl("kafkaworkers_message_failed")
        self._hook_batch = host.has_impl("kafkaworkers_batch_received")
        self._hook_scope = host.has_impl("kafkaworkers_message_scope")
        self._hook_producing = host.has_impl("kafkaworkers_message_producing")
        self.concurrency = settings.concurrency_for(plugin.name, plugin.concurrency)
        #: at concurrency > 1, what runs the messages in flight (see :mod:`kafkaworkers.concurrency`)
        self.dispatcher: Dispatcher | None = None
        if self.concurrency > 1:
            buffer = max(4 * self.concurrency, _MIN_BUFFER)
            revoke = min(_MAX_REVOKE_WAIT, settings.shutdown_grace / 2)
            self.dispatcher = Dispatcher(self, self.concurrency, buffer, revoke, completed or threading.Event())
        self.loop = self.dispatcher.loop if self.dispatcher is not None else EventLoopThread(plugin.name)
        if txn is not None:
            txn.on_abort(self._aborted)

    @property
    def paused(self) -> dict[TP, tuple[float, str]]:
        """Paused partitions -> (until, reason)."""
        return self.partitions.paused

    @property
    def assignment(self) -> set[TP]:
        """The partitions assigned to this plugin's consumers."""
        return self.partitions.assigned

    # --- group membership ------------------------------------------------------------

    def subscribe(self) -> None:
        callbacks = {"on_assign": self._on_assign, "on_revoke": self._on_revoke, "on_lost": self._on_lost}
        self.consumer.subscribe(list(self.routes), **callbacks)
        if self.retry_consumer is not None:
            self.retry_consumer.subscribe(self.retry_topics, **callbacks)

    @property
    def joined(self) -> bool:
        """Whether every consumer of this plugin has joined its group."""
        return len(self._joined) == len(self.consumers)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._joined.add(id(consumer))
        self.partitions.assign(consumer, partitions)
        if self.metrics:
            self.metrics.assigned.set(len(self.partitions.assigned))
        if partitions:
            log.info("%s: assigned %s", self.plugin.name, _fmt(partitions))
            self.host.partitions_assigned(self.plugin, partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Revocation happens inside consume(), so the previous batch is finished and its
        # offsets stored (at concurrency > 1: what finished in a bounded wait): commit them
        # now, before another member takes the partitions.
        if self.dispatcher is not None:
            self.dispatcher.revoked(partitions)
        if self.txn is not None and self.txn.open:
            # Finished work of a transaction gathering batches: commit it while we own the partitions.
            self.txn.commit()
        self._commit(consumer)
        self._forget(partitions)
        if partitions:
            log.info("%s: revoked %s", self.plugin.name, _fmt(partitions))
            self.host.partitions_revoked(self.plugin, partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("%s: lost %s; their uncommitted work will be redone", self.plugin.name, _fmt(partitions))
        if self.dispatcher is not None:
            self.dispatcher.revoked(partitions, lost=True)
        if self.txn is not None and self.txn.open:
            # Another member owns them already: none of their offsets may commit.
            self.txn.abort()
        self._forget(partitions)

    def _aborted(self, consumer: Consumer, first: dict[TP, int]) -> None:
        """A transaction was aborted: handle again what it held of this runner's partitions."""
        if not any(consumer is mine for mine in self.consumers):
            return
        kept = {tp: offset for tp, offset in first.items() if tp in self.partitions.assigned}
        if not kept:
            return
        if self.dispatcher is not None:
            self.dispatcher.rewound(kept)
        else:
            self.partitions.rewind(kept, "its transaction was aborted")

    def _forget(self, partitions: list[TopicPartition]) -> None:
        self._rebalances += 1
        self.partitions.forget(partitions)
        for tp in partitions:
            self._in_place.pop((tp.topic, tp.partition), None)
            if self.metrics:
                self.metrics.forget_lag(tp.topic, tp.partition)
        if self.metrics:
            self.metrics.assigned.set(len(self.partitions.assigned))

    # --- librdkafka's callbacks: client errors and statistics ---------------------------

    def _client_callbacks(self, settings: Settings) -> dict[str, Any]:
        """Client-wide errors to :meth:`_on_error`; with metrics on, statistics every few seconds
        to :meth:`_on_stats`. librdkafka calls both inside consume(), on this thread."""
        config: dict[str, Any] = {"error_cb": self._on_error}
        if self.metrics is None:
            return config
        config["stats_cb"] = self._on_stats
        if "statistics.interval.ms" not in settings.consumer and "statistics.interval.ms" not in settings.kafka:
            config["statistics.interval.ms"] = LAG_STATS_INTERVAL_MS
        return config

    def _on_error(self, err: KafkaError) -> None:
        """An error of the client, not of one message: no broker reachable fails readiness until
        one answers again; librdkafka keeps reconnecting by itself."""
        if err.code() in _UNREACHABLE:
            self.broker_down = True
        self._log_error(err)

    def _on_stats(self, stats: str) -> None:
        """librdkafka's statistics, delivered inside consume() on this thread: update the lag gauges."""
        if self.metrics is not None:
            self.metrics.update_lag(stats, self.partitions.assigned)

    def commit(self) -> None:
        """Commit the stored offsets now (shutdown)."""
        for consumer in self.consumers:
            self._commit(consumer)

    def close(self, commit: bool = True) -> None:
        """Commit (unless the broker is known to be down: a synchronous commit would wait for
        it), then leave the groups."""
        if commit:
            self.commit()
        for consumer in self.consumers:
            consumer.close()

    def _commit(self, consumer: Consumer) -> None:
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("%s: commit failed: %s", self.plugin.name, exc.args[0].str())

    def _consumer_of(self, topic: str) -> Consumer:
        if topic in self.routes or self.retry_consumer is None:
            return self.consumer
        return self.retry_consumer

    # --- the batch step --------------------------------------------------------------

    def step(self, timeout: float, flush: Any) -> int:
        """Consume and finish one batch; return how many messages it held."""
        if self.dispatcher is not None:
            return self.dispatcher.step(timeout)
        if self.partitions.paused:
            self.partitions.resume_due()
        messages = self._fetch(timeout)
        if not messages:
            if self.txn is not None and self.txn.open:
                self.txn.commit()  # a transaction gathering batches: the input went quiet
            return 0
        if self._hook_batch:
            self.host.batch_received(self.plugin, messages)
        if self.txn is not None:
            self.txn.begin()
        scope = self.plugin.batch_scope(self.state)
        batch = Batch(
            self.plugin.name, self.producer, self.router, self.partitions, self._produced, scope is not None,
            txn=self.txn, poisoned=self._poisoned if self.txn is not None else None,
        )  # fmt: skip
        if scope is None:
            self._handle(batch, messages)
        else:
            self._handle_in(scope, batch, messages)
        batch.finish(flush)
        if self.txn is not None and self.txn.open and len(messages) < self.batch_size:
            # Caught up: nothing more is waiting, so gathering further batches would only
            # hold these outputs back from read_committed readers.
            self.txn.commit()
        self._publish_counts(len(messages))
        return len(messages)

    def _fetch(self, timeout: float) -> list[Message]:
        """What is waiting, up to a batch; block up to ``timeout`` only while nothing is.

        ``consume(n, timeout)`` waits until it has ``n`` messages, which at a low rate would
        hold every message back for the whole timeout: wait for one, then take the rest. A
        rebalance may run inside any of these calls: what was fetched before it, of a
        partition it revoked, belongs to the partition's new owner now and is dropped.
        """
        rebalances = self._rebalances
        consumer = self.consumer
        messages = consumer.consume(self.batch_size, 0)
        if not messages and timeout > 0:
            messages = consumer.consume(1, timeout)
            if messages and self.batch_size > 1:
                messages += consumer.consume(self.batch_size - 1, 0)
        if self.retry_consumer is not None:
            messages += self.retry_consumer.consume(self.batch_size, 0)
        if self.broker_down and messages and messages[-1].error() is None:
            self.broker_down = False
        if rebalances != self._rebalances and messages:
            assigned = self.partitions.assigned
            messages = [m for m in messages if m.error() is not None or (m.topic(), m.partition()) in assigned]
        return messages

    def _handle(self, batch: Batch, messages: list[Message]) -> None:
        """Decode and handle each message, recording in ``batch`` what may be stored.

        The loop body runs once per message: what is fixed for the batch is read once before it.
        """
        routes = self.routes
        plugin = self.plugin
        send = self.producing(batch.output) if self._hook_producing else batch.output
        hook_scope = self._hook_scope
        state = self.state
        first = batch.first
        last = batch.last
        blocked = batch.blocked
        # Inside a batch scope, outputs are held until it commits; a failed message's are dropped.
        held = batch.held
        in_place = self._in_place
        hook_handled = self._hook_handled
        poisoned = self._poisoned
        perf = time.perf_counter
        for msg in messages:
            err = msg.error()
            if err is not None:
                self._consumer_error(err)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            # A message without an error is a record: it has all three.
            assert topic is not None and partition is not None and offset is not None
            tp = (topic, partition)
            if blocked and tp in blocked:
                continue
            batch.source = msg
            route = routes.get(topic)
            if route is None:
                route = self._retry_route(batch, msg, tp, offset)
                if route is None:
                    continue
            if tp not in first:
                first[tp] = offset
            route.consumed += 1
            mark = len(held) if held is not None else 0
            try:
                if poisoned and (refused := poisoned.pop((topic, partition, offset), None)) is not None:
                    raise refused
                raw = msg.value()
                if raw is None:
                    raise DecodeError("null value (tombstone): a message must carry a body")
                try:
                    value = route.decode(raw)
                except (msgspec.DecodeError, RecursionError) as exc:
                    raise DecodeError(f"not a valid {route.type_name}: {exc}") from None
                attempt = 0
                if in_place:
                    waiting = in_place.get(tp)
                    if waiting is not None and waiting[0] == offset:
                        attempt = waiting[1] + 1
                timed = route.timed
                if hook_scope:
                    self._handle_scoped(route, value, msg, Context(plugin, msg, send, state, attempt))
                elif timed is None:
                    done = route.handler(value, Context(plugin, msg, send, state, attempt))
                    if route.asynchronous:
                        self.loop.run(done)
                else:
                    start = perf()
                    done = route.handler(value, Context(plugin, msg, send, state, attempt))
                    if route.asynchronous:
                        self.loop.run(done)
                    timed(perf() - start)
            except (CircuitOpenError, StoreConflict) as exc:
                batch.drop(mark)
                self.partitions.pause(tp, offset, exc.retry_at, pause_reason(exc))
                blocked.add(tp)
                if self._hook_failed:
                    self.host.message_failed(plugin, msg, exc, "paused")
                continue
            except Exception as exc:
                batch.drop(mark)
                if not self._fail(batch, route, msg, tp, offset, exc):
                    continue
            else:
                route.ok += 1
                if in_place:
                    in_place.pop(tp, None)
                if hook_handled:
                    self.host.message_handled(plugin, msg, value)
            last[tp] = offset

    def _handle_scoped(self, route: _Route, value: Any, msg: Message, ctx: Context[Any]) -> None:
        """Run a handler inside the observers' scope for its message (``kafkaworkers_message_scope``)."""
        start = time.perf_counter()
        with self.host.message_scope(self.plugin, msg):
            done = route.handler(value, ctx)
            if route.asynchronous:
                # The event loop's task copies this thread's context variables, the scope's too.
                self.loop.run(done)
        if route.duration is not None:
            route.duration.observe(time.perf_counter() - start)

    def producing(self, send: Callable[..., None]) -> Callable[..., None]:
        """``send`` that first lets observers add headers to what a handler produces
        (``kafkaworkers_message_producing``); used only when one implements it."""
        host, plugin = self.host, self.plugin

        def producing(topic: str, value: bytes | None, key: bytes | None, headers: Headers) -> None:
            host.message_producing(plugin, topic, key, headers)
            send(topic, value, key, headers)

        return producing

    def _handle_in(self, scope: AbstractContextManager[object], batch: Batch, messages: list[Message]) -> None:
        """:meth:`_handle` inside the plugin's batch scope, producing only after the scope committed.

        Messages are held until then, so nothing downstream ever sees the effect of work the
        plugin then rolled back. If the scope cannot begin or commit, nothing of the batch
        counts as done: nothing is produced and every partition is rewound to its first offset.
        """
        try:
            with scope:
                self._handle(batch, messages)
        except BrokerUnavailable:
            raise
        except Exception as exc:
            batch.discard()
            batch.scope_error = f"{type(exc).__name__}: {exc}"
            for msg in messages:
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                if msg.error() is None and topic is not None and partition is not None and offset is not None:
                    batch.first.setdefault((topic, partition), offset)
            return
        batch.release()

    def _retry_route(self, batch: Batch, msg: Message, tp: TP, offset: int) -> _Route | None:
        """The route of a message from a retry topic; ``None`` after pausing until it is due, or
        after dead-lettering one whose original topic this plugin no longer handles."""
        headers = parse_headers(msg.headers())
        wait = number(headers.get(H_DUE)) / 1000 - self.clock.time()
        if wait > 0:
            self.partitions.pause(tp, offset, self.clock.monotonic() + wait, RETRY_NOT_DUE, quiet=True)
            batch.blocked.add(tp)
            return None
        original = headers.get(H_ORIGINAL_TOPIC, b"").decode("utf-8", "replace")
        route = self.routes.get(original)
        if route is None:
            # The plugin no longer consumes the original topic: nothing can handle it.
            error = PluginError(f"no handler for original topic {original!r}")
            self.router.dead_letter(msg, original or tp[0], error, batch.write)
            batch.first.setdefault(tp, offset)
            batch.last[tp] = offset
            if self._hook_failed:
                self.host.message_failed(self.plugin, msg, error, "dead_lettered")
            return None
        return route

    def _fail(self, batch: Batch, route: _Route, msg: Message, tp: TP, offset: int, error: Exception) -> bool:
        """Route a failed message by the retry policy; whether it is done (its offset may be stored)."""
        attempt = 0
        if self.router.policy.mode == "pause":
            at, failed = self._in_place.get(tp, (-1, 0))
            attempt = failed + 1 if at == offset else 1
        decision = self.router.fail(msg, route.topic, error, batch.write, attempt)
        if decision.action == "retry" and not self.router.retry_topics:
            self._in_place[tp] = (offset, attempt)
            until = self.clock.monotonic() + decision.delay
            self.partitions.pause(tp, offset, until, f"{RETRY_IN_PLACE} (attempt {attempt})", quiet=True)
            batch.blocked.add(tp)
            outcome = "paused"
        elif decision.action == "retry":
            route.retried += 1
            outcome = "retried"
        else:
            self._in_place.pop(tp, None)
            route.dead += 1
            outcome = "dead_lettered"
        if self._hook_failed:
            self.host.message_failed(self.plugin, msg, error, outcome)
        return outcome != "paused"

    def _consumer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise BrokerUnavailable(f"{self.plugin.name}: fatal consumer error: {err.str()}")
        if err.code() in _UNREACHABLE:
            self.broker_down = True
        self._log_error(err)

    def _log_error(self, err: KafkaError) -> None:
        # librdkafka reports a broker outage on every poll until it recovers by itself:
        # say it once per error kind and interval, not twice a second.
        now = self.clock.monotonic()
        if now - self._error_logged.get(err.code(), -_ERROR_LOG_INTERVAL) >= _ERROR_LOG_INTERVAL:
            self._error_logged[err.code()] = now
            log.warning("%s: consumer error (librdkafka retries by itself): %s", self.plugin.name, err.str())

    def _publish_counts(self, batch: int) -> None:
        metrics = self.metrics
        if metrics is None:
            for route in self.routes.values():
                route.consumed = route.ok = route.retried = route.dead = 0
            self._produced.clear()
            return
        metrics.batch_size.observe(batch)
        for route in self.routes.values():
            if route.duration is not None:
                route.duration.settle()
            if route.consumed:
                metrics.consumed(route.topic).inc(route.consumed)
            for outcome, count in (("ok", route.ok), ("retried", route.retried), ("dead_lettered", route.dead)):
                if count:
                    metrics.handled(route.topic, outcome).inc(count)
            route.consumed = route.ok = route.retried = route.dead = 0
        for topic, count in self._produced.items():
            metrics.produced(topic).inc(count)
        self._produced.clear()


class Worker:
    """Runs plugins until :meth:`stop`: start-up, the loop, and a clean shutdown.

    :param plugins: the worker plugins to run, one consumer group each.
    :param settings: resolved settings.
    :param host: the plugin host, for observer hooks.
    :param transport: the broker; by default chosen from ``settings.bootstrap_servers``.
    :param metrics: where to count; ``None`` turns metrics off.
    :param clock: the clocks of pauses and retry due times (tests pass a manual one).
    :param control: obey ``kafkaworkers control`` commands from ``settings.control_topic``
        (:mod:`kafkaworkers.control`); ``kafkaworkers run`` turns it on.
    """

    def __init__(
        self,
        plugins: list[Plugin[Any]],
        settings: Settings,
        host: PluginHost,
        transport: Transport | None = None,
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM_CLOCK,
        control: bool = False,
    ) -> None:
        if settings.group_id and len(plugins) > 1:
            raise PluginError("--group-id names one group; it cannot be shared by several plugins")
        self.plugins = plugins
        self.settings = settings
        self.host = host
        self.transport = transport or transport_for(settings.bootstrap_servers)
        self.metrics = metrics
        self.clock = clock
        self.runners: list[PluginRunner] = []
        self.last_beat = time.monotonic()
        self.broker_reached = False
        self._running = False
        self._stopped = False
        self._started: list[tuple[Plugin[Any], Any]] = []
        self._broker_checked = 0.0
        self._stop_requested = 0.0
        #: set by a handler running concurrently when it finishes, to wake an idle loop
        self.completed = threading.Event()
        self._topics: dict[str, int] = {}
        self._admin: Any = None
        self._producer: Any = None
        #: in exactly-once mode, the worker's transactional producer and its open transaction
        self.txn: Transactions | None = None
        #: where this process serves /metrics, for the answers to ``control ping``
        self.metrics_url: str | None = None
        self._control_wanted = control
        self._control: ControlChannel | None = None

    @property
    def ready(self) -> bool:
        """Whether the worker reached the broker and joined every group (see :meth:`readiness`)."""
        return self.readiness()[0]

    def readiness(self) -> tuple[bool, str]:
        """Whether the worker reached the broker and joined every group, and if not, why."""
        if not self.broker_reached:
            return False, "broker not reached yet"
        down = [r.plugin.name for r in self.runners if r.broker_down]
        if down:
            return False, f"the broker at {self.settings.bootstrap_servers} is unreachable ({', '.join(down)})"
        waiting = [r.plugin.name for r in self.runners if not r.joined]
        if waiting or not self.runners:
            return False, "waiting to join groups: " + ", ".join(waiting or ["starting"])
        # Paused on purpose: alive, but not doing its work, which a rollout or an alert should see.
        held = [f"{r.partitions.hold_reason} ({r.plugin.name})" for r in self.runners if r.partitions.hold_reason]
        if held:
            return False, ", ".join(held)
        return True, "ready"

    def alive(self, timeout: float) -> tuple[bool, str]:
        """Whether the loop finished an iteration within ``timeout`` seconds."""
        since = time.monotonic() - self.last_beat
        if since > timeout:
            return False, f"consumer loop has not completed an iteration for {since:.0f} s"
        return True, "alive"

    def stop(self) -> None:
        """Ask the loop to stop after the batch in hand (safe from a signal handler)."""
        if self._running:
            log.info("stop requested: finishing the batch in hand, then flushing and committing")
        self._running = False
        self._stop_requested = time.monotonic()

    def run(self, broker_wait: float = 30.0) -> None:
        """Start, loop until :meth:`stop`, then flush, commit, leave the groups and stop the plugins."""
        try:
            self.start(broker_wait)
            while self._running:
                self.run_once()
        finally:
            self.close()

    def start(self, broker_wait: float = 30.0) -> None:
        """Reach the broker, start the plugins, subscribe; call :meth:`run_once` next.

        A plugin whose start-up fails raises :class:`PluginError` naming it; :meth:`close`
        then stops the plugins that did start.
        """
        self._running = True
        self._wait_for_broker(broker_wait)
        self._producer = shared_producer(self.settings, self.transport)
        self.txn = self._transactions()
        if self.metrics is not None:
            self.host.on_observer_error = self.metrics.observer_failed
        data_root = Path(self.settings.data_dir)
        for plugin in self.plugins:
            env = PluginEnv(
                plugin.name,
                self.settings.plugin_config(plugin.name),
                data_root / plugin.name,
                self.settings.database_url_for(plugin.name),
            )
            try:
                state = plugin.start(env)
            except Exception as exc:
                raise PluginError(f"plugin {plugin.name!r} failed to start: {type(exc).__name__}: {exc}") from exc
            self._started.append((plugin, state))
            plugin_metrics = None
            if self.metrics is not None:
                plugin_metrics = self.metrics.for_plugin(plugin.name)
                for breaker in plugin.breakers.values():
                    plugin_metrics.watch_breaker(breaker)
                self.host.register_metrics(self.metrics.registry, plugin)
            txn = self.txn if self.settings.guarantee_for(plugin.name) == "exactly_once" else None
            runner = PluginRunner(
                plugin,
                self.settings,
                self.host,
                txn.producer if txn is not None else self._producer,
                self.transport,
                plugin_metrics,
                state=state,
                clock=self.clock,
                completed=self.completed,
                txn=txn,
            )
            self.runners.append(runner)
        self._ensure_internal_topics()
        for runner in self.runners:
            runner.subscribe()
        if self._control_wanted:
            self._control = ControlChannel.open(self)
        self.host.worker_started(self)
        # What start-up made (modules, plugin state, clients) lives until close: frozen, the
        # collector's full passes during the loop skip it. On a 230-byte message, W3-small's
        # profile showed 0.43 us per message in the collector without this, 0.11 us with it.
        gc.freeze()
        if gc.get_threshold() == _PYTHON_GC_THRESHOLDS:  # a plugin that chose its own keeps it
            gc.set_threshold(*_GC_THRESHOLDS)
        log.info("worker started: %s", ", ".join(p.name for p in self.plugins))

    def _transactions(self) -> Transactions | None:
        """Exactly-once plugins share one transactional producer, its id stable across restarts."""
        exact = [p.name for p in self.plugins if self.settings.guarantee_for(p.name) == "exactly_once"]
        if not exact:
            return None
        if self.transport.name != "kafka":
            raise ConfigError("processing_guarantee exactly_once needs Kafka: the in-memory broker has no transactions")
        groups = [self.settings.group_for(name) for name in exact]
        tid = transactional_id(groups, int(os.environ.get(ENV_INDEX) or 0))
        # librdkafka wants a message's delivery timeout within its transaction's.
        extra = {
            "transactional.id": tid,
            "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
            "message.timeout.ms": TRANSACTION_TIMEOUT_MS,
        }
        producer = create_producer(self.settings, extra, transport=self.transport)
        txn = Transactions(producer, self.settings.transaction_interval_ms / 1000)
        txn.start()
        log.info("exactly-once for %s: transactional id %s", ", ".join(exact), tid)
        return txn

    def run_once(self, timeout: float | None = None) -> int:
        """One batch step of every plugin; return how many messages they handled."""
        self.last_beat = now = time.monotonic()
        if self._control is not None and now >= self._control.due:
            self._control.check(now)  # between batches, on this thread: the consumers are never shared
        if timeout is None:
            timeout = self.settings.poll_timeout / max(len(self.runners), 1)
        # With handlers running, no consumer may block the loop: their results are sent and
        # their offsets stored only when the loop gets back to them.
        in_flight = any(runner.dispatcher is not None and runner.dispatcher.in_flight for runner in self.runners)
        handled = sum(runner.step(0.0 if in_flight else timeout, self.flush) for runner in self.runners)
        if in_flight and not handled:
            gathering = any(runner.dispatcher is not None and runner.dispatcher.gathering for runner in self.runners)
            self.completed.wait(min(timeout, GATHER_WAIT if gathering else _IN_FLIGHT_WAIT))
        self.completed.clear()
        if not handled:
            self._check_broker()
        return handled

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every produced message is acknowledged or failed (at most ``timeout``
        seconds), beating the liveness clock; return how many are still waiting."""
        producers = [self._producer] if self.txn is None else [self._producer, self.txn.producer]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is None and not self._running:
                # Stopping: the batch in hand may wait for the broker half the grace, no longer.
                deadline = self._stop_requested + self.settings.shutdown_grace / 2
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            waiting = sum(int(producer.flush(max(left, 0.0))) for producer in producers)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                return waiting
            self.last_beat = time.monotonic()
            # Still waiting after a second: the broker may be gone; readiness should say so.
            self._check_broker()

    def close(self) -> None:
        """Flush, commit, leave the groups and stop the plugins that started (idempotent), within
        ``shutdown_grace``: with the broker down, what was not acknowledged by then is handled
        again by the next owner, as after a crash."""
        if self._stopped:
            return
        self._stopped = True
        gc.unfreeze()
        if self._control is not None:
            self._control.close()
        if self.runners:
            grace = self.settings.shutdown_grace
            log.info("worker stopping: flushing and committing (at most %.0f s)", grace)
            deadline = time.monotonic() + grace
            self.host.worker_stopping(self)
            for runner in self.runners:
                if runner.dispatcher is not None:
                    runner.dispatcher.drain(time.monotonic() + grace / 2)
            waiting = self.flush(timeout=max(0.0, deadline - time.monotonic()) / 2)
            if waiting:
                log.warning("%d produced message(s) not acknowledged within the grace; they will be redone", waiting)
            reachable = not any(runner.broker_down for runner in self.runners)
            # What an open transaction holds is finished work: commit it, unless the broker is gone.
            if self.txn is not None and self.txn.open and not (reachable and self.txn.commit()):
                self.txn.abort()
            for runner in self.runners:
                runner.close(commit=reachable and time.monotonic() < deadline)
        for runner in self.runners:
            runner.loop.close()
        for plugin, state in reversed(self._started):
            try:
                plugin.stop(state)
            except Exception:
                log.exception("%s: on_stop failed", plugin.name)
        if self.runners:
            log.info("worker stopped")

    def _wait_for_broker(self, wait: float) -> None:
        """Reach the broker within ``wait`` seconds, saying what it waits for while it does."""
        admin = self.transport.admin(admin_config(self.settings))
        start = time.monotonic()
        deadline = start + wait
        while True:
            try:
                self._topics = admin.list_topics(timeout=min(5.0, max(wait, 0.1)))
                break
            except BrokerUnavailable as exc:
                now = time.monotonic()
                if now >= deadline or not self._running:
                    raise
                servers = self.settings.bootstrap_servers
                log.warning("waiting for the broker at %s: %s (%.0f s left)", servers, exc, deadline - now)
                self.last_beat = now
        self._admin = admin
        self.broker_reached = True
        self._broker_checked = time.monotonic()

    def _check_broker(self) -> None:
        """While the loop is idle, ask the cluster for its topics now and then: a quiet topic
        gives no other sign of whether the broker is there. librdkafka's own report of every
        broker down (``error_cb``) marks it at once; this notices what that misses, and the
        return."""
        now = time.monotonic()
        if now - self._broker_checked < _BROKER_CHECK_INTERVAL or self._admin is None:
            return
        self._broker_checked = now
        try:
            self._admin.list_topics(timeout=1.0)
            reachable = True
        except BrokerUnavailable:
            reachable = False
        for runner in self.runners:
            runner.broker_down = not reachable

    def _ensure_internal_topics(self) -> None:
        """Create missing retry and dead-letter topics, sized like the plugin's largest source
        topic, or like ``topics create`` sizes topics by default when no source exists yet."""
        wanted = []
        for runner in self.runners:
            sizes = [self._topics[t] for t in runner.routes if t in self._topics]
            partitions = max(sizes, default=DEFAULT_PARTITIONS)
            new = [t for t in [*runner.retry_topics, runner.dlq] if t not in self._topics]
            # -1: the broker's default replication factor.
            wanted += [(topic, partitions, -1) for topic in new]
            if new and not sizes:
                log.warning(
                    "%s: no source topic exists yet to size %s by: creating them with %d partitions;"
                    " `kafkaworkers topics create --partitions N` flags any that differ from N",
                    runner.plugin.name, ", ".join(new), partitions,
                )  # fmt: skip
            missing = [t for t in [*runner.routes, *runner.plugin.produced] if t not in self._topics]
            if missing:
                log.warning(
                    "%s: topics %s do not exist yet; create them with `kafkaworkers topics create`",
                    runner.plugin.name, ", ".join(missing),
                )  # fmt: skip
        if wanted:
            self._admin.create_topics(wanted)


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)
