"""Consumers: the at-least-once defaults and the factory.

The seed's ``consumers/`` (a base, a factory). The loop that drives a consumer is
:mod:`kafkaworkers.worker`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaException

from kafkaworkers.config import Settings
from kafkaworkers.errors import BrokerUnavailable
from kafkaworkers.transports import Consumer, TopicPartition, Transport, transport_for

__all__ = ["CONSUMER_DEFAULTS", "consumer_config", "create_consumer", "watermarks"]

CONSUMER_DEFAULTS: dict[str, Any] = {
    # librdkafka's own log lines go through Python logging (and so into JSON logs).
    "logger": logging.getLogger("kafkaworkers.librdkafka"),
    # A service that joins for the first time processes what is already waiting for it.
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    # librdkafka's default, said out loud: an aborted transaction's messages are never read.
    "isolation.level": "read_committed",
    # Committing every second bounds the re-delivery after a crash; what is committed is
    # only ever what the loop stored, and it stores only finished, acknowledged work.
    "enable.auto.commit": True,
    "auto.commit.interval.ms": 1000,
    # Prefetch about 0.1 s of a busy topic, not librdkafka's 64 MiB: a worker's memory stays
    # small and a rebalance or pause drops little. With a queue this short, librdkafka's 1 s
    # backoff after a full queue would idle the loop: re-check every 10 ms instead.
    "queued.max.messages.kbytes": 2048,
    "fetch.queue.backoff.ms": 10,
    "fetch.max.bytes": 2 * 1024 * 1024,
    "max.partition.fetch.bytes": 512 * 1024,
}

#: Never overridable: the loop, not librdkafka, decides which offsets are done.
_FORCED: dict[str, Any] = {"enable.auto.offset.store": False}


def consumer_config(settings: Settings, group_id: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Layer the client configuration: defaults < ``[kafka]`` < ``[consumer]`` < ``extra`` < forced."""
    return {
        **CONSUMER_DEFAULTS,
        **settings.kafka,
        **settings.consumer,
        **(extra or {}),
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": group_id,
        **_FORCED,
    }


def create_consumer(
    settings: Settings,
    group_id: str,
    extra: Mapping[str, Any] | None = None,
    transport: Transport | None = None,
) -> Consumer:
    """A consumer in ``group_id`` that never stores an offset by itself."""
    transport = transport or transport_for(settings.bootstrap_servers)
    return transport.consumer(consumer_config(settings, group_id, extra))


def watermarks(consumer: Consumer, partition: TopicPartition, timeout: float = 10.0) -> tuple[int, int]:
    """A partition's low and high watermarks, asking again while a new topic's leader is elected."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(partition, timeout=timeout)
        except KafkaException as exc:
            if time.monotonic() > deadline:
                where = f"{partition.topic}[{partition.partition}]"
                raise BrokerUnavailable(f"cannot read the offsets of {where}: {exc.args[0].str()}") from None
            time.sleep(0.2)
