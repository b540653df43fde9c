"""Producers: the safe defaults, the factory, and the one shared producer per process.

The seed's ``producers/`` (a base, a factory) and ``utils/singleton`` live here: librdkafka
producers are thread-safe and batch best when shared, so a process keeps one per broker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kafkaworkers.config import Settings
from kafkaworkers.transports import Headers, Producer, Transport, transport_for

__all__ = ["PRODUCER_DEFAULTS", "create_producer", "produce", "producer_config", "shared_producer"]

#: Idempotent, fully acknowledged writes: at-least-once with no duplicates from client retries.
PRODUCER_DEFAULTS: dict[str, Any] = {
    # librdkafka's own log lines go through Python logging (and so into JSON logs).
    "logger": logging.getLogger("kafkaworkers.librdkafka"),
    "acks": "all",
    "enable.idempotence": True,
    "linger.ms": 5,
    # The Java client's partitioner: a key lands on the same partition whichever client wrote it
    # (and on the in-memory broker, which hashes the same way).
    "partitioner": "murmur2_random",
    # Below the consumer's max.poll.interval.ms, so a broker outage surfaces as a delivery
    # error the loop can act on instead of an eviction from the group.
    "message.timeout.ms": 120_000,
}

_lock = threading.Lock()
_shared: dict[tuple[object, ...], Producer] = {}


def producer_config(settings: Settings, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Layer the client configuration: defaults < ``[kafka]`` < ``[producer]`` < ``extra``."""
    return {
        **PRODUCER_DEFAULTS,
        **settings.kafka,
        **settings.producer,
        **(extra or {}),
        "bootstrap.servers": settings.bootstrap_servers,
    }


def create_producer(
    settings: Settings, extra: Mapping[str, Any] | None = None, transport: Transport | None = None
) -> Producer:
    """A new producer with the framework's defaults (benchmarks and tools that need their own)."""
    transport = transport or transport_for(settings.bootstrap_servers)
    return transport.producer(producer_config(settings, extra))


def shared_producer(settings: Settings, transport: Transport | None = None) -> Producer:
    """The process-wide producer for this broker and configuration, created on first use."""
    transport = transport or transport_for(settings.bootstrap_servers)
    config = producer_config(settings)
    key = (_broker_of(transport), *sorted(config.items(), key=lambda item: item[0]))
    with _lock:
        if key not in _shared:
            _shared[key] = transport.producer(config)
        return _shared[key]


def _broker_of(transport: Transport) -> object:
    """What tells one broker from another beyond the configuration.

    The bootstrap string alone does not: two embedded brokers may share one, and a Kafka
    cluster may be reached under an address an embedded broker is also named by. The
    embedded transport hands out clients of its ``broker`` object; Kafka's servers are part
    of the configuration already.
    """
    return (transport.name, getattr(transport, "broker", None))


def produce(
    producer: Producer,
    topic: str,
    value: bytes | None,
    key: bytes | None = None,
    headers: Headers | None = None,
    on_delivery: Callable[[Any, Any], None] | None = None,
    partition: int = -1,
) -> None:
    """``producer.produce`` that waits for room when the local queue is full.

    librdkafka raises ``BufferError`` instead of blocking when its queue is full; serving
    delivery reports empties it. Every other error (a value over ``message.max.bytes``, an
    unknown topic, a fatal producer) is raised to the caller, who knows what it means there.
    """
    while True:
        try:
            producer.produce(topic, value, key, partition=partition, on_delivery=on_delivery, headers=headers or None)
            return
        except BufferError:
            producer.poll(0.1)
