"""Prometheus metrics: the names ``/metrics`` serves and the per-plugin handles the loop uses.

Label values are bounded (plugin, topic, partition, outcome, breaker names), never an id,
key, offset or error text. Every label child is resolved once and cached, and the loop
updates counters once per batch, not per message. The one per-message metric, the handler
duration, is a plain bucket count in :class:`HandlerDurations` that ``/metrics`` reads at
scrape time: a ``prometheus_client`` histogram's ``observe()`` (a lock and two value
objects) cost more than the rest of the framework's per-message work.

Consumer lag comes from librdkafka's own statistics: the worker sets
``statistics.interval.ms`` and a ``stats_cb`` on each plugin's consumer, librdkafka calls it
inside ``consume()`` (on the loop's thread) every interval, and :meth:`PluginMetrics.update_lag`
copies each assigned partition's lag into ``kafkaworkers_consumer_lag``.
"""

from __future__ import annotations

import contextlib
import logging
from bisect import bisect_left, bisect_right
from collections.abc import Collection, Iterator
from typing import Any, TypeVar

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from kafkaworkers import __version__
from kafkaworkers.breaker import STATE_VALUES, CircuitBreaker

__all__ = ["LAG_STATS_INTERVAL_MS", "OUTCOMES", "HandlerDurations", "Metrics", "PluginMetrics", "consumer_lags"]

log = logging.getLogger(__name__)

_Metric = TypeVar("_Metric", Counter, Gauge)

OUTCOMES = ("ok", "retried", "dead_lettered")

#: How often librdkafka reports statistics, hence how fresh ``kafkaworkers_consumer_lag`` is
#: (a ``statistics.interval.ms`` set in ``[consumer]`` or ``[kafka]`` wins; 0 turns lag off).
LAG_STATS_INTERVAL_MS = 2000

_DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class Metrics:
    """Every kafkaworkers metric, registered in one registry (a fresh one per worker by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "kafkaworkers_messages_consumed", "Messages fetched from Kafka.", ["plugin", "topic"], registry=r
        )
        self.handled = Counter(
            "kafkaworkers_messages_handled",
            "Messages finished, by outcome: ok, retried (sent to a retry topic) or dead_lettered.",
            ["plugin", "topic", "outcome"],
            registry=r,
        )
        self.produced = Counter(
            "kafkaworkers_messages_produced", "Messages produced by handlers.", ["plugin", "topic"], registry=r
        )
        self.duration = _DurationCollector(
            "kafkaworkers_handler_duration_seconds", "Time spent in a handler per message.", _DURATION_BUCKETS
        )
        r.register(self.duration)
        self.batch_size = Histogram(
            "kafkaworkers_batch_size", "Messages per consume batch.", ["plugin"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.lag = Gauge(
            "kafkaworkers_consumer_lag",
            "Messages between the consumer's position and the partition's high watermark.",
            ["plugin", "topic", "partition"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "kafkaworkers_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["plugin", "breaker"],
            registry=r,
        )
        self.assigned = Gauge(
            "kafkaworkers_partitions_assigned", "Partitions assigned to the plugin's consumer.", ["plugin"], registry=r
        )
        self.paused = Gauge(
            "kafkaworkers_partitions_paused", "Assigned partitions currently paused.", ["plugin"], registry=r
        )
        self.observer_errors = Counter(
            "kafkaworkers_observer_errors",
            "Observer hooks that raised; the messages they observed kept their outcome.",
            ["plugin", "hook"],
            registry=r,
        )
        Info("kafkaworkers_build", "The kafkaworkers version.", registry=r).info({"version": __version__})

    def observer_failed(self, plugin: str, hook: str) -> None:
        """Count an observer hook of ``plugin`` that raised."""
        self.observer_errors.labels(plugin, hook).inc()

    def for_plugin(self, plugin: str) -> PluginMetrics:
        """The label children of one plugin, resolved once."""
        return PluginMetrics(self, plugin)


class PluginMetrics:
    """One plugin's metric children, each resolved on first use and cached.

    Resolving a topic's handler-duration child (the worker does it when the plugin starts)
    also creates the topic's consumed and handled counters at 0, so ``rate()`` and
    ``increase()`` see the first message, retry or dead letter instead of a new series.
    """

    def __init__(self, metrics: Metrics, plugin: str) -> None:
        self._m = metrics
        self.plugin = plugin
        self.batch_size = metrics.batch_size.labels(plugin)
        self.assigned = metrics.assigned.labels(plugin)
        self.paused = metrics.paused.labels(plugin)
        self._children: dict[tuple[object, ...], Any] = {}
        self._lag_failed = False

    def _child(self, metric: _Metric, *labels: str) -> _Metric:
        """``metric.labels(plugin, *labels)``, looked up once: ``labels()`` takes a lock and validates."""
        key = (metric, *labels)
        # The cache holds children of every metric; the key's metric says which kind this one is.
        child: _Metric | None = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.plugin, *labels)
        return child

    def consumed(self, topic: str) -> Counter:
        return self._child(self._m.consumed, topic)

    def handled(self, topic: str, outcome: str) -> Counter:
        return self._child(self._m.handled, topic, outcome)

    def produced(self, topic: str) -> Counter:
        return self._child(self._m.produced, topic)

    def duration(self, topic: str) -> HandlerDurations:
        """The topic's handler durations; also creates its counters at 0 (see the class doc)."""
        self.consumed(topic)
        for outcome in OUTCOMES:
            self.handled(topic, outcome)
        return self._m.duration.child(self.plugin, topic)

    def lag(self, topic: str, partition: int) -> Gauge:
        return self._child(self._m.lag, topic, str(partition))

    def forget_lag(self, topic: str, partition: int) -> None:
        """Drop a revoked partition's lag series so a scrape does not show a stale value."""
        if self._children.pop((self._m.lag, topic, str(partition)), None) is not None:
            with contextlib.suppress(KeyError):
                self._m.lag.remove(self.plugin, topic, str(partition))

    def update_lag(self, stats: str | bytes, assignment: Collection[tuple[str, int]]) -> None:
        """Set the lag of every assigned partition from one librdkafka statistics document.

        Runs as the consumer's ``stats_cb``, inside ``consume()``: it never raises, since an
        exception there would surface from ``consume()`` and stop the loop.
        """
        try:
            for topic, partition, lag in consumer_lags(stats):
                if (topic, partition) in assignment:
                    self.lag(topic, partition).set(lag)
        except Exception as exc:
            if not self._lag_failed:
                self._lag_failed = True
                log.warning("%s: cannot read consumer lag from librdkafka statistics: %r", self.plugin, exc)

    def watch_breaker(self, breaker: CircuitBreaker) -> None:
        """Read the breaker's state at scrape time, so an idle plugin never shows a stale state."""
        self._child(self._m.breaker_state, breaker.name).set_function(lambda: STATE_VALUES[breaker.state])


