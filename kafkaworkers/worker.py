"""The consumer loop: poll a batch, decode, handle, produce, flush, store offsets.

One :class:`Worker` runs one or more plugins in one thread, each plugin with its own
consumer in its own group, all sharing the process's producer. The order of a batch is the
whole delivery guarantee:

1. ``consume`` a batch; skip partitions that are paused (a retry not yet due, an open breaker);
2. decode and handle each message, inside the plugin's ``around_batch`` scope if it has one
   (a database transaction committed once per batch); a failure is re-published to a retry
   or dead-letter topic instead (:mod:`kafkaworkers.retry`);
3. ``flush`` the producer: every message the handlers, retries and dead letters produced is
   acknowledged by the broker, or failed;
4. only then store each partition's next offset (librdkafka commits stored offsets in the
   background); if any delivery failed, or the scope failed to begin or commit, store
   nothing and rewind the batch's partitions.

A crash anywhere re-delivers from the last stored offset: at-least-once, nothing lost.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import msgspec
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from kafkaworkers.api import Context, Plugin, PluginEnv, Subscription, parse_headers
from kafkaworkers.config import Settings
from kafkaworkers.consumer import create_consumer
from kafkaworkers.errors import BrokerUnavailable, CircuitOpenError, DecodeError, PluginError
from kafkaworkers.headers import H_ATTEMPT, H_DUE, H_ORIGINAL_TOPIC
from kafkaworkers.metrics import LAG_STATS_INTERVAL_MS, Metrics, PluginMetrics
from kafkaworkers.plugins import PluginHost
from kafkaworkers.producer import shared_producer
from kafkaworkers.retry import dlq_topic, failure_headers, retry_topic
from kafkaworkers.transports import Message, Producer, Transport, transport_for

__all__ = ["PluginRunner", "Worker"]

log = logging.getLogger(__name__)

#: A dead letter larger than this is stored cut, with a header saying so; the original bytes
#: stay in the source topic at the offset the headers name.
DLQ_MAX_VALUE = 512 * 1024
_MAX_REWIND_BACKOFF = 30.0
_ERROR_LOG_INTERVAL = 10.0


class _Route:
    """A consumed topic's handler with its metric children, resolved once per plugin."""

    __slots__ = ("consumed", "dead", "decoder", "duration", "handler", "ok", "retried", "subscription", "topic")

    def __init__(self, subscription: Subscription[Any], metrics: PluginMetrics | None) -> None:
        self.subscription = subscription
        self.topic = subscription.topic
        self.decoder = subscription.decoder
        self.handler = subscription.handler
        self.duration = metrics.duration(self.topic) if metrics else None
        self.consumed = self.ok = self.retried = self.dead = 0


