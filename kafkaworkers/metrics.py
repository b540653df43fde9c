"""Prometheus metrics: the names ``/metrics`` serves and the per-plugin handles the loop uses.

Label values are bounded (plugin, topic, partition, outcome, breaker names), never an id,
key, offset or error text. The loop resolves every label child once, when a plugin starts
or a partition is assigned, and updates counters once per batch.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from kafkaworkers import __version__

__all__ = ["OUTCOMES", "Metrics", "PluginMetrics"]

OUTCOMES = ("ok", "retried", "dead_lettered")

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
        self.duration = Histogram(
            "kafkaworkers_handler_duration_seconds",
            "Time spent in a handler per message.",
            ["plugin", "topic"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
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
        Info("kafkaworkers_build", "The kafkaworkers version.", registry=r).info({"version": __version__})

    def for_plugin(self, plugin: str) -> PluginMetrics:
        """The label children of one plugin, resolved once."""
        return PluginMetrics(self, plugin)


class PluginMetrics:
    """One plugin's metric children; topic children are resolved on first use and cached."""

    def __init__(self, metrics: Metrics, plugin: str) -> None:
        self._m = metrics
        self.plugin = plugin
        self.batch_size = metrics.batch_size.labels(plugin)
        self.assigned = metrics.assigned.labels(plugin)
        self.paused = metrics.paused.labels(plugin)

    def consumed(self, topic: str) -> Counter:
        return self._m.consumed.labels(self.plugin, topic)

    def handled(self, topic: str, outcome: str) -> Counter:
        return self._m.handled.labels(self.plugin, topic, outcome)

    def produced(self, topic: str) -> Counter:
        return self._m.produced.labels(self.plugin, topic)

    def duration(self, topic: str) -> Histogram:
        return self._m.duration.labels(self.plugin, topic)

    def lag(self, topic: str, partition: int) -> Gauge:
        return self._m.lag.labels(self.plugin, topic, str(partition))

    def forget_lag(self, topic: str, partition: int) -> None:
        """Drop a revoked partition's lag series so a scrape does not show a stale value."""
        with contextlib.suppress(KeyError):
            self._m.lag.remove(self.plugin, topic, str(partition))

    def breaker_state(self, breaker: str) -> Gauge:
        return self._m.breaker_state.labels(self.plugin, breaker)