class HandlerDurations:
    """One (plugin, topic)'s handler durations: a count per bucket and a sum, kept by the loop's thread.

    ``/metrics`` copies the counts when scraped; only the loop writes them, so no lock is taken.
    The batch loop records each message's seconds with :attr:`record` (a list append, no Python call)
    and counts them into the buckets once per batch with :meth:`settle`; :meth:`observe` counts one at once.
    """

    __slots__ = ("_bounds", "_pending", "counts", "record", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        #: Observations per bucket, not cumulative; the last one is ``+Inf``.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self._pending: list[float] = []
        #: ``record(seconds)``: one observation, counted by the next :meth:`settle`.
        self.record = self._pending.append

    def observe(self, seconds: float) -> None:
        # bisect_left: the first bound >= seconds, as Prometheus buckets are "less or equal".
        self.counts[bisect_left(self._bounds, seconds)] += 1
        self.sum += seconds

    def settle(self) -> None:
        """Count what was recorded since the last call: sorted, each bucket's share is one
        bisect per bound instead of one per observation."""
        pending = self._pending
        if not pending:
            return
        pending.sort()
        counts = self.counts
        total = len(pending)
        below = 0
        for i, bound in enumerate(self._bounds):
            upto = bisect_right(pending, bound, below)  # how many are <= bound ("le")
            counts[i] += upto - below
            below = upto
            if below == total:
                break
        counts[-1] += total - below
        self.sum += sum(pending)
        pending.clear()


class _DurationCollector:
    """Serves every :class:`HandlerDurations` as one Prometheus histogram family."""

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(float(b) for b in bounds)
        # prometheus_client leaves floatToGoString unannotated; it returns the text of a float.
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, str], HandlerDurations] = {}

    def child(self, plugin: str, topic: str) -> HandlerDurations:
        return self._children.setdefault((plugin, topic), HandlerDurations(self.bounds))

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=("plugin", "topic"))]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=("plugin", "topic"))
        for (plugin, topic), child in list(self._children.items()):
            total = 0
            buckets = []
            for le, count in zip(self._le, list(child.counts), strict=True):
                total += count
                buckets.append((le, total))
            family.add_metric((plugin, topic), buckets, child.sum)
        yield family


class _PartitionStats(msgspec.Struct):
    consumer_lag: int = -1
    consumer_lag_stored: int = -1


class _TopicStats(msgspec.Struct):
    partitions: dict[str, _PartitionStats] = {}


class _Stats(msgspec.Struct):
    topics: dict[str, _TopicStats] = {}


# Decoding into these few fields skips the rest of the (large) document without building it.
_stats_decoder = msgspec.json.Decoder(_Stats)


def consumer_lags(stats: str | bytes) -> list[tuple[str, int, int]]:
    """(topic, partition, lag) of every partition whose lag librdkafka knows, from its statistics JSON.

    The lag is ``consumer_lag_stored`` (high watermark minus the offset the loop stored after
    finishing a message), else ``consumer_lag`` (minus the committed offset). The internal
    partition -1 and partitions with no offset yet (lag -1) are left out.
    """
    out = []
    for topic, topic_stats in _stats_decoder.decode(stats).topics.items():
        for key, part in topic_stats.partitions.items():
            partition = int(key)
            if partition < 0:
                continue
            lag = part.consumer_lag_stored if part.consumer_lag_stored >= 0 else part.consumer_lag
            if lag >= 0:
                out.append((topic, partition, lag))
    return out