class PluginRunner:
    """One plugin's consumer and the batch step that drives it."""

    def __init__(
        self,
        plugin: Plugin,
        settings: Settings,
        host: PluginHost,
        producer: Producer,
        transport: Transport,
        metrics: PluginMetrics | None,
        state: Any = None,
    ) -> None:
        self.plugin = plugin
        self.state = state  # what the plugin's on_start returned: ctx.state, and its batch scope's
        self.group = settings.group_for(plugin.name)
        self.host = host
        self.producer = producer
        self.metrics = metrics
        self.batch_size = settings.batch_size
        self.routes = {t: _Route(s, metrics) for t, s in plugin.subscriptions.items()}
        self.retry_topics = [retry_topic(self.group, i + 1) for i in range(len(plugin.retry.delays))]
        self.dlq = dlq_topic(self.group)
        stats = self._stats_config(settings)
        self.consumer = create_consumer(settings, self.group, stats, transport=transport)
        # Retry topics get a consumer (and group) of their own: sticky assignment balances the
        # partition count over all subscribed topics, so with one consumer a second process
        # could end up holding only retry partitions and scaling out would add no parallelism.
        self.retry_consumer = (
            create_consumer(settings, f"{self.group}-retry", stats, transport=transport) if self.retry_topics else None
        )
        self.consumers = [c for c in (self.consumer, self.retry_consumer) if c is not None]
        self.assignment: set[tuple[str, int]] = set()
        self.paused: dict[tuple[str, int], float] = {}
        self._joined: set[int] = set()
        self._delivery_errors = 0
        self._scope_error: str | None = None
        self._rewind_backoff = 0.0
        self._error_logged: dict[int, float] = {}
        self._produced: dict[str, int] = defaultdict(int)
        self._send = self._make_send()
        # Where handlers, retries and dead letters produce to: the producer, or, while a batch
        # scope is open, a list sent once the scope has committed.
        self._out = self._send
        self._hook_handled = host.has_impl("kafkaworkers_message_handled")
        self._hook_failed = host.has_impl("kafkaworkers_message_failed")
        self._hook_batch = host.has_impl("kafkaworkers_batch_received")

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

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._joined.add(id(consumer))
        self.assignment.update((tp.topic, tp.partition) for tp in partitions)
        if self.metrics:
            self.metrics.assigned.set(len(self.assignment))
        if partitions:
            log.info("%s: assigned %s", self.plugin.name, _fmt(partitions))
            self.host.partitions_assigned(self.plugin, partitions)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # Revocation happens inside consume(), so the previous batch is finished and its
        # offsets stored: commit them now, before another member takes the partitions.
        self._commit(consumer)
        self._forget(partitions)
        if partitions:
            log.info("%s: revoked %s", self.plugin.name, _fmt(partitions))
            self.host.partitions_revoked(self.plugin, partitions)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.warning("%s: lost %s; their uncommitted work will be redone", self.plugin.name, _fmt(partitions))
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.assignment.discard(key)
            self.paused.pop(key, None)
            if self.metrics:
                self.metrics.forget_lag(tp.topic, tp.partition)
        if self.metrics:
            self.metrics.assigned.set(len(self.assignment))
            self.metrics.paused.set(len(self.paused))

    # --- consumer lag (librdkafka statistics) ------------------------------------------

    def _stats_config(self, settings: Settings) -> dict[str, Any] | None:
        """With metrics on: librdkafka's statistics every few seconds, to :meth:`_on_stats`."""
        if self.metrics is None:
            return None
        config: dict[str, Any] = {"stats_cb": self._on_stats}
        if "statistics.interval.ms" not in settings.consumer and "statistics.interval.ms" not in settings.kafka:
            config["statistics.interval.ms"] = LAG_STATS_INTERVAL_MS
        return config

    def _on_stats(self, stats: str) -> None:
        """librdkafka's statistics, delivered inside consume() on this thread: update the lag gauges."""
        if self.metrics is not None:
            self.metrics.update_lag(stats, self.assignment)

    def commit(self) -> None:
        """Commit the stored offsets now (shutdown)."""
        for consumer in self.consumers:
            self._commit(consumer)

    def close(self) -> None:
        """Commit, then leave the groups."""
        self.commit()
        for consumer in self.consumers:
            consumer.close()

    def _commit(self, consumer: Any) -> None:
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("%s: commit failed: %s", self.plugin.name, exc.args[0].str())

    def _consumer_of(self, topic: str) -> Any:
        return self.consumer if topic in self.routes else self.retry_consumer

    # --- the batch step --------------------------------------------------------------

    def step(self, timeout: float, flush: Callable[[], None]) -> int:
        """Consume and finish one batch; return how many messages it held."""
        if self.paused:
            self._resume_due()
        messages = self._fetch(timeout)
        if not messages:
            return 0
        if self._hook_batch:
            self.host.batch_received(self.plugin, messages)
        scope = self.plugin.batch_scope(self.state)
        first, last = self._handle(messages) if scope is None else self._handle_in(scope, messages)
        flush()
        if self._delivery_errors or self._scope_error:
            self._rewind(first)
        elif last:
            self._rewind_backoff = 0.0
            self._store(last)
        self._publish_counts(len(messages))
        return len(messages)

    def _fetch(self, timeout: float) -> list[Message]:
        """What is waiting, up to a batch; block up to ``timeout`` only while nothing is.

        ``consume(n, timeout)`` waits until it has ``n`` messages, which at a low rate would
        hold every message back for the whole timeout: wait for one, then take the rest.
        """
        consumer = self.consumer
        messages = consumer.consume(self.batch_size, 0)
        if not messages:
            messages = consumer.consume(1, timeout)
            if messages and self.batch_size > 1:
                messages += consumer.consume(self.batch_size - 1, 0)
        if self.retry_consumer is not None:
            messages += self.retry_consumer.consume(self.batch_size, 0)
        return messages

    def _handle(
        self, messages: list[Message], held: list[tuple[Any, ...]] | None = None
    ) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
        """Decode and handle each message; ``held`` (inside a batch scope) collects what they
        produce, and loses what a failed message produced, as its writes are rolled back."""
        routes = self.routes
        plugin = self.plugin
        send = self._out
        state = self.state
        first: dict[tuple[str, int], int] = {}
        last: dict[tuple[str, int], int] = {}
        blocked: set[tuple[str, int]] = set()
        perf = time.perf_counter
        for msg in messages:
            if msg.error() is not None:
                self._consumer_error(msg)
                continue
            tp = (msg.topic(), msg.partition())
            if tp in blocked:
                continue
            offset = msg.offset()
            route = routes.get(tp[0])
            if route is None:
                route = self._retry_route(msg, tp, offset)
                if route is None:
                    blocked.add(tp)
                    continue
                if route is _DEAD:
                    first.setdefault(tp, offset)
                    last[tp] = offset
                    continue
            if tp not in first:
                first[tp] = offset
            route.consumed += 1
            mark = len(held) if held is not None else 0
            try:
                raw = msg.value()
                if raw is None:
                    raise DecodeError("null value (tombstone): a message must carry a body")
                try:
                    value = route.decoder.decode(raw)
                except (msgspec.DecodeError, RecursionError) as exc:
                    raise DecodeError(f"not a valid {route.subscription.type.__name__}: {exc}") from None
                start = perf()
                route.handler(value, Context(plugin, msg, send, state))
                if route.duration is not None:
                    route.duration.observe(perf() - start)
                route.ok += 1
                if self._hook_handled:
                    self.host.message_handled(plugin, msg, value)
            except CircuitOpenError as exc:
                if held is not None:
                    del held[mark:]
                self._pause(tp, offset, exc.retry_at, f"breaker {exc.breaker!r} is open")
                blocked.add(tp)
                if self._hook_failed:
                    self.host.message_failed(plugin, msg, exc, "paused")
                continue
            except Exception as exc:
                if held is not None:
                    del held[mark:]
                self._fail(route, msg, tp, exc)
            last[tp] = offset
        return first, last

    def _handle_in(
        self, scope: AbstractContextManager[object], messages: list[Message]
    ) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
        """:meth:`_handle` inside the plugin's batch scope, producing only after the scope committed.

        Messages are held until then, so nothing downstream ever sees the effect of work the
        plugin then rolled back. If the scope cannot begin or commit, nothing of the batch
        counts as done: nothing is produced and every partition is rewound to its first offset.
        """
        pending: list[tuple[Any, ...]] = []

        def hold(*message: Any) -> None:
            pending.append(message)

        self._out = hold
        try:
            with scope:
                first, last = self._handle(messages, pending)
        except BrokerUnavailable:
            raise
        except Exception as exc:
            self._scope_error = f"{type(exc).__name__}: {exc}"
            first = {}
            for msg in messages:
                if msg.error() is None:
                    first.setdefault((msg.topic(), msg.partition()), msg.offset())
            return first, {}
        finally:
            self._out = self._send
        send = self._send
        for message in pending:
            send(*message)
        return first, last

    def _retry_route(self, msg: Message, tp: tuple[str, int], offset: int) -> _Route | None:
        """The route of a message from a retry topic, or ``None`` after pausing until it is due."""
        headers = parse_headers(msg.headers())
        wait = _number(headers.get(H_DUE)) / 1000 - time.time()
        if wait > 0:
            self._pause(tp, offset, time.monotonic() + wait, None)
            return None
        original = headers.get(H_ORIGINAL_TOPIC, b"").decode("utf-8", "replace")
        route = self.routes.get(original)
        if route is None:
            # The plugin no longer consumes the original topic: nothing can handle it.
            route = next(iter(self.routes.values()))
            self._fail(route, msg, tp, PluginError(f"no handler for original topic {original!r}"))
            return _DEAD
        return route

    def _fail(self, route: _Route, msg: Message, tp: tuple[str, int], error: Exception) -> None:
        """Re-publish a failed message to its retry topic or the dead-letter topic."""
        from_retry = tp[0] not in self.routes
        source = parse_headers(msg.headers())
        if not from_retry:
            # kw- bookkeeping on a main topic was copied or forged: the origin is this message.
            source = {k: v for k, v in source.items() if not k.startswith("kw-") or k == "kw-correlation-id"}
        attempt = _number(source.get(H_ATTEMPT)) + 1 if from_retry else 1
        decision = self.plugin.retry.decide(error, attempt)
        due_ms = int((time.time() + decision.delay) * 1000) if decision.action == "retry" else None
        headers = failure_headers(
            source,
            topic=route.topic,
            partition=tp[1],
            offset=msg.offset(),
            timestamp_ms=msg.timestamp()[1],
            plugin=self.plugin.name,
            attempt=attempt,
            error=error,
            due_ms=due_ms,
        )
        value = msg.value()
        if decision.action == "retry":
            self._out(retry_topic(self.group, decision.level), value, msg.key(), headers)
            route.retried += 1
            outcome = "retried"
            log.info(
                "%s: %s[%d]@%d failed (attempt %d), retry in %.1f s: %s: %s",
                self.plugin.name, tp[0], tp[1], msg.offset(), attempt, decision.delay,
                type(error).__name__, error, extra=_extra(self.plugin, tp, msg),
            )  # fmt: skip
        else:
            if value is not None and len(value) > DLQ_MAX_VALUE:
                value = value[:DLQ_MAX_VALUE]
                headers.append(("kw-value-truncated", str(len(msg.value() or b"")).encode()))
            self._out(self.dlq, value, msg.key(), headers)
            route.dead += 1
            outcome = "dead_lettered"
            log.warning(
                "%s: %s[%d]@%d dead-lettered after %d attempt(s): %s: %s",
                self.plugin.name, tp[0], tp[1], msg.offset(), attempt, type(error).__name__, error,
                extra=_extra(self.plugin, tp, msg),
            )  # fmt: skip
        if self._hook_failed:
            self.host.message_failed(self.plugin, msg, error, outcome)

    def _consumer_error(self, msg: Message) -> None:
        err = msg.error()
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise BrokerUnavailable(f"{self.plugin.name}: fatal consumer error: {err.str()}")
        # librdkafka reports a broker outage on every poll until it recovers by itself:
        # say it once per error kind and interval, not twice a second.
        now = time.monotonic()
        if now - self._error_logged.get(err.code(), -_ERROR_LOG_INTERVAL) >= _ERROR_LOG_INTERVAL:
            self._error_logged[err.code()] = now
            log.warning("%s: consumer error (librdkafka retries by itself): %s", self.plugin.name, err.str())

    # --- pausing, rewinding, storing -------------------------------------------------

    def _pause(self, tp: tuple[str, int], offset: int, until: float, reason: str | None) -> None:
        """Pause a partition and rewind it to ``offset``: what was prefetched is fetched again."""
        part = TopicPartition(tp[0], tp[1], offset)
        consumer = self._consumer_of(tp[0])
        consumer.pause([part])
        consumer.seek(part)
        self.paused[tp] = until
        if reason:
            log.warning("%s: paused %s[%d] at %d: %s", self.plugin.name, tp[0], tp[1], offset, reason)
        if self.metrics:
            self.metrics.paused.set(len(self.paused))

    def _resume_due(self) -> None:
        now = time.monotonic()
        due = [tp for tp, until in self.paused.items() if until <= now]
        if not due:
            return
        for tp in due:
            del self.paused[tp]
            self._consumer_of(tp[0]).resume([TopicPartition(*tp)])
        if self.metrics:
            self.metrics.paused.set(len(self.paused))

    def _rewind(self, first: dict[tuple[str, int], int]) -> None:
        """A delivery or the batch scope failed: store nothing, re-handle the batch after a growing pause."""
        if self._scope_error:
            reason = f"its around_batch scope failed ({self._scope_error})"
        else:
            reason = f"{self._delivery_errors} produced message(s) were not acknowledged"
        log.warning("%s: %s; re-handling the batch in %.1f s", self.plugin.name, reason, self._rewind_backoff or 0.5)
        self._delivery_errors = 0
        self._scope_error = None
        self._rewind_backoff = min(max(self._rewind_backoff * 2, 0.5), _MAX_REWIND_BACKOFF)
        until = time.monotonic() + self._rewind_backoff
        for tp, offset in first.items():
            self._pause(tp, offset, until, None)

    def _store(self, last: dict[tuple[str, int], int]) -> None:
        main = [TopicPartition(t, p, o + 1) for (t, p), o in last.items() if t in self.routes]
        retries = [TopicPartition(t, p, o + 1) for (t, p), o in last.items() if t not in self.routes]
        for consumer, offsets in ((self.consumer, main), (self.retry_consumer, retries)):
            if not offsets:
                continue
            try:
                consumer.store_offsets(offsets=offsets)
            except KafkaException as exc:
                # A partition revoked meanwhile: its next owner re-handles from the committed offset.
                log.info("%s: could not store offsets: %s", self.plugin.name, exc.args[0].str())

    def _publish_counts(self, batch: int) -> None:
        metrics = self.metrics
        if metrics is None:
            for route in self.routes.values():
                route.consumed = route.ok = route.retried = route.dead = 0
            self._produced.clear()
            return
        metrics.batch_size.observe(batch)
        for route in self.routes.values():
            if route.consumed:
                metrics.consumed(route.topic).inc(route.consumed)
            for outcome, count in (("ok", route.ok), ("retried", route.retried), ("dead_lettered", route.dead)):
                if count:
                    metrics.handled(route.topic, outcome).inc(count)
            route.consumed = route.ok = route.retried = route.dead = 0
        for topic, count in self._produced.items():
            metrics.produced(topic).inc(count)
        self._produced.clear()

    # --- producing -------------------------------------------------------------------

    def _make_send(self) -> Callable[[str, bytes | None, bytes | None, list[tuple[str, bytes]]], None]:
        produce = self.producer.produce
        poll = self.producer.poll
        produced = self._produced
        on_delivery = self._on_delivery

        def send(topic: str, value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
            while True:
                try:
                    produce(topic, value, key, headers=headers or None, on_delivery=on_delivery)
                    break
                except BufferError:
                    # The local queue is full: serve delivery reports until there is room.
                    poll(0.1)
            produced[topic] += 1

        return send

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._delivery_errors += 1
            if self._delivery_errors == 1:
                log.warning("%s: delivery to %s failed: %s", self.plugin.name, msg.topic(), err.str())


class Worker:
    """Runs plugins until :meth:`stop`: start-up, the loop, and a clean shutdown.

    :param plugins: the worker plugins to run, one consumer group each.
    :param settings: resolved settings.
    :param host: the plugin host, for observer hooks.
    :param transport: the broker; by default chosen from ``settings.bootstrap_servers``.
    :param metrics: where to count; ``None`` turns metrics off.
    """

    def __init__(
        self,
        plugins: list[Plugin],
        settings: Settings,
        host: PluginHost,
        transport: Transport | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if settings.group_id and len(plugins) > 1:
            raise PluginError("--group-id names one group; it cannot be shared by several plugins")
        self.plugins = plugins
        self.settings = settings
        self.host = host
        self.transport = transport or transport_for(settings.bootstrap_servers)
        self.metrics = metrics
        self.runners: list[PluginRunner] = []
        self.last_beat = time.monotonic()
        self.broker_reached = False
        self._running = False
        self._stopped = False
        self._topics: dict[str, int] = {}
        self._admin: Any = None
        self._producer: Any = None

    @property
    def ready(self) -> tuple[bool, str]:
        """Whether the worker reached the broker and joined every group, and if not, why."""
        if not self.broker_reached:
            return False, "broker not reached yet"
        waiting = [r.plugin.name for r in self.runners if not r.joined]
        if waiting or not self.runners:
            return False, "waiting to join groups: " + ", ".join(waiting or ["starting"])
        return True, "ready"

    def alive(self, timeout: float) -> tuple[bool, str]:
        """Whether the loop finished an iteration within ``timeout`` seconds."""
        since = time.monotonic() - self.last_beat
        if since > timeout:
            return False, f"consumer loop has not completed an iteration for {since:.0f} s"
        return True, "alive"

    def stop(self) -> None:
        """Ask the loop to stop after the batch in hand (safe from a signal handler)."""
        self._running = False

    def run(self, broker_wait: float = 30.0) -> None:
        """Start, loop until :meth:`stop`, then flush, commit and leave the groups."""
        self.start(broker_wait)
        try:
            while self._running:
                self.run_once()
        finally:
            self.close()

    def start(self, broker_wait: float = 30.0) -> None:
        """Reach the broker, start the plugins, subscribe; call :meth:`run_once` next."""
        self._running = True
        self._wait_for_broker(broker_wait)
        self._producer = shared_producer(self.settings, self.transport)
        data_root = Path(self.settings.data_dir)
        for plugin in self.plugins:
            env = PluginEnv(plugin.name, self.settings.plugin_config(plugin.name), data_root / plugin.name)
            state = plugin.start(env)
            plugin_metrics = None
            if self.metrics is not None:
                plugin_metrics = self.metrics.for_plugin(plugin.name)
                for breaker in plugin.breakers.values():
                    plugin_metrics.watch_breaker(breaker)
                self.host.register_metrics(self.metrics.registry, plugin)
            runner = PluginRunner(
                plugin, self.settings, self.host, self._producer, self.transport, plugin_metrics, state=state
            )
            self.runners.append(runner)
        self._ensure_internal_topics()
        for runner in self.runners:
            runner.subscribe()
        self.host.worker_started(self)
        log.info("worker started: %s", ", ".join(p.name for p in self.plugins))

    def run_once(self, timeout: float | None = None) -> int:
        """One batch step of every plugin; return how many messages they handled."""
        self.last_beat = time.monotonic()
        if timeout is None:
            timeout = self.settings.poll_timeout / max(len(self.runners), 1)
        return sum(runner.step(timeout, self.flush) for runner in self.runners)

    def flush(self) -> None:
        """Wait until every produced message is acknowledged or failed, beating the liveness clock."""
        producer = self._producer
        while producer.flush(1.0) > 0:
            self.last_beat = time.monotonic()

    def close(self) -> None:
        """Flush, commit, leave the groups and stop the plugins (idempotent)."""
        if self._stopped or not self.runners:
            return
        self._stopped = True
        log.info("worker stopping: flushing and committing")
        self.host.worker_stopping(self)
        self.flush()
        for runner in self.runners:
            runner.close()
        for runner in self.runners:
            runner.plugin.stop(runner.state)
        log.info("worker stopped")

    def _wait_for_broker(self, wait: float) -> None:
        admin = self.transport.admin({**self.settings.kafka, "bootstrap.servers": self.settings.bootstrap_servers})
        deadline = time.monotonic() + wait
        while True:
            try:
                self._topics = admin.list_topics(timeout=min(5.0, max(wait, 0.1)))
                break
            except BrokerUnavailable:
                if time.monotonic() >= deadline or not self._running:
                    raise
                self.last_beat = time.monotonic()
        self._admin = admin
        self.broker_reached = True

    def _ensure_internal_topics(self) -> None:
        """Create missing retry and dead-letter topics, sized like the plugin's largest topic."""
        wanted = []
        for runner in self.runners:
            sizes = [self._topics.get(t, 1) for t in runner.routes]
            partitions = max(sizes or [1])
            for topic in [*runner.retry_topics, runner.dlq]:
                if topic not in self._topics:
                    # -1: the broker's default replication factor.
                    wanted.append((topic, partitions, -1))
            missing = [t for t in [*runner.routes, *runner.plugin.produced] if t not in self._topics]
            if missing:
                log.warning(
                    "%s: topics %s do not exist yet; create them with `kafkaworkers topics create`",
                    runner.plugin.name, ", ".join(missing),
                )  # fmt: skip
        if wanted:
            self._admin.create_topics(wanted)


_DEAD: Any = object()  # a retry message that was dead-lettered at once: done, like a handled one


def _number(raw: bytes | None) -> int:
    """A non-negative integer header (attempt, due time); 0 when absent or not a sane number."""
    return int(raw) if raw and raw.isdigit() and len(raw) <= 18 else 0


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)


def _extra(plugin: Plugin, tp: tuple[str, int], msg: Message) -> dict[str, Any]:
    headers = parse_headers(msg.headers())
    correlation = headers.get("kw-correlation-id")
    return {
        "plugin": plugin.name,
        "topic": tp[0],
        "partition": tp[1],
        "offset": msg.offset(),
        "correlation_id": correlation.decode("utf-8", "replace") if correlation else None,
    }
