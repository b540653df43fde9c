"""kafkaworkers: a Kafka worker framework.

Plugins declare the topics they consume and produce with msgspec types; the runtime runs
their handlers in a confluent-kafka consumer loop with at-least-once delivery, retry and
dead-letter topics, circuit breakers, Prometheus metrics and probes.
"""

__version__ = "0.1.0"

from kafkaworkers.api import Context, Plugin, PluginEnv, Subscription
from kafkaworkers.breaker import CircuitBreaker
from kafkaworkers.errors import (
    BrokerUnavailable,
    CircuitOpenError,
    ConfigError,
    DecodeError,
    KafkaWorkersError,
    PermanentError,
    PluginError,
    Retry,
    StoreConflict,
)
from kafkaworkers.hookspecs import hookimpl
from kafkaworkers.retry import RetryPolicy
from kafkaworkers.stores import Store, open_store

__all__ = [
    "BrokerUnavailable",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigError",
    "Context",
    "DecodeError",
    "KafkaWorkersError",
    "PermanentError",
    "Plugin",
    "PluginEnv",
    "PluginError",
    "Retry",
    "RetryPolicy",
    "Store",
    "StoreConflict",
    "Subscription",
    "__version__",
    "hookimpl",
    "open_store",
]
